"""Running averages and EMAs through a real server after the calls that change what a cached
averaging plan (`domain/averaging._Plan`: names, data pointers, the native kernel's addresses)
describes: entries replaced or deleted, objects moved, freed and made again, sources alternated,
averages into themselves, the count replaced. Each result is compared bit for bit with torch's
`lerp_` in this process on the values fetched before the call (the server lerps as torch does)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from weightavg import Client, InvalidArgumentError

NET = ["sequential", ["linear", 8, 6], ["linear", 6, 4]]


def _tensor(a: np.ndarray) -> torch.Tensor:
    """numpy to torch; a bfloat16 array (ml_dtypes) by its bits."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def fetch(c: Client, d: object) -> dict[str, torch.Tensor]:
    return {name: _tensor(np.asarray(value)) for name, value in c.dict(d).items()}


def parameters(c: Client, m: object) -> dict[str, torch.Tensor]:
    d = c.copyparms(m)
    values = {name: value for name, value in fetch(c, d).items() if name != ".n"}
    c.free(d)
    return values


def scramble(c: Client, m: object, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, value in parameters(c, m).items():
        c.parm(m, name, torch.randn(value.shape, generator=g, dtype=torch.float64).numpy())


def assert_folded(c: Client, d: object, source: dict[str, torch.Tensor], call: Callable[[], float]) -> None:
    """Run `call` (an average of `source`'s values into d, returning the weight of the new sample)
    and check d against torch's `lerp_` of its values before, bit for bit, dtypes included."""
    before = fetch(c, d)
    weight = call()
    after = fetch(c, d)
    for name, value in source.items():
        expected = before[name].clone()
        if weight == 1.0:
            expected.copy_(value)
        else:
            expected.lerp_(value.to(expected.dtype), weight)
        assert after[name].dtype == expected.dtype, name
        assert torch.equal(after[name].view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), name


def swa(c: Client, m: object, d: object) -> Callable[[], float]:
    return lambda: 1.0 / c.avgparms(m, d)


def test_entries_replaced_with_tensors_of_the_same_size_or_deleted_and_added_back(client: Client) -> None:
    m = client.module(NET)
    d = client.copyparms(m)
    for seed in range(3):  # the plan is made, then reused
        scramble(client, m, seed)
        assert_folded(client, d, parameters(client, m), swa(client, m, d))
    client.dict(d, {"0.weight": np.zeros((6, 8), np.float32), "1.bias": np.ones(4, np.float32)})
    scramble(client, m, 10)
    assert_folded(client, d, parameters(client, m), swa(client, m, d))
    client.delete(d, "0.bias")
    client.dict(d, "0.bias", np.full(6, 3.0, np.float32))
    scramble(client, m, 11)
    assert_folded(client, d, parameters(client, m), swa(client, m, d))
    client.dict(d, "0.bias", np.full(6, 3.0, np.float64))  # same element count, another dtype
    scramble(client, m, 12)
    assert_folded(client, d, parameters(client, m), swa(client, m, d))


def test_a_live_view_target_and_a_source_moved_between_dtypes(client: Client) -> None:
    m = client.module(NET)
    target = client.module(NET)
    v = client.parms(target)
    for seed in range(2):
        scramble(client, m, seed)
        assert_folded(client, v, parameters(client, m), swa(client, m, v))
    for dtype in ("float64", "float32"):  # the view's tensors change dtype under it
        client.to(target, dtype=dtype)
        scramble(client, m, 20)
        assert_folded(client, v, parameters(client, m), swa(client, m, v))
    d = client.copyparms(m)
    for dtype in ("float64", "bfloat16", "float32"):  # the source's
        client.to(m, dtype=dtype)
        scramble(client, m, 30)
        assert_folded(client, d, parameters(client, m), swa(client, m, d))


def test_sources_freed_and_made_again_and_two_sources_alternated(client: Client) -> None:
    m = client.module(NET)
    d = client.copyparms(m)
    shapes = {name: tuple(value.shape) for name, value in parameters(client, m).items()}
    rng = np.random.default_rng(0)
    for _ in range(4):  # a new upload may land where the freed one lay
        s = client.dict({name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()})
        assert_folded(client, d, fetch(client, s), swa(client, s, d))
        client.free(s)
    s1 = client.copyparms(m)
    scramble(client, m, 40)
    s2 = client.copyparms(m)
    for k in range(4):
        s = (s1, s2)[k % 2]
        assert_folded(client, d, {n: t for n, t in fetch(client, s).items() if n != ".n"}, swa(client, s, d))


def test_averages_into_themselves_leave_the_values_and_count_up(client: Client) -> None:
    m = client.module(NET)
    d = client.copyparms(m)
    before = fetch(client, d)
    assert [client.avgparms(d, d) for _ in range(3)] == [2, 3, 4]
    assert all(torch.equal(fetch(client, d)[n], t) for n, t in before.items())
    v = client.parms(m)
    before = fetch(client, v)
    assert client.avgparms(m, v) == 2
    assert client.ema(m, v, decay=0.9) == 1
    assert client.ema(m, v, decay=0.9) == 2
    assert all(torch.equal(fetch(client, v)[n], t) for n, t in before.items())


def test_the_count_replaced_or_deleted_by_the_client_weights_the_next_sample(client: Client) -> None:
    m = client.module(NET)
    d = client.copyparms(m)
    client.avgparms(m, d)  # the count is now the dictionary's own, written in place
    for count, weight in ((0.0, 1.0), (None, 0.5), (3.0, 0.25)):
        if count is None:
            client.delete(d, ".n")
        else:
            client.dict(d, ".n", np.float64(count))
        scramble(client, m, int(count or 7))
        assert_folded(client, d, parameters(client, m), lambda: (client.avgparms(m, d), weight)[1])
        assert client.dict(d, ".n") == (count if count is not None else 1.0) + 1


def test_an_integer_parameter_is_copied_as_an_integer_buffer_is(client: Client) -> None:
    """The rule for every source: floating tensors are averaged, integer ones copied. A module's
    integer parameter (registered with parm) kept its dtype in copyparms, and every average into
    that copy was then refused ("'k' holds int64; an average needs a floating-point entry")."""
    m = client.module(["linear", 3, 2])
    client.parm(m, "k", np.arange(3, dtype=np.int64))
    d = client.copyparms(m)
    e = client.copyparms(m, dtype="float64")
    client.parm(m, "k", np.array([5, 6, 7]))
    scramble_weight = np.full((2, 3), 2.0, np.float32)
    client.parm(m, "weight", scramble_weight)
    assert client.avgparms(m, d) == 2
    assert client.ema(m, e, decay=0.5) == 1
    assert client.ema(m, e, decay=0.5) == 2
    for target in (d, e):
        got = client.dict(target)
        assert got["k"].dtype == np.int64
        np.testing.assert_array_equal(got["k"], [5, 6, 7])
    assert client.dict(d, "weight").dtype == np.float32


def test_a_missing_or_integer_entry_is_refused_with_the_fix_and_nothing_changes(client: Client) -> None:
    m = client.module(["linear", 3, 2])
    d = client.copyparms(m)
    client.delete(d, "bias")
    before = fetch(client, d)
    with pytest.raises(InvalidArgumentError, match=r"parameter 'bias' not found .* start the average from "
                                                   r"copyparms\(m\) \(CopyParameters\), or set the entry with "
                                                   r"dict\(d, 'bias', value\) \(UpdateDictionary\)"):
        client.avgparms(m, d)
    client.dict(d, "bias", np.zeros(2, np.int32))
    with pytest.raises(InvalidArgumentError, match="'bias' holds int32; an average needs a floating-point entry: "
                                                   "set it to a float32 or float64 tensor; nothing changed"):
        client.ema(m, d)
    after = fetch(client, d)
    assert after.keys() == {*before, "bias"} and torch.equal(after["weight"], before["weight"])
    assert client.size(d).get(".ema") is None
