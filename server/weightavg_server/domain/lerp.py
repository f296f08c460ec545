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

MIN_ELEMENTS: Final = 1 << 16
"""Below this a tensor goes to torch's `lerp_`, which runs it on one thread with no start-up."""

ELEMENTS_PER_THREAD: Final = 1 << 17
"""Each thread the kernel starts gets at least this much (512 KiB of float32): starting a thread
costs tens of microseconds, about what it saves on less."""


def native_state() -> str:
    """What the CPU averages run on, for the server's start-up log: 'native fused lerp', or torch and why."""
    return native.state("native fused lerp", _NATIVE is not None, _agrees_with_torch)


def native_lerp_(avg: torch.Tensor, value: torch.Tensor, weight: float) -> bool:
    """avg.lerp_(value.to(avg.dtype), weight) in place by the native kernel, with torch's bits, and
    True; or False, having done nothing, where the kernel does not apply (small, CUDA, another kind,
    a broadcast or strided value, partly shared memory) or is off. Callers hold both tensors, and any
    lock on them, for the call."""
    if not (_fits_native(avg, value) and _agrees_with_torch()):
        return False
    _run(avg, value, weight)
    return True


def _fits_native(avg: torch.Tensor, value: torch.Tensor) -> bool:
    """Large, CPU, same shape, contiguous, a kind the kernel has, and the same memory or none shared."""
    n = avg.numel()  # first: a small call's small tensors are refused by one cheap question
    if n < MIN_ELEMENTS or _NATIVE is None or not (avg.is_cpu and value.is_cpu):
        return False
    if value.shape != avg.shape or (avg.dtype, value.dtype) not in KINDS:
        return False
    if not (avg.is_contiguous() and value.is_contiguous()):
        return False
    a, v = avg.data_ptr(), value.data_ptr()
    return a == v or a + n * avg.element_size() <= v or v + n * value.element_size() <= a


def _run(avg: torch.Tensor, value: torch.Tensor, weight: float, threads: int | None = None) -> None:
    assert _NATIVE is not None
    n = avg.numel()
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), n // ELEMENTS_PER_THREAD))
    _NATIVE(KINDS[(avg.dtype, value.dtype)], avg.data_ptr(), value.data_ptr(), n, float(weight), threads)


CHECK_WEIGHTS: Final = (0.25, 0.75, 1.0 / 3.0, 0.5, 0.001, 0.999, -0.25, 1e-8, 1.0 - 1e-8, 0.0, 2.0 / 3.0)
"""Both of lerp's formulas (|w| < 0.5 and the rest), the boundary, EMA-like and averaging weights."""

CHECK_LENGTHS: Final = (1, 15, 17, 1000, 2 * MIN_ELEMENTS + 13)
"""Odd lengths for the loops' vector tails, and one split across threads."""


@functools.cache
def _agrees_with_torch() -> bool:
    """Once per process: the kernel against torch's `lerp_` (and cast) on every kind, weight and
    length in the tables above, special values included; True only when every bit agrees (see
    `native.same_bits` for the sign of a zero)."""
    special = torch.tensor(native.SPECIAL_VALUES)
    g = torch.Generator().manual_seed(0)
    for (avg_dtype, value_dtype) in KINDS:
        for n in CHECK_LENGTHS:
            avg = torch.randn(n, generator=g, dtype=torch.float64).to(avg_dtype)
            value = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(value_dtype)
            k = min(n, special.numel())
            avg[:k] = special[:k].to(avg_dtype)
            value[:k] = special.flip(0)[:k].to(value_dtype)
            for weight in CHECK_WEIGHTS:
                expected = avg.clone().lerp_(value.to(avg_dtype), weight)
                got = avg.clone()
                _run(got, value, weight, threads=2 if n > MIN_ELEMENTS else 1)
                if not native.same_bits(got, expected):
                    return False
    return True
