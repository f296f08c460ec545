"""The server's native helpers (server/.../domain/_native.c), in process. The fused lerp (through
domain/lerp.py): torch's `lerp_` is the oracle, bit for bit, for every kind, both of lerp's
formulas, thread splits, odd lengths and many pairs in one call; the pairs it must leave to torch
(and pairs that share memory, which all go to torch); its guard; averaging with it off. Huge-page
advice for large flat buffers (domain/native.py): what it advises, and that values and accounting
do not change. TIES's radix selection (domain/selection.py): torch.kthvalue's value for every rank,
special values and ties, and a TIES merge with the same bits as without it.

The extension is optional at install (no C compiler: torch does the work). One test insists it was
built wherever this machine could build it, so a broken build cannot hide behind the skips."""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightavg_server.domain import averaging, flat, lerp, merging, native, selection, weighted_sum
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.tensors import held_bytes

BUILT = lerp.native_state() == "native fused lerp"
needs_native = pytest.mark.skipif(not BUILT, reason=f"CPU averages run on {lerp.native_state()}")

N = 1 << 16


def can_build_here() -> bool:
    """A C compiler and Python's headers: what setup.py needs for the extension."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def pair(n: int, avg_dtype: torch.dtype, value_dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    avg = torch.randn(n, generator=g, dtype=torch.float64).to(avg_dtype)
    value = (torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1).to(value_dtype)
    return avg, value


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def test_the_kernels_are_built_and_on_wherever_a_compiler_and_headers_exist() -> None:
    """Each kernel's tests skip where it is off, so a kernel built but turned off by its first-use check
    against torch (the weighted sum's or the selection's, not only the lerp's) would pass the suite
    unseen: here it fails, naming the kernel."""
    if not can_build_here():
        pytest.skip("no C compiler or Python headers here: the install leaves the kernel out by design")
    assert BUILT, lerp.native_state()
    assert weighted_sum.native_state() == "native weighted sum"
    assert selection.native_state() == "native selection"


@needs_native
@pytest.mark.parametrize("kind", list(lerp.KINDS), ids=lambda k: f"{k[1]}->{k[0]}".replace("torch.", ""))
@pytest.mark.parametrize("weight", [0.25, 1.0 / 3.0, 0.001, 0.5, 0.75, 0.999, 1.0 / 7.0])
@pytest.mark.parametrize("n", [N, N + 1, 3 * lerp.ELEMENTS_PER_THREAD + 7])
def test_the_kernel_gives_torchs_bits(kind: tuple[torch.dtype, torch.dtype], weight: float, n: int) -> None:
    avg, value = pair(n, *kind)
    expected = avg.clone().lerp_(value.to(avg.dtype), weight)
    assert lerp.native_lerp_(avg, value, weight)
    assert torch.equal(bits(avg), bits(expected))


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 8])
def test_every_thread_split_gives_the_same_bits(threads: int) -> None:
    """Each thread's part starts on a 64-byte boundary; parts of any count cover every element once."""
    avg, value = pair(4 * N + 3, torch.float32, torch.float32)
    expected = avg.clone().lerp_(value, 0.2)
    lerp._run(0, [(avg, value)], 0.2, threads)
    assert torch.equal(bits(avg), bits(expected))


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_pairs_of_every_size_in_one_call_give_torchs_bits(threads: int) -> None:
    """An upload's dictionary: separate tensors of all sizes (empty, tiny, one block, many blocks),
    of every kind at once: each pair as torch's own lerp_ gives it."""
    sizes = [0, 1, 3, 64, 1000, N - 1, 3 * N + 5, 1, 2 * lerp.ELEMENTS_PER_THREAD + 1]
    pairs = [pair(n, *kind, seed=i) for i, (n, kind) in enumerate((n, k) for k in lerp.KINDS for n in sizes)]
    expected = [a.clone().lerp_(v.to(a.dtype), 0.3) for a, v in pairs]
    for kind in lerp.KINDS.values():
        group = [(a, v) for a, v in pairs if lerp.KINDS[(a.dtype, v.dtype)] == kind]
        lerp._run(kind, group, 0.3, threads)
    for (a, _), e in zip(pairs, expected):
        assert native.same_bits(a, e)


@needs_native
def test_small_pairs_take_the_kernel_too() -> None:
    """A small call's tensors (the reference's 2-to-1 linear) cost no torch operation."""
    avg, value = pair(3, torch.float32, torch.float32)
    expected = avg.clone().lerp_(value, 0.5)
    assert lerp.native_lerp_all_([(avg[:2], value[:2]), (avg[2:], value[2:])], 0.5) == []
    assert torch.equal(bits(avg), bits(expected))


@needs_native
def test_pairs_that_share_memory_go_to_torch_in_their_order() -> None:
    """Two averages over the same memory: threads (or kinds one after another) would make the order
    matter, so every pair is left to torch's loop, untouched."""
    shared = torch.randn(4 * N)
    other, value = pair(4 * N, torch.float32, torch.float32)
    for pairs in (
        [(shared, value), (shared[N:], value[N:])],  # two averages overlap
        [(other, shared), (shared, value)],  # a value is another pair's average
        [(other[: 3 * N], value[: 3 * N]), (other[N:], value[N:].double())],  # with a pair torch takes
    ):
        before = [a.clone() for a, _ in pairs]
        assert lerp.native_lerp_all_(pairs, 0.25) == pairs
        assert all(torch.equal(a, b) for (a, _), b in zip(pairs, before))


@needs_native
def test_pairs_apart_are_done_and_the_rest_returned_in_order() -> None:
    a1, v1 = pair(3 * lerp.ELEMENTS_PER_THREAD, torch.float32, torch.float32)
    a2, v2 = pair(N, torch.float64, torch.float64)
    a3, v3 = pair(100, torch.float32, torch.float16)  # not a kind of the kernel
    a4 = torch.randn(N)  # its own value: the same memory
    expected = [a1.clone().lerp_(v1, 0.1), a2.clone().lerp_(v2, 0.1), a4.clone()]
    rest = lerp.native_lerp_all_([(a1, v1), (a3, v3), (a2, v2), (a4, a4)], 0.1)
    assert len(rest) == 1 and rest[0][0] is a3 and rest[0][1] is v3
    for got, e in zip((a1, a2, a4), expected):
        assert torch.equal(bits(got), bits(e))


@pytest.mark.parametrize(
    "layout, apart",
    [
        ([(0, 4, 8, 12), (4, 8, 12, 16)], True),  # (avg start, avg end, value start, value end) in elements
        ([(0, 4, 0, 4), (4, 8, 4, 8)], True),  # each value is its own average
        ([(0, 4, 8, 12), (2, 6, 12, 16)], False),  # averages overlap
        ([(0, 4, 4, 8), (4, 8, 8, 12)], False),  # the first value is the second average
        ([(0, 4, 8, 12), (4, 8, 8, 12)], True),  # two values share memory: read only
        ([(0, 4, 1, 5), (8, 12, 12, 16)], False),  # a value overlaps its own average in part
        ([(0, 0, 0, 4), (0, 4, 4, 8)], True),  # an empty average takes no memory
    ],
)
def test_apart_decides_by_memory(layout: list[tuple[int, int, int, int]], apart: bool) -> None:
    storage = torch.zeros(16)
    pairs = [(storage[a:b], storage[c:c + (b - a)]) for a, b, c, _ in layout]
    assert native.apart([a for a, _ in pairs], [(v,) for _, v in pairs]) is apart


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    extra=st.integers(min_value=0, max_value=300),
    weight=st.floats(min_value=-1.0, max_value=2.0, allow_nan=False, width=32),
    kind=st.sampled_from(list(lerp.KINDS)),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_any_weight_and_length_gives_torchs_bits(extra: int, weight: float, kind: tuple[torch.dtype, torch.dtype], seed: int) -> None:
    avg, value = pair(N + extra, *kind, seed=seed)
    expected = avg.clone().lerp_(value.to(avg.dtype), weight)
    assert lerp.native_lerp_(avg, value, weight)
    # torch's own scalar tail and vector body may disagree on the sign of a zero (native.same_bits)
    assert native.same_bits(avg, expected)


@needs_native
def test_a_tensor_lerped_onto_itself_is_unchanged() -> None:
    avg, _ = pair(N, torch.float32, torch.float32)
    before = avg.clone()
    assert lerp.native_lerp_(avg, avg, 0.75)
    assert torch.equal(bits(avg), bits(before))


@pytest.mark.parametrize("case", ["strided", "broadcast", "float16", "int", "overlap", "mixed float64", "bfloat16 over itself"])
def test_pairs_outside_the_kernel_are_left_untouched_for_torch(case: str) -> None:
    avg, value = pair(2 * N, torch.float32, torch.float32)
    if case == "strided":
        avg, value = avg.view(2, N).t(), value.view(2, N).t()
    elif case == "broadcast":
        avg, value = avg.view(2, N), value[:N]
    elif case == "float16":
        value = value.half()
    elif case == "int":
        avg, value = avg.int(), value.int()
    elif case == "overlap":
        storage = torch.randn(2 * N + 1)
        avg, value = storage[: 2 * N], storage[1:]
    elif case == "mixed float64":
        avg = avg.double()
    else:  # a bfloat16 value over the first half of its own float32 average
        value = avg.view(torch.bfloat16)[: 2 * N]
    before = avg.clone()
    assert not lerp.native_lerp_(avg, value, 0.25)
    assert torch.equal(avg, before)


@needs_native
def test_the_guard_turns_off_a_kernel_that_differs_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel one ulp off in a single element (a compiler that fused differently) must be caught by
    the check run at first use: the check, not the kernel, decides."""
    real = lerp._NATIVE
    assert real is not None

    def one_ulp_off(kind: int, avgs: tuple[int, ...], values: tuple[int, ...], counts: tuple[int, ...],
                    weight: float, threads: int) -> None:
        real(kind, avgs, values, counts, weight, threads)
        if kind == 0:
            avg, count = avgs[counts.index(1000)], 1000
            out = (ctypes.c_float * count).from_address(avg)
            out[500] = float(np.nextafter(np.float32(out[500]), np.float32(np.inf)))

    monkeypatch.setattr(lerp, "_NATIVE", one_ulp_off)
    assert not lerp._agrees_with_torch.__wrapped__()
    monkeypatch.setattr(lerp, "_NATIVE", real)
    assert lerp._agrees_with_torch.__wrapped__()


@pytest.mark.parametrize("bad", [(3, 1, 0.5, 1), (0, -1, 0.5, 1), (0, 8, 0.5, 0), (0, 8, 0.5, 1000)])
def test_the_extension_refuses_arguments_it_cannot_run(bad: tuple[int, int, float, int]) -> None:
    if lerp._NATIVE is None:
        pytest.skip("the kernel is not built here")
    kind, count, weight, threads = bad
    t = torch.zeros(8)
    with pytest.raises(ValueError):
        lerp._NATIVE(kind, (t.data_ptr(),), (t.data_ptr(),), (count,), weight, threads)


@pytest.mark.parametrize("avgs, values, counts", [((1,), (), (1,)), ((1,), (1,), (1, 2)), ((0,), (8,), (4,))])
def test_the_extension_refuses_pairs_that_do_not_line_up(
    avgs: tuple[int, ...], values: tuple[int, ...], counts: tuple[int, ...]
) -> None:
    """Tuples of different lengths, or a null address with elements to write."""
    if lerp._NATIVE is None:
        pytest.skip("the kernel is not built here")
    with pytest.raises(ValueError):
        lerp._NATIVE(0, avgs, values, counts, 0.5, 1)


def averages(monkeypatch: pytest.MonkeyPatch, native: bool) -> dict[str, torch.Tensor]:
    """Running averages of three large linears into float32, from float32 and from bfloat16 modules,
    with the native kernel on or off."""
    real, calls = lerp._NATIVE, []
    assert real is not None

    def counted(*args: Any) -> None:
        calls.append(args[0])
        real(*args)

    monkeypatch.setattr(lerp, "_NATIVE", counted if native else None)
    torch.manual_seed(0)
    modules = [torch.nn.Linear(512, 256) for _ in range(3)]
    results: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = averaging.copy_parameters(modules[0].to(dtype), dtype=torch.float32)
        for m in modules[1:]:
            assert averaging.average_parameters(m.to(dtype), d) > 1
        results.update({f"{dtype}.{k}": v for k, v in d.entries.items()})
    assert sorted(set(calls)) == ([0, 2] if native else [])  # float32 and bfloat16 weights took the kernel
    return results


@needs_native
def test_an_average_from_a_dictionary_of_separate_tensors_is_one_kernel_call_per_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload's dictionary (a tensor per entry, nothing fuses): the planning call and the repeated
    one (the plan's cached batch) each make one kernel call per kind, covering every pair, and give
    torch's lerp_ bits."""
    g = torch.Generator().manual_seed(0)
    source = TensorDict({f"w{i}": torch.randn(64, 64 + i, generator=g) for i in range(20)})
    source.entries["v"] = torch.randn(10, generator=g, dtype=torch.float64)
    d = TensorDict({name: (t * 0.5).clone() for name, t in source.entries.items()})
    expected = {name: t.clone() for name, t in d.entries.items()}
    real, calls = lerp._NATIVE, []
    assert real is not None

    def counted(kind: int, avgs: tuple[int, ...], *args: Any) -> None:
        calls.append((kind, len(avgs)))
        real(kind, avgs, *args)

    monkeypatch.setattr(lerp, "_NATIVE", counted)
    for n in (2, 3):
        calls.clear()
        assert averaging.average_parameters(source, d) == n
        assert sorted(calls) == [(0, 20), (1, 1)]
        for name, t in expected.items():
            t.lerp_(source.entries[name], 1.0 / n)
            assert torch.equal(bits(d.entries[name]), bits(t)), name


@needs_native
def test_averages_are_the_same_with_the_kernel_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    on = averages(monkeypatch, native=True)
    off = averages(monkeypatch, native=False)
    assert on.keys() == off.keys()
    for name, value in on.items():
        assert torch.equal(value, off[name]), name


# -- huge pages for large flat buffers -------------------------------------------------------------

HUGE = 2 << 20
SMAPS = Path("/proc/self/smaps")


def marked_for_huge_pages(address: int) -> bool:
    """Whether the mapping that holds `address` carries MADV_HUGEPAGE ('hg' among smaps' VmFlags):
    what the advice sets, whether or not the system then finds huge pages for it."""
    inside = False
    for line in SMAPS.read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    return False


def first_huge_page(t: torch.Tensor) -> int:
    return (t.data_ptr() + HUGE - 1) // HUGE * HUGE


needs_smaps = pytest.mark.skipif(not SMAPS.exists(), reason="no /proc/self/smaps (not Linux)")


@needs_native
@needs_smaps
def test_a_large_cpu_buffer_is_advised_over_every_whole_huge_page_inside_it() -> None:
    n = native.HUGE_PAGE_MIN_BYTES // 4 + 12345
    buffer = flat.new_buffer(n, (torch.device("cpu"), torch.float32))
    start, stop = buffer.data_ptr(), buffer.data_ptr() + 4 * n
    inside = (stop // HUGE) * HUGE - (start + HUGE - 1) // HUGE * HUGE
    assert marked_for_huge_pages(first_huge_page(buffer))
    assert native.advise_huge_pages(buffer) == inside > 0  # advising again is harmless and says the same


@needs_smaps
def test_small_and_plain_buffers_are_not_advised() -> None:
    small = torch.empty(native.HUGE_PAGE_MIN_BYTES // 4 - 1)
    assert native.advise_huge_pages(small) == 0
    plain = torch.empty(native.HUGE_PAGE_MIN_BYTES)  # not made by flat: left as the allocator made it
    assert not marked_for_huge_pages(first_huge_page(plain))


@needs_native
@needs_smaps
def test_flat_copies_on_huge_pages_hold_the_same_values_and_bytes() -> None:
    """A module of 48 MiB of float32 copied flat: the copy's buffer is advised, and its values and
    its charge (one storage of exactly the parameters' bytes) are what a plain copy gives."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(12)))
    d = averaging.copy_parameters(module)
    first = next(iter(d.entries.values()))
    assert marked_for_huge_pages(first_huge_page(first))
    assert held_bytes(d) == {"cpu": 12 * 1024 * 1024 * 4}
    for (name, p), (entry_name, entry) in zip(module.named_parameters(), d.entries.items()):
        assert name == entry_name and torch.equal(p, entry)


# -- the weighted sum (domain/weighted_sum.py) and merging's use of it -----------------------------

SUM_BUILT = weighted_sum.active()
needs_native_sum = pytest.mark.skipif(not SUM_BUILT, reason=f"merges run on {weighted_sum.native_state()}")


def torch_weighted_sum(out: torch.Tensor, xs: list[torch.Tensor], weights: list[float], divisor: float | None) -> None:
    """The oracle, written here rather than taken from the server: torch's mul, add_ with alpha, div_."""
    torch.mul(xs[0], weights[0], out=out)
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x, alpha=w)
    if divisor is not None:
        out.div_(divisor)


def inputs(count: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype) for _ in range(count)]


@needs_native_sum
@pytest.mark.parametrize("dtype", list(weighted_sum.KINDS), ids=str)
@pytest.mark.parametrize("count", [1, 2, 8, 20])
@pytest.mark.parametrize("divide", [True, False])
@pytest.mark.parametrize("n", [N, 3 * N + 5])
def test_the_weighted_sum_gives_torchs_bits(dtype: torch.dtype, count: int, divide: bool, n: int) -> None:
    xs = inputs(count, n, dtype)
    weights = [0.5 + k for k in range(count)]
    divisor = sum(weights) if divide else None
    expected, got = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    torch_weighted_sum(expected, xs, weights, divisor)
    assert weighted_sum.native_weighted_sum(got, xs, weights, divisor)
    assert torch.equal(bits(got), bits(expected))


@needs_native_sum
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_every_thread_split_of_the_sum_gives_the_same_bits(threads: int) -> None:
    xs, weights = inputs(3, 5 * N + 11, torch.float32), [1.0, -2.5, 0.25]
    expected, got = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    torch_weighted_sum(expected, xs, weights, 7.0)
    weighted_sum._run(got, xs, weights, 7.0, threads=threads)
    assert torch.equal(bits(got), bits(expected))


@needs_native_sum
def test_the_sum_may_write_into_one_of_its_inputs() -> None:
    xs = inputs(4, 2 * N + 3, torch.float32)
    expected = torch.empty_like(xs[0])
    torch_weighted_sum(expected, xs, [1.0, 2.0, 3.0, 4.0], 10.0)
    assert weighted_sum.native_weighted_sum(xs[2], xs, [1.0, 2.0, 3.0, 4.0], 10.0)
    assert torch.equal(bits(xs[2]), bits(expected))


@needs_native_sum
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_entries_in_one_call_give_torchs_bits(threads: int) -> None:
    """An uploaded dictionary's entries (a tensor each) of every size, empty and tiny included, summed
    in one call; one of them into one of its own inputs."""
    sizes = [0, 1, 5, 1000, N - 1, 3 * N + 7, 2]
    entries = [inputs(4, n, torch.float64, seed=i) for i, n in enumerate(sizes)]
    weights = [0.5, 1.5, -2.0, 3.25]
    outs = [torch.empty(n, dtype=torch.float64) for n in sizes]
    outs[3] = entries[3][1]
    expected = []
    for xs in entries:
        e = torch.empty(xs[0].shape, dtype=torch.float64)
        torch_weighted_sum(e, xs, weights, 3.25)
        expected.append(e)
    weighted_sum._call(1, outs, entries, weights, 3.25, threads)
    for got, e in zip(outs, expected):
        assert torch.equal(bits(got), bits(e))


@needs_native_sum
def test_sums_whose_results_share_memory_go_to_torch_in_their_order() -> None:
    shared = torch.zeros(3 * N)
    a, b = inputs(2, 2 * N, torch.float32), inputs(2, 2 * N, torch.float32, seed=1)
    jobs: list[weighted_sum.Job] = [(shared[: 2 * N], a, 2.0), (shared[N:], b, None)]
    assert weighted_sum.native_weighted_sums(jobs, [1.0, 1.0]) == [0, 1]
    assert not bool(shared.any())  # nothing written: torch's loop does both, in order
    small = [(torch.zeros(3), inputs(2, 3, torch.float32), None), (torch.zeros(2), inputs(2, 2, torch.float16), None)]
    assert weighted_sum.native_weighted_sums(small, [1.0, 2.0]) == [1]  # float16 is torch's; the small one is not
    expected = torch.empty(3)
    torch_weighted_sum(expected, list(small[0][1]), [1.0, 2.0], None)
    assert torch.equal(small[0][0], expected)


@pytest.mark.parametrize("case", ["float16", "mixed", "broadcast", "strided", "overlap"])
def test_sums_outside_the_kernel_are_left_untouched_for_torch(case: str) -> None:
    xs, out = inputs(3, 2 * N, torch.float32), torch.zeros(2 * N)
    if case == "float16":
        xs, out = [x.half() for x in xs], out.half()
    elif case == "mixed":
        xs[1] = xs[1].double()
    elif case == "broadcast":
        xs[1] = xs[1][:1].expand(2 * N)
    elif case == "strided":
        out = torch.zeros(4 * N)[::2]
    else:
        storage = torch.zeros(2 * N + 1)
        out, xs[0] = storage[1:], storage[: 2 * N]
    before = out.clone()
    assert not weighted_sum.native_weighted_sum(out, xs, [1.0, 2.0, 3.0], 6.0)
    assert torch.equal(out, before)


@needs_native_sum
def test_the_sum_guard_turns_off_a_kernel_that_differs_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = weighted_sum._NATIVE
    assert real is not None

    def divides_by_the_reciprocal(kind: int, outs: tuple[int, ...], xs: tuple[int, ...], w: tuple[float, ...],
                                  counts: tuple[int, ...], divisor: float, threads: int) -> None:
        # what a compiler allowed to turn x / d into x * (1 / d) would do: off by an ulp now and then
        real(kind, outs, xs, tuple(v / divisor for v in w) if divisor else w, counts, 0.0, threads)

    monkeypatch.setattr(weighted_sum, "_NATIVE", divides_by_the_reciprocal)
    assert not weighted_sum._agrees_with_torch.__wrapped__()
    monkeypatch.setattr(weighted_sum, "_NATIVE", real)
    assert weighted_sum._agrees_with_torch.__wrapped__()


def flat_dicts(count: int, seed: int) -> list[TensorDict]:
    """`count` flat dictionaries (copyparms' layout) of a module with 12 large and 4 small float32
    entries and one integer buffer, different values in each."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(*(torch.nn.Linear(300, 256) for _ in range(12)), torch.nn.BatchNorm1d(256))
    out = []
    for k in range(count):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(generator=torch.Generator().manual_seed(seed * 100 + k))
        out.append(averaging.copy_parameters(net, buffers=True))
    return out


@needs_native_sum
@pytest.mark.parametrize("method, options", [("average", {}), ("linear", {"normalize": True}), ("linear", {})])
@pytest.mark.parametrize("target", ["new", "separate", "one of the inputs"])
def test_merges_of_flat_dictionaries_take_one_native_pass_and_give_torchs_bits(
    method: str, options: dict[str, Any], target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]

    def merged(native_on: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
        ds = flat_dicts(5, seed=1)
        into = {"new": None, "separate": flat_dicts(1, seed=2)[0], "one of the inputs": ds[3]}[target]
        calls: list[int] = []
        real = weighted_sum._NATIVE
        assert real is not None

        def counted(*args: Any) -> None:
            calls.append(sum(args[4]))
            real(*args)

        monkeypatch.setattr(weighted_sum, "_NATIVE", counted if native_on else None)
        p = merging.plan(merging.METHODS[method], ds, weights=weights, into=into, kwargs=list(options.items()))
        result = merging.run(p, ds, into=into)
        monkeypatch.setattr(weighted_sum, "_NATIVE", real)
        return {k: v.clone() for k, v in result.entries.items()}, calls

    on, calls = merged(True)
    off, none = merged(False)
    assert not none
    floats = sum(t.numel() for name, t in flat_dicts(1, seed=1)[0].entries.items() if t.is_floating_point())
    assert calls == [floats]  # every float entry, flat (new results too), in one call
    assert on.keys() == off.keys()
    for name, value in on.items():
        assert torch.equal(value, off[name]), name


# -- streaming copies ---------------------------------------------------------------------------------

needs_copy = pytest.mark.skipif(native._COPY is None, reason="the native module was not built")


@needs_copy
@pytest.mark.parametrize("nbytes", [native.STREAM_MIN_BYTES, native.STREAM_MIN_BYTES + 1, native.STREAM_MIN_BYTES + 63,
                                    native.STREAM_MIN_BYTES + (16 << 10) + 65, 3 * native.STREAM_MIN_BYTES + 77])
@pytest.mark.parametrize("target_offset, source_offset", [(0, 0), (1, 0), (0, 5), (15, 9), (8, 16), (63, 1), (33, 64)])
def test_a_streamed_copy_is_every_byte_at_any_size_and_alignment(nbytes: int, target_offset: int, source_offset: int) -> None:
    """The streaming loop (_stream_bytes.h) starts at the target's first 64-byte boundary, goes four
    pages at a time, then line by line, and memcpy takes the head and the tail: every split of them,
    and nothing written outside the target."""
    g = torch.Generator().manual_seed(nbytes + target_offset)
    source = torch.randint(0, 256, (nbytes + 128,), dtype=torch.uint8, generator=g)
    out = torch.zeros(nbytes + 128, dtype=torch.uint8)
    target, value = out[target_offset:target_offset + nbytes], source[source_offset:source_offset + nbytes]
    assert native.stream_copy(target, value)
    assert torch.equal(target, value)
    assert not out[:target_offset].any() and not out[target_offset + nbytes:].any()


@needs_copy
def test_a_copy_that_is_small_overlapping_or_uneven_is_left_to_numpy() -> None:
    """stream_copy says False and touches nothing where its loop must not run."""
    small = torch.ones(native.STREAM_MIN_BYTES - 1, dtype=torch.uint8)
    assert not native.stream_copy(torch.zeros_like(small), small)
    whole = torch.arange(native.STREAM_MIN_BYTES, dtype=torch.float64)
    before = whole.clone()
    assert not native.stream_copy(whole[1:], whole[:-1]) and torch.equal(whole, before)  # overlapping
    uneven = torch.zeros(native.STREAM_MIN_BYTES + 8, dtype=torch.uint8)
    assert not native.stream_copy(uneven, torch.ones(native.STREAM_MIN_BYTES, dtype=torch.uint8))
    assert not uneven.any()
    # Of the same byte size but strided: its bytes are not numel * element_size from data_ptr.
    grid = torch.ones(2 * native.STREAM_MIN_BYTES, dtype=torch.uint8).view(2, -1)
    target = torch.zeros(native.STREAM_MIN_BYTES, dtype=torch.uint8)
    assert not native.stream_copy(target, grid[:, ::2]) and not target.any()
    assert not native.stream_copy(grid[:, ::2], target) and bool(grid.all())


@needs_copy
@pytest.mark.parametrize("bad", [
    ((), (), (), 0),  # no thread
    ((1,), (), (1,), 1),  # uneven tuples
    ((8,), (16,), (-1,), 1),  # a negative size
    ((0,), (16,), (4,), 1),  # a null address
])
def test_the_copy_refuses_arguments_it_cannot_run(bad: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]) -> None:
    assert native._COPY is not None
    with pytest.raises(ValueError):
        native._COPY(*bad)


@needs_copy
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_copies_on_threads_are_every_byte(threads: int) -> None:
    """Pairs of every size around the 1 MiB blocks the threads share, at odd offsets, in one call."""
    g = torch.Generator().manual_seed(threads)
    sizes = [native.STREAM_MIN_BYTES, 3 * native.STREAM_MIN_BYTES + 7, native.STREAM_MIN_BYTES + 1, 2 * native.STREAM_MIN_BYTES]
    sources = [torch.randint(0, 256, (n + 3,), dtype=torch.uint8, generator=g)[3:] for n in sizes]
    out = torch.zeros(sum(sizes) + 5 * len(sizes), dtype=torch.uint8)
    targets, at = [], 1
    for n in sizes:
        targets.append(out[at:at + n])
        at += n + 5
    assert native.stream_copies(list(zip(targets, sources)), threads) == []
    assert all(torch.equal(t, s) for t, s in zip(targets, sources))
    assert int(out.count_nonzero()) == sum(int(s.count_nonzero()) for s in sources)  # nothing between them


def test_without_the_native_module_every_copy_is_left_to_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that could not build `_native` copies with numpy and torch: the streaming helpers
    copy nothing and say so."""
    monkeypatch.setattr(native, "_COPY", None)
    big = torch.ones(native.STREAM_MIN_BYTES, dtype=torch.uint8)
    target = torch.zeros_like(big)
    assert not native.stream_copy(target, big) and not native.stream_bytes(target.data_ptr(), big.data_ptr(), big.numel())
    assert native.stream_copies([(target, big), (target[:8], big[:8])], 2) == [0, 1]
    assert not target.any()


@needs_native
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a Linux process allowed on at least two CPUs")
@pytest.mark.parametrize("threads", [2, 3])
def test_a_kernels_extra_threads_start_on_other_cpus_than_their_creators(threads: int) -> None:
    """Linux starts a new thread on its creator's CPU, where it waits while the creator works: in a
    2-vCPU VM a two-thread average ran on one core for its first 1-2 ms after a pause, or whole
    ("Threads that started on their creator's CPU" in docs/perf.md). Every kernel's extra threads
    start on the process's other CPUs, then may go anywhere it may."""
    from weightavg_server.domain._native import start_cpus

    for _ in range(20):
        here, cpus = start_cpus(threads)
        assert here in os.sched_getaffinity(0) and len(cpus) == threads
        assert all(cpu != here and cpu in os.sched_getaffinity(0) for cpu in cpus[1:])
    assert start_cpus(1)[0] == -1  # one thread starts nothing


# -- TIES's trim: radix selection and zero_below (domain/selection.py) -----------------------------------

SELECT_BUILT = selection.active()
needs_native_select = pytest.mark.skipif(not SELECT_BUILT, reason=f"TIES trims run on {selection.native_state()}")


def kthvalue_largest(values: torch.Tensor, k: int) -> float:
    """The oracle: the k-th largest |x| by torch's kthvalue (the (n - k + 1)-th smallest, NaN counted largest)."""
    return float(torch.kthvalue(values.abs().reshape(-1), values.numel() - k + 1).values)


def masked_fill_below(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The oracle: a copy of values with +0 where |x| < threshold, by abs, lt and masked_fill_."""
    return values.masked_fill(values.abs() < threshold, 0)


def same_value(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)


def signed_values(n: int, dtype: torch.dtype, seed: int, nans: int = 0) -> torch.Tensor:
    """Values of both signs and many scales (subnormal to near the dtype's limit), with repeated
    magnitudes, signed zeros, infinities and `nans` NaNs (one with its sign bit set)."""
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    exponents = torch.randint(int(math.log2(info.tiny)) - 10, int(math.log2(info.max)), (n,), generator=g)
    values = torch.rand(n, generator=g, dtype=torch.float64).add_(1).mul_(torch.pow(2.0, exponents.double()))
    values = values.mul_(torch.randint(0, 2, (n,), generator=g).mul_(2).sub_(1)).to(dtype)
    tied = torch.randperm(n, generator=g)[: n // 4]
    values[tied] = abs(float(values[0])) * torch.randint(0, 2, (len(tied),), generator=g).mul_(2).sub_(1).to(dtype)
    values[torch.randperm(n, generator=g)[: n // 10]] = 0.0
    values[torch.randperm(n, generator=g)[: n // 20]] = -0.0
    values[torch.randperm(n, generator=g)[: n // 50]] = -math.inf
    values[torch.randperm(n, generator=g)[:nans]] = math.nan
    if nans:
        values[-1] = -math.nan
    return values


@needs_native_select
@pytest.mark.parametrize("dtype", list(selection.KINDS), ids=str)
@pytest.mark.parametrize("n", [1, 7, 1000, 3 * N + 5])
@pytest.mark.parametrize("nans", [0, 3])
def test_the_selection_gives_kthvalues_value_at_every_rank(dtype: torch.dtype, n: int, nans: int) -> None:
    values = signed_values(n, dtype, seed=n, nans=min(nans, n))
    aside = torch.full_like(values, 7.0)
    for k in sorted({1, 2, 3, 4, n // 5, n // 5 + 1, n // 2, n - 3, n - 1, n}):
        if 1 <= k <= n:
            assert same_value(selection.kth_largest_magnitude(values, k, aside), kthvalue_largest(values, k)), k
    assert bool((aside == 7.0).all())  # the kernel needs no scratch


@needs_native_select
@given(values=st.lists(st.one_of(st.floats(allow_infinity=True, width=32), st.just(math.nan)), min_size=1, max_size=60),
       rank=st.floats(0, 1), wide=st.booleans())
@settings(max_examples=300, deadline=None)
def test_any_values_and_rank_give_kthvalues_value_and_masked_fills_trim(
    values: list[float], rank: float, wide: bool
) -> None:
    t = torch.tensor(values, dtype=torch.float64 if wide else torch.float32)
    k = 1 + int(rank * (len(values) - 1))
    threshold = selection.kth_largest_magnitude(t, k, torch.empty_like(t))
    assert same_value(threshold, kthvalue_largest(t, k))
    expected = masked_fill_below(t, threshold)
    selection.zero_below(t, threshold, torch.empty_like(t), torch.empty(t.shape, dtype=torch.bool))
    assert torch.equal(bits(t), bits(expected))


@needs_native_select
@pytest.mark.parametrize("dtype", list(selection.KINDS), ids=str)
@pytest.mark.parametrize("threshold", [0.0, -0.0, 1e-40, 0.1, 1.0, 3e38, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("n", [5, 3 * N + 5])
def test_zero_below_gives_masked_fills_bits(dtype: torch.dtype, threshold: float, n: int) -> None:
    values = signed_values(n, dtype, seed=3, nans=2)
    expected = masked_fill_below(values, threshold)
    selection.zero_below(values, threshold, torch.empty_like(values), torch.empty(n, dtype=torch.bool))
    assert torch.equal(bits(values), bits(expected))


@pytest.mark.parametrize("case", ["float16", "bfloat16", "strided", "off"])
def test_trims_outside_the_kernels_are_torchs(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    select, zero = selection._SELECT, selection._ZERO_BELOW

    def counted_select(*args: Any) -> float:
        calls.append("select")
        assert select is not None
        return select(*args)

    def counted_zero(*args: Any) -> None:
        calls.append("zero")
        assert zero is not None
        zero(*args)

    off = case == "off" or select is None or zero is None
    monkeypatch.setattr(selection, "_SELECT", None if off else counted_select)
    monkeypatch.setattr(selection, "_ZERO_BELOW", None if off else counted_zero)
    values = signed_values(4 * N, torch.float32, seed=5, nans=2)
    if case in ("float16", "bfloat16"):
        values = values.to(getattr(torch, case))
    elif case == "strided":
        values = values[::2]
    aside, mask = torch.empty_like(values), torch.empty(values.shape, dtype=torch.bool)
    for k in (1, values.numel() // 3, values.numel()):
        threshold = selection.kth_largest_magnitude(values, k, aside)
        assert same_value(threshold, kthvalue_largest(values, k))
    expected = masked_fill_below(values, threshold)
    selection.zero_below(values, threshold, aside, mask)
    assert torch.equal(bits(values), bits(expected))
    assert not calls


@needs_native_select
@pytest.mark.parametrize("broken", [
    "one rank off", "writes -0 below the threshold", "zeroes at the threshold", "zeroes a negative NaN",
])
def test_the_trim_guard_turns_off_kernels_that_differ_from_torch(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A selection one rank off, a trim that writes -0 for a negative value, one that zeroes a value
    equal to the threshold, or one that zeroes a NaN with its sign bit set must each be caught by the
    check run at first use."""
    select, zero = selection._SELECT, selection._ZERO_BELOW
    assert select is not None and zero is not None

    def one_rank_off(kind: int, address: int, count: int, k: int) -> float:
        return select(kind, address, count, min(k + 1, count))

    def wrong_trim(kind: int, address: int, count: int, threshold: float) -> None:
        dtype = np.float32 if kind == 0 else np.float64
        array = np.frombuffer((ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address), dtype=dtype)
        with np.errstate(invalid="ignore"):
            if broken == "writes -0 below the threshold":
                array[np.abs(array) < threshold] *= 0  # -x * 0 is -0
            elif broken == "zeroes a negative NaN":
                array[(np.abs(array) < threshold) | (np.isnan(array) & np.signbit(array))] = 0
            else:
                array[np.abs(array) <= threshold] = 0

    if broken == "one rank off":
        monkeypatch.setattr(selection, "_SELECT", one_rank_off)
    else:
        monkeypatch.setattr(selection, "_ZERO_BELOW", wrong_trim)
    assert not selection._agrees_with_torch.__wrapped__()
    monkeypatch.setattr(selection, "_SELECT", select)
    monkeypatch.setattr(selection, "_ZERO_BELOW", zero)
    assert selection._agrees_with_torch.__wrapped__()


@pytest.mark.parametrize("bad", [(2, 8, 1), (0, 8, 0), (0, 8, 9), (0, 0, 1), (1, -1, 1)])
def test_the_extension_refuses_selections_it_cannot_run(bad: tuple[int, int, int]) -> None:
    if selection._SELECT is None or selection._ZERO_BELOW is None:
        pytest.skip("the kernels are not built here")
    kind, count, k = bad
    t = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(ValueError):
        selection._SELECT(kind, t.data_ptr(), count, k)
    with pytest.raises(ValueError):
        selection._SELECT(0, 0, 8, 1)  # a null address
    for kind, address, count in [(2, t.data_ptr(), 8), (0, t.data_ptr(), -1), (0, 0, 8)]:
        with pytest.raises(ValueError):
            selection._ZERO_BELOW(kind, address, count, 1.0)


def ties_inputs(dtype: torch.dtype) -> tuple[TensorDict, list[TensorDict]]:
    """A base and three models whose deltas hold ties at the threshold, zeros, signed zeros, inf and
    NaN, in entries large and small."""
    g = torch.Generator().manual_seed(9)
    shapes = {"big": (400, 400), "odd": (37, 3), "one": (1,), "row": (1000,)}
    base = TensorDict({n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()})
    models = []
    for i in range(3):
        entries = {}
        for n, b in base.entries.items():
            x = b + torch.randn(b.shape, generator=g, dtype=torch.float64).mul_(0.01).round_(decimals=3).to(dtype)
            flat_x, flat_b = x.view(-1), b.view(-1)
            if flat_x.numel() > 20:
                flat_x[:5] = flat_b[:5]  # zero deltas
                flat_b[5] = -0.0 if i == 0 else flat_b[5]
                flat_x[6] = math.inf if i == 1 else flat_x[6]
                flat_x[7] = math.nan if i == 2 else flat_x[7]
            entries[n] = x
        models.append(TensorDict(entries))
    return base, models


@needs_native_select
@pytest.mark.parametrize("dtype", list(selection.KINDS), ids=str)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.999])
def test_a_ties_merge_has_the_same_bits_with_the_kernels_on_and_off(
    dtype: torch.dtype, density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every bit of the merge, NaNs and signed zeros included, with the native trim and with torch's
    kthvalue, abs, lt and masked_fill_; the kernels selected every threshold of the first (one per
    model and entry that keeps some but not all) and trimmed every delta that keeps any twice (once
    to elect the signs, once to sum)."""
    base, models = ties_inputs(dtype)
    select, zero = selection._SELECT, selection._ZERO_BELOW
    assert select is not None and zero is not None
    selected: list[int] = []
    trimmed: list[int] = []

    def counted_select(*args: Any) -> float:
        selected.append(args[2])
        return select(*args)

    def counted_zero(*args: Any) -> None:
        trimmed.append(args[2])
        zero(*args)

    def merge() -> dict[str, torch.Tensor]:
        p = merging.plan(merging.METHODS["ties"], models, base=base, weights=[1.0, 0.7, 1.3],
                         kwargs=[("density", density)])
        return merging.run(p, models, base=base).entries

    monkeypatch.setattr(selection, "_SELECT", counted_select)
    monkeypatch.setattr(selection, "_ZERO_BELOW", counted_zero)
    on = merge()
    monkeypatch.setattr(selection, "_SELECT", None)
    off = merge()
    sizes = [t.numel() for t in base.entries.values() if max(1, int(density * t.numel())) < t.numel()]
    assert sorted(selected) == sorted(sizes * 3)
    assert sorted(trimmed) == sorted([t.numel() for t in base.entries.values()] * 6)  # k >= 1: every delta
    assert on.keys() == off.keys()
    for name in on:
        assert torch.equal(bits(on[name]), bits(off[name])), name
    assert bool(on["big"].isnan().any()) and bool(on["big"].isinf().any())  # the special values got through
