"""Flat storage: a module's parameters, or a dictionary's entries, as views into one buffer per
device and dtype, so that an average over them is one kernel rather than one per tensor.

Nothing here changes what a tensor holds or what a name means: a flat tensor is an ordinary
contiguous tensor whose storage it shares with its neighbours. Averaging (`averaging.Update`)
looks for runs of pairs that lie back to back in one storage on both sides (`fuse`) and lerps
each run as one 1-D span; a pair outside a run takes the per-tensor path, with the same result.
So flatness is an optimisation that can be lost (an entry replaced, a parameter registered)
without any correctness cost: what is still contiguous stays fused.

Memory: a storage is charged whole while any view of it lives (the store counts distinct
storages), which is also what the allocator holds; deleting one entry of a flat dictionary
therefore frees nothing until the last view of its buffer goes.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from . import hostcache

GroupKey = tuple[torch.device, torch.dtype]

INDEX_ATTR = "_weightavg_index"
"""Where averaging keeps a module's list of named tensors between calls (`averaging._module_index`)."""


_SWAPS = [0]
"""How many times some module's tensors had their data swapped in place (`forget`)."""


def forget(module: torch.nn.Module) -> None:
    """Drop what averaging remembers of the module's tensors: their dtypes, devices or storages
    changed in place (`.data` swapped by a move or a flattening). Also ends every cached averaging
    plan (`swaps`): a live view of the module holds the same tensor objects, and a new storage may
    land at a freed one's address, so addresses alone no longer vouch for a tensor."""
    module.__dict__.pop(INDEX_ATTR, None)
    _SWAPS[0] += 1


def swaps() -> int:
    """The count `forget` bumps: a plan made under another count is stale (averaging._Plan)."""
    return _SWAPS[0]


def group_sizes(tensors: Iterable[torch.Tensor]) -> dict[GroupKey, int]:
    """Elements per (device, dtype), in order of first appearance."""
    sizes: dict[GroupKey, int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        sizes[key] = sizes.get(key, 0) + t.numel()
    return sizes


def new_buffer(numel: int, key: GroupKey) -> torch.Tensor:
    """An uninitialised 1-D buffer for a group's tensors. A CPU one comes from the kept blocks of
    freed ones (`hostcache`: a repeated copy does not fault its memory in again), a new large one
    on huge pages where the system grants them (`native.advise_huge_pages`): averages stream these
    buffers whole."""
    if key[0].type == "cpu":
        return hostcache.empty_as(numel, key[1])
    return torch.empty(numel, dtype=key[1], device=key[0])


def flat_empty(shapes: Sequence[tuple[tuple[int, ...], GroupKey]]) -> list[torch.Tensor]:
    """Uninitialised tensors of these (shape, (device, dtype)), each group of one (device, dtype) back
    to back in one new buffer (`new_buffer`): exactly sum(numel * itemsize) bytes, as separate tensors
    would take, and averages or merges over them fuse."""
    sizes: dict[GroupKey, int] = {}
    for shape, key in shapes:
        sizes[key] = sizes.get(key, 0) + math.prod(shape)
    buffers = {key: new_buffer(n, key) for key, n in sizes.items()}
    used = dict.fromkeys(sizes, 0)
    out = []
    with torch.enable_grad():  # a view made in no-grad mode may not be written in place with grad mode on
        for shape, key in shapes:
            start = used[key]
            used[key] = start + math.prod(shape)
            out.append(buffers[key][start:used[key]].view(shape))
    return out


def flat_copies(
    tensors: Sequence[torch.Tensor], place: Callable[[torch.Tensor], GroupKey] | None = None,
) -> list[torch.Tensor]:
    """Copies of the tensors, each group of one (device, dtype) back to back in one new buffer
    (`flat_empty`).

    `place` gives each copy's (device, dtype) (default: its own).

    Example: flat_copies([a, b]) where a and b are float32 gives two views of one float32 buffer.
    """
    out = flat_empty([(tuple(t.shape), place(t) if place is not None else (t.device, t.dtype)) for t in tensors])
    with torch.no_grad():
        for view, t in zip(out, tensors):
            view.copy_(t)
    return out


def is_flat(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the tensors lie back to back in one storage, in order (what `fuse` joins)."""
    if not tensors:
        return True
    base = tensors[0].untyped_storage().data_ptr()
    end = tensors[0].data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != end or t.untyped_storage().data_ptr() != base:
            return False
        end += t.numel() * t.element_size()
    return True


def is_flat_by_group(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the tensors of each device and dtype lie back to back in one storage, in order, as
    `flat_copies` makes them (a copy of a module with float32 and float16 parameters, say)."""
    groups: dict[GroupKey, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return all(is_flat(group) for group in groups.values())


# -- runs: pairs that are one kernel -----------------------------------------------------------------


def span(first: torch.Tensor, numel: int) -> torch.Tensor:
    """The 1-D view of `numel` elements of first's storage starting where `first` starts (a run's
    span, `fuse`)."""
    with torch.enable_grad():  # see flat_copies
        return torch.as_strided(first.detach(), (numel,), (1,), first.storage_offset())


Run = tuple[int, int, int]
"""Pairs [start, stop) that are one operation, and their element count."""


def fuse(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Run]:
    """Split pairs (a, p) into maximal runs in which every a lies right after the previous a in
    one storage, every p right after the previous p in one storage, with one dtype and one device
    per side and equal shapes; a lone pair is a run of one.

    Lerping or copying a run's two spans is then exactly the per-pair operation on every pair.
    """
    return fuse_groups(pairs)


def fuse_groups(groups: Sequence[Sequence[torch.Tensor]]) -> list[Run]:
    """`fuse` for groups of any one size (a result and its inputs, say): maximal runs in which each
    position's tensor lies right after that position's previous one in one storage, with one dtype
    and device per position and one shape across the group; a lone group is a run of one.

    A merge plans over thousands of tensors (8 dictionaries of 160 entries and the result: 1,440),
    so each is read once, in a plain loop, the address first: that is what ends a run."""
    runs: list[Run] = []
    start = numel = 0
    ends: list[int] = []
    bases: list[int] = []
    kinds: list[tuple[torch.dtype, torch.device]] = []
    open_run = False
    """Whether the run that starts at `start` can take the next group."""
    for i, group in enumerate(groups):
        first = group[0]
        shape = first.shape
        if open_run and _extends(group, shape, ends, bases, kinds):
            numel += first.numel()
            continue
        if i > start:
            runs.append((start, i, numel))
        start, numel = i, first.numel()
        open_run = all(t.shape == shape and t.is_contiguous() for t in group)
        if open_run:
            kinds = [(t.dtype, t.device) for t in group]
            ends = [t.data_ptr() + t.nbytes for t in group]
            bases = [t.untyped_storage().data_ptr() for t in group]
    if len(groups) > start:
        runs.append((start, len(groups), numel))
    return runs


def _extends(
    group: Sequence[torch.Tensor], shape: torch.Size, ends: list[int], bases: list[int],
    kinds: list[tuple[torch.dtype, torch.device]],
) -> bool:
    """Whether each of group's tensors starts where its position's run ends, in the same storage,
    dtype and device, contiguous and of `shape`; if so the run's ends move past them."""
    if len(group) != len(ends):
        return False
    for t, end, base, (dtype, device) in zip(group, ends, bases, kinds):
        if (
            t.data_ptr() != end or t.shape != shape or not t.is_contiguous() or t.dtype != dtype
            or t.untyped_storage().data_ptr() != base or t.device != device
        ):
            return False
    for j, t in enumerate(group):
        ends[j] += t.nbytes
    return True


def spans(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], runs: Sequence[Run]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs to operate on: one (a span, p span) per run of several pairs, the pair itself
    for a run of one."""
    out = []
    for start, stop, numel in runs:
        if stop - start == 1:
            out.append(pairs[start])
            continue
        a, p = pairs[start]
        out.append((span(a, numel), span(p, numel)))
    return out


# -- building a module's parameters into one buffer ------------------------------------------------------


class _Arena:
    """Buffers sized in advance; each registered parameter takes the next slice of its group."""

    def __init__(self, sizes: dict[GroupKey, int]) -> None:
        self.buffers = {key: new_buffer(n, key) for key, n in sizes.items()}
        self.used = dict.fromkeys(sizes, 0)
        self.bases = {b.untyped_storage().data_ptr() for b in self.buffers.values()}

    def place(self, param: torch.nn.Parameter) -> None:
        key = (param.device, param.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or param.untyped_storage().data_ptr() in self.bases:
            return  # not planned for, or already placed (a parameter registered twice: tied weights)
        start = self.used[key]
        if start + param.numel() > buffer.numel():
            return  # more parameters than planned: this one keeps its own storage
        self.used[key] = start + param.numel()
        with torch.enable_grad():  # see flat_copies
            view = buffer[start:start + param.numel()].view(param.shape)
        with torch.no_grad():
            view.copy_(param)  # what the constructor put there so far (it usually initialises later, in place)
        param.data = view


_BUILDING = threading.local()


def _on_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    arena: _Arena | None = getattr(_BUILDING, "arena", None)
    if arena is not None and param is not None:
        arena.place(param)


torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter)


@contextlib.contextmanager
def building(sizes: dict[GroupKey, int]) -> Iterator[None]:
    """Within the block, on this thread, every parameter registered on any module moves into
    buffers of `sizes` elements per (device, dtype), in registration order, as it is registered.

    A constructor registers `Parameter(torch.empty(...))` and initialises it in place afterwards,
    so the module comes out exactly as it would have (same values, same random draws) with its
    parameters already flat, and at most one parameter's own storage is alive beside the buffers.
    Get `sizes` from the same build on the meta device (`group_sizes(meta.parameters())`).

    Example: with building(sizes): module = build(); then averaging the module is one kernel.
    """
    previous = getattr(_BUILDING, "arena", None)
    _BUILDING.arena = _Arena(sizes)
    try:
        yield
    finally:
        _BUILDING.arena = previous


def build_flat(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """build(), with its parameters built straight into one buffer per device and dtype.

    `build` runs twice: on the meta device (no memory) to size the buffers, then for real inside
    `building`. The module is the one `build()` alone would make, value for value.
    """
    with torch.device("meta"):
        sizes = group_sizes(build().parameters())
    cpu = torch.device("cpu")
    with building({(cpu, dtype): n for (_, dtype), n in sizes.items()}):
        return build()


def flatten_parameters(module: torch.nn.Module) -> None:
    """Copy the module's parameters into one new buffer per device and dtype and point each
    Parameter's data at its slice (the Parameter objects stay, so optimizers and views keep them).

    This allocates the parameters' bytes again while the old storages are alive, unreserved by any
    caller: the server itself builds flat (`build_flat`), moves flat, and restores snapshots flat
    (`snapshot.LoadContext.flat_tensors`) instead.
    """
    params = list(module.parameters())
    if is_flat(params):
        return
    with torch.no_grad():
        for p, view in zip(params, flat_copies([p.detach() for p in params])):
            p.data = view
    forget(module)
