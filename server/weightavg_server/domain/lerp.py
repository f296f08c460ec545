"""`avg.lerp_(value, weight)` for the CPU averages: the native fused kernel (`_native.c`) where it is
built and gives torch's bits, torch's `lerp_` everywhere else.

Why a kernel of our own: torch's CPU `lerp_` with a scalar weight evaluates both of its formulas and
blends them, and runs at about 0.8 of one `add_` over the same bytes; the fused loop runs at add_'s
speed on large tensors (docs/perf.md, "Native lerp"). It is used only where it cannot change a
number: the first use compares it with torch's `lerp_` bit for bit over both formulas, every kind,
special values and odd lengths; any difference (another CPU, a compiler that fused differently)
turns it off for the life of the process and torch's kernel does the work.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch

from . import native

_NATIVE: Final = native.LERP

KINDS: Final[dict[tuple[torch.dtype, torch.dtype], int]] = {
    (torch.float32, torch.float32): 0,
    (torch.float64, torch.float64): 1,
    (torch.float32, torch.bfloat16): 2,
}
"""(average dtype, value dtype) -> the kernel's kind; other pairs take torch's path."""

ELEMENTS_PER_THREAD: Final = 1 << 17
"""Each thread the kernel starts gets at least this much (512 KiB of float32): starting a thread
costs tens of microseconds, about what it saves on less."""

Pair = tuple[torch.Tensor, torch.Tensor]
"""(average, value): `average.lerp_(value, weight)`."""


def native_state() -> str:
    """What the CPU averages run on, for the server's start-up log: 'native fused lerp', or torch and why."""
    return native.state("native fused lerp", _NATIVE is not None, _agrees_with_torch)


def native_lerp_(avg: torch.Tensor, value: torch.Tensor, weight: float) -> bool:
    """avg.lerp_(value.to(avg.dtype), weight) in place by the native kernel, with torch's bits, and
    True; or False, having done nothing, where the kernel does not take the pair (see `batch`)."""
    return not native_lerp_all_([(avg, value)], weight)


def native_lerp_all_(pairs: Sequence[Pair], weight: float) -> list[Pair]:
    """`avg.lerp_(value.to(avg.dtype), weight)` for every pair the native kernel takes (`batch`),
    with torch's bits; the pairs left for torch, in their order. Callers hold every tensor, and any
    lock on them, for the call."""
    b = batch(pairs)
    if b is None:
        return list(pairs)
    run(b, weight)
    return [pairs[i] for i in b.rest]


@dataclass(frozen=True)
class Call:
    """One kernel call: pairs of one kind by address and element count."""

    kind: int
    avgs: tuple[int, ...]
    values: tuple[int, ...]
    counts: tuple[int, ...]
    elements: int


@dataclass(frozen=True)
class Batch:
    """What the kernel does of a list of pairs: a call per kind, and the positions of the pairs left
    to torch. It holds addresses, not tensors: whoever keeps it (averaging's plan) must know that
    the same tensors still lie at them."""

    calls: tuple[Call, ...]
    rest: tuple[int, ...]


def batch(pairs: Sequence[Pair]) -> Batch | None:
    """The kernel's share of `pairs`, or None where it takes none of them: off, or no pair fits, or
    pairs share memory with one another (threads writing at once, or kinds one after another and
    torch's pairs after them, would make the order matter; torch's loop keeps it).

    The kernel takes CPU pairs of any size of a kind in `KINDS`, same shape, contiguous, whose two
    tensors are the same memory or share none. One call for many pairs is what makes a dictionary
    that is not flat (an upload, say) as fast to average as a flat one, and a small one cost no
    torch operation.
    """
    if _NATIVE is None or not pairs or not _agrees_with_torch():
        return None
    groups: dict[int, list[int]] = {}
    rest: list[int] = []
    for i, (a, v) in enumerate(pairs):
        kind = _kind(a, v)
        if kind is None:
            rest.append(i)
        else:
            groups.setdefault(kind, []).append(i)
    if not groups or not native.apart([a for a, _ in pairs], [(v,) for _, v in pairs]):
        return None
    calls = []
    for kind, at in groups.items():
        counts = tuple(pairs[i][0].numel() for i in at)
        calls.append(Call(
            kind, tuple(pairs[i][0].data_ptr() for i in at), tuple(pairs[i][1].data_ptr() for i in at), counts,
            sum(counts),
        ))
    return Batch(tuple(calls), tuple(rest))


def run(b: Batch, weight: float) -> None:
    """Lerp the batch's pairs: each call on up to torch's intra-op threads (at most
    `native.MAX_THREADS`), at least `ELEMENTS_PER_THREAD` elements each."""
    assert _NATIVE is not None
    for c in b.calls:
        share = c.elements // ELEMENTS_PER_THREAD  # below two shares one thread, whatever torch's setting
        threads = 1 if share < 2 else native.threads_for(min(torch.get_num_threads(), share))
        _NATIVE(c.kind, c.avgs, c.values, c.counts, float(weight), threads)


def _kind(avg: torch.Tensor, value: torch.Tensor) -> int | None:
    """The kernel's kind for the pair, or None: not CPU, not one shape, a kind it lacks, strided, or
    partly shared memory."""
    if not (avg.is_cpu and value.is_cpu) or value.shape != avg.shape:
        return None
    kind = KINDS.get((avg.dtype, value.dtype))
    if kind is None or not (avg.is_contiguous() and value.is_contiguous()):
        return None
    a, v, n = avg.data_ptr(), value.data_ptr(), avg.numel()
    if (a == v and avg.dtype == value.dtype) or a + n * avg.element_size() <= v or v + n * value.element_size() <= a:
        return kind
    return None


def _run(kind: int, group: Sequence[Pair], weight: float, threads: int) -> None:
    assert _NATIVE is not None
    _NATIVE(
        kind, tuple(a.data_ptr() for a, _ in group), tuple(v.data_ptr() for _, v in group),
        tuple(a.numel() for a, _ in group), float(weight), threads,
    )


CHECK_WEIGHTS: Final = (0.25, 0.75, 1.0 / 3.0, 0.5, 0.001, 0.999, -0.25, 1e-8, 1.0 - 1e-8, 0.0, 2.0 / 3.0)
"""Both of lerp's formulas (|w| < 0.5 and the rest), the boundary, EMA-like and averaging weights."""

CHECK_LENGTHS: Final = (1, 15, 17, 1000, 0, (1 << 17) + 13)
"""Odd lengths for the loops' vector tails, an empty pair, and one split across threads: all of them
in one call, as an average of many tensors makes it."""


@functools.cache
def _agrees_with_torch() -> bool:
    """Once per process: the kernel against torch's `lerp_` (and cast) on every kind, weight and
    length in the tables above, special values included; True only when every bit agrees (see
    `native.same_bits` for the sign of a zero)."""
    special = torch.tensor(native.SPECIAL_VALUES)
    g = torch.Generator().manual_seed(0)
    for (avg_dtype, value_dtype), kind in KINDS.items():
        pairs = []
        for n in CHECK_LENGTHS:
            avg = torch.randn(n, generator=g, dtype=torch.float64).to(avg_dtype)
            value = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(value_dtype)
            k = min(n, special.numel())
            avg[:k] = special[:k].to(avg_dtype)
            value[:k] = special.flip(0)[:k].to(value_dtype)
            pairs.append((avg, value))
        for weight in CHECK_WEIGHTS:
            got = [(avg.clone(), value) for avg, value in pairs]
            _run(kind, got, weight, threads=2)
            for (avg, value), (result, _) in zip(pairs, got):
                if not native.same_bits(result, avg.clone().lerp_(value.to(avg_dtype), weight)):
                    return False
    return True
