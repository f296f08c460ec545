"""Every transcript of the reference's weight-averaging page that needs no training, through a real server."""

from __future__ import annotations

import numpy as np
import pytest

from weightavg import Client, InvalidArgumentError

BN_NET = [
    "sequential",
    ["linear", "a", 784, 800],
    ["batchnorm1d", "b", 800, 1e-7, 0.1],
    ["relu", "c"],
    ["linear", "d", 800, 10],
]


def test_copyparms_makes_a_dictionary_of_parameter_copies(client: Client) -> None:
    m = client.module(["linear", 64, 10])
    p = client.copyparms(m)
    assert p.kind == "dictionary"
    assert client.size(p) == {"weight": (10, 64), "bias": (10,)}
    assert client.dict(p, "weight").dtype == np.float32
    np.testing.assert_array_equal(client.dict(p, "weight"), client.parm(m, "weight"))


def test_copyparms_back_into_the_module(client: Client) -> None:
    m = client.module(["linear", 64, 10])
    assert client.parmnames(m) == ["weight", "bias"]
    p = client.copyparms(m)
    bias = client.dict(p, "bias")
    assert bias.shape == (10,) and np.any(bias != 0)
    client.dict(p, "bias", 0)
    assert client.copyparms(m, p) == {"weight": True, "bias": True}
    b = client.parm(m, "bias")
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, np.zeros(10, np.float32))


def test_scalar_copy_broadcast_and_size_error(client: Client, unchanged) -> None:  # type: ignore[no-untyped-def]
    m = client.module(["linear", 4, 2])
    bias = client.parm(m, "bias")
    p = client.dict({"weight": 1, "other": 2})
    assert client.copyparms(m, p) == {"weight": True, "bias": False}
    np.testing.assert_array_equal(client.parm(m, "weight"), np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(client.parm(m, "bias"), bias)

    client.dict(p, "weight", np.ones((2, 3), np.int64))
    client.parm(m, "weight", 5)
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.copyparms(m, p)
    assert "The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 1" in err.value.message
    assert err.value.code == "INVALID_ARGUMENT"

    client.dict(p, "weight", np.ones((1, 4), np.int64))
    assert client.copyparms(m, p) == {"weight": True, "bias": False}
    np.testing.assert_array_equal(client.parm(m, "weight"), np.ones((2, 4), np.float32))


def test_avgparms_walk_through(client: Client) -> None:
    m = client.module(["linear", 2, 1])
    client.parm(m, "weight", np.array([[-0.4876026, -0.3645594]], np.float32))
    client.parm(m, "bias", np.array([-0.1412306], np.float32))
    p = client.copyparms(m)
    values = client.dict(p)
    assert list(values) == ["weight", "bias"]
    np.testing.assert_array_equal(values["weight"], np.array([[-0.4876026, -0.3645594]], np.float32))

    client.parm(m, "weight", 10)
    assert client.avgparms(m, p) == 2
    values = client.dict(p)
    assert list(values) == ["weight", "bias", ".n"]
    # float32 arithmetic: the reference prints 7 significant digits, so compare to that precision.
    np.testing.assert_allclose(values["weight"], [[4.756198, 4.81772]], rtol=2e-7)
    np.testing.assert_allclose(values["bias"], [-0.1412306], rtol=2e-7)
    assert values[".n"] == 2.0 and isinstance(values[".n"], float)

    for _ in range(10):
        client.avgparms(m, p)
    values = client.dict(p)
    np.testing.assert_allclose(values["weight"], [[9.126033, 9.136288]], rtol=5e-7)
    np.testing.assert_allclose(values["bias"], [-0.1412306], rtol=2e-7)
    assert values[".n"] == 12.0
    # Against an independent oracle: the plain mean of the 12 samples, in float64.
    expected = (np.array([-0.4876026, -0.3645594]) + 11 * 10.0) / 12
    np.testing.assert_allclose(values["weight"][0], expected, rtol=1e-6)


def test_batchnorm_parms_buffers_and_options_table(client: Client) -> None:
    q = client.module(BN_NET)
    p = client.parms(q, "b")
    b = client.buffers(q, "b")
    values = client.dict(p)
    np.testing.assert_array_equal(values["weight"], np.ones(800, np.float32))
    np.testing.assert_array_equal(values["bias"], np.zeros(800, np.float32))
    buffers = client.dict(b)
    assert list(buffers) == ["running_mean", "running_var", "num_batches_tracked"]
    np.testing.assert_array_equal(buffers["running_mean"], np.zeros(800, np.float32))
    np.testing.assert_array_equal(buffers["running_var"], np.ones(800, np.float32))
    assert buffers["num_batches_tracked"] == 0

    rows = client.module(q)
    assert [(r.depth, r.module, r.name) for r in rows] == [
        (0, "sequential", ""), (1, "linear", "a"), (1, "batchnorm1d", "b"), (1, "relu", "c"), (1, "linear", "d"),
    ]
    bn = next(r for r in rows if r.module == "batchnorm1d")
    assert bn.options == {"in": 800, "eps": 1e-7, "momentum": 0.1, "affine": True, "track": True}
    assert client.parmnames(q) == ["a.weight", "a.bias", "b.weight", "b.bias", "d.weight", "d.bias"]
    assert client.buffernames(q) == ["b.running_mean", "b.running_var", "b.num_batches_tracked"]
    assert client.parmnames(q, "b") == ["weight", "bias"]
    assert client.size(q) == 6


def test_batchnorm_reset_then_restore_momentum(client: Client) -> None:
    q = client.module(BN_NET)
    b = client.buffers(q, "b")
    # Stand-in for training: running statistics that differ from the reset values.
    client.dict(b, {"running_mean": 0.5, "running_var": 2.0, "num_batches_tracked": 12000})
    assert client.dict(b, "num_batches_tracked") == 12000

    r = client.batchnorm(q)
    assert r == {"b": 0.1}
    bn = next(row for row in client.module(q) if row.module == "batchnorm1d")
    assert bn.options["momentum"] is None
    assert bn.options["eps"] == 1e-7
    buffers = client.dict(b)
    np.testing.assert_array_equal(buffers["running_mean"], np.zeros(800, np.float32))
    np.testing.assert_array_equal(buffers["running_var"], np.ones(800, np.float32))
    assert buffers["num_batches_tracked"] == 0

    assert client.batchnorm(q, r) is None
    bn = next(row for row in client.module(q) if row.module == "batchnorm1d")
    assert bn.options == {"in": 800, "eps": 1e-7, "momentum": 0.1, "affine": True, "track": True}


def test_batchnorm_none_momentum_round_trips(client: Client) -> None:
    q = client.module(["sequential", ["batchnorm1d", "x", 4, {"momentum": None}], ["batchnorm2d", "y", 3]])
    r = client.batchnorm(q)
    assert r == {"x": None, "y": 0.1}
    client.batchnorm(q, r)
    rows = {row.name: row.options["momentum"] for row in client.module(q)[1:]}
    assert rows == {"x": None, "y": 0.1}


def test_batchnorm_without_batchnorm_layers_is_empty(client: Client) -> None:
    assert client.batchnorm(client.module(["linear", 3, 2])) == {}


def test_root_batchnorm_has_empty_name(client: Client) -> None:
    q = client.module(["batchnorm1d", 5])
    assert client.batchnorm(q) == {"": 0.1}
