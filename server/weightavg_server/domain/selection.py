"""The k-th largest of a tensor of magnitudes, TIES's trim threshold: the native radix selection
(`_native.c`) where it is built and gives torch's value, `torch.kthvalue` otherwise.

Why: torch's `kthvalue` over a 1-D tensor runs quickselect on one thread over a copy of the values
and an int64 index per element. A served merge('ties', 3 x 160 entries of 400 x 400 float32,
density .2) spent 0.72 of its 1.05 s in its 480 calls, where the bench's in-process formula, which
selects over the three models' stacked deltas at once (`kthvalue(dim=1)`, one row per thread), spent
about 0.28 s. The radix selection reads the tensor three times (float32) and allocates nothing: 0.25
against 1.24 ms per entry (docs/perf.md, "TIES"). A threshold is one of the tensor's own values, so
any exact selection gives the same one, and the same merge bit for bit. As with the other kernels,
the first use compares it with `kthvalue` (every kind, special values, ties, odd lengths and ranks),
and any difference turns it off for the process.
"""

from __future__ import annotations

import functools
import math
from typing import Final

import torch

from . import native

_NATIVE: Final = native.KTH_LARGEST

KINDS: Final[dict[torch.dtype, int]] = {torch.float32: 0, torch.float64: 1}
"""The dtypes the kernel selects in; others (and every device but the CPU) take `kthvalue`."""


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The k-th largest value (1 <= k <= numel) of a tensor holding magnitudes (|x|: no value below
    0), NaN counted largest, as `torch.kthvalue(magnitudes, numel - k + 1)` gives it (a NaN for a NaN)."""
    n = magnitudes.numel()
    assert 1 <= k <= n
    if _fits_native(magnitudes) and _agrees_with_torch():
        return _select(magnitudes, k)
    return by_torch(magnitudes, k)


def by_torch(magnitudes: torch.Tensor, k: int) -> float:
    """`kth_largest` by torch: the (numel - k + 1)-th smallest."""
    return float(torch.kthvalue(magnitudes.reshape(-1), magnitudes.numel() - k + 1).values)


def _fits_native(t: torch.Tensor) -> bool:
    return _NATIVE is not None and t.dtype in KINDS and native.plain_cpu(t)


def _select(t: torch.Tensor, k: int) -> float:
    assert _NATIVE is not None
    return _NATIVE(KINDS[t.dtype], t.data_ptr(), t.numel(), k)


CHECK_LENGTHS: Final = (1, 2, 17, 1000, 4099)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@functools.cache
def _agrees_with_torch() -> bool:
    """Once per process: the kernel against `kthvalue` for every kind, length above and a spread of
    ranks, over magnitudes with special values (zeros, subnormals, inf, NaN), ties and few distinct
    values; True only when every value agrees."""
    special = torch.tensor(native.SPECIAL_VALUES, dtype=torch.float64).abs()
    g = torch.Generator().manual_seed(0)
    for dtype in KINDS:
        for n in CHECK_LENGTHS:
            spread = torch.randn(n, generator=g, dtype=torch.float64).mul_(3).exp_().to(dtype)
            few = torch.randint(0, 4, (n,), generator=g).to(dtype)  # ties everywhere
            with_special = spread.clone()
            with_special[: min(n, special.numel())] = special[:n].to(dtype)
            for values in (spread, few, with_special):
                for k in sorted(k for k in {1, 2, n // 5 + 1, n // 2, n - 1, n} if 1 <= k <= n):
                    if not _same(_select(values, k), by_torch(values, k)):
                        return False
    return True


def active() -> bool:
    """Whether the kernel is built and agrees with torch here (the check runs on the first call)."""
    return _NATIVE is not None and _agrees_with_torch()


def native_state() -> str:
    """What CPU TIES thresholds run on, for the start-up log: 'native radix selection', or torch and why."""
    return native.state("native radix selection", _NATIVE is not None, _agrees_with_torch)
