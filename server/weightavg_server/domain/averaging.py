"""Copying parameters to and from dictionaries, and the two averages a dictionary can hold: the
equal-weight running mean (SWA, its count in '.n') and the exponential moving average (EMA, its
schedule and step kept with the dictionary).

Both averages fold a source into a dictionary the same way: every value is cast to its entry's
dtype and lerped into it in place, so a float32 average of a bfloat16 module accumulates in
float32. The source is a module (its parameters, and its buffers as `BufferMode` says) or another
dictionary (its entries by name). Integer tensors (batchnorm's `num_batches_tracked`) are copied,
never averaged. Every pair is checked before anything changes, so a call is all or nothing.
"""

from __future__ import annotations

import enum
import functools
import itertools
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import dtypes, flat, lerp
from .dictionaries import COUNT_KEY, Count, TensorDict, check_copyable, does_not_fit
from .ema import EmaState, ScheduleChange, next_step
from .errors import InvalidArgument
from .tensors import Bytes, device_name

Source = torch.nn.Module | TensorDict
"""What an average folds in: a module's tensors, or a dictionary's entries by name."""


class BufferMode(enum.Enum):
    """What an average does with a module's buffers; integer buffers are copied in either mode that
    includes them."""

    EXCLUDE = "exclude"
    """Parameters only (the default): buffer entries of the dictionary are left as they are."""
    AVERAGE = "average"
    """Floating buffers averaged with the parameters (AveragedModel's use_buffers=True)."""
    COPY = "copy"
    """Buffers copied as they are (timm's exclude_buffers=True; AveragedModel's use_buffers=False)."""


MAX_COUNT = 2.0**53
"""Above this a float64 count no longer goes up by one."""


def check_copy_dtype(dtype: torch.dtype | None) -> None:
    """InvalidArgument unless `dtype` is None or a floating dtype a copy can convert to; the dtype named
    as the table names it ("int64"), not as torch prints it ("torch.int64"), which no client sends."""
    if dtype is not None and not dtype.is_floating_point:
        raise InvalidArgument(
            f"a copy converts to a floating dtype (float32, float64, float16 or bfloat16), not "
            f"{dtypes.name(dtype)}"
        )


def copied_tensors(module: torch.nn.Module, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """What copy_parameters copies: the parameters, then (with `buffers`) the buffers, by dotted name."""
    named = [(name, p.detach()) for name, p in module.named_parameters()]
    if buffers:
        named += list(module.named_buffers())
    return named


def copy_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a copy of t takes: `dtype` for floating tensors, else t's own (integers stay integers)."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def copy_parameters(module: torch.nn.Module, dtype: torch.dtype | None = None, buffers: bool = False) -> TensorDict:
    """Detached copies of every parameter, and with `buffers` of every buffer, keyed by dotted name,
    on their device; floating ones converted to `dtype` when given. The copies of one device and
    dtype lie back to back in one buffer (`flat.flat_copies`), so averages into them fuse.

    Example: copy_parameters(bf16_module, torch.float32) starts a float32 average of a bfloat16 module.

    Raises:
        InvalidArgument: dtype is not a floating dtype.
    """
    check_copy_dtype(dtype)
    named = copied_tensors(module, buffers)
    copies = flat.flat_copies([t.detach() for _, t in named], lambda t: (t.device, copy_dtype(t, dtype)))
    return TensorDict(dict(zip([name for name, _ in named], copies)))


def load_parameters(module: torch.nn.Module, d: TensorDict) -> dict[str, bool]:
    """Copy the dictionary's values into the module's parameters, all or nothing.

    Returns {parameter name: True if copied, False if the dictionary had no such key}, in module
    order; extra keys are ignored. Values broadcast and convert dtype as `Tensor.copy_` does. Every
    value is checked before any is copied, so a bad one leaves the module untouched.

    Example: a dictionary {"weight": 1} loaded into a linear layer gives {"weight": True, "bias": False}.
    """
    params = list(module.named_parameters())
    for name, p in params:
        if name in d.entries:
            try:
                check_copyable(p, d.entries[name])
            except InvalidArgument as exc:
                raise does_not_fit(str(exc), f"parameter '{name}'", p, d.entries[name], f"the dictionary's '{name}'") from None
    with torch.no_grad():
        for name, p in params:
            if name in d.entries:
                p.copy_(d.entries[name])
    return {name: name in d.entries for name, _ in params}


def _count(d: TensorDict) -> tuple[float, Count | None]:
    """The dictionary's current sample count (a dictionary without '.n' holds one sample), and its
    own count (`TensorDict.own_count`) when that is still the '.n' entry, else None."""
    n = d.entries.get(COUNT_KEY)
    if n is None:
        return 1.0, None
    own = d.own_count
    if own is not None and n is own.tensor:  # made by an average: a 0-dim float64 on the CPU
        count = own.value
    else:
        own = None
        if n.dim() != 0 or n.dtype != torch.float64 or not n.is_cpu:  # is_cpu: no torch.device built per call
            raise InvalidArgument(
                f"'{COUNT_KEY}' must be a 0-dim float64 count, found {dtypes.name(n.dtype)} of shape {list(n.shape)}; "
                f"set it with a float or delete it"
            )
        count = float(n.item())
    if not 0 <= count < MAX_COUNT:  # also refuses NaN
        raise InvalidArgument(
            f"'{COUNT_KEY}' must be a count between 0 and {MAX_COUNT:.0f}, found {count}; set it or delete it"
        )
    return count, own


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of two shapes; InvalidArgument with PyTorch's own wording when they do not broadcast."""
    ndim = max(len(a), len(b))
    out = []
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        size_a = a[len(a) - 1 - offset] if len(a) - 1 - offset >= 0 else 1
        size_b = b[len(b) - 1 - offset] if len(b) - 1 - offset >= 0 else 1
        if size_a != size_b and size_a != 1 and size_b != 1:
            raise InvalidArgument(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
        out.append(size_a if size_b == 1 else size_b)
    return tuple(reversed(out))


def _check_own_memory(name: str, avg: torch.Tensor) -> None:
    """An entry written in place needs its own memory per element."""
    if avg.is_contiguous() and avg.numel():  # the usual entry: a contiguous non-empty tensor has no zero
        return  # stride over a dimension of size > 1, decided in C instead of a walk over the strides
    if any(stride == 0 and size > 1 for stride, size in zip(avg.stride(), avg.shape)):
        raise InvalidArgument(
            f"'{name}' shares memory between its elements (an expanded tensor); set it to a full tensor"
        )


def _check_averageable(name: str, avg: torch.Tensor, p: torch.Tensor) -> None:
    """avg must hold p's average in place: its own memory per element, same device, a floating
    dtype that p casts to, p broadcasting into it."""
    _check_own_memory(name, avg)
    if avg.shape == p.shape and avg.device == p.device and avg.is_floating_point() and p.is_floating_point():
        return  # the usual cases (a float32 average of float32 or bfloat16), decided without the checks below
    if avg.device != p.device:
        raise InvalidArgument(
            f"'{name}' is on {avg.device} but the parameter is on {p.device}; move the dictionary"
        )
    if not (avg.is_floating_point() or avg.is_complex()):
        raise InvalidArgument(
            f"'{name}' holds {dtypes.name(avg.dtype)}; an average needs a floating-point entry: set it to a float32 or float64 "
            f"tensor; nothing changed"
        )
    if not torch.can_cast(torch.promote_types(p.dtype, avg.dtype), avg.dtype):
        raise InvalidArgument(f"'{name}' holds {dtypes.name(avg.dtype)}, which cannot hold an average of {dtypes.name(p.dtype)}")
    try:
        shape = broadcast_shape(tuple(p.shape), tuple(avg.shape))
    except InvalidArgument as exc:
        raise does_not_fit(str(exc), f"parameter '{name}'", p, avg, f"the dictionary's '{name}'") from None
    if shape != tuple(avg.shape):
        reason = f"output with shape {list(avg.shape)} doesn't match the broadcast shape {list(shape)}"
        raise does_not_fit(reason, f"parameter '{name}'", p, avg, f"the dictionary's '{name}'")


@dataclass(frozen=True)
class Update:
    """One checked update of an average, ready to apply: nothing is left to fail but memory.

    `pairs` (entry, value) are lerped with `weight` (1.0 copies them), `copied` pairs are
    copied; then the dictionary's count becomes `count` (SWA) or its EMA state `ema` (whose step
    used the decay `decay`); `count_into` is the dictionary's own '.n' tensor when the count is
    written into it in place (`TensorDict.own_count`), None when a new one replaces the entry.
    `runs` are the pairs that lie back to back on both sides (`flat.fuse`), each one operation;
    `native` is the native kernel's share of them, by address (`lerp.Batch`, kept with the plan),
    so a repeated average hands it over without touching a tensor.
    """

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    runs: tuple[flat.Run, ...] = ()
    copied: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    weight: float = 1.0
    count: float | None = None
    count_into: Count | None = None
    ema: EmaState | None = None
    decay: float = 0.0
    native: lerp.Batch | None = None

    @property
    def in_place(self) -> bool:
        """Whether applying it only writes into tensors the dictionary already holds: no entry
        replaced (an EMA's, or an average whose count tensor is the dictionary's own)."""
        return self.count is None or self.count_into is not None

    @functools.cached_property
    def averaged(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every averaged pair as one operation per run: (span, span) for a run of several."""
        return flat.spans(self.pairs, self.runs)

    @functools.cached_property
    def for_torch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What torch's loop lerps: the runs the kernel does not take (all of them without it)."""
        if self.native is None:
            return self.averaged
        return flat.spans(self.pairs, [self.runs[i] for i in self.native.rest])

    def cast_bytes(self) -> Bytes:
        """The most a lerp holds at once beyond the dictionary: one value (or `cast_chunk` elements
        of it) cast to its entry's dtype (values are cast one at a time, and a full copy casts none).
        Counted for every run of two dtypes, the kernel's (which casts nothing) too: a bound."""
        if self.weight == 1.0:
            return {}
        peak: Bytes = {}
        for start, stop, numel in self.runs:
            avg, p = self.pairs[start]
            if p.dtype != avg.dtype:
                device = device_name(avg)
                chunked = _chunked(avg, p) if stop - start == 1 else numel > cast_chunk(avg)
                pieces = cast_chunk(avg) if chunked else (p.numel() if stop - start == 1 else numel)
                peak[device] = max(peak.get(device, 0), pieces * avg.element_size())
        return peak


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@dataclass(frozen=True)
class _Index:
    """A source's averageable tensors in order: a module's parameters then buffers, or a
    dictionary's entries (not its count). `serial` changes whenever the list may have."""

    serial: int
    stamp: int
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    parameters: int
    """How many of them are parameters (a module), or all of them (a dictionary)."""


_STRUCTURE = [0]
"""Bumped whenever any module anywhere registers a parameter, buffer or submodule."""
_SERIALS = itertools.count(1)


def _registered(*_: object) -> None:
    _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_buffer_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)


def _module_index(module: torch.nn.Module) -> _Index:
    """The module's parameters and buffers by name, walked again only after some module
    registered something (a walk of 160 layers costs about 1 ms; most calls reuse the last)."""
    index: _Index | None = module.__dict__.get(flat.INDEX_ATTR)
    stamp = _STRUCTURE[0]
    if index is not None and index.stamp == stamp:
        return index
    params = list(module.named_parameters())
    named = params + list(module.named_buffers())
    names, tensors = tuple(n for n, _ in named), tuple(t for _, t in named)
    same = (
        index is not None and index.names == names and len(index.tensors) == len(tensors)
        and all(a is b for a, b in zip(index.tensors, tensors))
    )
    serial = index.serial if same and index is not None else next(_SERIALS)
    index = _Index(serial, stamp, names, tensors, len(params))
    module.__dict__[flat.INDEX_ATTR] = index  # not through Module.__setattr__: a plain attribute, no registration
    return index


def _dict_index(d: TensorDict) -> _Index:
    named = [(n, t) for n, t in d.entries.items() if n != COUNT_KEY]
    return _Index(d.version, 0, tuple(n for n, _ in named), tuple(t for _, t in named), len(named))


@dataclass(frozen=True)
class _Plan:
    """What `_pairs` decided for one (source, dictionary, buffer mode), kept on the dictionary so a
    repeated call skips the walk and the checks. It holds no tensor (nothing stays alive through
    it): names, indices and data pointers, which must all still match for it to be used."""

    source: weakref.ref[object]
    serial: int
    version: int
    entries: tuple[str, ...]
    values: tuple[int, ...]
    averaged: int
    """The first `averaged` pairs are averaged, the rest copied."""
    runs: tuple[flat.Run, ...]
    pointers: list[int]
    native: lerp.Batch | None
    """The kernel's share of the runs (`lerp.batch`), by the addresses `pointers` vouch for."""
    swaps: int
    """`flat.swaps()` when made: a module's data swapped in place since (a move) ends the plan, even
    where every address came back the same (its kernel calls would see old dtypes and sizes)."""


_DATA_PTR = torch.Tensor.data_ptr

_MAX_PLANS = 8
"""Plans kept per dictionary (one per source it is averaged with, usually one)."""


class _Pairs(NamedTuple):
    """What `_pairs` checked: an Update's tensors, before its weight and count (one Update is made
    per call: a `dataclasses.replace` of one cost more than the rest of a reused plan)."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    copied: list[tuple[torch.Tensor, torch.Tensor]]
    runs: tuple[flat.Run, ...]
    native: lerp.Batch | None


def _pairs(source: Source, d: TensorDict, buffers: BufferMode) -> _Pairs:
    """The (entry, value) pairs to average and to copy, every one checked; InvalidArgument naming the
    first bad one, before anything changes.

    Pairs that lie back to back in memory on both sides (flat dictionaries and modules, see
    `flat`) come out as one pair of spans each. The result of the checks is kept on `d` and reused
    while neither side's tensors change (same objects, same data pointers, same dictionary version,
    and no module's data swapped in place anywhere since: `flat.swaps`).
    """
    index = _module_index(source) if isinstance(source, torch.nn.Module) else _dict_index(source)
    key = (id(source), buffers)
    plan = d.plans.get(key)
    if (
        isinstance(plan, _Plan) and plan.source() is source and plan.serial == index.serial and plan.version == d.version
        and plan.swaps == flat.swaps()
    ):
        entries = d.entries
        try:
            avgs = [entries[name] for name in plan.entries]
        except KeyError:  # an entry removed without `changed()`: plan afresh, which names it
            avgs = []
        values = [index.tensors[i] for i in plan.values]
        if avgs and list(map(_DATA_PTR, avgs)) + list(map(_DATA_PTR, values)) == plan.pointers:
            return _update(avgs, values, plan.averaged, plan.runs, plan.native)
    names, values_at, averaged = _choose(source, index, d, buffers)
    avgs = [d.entries[name] for name in names]
    values = [index.tensors[i] for i in values_at]
    for i in sorted(range(len(names)), key=values_at.__getitem__):  # the source's order: the first bad one is named
        _check(names[i], avgs[i], values[i], average=i < averaged)
    pairs = list(zip(avgs[:averaged], values[:averaged]))
    runs = tuple(flat.fuse(pairs))
    native = lerp.batch(flat.spans(pairs, runs))
    if len(d.plans) >= _MAX_PLANS:
        d.plans.clear()
    d.plans[key] = _Plan(
        weakref.ref(source), index.serial, d.version, tuple(names), tuple(values_at), averaged, runs,
        list(map(_DATA_PTR, avgs)) + list(map(_DATA_PTR, values)), native, flat.swaps(),
    )
    return _update(avgs, values, averaged, runs, native)


def _update(
    avgs: list[torch.Tensor], values: list[torch.Tensor], averaged: int, runs: tuple[flat.Run, ...],
    native: lerp.Batch | None,
) -> _Pairs:
    pairs = list(zip(avgs, values))
    return _Pairs(pairs[:averaged], pairs[averaged:], runs, native)


def _choose(source: Source, index: _Index, d: TensorDict, buffers: BufferMode) -> tuple[list[str], list[int], int]:
    """Which entries take which of the source's tensors: (entry names, index positions, how many of
    them are averaged; the rest are copied); InvalidArgument for the first name `d` lacks."""
    averaged: list[tuple[str, int]] = []
    copied: list[tuple[str, int]] = []
    if isinstance(source, TensorDict):
        if buffers is not BufferMode.EXCLUDE:
            raise InvalidArgument(
                "a dictionary source has no buffers: put them in it (floating ones are averaged, others "
                "copied) and leave buffers unset"
            )
        for i, (name, value) in enumerate(zip(index.names, index.tensors)):
            if name not in d.entries:
                raise InvalidArgument(
                    f"entry '{name}' of the source dictionary not found in the average; nothing changed"
                )
            (averaged if _floating(value) else copied).append((name, i))
        return _joined(averaged, copied)
    for i in range(index.parameters):
        name = index.names[i]
        if name not in d.entries:
            raise InvalidArgument(
                f"parameter '{name}' not found in the dictionary, unable to compute average; start the average "
                f"from copyparms(m) (CopyParameters), or set the entry with dict(d, '{name}', value) (UpdateDictionary); "
                "nothing changed"
            )
        # An integer parameter (registered with parm) is copied as an integer buffer is: its copy
        # keeps its dtype, and averaging one into it was refused on every call (found by review).
        (averaged if _floating(index.tensors[i]) else copied).append((name, i))
    if buffers is BufferMode.EXCLUDE:
        return _joined(averaged, copied)
    for i in range(index.parameters, len(index.names)):
        name = index.names[i]
        if name not in d.entries:
            raise InvalidArgument(
                f"buffer '{name}' not found in the dictionary; copy the buffers in with copyparms(m, buffers=True) "
                "(CopyParameters with buffers), "
                f"or leave buffers out; nothing changed"
            )
        average = buffers is BufferMode.AVERAGE and _floating(index.tensors[i])
        (averaged if average else copied).append((name, i))
    return _joined(averaged, copied)


def _joined(averaged: list[tuple[str, int]], copied: list[tuple[str, int]]) -> tuple[list[str], list[int], int]:
    both = averaged + copied
    return [n for n, _ in both], [i for _, i in both], len(averaged)


def _check(name: str, entry: torch.Tensor, value: torch.Tensor, average: bool) -> None:
    if average:
        _check_averageable(name, entry, value)
        return
    _check_own_memory(name, entry)
    if entry.device != value.device:
        raise InvalidArgument(f"'{name}' is on {entry.device} but the value is on {value.device}; move the dictionary")
    try:
        check_copyable(entry, value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (buffer '{name}'); nothing changed") from None


CAST_CHUNK = 1 << 18
"""Elements cast at a time on the CPU when a value's dtype differs from its entry's (a bfloat16
module into a float32 average): 1 MiB of float32, small enough to stay in cache between the cast
and the lerp."""

DEVICE_CAST_CHUNK = 1 << 22
"""Elements cast at a time elsewhere (CUDA), where each piece costs two kernel launches and no cache
is kept warm between them: on an H200 a bfloat16 span of 25.6M elements lerped into float32 took
1975 us in pieces of `CAST_CHUNK`, 232 us in pieces of 2^22 and 214 us in one piece, the same bits
each time (docs/perf.md, "GPU"). At most 16 MiB of float32 scratch per device."""


def cast_chunk(t: torch.Tensor) -> int:
    """How many elements of a value are cast at a time into t's dtype on t's device."""
    return CAST_CHUNK if t.is_cpu else DEVICE_CAST_CHUNK


FOREACH_MAX_ELEMENTS = 1 << 20
"""From this many elements a CUDA pair (a flat span, usually) gets a `lerp_` launch of its own rather
than a place in the fused `_foreach_lerp_`. On an H200 (docs/perf.md, "GPU") one `lerp_` beat a
one-tensor `_foreach_lerp_` at every size from 2^20 elements: float32 906 against 684 GB/s at 2^20,
4366 against 3803 at 2^30; bfloat16 454 against 340, and 4365 against 3341. Below it, a launch per
tensor costs more than it saves (16 pieces of 2^16 elements: 107 GB/s looped, 593 fused)."""


def _lerp_all(update: Update) -> None:
    """avg += (p - avg) * weight for every averaged (avg, p) pair, in place, p cast to avg's dtype first.

    On the CPU the native kernel takes every pair it can (`update.native`, decided with the plan:
    one call per dtype, torch's bits, about add_'s speed, its threads sharing the blocks of every
    pair, whether they are the spans of a flat dictionary or an upload's separate tensors), and
    torch's `lerp_` the rest one by one: torch's CPU foreach kernels loop over the tensors
    themselves and measured no faster (from 0.8x to 1.5x the loop's time on 160 x 640 KB; the
    "kernels" row of `python -m bench`). On
    CUDA one `_foreach_lerp_` launch replaces one launch per tensor for the pairs of one shape and
    dtype, below `FOREACH_MAX_ELEMENTS`; larger pairs get a `lerp_` each. A value of another dtype
    is cast `cast_chunk` elements at a time just before their lerp (the whole value when it
    broadcasts), into one buffer per device made before anything is written, so at most one such
    piece is alive (`Update.cast_bytes`) and running out of memory for it changes nothing.
    """
    weight = update.weight
    scratch = _cast_scratch(update.for_torch)  # before anything is written: see _cast_scratch
    if update.native is not None:
        lerp.run(update.native, weight)
        if not update.native.rest:
            return
    fused: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for a, p in update.for_torch:
        if p.dtype != a.dtype:
            if _chunked(a, p):
                a_flat, p_flat, chunk = a.view(-1), p.view(-1), cast_chunk(a)
                for i in range(0, a.numel(), chunk):
                    a_flat[i:i + chunk].lerp_(_cast(scratch, p_flat[i:i + chunk], a.dtype), weight)
            else:
                a.lerp_(_cast(scratch, p, a.dtype), weight)
        elif a.is_cuda and a.shape == p.shape and a.numel() < FOREACH_MAX_ELEMENTS:
            fused[0].append(a)
            fused[1].append(p)
        else:
            a.lerp_(p, weight)  # broadcasts p into a when their shapes differ
    if fused[0]:
        torch._foreach_lerp_(fused[0], fused[1], weight)


def _cast_scratch(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[torch.device, torch.Tensor]:
    """One byte buffer per device for the values cast to their entry's dtype, as large as the largest
    piece (`Update.cast_bytes`), made before the first write: running out of memory for a cast
    then changes nothing. Each cast used to allocate its piece as it came, so a failed one (a full
    GPU) left the pairs before it averaged and the count and EMA step as they were (found by review)."""
    sizes: dict[torch.device, int] = {}
    for a, p in pairs:
        if p.dtype != a.dtype:
            nbytes = (cast_chunk(a) if _chunked(a, p) else p.numel()) * a.element_size()
            sizes[a.device] = max(sizes.get(a.device, 0), nbytes)
    return {device: torch.empty(nbytes, dtype=torch.uint8, device=device) for device, nbytes in sizes.items()}


def _cast(scratch: dict[torch.device, torch.Tensor], p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """p converted to dtype in the device's scratch buffer (what `p.to(dtype)` gives, bit for bit)."""
    piece = scratch[p.device][:p.numel() * dtype.itemsize].view(dtype).view(p.shape)
    return piece.copy_(p)


def _chunked(a: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether a cast lerp goes piece by piece: same shape, both contiguous, more than one piece."""
    return a.numel() > cast_chunk(a) and a.shape == p.shape and a.is_contiguous() and p.is_contiguous()


def apply(update: Update, d: TensorDict) -> None:
    """Carry out a checked update (see `prepare_average`, `prepare_ema`).

    A weight of 1.0 is a full copy with `copy_`, which casts and broadcasts as lerp would and stays
    exact even where the old average is not finite. The count goes into the dictionary's own '.n'
    tensor in place when it has one (`Update.in_place`), else into a new one.
    """
    # A new count first: made after a large kernel, which has just streamed every cache empty, the
    # tensor took 0.15 ms of a served avgparms (docs/perf.md, "Native lerp").
    fresh = update.count is not None and update.count_into is None
    count = Count(update.count) if fresh and update.count is not None else None
    if update.weight != 1.0 and update.native is not None and not update.native.rest and not update.copied:
        lerp.run(update.native, update.weight)  # no torch operation, so no autograd mode to set
    else:
        with torch.no_grad():
            if update.weight == 1.0:
                for a, p in update.averaged:
                    a.copy_(p)
            else:
                _lerp_all(update)
            for a, p in update.copied:
                a.copy_(p)
    if update.count_into is not None and update.count is not None:
        update.count_into.set(update.count)
    elif count is not None:
        d.own_count = count
        d.entries[COUNT_KEY] = count.tensor
    if update.ema is not None:
        d.ema = update.ema


def prepare_average(source: Source, d: TensorDict, buffers: BufferMode = BufferMode.EXCLUDE) -> Update:
    """Check a running-average update (SWA) of `d` by `source` without changing anything.

    With n samples so far (the '.n' entry, 1 when absent), every averaged entry will become
    avg + (p - avg) / (n + 1) and '.n' will become n + 1.

    Raises:
        InvalidArgument: '.n' is not a valid count, or an entry is missing or cannot hold its value.
    """
    n, own = _count(d)
    p = _pairs(source, d, buffers)
    return Update(p.pairs, p.runs, p.copied, 1.0 / (n + 1.0), n + 1.0, own, native=p.native)


def average_parameters(source: Source, d: TensorDict, buffers: BufferMode = BufferMode.EXCLUDE) -> int:
    """Fold the source into the running average held by the dictionary; return the new count.

    With n samples so far (the '.n' entry, 1 when absent), every parameter's entry becomes
    avg + (p - avg) / (n + 1) and '.n' becomes n + 1; buffers as `buffers` says. Every entry is
    checked first, so a missing or ill-shaped one leaves the dictionary untouched. The count lives
    on the CPU, so no call waits on the GPU.

    Example: after copy_parameters and one change of the module, the first call returns 2 and
    leaves the mean of the copy and the current weights.
    """
    update = prepare_average(source, d, buffers)
    apply(update, d)
    return int(update.count or 0.0)


def prepare_ema(
    source: Source, d: TensorDict, change: ScheduleChange | None = None, step: int | None = None,
    buffers: BufferMode = BufferMode.EXCLUDE,
) -> Update:
    """Check an EMA update of `d` by `source` without changing anything: the schedule is the
    dictionary's with `change` applied, the step the one given or one past the dictionary's last.

    Raises:
        InvalidArgument: a schedule field or the step is out of range, or an entry is missing or
            cannot hold its value.
    """
    kept = d.ema
    schedule = (change or ScheduleChange()).applied_to(kept.schedule if kept is not None else None)
    used = next_step(kept, step)
    decay = schedule.decay_at(used)
    p = _pairs(source, d, buffers)
    return Update(p.pairs, p.runs, p.copied, 1.0 - decay, ema=EmaState(schedule, used), decay=decay, native=p.native)


def ema_update(
    source: Source, d: TensorDict, change: ScheduleChange | None = None, step: int | None = None,
    buffers: BufferMode = BufferMode.EXCLUDE,
) -> tuple[int, float]:
    """One exponential-moving-average update of the dictionary from the source; (step, decay) used.

    Every averaged entry becomes e + (1 - decay) * (p - e), p cast to e's dtype, with the decay of
    timm ModelEmaV3's schedule at the step (`ema.EmaSchedule.decay_at`); a decay of 0 copies.

    Example: with the default schedule the first update copies (step 1, decay 0.0) and the second
    uses decay 0.9999, as `AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(0.9999))` does.
    """
    update = prepare_ema(source, d, change, step, buffers)
    apply(update, d)
    return used_step(update), update.decay


def used_step(update: Update) -> int:
    """The step an EMA update used (0 for an update that is not an EMA's)."""
    return update.ema.step if update.ema is not None else 0
