"""Averaging across models through a real server: the client's average, merge, outer_step and soup
verbs on loopback, checked against Flower's FedAvg formula and in-process numbers, with the errors a
client sees, and the request_id field every new request message carries for exactly-once retries.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
import torch

from weightavg import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError, Soup
from weightavg.v1 import weightavg_pb2 as pb

from fedopt_oracle import FLOWER_DEFAULTS, flower_rounds

TOL = 1e-6


def arrays(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.standard_normal((64, 33), dtype=np.float32), "b": rng.standard_normal(33, dtype=np.float32),
         "n": np.array(i, np.int64)}
        for i in range(count)
    ]


def fedavg(layers: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    """Flower's FedAvg (aggregate.py): per layer, sum of array * examples, over the total examples."""
    total = sum(counts)
    return [reduce(np.add, [a * n for a, n in zip(layer, counts)]) / total for layer in zip(*layers)]


def test_average_over_the_wire_equals_fedavg(client: Client) -> None:
    values, counts = arrays(5), [120, 30, 300, 7, 43]
    handles = [client.dict(v) for v in values]
    mean = client.average(handles, weights=counts)
    got = client.dict(mean)
    want = fedavg([[v["w"], v["b"]] for v in values], counts)
    assert np.abs(got["w"] - want[0]).max() <= TOL and np.abs(got["b"] - want[1]).max() <= TOL
    assert got["n"] == 0  # integer entries are the first's by default
    assert client.dict(client.average(handles, integers="max"), "n") == 4


@pytest.mark.parametrize("into", [False, True], ids=["new", "into the first"])
def test_integers_mean_is_flowers_fedavg_of_integer_entries_as_a_torch_client_loads_it(client: Client, into: bool) -> None:
    """Flower's aggregate (sum of value * examples over the examples, float64) of integer and bool
    entries, written as torch's copy_ writes it into an integer buffer: truncated toward zero
    (negative means too), bools true where non-zero. The floating entries are the usual mean."""
    rng = np.random.default_rng(5)
    values = [{"w": rng.standard_normal(4).astype(np.float32), "count": np.array(rng.integers(0, 10**6), np.int64),
               "v": rng.integers(-50, 50, 7).astype(np.int32), "u": rng.integers(0, 255, 5).astype(np.uint8),
               "mask": rng.integers(0, 2, 6).astype(bool)} for _ in range(4)]
    counts = [120, 30, 300, 7]
    handles = [client.dict(v) for v in values]
    mean = client.average(handles, weights=counts, into=handles[0] if into else None, integers="mean")
    got = client.dict(mean)
    for name in ("count", "v", "u", "mask"):
        # Flower's aggregate in float64 (its own numpy arithmetic keeps a uint8 array's products in
        # uint8, where 3 * 120 wraps and numpy 2 refuses 300 outright: weightavg computes in float64)
        flower = sum(v[name].astype(np.float64) * n for v, n in zip(values, counts)) / sum(counts)
        loaded = torch.zeros(np.shape(values[0][name]), dtype=torch.from_numpy(np.asarray(values[0][name])).dtype)
        loaded.copy_(torch.from_numpy(np.asarray(flower, np.float64)))  # what load_state_dict puts in the buffer
        np.testing.assert_array_equal(np.asarray(got[name]), loaded.numpy(), err_msg=name)
    assert (np.asarray(got["v"]) < 0).any() and np.asarray(got["mask"]).dtype == bool
    np.testing.assert_allclose(got["w"], fedavg([[v["w"]] for v in values], counts)[0], atol=TOL)


def test_average_into_a_dictionary_returns_it_and_changes_only_it(client: Client) -> None:
    values = arrays(3, seed=1)
    handles = [client.dict(v) for v in values]
    assert client.average(handles, into=handles[0]) == handles[0]
    got = client.dict(handles[0], "w")
    np.testing.assert_allclose(got, (values[0]["w"] + values[1]["w"] + values[2]["w"]) / 3, rtol=0, atol=TOL)
    np.testing.assert_array_equal(client.dict(handles[1], "w"), values[1]["w"])


def test_every_merge_method_answers_with_a_new_dictionary(client: Client) -> None:
    values = arrays(3, seed=2)
    base, *rest = [client.dict(v) for v in values]
    made = {
        "linear": client.merge("linear", rest, weights=[1, 3]),
        "slerp": client.merge("slerp", rest, t=0.5, per_tensor={"b": {"t": 1.0}}),
        "task_arithmetic": client.merge("task_arithmetic", rest, base=base, lam=0.5),
        "ties": client.merge("ties", rest, base=base, density=0.3),
        "dare": client.merge("dare", rest, base=base, density=0.3, seed=7),
    }
    np.testing.assert_allclose(client.dict(made["linear"], "w"), (values[1]["w"] + 3 * values[2]["w"]) / 4, atol=TOL)
    np.testing.assert_allclose(client.dict(made["slerp"], "b"), values[2]["b"], atol=TOL)
    delta = (values[1]["w"] - values[0]["w"]) + (values[2]["w"] - values[0]["w"])
    np.testing.assert_allclose(client.dict(made["task_arithmetic"], "w"), values[0]["w"] + 0.5 * delta, atol=TOL)
    for h in made.values():
        assert h.kind == "dictionary" and set(client.size(h)) == {"w", "b", "n"}
    again = client.merge("dare", rest, base=base, density=0.3, seed=7)
    np.testing.assert_array_equal(client.dict(again, "w"), client.dict(made["dare"], "w"))
    # mergekit's rescale (the L1 norm of each dropped-out delta matched to the delta's): the same kept
    # elements, each model's scaled by its ratio of norms instead of 1/density
    by_norm = client.dict(client.merge("dare", rest, base=base, density=0.3, seed=7, rescale_norm="l1"), "w")
    assert np.array_equal(by_norm != values[0]["w"], client.dict(made["dare"], "w") != values[0]["w"])
    assert not np.array_equal(by_norm, client.dict(made["dare"], "w"))
    with pytest.raises(InvalidArgumentError, match="rescale_norm.*density, l1, l2, linf"):
        client.merge("dare", rest, base=base, density=0.3, rescale_norm="l3")


def test_a_handle_given_twice_counts_as_two_inputs_also_when_it_is_into(client: Client) -> None:
    """The contract allows a handle more than once: [a, a, b] is the mean with a weighted twice, and
    writing it into a reads a's values before they are overwritten."""
    values = arrays(2, seed=4)
    a, b = client.dict(values[0]), client.dict(values[1])
    want = (2 * values[0]["w"].astype(np.float64) + values[1]["w"]) / 3
    np.testing.assert_allclose(client.dict(client.average([a, a, b]), "w"), want, rtol=0, atol=TOL)
    np.testing.assert_allclose(client.dict(client.merge("linear", [a, b, a]), "w"), want, rtol=0, atol=TOL)
    assert client.average([a, a, b], into=a) == a
    np.testing.assert_allclose(client.dict(a, "w"), want, rtol=0, atol=TOL)


def test_one_handle_given_where_a_list_is_taken_says_to_pass_a_list(client: Client) -> None:
    """A bare id string was iterated by character and sent as handles 'd', 'i', 'c', ...: the server
    answered NOT_FOUND for handle 'd'. Now the client refuses it (and a lone Handle) before sending."""
    a = client.dict(arrays(1)[0])
    m = client.module(["linear", 2, 2])
    calls = [
        lambda h: client.average(h), lambda h: client.merge("linear", h), lambda h: client.soup(m, h),
    ]
    for call in calls:
        for given in (a, a.id):
            with pytest.raises(TypeError, match=r"takes a list of handles, given one .*; pass \[h\]"):
                call(given)
    np.testing.assert_array_equal(client.dict(client.average([a.id]), "w"), arrays(1)[0]["w"])


def test_merge_errors_say_what_is_valid(client: Client) -> None:
    a, b = client.dict(arrays(1)[0]), client.dict(arrays(1, seed=3)[0])
    with pytest.raises(InvalidArgumentError, match=r"unknown option 'densty'; did you mean 'density'\? \(options: density, lam, normalize, rescale, rescale_norm, integers\)"):
        client.merge("ties", [a], base=b, densty=0.5)
    with pytest.raises(InvalidArgumentError, match="one of linear, slerp, task_arithmetic, ties, dare, della, breadcrumbs, multislerp, model_stock"):
        client.merge("soup", [a, b])
    with pytest.raises(InvalidArgumentError, match="slerp takes exactly 2 dictionaries"):
        client.merge("slerp", [a], t=0.5)
    with pytest.raises(NotFoundError):
        client.average([a, "dic_" + "0" * 32])


def test_a_weight_past_float32s_range_is_refused_and_into_keeps_its_values(client: Client) -> None:
    """torch used to fail partway through such a float32 merge, after earlier entries were written."""
    a, b = client.dict(arrays(1)[0]), client.dict(arrays(1, seed=3)[0])
    before = client.dict(a)
    with pytest.raises(InvalidArgumentError, match="within float32's range .* scale them down"):
        client.average([a, b], weights=[1.0, 1e39], into=a)
    after = client.dict(a)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_an_average_of_more_dictionaries_than_one_native_sum_takes_is_torchs_weighted_mean(client: Client) -> None:
    """300 inputs, past the native kernel's 256: the server sums them with torch (mul, add_, div_),
    bit for bit, where the kernel's refusal used to end the call as UNKNOWN."""
    import torch

    rng = np.random.default_rng(8)
    values = [rng.standard_normal(5, dtype=np.float32) for _ in range(300)]
    weights = [float(1 + k % 7) for k in range(300)]
    handles = [client.dict({"w": v}) for v in values]
    expected = torch.mul(torch.from_numpy(values[0]), weights[0])
    for v, w in zip(values[1:], weights[1:]):
        expected.add_(torch.from_numpy(v), alpha=w)
    expected.div_(sum(weights))
    got = client.dict(client.average(handles, weights=weights))["w"]
    np.testing.assert_array_equal(got.view(np.int32), expected.numpy().view(np.int32))


def test_an_average_runs_when_torch_has_more_threads_than_one_native_call_takes(client: Client) -> None:
    """On a machine of more than 256 cores (or with OMP_NUM_THREADS above 256) torch's intra-op count
    exceeds the native kernel's MAX_THREADS, which refused the call with ValueError: every large CPU
    average and linear merge answered INTERNAL. One dictionary of 170,000 float32 given 200 times
    asks for 260 threads (the server runs in this process, so it sees this thread count)."""
    import torch

    from weightavg_server.domain import weighted_sum

    if not weighted_sum.active():
        pytest.skip("the native weighted sum is not built or is off here")
    values = ((np.arange(170_000) % 64) / 8).astype(np.float32)  # sums of 200 stay exact in float32
    d = client.dict({"w": values})
    before = torch.get_num_threads()
    torch.set_num_threads(300)
    try:
        made = {"average": client.average([d] * 200), "linear": client.merge("linear", [d] * 200)}
    finally:
        torch.set_num_threads(before)
    for method, handle in made.items():
        np.testing.assert_array_equal(client.dict(handle, "w"), values, err_msg=method)


@pytest.mark.parametrize(("weights", "mean"), [([1e38, 1e38], [2.0, 3.0]), ([3e38, 3e38], [2.0, 3.0]),
                                               ([3e38, 1.0], [1.0, 2.0])], ids=str)
def test_weights_up_to_float32s_largest_give_the_weighted_mean(
    client: Client, weights: list[float], mean: list[float]
) -> None:
    """Weights the docs accept (finite, at most float32's largest) used to be answered OK with inf
    ([1e38, 1e38]), NaN ([3e38, 3e38]) or [1, inf] ([3e38, 1]): the sum of w x overflowed float32
    before the division."""
    x = client.dict({"w": np.array([1.0, 2.0], np.float32)})
    y = client.dict({"w": np.array([3.0, 4.0], np.float32)})
    for made in (client.average([x, y], weights=weights), client.merge("linear", [x, y], weights=weights)):
        np.testing.assert_allclose(client.dict(made, "w"), mean, rtol=1e-6, atol=0)


def test_every_merge_that_divides_by_the_weights_takes_weights_near_float32s_largest(client: Client) -> None:
    """Task arithmetic, TIES and DARE normalised: from a base of zeros, positive entries and density 1,
    each is the weighted mean."""
    x = client.dict({"w": np.array([1.0, 2.0], np.float32)})
    y = client.dict({"w": np.array([3.0, 4.0], np.float32)})
    zero = client.dict({"w": np.zeros(2, np.float32)})
    made = {
        "task_arithmetic": client.merge("task_arithmetic", [x, y], base=zero, weights=[3e38, 3e38], normalize=True),
        "ties": client.merge("ties", [x, y], base=zero, weights=[3e38, 3e38], density=1.0),
        "dare": client.merge("dare", [x, y], base=zero, weights=[3e38, 3e38], density=1.0, normalize=True),
    }
    for method, handle in made.items():
        np.testing.assert_allclose(client.dict(handle, "w"), [2.0, 3.0], rtol=1e-6, atol=0, err_msg=method)


def test_a_large_average_with_weights_near_float32s_largest_is_the_weighted_mean(client: Client) -> None:
    """100,000 float32 elements: on a CPU server the native kernel sums them (docs/perf.md)."""
    rng = np.random.default_rng(9)
    values = [rng.standard_normal(100_000, dtype=np.float32) for _ in range(3)]
    handles = [client.dict({"w": v}) for v in values]
    for weights in ([3e38, 3e38, 3e38], [3e38, 1e38, 1.0]):
        want = sum(w * v.astype(np.float64) for w, v in zip(weights, values)) / sum(weights)
        got = client.dict(client.average(handles, weights=weights), "w")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 0.5, 3.0, 1e-3], [1.0, 1.0, 1.0, 1.0], [600.0, 300.0, 100.0, 7.0]], ids=str)
def test_ordinary_weights_keep_the_bits_of_torchs_float32_mean(client: Client, weights: list[float]) -> None:
    """Differential tests compare averages with torch's swa_utils and peers' formulas bit for bit: for
    weights of ordinary size the mean is still torch's mul, add_ with alpha and div_ in float32."""
    import torch

    rng = np.random.default_rng(10)
    values = [{"big": rng.standard_normal(100_000, dtype=np.float32), "b": rng.standard_normal(7, dtype=np.float32)}
              for _ in range(4)]
    handles = [client.dict(v) for v in values]
    made = {
        "average": client.average(handles, weights=weights),
        "linear": client.merge("linear", handles, weights=weights),
    }
    for name in ("big", "b"):
        expected = torch.mul(torch.from_numpy(values[0][name]), weights[0])
        for v, w in zip(values[1:], weights[1:]):
            expected.add_(torch.from_numpy(v[name]), alpha=w)
        expected.div_(sum(weights))
        for method, handle in made.items():
            got = client.dict(handle, name)
            want = expected.numpy().view(np.int32)
            np.testing.assert_array_equal(got.view(np.int32), want, err_msg=f"{method} {name}")


def test_weights_in_a_numpy_array_or_a_torch_tensor_are_sent(client: Client) -> None:
    """Shard sizes often come as an array: `weights or ()` asked the array for a truth value, and the
    client raised ValueError (numpy) or RuntimeError (torch) before sending anything."""
    import torch

    x = client.dict({"w": np.array([1.0, 2.0], np.float32)})
    y = client.dict({"w": np.array([3.0, 4.0], np.float32)})
    for weights in (np.array([1, 3]), np.array([1.0, 3.0], np.float32), torch.tensor([1.0, 3.0])):
        for made in (client.average([x, y], weights=weights), client.merge("linear", [x, y], weights=weights)):
            np.testing.assert_allclose(client.dict(made, "w"), [2.5, 3.5], rtol=0, atol=TOL)
    with pytest.raises(InvalidArgumentError, match="2 weights for 1 dictionaries"):
        client.merge("linear", [x], weights=np.array([1.0, 2.0]))


@pytest.mark.parametrize("threshold", [1.0, 0.9995])
@pytest.mark.parametrize("factor", [-1.0, -3.0])
def test_slerp_of_opposite_tensors_takes_the_line_whatever_the_threshold(
    client: Client, factor: float, threshold: float
) -> None:
    """Opposite tensors have no arc between them (sin(theta) = 0: docs/merging.md falls back to the
    line). With threshold 1 the server divided by the sine of float64's pi, 1.2e-16, or of a cosine a
    few ulps short of -1: 1000 values of size up to 3.9 came back as large as 5e16 (factor -3) or
    five times the line (factor -1)."""
    v = np.random.default_rng(11).standard_normal(1000).astype(np.float32)
    a, b = client.dict({"w": v}), client.dict({"w": np.float32(factor) * v})
    for t in (0.3, 0.9):
        got = client.dict(client.merge("slerp", [a, b], t=t, threshold=threshold), "w")
        line = (1 - t) * v.astype(np.float64) + t * factor * v.astype(np.float64)
        np.testing.assert_allclose(got, line, rtol=0, atol=1e-5)


@pytest.mark.parametrize("consensus", [False, True])
def test_a_dare_density_too_small_to_rescale_by_is_refused_instead_of_answering_nan(
    client: Client, consensus: bool
) -> None:
    """Density 1e-46 is in (0, 1] but 0 in float32: dividing the dropped deltas by it made every
    element 0 / 0 = NaN, answered OK. Refused now, with nothing made; without rescale it is the base."""
    x = client.dict({"w": np.arange(1, 9, dtype=np.float32)})
    base = client.dict({"w": np.full(8, 0.5, np.float32)})
    held = {h.handle.id for h in client.handles()}
    for density in (1e-46, 1e-39):
        with pytest.raises(InvalidArgumentError, match=r"below float32's smallest normal number .* or rescale=False"):
            client.merge("dare", [x], base=base, density=density, consensus=consensus, normalize=consensus)
    assert {h.handle.id for h in client.handles()} == held
    kept = client.merge("dare", [x], base=base, density=1e-46, rescale=False, consensus=consensus)
    np.testing.assert_array_equal(client.dict(kept, "w"), np.full(8, 0.5, np.float32))
    # a norm rescale never divides by the density: such a density drops everything, and the base is kept
    by_norm = client.merge("dare", [x], base=base, density=1e-46, rescale_norm="l1", consensus=consensus)
    np.testing.assert_array_equal(client.dict(by_norm, "w"), np.full(8, 0.5, np.float32))


@pytest.mark.parametrize(("method", "options"), [
    ("task_arithmetic", {}), ("ties", {"density": 1.0}), ("dare", {"density": 1.0}),
])
def test_a_lam_past_float32s_range_is_refused_instead_of_turning_unchanged_elements_nan(
    client: Client, method: str, options: dict[str, float]
) -> None:
    """lam=1e39 is finite, but inf in a float32 merge: an element equal to the base's came back as
    inf * 0 = NaN instead of the base's value, answered OK. Weights have the same bound."""
    x = client.dict({"w": np.array([0.0, 1.0], np.float32)})
    base = client.dict({"w": np.zeros(2, np.float32)})
    held = {h.handle.id for h in client.handles()}
    for lam in (1e39, -1e39):
        with pytest.raises(InvalidArgumentError, match=r"lam .* past float32's range .* give a smaller lam"):
            client.merge(method, [x], base=base, lam=lam, **options)
    assert {h.handle.id for h in client.handles()} == held
    got = client.dict(client.merge(method, [x], base=base, lam=3e38, **options), "w")
    np.testing.assert_array_equal(got, np.array([0.0, 3e38], np.float32))


def test_outer_step_with_sgd_lr_1_puts_the_average_into_the_global_module(client: Client) -> None:
    q = client.module(["linear", 4, 3])
    o = client.opt("sgd", q, 1.0)
    rng = np.random.default_rng(4)
    clients = [client.dict({"weight": rng.standard_normal((3, 4), dtype=np.float32),
                            "bias": rng.standard_normal(3, dtype=np.float32)}) for _ in range(3)]
    mean = client.average(clients, weights=[1, 1, 2])
    before = {name: client.parm(q, name) for name in ("weight", "bias")}
    norm = client.outer_step(o, mean)
    target = client.dict(mean)
    for name in before:
        np.testing.assert_allclose(client.parm(q, name), target[name], atol=TOL)
    assert norm == pytest.approx(np.sqrt(sum(((before[n] - target[n]) ** 2).sum() for n in before)), rel=1e-5)
    # a round whose average went NaN (a diverged worker) is refused before the global module or the
    # optimizer's state moves
    diverged = client.dict({"weight": np.full((3, 4), np.nan, np.float32), "bias": np.zeros(3, np.float32)})
    kept = {name: client.parm(q, name) for name in ("weight", "bias")}
    with pytest.raises(InvalidArgumentError, match="'weight' of the average holds NaN"):
        client.outer_step(o, diverged)
    for name, value in kept.items():
        np.testing.assert_array_equal(client.parm(q, name), value)


@pytest.mark.parametrize("kind", list(FLOWER_DEFAULTS))
def test_flowers_adaptive_strategies_as_outer_steps_give_flowers_weights(client: Client, kind: str) -> None:
    """A global model stepped by `opt(kind)` towards each of four rounds' averages (three clients'
    dictionaries averaged on the server, weighted by their examples) holds what Flower's strategy of the
    same name and defaults gives from the same averages (tests/fedopt_oracle.py), and a refused round
    changes neither the weights nor the strategy's moments."""
    q = client.module(["linear", 5, 3])
    o = client.opt(kind, q)
    start = {name: client.parm(q, name) for name in ("weight", "bias")}
    rng = np.random.default_rng(7)
    rounds = []
    for _ in range(4):
        handles = [client.dict({n: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32) for n, a in start.items()})
                   for _ in range(3)]
        mean = client.average(handles, weights=[50, 20, 30])
        rounds.append(client.dict(mean))
        if len(rounds) == 2:  # a diverged round first: refused, nothing moves
            kept = {name: client.parm(q, name) for name in start}
            with pytest.raises(InvalidArgumentError, match="holds NaN"):
                client.outer_step(o, client.dict({"weight": np.full((3, 5), np.nan, np.float32), "bias": start["bias"]}))
            for name, value in kept.items():
                np.testing.assert_array_equal(client.parm(q, name), value)
        client.outer_step(o, mean)
    want = flower_rounds(kind, start, rounds, **FLOWER_DEFAULTS[kind])
    for name in start:
        assert np.abs(want[name] - start[name]).max() > 0.01
        np.testing.assert_allclose(client.parm(q, name), want[name], rtol=0, atol=1e-5)
    assert client.lr(o) == pytest.approx(FLOWER_DEFAULTS[kind]["lr"])  # lr is the strategy's eta


def test_a_slerp_with_mergekits_gradients_merges_each_entry_at_its_layers_t(client: Client) -> None:
    """A popular mergekit slerp config (t a gradient for attention, its mirror for the MLPs, 0.5 for
    the rest) over a transformer's names: each entry equals the slerp at the t mergekit gives its
    layer (layer i of 4 at i / 3; the embeddings, the final norm and the head at 0, where mergekit
    places its pre- and post-weights)."""
    names = ["embed.weight", *[f"layers.{i}.{k}.weight" for i in range(4) for k in ("self_attn", "mlp", "ln")],
             "norm.weight", "lm_head.weight"]
    rng = np.random.default_rng(8)
    a, b = ({n: rng.standard_normal(12).astype(np.float32) for n in names} for _ in range(2))
    ha, hb = client.dict(a), client.dict(b)
    attn, mlp = [0.0, 0.5, 0.3, 0.7, 1.0], [1.0, 0.5, 0.7, 0.3, 0.0]
    merged = client.dict(client.merge("slerp", [ha, hb], t=0.5, per_tensor={"*self_attn*": {"t": attn},
                                                                             "*mlp*": {"t": mlp}}))

    def mergekit_t(values: list[float], fraction: float) -> float:  # mergekit's evaluate_setting
        scaled = fraction * (len(values) - 1)
        low = int(scaled)
        share = scaled - low
        return (1 - share) * values[low] + share * values[min(len(values) - 1, low + 1)]

    for name in names:
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        fraction = 0.0 if layer is None else layer / 3
        t = mergekit_t(attn, fraction) if "self_attn" in name else mergekit_t(mlp, fraction) if "mlp" in name else 0.5
        alone = client.dict(client.merge("slerp", [ha, hb], t=t), name)
        np.testing.assert_array_equal(merged[name], alone, err_msg=name)
    np.testing.assert_array_equal(merged["layers.0.self_attn.weight"], a["layers.0.self_attn.weight"])  # t = 0
    np.testing.assert_array_equal(merged["layers.0.mlp.weight"], b["layers.0.mlp.weight"])  # t = 1
    with pytest.raises(InvalidArgumentError, match="'t' must be between 0 and 1"):
        client.merge("slerp", [ha, hb], t=[0.0, 1.5])


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return x[:1300], y[:1300].astype(np.int64), x[1300:], y[1300:].astype(np.int64)


def test_a_greedy_soup_on_digits_beats_or_ties_its_best_ingredient_and_puts_the_model_back(client: Client) -> None:
    x, y, xt, yt = digits()
    q = client.module(["sequential", ["linear", 64, 32], "relu", ["linear", 32, 10]])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q, 0.05, 0.9))
    client.train(m, x, y)
    client.train(m, batchsize=50, shuffle=True)
    client.test(m, xt, yt)
    client.test(m, metrics="accuracy")
    client.run(m)
    start = client.copyparms(m)
    ingredients = []
    for seed, lr in ((1, 0.05), (2, 0.02), (3, 0.08)):
        client.copyparms(m, start)
        client.lr(m, lr)
        client.train(m, seed=seed)
        client.run(m)
        client.run(m)
        ingredients.append(client.copyparms(m))
    client.copyparms(m, start)
    weights = client.dict(start)

    soup = client.soup(m, ingredients)
    assert isinstance(soup, Soup) and soup.metric == "accuracy" and soup.soup.kind == "dictionary"
    assert soup.score >= max(soup.scores)
    # model-soups' ranking: a stable sort from worst to best, reversed (ties last given first).
    assert soup.order == sorted(range(3), key=lambda i: soup.scores[i])[::-1] and soup.kept[0] == soup.order[0]
    assert len(soup.tried) == 3 and soup.tried[0] == max(soup.scores)
    for name, value in weights.items():  # the model's weights were put back
        np.testing.assert_array_equal(client.parm(m, name), value)
    assert client.test(m, "metrics") == ["accuracy"]
    client.copyparms(m, soup.soup)
    assert client.testrun(m) == pytest.approx(soup.score)


def test_a_soup_needs_test_data(client: Client) -> None:
    q = client.module(["linear", 2, 2])
    d = client.copyparms(q)
    m = client.model(q, client.loss("ce"), client.opt("sgd", q))
    with pytest.raises(FailedPreconditionError, match=r"test\(m, X, Y\)"):
        client.soup(m, [d])


@pytest.mark.parametrize("message", [
    "AverageDictionariesRequest", "MergeDictionariesRequest", "ApplyOuterStepRequest", "BuildGreedySoupRequest",
])
def test_every_new_request_carries_a_request_id_as_field_15(message: str) -> None:
    field = getattr(pb, message).DESCRIPTOR.fields_by_name["request_id"]
    assert field.number == 15 and field.type == field.TYPE_STRING


def test_repeated_averages_follow_every_change_to_their_inputs(client: Client) -> None:
    """A server keeps the plan of a repeated average (the same call over unchanged dictionaries); a
    value set in an input between rounds is averaged, and an entry replaced by one of another shape
    is refused as on a first call, with `into` unchanged."""
    values = arrays(3, seed=7)
    handles = [client.dict({k: v for k, v in d.items() if k != "n"}) for d in values]
    into = client.dict({"w": np.zeros((64, 33), np.float32), "b": np.zeros(33, np.float32)})
    for _ in range(2):
        client.average(handles, weights=[1, 2, 3], into=into)
    client.dict(handles[2], "w", values[2]["w"] * 4)
    client.average(handles, weights=[1, 2, 3], into=into)
    want = (values[0]["w"] + 2 * values[1]["w"] + 12 * values[2]["w"]) / 6
    np.testing.assert_allclose(client.dict(into, "w"), want, rtol=0, atol=1e-5)
    before = client.dict(into)
    client.dict(handles[1], "b", np.zeros(34, np.float32))
    with pytest.raises(InvalidArgumentError, match="'b'"):
        client.average(handles, weights=[1, 2, 3], into=into)
    after = client.dict(into)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_multislerp_without_a_direction_is_refused_over_the_wire_and_leaves_no_handle(client: Client) -> None:
    """The check that needs the data (the weighted mean of the directions is 0) comes in the run, after
    the plan: the call still answers INVALID_ARGUMENT naming the entry, and no dictionary is left."""
    a, b, c = (client.dict({"x": np.array(v, np.float32), "y": np.ones(2, np.float32)})
               for v in ([1.0, 2.0], [-1.0, -2.0], [1.0, 2.0]))
    before = {h.handle.id for h in client.handles()}
    with pytest.raises(InvalidArgumentError, match="entry 'x': the weighted mean of the models' directions is 0"):
        client.merge("multislerp", [a, b, c], weights=[1.0, 2.0, 1.0])
    assert {h.handle.id for h in client.handles()} == before
    np.testing.assert_allclose(client.dict(client.merge("multislerp", [a, c]), "x"), [1.0, 2.0], rtol=1e-6)
