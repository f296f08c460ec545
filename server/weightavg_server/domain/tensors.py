"""What a handle holds: its tensors (for listings and byte counts) and moving it between devices."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from . import dictionaries
from .errors import InvalidArgument
from ..store.registry import Bytes, Entry, Kind, TensorHolder


@dataclass(frozen=True)
class HandleSummary:
    """Device, common dtype, byte count and tensor count of one handle's tensors."""

    device: str
    dtype: torch.dtype | None
    nbytes: int
    tensor_count: int


def tensors_of(entry: Entry) -> Iterator[torch.Tensor]:
    """Every tensor an entry holds (a module's parameters and buffers, a dictionary's entries...)."""
    obj = entry.obj
    if entry.kind is Kind.TENSOR:
        yield obj.tensor
    elif entry.kind is Kind.DICTIONARY:
        yield from obj.entries.values()
    elif entry.kind is Kind.MODULE:
        yield from obj.parameters()
        yield from obj.buffers()
    elif hasattr(obj, "tensors"):
        yield from obj.tensors()


def summarize(entry: Entry) -> HandleSummary:
    """Summarize an entry's tensors; storage shared by several tensors is counted once."""
    tensors = list(tensors_of(entry))
    devices = {str(t.device) for t in tensors}
    dtypes = {t.dtype for t in tensors}
    seen: set[tuple[str, int]] = set()
    nbytes = 0
    for t in tensors:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            nbytes += t.untyped_storage().nbytes()
    return HandleSummary(
        device=",".join(sorted(devices)),
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
        nbytes=nbytes,
        tensor_count=len(tensors),
    )


def describe(entry: Entry) -> HandleSummary | None:
    """A summary for a listing, without waiting for a busy object; None once the handle is freed.

    An idle object is summarized under its lock. A busy one (say, training) is summarized without
    it, since the call in flight only changes values in place or, rarely, the set of tensors; a
    summary that races such a change is retried and, failing that, left empty.
    """
    if entry.lock.acquire(blocking=False):
        try:
            return None if entry.freed else summarize(entry)
        finally:
            entry.lock.release()
    for _ in range(3):
        if entry.freed:
            return None
        try:
            return summarize(entry)
        except RuntimeError:  # a dictionary changed size during iteration
            continue
    return HandleSummary(device="", dtype=None, nbytes=0, tensor_count=0)


def held_bytes(owner: object) -> Bytes:
    """Tensor bytes an owner object keeps alive, by device; shared storage counts once.

    A module counts its parameters, their gradients and its buffers; a dictionary its entries (a
    live view holds none of its own: they are its module's); a tensor handle its tensor.
    """
    tensors: list[torch.Tensor]
    if isinstance(owner, torch.nn.Module):
        params = list(owner.parameters())
        tensors = params + [p.grad for p in params if p.grad is not None] + list(owner.buffers())
    elif isinstance(owner, dictionaries.TensorDict):
        tensors = [] if owner.live else list(owner.entries.values())
    elif isinstance(owner, TensorHolder):
        tensors = [owner.tensor]
    elif hasattr(owner, "tensors"):
        tensors = list(owner.tensors())
    else:
        tensors = []
    return _storage_bytes(tensors)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> Bytes:
    """Bytes copies of the tensors would take, by device (what cloning them allocates)."""
    totals: Bytes = {}
    for t in tensors:
        device = str(t.device)
        totals[device] = totals.get(device, 0) + t.numel() * t.element_size()
    return totals


def snapshot(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """CPU copies of named tensors, taken under the object's lock so a reply can stream without it.

    A reply built from copies is consistent (no entry half-updated by a later call), and a slow
    reader never holds up writers to the object; the price is host memory for the copies while
    the reply streams.
    """
    return [(name, t.detach().to("cpu", copy=True)) for name, t in named]


def _storage_bytes(tensors: list[torch.Tensor]) -> Bytes:
    totals: Bytes = {}
    seen: set[tuple[str, int]] = set()
    for t in tensors:
        device = str(t.device)
        key = (device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            totals[device] = totals.get(device, 0) + t.untyped_storage().nbytes()
    return totals


def _converted_bytes(tensors: list[torch.Tensor], device: torch.device | None, dtype: torch.dtype | None,
                     convert: Callable[[torch.Tensor], bool]) -> Bytes:
    """Bytes the tensors would take after moving to device and converting those `convert` picks to dtype."""
    totals: Bytes = {}
    for t in tensors:
        target = str(device) if device is not None else str(t.device)
        size = (torch.empty((), dtype=dtype).element_size() if dtype is not None and convert(t) else t.element_size())
        totals[target] = totals.get(target, 0) + t.numel() * size
    return totals


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, their gradients and buffers, each tensor once."""
    out: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        out.setdefault(id(p), p)
        if p.grad is not None:
            out.setdefault(id(p.grad), p.grad)
    for b in module.buffers():
        out.setdefault(id(b), b)
    return list(out.values())


def _module_converts(t: torch.Tensor) -> bool:
    """Which tensors Module.to(dtype) converts: floating and complex ones."""
    return t.is_floating_point() or t.is_complex()


def move_bytes(entry: Entry, device: torch.device | None, dtype: torch.dtype | None) -> Bytes:
    """New bytes a move would allocate, by target device: every tensor is copied before the old go.

    Tensors that already have the target device and dtype are not copied and cost nothing.
    """
    obj = entry.obj
    if entry.kind is Kind.TENSOR:
        tensors, converts = [obj.tensor], (lambda t: True)
    elif entry.kind is Kind.DICTIONARY:
        tensors = [t for name, t in obj.entries.items() if name != dictionaries.COUNT_KEY]
        converts = dictionaries.converts
    elif entry.kind is Kind.MODULE:
        tensors, converts = _module_tensors(obj), _module_converts
    else:
        return {}
    changing = [
        t for t in tensors
        if (device is not None and t.device != device) or (dtype is not None and converts(t) and t.dtype != dtype)
    ]
    return _converted_bytes(changing, device, dtype, converts)


def move(entry: Entry, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Move a tensor, dictionary or module in place, so every handle to it sees the move.

    All new tensors are made before any old one is replaced, so a move that runs out of memory
    changes nothing.
    """
    if entry.kind is Kind.TENSOR:
        holder: TensorHolder = entry.obj
        holder.tensor = holder.tensor.to(device=device or holder.tensor.device, dtype=dtype or holder.tensor.dtype)
    elif entry.kind is Kind.DICTIONARY:
        dictionaries.move(entry.obj, device, dtype)
    elif entry.kind is Kind.MODULE:
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise InvalidArgument(f"a module's parameters can only be converted to a floating dtype, not {dtype}")
        _move_module(entry.obj, device, dtype)
    else:
        raise InvalidArgument(f"cannot move a {entry.kind.value}: move its module instead")


def _move_module(module: torch.nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Module.to in two phases: convert every tensor, then swap each one's data in place.

    Swapping `.data` keeps every Parameter and buffer object, so live views of the module's
    parameters and buffers keep showing the moved tensors (Module.to replaces buffer objects).
    """
    tensors = _module_tensors(module)
    with torch.no_grad():
        moved = [
            t.to(device=device or t.device, dtype=dtype if dtype is not None and _module_converts(t) else t.dtype)
            for t in tensors
        ]
        for t, new in zip(tensors, moved):
            if new is not t:
                t.data = new
