"""What an object holds in tensor memory: its tensors, their distinct storages and summaries.

Every object a handle can stand for (module, model, optimizer, loss, dictionary, tensor) is read
through `tensors_of`, so the store's accounting, listings and statistics all count the same
tensors. Memory is counted by storage: two tensors that share one (a view, a parameter seen
through a dictionary, a model's input held by a tensor handle) are one allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from . import dictionaries, flat, hostcache, native, pinned
from .ema import EmaState
from .errors import InvalidArgument

Bytes = dict[str, int]
"""Tensor bytes by device name ("cpu", "cuda:0")."""

StorageKey = tuple[str, int, int]
"""One allocation: (device, data pointer, bytes). Bytes are part of the key so that an address
reused for a different allocation is never mistaken for the old one."""


@dataclass
class TensorHolder:
    """A tensor handle's object: a box so that moving the tensor keeps every handle to it valid."""

    tensor: torch.Tensor


@runtime_checkable
class HasTensors(Protocol):
    """An object that lists the tensors it keeps alive (models, optimizers, losses)."""

    def tensors(self) -> Iterator[torch.Tensor]: ...


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """A module's parameters, their gradients and its buffers."""
    for p in module.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    yield from module.buffers()


def dictionary_tensors(d: dictionaries.TensorDict) -> Iterator[torch.Tensor]:
    """A dictionary's entries and, for a live view, the gradients on its parameters.

    A view of a module's parameters holds the parameters themselves, and a parameter keeps its
    `.grad` alive: once every other handle to the module is gone (the model freed, or given another
    module by UpdateModel), the view alone kept the gradients the last epoch left, uncharged (found
    by review: a trained 20 -> 5 layer's view charged 420 bytes and held 840). Only a live view can
    hold parameters; a dictionary's own entries are plain tensors, so their walk stays as it was.
    """
    yield from d.entries.values()
    if d.live:
        for t in d.entries.values():
            if t.grad is not None:
                yield t.grad


def tensors_of(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor an object keeps alive: a module's parameters, gradients and buffers, a
    dictionary's entries (a live view's are its module's), a tensor handle's tensor, or what a
    model, optimizer or loss lists."""
    if isinstance(obj, TensorHolder):
        yield obj.tensor
    elif isinstance(obj, dictionaries.TensorDict):
        yield from dictionary_tensors(obj)
    elif isinstance(obj, torch.nn.Module):
        yield from module_tensors(obj)
    elif isinstance(obj, HasTensors):
        yield from obj.tensors()


_CUDA_NAMES: dict[int, str] = {}
"""str(device) of each GPU index seen, so a walk over a module's tensors does not rebuild it."""


def device_name(t: torch.Tensor) -> str:
    """str(t.device), without building a torch.device for a CPU or CUDA tensor: that was over half
    the time of a walk over every storage (0.5 of 0.8 ms for 800 tensors), which the store does
    after every change."""
    if t.is_cpu:
        return "cpu"
    if t.is_cuda:
        index = t.get_device()
        name = _CUDA_NAMES.get(index)
        if name is None:
            name = _CUDA_NAMES[index] = str(t.device)
        return name
    return str(t.device)


def storage_key(t: torch.Tensor) -> StorageKey:
    """The allocation a tensor lives in."""
    storage = t.untyped_storage()
    return (device_name(t), storage.data_ptr(), storage.nbytes())


def storages(tensors: Iterable[torch.Tensor]) -> set[StorageKey]:
    """The distinct allocations behind some tensors."""
    return {storage_key(t) for t in tensors}


def storage_bytes(keys: Iterable[StorageKey]) -> Bytes:
    """Bytes of distinct allocations, by device."""
    totals: Bytes = {}
    for device, _, nbytes in set(keys):
        totals[device] = totals.get(device, 0) + nbytes
    return totals


def held_bytes(obj: object) -> Bytes:
    """Tensor bytes an object keeps alive, by device; storage shared by several tensors counts once."""
    return storage_bytes(storages(tensors_of(obj)))


def tensor_bytes(tensors: Iterable[torch.Tensor], device: torch.device | str | None = None) -> Bytes:
    """Bytes fresh copies of the tensors would take, by device (theirs, or `device`)."""
    totals: Bytes = {}
    for t in tensors:
        name = str(device) if device is not None else device_name(t)
        totals[name] = totals.get(name, 0) + t.numel() * t.element_size()
    return totals


def add_bytes(*parts: Mapping[str, int]) -> Bytes:
    """The sum of several byte counts by device."""
    total: Bytes = {}
    for part in parts:
        for device, n in part.items():
            total[device] = total.get(device, 0) + n
    return {device: n for device, n in total.items() if n}


@dataclass(frozen=True)
class HandleSummary:
    """Device, common dtype, byte count and tensor count of one object's tensors; for a dictionary
    that holds an exponential moving average, its schedule and last step."""

    device: str
    dtype: torch.dtype | None
    nbytes: int
    tensor_count: int
    ema: EmaState | None = None
    etag: str = ""
    """The object's version tag when it was summarized, which the store fills in (store/versions.py)."""


EMPTY_SUMMARY = HandleSummary(device="", dtype=None, nbytes=0, tensor_count=0)


def summarize(obj: object) -> HandleSummary:
    """Summarize an object's tensors; storage shared by several tensors is counted once."""
    tensors = list(tensors_of(obj))
    dtypes = {t.dtype for t in tensors}
    return HandleSummary(
        device=",".join(sorted({device_name(t) for t in tensors})),
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
        nbytes=sum(storage_bytes(storages(tensors)).values()),
        tensor_count=len(tensors),
        ema=obj.ema if isinstance(obj, dictionaries.TensorDict) else None,
    )


def host_copies(
    named: Iterable[tuple[str, torch.Tensor]], buffer: Callable[[int], torch.Tensor] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """CPU copies of named tensors, taken under the object's lock so a reply can stream without it.

    A reply built from copies is consistent (no entry half-updated by a later call), and a slow
    reader never holds up writers to the object; the price is host memory for the copies while
    the reply streams. A CUDA tensor goes into a pinned block where `pinned.empty` gives one, without
    blocking; the streams copied on are waited for once, before this returns. With `buffer` (a
    uint8 CPU block of at least the bytes asked: `hostcache.lending`), CPU tensors of at least
    `hostcache.MIN_BYTES` in all are copied into views of one such block, packed with no
    padding (largest elements first, so every view is aligned), instead of into new tensors; the
    contiguous ones in one call with streaming stores on the server's threads
    (`native.stream_copies`: nothing reads the block before the reply streams it).
    """
    named = list(named)
    packed = _packed(named) if buffer is not None else {}
    block = buffer(sum(n for _, n in packed.values())) if buffer is not None and packed else None
    out: list[tuple[str, torch.Tensor]] = []
    waiting: set[torch.device] = set()
    streaming: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, (name, t) in enumerate(named):
        t = t.detach()
        if not t.is_cuda:  # (not t.device: that builds a torch.device per tensor, see device_name)
            if block is None or i not in packed:
                out.append((name, t.to("cpu", copy=True)))
                continue
            at, nbytes = packed[i]
            copy = block[at:at + nbytes].view(t.dtype).view(t.shape)
            streaming.append((copy, t))
            out.append((name, copy))
            continue
        host = pinned.empty(t.shape, t.dtype, t.device)
        staged = host.is_pinned()
        host.copy_(t, non_blocking=staged)
        if staged:
            waiting.add(t.device)
        out.append((name, host))
    for i in native.stream_copies(streaming, torch.get_num_threads()):
        streaming[i][0].copy_(streaming[i][1])
    for device in waiting:
        torch.cuda.current_stream(device).synchronize()
    return out


def _packed(named: list[tuple[str, torch.Tensor]]) -> dict[int, tuple[int, int]]:
    """Where each CPU tensor of `named` (by position) goes in one block: (offset, bytes), back to
    back in order of element size, largest first, so every offset is a multiple of its element size
    (sizes are powers of two); empty when there are too few bytes to be worth a block."""
    cpu = [(i, t) for i, (_, t) in enumerate(named) if not t.is_cuda and t.numel()]
    if sum(t.numel() * t.element_size() for _, t in cpu) < hostcache.MIN_BYTES:
        return {}
    places: dict[int, tuple[int, int]] = {}
    at = 0
    for i, t in sorted(cpu, key=lambda it: -it[1].element_size()):
        nbytes = t.numel() * t.element_size()
        places[i] = (at, nbytes)
        at += nbytes
    return places
