"""TIES's trim (domain/selection.py) against the formula written with torch ops, bit for bit, over
adversarial inputs: NaNs of every payload and both signs, +-inf, signed zeros, subnormals (the smallest
of each dtype too), the dtype's extremes, all-equal magnitudes, ties at the threshold, all-NaN and
all-zero tensors; lengths at the kernels' loop and GIL edges (16383..16385) and below a vector; every
interesting rank (1, 2, n/2, n - 1, n); float32 and float64 (the kernels) and float16, bfloat16 and
non-contiguous views (torch's path, which must give the same); views at a storage offset and 2-D
shapes. The oracles: the k-th largest |x| is `kthvalue(|x|, n - k + 1)` and also `topk(|x|, k)`'s
last value (both count NaN largest), and the trim is `x.masked_fill(|x| < threshold, 0)`.

Seeded and small: a few seconds. The in-process check the kernels pass at first use
(`selection._agrees_with_torch`) covers fewer shapes and none of these NaN payloads or layouts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from weightavg_server.domain import selection

WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(WIDTH[t.element_size()])


def from_bits(raw: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Floats of these bit patterns (unsigned, as written in hex)."""
    width = torch.finfo(dtype).bits
    signed = [r - (1 << width) if r >= 1 << (width - 1) else r for r in raw]
    return torch.tensor(signed, dtype=WIDTH[width // 8]).view(dtype)


NAN_BITS: dict[torch.dtype, list[int]] = {
    # quiet, negative quiet, signalling, negative signalling, all ones, negative all ones, a payload
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC12345],
    torch.float64: [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0xFFF0000000000001,
                    0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FF8000012345678],
    torch.float16: [0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7FFF, 0xFFFF],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FFF, 0xFFFF],
}


def specials(dtype: torch.dtype) -> torch.Tensor:
    """Signed zeros, infinities, the smallest normal and subnormal numbers, the largest finite one,
    epsilon and one, each of both signs, then every NaN of NAN_BITS."""
    info = torch.finfo(dtype)
    smallest = info.smallest_normal * info.eps  # the smallest subnormal
    magnitudes = [0.0, math.inf, info.tiny, info.tiny / 8, smallest, 3 * smallest, info.max, info.eps, 1.0]
    values = torch.tensor([s * m for m in magnitudes for s in (1.0, -1.0)], dtype=torch.float64).to(dtype)
    return torch.cat([values, from_bits(NAN_BITS[dtype], dtype)])


LENGTHS = (1, 2, 3, 17, 64, 65, 2049, 16383, 16384, 16385)
"""Below a vector, at and past a vector's and the kernels' GIL edge (16384 elements)."""


def inputs(dtype: torch.dtype, n: int, g: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """Values of length n in every adversarial shape this file tests."""
    info = torch.finfo(dtype)
    scales = torch.randint(int(math.log2(info.tiny)) - 4, int(math.log2(info.max)) - 1, (n,), generator=g)
    spread = torch.randn(n, generator=g, dtype=torch.float64).mul_(scales.double().exp2()).to(dtype)
    signs = torch.randint(0, 2, (n,), generator=g).mul_(2).sub_(1).to(dtype)
    yield "spread", spread
    yield "all equal magnitudes", signs * 0.5
    yield "few magnitudes (ties at every rank)", torch.randint(-2, 3, (n,), generator=g).to(dtype)
    special = spread.clone()
    pool = specials(dtype)
    at = torch.randint(0, n, (min(n, 2 * len(pool)),), generator=g)
    special[at] = pool[torch.randint(0, len(pool), (len(at),), generator=g)]
    yield "special values", special
    nans = from_bits(NAN_BITS[dtype], dtype)
    yield "all NaN", nans[torch.randint(0, len(nans), (n,), generator=g)]
    yield "signed zeros", signs * 0.0
    yield "subnormals", (torch.randint(-4, 5, (n,), generator=g).double() * info.tiny / 16).to(dtype)
    yield "infinities", torch.where(torch.rand(n, generator=g) < 0.3, signs * math.inf, spread)


def layouts(values: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The values as a fresh tensor, a view at a storage offset, a 2-D view and a strided view."""
    yield "plain", values.clone()
    offset = torch.empty(values.numel() + 7, dtype=values.dtype)[5:5 + values.numel()]
    yield "offset", offset.copy_(values)
    yield "2-D", values.clone().view(1, -1)
    strided = torch.empty(2 * values.numel(), dtype=values.dtype)[::2]
    yield "strided", strided.copy_(values)


def same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def kth_largest_oracles(values: torch.Tensor, k: int) -> tuple[float, float]:
    magnitudes = values.abs().reshape(-1)
    n = magnitudes.numel()
    return float(torch.kthvalue(magnitudes, n - k + 1).values), float(torch.topk(magnitudes, k).values[-1])


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_trim_gives_the_torch_formulas_bits_on_adversarial_inputs(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(20240601 + DTYPES.index(dtype))
    failures: list[str] = []
    checked = 0
    for n in LENGTHS:
        for name, values in inputs(dtype, n, g):
            for layout, v in layouts(values):
                label = f"{name}, n={n}, {layout}"
                for k in sorted({1, 2, n // 2, n - 1, n} & set(range(1, n + 1))):
                    got = selection.kth_largest_magnitude(v, k, torch.empty_like(v))
                    by_kthvalue, by_topk = kth_largest_oracles(v, k)
                    checked += 1
                    if not (same_value(got, by_kthvalue) and same_value(by_topk, by_kthvalue)):
                        failures.append(f"select {label}, k={k}: {got} (kthvalue {by_kthvalue}, topk {by_topk})")
                    for threshold in (got, 0.7, -0.0, 0.0, math.nan, math.inf, -math.inf, 1e39):
                        trimmed = v.clone() if layout != "strided" else v
                        before = trimmed.clone()
                        expected = before.masked_fill(before.abs() < threshold, 0)
                        selection.zero_below(trimmed, threshold, torch.empty_like(trimmed),
                                             torch.empty(trimmed.shape, dtype=torch.bool))
                        if not torch.equal(bits(trimmed), bits(expected)):
                            failures.append(f"zero_below {label}, threshold {threshold}")
                        trimmed.copy_(before)
    assert not failures, f"{len(failures)} of {checked}: " + "; ".join(failures[:10])


@pytest.mark.skipif(selection._SELECT is None or selection._ZERO_BELOW is None, reason="the kernels are not built here")
def test_the_kernels_ran_on_the_float32_and_float64_inputs_above(monkeypatch: pytest.MonkeyPatch) -> None:
    """The differential test above compares the kernels, not torch with itself: they are on (built
    kernels that the first-use check turned off fail here, where every other test of them skips), and
    the plain, offset and 2-D views of float32 and float64 go to them (and nothing else does)."""
    assert selection.active(), selection.native_state()
    select, zero = selection._SELECT, selection._ZERO_BELOW
    assert select is not None and zero is not None
    calls: list[int] = []

    def counted_select(kind: int, address: int, count: int, k: int) -> float:
        calls.append(kind)
        return select(kind, address, count, k)

    def counted_zero(kind: int, address: int, count: int, threshold: float) -> None:
        calls.append(kind)
        zero(kind, address, count, threshold)

    monkeypatch.setattr(selection, "_SELECT", counted_select)
    monkeypatch.setattr(selection, "_ZERO_BELOW", counted_zero)
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for layout, v in layouts(torch.randn(65, generator=g).to(dtype)):
            calls.clear()
            selection.kth_largest_magnitude(v, 3, torch.empty_like(v))
            selection.zero_below(v, 0.5, torch.empty_like(v), torch.empty(v.shape, dtype=torch.bool))
            native = dtype in selection.KINDS and layout != "strided"
            assert calls == ([selection.KINDS[dtype]] * 2 if native else []), (dtype, layout)
