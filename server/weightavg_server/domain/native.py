"""The server's compiled helpers (`_native.c`), when the install could build them: the fused CPU
lerp, the one-pass weighted sum and TIES's radix selection (used through lerp.py, weighted_sum.py
and selection.py, which check each against torch), huge-page advice for large CPU buffers, and
the SIGBUS guards of shared memory regions' mappings (shm.py).
Without a C compiler at install none exists, and the server does the same work with torch alone:
the same numbers, slower on large CPU averages and merges (setup.py)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Final

import torch

Lerp = Callable[[int, tuple[int, ...], tuple[int, ...], tuple[int, ...], float, int], None]
"""lerp(kind, avg addresses, value addresses, counts, weight, threads): every pair of one kind in one
call (see `_native.c`)."""

WeightedSum = Callable[[int, tuple[int, ...], tuple[int, ...], tuple[float, ...], tuple[int, ...], float, int], None]
"""weighted_sum(kind, out addresses, input addresses (entry by entry), weights, counts, divisor or 0,
threads): every entry of a merge of one kind and division in one call (see `_native.c`)."""

Advise = Callable[[int, int], int]

Copy = Callable[[tuple[int, ...], tuple[int, ...], tuple[int, ...], int], None]
"""copy(target addresses, source addresses, sizes, threads): memcpys with streaming stores, on
threads sharing 1 MiB blocks, without the GIL (see `_native.c`)."""

KthLargest = Callable[[int, int, int, int], float]
"""kth_largest_magnitude(kind, address, count, k): the k-th largest |x| of a contiguous tensor, NaN
counted largest (see `_native.c`)."""

ZeroBelow = Callable[[int, int, int, float], None]
"""zero_below(kind, address, count, threshold): x = +0 where |x| < threshold (see `_native.c`)."""


def _load() -> tuple[Lerp | None, WeightedSum | None, Advise | None, Copy | None, KthLargest | None, ZeroBelow | None]:
    try:
        from ._native import advise_huge_pages, copy, kth_largest_magnitude, lerp, weighted_sum, zero_below
    except ImportError:  # not built: no C compiler or Python headers at install (setup.py)
        return None, None, None, None, None, None
    return lerp, weighted_sum, advise_huge_pages, copy, kth_largest_magnitude, zero_below


LERP, WEIGHTED_SUM, _ADVISE, _COPY, KTH_LARGEST, ZERO_BELOW = _load()


def _load_guards() -> tuple[Callable[[int, int], int], Callable[[int], bool], Callable[[int], None]] | None:
    try:
        from ._native import guard, guard_broken, unguard
    except ImportError:  # not built (setup.py)
        return None
    return guard, guard_broken, unguard


_GUARDS = _load_guards()


def guard(address: int, nbytes: int) -> int | None:
    """Guard a shared memory region's mapping against SIGBUS (a client truncating the file while the
    server copies; see `_native.c`): the guard's slot, or None where the native module was not
    built or has no slot left (the region then works unguarded, as before the guards)."""
    if _GUARDS is None:
        return None
    try:
        return _GUARDS[0](address, nbytes)
    except (OSError, RuntimeError):
        return None


def guard_broken(slot: int | None) -> bool:
    """Whether a fault in the guarded mapping was caught (its lost pages now read as zeros)."""
    return slot is not None and _GUARDS is not None and _GUARDS[1](slot)


def unguard(slot: int | None) -> None:
    """Stop guarding (before the mapping goes)."""
    if slot is not None and _GUARDS is not None:
        _GUARDS[2](slot)

MAX_THREADS: Final = 256
"""The most threads one kernel call takes (`MAX_THREADS` in `_native.c`, which refuses more)."""


def threads_for(wanted: int) -> int:
    """The threads a kernel call runs on: `wanted` (torch's intra-op setting, cut by the work's
    size) within 1..`MAX_THREADS`. Torch's default is the machine's cores, and on a host with more
    than 256 (or with OMP_NUM_THREADS above it) every large average failed with the kernel's
    ValueError, an INTERNAL status to the client (found by review)."""
    return max(1, min(wanted, MAX_THREADS))


STREAM_MIN_BYTES: Final = 1 << 20
"""Copies from this size stream (`stream_copy`); a smaller one stays with memcpy, whose stores leave
the bytes in cache for whatever reads them next."""

SPECIAL_VALUES: Final = (0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3e38, -3e38, 1.0)
"""What each kernel's check against torch puts at the front of its inputs: signed zeros, infinities,
NaN, float32 subnormals and values near float32's limit."""


def state(name: str, built: bool, agrees: Callable[[], bool]) -> str:
    """What one kernel's work runs on, for the server's start-up log: `name`, or torch and why."""
    if not built:
        return "torch (the native kernel was not built: no C compiler at install)"
    if not agrees():
        return "torch (the native kernel disagreed with torch on this machine, so it is off)"
    return name


def same_bits(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every bit equal, NaNs included, except that a zero may carry the other sign: torch's own
    `lerp_` gives -0.0 in its scalar tail (the last few elements of each thread's range) and +0.0 in
    its vector body for the same inputs when a weight rounds to 1.0, and the kernel always gives the
    body's."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[got.element_size()]
    differ = got.view(width) != expected.view(width)
    both_zero = (got == 0) & (expected == 0)
    return not bool((differ & ~both_zero).any())

HUGE_PAGE_MIN_BYTES: Final = 32 << 20
"""Buffers from this size are advised: glibc serves them from an mmap of their own (its mmap
threshold grows to 32 MiB at most), so the advice covers only their pages and ends with them."""


def advise_huge_pages(buffer: torch.Tensor) -> int:
    """Ask for transparent huge pages under a new CPU buffer of at least `HUGE_PAGE_MIN_BYTES`, before
    anything is written to it (a page touched first stays small); the bytes advised, 0 if none.

    A small gain: 0-5% on the fused lerp over 100 MB (`python -m bench.native_micro`; docs/perf.md,
    "Native lerp"). The values and the accounting are unchanged: the buffer is the same allocation,
    only how the kernel maps it differs.
    """
    nbytes = buffer.numel() * buffer.element_size()
    if _ADVISE is None or not buffer.is_cpu or nbytes < HUGE_PAGE_MIN_BYTES:
        return 0
    return _ADVISE(buffer.data_ptr(), nbytes)


def stream_copy(target: torch.Tensor, source: torch.Tensor) -> bool:
    """target := source for two `plain_cpu` tensors of the same byte size (a new tensor and a
    shared memory region), with streaming stores, which do not read target's lines into the cache
    first: a 256 MB upload through a region went from 4.0 to 4.35 GB/s (medians) on the project's
    VM (docs/perf.md, "Streaming copies"). Whether it copied: False, having done nothing, for
    tensors that are not both plain or differ in size, or as `stream_bytes` says."""
    nbytes = target.numel() * target.element_size()
    if source.numel() * source.element_size() != nbytes or not (plain_cpu(target) and plain_cpu(source)):
        return False
    return stream_bytes(target.data_ptr(), source.data_ptr(), nbytes)


def stream_bytes(target: int, source: int, nbytes: int) -> bool:
    """Copy nbytes from address `source` to address `target` with streaming stores on this thread
    (and without the GIL), where both are memory the caller holds for the call. Whether it copied:
    False, having done nothing, below `STREAM_MIN_BYTES`, where the two overlap, or without the
    native module."""
    if _COPY is None or nbytes < STREAM_MIN_BYTES or _overlap(target, source, nbytes):
        return False
    _COPY((target,), (source,), (nbytes,), 1)
    return True


def plain_cpu(t: torch.Tensor) -> bool:
    """A contiguous CPU tensor whose bytes are its values (not a lazily conjugated or negated view):
    one memcpy of its bytes copies it."""
    return t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def stream_copies(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], threads: int) -> list[int]:
    """target := source, of one dtype and shape, for every pair this can take (both `plain_cpu`, of
    one byte size from `STREAM_MIN_BYTES`, apart), in one call on up to `threads` threads; the
    positions of the pairs it left (all of them without the native module), for the caller's own
    copy. The targets must lie apart from one another (a region's placements, a packed reply
    block): a shared memory fetch of 256 MB went from 8.0-9.3 to 11.0-13.8 GB/s on the project's VM
    (docs/perf.md, "Streaming copies")."""
    if _COPY is None:
        return list(range(len(pairs)))
    taken: list[tuple[int, int, int]] = []
    left: list[int] = []
    for i, (target, source) in enumerate(pairs):
        nbytes = target.numel() * target.element_size()
        if (
            nbytes < STREAM_MIN_BYTES or source.numel() * source.element_size() != nbytes
            or not (plain_cpu(target) and plain_cpu(source))
            or _overlap(target.data_ptr(), source.data_ptr(), nbytes)
        ):
            left.append(i)
        else:
            taken.append((target.data_ptr(), source.data_ptr(), nbytes))
    if taken:
        total = sum(n for _, _, n in taken)
        _COPY(tuple(t for t, _, _ in taken), tuple(s for _, s, _ in taken), tuple(n for _, _, n in taken),
              threads_for(min(threads, total // STREAM_MIN_BYTES)))
    return left


def copy_addresses(copies: Sequence[tuple[int, int, int]], threads: int) -> bool:
    """Each (target, source, nbytes): nbytes from address source to address target, in one call on
    up to `threads` threads (1 MiB blocks shared; a thread for each MiB at most), with streaming
    stores, without the GIL. The caller holds the memory for the call and vouches that every target
    lies apart from every other and from every source (an upload's buffers and a region: two
    mappings). Whether it copied: False, having done nothing, without the native module."""
    if _COPY is None:
        return False
    if copies:
        total = sum(n for _, _, n in copies)
        _COPY(tuple(t for t, _, _ in copies), tuple(s for _, s, _ in copies), tuple(n for _, _, n in copies),
              threads_for(min(threads, total // STREAM_MIN_BYTES)))
    return True


def _overlap(target: int, source: int, nbytes: int) -> bool:
    return target < source + nbytes and source < target + nbytes


def apart(writes: Sequence[torch.Tensor], reads: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether one kernel call may run these jobs at once, on threads, in any order: no written tensor
    overlaps another, and no tensor that job i reads overlaps a written one, except that it may be
    job i's own (the same memory: same start and size). Reads may share memory with each other."""
    spans = sorted((w.data_ptr(), w.data_ptr() + w.numel() * w.element_size(), i) for i, w in enumerate(writes) if w.numel())
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        if start < end:
            return False
    starts = [start for start, _, _ in spans]
    for i, group in enumerate(reads):
        for r in group:
            if not r.numel():
                continue
            start = r.data_ptr()
            end = start + r.numel() * r.element_size()
            k = bisect.bisect_left(starts, end) - 1  # the last write starting before the read ends
            if k >= 0 and spans[k][1] > start and spans[k] != (start, end, i):
                return False
    return True
