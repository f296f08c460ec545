"""What an object holds in tensor memory: its tensors, their distinct storages, summaries, and moves.

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

from . import dictionaries, flat, native, pinned, reply_buffers
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


def tensors_of(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor an object keeps alive: a module's parameters, gradients and buffers, a
    dictionary's entries (a live view's are its module's), a tensor handle's tensor, or what a
    model, optimizer or loss lists."""
    if isinstance(obj, TensorHolder):
        yield obj.tensor
    elif isinstance(obj, dictionaries.TensorDict):
        yield from obj.entries.values()
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
    uint8 CPU block of at least the bytes asked: `reply_buffers.lending`), CPU tensors of at least
    `reply_buffers.MIN_BYTES` in all are copied into views of one such block, packed with no
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
    if sum(t.numel() * t.element_size() for _, t in cpu) < reply_buffers.MIN_BYTES:
        return {}
    places: dict[int, tuple[int, int]] = {}
    at = 0
    for i, t in sorted(cpu, key=lambda it: -it[1].element_size()):
        nbytes = t.numel() * t.element_size()
        places[i] = (at, nbytes)
        at += nbytes
    return places


# -- moving between devices and dtypes --------------------------------------------------------------


def _module_converts(t: torch.Tensor) -> bool:
    """Which tensors Module.to(dtype) converts: floating and complex ones."""
    return t.is_floating_point() or t.is_complex()


def _every(t: torch.Tensor) -> bool:
    return True


def _movable(obj: object) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], bool]]:
    """The tensors a move copies and which of them a dtype converts; InvalidArgument for objects
    that do not move on their own."""
    if isinstance(obj, TensorHolder):
        return [obj.tensor], _every
    if isinstance(obj, dictionaries.TensorDict):
        if obj.live:
            raise InvalidArgument("a live view moves with its module: move the module instead")
        return [t for name, t in obj.entries.items() if name != dictionaries.COUNT_KEY], dictionaries.converts
    if isinstance(obj, torch.nn.Module):
        return list({id(t): t for t in module_tensors(obj)}.values()), _module_converts
    raise InvalidArgument(f"cannot move a {type(obj).__name__.lower()}: move its module instead")


def _check_target(dtype: torch.dtype | None) -> None:
    """InvalidArgument for a target dtype that is not floating or complex: the move converts
    floating tensors (a module's, a dictionary's) and a cast to bool or an integer would destroy
    them (a dictionary moved to bool held only True; found by review)."""
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise InvalidArgument(
            f"a move converts floating-point tensors, so its dtype must be floating or complex, not {dtype}; "
            "leave dtype unset to move only the device"
        )


def move_bytes(obj: object, device: torch.device | None, dtype: torch.dtype | None) -> Bytes:
    """New bytes a move would allocate, by target device: every tensor is copied before the old go.

    Tensors that already have the target device and dtype are not copied and cost nothing.
    """
    _check_target(dtype)
    tensors, converts = _movable(obj)
    totals: Bytes = {}
    for t in tensors:
        new_dtype = dtype if dtype is not None and converts(t) else t.dtype
        target = device if device is not None else t.device
        if target == t.device and new_dtype == t.dtype:
            continue
        size = t.numel() * torch.empty((), dtype=new_dtype).element_size()
        totals[str(target)] = totals.get(str(target), 0) + size
    return totals


def move(obj: object, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Move a tensor, dictionary or module in place, so every handle to it sees the move.

    All new tensors are made before any old one is replaced, so a move that runs out of memory
    changes nothing.
    """
    _check_target(dtype)
    tensors, converts = _movable(obj)
    if isinstance(obj, TensorHolder):
        obj.tensor = obj.tensor.to(device=device or obj.tensor.device, dtype=dtype or obj.tensor.dtype)
    elif isinstance(obj, dictionaries.TensorDict):
        dictionaries.move(obj, device, dtype)
    elif isinstance(obj, torch.nn.Module):  # _movable refused every other kind
        _swap_data(tensors, device, dtype if dtype is not None else None, converts, obj)


def _swap_data(
    tensors: list[torch.Tensor], device: torch.device | None, dtype: torch.dtype | None,
    converts: Callable[[torch.Tensor], bool], module: torch.nn.Module,
) -> None:
    """Module.to in two phases: convert every tensor, then swap each one's data in place.

    Swapping `.data` keeps every Parameter and buffer object, so live views of the module's
    parameters and buffers keep showing the moved tensors (Module.to replaces buffer objects).
    The parameters that change are copied back to back into one new buffer per device and dtype
    (`flat.flat_copies`: the same bytes as separate copies), so a moved module averages in one
    kernel per group; gradients and buffers are copied one by one.
    """
    def target(t: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        return (device or t.device, dtype if dtype is not None and converts(t) else t.dtype)

    params = {id(p) for p in module.parameters()}
    changing = [t for t in tensors if id(t) in params and target(t) != (t.device, t.dtype)]
    with torch.no_grad():
        new_params = dict(zip(map(id, changing), flat.flat_copies(changing, target)))
        moved = [
            new_params[id(t)] if id(t) in new_params else t.to(device=target(t)[0], dtype=target(t)[1])
            for t in tensors
        ]
        for t, new in zip(tensors, moved):
            if new is not t:
                t.data = new
    flat.forget(module)
