"""sum_k w_k x_k, divided by a divisor or not, for merging's `average` and `linear`: the native
one-pass kernel (`_native.c`) where it is built and gives torch's bits, torch's `mul`, `add_` and
`div_` otherwise.

Why: torch makes one pass over the result per input (a multiply, then an `add_` per further input,
then a division), so averaging 8 dictionaries moves the result through memory ten times; the kernel
reads each input once and writes the result once (docs/perf.md, "Averaging across models"). As with the lerp,
the first use compares it with torch's sequence bit for bit (every kind, input counts, odd lengths,
special values, with and without the division), and any difference turns it off for the process.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

import torch

from . import native

_NATIVE: Final = native.WEIGHTED_SUM

KINDS: Final[dict[torch.dtype, int]] = {torch.float32: 0, torch.float64: 1}
"""The work dtypes the kernel has; merges in other dtypes take torch's path."""

MIN_ELEMENTS: Final = 1 << 16
"""Below this an entry takes torch's path: one thread, no start-up."""

ELEMENTS_PER_THREAD: Final = 1 << 17
"""Each thread the kernel runs gets at least this many elements to read or write, inputs and result
together: an entry of 160K float32 from 8 inputs gets two threads. On one thread, 160 such entries
took 93.9 ms in process against torch's two-thread loop's 79.5 ms; on two, 55.1 ms
(`python -m bench.native_micro`)."""


def native_weighted_sum(
    out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None
) -> bool:
    """out = (xs[0] * w0 + xs[1] * w1 + ...) / divisor (no division when None), in torch's order and
    rounding, by the native kernel, and True; or False, having done nothing, where it does not apply
    (small, not the CPU, another dtype, a broadcast, strided or partly shared tensor) or is off.
    `out` may be one of the inputs (the same memory). Callers hold every tensor for the call."""
    if not (_fits_native(out, xs) and _agrees_with_torch()):
        return False
    _run(out, xs, weights, divisor)
    return True


def _fits_native(out: torch.Tensor, xs: Sequence[torch.Tensor]) -> bool:
    n = out.numel()
    if n < MIN_ELEMENTS or _NATIVE is None or not out.is_cpu or out.dtype not in KINDS or not out.is_contiguous():
        return False
    start, end = out.data_ptr(), out.data_ptr() + n * out.element_size()
    for x in xs:
        if x.dtype != out.dtype or x.shape != out.shape or not x.is_cpu or not x.is_contiguous():
            return False
        p = x.data_ptr()
        if p != start and p < end and start < p + n * x.element_size():
            return False  # overlaps the result without being it
    return True


def _run(
    out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None,
    threads: int | None = None,
) -> None:
    assert _NATIVE is not None
    n = out.numel()
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), n * (len(xs) + 1) // ELEMENTS_PER_THREAD))
    _NATIVE(KINDS[out.dtype], out.data_ptr(), tuple(x.data_ptr() for x in xs), tuple(float(w) for w in weights), n,
            0.0 if divisor is None else float(divisor), threads)


def by_torch(
    acc: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None,
    cast: torch.Tensor | None = None,
) -> None:
    """acc := sum_k w_k x_k, divided by `divisor` unless None, as torch does it: the first term written
    (`mul`, x broadcast to acc's shape), each further one added (`add_` with alpha), then `div_`. An x
    of another dtype than acc's is copied into `cast` (acc's shape and dtype) first.

    merging's torch path runs this, and so does the kernel's check: the kernel is held to exactly
    what the server does without it."""
    for i, (x, w) in enumerate(zip(xs, weights)):
        if x.dtype != acc.dtype:
            assert cast is not None
            part = cast.view(-1)[: x.numel()].view(x.shape)
            part.copy_(x)
            x = part
        if i == 0:  # the first term written, not added to zeros: one pass over the result fewer
            torch.mul(x.expand(acc.shape), w, out=acc)
        else:
            acc.add_(x, alpha=w)
    if divisor is not None:
        acc.div_(divisor)


CHECK_COUNTS: Final = (1, 3, 8)
CHECK_LENGTHS: Final = (1, 17, 1000, 2 * MIN_ELEMENTS + 13)


@functools.cache
def _agrees_with_torch() -> bool:
    """Once per process: the kernel against `by_torch` for every kind, input count and length above,
    with and without a division, special values included; True only when every bit agrees."""
    special = torch.tensor(native.SPECIAL_VALUES)
    g = torch.Generator().manual_seed(0)
    for dtype in KINDS:
        for count in CHECK_COUNTS:
            for n in CHECK_LENGTHS:
                xs = [torch.randn(n, generator=g, dtype=torch.float64).mul_(3).to(dtype) for _ in range(count)]
                k = min(n, special.numel())
                xs[0][:k] = special[:k].to(dtype)
                weights = [float(w) for w in torch.rand(count, generator=g, dtype=torch.float64) * 2 - 0.5]
                for divisor in (None, sum(weights)):
                    expected, got = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
                    by_torch(expected, xs, weights, divisor)
                    _run(got, xs, weights, divisor, threads=2 if n > MIN_ELEMENTS else 1)
                    if not native.same_bits(got, expected):
                        return False
    return True


def active() -> bool:
    """Whether the kernel is built and agrees with torch here (the check runs on the first call)."""
    return _NATIVE is not None and _agrees_with_torch()


def native_state() -> str:
    """What CPU average and linear merges run on, for the start-up log: 'native weighted sum', or torch and why."""
    return native.state("native weighted sum", _NATIVE is not None, _agrees_with_torch)
