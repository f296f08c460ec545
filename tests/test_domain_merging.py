"""domain.merging in process: the weighted average against Flower's FedAvg formula, every merge method
against its reference formula written out here with whole stacked tensors, the integer rule, the
checks that refuse a call before anything changes, weights near float32's limits (and the bits of
ordinary ones), and the scratch each plan reserves.

Tolerance: 1e-6 absolute in float32. The server accumulates tensor by tensor and the oracles stack
whole tensors, so the two round differently by a few float32 ulps of values of order 1 (an ulp at 2
is 2.4e-7); a wrong formula is off by orders of magnitude more.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from weightavg_server.domain import flat, footprint, lerp, merging, selection, weighted_sum
from weightavg_server.domain.dictionaries import COUNT_KEY, TensorDict
from weightavg_server.domain.errors import InvalidArgument
from weightavg_server.domain.options import float_value

TOL = 1e-6
SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "c.weight": (3, 6)}


def dicts(count: int, seed: int = 0, scale: float = 1.0, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    return [TensorDict({n: scale * torch.randn(s, generator=g) for n, s in shapes.items()}) for _ in range(count)]


def fine_tuned(count: int, seed: int = 0, shapes: dict[str, tuple[int, ...]] = SHAPES) -> tuple[TensorDict, list[TensorDict]]:
    """A base and models fine-tuned from it: base + small deltas, as merges expect."""
    base = dicts(1, seed, shapes=shapes)[0]
    g = torch.Generator().manual_seed(seed + 100)
    return base, [
        TensorDict({n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.entries.items()}) for _ in range(count)
    ]


def merged(method: str, ds: Sequence[TensorDict], **kw: object) -> TensorDict:
    options = kw.pop("options", {})
    assert isinstance(options, dict)
    p = merging.plan(merging.METHODS[method], ds, kwargs=list(options.items()), **kw)  # type: ignore[arg-type]
    return merging.run(p, ds, base=kw.get("base"), into=kw.get("into"))  # type: ignore[arg-type]


def assert_close(got: torch.Tensor, want: torch.Tensor | np.ndarray, tol: float = TOL) -> None:
    want_t = torch.as_tensor(want)
    assert got.shape == want_t.shape
    assert float((got.double() - want_t.double()).abs().max()) <= tol


def unchanged(ds: Sequence[TensorDict]) -> list[dict[str, torch.Tensor]]:
    return [{n: t.clone() for n, t in d.entries.items()} for d in ds]


# -- the weighted average against Flower -----------------------------------------------------------------


def flower_fedavg(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvg as Flower's `aggregate` (flwr/server/strategy/aggregate.py) defines it, in numpy: each
    client's arrays times its example count, summed per layer, divided by the total count. Written
    out here because flwr's pins (protobuf 6, grpcio-health-checking 1.81) conflict with this
    project's, so it is not installed as a test dependency."""
    total = sum(n for _, n in results)
    layers = zip(*[[layer * n for layer in arrays] for arrays, n in results])
    out = []
    for scaled in layers:
        acc = scaled[0]
        for s in scaled[1:]:
            acc = np.add(acc, s)
        out.append(acc / total)
    return out


@pytest.mark.parametrize("counts", [[600, 300, 100], [1, 1, 1, 1, 1, 1, 1, 1], [5000, 17, 2]], ids=str)
def test_average_equals_flowers_fedavg_on_the_same_arrays_and_counts(counts: list[int]) -> None:
    ds = dicts(len(counts), seed=len(counts))
    names = list(SHAPES)
    expected = flower_fedavg([([d.entries[n].numpy() for n in names], c) for d, c in zip(ds, counts)])
    got = merged("average", ds, weights=[float(c) for c in counts])
    assert list(got.entries) == names
    for name, want in zip(names, expected):
        assert want.dtype == np.float32
        assert got.entries[name].dtype == torch.float32
        assert_close(got.entries[name], want)


def test_average_without_weights_is_the_plain_mean_and_leaves_its_inputs() -> None:
    ds = dicts(4)
    before = unchanged(ds)
    got = merged("average", ds)
    for name in SHAPES:
        assert_close(got.entries[name], torch.stack([d.entries[name] for d in ds]).mean(0))
    for d, b in zip(ds, before):
        assert all(torch.equal(d.entries[n], b[n]) for n in b)


def test_average_of_one_dictionary_is_a_copy_in_new_memory() -> None:
    (d,) = dicts(1)
    got = merged("average", [d])
    for name, t in d.entries.items():
        assert torch.equal(got.entries[name], t)
        assert got.entries[name].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_a_new_result_lies_flat_so_averages_into_it_fuse() -> None:
    """A merge's new dictionary is laid out as copyparms' copies: each dtype's entries back to back in
    one buffer holding exactly their bytes."""
    ds = dicts(3)
    for d in ds:
        d.entries["steps"] = torch.tensor([3, 4], dtype=torch.int64)
    got = merged("average", ds)
    floats = [t for n, t in got.entries.items() if n != "steps"]
    assert flat.is_flat(floats)
    assert floats[0].untyped_storage().nbytes() == sum(t.numel() for t in floats) * 4
    assert got.entries["steps"].untyped_storage().nbytes() == 16


def test_the_count_entry_takes_no_part() -> None:
    ds = dicts(2)
    ds[0].entries[COUNT_KEY] = torch.tensor(7.0, dtype=torch.float64)  # only the first has one
    got = merged("average", ds)
    assert COUNT_KEY not in got.entries and list(got.entries) == list(SHAPES)


def test_shapes_broadcast_to_their_common_shape() -> None:
    a = TensorDict({"x": torch.arange(3.0).reshape(3, 1)})
    b = TensorDict({"x": torch.arange(4.0).reshape(1, 4)})
    got = merged("average", [a, b], weights=[1.0, 3.0])
    assert_close(got.entries["x"], (a.entries["x"] + 3 * b.entries["x"]) / 4)


def test_bfloat16_entries_are_summed_in_float32_and_the_result_keeps_the_first_dtype() -> None:
    ds = dicts(8, scale=1.0)
    for d in ds:
        d.entries["a.weight"] = d.entries["a.weight"].bfloat16()
    got = merged("average", ds)
    exact = torch.stack([d.entries["a.weight"].float() for d in ds]).mean(0)
    assert got.entries["a.weight"].dtype == torch.bfloat16
    assert torch.equal(got.entries["a.weight"], exact.bfloat16())  # one rounding, at the end


def test_a_float64_entry_is_averaged_in_float64() -> None:
    a = TensorDict({"x": torch.tensor([1.0, 1e-9], dtype=torch.float64)})
    b = TensorDict({"x": torch.tensor([1.0 + 2e-9, 0.0], dtype=torch.float32)})
    got = merged("average", [a, b])
    assert got.entries["x"].dtype == torch.float64
    assert_close(got.entries["x"], (a.entries["x"] + b.entries["x"].double()) / 2, tol=1e-15)


# -- into ---------------------------------------------------------------------------------------------------


def test_average_into_one_of_its_inputs_reads_it_before_writing_it() -> None:
    ds = dicts(3)
    want = {n: (ds[0].entries[n] + 2 * ds[1].entries[n] + ds[2].entries[n]) / 4 for n in SHAPES}
    target = ds[1]
    ids = {n: t.untyped_storage().data_ptr() for n, t in target.entries.items()}
    assert merged("average", ds, weights=[1.0, 2.0, 1.0], into=target) is target
    for name in SHAPES:
        assert_close(target.entries[name], want[name])
        assert target.entries[name].untyped_storage().data_ptr() == ids[name]  # in place


def test_average_into_a_live_view_writes_the_modules_parameters() -> None:
    module = torch.nn.Linear(5, 6)
    ds = dicts(2, shapes={"weight": (6, 5), "bias": (6,)})
    view = TensorDict(dict(module.named_parameters()), live=True)
    merged("average", ds, into=view)
    assert_close(module.weight.detach(), (ds[0].entries["weight"] + ds[1].entries["weight"]) / 2)
    assert module.weight.requires_grad


def test_into_keeps_its_own_dtype() -> None:
    ds = dicts(2)
    into = TensorDict({n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()})
    merged("average", ds, into=into)
    assert into.entries["a.bias"].dtype == torch.float64
    assert_close(into.entries["a.bias"], (ds[0].entries["a.bias"].double() + ds[1].entries["a.bias"].double()) / 2)


def test_into_that_shares_another_entrys_memory_with_an_input_is_refused() -> None:
    shared = torch.zeros(3)
    a = TensorDict({"x": shared, "y": torch.ones(3)})
    b = TensorDict({"x": torch.ones(3), "y": torch.ones(3)})
    into = TensorDict({"x": torch.zeros(3), "y": shared})
    with pytest.raises(InvalidArgument, match="shares memory with the inputs' 'x'"):
        merging.plan(merging.METHODS["average"], [a, b], into=into)


# -- integer entries ----------------------------------------------------------------------------------------


def with_counts(ds: list[TensorDict], values: Sequence[int]) -> list[TensorDict]:
    for d, v in zip(ds, values):
        d.entries["b.num_batches_tracked"] = torch.tensor(v)
        d.entries["mask"] = torch.tensor([v % 2 == 0, False])
    return ds


def test_integer_entries_are_the_firsts_by_default() -> None:
    got = merged("average", with_counts(dicts(3), [4, 9, 2]))
    assert got.entries["b.num_batches_tracked"].item() == 4 and got.entries["b.num_batches_tracked"].dtype == torch.int64
    assert got.entries["mask"].tolist() == [True, False]


def test_integer_entries_take_the_maximum_with_integers_max() -> None:
    got = merged("average", with_counts(dicts(3), [4, 9, 3]), options={"integers": "max"})
    assert got.entries["b.num_batches_tracked"].item() == 9
    assert got.entries["mask"].tolist() == [True, False]


def test_integers_max_into_a_later_input_still_sees_every_value() -> None:
    ds = with_counts(dicts(3), [4, 1, 9])
    merged("average", ds, into=ds[1], options={"integers": "max"})
    assert ds[1].entries["b.num_batches_tracked"].item() == 9


@pytest.mark.parametrize(("integers", "want"), [("first", [5, 1, 9, 2]), ("max", [5, 3, 9, 3])])
def test_an_integer_entry_of_into_one_element_on_in_an_inputs_storage_gets_what_a_new_dictionary_gets(
    integers: str, want: list[int]
) -> None:
    """An `into` entry that overlaps its input without being it: "max" left that input out as if
    `into` held its values, and took into's own old elements instead ([3, 9, 3, 3]); "first" failed
    in `copy_` with a RuntimeError (INTERNAL on a server) after the float entries were written. The
    value is now made in a scratch buffer the plan reserves, as for a float entry, and copied in."""
    storage = torch.tensor([5, 1, 9, 2, 0])
    ds = [TensorDict({"w": torch.ones(3), "n": storage[0:4]}), TensorDict({"w": torch.zeros(3), "n": torch.full((4,), 3)})]
    into = TensorDict({"w": torch.empty(3), "n": storage[1:5]})
    p = plan_of("average", ds, into=into, options={"integers": integers})
    merging.run(p, ds, into=into)
    assert into.entries["n"].tolist() == want
    assert into.entries["w"].tolist() == [0.5] * 3
    assert footprint.merge_bytes(p) == {"cpu": 4 * 8}  # the integer entry's aside; the float one is direct
    exact = plan_of("average", ds, into=ds[0], options={"integers": integers})
    assert footprint.merge_bytes(exact)["cpu"] == 3 * 4  # into one of the inputs itself: no aside for "n"


def test_integer_entries_that_differ_in_dtype_are_refused() -> None:
    ds = with_counts(dicts(2), [1, 2])
    ds[1].entries["b.num_batches_tracked"] = torch.tensor(2, dtype=torch.int32)
    with pytest.raises(InvalidArgument, match="integer entries are not averaged and must agree"):
        merging.plan(merging.METHODS["average"], ds)


# -- refusals ----------------------------------------------------------------------------------------------


def plan_of(method: str, ds: Sequence[TensorDict], **kw: object) -> merging.Plan:
    options = kw.pop("options", {})
    assert isinstance(options, dict)
    return merging.plan(merging.METHODS[method], ds, kwargs=list(options.items()), **kw)  # type: ignore[arg-type]


REFUSED: list[tuple[str, str, dict[str, object], str]] = [
    ("no dictionary", "average", {"ds": []}, "at least one dictionary"),
    ("weights of the wrong count", "average", {"weights": [1.0]}, "1 weights for 2 dictionaries"),
    ("a negative weight", "average", {"weights": [2.0, -1.0]}, "non-negative with a positive sum"),
    ("weights summing to 0", "average", {"weights": [0.0, 0.0]}, "non-negative with a positive sum"),
    ("an infinite weight", "linear", {"weights": [math.inf, 1.0]}, "finite"),
    ("a weight past float32's range", "average", {"weights": [1.0, 1e39]}, "within float32's range"),
    ("linear weights summing to 0", "linear", {"weights": [1.0, -1.0]}, "sum to 0"),
    ("linear weights summing to nearly 0", "linear", {"ds": dicts(3), "weights": [1.0, -1.0, 1e-300]},
     r"sum to 1e-300, too near 0 against the largest \(1\) to divide by in float32"),
    ("an unknown option", "average", {"options": {"integer": "max"}}, r"unknown option 'integer'; did you mean 'integers'\? \(options: integers\)"),
    ("an unknown integer rule", "average", {"options": {"integers": "median"}}, "must be one of first, max, mean"),
    ("slerp of three", "slerp", {"ds": dicts(3), "options": {"t": 0.5}}, "exactly 2 dictionaries"),
    ("slerp with weights", "slerp", {"weights": [1.0, 2.0], "options": {"t": 0.5}}, "takes no weights"),
    ("slerp without t", "slerp", {}, "option 't' is required and was not given"),
    ("slerp with t out of range", "slerp", {"options": {"t": 1.5}}, "'t' must be between 0 and 1"),
    ("ties without a base", "ties", {"options": {"density": 0.5}}, "needs a base"),
    ("linear with a base", "linear", {"base": dicts(1)[0]}, "takes no base"),
    ("ties without density", "ties", {"base": dicts(1)[0]}, "option 'density' is required and was not given"),
    ("dare with density 0", "dare", {"base": dicts(1)[0], "options": {"density": 0.0}}, r"must be in \(0, 1\]"),
    ("a pattern that matches nothing", "slerp", {"options": {"t": 0.5}, "per_tensor": [("*.nope", [("t", 1.0)])]},
     "pattern '\\*.nope' matches no entry"),
    ("an unknown option for a pattern", "slerp", {"options": {"t": 0.5}, "per_tensor": [("a.*", [("s", 1.0)])]},
     r"slerp \(pattern 'a.\*'\): unknown option 's'"),
    ("an empty gradient", "linear", {"weights": [1.0, ()]}, "dictionary 2's weight is an empty list"),
    ("a gradient with an infinity", "linear", {"weights": [(1.0, math.inf), 1.0]}, "weights must be finite"),
    ("a gradient past float32's range", "ties", {"base": dicts(1)[0], "weights": [(1.0, 1e39), 1.0],
                                                  "options": {"density": 0.5}}, "within float32's range"),
    ("average with a gradient", "average", {"weights": [(1.0, 2.0), 1.0]}, r"one number per dictionary; use merge\('linear'"),
    ("average with weights by pattern", "average", {"tensor_weights": [("a.*", [1.0, 2.0])]}, "weights by pattern"),
    ("slerp with weights by pattern", "slerp", {"tensor_weights": [("a.*", [1.0, 2.0])], "options": {"t": 0.5}},
     r"slerp \(pattern 'a.\*'\) takes no weights"),
    ("a pattern's weights of the wrong count", "linear", {"tensor_weights": [("a.*", [1.0])]},
     r"linear \(pattern 'a.\*'\): 1 weights for 2 dictionaries"),
    ("a pattern without weights", "linear", {"tensor_weights": [("a.*", [])]}, "pattern 'a.\\*' gives no weights"),
    ("weights for an empty pattern", "linear", {"tensor_weights": [("", [1.0, 2.0])]}, "an empty pattern"),
    ("weights for a pattern that matches nothing", "linear", {"tensor_weights": [("z*", [1.0, 2.0])]},
     "pattern 'z\\*' matches no entry"),
    ("densities for a merge that keeps every delta", "task_arithmetic", {"base": dicts(1)[0], "densities": [0.5, 0.5]},
     "task_arithmetic keeps every delta; per-dictionary densities are for ties, dare, della and breadcrumbs"),
    ("densities and the density option", "ties", {"base": dicts(1)[0], "densities": [0.5, 0.5],
                                                   "options": {"density": 0.5}}, "not both"),
    ("densities and a pattern's density option", "dare", {"base": dicts(1)[0], "densities": [0.5, 0.5],
                                                           "per_tensor": [("a.*", [("density", 0.3)])]}, "not both"),
    ("a density of 0", "dare", {"base": dicts(1)[0], "densities": [0.5, (0.2, 0.0)]},
     r"dictionary 2's density must be in \(0, 1\], given \[0.2, 0.0\]"),
    ("a density past 1", "ties", {"base": dicts(1)[0], "densities": [1.5, 0.5]}, "dictionary 1's density must be in"),
    ("densities of the wrong count", "ties", {"base": dicts(1)[0], "densities": [0.5]},
     "1 densities for 2 dictionaries"),
    ("a pattern's densities for linear", "linear", {"tensor_densities": [("a.*", [0.5, 0.5])]}, "keeps every delta"),
    ("a pattern's densities that match nothing", "ties", {"base": dicts(1)[0], "options": {"density": 0.5},
                                                           "tensor_densities": [("q*", [0.5, 0.5])]}, "matches no entry"),
    ("della with epsilon past its density", "della", {"base": dicts(1)[0], "options": {"density": 0.3, "epsilon": 0.3}},
     r"della: entry 'a.weight': dictionary 1's density 0.3 with epsilon 0.3 gives keep probabilities outside \(0, 1\)"),
    ("della with epsilon past 1 - density", "della", {"base": dicts(1)[0], "densities": [0.5, 0.9],
                                                      "options": {"epsilon": 0.15}}, "dictionary 2's density 0.9"),
    ("gradients summing to 0 at a layer", "linear",
     {"ds": [TensorDict({f"layers.{i}.w": torch.ones(2) for i in range(3)}) for _ in range(2)],
      "weights": [(1.0, -1.0), 1.0]}, "the weights sum to 0, so entry 'layers.2.w' cannot be normalised"),
]


@pytest.mark.parametrize(("method", "kw", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_a_call_that_does_not_fit_is_refused_with_what_to_do(method: str, kw: dict[str, object], message: str) -> None:
    ds = kw.pop("ds", dicts(2))
    assert isinstance(ds, list)
    with pytest.raises(InvalidArgument, match=message):
        plan_of(method, ds, **kw)


def test_dictionaries_with_different_names_are_refused_naming_the_difference() -> None:
    ds = dicts(3)
    del ds[2].entries["a.bias"]
    ds[2].entries["zz"] = torch.zeros(1)
    with pytest.raises(InvalidArgument, match="dictionary 3 lacks 'a.bias' and has 'zz' besides"):
        plan_of("average", ds)


def test_shapes_that_do_not_broadcast_are_refused() -> None:
    ds = dicts(2)
    ds[1].entries["a.bias"] = torch.zeros(5)
    with pytest.raises(InvalidArgument, match=r"entry 'a.bias'.*size of tensor a \(6\).*\(dictionary 2\)"):
        plan_of("average", ds)


def test_complex_and_mixed_entries_are_refused() -> None:
    ds = dicts(2)
    ds[0].entries["a.bias"] = ds[0].entries["a.bias"].to(torch.complex64)
    with pytest.raises(InvalidArgument, match="complex"):
        plan_of("average", ds)
    ds = dicts(2)
    ds[1].entries["a.bias"] = ds[1].entries["a.bias"].long()
    with pytest.raises(InvalidArgument, match="floating in dictionary 1 but not in dictionary 2"):
        plan_of("average", ds)


@pytest.mark.parametrize(("into", "message"), [
    ({"a.weight": (6, 5), "a.bias": (6,)}, "'c.weight' is missing from 'into'"),
    ({"a.weight": (6, 5), "a.bias": (7,), "c.weight": (3, 6)}, r"'into' holds shape \[7\]"),
])
def test_into_without_a_fitting_entry_for_every_name_is_refused(into: dict[str, tuple[int, ...]], message: str) -> None:
    target = TensorDict({n: torch.zeros(s) for n, s in into.items()})
    with pytest.raises(InvalidArgument, match=message):
        plan_of("average", dicts(2), into=target)


def test_an_expanded_into_entry_is_refused() -> None:
    target = TensorDict({n: torch.zeros(s) for n, s in SHAPES.items()})
    target.entries["a.bias"] = torch.zeros(1).expand(6)
    with pytest.raises(InvalidArgument, match="expanded tensor"):
        plan_of("average", dicts(2), into=target)


# -- linear ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_the_weighted_sum_normalised_or_not(normalize: bool) -> None:
    ds, w = dicts(3, seed=3), [0.5, -0.25, 2.0]
    got = merged("linear", ds, weights=w, options={"normalize": normalize})
    for name in SHAPES:
        want = sum(wi * d.entries[name] for wi, d in zip(w, ds))
        assert_close(got.entries[name], want / sum(w) if normalize else want)


# -- slerp ----------------------------------------------------------------------------------------------------


def reference_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, threshold: float = 0.9995) -> torch.Tensor:
    """SLERP over whole tensors as mergekit defines it, in float64: normalise each (if its norm > 1e-8),
    take the cosine; above the threshold in absolute value interpolate linearly, else by angle."""
    a, b = v0.double(), v1.double()
    an = a / a.norm() if a.norm() > 1e-8 else a
    bn = b / b.norm() if b.norm() > 1e-8 else b
    dot = float((an * bn).sum())
    if abs(dot) > threshold:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_follows_the_arc_between_two_tensors(t: float) -> None:
    ds = dicts(2, seed=5)
    got = merged("slerp", ds, options={"t": t})
    for name in SHAPES:
        assert_close(got.entries[name], reference_slerp(ds[0].entries[name], ds[1].entries[name], t))
    if t == 0.0:
        assert all(torch.allclose(got.entries[n], ds[0].entries[n], atol=TOL) for n in SHAPES)


def test_slerp_of_2_23_float32_elements_takes_its_angle_as_accurately_as_float64() -> None:
    """A 4096x2048 layer and a fine-tuned copy (cos 0.96). The server's result must be within 3e-5 of
    the float64 formula, as mergekit's float32 numpy slerp is: with float32 norms (torch's CPU
    vector_norm is off by 2e-4 at this size) the angle moved it by 6.8e-4. Float32 rounding of values
    up to ~5 accounts for under 1e-6."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(4096, 2048, generator=g)
    b = a + 0.3 * torch.randn(4096, 2048, generator=g)
    got = merged("slerp", [TensorDict({"x": a}), TensorDict({"x": b})], options={"t": 0.5})
    assert_close(got.entries["x"], reference_slerp(a, b, 0.5), tol=3e-5)


def test_slerp_keeps_the_norm_of_two_orthogonal_unit_tensors() -> None:
    a, b = TensorDict({"x": torch.tensor([1.0, 0.0])}), TensorDict({"x": torch.tensor([0.0, 1.0])})
    got = merged("slerp", [a, b], options={"t": 0.5})
    assert_close(got.entries["x"], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0], ids=["same direction", "opposite", "equal"])
def test_slerp_of_colinear_tensors_falls_back_to_lerp(factor: float) -> None:
    (a,) = dicts(1, seed=6)
    b = TensorDict({n: factor * t for n, t in a.entries.items()})
    got = merged("slerp", [a, b], options={"t": 0.25})
    for name in SHAPES:
        want = 0.75 * a.entries[name] + 0.25 * b.entries[name]
        assert_close(got.entries[name], want)
        assert_close(got.entries[name], reference_slerp(a.entries[name], b.entries[name], 0.25))


def test_slerp_just_under_the_threshold_takes_the_arc_and_just_over_it_the_line() -> None:
    x = torch.tensor([1.0, 0.0])
    for angle, fallback in ((0.05, False), (0.02, True)):  # cos(0.05) = 0.99875, cos(0.02) = 0.9998
        y = torch.tensor([math.cos(angle), math.sin(angle)])
        got = merged("slerp", [TensorDict({"x": x}), TensorDict({"x": y})], options={"t": 0.5})
        arc = torch.tensor([math.cos(angle / 2), math.sin(angle / 2)])
        line = (x + y) / 2
        assert_close(got.entries["x"], line if fallback else arc)
        assert_close(got.entries["x"], reference_slerp(x, y, 0.5))


@pytest.mark.parametrize(("b", "threshold", "line"), [
    (torch.tensor([2.0, 0.0]), 1.0, [1.5, 0.0]),  # exactly colinear with a threshold of 1: no angle to follow
    # Opposite: theta = pi, whose sine in float64 is 1.2e-16, not 0; the arc came out as -1.6e16.
    (torch.tensor([-3.0, 0.0]), 1.0, [-1.0, 0.0]),
    (torch.tensor([math.nan, 1.0]), 0.9995, None),  # the cosine is NaN
    (torch.tensor([0.0, 0.0]), 0.9995, None),  # a zero tensor: cosine 0, the arc to nowhere
], ids=["colinear at threshold 1", "opposite at threshold 1", "NaN", "zero"])
def test_slerp_never_divides_by_a_zero_sine(b: torch.Tensor, threshold: float, line: list[float] | None) -> None:
    a = TensorDict({"x": torch.tensor([1.0, 0.0])})
    got = merged("slerp", [a, TensorDict({"x": b})], options={"t": 0.5, "threshold": threshold})
    if line is not None:
        assert got.entries["x"].tolist() == line
    assert got.entries["x"].shape == (2,)


def test_slerp_takes_t_per_tensor_by_the_first_pattern_that_matches() -> None:
    ds = dicts(2, seed=7)
    got = merged("slerp", ds, options={"t": 0.5}, per_tensor=[("*.bias", [("t", 0.0)]), ("a.*", [("t", 1.0)])])
    assert_close(got.entries["a.bias"], ds[0].entries["a.bias"])  # '*.bias' first
    assert_close(got.entries["a.weight"], ds[1].entries["a.weight"])
    assert_close(got.entries["c.weight"], reference_slerp(ds[0].entries["c.weight"], ds[1].entries["c.weight"], 0.5))


# -- task arithmetic, TIES, DARE --------------------------------------------------------------------------------


def reference_task_vectors(
    base: torch.Tensor, xs: list[torch.Tensor], w: list[float], *, lam: float = 1.0, normalize: bool = False,
    keep: list[torch.Tensor] | None = None, consensus: bool = False,
) -> torch.Tensor:
    """base + lam * mix(w_i * keep_i * (x_i - base)), with stacked tensors, as the reference describes:
    sign consensus elects sign(sum w delta) (+ at 0) and counts only contributions of that sign; the
    divisor is the sum of the weights counted there (0 -> 1), or sum(w) without consensus."""
    deltas = torch.stack([x - base for x in xs])
    if keep is not None:
        deltas = deltas * torch.stack(keep)
    weights = torch.tensor(w).view(-1, *([1] * base.dim()))
    weighted = weights * deltas
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        mask = torch.sign(weighted) == elected
        mixed = (weighted * mask).sum(0)
        divisor = (weights * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), torch.full_like(base, sum(w))
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def top_k_kept(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The max(1, int(density * numel)) largest |delta| (mergekit 0.1.5's `magnitude`), chosen by topk
    (the server selects by kthvalue)."""
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel())
    keep[torch.topk(delta.abs().flatten(), k).indices] = 1
    return keep.view(delta.shape)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_adds_the_weighted_task_vectors_to_the_base(normalize: bool) -> None:
    base, ds = fine_tuned(3)
    w = [1.0, 0.5, -0.25]
    got = merged("task_arithmetic", ds, base=base, weights=w, options={"lam": 0.7, "normalize": normalize})
    for n in SHAPES:
        want = reference_task_vectors(base.entries[n], [d.entries[n] for d in ds], w, lam=0.7, normalize=normalize)
        assert_close(got.entries[n], want)


@pytest.mark.parametrize(("density", "normalize", "w"), [
    (0.5, True, [1.0, 1.0, 1.0]), (0.2, True, [0.3, 1.2, 0.7]), (0.7, False, [1.0, 2.0, 0.5]), (1.0, True, [1.0, 1.0, 2.0]),
])
def test_ties_trims_elects_signs_and_averages_the_agreeing_deltas(density: float, normalize: bool, w: list[float]) -> None:
    base, ds = fine_tuned(3, seed=11)
    got = merged("ties", ds, base=base, weights=w, options={"density": density, "normalize": normalize, "lam": 1.5})
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        keep = [top_k_kept(x - b, density) for x in xs]
        want = reference_task_vectors(b, xs, w, lam=1.5, normalize=normalize, keep=keep, consensus=True)
        assert_close(got.entries[n], want)


def test_ties_elects_plus_on_a_tie_and_divides_by_the_weights_that_agreed() -> None:
    base = TensorDict({"x": torch.zeros(4)})
    a = TensorDict({"x": torch.tensor([1.0, -1.0, 2.0, 0.0])})
    b = TensorDict({"x": torch.tensor([-1.0, 1.0, 2.0, 0.0])})
    got = merged("ties", [a, b], base=base, options={"density": 1.0})
    # element 0: +1 and -1 tie, + is elected: only a's +1 counts, divided by a's weight 1
    # element 1: -1 and +1 tie, +: b's +1; element 2: both agree: mean 2; element 3: nothing counts, divisor 1
    assert got.entries["x"].tolist() == [1.0, 1.0, 2.0, 0.0]
    weighted = merged("ties", [a, b], base=base, weights=[3.0, 1.0], options={"density": 1.0})
    assert weighted.entries["x"].tolist() == [1.0, -1.0, 2.0, 0.0]  # the heavier a wins both signs


def test_ties_keeps_the_largest_change_of_a_tensor_too_small_for_one_element_at_its_density() -> None:
    """int(0.2 * 4) = 0, but a positive density keeps at least one element (mergekit's `magnitude`)."""
    base = TensorDict({"bias": torch.zeros(4)})
    x = TensorDict({"bias": torch.tensor([0.5, -3.0, 1.0, 2.0])})
    got = merged("ties", [x], base=base, options={"density": 0.2})
    assert got.entries["bias"].tolist() == [0.0, -3.0, 0.0, 0.0]


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_ties_keeping_one_element_keeps_the_nan_and_not_the_infinities(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """k = max(1, int(0.2 * 4)) = 1: the one element kept is the NaN (counted largest), not an inf
    beside it (a threshold of inf kept them: |inf| < inf is false)."""
    if kernels == "torch":
        monkeypatch.setattr(selection, "_SELECT", None)
    base = TensorDict({"x": torch.zeros(4)})
    x = TensorDict({"x": torch.tensor([math.inf, math.nan, -math.inf, 3.0])})
    got = merged("ties", [x], base=base, options={"density": 0.2})
    assert same_bits_but_nan_payloads(got.entries["x"], torch.tensor([0.0, math.nan, 0.0, 0.0]))


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_ties_keeps_only_the_nans_of_a_delta_with_k_of_them(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-th largest |delta| counts NaN largest, so with k NaNs the top k are the NaNs, and the
    numbers go as they do beside an inf (the threshold NaN, which nothing is below, kept them all)."""
    if kernels == "torch":
        monkeypatch.setattr(selection, "_SELECT", None)
    base = TensorDict({"x": torch.zeros(10)})
    numbers = [1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -8.0, 9.0]
    for first, density in ((math.nan, 0.1), (math.inf, 0.1), (math.nan, 0.2)):
        got = merged("ties", [TensorDict({"x": torch.tensor([first, *numbers])})], base=base, options={"density": density})
        kept = torch.tensor([first] + [0.0] * 8 + [9.0 if density == 0.2 else 0.0])
        assert same_bits_but_nan_payloads(got.entries["x"], kept), (first, density, got.entries["x"])


def bits32(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.int32).tolist()


def same_bits_but_nan_payloads(got: torch.Tensor, want: torch.Tensor) -> bool:
    """NaN where want has one (of any sign and payload: the merge's arithmetic may flip a NaN's sign),
    every bit elsewhere, signed zeros included."""
    numbers = ~want.isnan()
    return torch.equal(got.isnan(), want.isnan()) and bits32(got[numbers]) == bits32(want[numbers])


def dare_keep(seed: int, index: int, name: str, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """DARE's mask as docs/merging.md documents it: a CPU generator seeded with the first 8 bytes of
    sha256("{seed}/{index}/{name}") (big-endian, top bit cleared), then bernoulli_(density) into a
    float32 tensor of the entry's shape."""
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return torch.empty(shape).bernoulli_(density, generator=g)


@pytest.mark.parametrize("consensus", [False, True])
def test_dare_drops_and_rescales_deltas_with_masks_reproducible_from_the_seed(consensus: bool) -> None:
    base, ds = fine_tuned(3, seed=13)
    w, density = [1.0, 0.6, 0.9], 0.4
    options = {"density": density, "seed": 42, "consensus": consensus, "normalize": consensus, "lam": 0.8}
    got = merged("dare", ds, base=base, weights=w, options=options)
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        keep = [dare_keep(42, i, n, tuple(b.shape), density) / density for i in range(len(xs))]
        want = reference_task_vectors(b, xs, w, lam=0.8, normalize=consensus, keep=keep, consensus=consensus)
        assert_close(got.entries[n], want)
    again = merged("dare", ds, base=base, weights=w, options=options)
    assert all(torch.equal(again.entries[n], got.entries[n]) for n in SHAPES)
    other = merged("dare", ds, base=base, weights=w, options={**options, "seed": 43})
    assert not torch.equal(other.entries["a.weight"], got.entries["a.weight"])


def mergekit_norm_ratio(delta: torch.Tensor, mask: torch.Tensor, norm: str, eps: float = 1e-7) -> torch.Tensor:
    """The factor mergekit's `rescaled_masked_tensor` (mergekit/sparsify.py, transcribed) scales a
    dropped-out delta by: the delta's norm over the masked delta's (l1 abs().sum(), l2 norm(), linf
    abs().max()), or 1 where either is below eps."""
    masked = delta * mask
    if norm == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = delta.norm(), masked.norm()
    else:
        before, after = delta.abs().max(), masked.abs().max()
    if before < eps or after < eps:
        return torch.ones(())
    return before / after


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_dare_rescaled_to_a_norm_equals_mergekits_rescaled_masked_tensor(norm: str, consensus: bool) -> None:
    base, ds = fine_tuned(3, seed=16)
    w, density = [1.0, 0.6, 0.9], 0.4
    options = {"density": density, "seed": 7, "rescale_norm": norm, "consensus": consensus, "normalize": consensus}
    got = merged("dare", ds, base=base, weights=w, options=options)
    by_density = merged("dare", ds, base=base, weights=w, options={**options, "rescale_norm": "density"})
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        masks = [dare_keep(7, i, n, tuple(b.shape), density) for i in range(len(xs))]
        keep = [m * mergekit_norm_ratio(x - b, m, norm) for x, m in zip(xs, masks)]
        want = reference_task_vectors(b, xs, w, normalize=consensus, keep=keep, consensus=consensus)
        assert_close(got.entries[n], want)
    assert not torch.equal(got.entries["a.weight"], by_density.entries["a.weight"])


def test_a_norm_rescale_leaves_deltas_below_mergekits_eps_unscaled() -> None:
    """Where the delta's norm (or the dropped-out delta's) is below 1e-7, the kept elements stay as they
    are; the same delta 1000 times larger is rescaled."""
    base = TensorDict({"w": torch.zeros(1000)})
    tiny = TensorDict({"w": torch.full((1000,), 1e-11)})  # L1 norm 1e-8
    got = merged("dare", [tiny], base=base, options={"density": 0.5, "rescale_norm": "l1"})
    kept = got.entries["w"] != 0
    assert bits32(got.entries["w"][kept]) == bits32(torch.full((int(kept.sum()),), 1e-11))
    large = TensorDict({"w": torch.full((1000,), 1e-3)})
    got = merged("dare", [large], base=base, options={"density": 0.5, "rescale_norm": "l1"})
    assert_close(got.entries["w"].abs().sum(), torch.tensor(1.0), tol=1e-5)  # the whole delta's L1 norm, in float32


def test_dare_without_rescale_keeps_the_surviving_deltas_as_they_are() -> None:
    base, (d,) = fine_tuned(1, seed=14, shapes={"w": (100, 100)})
    got = merged("dare", [d], base=base, options={"density": 0.3, "rescale": False})
    change = got.entries["w"] - base.entries["w"]
    delta = d.entries["w"] - base.entries["w"]
    kept = change != 0
    assert_close(change[kept], delta[kept])
    assert abs(float(kept.float().mean()) - 0.3) < 0.02  # 10,000 Bernoulli(0.3) draws


def test_a_dare_mask_depends_on_its_entry_not_on_the_others() -> None:
    base, ds = fine_tuned(2, seed=15)
    full = merged("dare", ds, base=base, options={"density": 0.5, "seed": 1})
    only = {"c.weight": SHAPES["c.weight"]}
    sub_base = TensorDict({"c.weight": base.entries["c.weight"]})
    sub = [TensorDict({"c.weight": d.entries["c.weight"]}) for d in ds]
    alone = merged("dare", sub, base=sub_base, options={"density": 0.5, "seed": 1})
    assert list(only) == list(alone.entries)
    assert torch.equal(alone.entries["c.weight"], full.entries["c.weight"])


def test_merges_keep_the_base_dtype_and_compute_in_float32() -> None:
    base, ds = fine_tuned(2, seed=16)
    half = TensorDict({n: t.bfloat16() for n, t in base.entries.items()})
    got = merged("task_arithmetic", ds, base=half)
    for n in SHAPES:
        assert got.entries[n].dtype == torch.bfloat16
        want = reference_task_vectors(half.entries[n].float(), [d.entries[n] for d in ds], [1.0, 1.0])
        assert torch.equal(got.entries[n], want.bfloat16())


# -- weights near float32's limits ----------------------------------------------------------------------------


@pytest.fixture(params=["native", "torch"])
def sum_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Average and linear merges on the native kernel (where it is built) and on torch's loop."""
    if request.param == "native" and not weighted_sum.active():
        pytest.skip(f"merges run on {weighted_sum.native_state()}")
    if request.param == "torch":
        monkeypatch.setattr(weighted_sum, "_NATIVE", None)
    return str(request.param)


NORMALISED: list[tuple[str, dict[str, object]]] = [
    ("average", {}), ("linear", {}), ("task_arithmetic", {"normalize": True}), ("ties", {"density": 1.0}),
    ("dare", {"density": 1.0, "normalize": True}), ("dare", {"density": 1.0, "consensus": True, "normalize": True}),
]
"""Every method whose result is divided by the weights' sum; with a base of zeros, density 1 and
positive entries, each is the weighted mean sum w x / sum w."""


def normalised(method: str, options: dict[str, object], ds: Sequence[TensorDict], w: Sequence[float]) -> TensorDict:
    """`method` over ds with weights w, against a base of zeros for the methods that take one."""
    base = TensorDict({n: torch.zeros_like(t) for n, t in ds[0].entries.items()}) if merging.METHODS[method].base else None
    return merged(method, ds, base=base, weights=list(w), options=options)


def weighted_mean(ds: Sequence[TensorDict], w: Sequence[float], name: str) -> torch.Tensor:
    """The oracle: sum w x / sum w in float64, which holds float32's weights and their sums exactly enough."""
    return sum((wi * d.entries[name].double() for wi, d in zip(w, ds)), torch.zeros(1, dtype=torch.float64)) / sum(w)


@pytest.mark.parametrize("w", [[1e38, 1e38], [3e38, 3e38], [3e38, 1.0], [1e-50, 1e-50], [3e38, 2e38, 1e-3]], ids=str)
@pytest.mark.parametrize(("method", "options"), NORMALISED, ids=lambda v: v if isinstance(v, str) else None)
def test_weights_up_to_float32s_largest_give_the_weighted_mean(
    sum_path: str, method: str, options: dict[str, object], w: list[float]
) -> None:
    """The sum of w x used to be taken in float32 before the division: [1e38, 1e38] gave inf,
    [3e38, 3e38] NaN, [3e38, 1] [1, inf], and weights below float32's smallest 0 / 0."""
    xs = [[1.0, 2.0], [3.0, 4.0], [5.0, 0.5]][: len(w)]
    ds = [TensorDict({"w": torch.tensor(x)}) for x in xs]
    got = normalised(method, options, ds, w).entries["w"]
    torch.testing.assert_close(got.double(), weighted_mean(ds, w, "w"), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("method", "options"), NORMALISED, ids=lambda v: v if isinstance(v, str) else None)
def test_weights_times_a_power_of_two_give_the_same_bits(
    sum_path: str, method: str, options: dict[str, object]
) -> None:
    """The rescaling is exact: weights times 2^126 (near float32's largest) or 2^-140 (below its
    normal numbers) give the bits of the weights themselves."""
    ds = [TensorDict({n: t.abs() for n, t in d.entries.items()}) for d in dicts(3, seed=21)]
    w = [0.5, 3.0, 1e-3]
    want = normalised(method, options, ds, w)
    for scale in (2.0**126, 2.0**-140):
        got = normalised(method, options, ds, [wi * scale for wi in w])
        for name in SHAPES:
            assert torch.equal(got.entries[name].view(torch.int32), want.entries[name].view(torch.int32)), (scale, name)


def torch_mean(xs: Sequence[torch.Tensor], w: Sequence[float], divide: bool = True) -> torch.Tensor:
    """Today's float32 formula, written out with torch: w0 x0, then add_ with alpha, then div_ by sum w."""
    acc = torch.mul(xs[0], w[0])
    for x, wi in zip(xs[1:], w[1:]):
        acc.add_(x, alpha=wi)
    return acc.div_(sum(w)) if divide else acc


@pytest.mark.parametrize("w", [[1.0, 1.0, 1.0], [1.0, 0.5, 3.0], [1e-3, 1.0, 3.0], [600.0, 300.0, 100.0]], ids=str)
@pytest.mark.parametrize(("method", "options"), [("average", {}), ("linear", {}), ("linear", {"normalize": False})],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_ordinary_weights_keep_the_bits_of_torchs_float32_formula(
    sum_path: str, method: str, options: dict[str, object], w: list[float]
) -> None:
    """Differential tests compare averages with torch's swa_utils and peers' formulas bit for bit:
    weights of ordinary size are used as given, so the rescaling changes nothing for them."""
    ds = dicts(3, seed=22, shapes={**SHAPES, "big": (100_000,)})
    got = merged(method, ds, weights=w, options=options)
    for name in got.entries:
        want = torch_mean([d.entries[name] for d in ds], w, divide=options.get("normalize", True) is True)
        assert torch.equal(got.entries[name].view(torch.int32), want.view(torch.int32)), name


def test_task_arithmetic_with_ordinary_weights_keeps_its_float32_bits() -> None:
    """base + lam * sum w (x - base) / sum w, as the server has always computed it in float32."""
    base, ds = fine_tuned(3, seed=23)
    w = [1.0, 0.5, 1e-3]
    got = merged("task_arithmetic", ds, base=base, weights=w, options={"lam": 0.7, "normalize": True})
    for name, b in base.entries.items():
        acc = torch.zeros_like(b)
        for wi, d in zip(w, ds):
            acc.add_((d.entries[name] - b).mul_(wi))
        want = acc.div_(sum(w)).mul_(0.7).add_(b)
        assert torch.equal(got.entries[name].view(torch.int32), want.view(torch.int32)), name


def test_a_large_entry_with_weights_near_float32s_largest_is_the_weighted_mean(
    sum_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100,000 elements, summed by the native kernel in one pass (torch's loop is made to fail on that
    path, so it cannot stand in) or by torch's loop."""
    if sum_path == "native":
        def no_torch(*args: object, **kwargs: object) -> None:
            raise AssertionError("the native kernel should have taken this sum")
        monkeypatch.setattr(weighted_sum, "by_torch", no_torch)
    ds = dicts(3, seed=24, shapes={"big": (100_000,)})
    for w in ([3e38, 3e38, 3e38], [3e38, 1e38, 1.0]):
        got = merged("average", ds, weights=w).entries["big"]
        torch.testing.assert_close(got.double(), weighted_mean(ds, w, "big"), rtol=1e-5, atol=1e-6)


def test_rescaled_weights_divide_the_normalised_entries_and_leave_the_plain_ones(sum_path: str) -> None:
    """normalize=False for one pattern: that entry is sum w x with the weights as given (here within
    float32's range), the others the mean, which [2e38, 2e38] used to turn into x / inf = 0."""
    a = TensorDict({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 0.25])})
    b = TensorDict({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([-0.25, 0.25])})
    got = merged("linear", [a, b], weights=[2e38, 2e38], per_tensor=[("b", [("normalize", False)])])
    assert got.entries["w"].tolist() == [2.0, 3.0]
    torch.testing.assert_close(got.entries["b"], torch.tensor([0.25, 0.5]) * 2e38, rtol=1e-6, atol=0)


def test_where_the_weights_that_counted_cancel_ties_divides_by_one_given_weight() -> None:
    """Both contributions agree with the elected sign but their weights, 1 and -1, sum to 0: the sum is
    divided by 1 (of the given weights) whatever the weights' scale, rescaled or not."""
    base = TensorDict({"x": torch.zeros(1)})
    a, b = TensorDict({"x": torch.ones(1)}), TensorDict({"x": -torch.ones(1)})
    for scale in (1.0, 2.0**100, 2.0**-100):
        got = merged("ties", [a, b], base=base, weights=[scale, -scale], options={"density": 1.0})
        assert got.entries["x"].tolist() == [2 * scale], scale


# -- what a plan reserves -------------------------------------------------------------------------------------


F32 = 4


@pytest.mark.parametrize(("method", "kw", "buffers", "internal"), [
    ("average", {}, 0, 0),  # accumulates in the result itself
    ("linear", {"options": {"normalize": False}}, 0, 0),
    ("slerp", {"options": {"t": 0.5}}, 2, 2 * 8),  # v0, v1; a float64 chunk of each for the angle
    ("task_arithmetic", {"base": True}, 1, 0),  # the delta
    # delta, |delta|, election, divisor; kthvalue's copy and index, where the native selection is off
    ("ties", {"base": True, "options": {"density": 0.5}}, 4, 0 if selection.active() else F32 + 8),
    ("dare", {"base": True, "options": {"density": 0.5}}, 2, 0),  # delta, mask
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_plan_reserves_the_result_and_the_largest_entrys_scratch(
    method: str, kw: dict[str, object], buffers: int, internal: int
) -> None:
    base, ds = fine_tuned(2 if method == "slerp" else 3)
    if kw.pop("base", False):
        kw["base"] = base
    p = plan_of(method, ds, **kw)
    largest = max(math.prod(s) for s in SHAPES.values())  # a.weight, 30 elements
    total = sum(math.prod(s) for s in SHAPES.values())
    bool_mask = largest if method == "ties" else 0
    assert p.buffer_bytes() == buffers * largest * F32 + bool_mask
    sums = merging.SLERP_SUMS if method == "slerp" else 0  # the angle's float64 sums and dot products
    assert footprint.merge_bytes(p) == {"cpu": total * F32 + buffers * largest * F32 + bool_mask + internal * largest + sums}


@pytest.mark.parametrize("native", [True, False], ids=["native selection", "kthvalue"])
def test_a_ties_plan_reserves_kthvalues_copy_and_index_only_where_kthvalue_selects(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the native selection, which allocates nothing, takes kthvalue's place wherever it is
    on: the plan reserved kthvalue's copy of the values and int64 index there too (found by review)."""
    if native and not selection.active():
        pytest.skip(f"TIES trims run on {selection.native_state()}")
    if not native:
        monkeypatch.setattr(selection, "_SELECT", None)
    base, ds = fine_tuned(3)
    p = plan_of("ties", ds, base=base, options={"density": 0.5})
    largest = max(math.prod(s) for s in SHAPES.values())
    assert max(slot.internal for slot in p.slots) == (0 if native else largest * (F32 + 8))
    kept = plan_of("ties", ds, base=base, options={"density": 1.0})  # no trim: nothing selected either way
    assert max(slot.internal for slot in kept.slots) == 0


@pytest.mark.parametrize("native", [True, False], ids=["native selection", "kthvalue"])
@pytest.mark.parametrize(("density", "normalize", "aside"), [
    (0.5, False, "kthvalue"),  # |delta| for kthvalue and the torch trim; the native kernels need none
    (1.0, False, ""),  # no trim, no divisor: nothing ever goes aside
    (0.5, True, "always"),  # each delta's sign, for the divisor
    (1.0, True, "always"),
], ids=["trim", "no trim", "trim, normalized", "no trim, normalized"])
def test_a_ties_plan_reserves_the_aside_buffer_only_where_its_kernel_takes_it(
    native: bool, density: float, normalize: bool, aside: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIES without normalize on the native selection reserved a work-dtype buffer of its largest entry
    for |delta| that only torch's selection and trim use: a merge that fitted was refused (found by
    review). The kernel carves exactly the buffers
    the plan reserved (its results: `test_ties_trims_elects_signs_and_averages_the_agreeing_deltas`)."""
    if native and not selection.active():
        pytest.skip(f"TIES trims run on {selection.native_state()}")
    if not native:
        monkeypatch.setattr(selection, "_SELECT", None)
    base, ds = fine_tuned(3)
    options = {"density": density, "normalize": normalize}
    p = plan_of("ties", ds, base=base, options=options)
    largest = max(math.prod(s) for s in SHAPES.values())
    takes = aside == "always" or (aside == "kthvalue" and not native)
    buffers = 2 + normalize + takes  # delta, election, the divisor with normalize, and aside
    assert p.buffer_bytes() == buffers * largest * F32 + largest  # and the bool mask
    carved: list[int] = []
    real_take = merging.Scratch.take

    def take(self: merging.Scratch, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        view = real_take(self, shape, dtype)
        carved.append(self.offset)
        return view

    monkeypatch.setattr(merging.Scratch, "take", take)
    merging.run(p, ds, base=base)
    assert max(carved) == p.buffer_bytes()  # every buffer the plan reserved, and no byte past them


@pytest.mark.parametrize(("numel", "dtype", "chunks"), [
    (2 * merging.SLERP_CHUNK, torch.float32, 2 * merging.SLERP_CHUNK * 8),  # one float64 chunk each, not the whole
    (30, torch.float64, 0),  # the chunks are views of the float64 work tensors
], ids=["large float32", "float64"])
def test_slerp_reserves_a_float64_chunk_of_each_tensor_for_its_angle(
    numel: int, dtype: torch.dtype, chunks: int
) -> None:
    ds = [TensorDict({"x": torch.zeros(numel, dtype=dtype)}) for _ in range(2)]
    p = plan_of("slerp", ds, options={"t": 0.5})
    size = dtype.itemsize * numel
    assert footprint.merge_bytes(p) == {"cpu": size + 2 * size + chunks + merging.SLERP_SUMS}  # and its sums' scalars


def test_averaging_bfloat16_reserves_an_accumulator_and_a_cast_buffer() -> None:
    ds = dicts(2)
    for d in ds:
        d.entries["a.weight"] = d.entries["a.weight"].bfloat16()
    p = plan_of("average", ds)
    assert p.buffer_bytes() == 2 * 30 * F32  # float32 accumulator and cast of the bf16 a.weight
    assert footprint.merge_bytes(p) == {"cpu": 30 * 2 + (6 + 18) * F32 + 2 * 30 * F32}


def test_into_reserves_only_scratch() -> None:
    ds = dicts(2)
    p = plan_of("average", ds, into=ds[0])
    assert footprint.merge_bytes(p) == {"cpu": 30 * F32}  # each entry's accumulator, apart from the input it overwrites


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("method", "options"), [
    ("average", {}), ("linear", {}), ("slerp", {"t": 0.3}), ("slerp", {"t": 0.3, "vectors": "rows"}),
    ("slerp", {"t": 0.3, "vectors": "columns"}), ("task_arithmetic", {}), ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "normalize": True}), ("dare", {"density": 0.5, "seed": 1}),
    ("dare", {"density": 0.5, "consensus": True, "normalize": True, "seed": 1}),
    ("dare", {"density": 0.5, "seed": 1, "rescale_norm": "l1"}),
    ("dare", {"density": 0.5, "seed": 1, "rescale_norm": "linf", "consensus": True}),
    ("model_stock", {}), ("model_stock", {"filter_wise": True}),
    ("breadcrumbs", {"density": 0.5}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "consensus": True, "normalize": True}),
    ("multislerp", {}), ("multislerp", {"normalize": False}),
    ("ties", {"density": 0.3, "rescale": True}), ("breadcrumbs", {"density": 0.5, "rescale": True, "rescale_norm": "l2"}),
    ("della", {"density": 0.5, "epsilon": 0.2}), ("della", {"density": 0.5, "consensus": True, "normalize": True,
                                                             "rescale_norm": "l1"}),
    ("karcher", {}), ("karcher", {"tol": 0.0, "max_iter": 3}), ("sce", {}), ("sce", {"select_topk": 0.3}),
    ("nearswap", {"t": 0.05}), ("ram", {"epsilon": 0.08}), ("ram", {"epsilon": 0.08, "r": 0.3}), ("arcee_fusion", {}),
])
def test_on_the_cpu_a_merge_allocates_no_more_than_its_plan_reserves(
    method: str, options: dict[str, object], dtype: torch.dtype
) -> None:
    """Every storage a merge makes, under torch's dispatch (`footprint._PeakBytes`), within its plan:
    slerp's sums and dot products were 72 bytes over (found by review)."""
    for kernel in (lerp, weighted_sum, selection):
        kernel.native_state()  # each kernel's one check against torch, which a server runs as it starts
    for shapes in ({"w": (300, 200), "b": (300,)}, {"w": (3, 4), "b": (7,)}, {"e": (70000, 3), "big": (2, 70000)}):
        base, ds = fine_tuned({"slerp": 2, "nearswap": 1, "arcee_fusion": 1}.get(method, 3), shapes=shapes)
        cast = lambda d: TensorDict({n: t.to(dtype) for n, t in d.entries.items()})  # noqa: E731
        base, ds = cast(base), [cast(d) for d in ds]
        with_base = base if merging.METHODS[method].base else None
        if method == "multislerp" and options.get("normalize") is False:
            with_base = base  # the base-relative form, with its offset buffer
        p = plan_of(method, ds, base=with_base, options=options)
        meter = footprint._PeakBytes()
        with meter:
            merging.run(p, ds, base=with_base)
        assert meter.peak <= footprint.merge_bytes(p)["cpu"], shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_merge_allocates_no_more_than_its_plan_reserves() -> None:
    base, ds = fine_tuned(4, shapes={"w": (1024, 1024), "b": (1024,), "v": (512, 256)})
    to = lambda d: TensorDict({n: t.cuda() for n, t in d.entries.items()})  # noqa: E731
    base, ds = to(base), [to(d) for d in ds]
    for method, kw in (("average", {}), ("ties", {"base": base, "options": {"density": 0.3}}),
                       ("dare", {"base": base, "options": {"density": 0.3, "consensus": True}}),
                       ("breadcrumbs", {"base": base, "options": {"density": 0.3, "gamma": 0.1, "consensus": True}}),
                       ("model_stock", {"base": base, "options": {"filter_wise": True}}),
                       ("multislerp", {"base": base}),
                       ("della", {"base": base, "options": {"density": 0.4, "consensus": True, "rescale_norm": "l1"}}),
                       ("karcher", {}), ("sce", {"base": base, "options": {"select_topk": 0.3}}),
                       ("nearswap", {"base": base, "options": {"t": 0.05}}),
                       ("ram", {"base": base, "options": {"epsilon": 0.08, "r": 0.3}}), ("arcee_fusion", {"base": base})):
        one = method in ("nearswap", "arcee_fusion")
        p = plan_of(method, ds[:1] if one else ds, **kw)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        got = merging.run(p, ds, base=kw.get("base"))  # type: ignore[arg-type]
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - start <= footprint.merge_bytes(p)["cuda:0"] + (1 << 20), method
        back = [TensorDict({n: t.cpu() for n, t in d.entries.items()}) for d in (ds[:1] if one else ds)]
        on_cpu = merged(method, back, **{**kw, "base": TensorDict({n: t.cpu() for n, t in base.entries.items()})}
                        if "base" in kw else kw)
        for name, t in on_cpu.entries.items():  # the CPU's numbers (DARE's and DELLA's draws differ by device)
            if method not in ("dare", "della"):
                assert_close(got.entries[name].cpu(), t, tol=1e-5)


# -- flat dictionaries summed as spans (every merge on CUDA; the CPU's without the native kernel) --------------


def flat_dicts(count: int, seed: int = 0, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[TensorDict]:
    """Dictionaries laid out as copyparms makes them: each one's entries back to back in one buffer."""
    out = []
    for d in dicts(count, seed, shapes=shapes):
        copies = flat.flat_copies(list(d.entries.values()), lambda t: (t.device, t.dtype))
        out.append(TensorDict(dict(zip(d.entries, copies))))
    assert all(flat.is_flat(list(d.entries.values())) for d in out)
    return out


def entry_by_entry(ds: Sequence[TensorDict], weights: Sequence[float], divisor: float | None) -> dict[str, torch.Tensor]:
    """torch's operations one entry at a time, in separate tensors: what the server did before spans."""
    want = {}
    for name in ds[0].entries:
        acc = torch.empty_like(ds[0].entries[name]).clone()
        weighted_sum.by_torch(acc, [d.entries[name].clone() for d in ds], weights, divisor)
        want[name] = acc
    return want


@pytest.fixture
def sum_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Merges on torch's operations (as on CUDA), counting the weighted sums they run: one per span or entry."""
    monkeypatch.setattr(weighted_sum, "_NATIVE", None)
    calls: list[int] = []
    real = weighted_sum.by_torch

    def counted(acc: torch.Tensor, *args: object, **kwargs: object) -> None:
        calls.append(acc.numel())
        real(acc, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(weighted_sum, "by_torch", counted)
    return calls


ODD_SHAPES = {f"l{i}.weight": (7 + i, 13) for i in range(12)} | {"last.bias": (5,)}
"""Odd sizes, so spans and entries split into vector lanes differently: the bits must not notice."""


@pytest.mark.parametrize(("method", "options", "weights", "divides"), [
    ("average", {}, [1.0, 2.0, 3.5], True), ("average", {}, [3e38, 2e38, 1e-3], True),
    ("linear", {"normalize": False}, [0.3, -1.25, 2.0], False), ("linear", {}, [0.3, 1.25, 2.0], True),
])
def test_a_flat_merge_is_one_weighted_sum_per_span_with_each_entrys_bits(
    sum_calls: list[int], method: str, options: dict[str, object], weights: list[float], divides: bool
) -> None:
    ds = flat_dicts(3, shapes=ODD_SHAPES)
    scaled = merging.normalizing(tuple(weights))[0] if divides else tuple(weights)
    want = entry_by_entry(ds, scaled, sum(scaled) if divides else None)
    sum_calls.clear()
    got = merged(method, ds, weights=weights, options=options)
    assert sum_calls == [sum(math.prod(s) for s in ODD_SHAPES.values())]  # one span, not 13 entries
    for name, t in want.items():
        assert torch.equal(got.entries[name], t), name
    into = flat_dicts(1, seed=5, shapes=ODD_SHAPES)[0]
    sum_calls.clear()
    merged(method, ds, weights=weights, options=options, into=into)
    assert len(sum_calls) == 1
    for name, t in want.items():
        assert torch.equal(into.entries[name], t), name


def test_into_one_of_its_flat_inputs_goes_entry_by_entry_and_reads_before_writing(sum_calls: list[int]) -> None:
    """A span would write the result's first term over an input it still has to read."""
    ds = flat_dicts(3)
    want = {n: (ds[0].entries[n] + 2 * ds[1].entries[n] + ds[2].entries[n]) / 4 for n in SHAPES}
    merged("average", ds, weights=[1.0, 2.0, 1.0], into=ds[1])
    assert len(sum_calls) == len(SHAPES)
    for name in SHAPES:
        assert_close(ds[1].entries[name], want[name])


def test_flat_inputs_of_another_dtype_or_shape_go_entry_by_entry(sum_calls: list[int]) -> None:
    low = flat_dicts(2)
    low[1] = TensorDict({n: t.bfloat16() for n, t in low[1].entries.items()})  # back to back, in bfloat16
    got = merged("average", low)
    assert len(sum_calls) == len(SHAPES)
    for name in SHAPES:
        assert_close(got.entries[name], (low[0].entries[name] + low[1].entries[name].float()) / 2)
    sum_calls.clear()
    rows = flat_dicts(2, shapes={"a": (4, 3), "b": (4, 3)})
    wide = rows[1]
    wide.entries["a"] = wide.entries["a"][:1]  # broadcast from one row: the run breaks there
    got = merged("average", rows)
    assert len(sum_calls) == 2
    assert_close(got.entries["a"], (rows[0].entries["a"] + wide.entries["a"]) / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_flat_merge_on_cuda_is_one_span_with_each_entrys_bits(sum_calls: list[int]) -> None:
    shapes = {f"l{i}.weight": (400, 400) for i in range(16)} | {"odd": (7, 13)}
    ds = [TensorDict({n: t.cuda() for n, t in d.entries.items()}) for d in flat_dicts(8, shapes=shapes)]
    ds = [TensorDict(dict(zip(d.entries, flat.flat_copies(list(d.entries.values()), lambda t: (t.device, t.dtype)))))
          for d in ds]
    weights = [float(w) for w in range(1, 9)]
    want = entry_by_entry(ds, weights, sum(weights))
    sum_calls.clear()
    got = merged("average", ds, weights=weights)
    assert len(sum_calls) == 1
    for name, t in want.items():
        assert got.entries[name].is_cuda and torch.equal(got.entries[name], t), name


def random_layout(seed: int) -> tuple[list[TensorDict], TensorDict | None, str, list[float], list[tuple[str, object]]]:
    """Dictionaries laid out at random, the same for a seed: each one flat (in the names' order or
    another), flat with gaps, or a tensor per entry, in float32 or float64 (now and then one bfloat16
    or transposed entry), odd and empty shapes, a dictionary given twice; `into` none, a flat
    dictionary of its own, one of the inputs, or one that shares an input's storage one element on
    (refused, or summed through scratch where it overlaps only its own name); weights that need
    rescaling, negative ones for linear without normalize."""
    g = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=g))

    names = [f"e{i}" for i in range(2 + pick(5))]
    shapes = {n: ((5, 3), (17,), (0,), (1,), (2, 9), ())[pick(6)] for n in names}
    dtype = (torch.float32, torch.float64)[pick(2)]

    def layout() -> TensorDict:
        kind = dtype if pick(6) else (torch.float32, torch.float64, torch.bfloat16)[pick(3)]
        values = {n: torch.randn(shapes[n], generator=g, dtype=torch.float64).to(kind) for n in names}
        mode = (0, 0, 0, 1, 2, 3)[pick(6)]
        if mode == 3:
            return TensorDict(values)  # a tensor per entry
        order = names if mode == 0 else [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
        gaps = [pick(3) if mode == 2 else 0 for _ in order]
        buffer = torch.randn(1 + sum(gaps) + sum(math.prod(shapes[n]) for n in order), generator=g).to(kind)
        at, entries = 1, {}
        for n, gap in zip(order, gaps):
            at += gap
            entries[n] = buffer[at:at + math.prod(shapes[n])].view(shapes[n]).copy_(values[n])
            at += math.prod(shapes[n])
        if pick(8) == 0:
            odd = names[pick(len(names))]
            entries[odd] = entries[odd].bfloat16() if pick(2) else entries[odd].t().contiguous().t()
        return TensorDict({n: entries[n] for n in names})

    ds = [layout() for _ in range(1 + pick(4))]
    if len(ds) > 1 and pick(3) == 0:
        ds[1] = ds[0]
    into: TensorDict | None = None
    choice = (0, 1, 1, 2, 2, 3)[pick(6)]
    if choice == 1:
        into = TensorDict(dict(zip(names, flat.flat_copies([layout().entries[n] for n in names]))))
    elif choice == 2:
        into = ds[pick(len(ds))]
    elif choice == 3:
        source = ds[pick(len(ds))].entries
        into = TensorDict({
            n: torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset() + 1, t.shape, t.stride())
            if t.is_contiguous() and t.numel() and (t.storage_offset() + 1 + t.numel()) * t.element_size()
            <= t.untyped_storage().nbytes() else torch.zeros(t.shape, dtype=t.dtype)
            for n, t in source.items()
        })
    method = ("average", "linear")[pick(2)]
    scale = (1.0, 3e38, 1e-30)[pick(3)]
    weights = [scale * (1.0 + pick(4)) * (-1.0 if method == "linear" and pick(3) == 0 else 1.0) for _ in ds]
    options: list[tuple[str, object]] = [("normalize", bool(pick(2)))] if method == "linear" else []
    if method == "linear" and options[0][1] and sum(weights) == 0:
        weights[0] *= 2
    return ds, into, method, weights, options


def run_layout(seed: int) -> tuple[dict[str, torch.Tensor] | str, list[dict[str, torch.Tensor]]]:
    """A random layout merged: the result (or the refusal) and every input afterwards."""
    ds, into, method, weights, options = random_layout(seed)
    try:
        p = merging.plan(merging.METHODS[method], ds, weights=weights, into=into, kwargs=options)  # type: ignore[arg-type]
    except InvalidArgument as exc:
        return str(exc), []
    out = merging.run(p, ds, into=into)
    return {n: t.clone() for n, t in out.entries.items()}, unchanged(ds)


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t

    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(raw(a[n]), raw(b[n])) for n in a)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_spans_give_every_random_layout_the_bits_and_refusals_it_gets_entry_by_entry(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """Spans against the same merges with `_span_sums` off (entry by entry, as before spans) over
    random layouts: the same refusals, the same bits in the result and every input, whether the
    result is new, flat `into`, an input, or shares an input's storage."""
    if not native:
        monkeypatch.setattr(weighted_sum, "_NATIVE", None)
    spanned = 0
    real = merging._span_sums

    def counted(*args: object) -> set[int]:
        nonlocal spanned
        taken = real(*args)  # type: ignore[arg-type]
        spanned += bool(taken)
        return taken

    for seed in range(200):
        monkeypatch.setattr(merging, "_span_sums", counted)
        got, inputs = run_layout(seed)
        monkeypatch.setattr(merging, "_span_sums", lambda *args: set())
        want, inputs_want = run_layout(seed)
        if isinstance(want, str) or isinstance(got, str):
            assert got == want, seed
            continue
        assert same_bits(got, want), seed
        assert all(same_bits(a, b) for a, b in zip(inputs, inputs_want)), seed
    assert spanned >= (10 if not native else 0)  # the layouts do reach the span path


def test_a_division_off_the_cpu_is_by_a_device_scalar_not_a_cpu_float() -> None:
    """CUDA divides by a CPU scalar as a multiplication by its reciprocal, one bit off the CPU's
    quotient; a 0-dim tensor on the device is divided by. Meta stands for a device here."""
    on_meta = weighted_sum.true_divisor(torch.empty(3, device="meta"), 36.0)
    assert isinstance(on_meta, torch.Tensor)
    assert on_meta.device.type == "meta" and on_meta.dim() == 0 and on_meta.dtype == torch.float32
    assert weighted_sum.true_divisor(torch.empty(3, dtype=torch.float64), 36.0) == 36.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flat_inputs", [True, False], ids=["flat", "per-entry"])
def test_a_mean_on_cuda_has_the_cpus_bits(monkeypatch: pytest.MonkeyPatch, flat_inputs: bool) -> None:
    """The CPU's torch path (no native kernel) and CUDA compute the same mul, add_ and true division."""
    monkeypatch.setattr(weighted_sum, "_NATIVE", None)
    shapes = {f"l{i}.weight": (300, 7 + i) for i in range(8)}
    cpu = flat_dicts(8, shapes=shapes) if flat_inputs else dicts(8, shapes=shapes)
    gpu = [TensorDict({n: t.cuda() for n, t in d.entries.items()}) for d in cpu]
    if flat_inputs:  # laid out as copyparms lays them on the device: one span for the whole merge
        gpu = [TensorDict(dict(zip(d.entries, flat.flat_copies(list(d.entries.values()), lambda t: (t.device, t.dtype)))))
               for d in gpu]
    weights = [float(w) for w in range(1, 9)]  # a sum of 36: 1/36 is not exact
    want, got = merged("average", cpu, weights=weights), merged("average", gpu, weights=weights)
    for name, t in want.entries.items():
        differ = int((got.entries[name].cpu() != t).sum())
        assert differ == 0, f"{name}: {differ} of {t.numel()} elements differ from the CPU's"


# -- kept plans ------------------------------------------------------------------------------------------


def test_the_same_call_over_unchanged_dictionaries_reuses_its_plan_and_its_runs() -> None:
    ds, into = dicts(3, seed=40), dicts(1, seed=41)[0]
    first = plan_of("average", ds, weights=[1.0, 2.0, 3.0], into=into)
    merging.run(first, ds, into=into)
    assert len(first.fused) == 1  # the runs over `into` and the inputs, found once
    again = plan_of("average", ds, weights=[1.0, 2.0, 3.0], into=into)
    assert again is first
    for d in ds:  # values written in place change no plan, and the kept one sums the new values
        for t in d.entries.values():
            t.mul_(-2.0)
    merging.run(plan_of("average", ds, weights=[1.0, 2.0, 3.0], into=into), ds, into=into)
    assert len(first.fused) == 1
    for name in SHAPES:
        want = sum(w * d.entries[name] for w, d in zip([1.0, 2.0, 3.0], ds)) / 6.0
        assert_close(into.entries[name], want)


@pytest.mark.parametrize("change", ["weights", "option", "into", "order", "base", "gradient", "tensor_weights"])
def test_another_call_makes_another_plan(change: str) -> None:
    base, ds = fine_tuned(2, seed=42)
    into, other = dicts(2, seed=43)
    kw: dict[str, object] = {"weights": [1.0, 2.0], "into": into}
    method = "ties" if change == "base" else "linear"
    if method == "ties":
        kw = {"base": base, "options": {"density": 0.5}}
    first = plan_of(method, ds, **dict(kw))
    changed = dict(kw)
    if change == "weights":
        changed["weights"] = [2.0, 1.0]
    elif change == "option":
        changed["options"] = {"normalize": False}
    elif change == "into":
        changed["into"] = other
    elif change == "order":
        ds = [ds[0], ds[0]]
    elif change == "gradient":
        changed["weights"] = [(1.0, 3.0), 2.0]
    elif change == "tensor_weights":
        changed["tensor_weights"] = [("a.*", [2.0, 1.0])]
    else:
        changed["base"] = fine_tuned(2, seed=44)[0]
    assert plan_of(method, ds, **changed) is not first


def test_a_changed_dictionary_is_checked_again_and_a_bad_change_refused() -> None:
    ds, into = dicts(2, seed=45), dicts(1, seed=46)[0]
    first = plan_of("average", ds, into=into)
    ds[1].entries["a.bias"] = torch.zeros(7)  # the entry replaced as an upload replaces it
    ds[1].changed()
    with pytest.raises(InvalidArgument, match="a.bias"):
        plan_of("average", ds, into=into)
    ds[1].entries["a.bias"] = torch.zeros(6)
    ds[1].changed()
    second = plan_of("average", ds, into=into)
    assert second is not first
    merging.run(second, ds, into=into)
    assert_close(into.entries["a.bias"], ds[0].entries["a.bias"] / 2)


def test_an_entry_moved_without_a_new_version_is_checked_again() -> None:
    """The data pointers guard what the version does not: a tensor whose data was swapped in place,
    or an entry replaced without `changed()`, makes a new plan whose runs are found afresh."""
    ds, into = dicts(2, seed=47), dicts(1, seed=48)[0]
    first = plan_of("average", ds, into=into)
    merging.run(first, ds, into=into)
    into.entries["c.weight"].data = torch.zeros(3, 6)  # same tensor object, other memory, same version
    second = plan_of("average", ds, into=into)
    assert second is not first and not second.fused
    merging.run(second, ds, into=into)
    assert_close(into.entries["c.weight"], (ds[0].entries["c.weight"] + ds[1].entries["c.weight"]) / 2)
    ds[0].entries["a.weight"] = torch.ones(6, 5)  # replaced behind the version's back
    assert plan_of("average", ds, into=into) is not second


def test_a_freed_dictionary_ends_the_plan_kept_with_it() -> None:
    ds, into = dicts(2, seed=49), dicts(1, seed=50)[0]
    first = plan_of("average", ds, into=into)
    del into
    into = dicts(1, seed=50)[0]  # perhaps at the same address, but another object
    assert plan_of("average", ds, into=into) is not first


def test_live_views_are_checked_on_every_call() -> None:
    module = torch.nn.Linear(5, 6)
    view = TensorDict(dict(module.named_parameters()), live=True)
    ds = dicts(2, seed=51, shapes={"weight": (6, 5), "bias": (6,)})
    first = plan_of("average", ds, into=view)
    assert plan_of("average", ds, into=view) is not first
    assert merging.plan is not merging.check and plan_of("average", [view, *ds]) is not plan_of("average", [view, *ds])


# -- gradients (mergekit's lists of values over the layers) ----------------------------------------------


def mergekit_value(values: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers at t (config.py), transcribed."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def test_layer_fractions_place_entries_as_mergekits_planner_does() -> None:
    """Layer i of n at i / (n - 1); what comes before the layers and after them at 0 (mergekit plans its
    pre- and post-weights at the module's start; tests/test_mergekit.py runs mergekit itself); layers
    numbered with gaps count in order."""
    names = ["model.embed.weight", *[f"model.layers.{i}.{k}.weight" for i in (0, 1, 2, 5) for k in ("q", "mlp")],
             "model.norm.weight", "lm_head.weight"]
    got = merging.layer_fractions(names)
    assert got["model.embed.weight"] == got["model.norm.weight"] == got["lm_head.weight"] == 0.0
    assert [got[f"model.layers.{i}.q.weight"] for i in (0, 1, 2, 5)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert merging.layer_fractions(["0.weight", "0.bias", "2.weight"]) == {"0.weight": 0.0, "0.bias": 0.0, "2.weight": 1.0}
    assert merging.layer_fractions(["layers.3.w", "head"]) == {"layers.3.w": 1.0, "head": 0.0}  # one layer: t = 1
    assert merging.layer_fractions(["a", "b"]) == {"a": 0.0, "b": 0.0}


def test_the_clients_placement_of_gradients_is_the_servers_bit_for_bit() -> None:
    """weightavg.mergekit writes the rule again (the domain may not import the client package, nor the
    client the server) to place gradients itself where a call covers part of a model: the two must
    agree exactly, on every kind of name list and value."""
    from weightavg import mergekit as client_side

    name_lists = [
        ["model.embed.weight", *[f"model.layers.{i}.{k}.weight" for i in (0, 1, 2, 5) for k in ("q", "mlp")],
         "model.norm.weight", "lm_head.weight"],
        ["0.weight", "0.bias", "2.weight"], ["layers.3.w", "head"], ["a", "b"], [],
        [f"blocks.{i}.attn.{j}.w" for i in range(7) for j in range(3)], [f"{i}.w" for i in (9, 3, 11, 0)],
    ]
    for names in name_lists:
        assert client_side.layer_fractions(names) == merging.layer_fractions(names), names
    g = torch.Generator().manual_seed(5)
    for values in ([0.0, 0.5, 0.3, 0.7, 1.0], [0.2], [1.0, 0.0], [0.1, 0.9, 0.4], torch.randn(9, generator=g).tolist()):
        for t in [0.0, 1.0, 1 / 3, 2 / 3, *torch.rand(50, generator=g).tolist()]:
            assert client_side.at_fraction(tuple(values), t) == merging.at_fraction(tuple(values), t)


@pytest.mark.parametrize("values", [[0.0, 0.5, 0.3, 0.7, 1.0], [0.2], [1.0, 0.0], [0.1, 0.9, 0.4]])
def test_a_gradients_value_is_mergekits(values: list[float]) -> None:
    for t in [0.0, 1.0, *torch.rand(50, generator=torch.Generator().manual_seed(3)).tolist()]:
        assert merging.at_fraction(tuple(values), t) == pytest.approx(mergekit_value(values, t), abs=1e-15)


def test_a_gradient_option_gives_each_entry_its_layers_value() -> None:
    names = ["embed", *[f"layers.{i}.w" for i in range(4)], "head"]
    dicts = [TensorDict({n: torch.randn(5) for n in names}) for _ in range(2)]
    gradient = (0.0, 0.5, 0.3, 0.7, 1.0)
    plan = merging.check(merging.METHODS["slerp"], dicts, kwargs=[("t", gradient)])
    fractions = [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0]
    assert [float_value(s.options, "t") for s in plan.slots] == pytest.approx(
        [mergekit_value(list(gradient), f) for f in fractions])
    with pytest.raises(InvalidArgument, match="'t' must be between 0 and 1"):
        merging.check(merging.METHODS["slerp"], dicts, kwargs=[("t", (0.0, 1.5))])
    with pytest.raises(InvalidArgument, match="option 'threshold' expects float"):  # a list only where mergekit takes one
        merging.check(merging.METHODS["slerp"], dicts, kwargs=[("t", 0.5), ("threshold", (0.5, 0.9))])


# -- weights by layer (mergekit's gradients) and by pattern ---------------------------------------------

LAYERED = ["embed.weight", *[f"layers.{i}.{k}" for i in range(4) for k in ("attn.weight", "mlp.weight", "mlp.bias")],
           "norm.weight", "head.weight"]
"""A transformer's names: embeddings before the layers, four layers, a norm and the head after them."""


def layered(count: int, seed: int = 0) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    return [TensorDict({n: torch.randn((6, 5) if n.endswith("weight") else (5,), generator=g) for n in LAYERED})
            for _ in range(count)]


def fraction_of(name: str) -> float:
    """mergekit's place of a LAYERED name: layer i of 4 at i / 3, the rest (before and after) at 0."""
    return int(name.split(".")[1]) / 3 if name.startswith("layers.") else 0.0


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_with_gradient_weights_gives_each_entry_the_weights_at_its_layer(
    kernels: str, normalize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mergekit's linear with `weight: [1, 0]` for one model and `[0, 1]` for the other moves from the
    first model at the embeddings to the second at the head; a constant weight mixes in a third.
    Each entry has the bits of a merge of that entry alone with its layer's weights as numbers."""
    if kernels == "torch":
        monkeypatch.setattr(weighted_sum, "_NATIVE", None)
    ds = layered(3, seed=4)
    gradients: list[merging.Weight] = [(1.0, 0.0), (0.0, 0.5, 1.0), 0.25]
    got = merged("linear", ds, weights=gradients, options={"normalize": normalize})
    for name in LAYERED:
        f = fraction_of(name)
        at = [mergekit_value([1.0, 0.0], f), mergekit_value([0.0, 0.5, 1.0], f), 0.25]
        alone = merged("linear", [TensorDict({name: d.entries[name]}) for d in ds], weights=at,
                       options={"normalize": normalize})
        assert torch.equal(got.entries[name], alone.entries[name]), name
        want = sum(w * d.entries[name].double() for w, d in zip(at, ds))
        assert_close(got.entries[name], want / (sum(at) if normalize else 1.0))
    assert torch.equal(got.entries["embed.weight"], (ds[0].entries["embed.weight"] + 0.25 * ds[2].entries["embed.weight"])
                       / (1.25 if normalize else 1.0))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_task_vector_merges_take_gradient_weights_entry_by_entry(method: str) -> None:
    base = layered(1, seed=7)[0]
    g = torch.Generator().manual_seed(8)
    ds = [TensorDict({n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.entries.items()}) for _ in range(2)]
    options: dict[str, object] = {} if method == "task_arithmetic" else {"density": 0.6}
    got = merged(method, ds, base=base, weights=[(0.2, 1.0), (1.0, 0.1, 0.6)], options=options)
    for name in LAYERED:
        f = fraction_of(name)
        at = [mergekit_value([0.2, 1.0], f), mergekit_value([1.0, 0.1, 0.6], f)]
        only = lambda d: TensorDict({name: d.entries[name]})  # noqa: E731
        alone = merged(method, [only(d) for d in ds], base=only(base), weights=at, options=options)
        assert torch.equal(got.entries[name], alone.entries[name]), name


def test_weights_by_pattern_come_from_the_first_pattern_with_weights_that_matches() -> None:
    """mergekit's `weight: [{filter: mlp, value: ...}, {value: ...}]`: the MLP entries take the first
    pattern's weights, even behind a pattern that gives options only; the rest keep the call's, and
    a pattern's weights may be gradients too."""
    ds = layered(2, seed=9)
    got = merged(
        "linear", ds, weights=[1.0, 3.0], per_tensor=[("*.bias", [("normalize", False)])],
        tensor_weights=[("*mlp*", [2.0, (0.0, 1.0)]), ("layers.*", [5.0, 5.0]), ("*mlp.bias", [9.0, 9.0])],
    )
    for name in LAYERED:
        f = fraction_of(name)
        at = [2.0, mergekit_value([0.0, 1.0], f)] if "mlp" in name else [5.0, 5.0] if name.startswith("layers.") \
            else [1.0, 3.0]
        normalize = not name.endswith("bias")
        want = merged("linear", [TensorDict({name: d.entries[name]}) for d in ds], weights=at,
                      options={"normalize": normalize})
        assert torch.equal(got.entries[name], want.entries[name]), name
    plan = plan_of("linear", ds, weights=[1.0, 3.0], tensor_weights=[("*mlp*", [2.0, (0.0, 1.0)])])
    assert {s.name: s.weights for s in plan.slots}["layers.3.mlp.weight"] == (2.0, 1.0)
    assert {s.name: s.weights for s in plan.slots}["head.weight"] == (1.0, 3.0)


def test_a_flat_merge_with_weights_by_layer_has_each_entrys_bits_in_one_native_call_per_set() -> None:
    """Entries of a flat dictionary with different weights cannot share one span's weights: each set
    of weights is summed on its own, and every entry gets the bits it gets alone."""
    shapes = {f"layers.{i}.w": (9 + i, 7) for i in range(5)} | {"head": (3,)}
    ds = flat_dicts(3, seed=2, shapes=shapes)
    weights: list[merging.Weight] = [(1.0, 2.0), 0.5, (3.0, 0.0, 1.0)]
    for options in ({}, {"normalize": False}):
        got = merged("linear", ds, weights=weights, options=options)
        for name in shapes:
            f = int(name.split(".")[1]) / 4 if name.startswith("layers.") else 0.0
            at = [mergekit_value([1.0, 2.0], f), 0.5, mergekit_value([3.0, 0.0, 1.0], f)]
            alone = merged("linear", [TensorDict({name: d.entries[name].clone()}) for d in ds], weights=at, options=options)
            assert torch.equal(got.entries[name], alone.entries[name]), (name, options)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_equal_per_dictionary_densities_are_the_density_option(method: str) -> None:
    base, ds = fine_tuned(3, seed=21)
    options: dict[str, object] = {"seed": 5} if method == "dare" else {}
    want = merged(method, ds, base=base, weights=[1.0, 0.5, 2.0], options={**options, "density": 0.35})
    got = merged(method, ds, base=base, weights=[1.0, 0.5, 2.0], options=options, densities=[0.35] * 3)
    assert all(torch.equal(got.entries[n], want.entries[n]) for n in SHAPES)


@pytest.mark.parametrize("consensus", [False, True])
def test_dare_drops_each_dictionarys_delta_at_its_own_density(consensus: bool) -> None:
    """mergekit's per-model density: each model's mask is drawn, and its delta rescaled, at its own."""
    base, ds = fine_tuned(3, seed=13)
    w, densities = [1.0, 0.6, 0.9], [0.4, 1.0, 0.7]
    options = {"seed": 42, "consensus": consensus, "normalize": consensus, "lam": 0.8}
    got = merged("dare", ds, base=base, weights=w, options=options, densities=densities)
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        keep = [dare_keep(42, i, n, tuple(b.shape), density) / density for i, density in enumerate(densities)]
        want = reference_task_vectors(b, xs, w, lam=0.8, normalize=consensus, keep=keep, consensus=consensus)
        assert_close(got.entries[n], want)


def test_densities_by_layer_and_by_pattern_give_each_entry_its_own() -> None:
    """A density gradient per dictionary (mergekit's README TIES example) and a pattern's densities: each
    entry has the bits of a TIES merge of that entry alone at its densities."""
    base = layered(1, seed=30)[0]
    g = torch.Generator().manual_seed(31)
    ds = [TensorDict({n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.entries.items()}) for _ in range(2)]
    got = merged("ties", ds, base=base, weights=[1.0, (0.0, 0.3, 0.7, 1.0)], densities=[(1.0, 0.7, 0.1), 0.5],
                 tensor_densities=[("*attn*", [0.2, (0.9, 0.4)])])
    for name in LAYERED:
        f = fraction_of(name)
        weights = [1.0, mergekit_value([0.0, 0.3, 0.7, 1.0], f)]
        densities = [0.2, mergekit_value([0.9, 0.4], f)] if "attn" in name else [mergekit_value([1.0, 0.7, 0.1], f), 0.5]
        only = lambda d: TensorDict({name: d.entries[name]})  # noqa: E731
        alone = merged("ties", [only(d) for d in ds], base=only(base), weights=weights, densities=densities)
        assert torch.equal(got.entries[name], alone.entries[name]), name
    plan = plan_of("ties", ds, base=base, densities=[(1.0, 0.1), 0.5])
    assert {s.name: s.densities for s in plan.slots}["layers.3.mlp.weight"] == (0.1, 0.5)


# -- Model Stock ---------------------------------------------------------------------------------------


def reference_model_stock(b: torch.Tensor, xs: Sequence[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock as mergekit's `model_stock` defines it (mergekit/merge_methods/model_stock.py),
    written out in float64: the offsets' mean pairwise cosine (per row of the last dimension with
    filter_wise), t = N cos / (1 + (N - 1) cos) (0 where the denominator is within 1e-6 of 0), and
    t * mean + (1 - t) * base."""
    w0, ws = b.double(), [x.double() for x in xs]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = [((a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for c in offsets[i + 1:]]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(b.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_model_stock_is_mergekits_formula(filter_wise: bool, count: int) -> None:
    shapes = {"w": (40, 30), "conv": (4, 3, 5, 5), "b": (40,), "e": (700, 1)}
    base, ds = fine_tuned(count, seed=40 + count, shapes=shapes)
    got = merged("model_stock", ds, base=base, options={"filter_wise": filter_wise})
    for name in shapes:
        want = reference_model_stock(base.entries[name], [d.entries[name] for d in ds], filter_wise)
        assert_close(got.entries[name], want, tol=2e-6)


def test_model_stock_keeps_the_base_where_offsets_cancel_and_takes_the_mean_where_they_agree() -> None:
    """Opposite offsets (cos -1, two models: 1 + (N - 1) cos = 0): the base, not a division by 0;
    orthogonal ones (cos 0): t = 0, the base; equal ones (cos 1): t = 1, the models' mean."""
    base = TensorDict({"x": torch.tensor([1.0, 2.0, 3.0])})
    offset = torch.tensor([0.5, -0.25, 1.0])
    cases = {
        "opposite": ([base.entries["x"] + offset, base.entries["x"] - offset], base.entries["x"]),
        "orthogonal": ([base.entries["x"] + torch.tensor([1.0, 0, 0]), base.entries["x"] + torch.tensor([0, 2.0, 0])],
                       base.entries["x"]),
        "equal": ([base.entries["x"] + offset, base.entries["x"] + 3 * offset], base.entries["x"] + 2 * offset),
    }
    for case, (xs, want) in cases.items():
        got = merged("model_stock", [TensorDict({"x": x}) for x in xs], base=base)
        assert_close(got.entries["x"], want)
        assert bool(got.entries["x"].isfinite().all()), case


def test_model_stock_refuses_what_it_cannot_merge() -> None:
    base, ds = fine_tuned(2)
    with pytest.raises(InvalidArgument, match="takes at least 2 dictionaries besides the base, given 1"):
        plan_of("model_stock", ds[:1], base=base)
    with pytest.raises(InvalidArgument, match="model_stock takes no weights; it weighs the models by the angle"):
        plan_of("model_stock", ds, base=base, weights=[1.0, 2.0])
    with pytest.raises(InvalidArgument, match="model_stock needs a base"):
        plan_of("model_stock", ds)
    other = TensorDict({n: t.expand(2, *t.shape).clone() if n == "a.bias" else t for n, t in ds[1].entries.items()})
    with pytest.raises(InvalidArgument, match=r"entry 'a.bias' is \[6\] in the base but \[2, 6\] in dictionary 2; "
                                              "model_stock takes the angle between whole tensors"):
        plan_of("model_stock", [ds[0], other], base=base)


# -- breadcrumbs -----------------------------------------------------------------------------------------


def band_kept(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's `magnitude_outliers` mask (mergekit/sparsify.py, transcribed): sort |delta| ascending,
    keep positions [n_bot, n_bot + target) with target = int(density n), n_top = int(gamma n),
    n_bot = max(0, n - target - n_top); everything at density 1."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape)
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    keep = torch.zeros(n)
    keep[torch.sort(delta.abs().flatten()).indices[bottom:bottom + target]] = 1
    return keep.view(delta.shape)


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize(("density", "gamma", "consensus"), [(0.5, 0.01, False), (0.3, 0.2, True), (0.9, 0.5, False),
                                                              (1.0, 0.3, True), (0.01, 0.0, False)])
def test_breadcrumbs_keeps_each_deltas_band_below_its_outliers(
    density: float, gamma: float, consensus: bool, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernels == "torch":
        monkeypatch.setattr(selection, "_SELECT", None)
    base, ds = fine_tuned(3, seed=51)
    w = [1.0, 0.5, 0.8]
    options = {"density": density, "gamma": gamma, "consensus": consensus, "normalize": consensus, "lam": 1.2}
    got = merged("breadcrumbs", ds, base=base, weights=w, options=options)
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        keep = [band_kept(x - b, density, gamma) for x in xs]
        want = reference_task_vectors(b, xs, w, lam=1.2, normalize=consensus, keep=keep, consensus=consensus)
        assert_close(got.entries[n], want)


def test_breadcrumbs_drops_nans_and_infinities_as_the_largest_outliers() -> None:
    base = TensorDict({"x": torch.zeros(10)})
    x = TensorDict({"x": torch.tensor([math.nan, math.inf, 1.0, -2.0, 3.0, 4.0, 5.0, 6.0, -7.0, 8.0])})
    got = merged("breadcrumbs", [x], base=base, options={"density": 0.5, "gamma": 0.2})  # drop 2, keep the next 5
    assert bits32(got.entries["x"]) == bits32(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 6.0, -7.0, 8.0]))
    # Ties at a threshold go together (as TIES keeps all of its ties): the outlier threshold is a NaN,
    # so both NaNs go, though int(0.25 * 4) = 1; then the band keeps what is at or above 2.
    nans = TensorDict({"x": torch.tensor([math.nan, math.nan, 1.0, 2.0])})
    got = merged("breadcrumbs", [nans], base=TensorDict({"x": torch.zeros(4)}), options={"density": 0.5, "gamma": 0.25})
    assert bits32(got.entries["x"]) == bits32(torch.tensor([0.0, 0.0, 0.0, 2.0]))


# -- multislerp ------------------------------------------------------------------------------------------


def reference_multislerp(xs: Sequence[torch.Tensor], w: Sequence[float], base: torch.Tensor | None,
                         normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's `multislerp` (mergekit/merge_methods/multislerp.py), transcribed in float64 with its
    tangent-space step: unit vectors, their weighted mean direction, the tangent vectors there, the
    exponential map back, scaled by the weighted mean norm, plus the base."""
    stacked = torch.stack([x.double() for x in xs])
    if base is not None:
        stacked = stacked - base.double()
    flat = stacked.view(len(xs), -1)
    weights = torch.tensor(list(w), dtype=torch.float64)
    if normalize:
        weights = weights / weights.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    size = tangent.norm() + eps
    result = (mean * torch.cos(size) + tangent * (torch.sin(size) / size)) * (norms.squeeze(-1) * weights).sum()
    result = result.view(xs[0].shape)
    return result + base.double() if base is not None else result


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("count", [2, 3, 6])
def test_multislerp_is_mergekits_formula(with_base: bool, normalize: bool, count: int) -> None:
    base, ds = fine_tuned(count, seed=60 + count)
    w = [1.0, 0.5, 2.0, 0.25, 1.5, 0.75][:count]
    got = merged("multislerp", ds, base=base if with_base else None, weights=w, options={"normalize": normalize})
    for n in SHAPES:
        want = reference_multislerp([d.entries[n] for d in ds], w, base.entries[n] if with_base else None, normalize)
        assert_close(got.entries[n], want, tol=2e-6 * max(1.0, float(want.abs().max())))


def test_multislerp_keeps_the_weighted_norm_and_a_single_tensor() -> None:
    """Two orthogonal unit vectors of equal weight: halfway along the arc, still of length 1 (a linear
    mean would be 0.71 long); one dictionary comes back as it is."""
    a, b = TensorDict({"x": torch.tensor([1.0, 0.0])}), TensorDict({"x": torch.tensor([0.0, 1.0])})
    got = merged("multislerp", [a, b]).entries["x"]
    assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    one = TensorDict({"x": torch.tensor([3.0, -1.0])})
    assert torch.equal(merged("multislerp", [one]).entries["x"], one.entries["x"])


def test_multislerp_of_opposite_tensors_is_their_line_for_two_and_refused_for_more() -> None:
    a, b = TensorDict({"x": torch.tensor([1.0, 2.0])}), TensorDict({"x": torch.tensor([-1.0, -2.0])})
    got = merged("multislerp", [a, b], weights=[1.0, 3.0]).entries["x"]
    assert_close(got, torch.tensor([-1.0, -2.0]))  # 1:3: the heavier one's direction, at their mean norm
    assert_close(merged("multislerp", [a, b]).entries["x"], torch.zeros(2))  # 1:1: the line's midpoint
    c = TensorDict({"x": torch.tensor([1.0, 2.0])})
    with pytest.raises(InvalidArgument, match="entry 'x': the weighted mean of the models' directions is 0"):
        merged("multislerp", [a, b, c], weights=[1.0, 2.0, 1.0])


def test_multislerp_of_entries_no_model_changed_is_the_base() -> None:
    """Three models whose 'frozen' entry equals the base's (offsets all 0), and an empty entry: the base
    and the empty tensor, where mergekit's multislerp raises for three or more."""
    base = TensorDict({"frozen": torch.tensor([1.0, -2.0]), "empty": torch.zeros(0), "w": torch.tensor([0.0, 1.0])})
    ds = [TensorDict({"frozen": torch.tensor([1.0, -2.0]), "empty": torch.zeros(0), "w": torch.tensor([v, 1.0])})
          for v in (1.0, 2.0, 3.0)]
    got = merged("multislerp", ds, base=base)
    assert torch.equal(got.entries["frozen"], base.entries["frozen"]) and got.entries["empty"].numel() == 0
    assert_close(got.entries["w"], torch.tensor([2.0, 1.0]))  # offsets along one direction: their mean length
    alone = merged("multislerp", [TensorDict({"x": torch.zeros(3)}) for _ in range(3)])
    assert torch.equal(alone.entries["x"], torch.zeros(3))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_a_rescaled_trim_matches_the_untrimmed_deltas_norm_as_mergekit(method: str, norm: str) -> None:
    """rescale=True: each trimmed delta times its norm before the trim over its norm after
    (mergekit's `rescaled_masked_tensor`, `mergekit_norm_ratio` above), then combined as without."""
    base, ds = fine_tuned(3, seed=71)
    w = [1.0, 0.6, 0.9]
    options: dict[str, object] = {"density": 0.4, "rescale": True, "rescale_norm": norm, "lam": 0.9}
    if method == "breadcrumbs":
        options["gamma"] = 0.1
    got = merged(method, ds, base=base, weights=w, options=options)
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        if method == "ties":
            masks = [top_k_kept(x - b, 0.4) for x in xs]
        else:
            masks = [band_kept(x - b, 0.4, 0.1) for x in xs]
        keep = [m * mergekit_norm_ratio(x - b, m, norm) for m, x in zip(masks, xs)]
        want = reference_task_vectors(b, xs, w, lam=0.9, normalize=method == "ties", keep=keep,
                                      consensus=method == "ties")
        assert_close(got.entries[n], want, tol=2e-6)
    plain = merged(method, ds, base=base, weights=w, options={**options, "rescale": False})
    # TIES keeps each delta's largest magnitude, so its max norm, and so a linf rescale, is 1
    assert torch.equal(plain.entries["a.weight"], got.entries["a.weight"]) == (method == "ties" and norm == "linf")


# -- DELLA -------------------------------------------------------------------------------------------------


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit's `della_magprune` keep probabilities (mergekit/sparsify.py, transcribed): |delta|
    ranked along dimension 1 (a vector as one row), ranks scaled to [0, 1], density - epsilon plus
    2 epsilon times that."""
    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = t.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).view(delta.shape)


def della_keep(seed: int, index: int, name: str, probabilities: torch.Tensor) -> torch.Tensor:
    """The server's draws: bernoulli of the probabilities from the generator DARE's masks use."""
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return torch.bernoulli(probabilities, generator=g)


@pytest.mark.parametrize(("rescale", "consensus"), [("probability", False), ("l1", True), ("", False)])
def test_della_keeps_larger_changes_more_often_with_reproducible_draws(rescale: str, consensus: bool) -> None:
    base, ds = fine_tuned(3, seed=81)
    w, densities, epsilon = [1.0, 0.7, 0.4], [0.5, 0.3, 0.8], 0.1
    options: dict[str, object] = {"epsilon": epsilon, "seed": 9, "consensus": consensus, "normalize": consensus,
                                  "lam": 1.1, "rescale": bool(rescale), "rescale_norm": rescale or "l1"}
    got = merged("della", ds, base=base, weights=w, options=options, densities=densities)
    for n in SHAPES:
        b, xs = base.entries[n], [d.entries[n] for d in ds]
        keep = []
        for i, (x, density) in enumerate(zip(xs, densities)):
            p = della_probabilities(x - b, density, epsilon)
            drawn = della_keep(9, i, n, p)
            if rescale == "probability":
                keep.append(drawn / p)
            elif rescale == "l1":
                keep.append(drawn * mergekit_norm_ratio(x - b, drawn, "l1"))
            else:
                keep.append(drawn)
        want = reference_task_vectors(b, xs, w, lam=1.1, normalize=consensus, keep=keep, consensus=consensus)
        assert_close(got.entries[n], want, tol=2e-6)


def test_della_keeps_the_largest_magnitudes_with_density_plus_epsilon() -> None:
    """Over many seeds, the largest |delta| of each row is kept about density + epsilon of the time and
    the smallest density - epsilon; a row of one element halfway (mergekit divides 0 by 0)."""
    base = TensorDict({"w": torch.zeros(4, 50), "v": torch.zeros(3, 1)})
    x = TensorDict({"w": torch.arange(1.0, 201.0).view(4, 50), "v": torch.ones(3, 1)})
    kept_top = kept_bottom = kept_single = 0
    for seed in range(200):
        got = merged("della", [x], base=base, options={"density": 0.5, "epsilon": 0.3, "seed": seed, "rescale": False})
        kept_top += int((got.entries["w"][:, -1] != 0).sum())
        kept_bottom += int((got.entries["w"][:, 0] != 0).sum())
        kept_single += int((got.entries["v"] != 0).sum())
    assert 0.7 < kept_top / 800 < 0.9 and 0.1 < kept_bottom / 800 < 0.3 and 0.4 < kept_single / 600 < 0.6


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_with_a_base_interpolates_the_offsets_and_adds_the_base(t: float) -> None:
    """mergekit's nuslerp with a base: slerp between x0 - base and x1 - base, then plus the base."""
    base, ds = fine_tuned(2, seed=91)
    got = merged("slerp", ds, base=base, options={"t": t, "threshold": 1.0})
    for n in SHAPES:
        b = base.entries[n]
        want = b + reference_slerp(ds[0].entries[n] - b, ds[1].entries[n] - b, t, threshold=1.0)
        assert_close(got.entries[n], want, tol=2e-6)
    if t == 0.0:
        assert_close(got.entries["a.weight"], ds[0].entries["a.weight"])


# -- Karcher mean ----------------------------------------------------------------------------------------


def reference_karcher(xs: Sequence[torch.Tensor], w: Sequence[float], max_iter: int = 10,
                      tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean on the unit sphere as mergekit's `karcher_merge_tensors`
    (mergekit/merge_methods/karcher.py) defines it, written out in float64 with the unit tensors made:
    alphas w / sum(w); directions of the tensors longer than tol, their alphas renormalised; start at
    the normalised weighted mean of the units; Riemannian gradient steps along
    sum a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) until it is shorter than tol; the direction
    scaled by sum a_i |x_i| over every tensor."""
    alphas = [a / sum(w) for a in w]
    vectors = [x.double().reshape(-1) for x in xs]
    norms = [float(v.norm()) for v in vectors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(xs[0].shape, dtype=torch.float64)
    share = sum(alphas[i] for i in valid)
    units = {i: vectors[i] / norms[i] for i in valid}
    mean = sum(alphas[i] / share * units[i] for i in valid)
    assert isinstance(mean, torch.Tensor)
    mean = units[valid[0]].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            cos = float(torch.clamp(mean @ units[i], -1.0, 1.0))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += alphas[i] / share * theta / math.sin(theta) * (units[i] - cos * mean)
        size = float(tangent.norm())
        if size < tol:
            break
        mean = math.cos(size) * mean + math.sin(size) * tangent / size
        mean = mean / mean.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).reshape(xs[0].shape)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_karcher_is_mergekits_weighted_mean_on_the_sphere(count: int, weighted: bool) -> None:
    ds = dicts(count, seed=80 + count)
    w = [1.0, 0.5, 2.0, 0.25, 1.5][:count] if weighted else None
    got = merged("karcher", ds, weights=w, options={"max_iter": 30, "tol": 1e-9})
    for n in SHAPES:
        want = reference_karcher([d.entries[n] for d in ds], w or [1.0] * count, 30, 1e-9)
        assert_close(got.entries[n], want, tol=2e-6 * max(1.0, float(want.abs().max())))


def test_karcher_reaches_the_point_where_the_models_pull_equally() -> None:
    """The property that defines the mean, apart from any reference: at the result's direction m the
    weighted log maps to the models' directions sum to 0 (the tangent is shorter than 1e-5 of a
    model's); and it is as long as the models' weighted mean length."""
    ds = dicts(4, seed=90, shapes={"x": (50,)})
    w = [1.0, 3.0, 0.5, 2.0]
    got = merged("karcher", ds, weights=w, options={"max_iter": 100, "tol": 1e-12}).entries["x"].double()
    m = got / got.norm()
    pull = torch.zeros_like(m)
    for d, a in zip(ds, w):
        u = d.entries["x"].double() / d.entries["x"].double().norm()
        theta = math.acos(max(-1.0, min(1.0, float(m @ u))))
        pull += a / sum(w) * theta / math.sin(theta) * (u - math.cos(theta) * m)
    assert float(pull.norm()) < 1e-5
    lengths = sum(a * float(d.entries["x"].norm()) for d, a in zip(ds, w)) / sum(w)
    assert abs(float(got.norm()) - lengths) < 1e-5 * lengths


def test_karcher_of_orthogonal_tensors_tiny_ones_and_one_dictionary() -> None:
    """Two orthogonal unit tensors: the arc's midpoint, of length 1 (a linear mean is 0.71 long). A
    tensor no longer than tol takes no part in the direction but counts in the length. Zeros give
    zeros; one dictionary is itself."""
    a, b = TensorDict({"x": torch.tensor([1.0, 0.0])}), TensorDict({"x": torch.tensor([0.0, 1.0])})
    assert_close(merged("karcher", [a, b]).entries["x"], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    tiny = TensorDict({"x": torch.tensor([1e-7, 0.0])})
    assert_close(merged("karcher", [tiny, b]).entries["x"], torch.tensor([0.0, (1 + 1e-7) / 2]))
    zeros = [TensorDict({"x": torch.zeros(3)}) for _ in range(2)]
    assert torch.equal(merged("karcher", zeros).entries["x"], torch.zeros(3))
    one = TensorDict({"x": torch.tensor([3.0, -1.0])})
    assert torch.equal(merged("karcher", [one]).entries["x"], one.entries["x"])


def test_karcher_of_bfloat16_models_is_their_float32_mean_in_bfloat16() -> None:
    ds = dicts(3, seed=95)
    low = [TensorDict({n: t.to(torch.bfloat16) for n, t in d.entries.items()}) for d in ds]
    wide = [TensorDict({n: t.float() for n, t in d.entries.items()}) for d in low]
    got, want = merged("karcher", low), merged("karcher", wide)
    for n in SHAPES:
        assert got.entries[n].dtype == torch.bfloat16
        assert torch.equal(got.entries[n], want.entries[n].to(torch.bfloat16)), n


def test_karcher_refuses_what_has_no_mean() -> None:
    ds = dicts(2, seed=96)
    with pytest.raises(InvalidArgument, match="karcher takes no base .karcher averages it with the others"):
        plan_of("karcher", ds, base=ds[0])
    with pytest.raises(InvalidArgument, match=r"karcher: entry 'a.weight' has weights \[2, -1\]; its weights must be "
                                              "non-negative with a positive sum"):
        plan_of("karcher", ds, weights=[2.0, -1.0])
    with pytest.raises(InvalidArgument, match=r"has weights \[0, 0\]"):
        plan_of("karcher", ds, weights=[0.0, 0.0])


def test_karcher_of_opposite_tensors_steps_towards_neither() -> None:
    """A model exactly opposite the mean direction has no direction to be stepped towards: it adds
    nothing to the tangent (mergekit's term is 0 there too). Two opposite tensors of equal weight keep
    the first's direction at their mean length; opposite scalars (a learned scale) the heavier one's
    sign; a model equal to the mean with tol 0 adds nothing either, rather than 0 / sin(0)."""
    opposite = [TensorDict({"x": torch.tensor([1.0, 2.0])}), TensorDict({"x": torch.tensor([-3.0, -6.0])})]
    assert_close(merged("karcher", opposite).entries["x"], torch.tensor([2.0, 4.0]))
    scalars = [TensorDict({"s": torch.tensor([1.5])}), TensorDict({"s": torch.tensor([-0.5])})]
    assert_close(merged("karcher", scalars, weights=[1.0, 3.0]).entries["s"], torch.tensor([-0.75]))
    same = [TensorDict({"x": torch.tensor([1.0, 2.0])}), TensorDict({"x": torch.tensor([2.0, 4.0])})]
    assert_close(merged("karcher", same, options={"tol": 0.0}).entries["x"], torch.tensor([1.5, 3.0]))


# -- SCE ------------------------------------------------------------------------------------------------


def reference_sce(b: torch.Tensor, xs: Sequence[torch.Tensor], topk: float) -> torch.Tensor:
    """SCE as mergekit's `sce_merge` (mergekit/merge_methods/sce.py) defines it, in float64 over the
    stacked deltas: keep the int(topk * nonzero) elements of largest variance across the models, weigh
    each model by its masked delta's mean square over their sum (equal under 1e-6), elect each
    element's sign by the deltas' sum (+ at 0), and divide the agreeing weighted deltas by their
    weights' sum (at least 1e-6)."""
    tv = torch.stack([x.double() - b.double() for x in xs])
    if topk < 1:
        var = tv.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * topk)
        mask = torch.zeros_like(var)
        if k > 0:
            mask.view(-1)[torch.topk(var.view(-1), k).indices] = 1
        tv = tv * mask
    squares = tv.square().reshape(len(xs), -1).mean(dim=1)
    total = float(squares.sum())
    weights = torch.full_like(squares, 1 / len(xs)) if abs(total) < 1e-6 else squares / total
    weights = weights.view(-1, *([1] * b.dim()))
    majority = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0).double()
    agree = (tv.sign() == majority).double() * weights
    return b.double() + (tv * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1e-6)


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_is_mergekits_formula(count: int, topk: float) -> None:
    base, ds = fine_tuned(count, seed=100 + count)
    got = merged("sce", ds, base=base, options={"select_topk": topk})
    for n in SHAPES:
        want = reference_sce(base.entries[n], [d.entries[n] for d in ds], topk)
        assert_close(got.entries[n], want, tol=2e-6)


def test_sce_keeps_the_base_with_nothing_selected_and_weighs_tiny_deltas_equally() -> None:
    """select_topk 0 keeps no delta: the base, bit for bit. Deltas whose mean squares sum below 1e-6
    are weighed 1/N each (mergekit's floor), so two opposite deltas of 1e-4 and 2e-4 elect the larger
    one's sign by the sum, and only it counts."""
    base, ds = fine_tuned(3, seed=110)
    got = merged("sce", ds, base=base, options={"select_topk": 0.0})
    assert all(torch.equal(got.entries[n], base.entries[n]) for n in SHAPES)
    b = TensorDict({"x": torch.zeros(2, dtype=torch.float64)})
    small = [TensorDict({"x": torch.tensor([1e-4, 1e-4], dtype=torch.float64)}),
             TensorDict({"x": torch.tensor([-2e-4, 3e-4], dtype=torch.float64)})]
    got_x = merged("sce", small, base=b).entries["x"]
    assert_close(got_x, torch.tensor([-2e-4, 2e-4], dtype=torch.float64), tol=1e-18)  # [-2e-4 alone, (1e-4 + 3e-4) / 2]


def test_sce_refuses_weights_and_unlike_shapes() -> None:
    base, ds = fine_tuned(2, seed=111)
    with pytest.raises(InvalidArgument, match="sce takes no weights; it weighs each model by its delta's mean square"):
        plan_of("sce", ds, base=base, weights=[1.0, 2.0])
    with pytest.raises(InvalidArgument, match="sce needs a base"):
        plan_of("sce", ds)
    other = TensorDict({n: t.expand(2, *t.shape).clone() if n == "a.bias" else t for n, t in ds[1].entries.items()})
    with pytest.raises(InvalidArgument, match="sce ranks each element's variance across the models, so their shapes"):
        plan_of("sce", [ds[0], other], base=base)


# -- NearSwap -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.02, 0.1, 1e3])
def test_nearswap_takes_the_model_where_it_is_near_the_base(t: float) -> None:
    """mergekit's `nearswap_merge` (mergekit/merge_methods/nearswap.py), transcribed: w = clamp(t /
    max(|base - x|, 1e-6), 0, 1), w x + (1 - w) base; exactly the base at t = 0 and the model where
    w reaches 1."""
    base, ds = fine_tuned(1, seed=120)
    got = merged("nearswap", ds, base=base, options={"t": t})
    for n in SHAPES:
        b, x = base.entries[n].double(), ds[0].entries[n].double()
        w = (t / (b - x).abs().clamp(min=1e-6)).clamp(0, 1)
        assert_close(got.entries[n], w * x + (1 - w) * b)
        if t == 0.0:
            assert torch.equal(got.entries[n], base.entries[n])
        if t == 1e3:
            assert torch.equal(got.entries[n], ds[0].entries[n])


def test_nearswap_takes_one_model_and_a_t_that_is_a_distance() -> None:
    base, ds = fine_tuned(2, seed=121)
    with pytest.raises(InvalidArgument, match="nearswap takes exactly 1 dictionary besides the base, given 2"):
        plan_of("nearswap", ds, base=base, options={"t": 0.1})
    with pytest.raises(InvalidArgument, match="nearswap takes no weights; each element moves"):
        plan_of("nearswap", ds[:1], base=base, weights=[2.0], options={"t": 0.1})
    with pytest.raises(InvalidArgument, match="option 't' is required"):
        plan_of("nearswap", ds[:1], base=base)
    with pytest.raises(InvalidArgument, match="'t'"):
        plan_of("nearswap", ds[:1], base=base, options={"t": -0.5})


# -- RAM ------------------------------------------------------------------------------------------------


def reference_ram(b: torch.Tensor, xs: Sequence[torch.Tensor], epsilon: float, r: float = 0.0,
                  alpha: float = 0.2) -> torch.Tensor:
    """RAM and RAM+ as mergekit's `ram_merge` and `ramplus_tl_merge` (mergekit/merge_methods/ram.py)
    define them, in float64 over the stacked deltas: an element of a delta counts where |d| > epsilon;
    shared ones (counted by more than one model) are averaged, unique ones kept whole, scaled by
    1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha) per model."""
    tv = torch.stack([x.double() - b.double() for x in xs]).reshape(len(xs), -1)
    counts = (tv.abs() > epsilon)
    c = counts.sum(dim=0, keepdim=True)
    shared, unique = c > 1, c == 1
    lam = 1 + r * ((counts & shared).sum(dim=1) / (counts & unique).sum(dim=1).double().clamp(min=epsilon)).clamp(0, alpha)
    z = tv * counts
    merged_tv = (z * unique * lam.unsqueeze(-1) + z * shared / c.clamp(min=1)).sum(dim=0)
    return b.double() + merged_tv.reshape(b.shape)


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize(("epsilon", "r"), [(1e-5, 0.0), (0.08, 0.0), (0.08, 0.5), (0.2, 0.1)])
def test_ram_is_mergekits_formula(count: int, epsilon: float, r: float) -> None:
    base, ds = fine_tuned(count, seed=130 + count)
    got = merged("ram", ds, base=base, options={"epsilon": epsilon, "r": r})
    for n in SHAPES:
        want = reference_ram(base.entries[n], [d.entries[n] for d in ds], epsilon, r)
        assert_close(got.entries[n], want, tol=2e-6)


def test_ram_keeps_a_change_only_one_model_made_whole() -> None:
    """Two models: where both changed an element their changes are averaged; where one did, its change
    is kept whole (a mean would halve it), times 1 + r clamp(shared / unique, 0, alpha) with r."""
    base = TensorDict({"x": torch.zeros(4, dtype=torch.float64)})
    a = TensorDict({"x": torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)})
    b = TensorDict({"x": torch.tensor([3.0, 0.0, 4.0, 1e-6], dtype=torch.float64)})
    got = merged("ram", [a, b], base=base).entries["x"]
    assert torch.equal(got, torch.tensor([2.0, 2.0, 4.0, 0.0], dtype=torch.float64))
    plus = merged("ram", [a, b], base=base, options={"r": 0.5, "alpha": 2.0}).entries["x"]
    # each model shares one element and alone changed one: lambda = 1 + 0.5 * min(1 / 1, 2) = 1.5
    assert torch.equal(plus, torch.tensor([2.0, 3.0, 6.0, 0.0], dtype=torch.float64))


# -- Arcee Fusion ---------------------------------------------------------------------------------------


def reference_arcee_fusion(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit's `arcee_fusion_merge_method` (mergekit/merge_methods/arcee_fusion.py) for tensors of up
    to 1M elements (where it sorts them all), in float64: importance |x - b| times the row's KL
    divergence between softmax(x) and softmax(b) over the last dimension (each + 1e-8), kept at or
    above median + 1.5 IQR of the sorted importances (indices floor(q (n - 1)))."""
    x64, b64 = x.double(), b.double()
    p = torch.softmax(x64, dim=-1) + 1e-8
    q = torch.softmax(b64, dim=-1) + 1e-8
    importance = (x64 - b64).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return b64 + (x64 - b64) * (importance >= median + 1.5 * (q3 - q1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcee_fusion_is_mergekits_formula(seed: int) -> None:
    shapes = {"w": (40, 30), "b": (40,), "e": (700, 3)}
    base, ds = fine_tuned(1, seed=140 + seed, shapes=shapes)
    got = merged("arcee_fusion", ds, base=base)
    for n in shapes:
        want = reference_arcee_fusion(base.entries[n], ds[0].entries[n])
        assert_close(got.entries[n], want, tol=2e-6)
        changed = int((got.entries[n] != base.entries[n]).sum())
        assert 0 < changed < got.entries[n].numel() // 2, n  # the important changes only


def test_arcee_fusion_and_ram_refuse_what_they_cannot_merge() -> None:
    base, ds = fine_tuned(2, seed=150)
    with pytest.raises(InvalidArgument, match="arcee_fusion takes exactly 1 dictionary besides the base, given 2"):
        plan_of("arcee_fusion", ds, base=base)
    with pytest.raises(InvalidArgument, match="arcee_fusion needs a base"):
        plan_of("arcee_fusion", ds[:1])
    with pytest.raises(InvalidArgument, match="arcee_fusion takes no weights; each element of the model is kept"):
        plan_of("arcee_fusion", ds[:1], base=base, weights=[2.0])
    with pytest.raises(InvalidArgument, match="ram takes no weights; each element averages the models"):
        plan_of("ram", ds, base=base, weights=[1.0, 2.0])
    with pytest.raises(InvalidArgument, match="'r'"):
        plan_of("ram", ds, base=base, options={"r": -0.1})


def test_karcher_of_two_models_is_the_slerp_at_their_weights_share() -> None:
    """For two directions the weighted Karcher mean lies on the arc between them at w2 / (w1 + w2) of
    the angle: the slerp there, times the weighted mean length (a fact of the sphere, not of any
    implementation; the normalised linear mean, where the iteration starts, lies elsewhere)."""
    a, b = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, -1.0])
    got = merged("karcher", [TensorDict({"x": a}), TensorDict({"x": b})], weights=[1.0, 3.0],
                 options={"max_iter": 100, "tol": 1e-12}).entries["x"].double()
    u, v = a.double() / a.norm(), b.double() / b.norm()
    theta = math.acos(float(u @ v))
    arc = (math.sin(0.25 * theta) * u + math.sin(0.75 * theta) * v) / math.sin(theta)
    assert_close(got, arc * (0.25 * float(a.norm()) + 0.75 * float(b.norm())), tol=1e-6)


# -- slerp of each row or column ------------------------------------------------------------------------


def reference_vector_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, vectors: str,
                           threshold: float = 0.9995) -> torch.Tensor:
    """mergekit's `nuslerp` with flatten false (dim -1; dim 0 for columns), transcribed in float64
    with this server's rules per vector (norms of at most 1e-8 taken as 1, the line past the
    threshold): each vector interpolated on its own arc."""
    a, b = v0.double(), v1.double()
    if a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif vectors == "rows":
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    else:
        a, b = a.reshape(a.shape[0], -1).t(), b.reshape(b.shape[0], -1).t()
    out = torch.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        nx, ny = float(x.norm()), float(y.norm())
        cos = float(x @ y) / ((nx if nx > 1e-8 else 1.0) * (ny if ny > 1e-8 else 1.0))
        if abs(cos) > threshold or abs(cos) >= 1 - 2**-44:
            out[i] = (1 - t) * x + t * y
        else:
            theta = math.acos(max(-1.0, min(1.0, cos)))
            out[i] = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    if v0.dim() >= 2 and vectors == "columns":
        return out.t().reshape(v0.shape)
    return out.reshape(v0.shape)


@pytest.mark.parametrize("vectors", ["rows", "columns"])
@pytest.mark.parametrize("threshold", [0.9995, 0.3])
def test_slerp_of_each_row_or_column_is_each_vectors_own_arc(vectors: str, threshold: float) -> None:
    shapes = {"w": (40, 30), "b": (30,), "conv": (4, 3, 5), "one": (1, 7)}
    ds = dicts(2, seed=160, shapes=shapes)
    got = merged("slerp", ds, options={"t": 0.3, "vectors": vectors, "threshold": threshold})
    for n in shapes:
        want = reference_vector_slerp(ds[0].entries[n], ds[1].entries[n], 0.3, vectors, threshold)
        assert_close(got.entries[n], want, tol=2e-6)


def test_slerp_of_rows_takes_the_line_where_a_row_is_colinear_or_zero() -> None:
    """Row 0 colinear (the line), row 1 orthogonal unit rows (the arc's point), row 2 zero in the
    first model (its norm taken as 1: the arc between 0 and the row), and an empty tensor."""
    a = TensorDict({"w": torch.tensor([[1.0, 2.0], [1.0, 0.0], [0.0, 0.0]]), "e": torch.zeros(0, 3)})
    b = TensorDict({"w": torch.tensor([[2.0, 4.0], [0.0, 1.0], [3.0, 4.0]]), "e": torch.zeros(0, 3)})
    got = merged("slerp", [a, b], options={"t": 0.5, "vectors": "rows"})
    half = math.sin(math.pi / 4)
    assert_close(got.entries["w"], torch.tensor([[1.5, 3.0], [half, half], [3.0 * half, 4.0 * half]]))
    assert got.entries["e"].shape == (0, 3)
