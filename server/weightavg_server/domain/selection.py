"""TIES's trim of a delta: the k-th largest magnitude (the threshold) and the zeroing of every element
below it, by the native kernels (`_native.c`) where they are built and give torch's results, by
torch's `abs`, `kthvalue`, `lt` and `masked_fill_` otherwise.

Why: torch's `kthvalue` over a 1-D tensor runs quickselect on one thread over a copy of the values
and an int64 index per element, and `masked_fill_` over a bool mask runs at about 1.4 G elements a
second on two threads. A served merge('ties', 3 x 160 entries of 400 x 400 float32, density .2)
spent 0.72 of its 1.05 s in its 480 kthvalues and 0.18 s in its masked fills, where the bench's
in-process formula, which selects over the three models' stacked deltas at once (`kthvalue(dim=1)`,
one row per thread), took 0.74-0.91 s in all. The radix selection reads the delta three times
(float32) and allocates nothing: 0.25 against 1.24 ms per entry; the trim is one pass, 0.011 against
0.17 ms for abs, lt and masked_fill_ (docs/perf.md, "TIES"). A threshold is one of the delta's own
magnitudes, so any exact selection finds the same one, and the trim is masked_fill_'s per-element
choice, so the merge keeps every bit. As with the other kernels, the first use compares each with
torch (every kind, special values, ties, odd lengths, ranks and thresholds), and any difference
turns both off for the process.
"""

from __future__ import annotations

import functools
import math
from typing import Final

import torch

from . import native

_SELECT: Final = native.KTH_LARGEST
_ZERO_BELOW: Final = native.ZERO_BELOW

KINDS: Final[dict[torch.dtype, int]] = {torch.float32: 0, torch.float64: 1}
"""The dtypes the kernels work in; others (and every device but the CPU) take torch's path."""


def kth_largest_magnitude(values: torch.Tensor, k: int, aside: torch.Tensor | None) -> float:
    """The k-th largest |x| (1 <= k <= numel) of `values`, NaN counted largest, as
    `torch.kthvalue(|values|, numel - k + 1)` gives it (a NaN for a NaN). `aside` (values' shape and
    dtype) takes |values| on torch's path; the kernel needs none, and a caller that planned for the
    kernel (`active()`) gives None."""
    assert 1 <= k <= values.numel()
    if _fits(values) and _agrees_with_torch():
        assert _SELECT is not None
        return _SELECT(KINDS[values.dtype], values.data_ptr(), values.numel(), k)
    assert aside is not None, "torch's selection needs the scratch a plan for the kernel left out"
    torch.abs(values, out=aside)
    return by_torch(aside, k)


def zero_below(values: torch.Tensor, threshold: float, aside: torch.Tensor | None, mask: torch.Tensor) -> None:
    """values := +0 wherever |values| < threshold (in values' dtype); a NaN stays. `aside` (values'
    shape and dtype) and `mask` (bool) are torch's scratch; the kernel needs neither (`aside` None
    where the caller planned for it)."""
    if _fits(values) and _agrees_with_torch():
        assert _ZERO_BELOW is not None
        _ZERO_BELOW(KINDS[values.dtype], values.data_ptr(), values.numel(), threshold)
        return
    assert aside is not None, "torch's trim needs the scratch a plan for the kernel left out"
    zero_below_by_torch(values, threshold, aside, mask)


def by_torch(magnitudes: torch.Tensor, k: int) -> float:
    """The k-th largest of `magnitudes` by torch: the (numel - k + 1)-th smallest."""
    return float(torch.kthvalue(magnitudes.reshape(-1), magnitudes.numel() - k + 1).values)


def zero_below_by_torch(values: torch.Tensor, threshold: float, aside: torch.Tensor, mask: torch.Tensor) -> None:
    """`zero_below` as merging did it before the kernel, and does it where the kernel does not apply."""
    torch.abs(values, out=aside)
    torch.lt(aside, threshold, out=mask)
    values.masked_fill_(mask, 0)


def _fits(t: torch.Tensor) -> bool:
    return _SELECT is not None and _ZERO_BELOW is not None and t.dtype in KINDS and native.plain_cpu(t)


CHECK_LENGTHS: Final = (1, 2, 17, 1000, 4099, (1 << 14) + 3)
"""Odd lengths for the loops' tails, and one from which the kernels release the GIL."""


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


CHECK_SPECIALS: Final = (math.copysign(math.nan, -1.0), *native.SPECIAL_VALUES)
"""The other kernels' special values and a NaN with its sign bit set first: a trim must leave it as it
is too, and a kernel that zeroed it passed a check with only native.SPECIAL_VALUES' positive NaN."""


def _check_values(dtype: torch.dtype, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """Signed values of many sizes; a copy with few distinct magnitudes (ties everywhere); a copy
    whose front holds the special values (signed zeros, inf, NaN of both signs, subnormals, values
    near the limit)."""
    spread = torch.randn(n, generator=g, dtype=torch.float64).mul_(3).exp_()
    spread.mul_(torch.randint(0, 2, (n,), generator=g).mul_(2).sub_(1))
    few = torch.randint(-3, 4, (n,), generator=g).to(torch.float64)
    special = spread.clone()
    count = min(n, len(CHECK_SPECIALS))
    special[:count] = torch.tensor(CHECK_SPECIALS[:count], dtype=torch.float64)
    return [t.to(dtype) for t in (spread, few, special)]


@functools.cache
def _agrees_with_torch() -> bool:
    """Once per process: both kernels against torch for every kind and length above, the selection at
    a spread of ranks, the trim at each threshold that selection gives, at 0, inf, NaN and one no
    float32 holds; True only when every value and bit agrees."""
    g = torch.Generator().manual_seed(0)
    assert _SELECT is not None and _ZERO_BELOW is not None
    for dtype, kind in KINDS.items():
        for n in CHECK_LENGTHS:
            for values in _check_values(dtype, n, g):
                thresholds = [0.0, math.inf, math.nan, 0.1]
                for k in sorted({1, 2, n // 5 + 1, n // 2, n - 1, n} & set(range(1, n + 1))):
                    got = _SELECT(kind, values.data_ptr(), n, k)
                    if not _same(got, by_torch(values.abs(), k)):
                        return False
                    thresholds.append(got)
                for threshold in thresholds:
                    expected, trimmed = values.clone(), values.clone()
                    zero_below_by_torch(expected, threshold, torch.empty_like(values), torch.empty(n, dtype=torch.bool))
                    _ZERO_BELOW(kind, trimmed.data_ptr(), n, threshold)
                    if not torch.equal(_bits(trimmed), _bits(expected)):  # every bit, signed zeros too
                        return False
    return True


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.element_size() == 8 else torch.int32)


def active() -> bool:
    """Whether the kernels are built and agree with torch here (the check runs on the first call)."""
    return _SELECT is not None and _ZERO_BELOW is not None and _agrees_with_torch()


def native_state() -> str:
    """What CPU TIES trims run on, for the start-up log: 'native selection', or torch and why."""
    return native.state("native selection", _SELECT is not None and _ZERO_BELOW is not None, _agrees_with_torch)
