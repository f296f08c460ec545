"""The object layer over the verbs: Module and Dictionary methods, and freeing by `with`."""

from __future__ import annotations

import numpy as np
import pytest

from weightavg import Client, Dictionary, Module, NotFoundError
from weightavg.v1 import weightavg_pb2 as pb

NET = ["sequential", ["linear", "a", 3, 4], ["batchnorm1d", "b", 4], ["linear", "c", 4, 2]]


def _live(c: Client) -> set[str]:
    return {i.handle.id for i in c.handles()}


def test_a_module_object_averages_like_the_verbs(client: Client) -> None:
    with client.Module(NET) as q:
        assert isinstance(q, Module) and q.handle.kind == "module"
        assert q.parameter_names() == client.parmnames(q.handle)
        assert [row.module for row in q.describe()] == ["sequential", "linear", "batchnorm1d", "linear"]
        weights = q.parameters()
        assert list(weights) == ["a.weight", "a.bias", "b.weight", "b.bias", "c.weight", "c.bias"]
        with q.copy() as avg:
            assert isinstance(avg, Dictionary) and avg.count == 1
            q.set_parameter("a.weight", weights["a.weight"] + 2.0)
            assert q.average_into(avg) == 2 and avg.count == 2
            np.testing.assert_allclose(avg["a.weight"], weights["a.weight"] + 1.0, rtol=0, atol=1e-6)
            assert avg.keys()[:-1] == list(weights) and ".n" in avg
            assert q.load(avg) == {name: True for name in weights}
            np.testing.assert_array_equal(q.parameters()["a.weight"], avg["a.weight"])
            assert set(q.buffers()) == {"b.running_mean", "b.running_var", "b.num_batches_tracked"}
            assert q.batchnorm() == {"b": 0.1}
            q.batchnorm({"b": 0.1})
        assert avg.id not in _live(client)  # the block freed it
        extra = q.addref()
    assert q.id not in _live(client) and extra.id in _live(client)  # the other handle keeps the module
    assert extra.parameters().keys() == weights.keys()
    extra.free()
    with pytest.raises(NotFoundError):
        extra.parameters()


def test_a_dictionary_object_reads_and_writes_entries(client: Client) -> None:
    with client.Dictionary({"w": np.arange(3, dtype=np.float32)}) as d:
        d["v"] = np.ones(2, np.float64)
        d.update({"w": np.zeros(3, np.float32)})
        values = d.to_dict()
        assert list(values) == ["w", "v"] and d.count == 1 and list(d) == ["w", "v"]
        np.testing.assert_array_equal(values["w"], np.zeros(3, np.float32))
        assert repr(d) == f"Dictionary({d.id!r})"
        d.free()  # freed inside the block: leaving it is still fine
    assert d.id not in _live(client)


def _fetched(c: Client) -> tuple[int, int]:
    """How many FetchTensors calls the server has finished, and the tensor bytes they sent."""
    service = pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name
    record = c.stats()["methods"].get(f"/{service}/FetchTensors", {})
    return record.get("count", 0), record.get("bytes_sent", 0)


def test_keys_and_count_read_sizes_not_tensors(client: Client) -> None:
    """keys(), iteration, `in` and count come from GetSize: a large dictionary's tensors stay on the server."""
    large = {f"layer{i}.weight": np.ones((512, 1024), np.float32) for i in range(8)}  # 16 MiB
    with client.Dictionary(large) as d:
        calls, sent = _fetched(client)
        assert d.keys() == list(large) and list(d) == list(large) and "layer0.weight" in d and ".n" not in d
        assert d.count == 1
        assert _fetched(client) == (calls, sent)  # not one FetchTensors call
        d[".n"] = np.float64(3.0)
        assert d.count == 3 and d.keys() == [*large, ".n"]
        assert _fetched(client) == (calls + 1, sent + 8)  # '.n' alone: one float64


def test_a_modules_parameters_come_in_one_fetch(client: Client) -> None:
    """Module.parameters() reads every parameter at once through a view (the values of one moment),
    not one call per parameter: the same values as parm(m, name), in registration order."""
    with client.Module(NET) as q:
        names = q.parameter_names()
        calls, sent = _fetched(client)
        values = q.parameters()
        assert list(values) == names
        assert _fetched(client) == (calls + 1, sent + sum(v.nbytes for v in values.values()))  # not one per name
        for name in names:
            np.testing.assert_array_equal(values[name], client.parm(q.handle, name))
        assert {i.handle.kind for i in client.handles()} == {"module"}  # the view was freed
