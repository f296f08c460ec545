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

ELEMENTS_PER_THREAD: Final = 1 << 17
"""Each thread the kernel runs gets at least this many elements to read or write, inputs and results
together: an entry of 160K float32 from 8 inputs gets two threads. On one thread, 160 such entries
took 93.9 ms in process against torch's two-thread loop's 79.5 ms; on two, 55.1 ms
(`python -m bench.native_micro`)."""

MAX_INPUTS: Final = 256
"""The most inputs one kernel call sums (`_native.c`); a merge of more takes torch's path."""


Job = tuple[torch.Tensor, Sequence[torch.Tensor], float | None]
"""(out, xs, divisor): out := sum_k w_k xs[k], divided by divisor unless None."""


def native_weighted_sum(
    out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None
) -> bool:
    """out = (xs[0] * w0 + xs[1] * w1 + ...) / divisor (no division when None), in torch's order and
    rounding, by the native kernel, and True; or False, having done nothing, where it does not apply
    (not the CPU, another dtype, a broadcast, strided or partly shared tensor) or is off. `out` may
    be one of the inputs (the same memory). Callers hold every tensor for the call."""
    return not native_weighted_sums([(out, xs, divisor)], weights)


def native_weighted_sums(
    jobs: Sequence[Job], weights: Sequence[float], per_job: Sequence[tuple[float, ...]] | None = None
) -> list[int]:
    """Every job the kernel takes (see `native_weighted_sum`), in one call per dtype, divisor and set
    of weights (`per_job[i]` for job i where given, else `weights`) whose threads share the blocks of
    all of them; the positions of the jobs left for torch, in order (all of them where the kernel is
    off, or where one job's result shares memory with another job's tensors: then the order of the
    jobs matters, and torch's loop keeps it).

    One call for a merge's every entry is what makes a merge of dictionaries that are not flat
    (uploads) as fast as one of flat ones, and small entries cost no torch operation."""
    if _NATIVE is None or not jobs or not _agrees_with_torch():
        return list(range(len(jobs)))
    groups: dict[tuple[int, float, tuple[float, ...]], list[int]] = {}
    rest: list[int] = []
    given = tuple(weights)
    for i, (out, xs, divisor) in enumerate(jobs):
        if _fits_native(out, xs):
            key = (KINDS[out.dtype], 0.0 if divisor is None else float(divisor), per_job[i] if per_job else given)
            groups.setdefault(key, []).append(i)
        else:
            rest.append(i)
    if not groups:
        return rest
    if not native.apart([out for out, _, _ in jobs], [xs for _, xs, _ in jobs]):
        return list(range(len(jobs)))
    for (kind, divisor, used), at in groups.items():
        _call(kind, [jobs[i][0] for i in at], [jobs[i][1] for i in at], used, divisor)
    return rest


def _fits_native(out: torch.Tensor, xs: Sequence[torch.Tensor]) -> bool:
    if not out.is_cpu or out.dtype not in KINDS or not out.is_contiguous() or not 1 <= len(xs) <= MAX_INPUTS:
        return False
    n = out.numel()
    start, end = out.data_ptr(), out.data_ptr() + n * out.element_size()
    for x in xs:
        if x.dtype != out.dtype or x.shape != out.shape or not x.is_cpu or not x.is_contiguous():
            return False
        p = x.data_ptr()
        if p != start and p < end and start < p + n * x.element_size():
            return False  # overlaps the result without being it
    return True


def _call(
    kind: int, outs: Sequence[torch.Tensor], xss: Sequence[Sequence[torch.Tensor]], weights: Sequence[float],
    divisor: float, threads: int | None = None,
) -> None:
    """One kernel call: outs[e] := sum_k w_k xss[e][k] (divided by `divisor` unless it is 0)."""
    assert _NATIVE is not None
    counts = tuple(out.numel() for out in outs)
    if threads is None:
        share = sum(counts) * (len(weights) + 1) // ELEMENTS_PER_THREAD
        threads = native.threads_for(min(torch.get_num_threads(), share))
    _NATIVE(kind, tuple(out.data_ptr() for out in outs), tuple(x.data_ptr() for xs in xss for x in xs),
            tuple(float(w) for w in weights), counts, divisor, threads)


def _run(
    out: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None,
    threads: int | None = None,
) -> None:
    """One entry through the kernel (its check, the tests and the microbenchmark)."""
    _call(KINDS[out.dtype], [out], [xs], weights, 0.0 if divisor is None else float(divisor), threads)


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
        acc.div_(true_divisor(acc, divisor))


def true_divisor(t: torch.Tensor, value: float) -> float | torch.Tensor:
    """What `t.div_` takes to divide by `value` with the quotient the CPU gives: the float itself on
    the CPU; elsewhere a 0-dim tensor of t's dtype on t's device. CUDA divides by a CPU scalar as a
    multiplication by its reciprocal, which can be one bit off the true quotient (torch's
    BinaryDivTrueKernel.cu says so): a mean of 8 models on CUDA differed from the CPU's in the last
    bit (found by review). A device scalar is divided by, element by element."""
    if t.is_cpu:
        return value
    return torch.full((), value, dtype=t.dtype, device=t.device)


CHECK_COUNTS: Final = (1, 3, 8)
CHECK_LENGTHS: Final = (1, 17, 1000, 0, (1 << 17) + 13)
"""Odd lengths for the loops' tails, an empty entry, and one split across threads: all of them in one
call, as a merge of many entries makes it."""


@functools.cache
def _agrees_with_torch() -> bool:
    """Once per process: the kernel against `by_torch` for every kind, input count and length above,
    with and without a division, special values included; True only when every bit agrees."""
    special = torch.tensor(native.SPECIAL_VALUES)
    g = torch.Generator().manual_seed(0)
    for dtype, kind in KINDS.items():
        for count in CHECK_COUNTS:
            entries = []
            for n in CHECK_LENGTHS:
                xs = [torch.randn(n, generator=g, dtype=torch.float64).mul_(3).to(dtype) for _ in range(count)]
                k = min(n, special.numel())
                xs[0][:k] = special[:k].to(dtype)
                entries.append(xs)
            weights = [float(w) for w in torch.rand(count, generator=g, dtype=torch.float64) * 2 - 0.5]
            for divisor in (None, sum(weights)):
                got = [torch.empty(len(xs[0]), dtype=dtype) for xs in entries]
                _call(kind, got, entries, weights, 0.0 if divisor is None else divisor, threads=2)
                for xs, result in zip(entries, got):
                    expected = torch.empty(len(xs[0]), dtype=dtype)
                    by_torch(expected, xs, weights, divisor)
                    if not native.same_bits(result, expected):
                        return False
    return True


def active() -> bool:
    """Whether the kernel is built and agrees with torch here (the check runs on the first call)."""
    return _NATIVE is not None and _agrees_with_torch()


def native_state() -> str:
    """What CPU average and linear merges run on, for the start-up log: 'native weighted sum', or torch and why."""
    return native.state("native weighted sum", _NATIVE is not None, _agrees_with_torch)
