"""The one shared registry: live objects under opaque random handle IDs, with per-object locks."""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidArgument, NotFound

log = logging.getLogger("weightavg.sessions")

CALLER_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("weightavg_caller_session", default=None)
"""The session of the call being served (set by the session interceptor from call metadata), or None."""


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
    session: str | None = None
    """The session that owns the handle (freed with it), or None: lives until freed."""


@dataclass
class Session:
    """A client's lease: it ends `lease` seconds after its last call unless a call is in flight."""

    id: str
    lease: float
    expires: float
    active: int = 0


def new_handle_id(kind: Kind) -> str:
    """An unguessable ID: 128 random bits behind a short kind prefix that only helps reading logs."""
    return f"{kind.value[:3]}_{secrets.token_hex(16)}"


class Registry:
    """Maps handle IDs to entries, and session IDs to leases.

    Lookups take a short internal lock; work on objects takes theirs. A handle created while serving
    a call that carries a session (CALLER_SESSION) belongs to that session.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def add(
        self, kind: Kind, obj: Any, lock: threading.RLock | None = None, *, handle_id: str | None = None,
        session: str | None = None,
    ) -> str:
        """Register obj under a new handle; `lock` shares another object's lock (views, models).

        The handle belongs to `session`, else to the caller's session; `handle_id` is only for
        restoring a snapshot. NotFound when the session has ended (the object is then dropped).
        """
        owner = session if session is not None else CALLER_SESSION.get()
        entry = Entry(kind, obj, lock if lock is not None else threading.RLock(), session=owner)
        handle = handle_id or new_handle_id(kind)
        with self._lock:
            if owner is not None and owner not in self._sessions:
                raise NotFound(f"session '{owner}' has ended (lease expired or closed); nothing created")
            if handle in self._entries:
                raise InvalidArgument(f"handle '{handle}' already exists")
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
        """A second handle to the same object, sharing its lock (owned by the caller's session)."""
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
        """Release every handle the caller can list: its session's, or those of no session."""
        owner = CALLER_SESSION.get()
        with self._lock:
            doomed = [h for h, e in self._entries.items() if e.session == owner]
            for h in doomed:
                del self._entries[h]
        return len(doomed)

    def items(self) -> list[tuple[str, Entry]]:
        """A snapshot of every live handle, oldest first."""
        with self._lock:
            return sorted(self._entries.items(), key=lambda item: item[1].created)

    def visible_items(self) -> list[tuple[str, Entry]]:
        """Live handles listed to the caller, oldest first: its session's, or those of no session."""
        owner = CALLER_SESSION.get()
        return [(h, e) for h, e in self.items() if e.session == owner]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(self, lease: float, session_id: str | None = None) -> str:
        """Start a session whose lease is `lease` seconds; `session_id` only when restoring a snapshot."""
        sid = session_id or f"ses_{secrets.token_hex(16)}"
        with self._lock:
            self._sessions[sid] = Session(sid, lease, time.monotonic() + lease)
        return sid

    def sessions(self) -> list[Session]:
        """Every live session (copies of their records)."""
        with self._lock:
            return [Session(s.id, s.lease, s.expires, s.active) for s in self._sessions.values()]

    def renew(self, session_id: str) -> float:
        """Push a session's expiry a full lease from now; returns the lease. NotFound once it has ended."""
        with self._lock:
            session = self._live_session(session_id)
            session.expires = time.monotonic() + session.lease
            return session.lease

    def begin_call(self, session_id: str) -> None:
        """A call carrying the session started: renew it and keep it alive until `end_call`."""
        with self._lock:
            session = self._live_session(session_id)
            session.active += 1
            session.expires = time.monotonic() + session.lease

    def end_call(self, session_id: str) -> None:
        """A call carrying the session ended: its lease counts from now."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.active -= 1
                session.expires = time.monotonic() + session.lease

    def close_session(self, session_id: str) -> int:
        """End a session and free every handle it owns; returns how many were freed."""
        with self._lock:
            self._live_session(session_id)
            del self._sessions[session_id]
            return self._drop_owned(session_id)

    def expire(self, now: float | None = None) -> list[tuple[str, int]]:
        """End sessions whose lease ran out with no call in flight, freeing their handles.

        Returns (session id, handles freed) for each; each is also logged.
        """
        now = time.monotonic() if now is None else now
        ended: list[tuple[str, int]] = []
        with self._lock:
            for sid, session in list(self._sessions.items()):
                if session.active == 0 and session.expires <= now:
                    del self._sessions[sid]
                    ended.append((sid, self._drop_owned(sid)))
        for sid, freed in ended:
            log.warning("session %s expired (no call for its lease); freed %d handle(s)", sid, freed)
        return ended

    def _live_session(self, session_id: str) -> Session:
        """The session record; call with self._lock held."""
        session = self._sessions.get(session_id) if session_id else None
        if session is None:
            raise NotFound(
                f"unknown session '{session_id}': it expired (no call within its lease), was closed, "
                "or never existed; its handles are gone"
            )
        return session

    def _drop_owned(self, session_id: str) -> int:
        """Remove every handle a session owns; call with self._lock held."""
        doomed = [h for h, e in self._entries.items() if e.session == session_id]
        for h in doomed:
            del self._entries[h]
        return len(doomed)


@contextlib.contextmanager
def locked(*entries: Entry) -> Iterator[None]:
    """Hold the locks of several entries, taken in one global order (by id) so two calls never deadlock."""
    locks = sorted({id(e.lock): e.lock for e in entries}.items())
    with contextlib.ExitStack() as stack:
        for _, lock in locks:
            stack.enter_context(lock)
        yield
