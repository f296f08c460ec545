"""The one shared registry: live objects under opaque random handle IDs, with per-object locks."""

from __future__ import annotations

import contextlib
import enum
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidArgument, NotFound


class Kind(enum.Enum):
    """What a handle refers to; the values are the names users see."""

    MODULE = "module"
    MODEL = "model"
    OPTIMIZER = "optimizer"
    LOSS = "loss"
    DICTIONARY = "dictionary"
    TENSOR = "tensor"


MODULE_KINDS = (Kind.MODULE, Kind.MODEL, Kind.OPTIMIZER)
"""Kinds that stand for a module: a model means its module, an optimizer the module it was built from."""


@dataclass
class TensorHolder:
    """A tensor handle's object: a box so that moving the tensor keeps every handle to it valid."""

    tensor: torch.Tensor


@dataclass
class Entry:
    """One live handle: its kind, the object (shared by addref handles) and the object's lock."""

    kind: Kind
    obj: Any
    lock: threading.RLock
    created: float = field(default_factory=time.monotonic)


_PREFIXES = {
    Kind.MODULE: "mod", Kind.MODEL: "mdl", Kind.OPTIMIZER: "opt",
    Kind.LOSS: "los", Kind.DICTIONARY: "dic", Kind.TENSOR: "ten",
}


def new_handle_id(kind: Kind) -> str:
    """An unguessable ID: 128 random bits behind a short kind prefix that only helps reading logs."""
    return f"{_PREFIXES[kind]}_{secrets.token_hex(16)}"


class Registry:
    """Maps handle IDs to entries. Lookups take a short internal lock; work on objects takes theirs."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def add(self, kind: Kind, obj: Any, lock: threading.RLock | None = None) -> str:
        """Register obj under a new handle; `lock` shares another object's lock (views, models)."""
        entry = Entry(kind, obj, lock if lock is not None else threading.RLock())
        handle = new_handle_id(kind)
        with self._lock:
            self._entries[handle] = entry
        return handle

    def get(self, handle: str, *kinds: Kind) -> Entry:
        """The entry for handle; NotFound when unknown or freed, InvalidArgument when of the wrong kind."""
        if not handle:
            raise InvalidArgument("no handle given")
        with self._lock:
            entry = self._entries.get(handle)
        if entry is None:
            raise NotFound(f"unknown handle '{handle}' (never created, or already freed)")
        if kinds and entry.kind not in kinds:
            wanted = " or ".join(k.value for k in kinds)
            raise InvalidArgument(f"expecting {wanted} handle, given {entry.kind.value} handle '{handle}'")
        return entry

    def module(self, handle: str) -> tuple[Entry, torch.nn.Module]:
        """Resolve a module, model or optimizer handle to the module it stands for."""
        entry = self.get(handle, *MODULE_KINDS)
        module = entry.obj if entry.kind is Kind.MODULE else entry.obj.module
        return entry, module

    def addref(self, handle: str) -> str:
        """A second handle to the same object, sharing its lock."""
        entry = self.get(handle)
        return self.add(entry.kind, entry.obj, entry.lock)

    def free(self, handles: list[str]) -> int:
        """Release handles, all or nothing: every one must exist (duplicates count once)."""
        unique = list(dict.fromkeys(handles))
        with self._lock:
            missing = [h for h in unique if h not in self._entries]
            if missing:
                raise NotFound(f"unknown handle '{missing[0]}' (never created, or already freed); nothing freed")
            for h in unique:
                del self._entries[h]
        return len(unique)

    def free_all(self) -> int:
        """Release every handle."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
        return count

    def items(self) -> list[tuple[str, Entry]]:
        """A snapshot of live handles, oldest first."""
        with self._lock:
            return sorted(self._entries.items(), key=lambda item: item[1].created)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@contextlib.contextmanager
def locked(*entries: Entry) -> Iterator[None]:
    """Hold the locks of several entries, taken in one global order (by id) so two calls never deadlock."""
    locks = sorted({id(e.lock): e.lock for e in entries}.items())
    with contextlib.ExitStack() as stack:
        for _, lock in locks:
            stack.enter_context(lock)
        yield
