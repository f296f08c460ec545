"""Replacing a model's parts (model(m, part...)), run(m, x, y), testbatch and testrestore, and a
long run cancelled by the client over the wire."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import numpy as np
import pytest

from weightavg import Client, FailedPreconditionError, Handle, InvalidArgumentError, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

NET = ["sequential", ["linear", "a", 4, 6], ["relu", "r"], ["linear", "b", 6, 3]]


def _data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n)


def _module(c: Client, seed: int = 5, spec: Any = NET) -> Handle:
    """A module with fixed weights, so twins on the server start equal."""
    rng = np.random.default_rng(seed)
    q = c.module(spec)
    for name in c.parmnames(q):
        c.parm(q, name, rng.standard_normal(c.parm(q, name).shape).astype(np.float32))
    return q


def _weights(c: Client, m: Handle) -> dict[str, bytes]:
    return {n: c.parm(m, n).tobytes() for n in c.parmnames(m)}


def _trained(c: Client, loss: Handle, opt: Any) -> Handle:
    """A model built directly from the parts: the oracle for one whose parts were replaced."""
    q = _module(c)
    m = c.model(c.addref(q), loss, opt(q))
    c.train(m, batchsize=8, shuffle=True, seed=4)
    c.train(m, *_data())
    c.run(m)
    return m


# -- what an optimizer keeps alive -----------------------------------------------------------------

_MIB = ["linear", 512, 512]  # 1,050,624 bytes of float32 parameters
_CAP = 4 << 20
"""Room for two such modules and the creation of the second, which holds its 1 MiB weight twice for a
moment (`footprint.module_bytes`), but not for a third's creation beside them: were a freed module's
bytes charged to no one, that third would fit."""


def test_an_optimizer_keeps_its_module_charged_after_the_module_handle_is_freed(start_server: Any) -> None:
    # The optimizer's parameter groups hold the module: freeing the module handle frees no memory.
    # Its bytes were charged to nothing after the free, so module, opt, free repeated held any amount
    # under a 3 MiB cap.
    server = start_server(max_device_bytes=_CAP)
    with Client(server.address) as c:
        kept = []
        for _ in range(2):
            q = c.module(_MIB)
            kept.append(c.opt("sgd", q, 0.1))
            c.free(q)
        assert server.registry.held_bytes() == {"cpu": 2 * 1_050_624}
        with pytest.raises(ResourceExhaustedError):
            c.module(_MIB)


def test_an_optimizer_left_over_a_replaced_module_keeps_that_module_charged(start_server: Any) -> None:
    # opt(m) made but not given to the model: after model(m, q2, o2) it alone holds the old module.
    server = start_server(max_device_bytes=_CAP)
    with Client(server.address) as c:
        q = c.module(_MIB)
        m = c.model(q, c.loss("mse"), c.opt("sgd", q, 0.1))
        spare = c.opt("adam", m)
        q2 = c.module(_MIB)
        c.model(m, q2, c.opt("sgd", q2, 0.1))
        assert server.registry.held_bytes() == {"cpu": 2 * 1_050_624}
        with pytest.raises(ResourceExhaustedError):
            c.module(_MIB)
        c.free(spare)
        assert server.registry.held_bytes() == {"cpu": 1_050_624}


# -- model(m, part...) ---------------------------------------------------------------------------


def test_replacing_the_loss_and_the_optimizer_trains_as_a_model_built_with_them(client: Client) -> None:
    q = _module(client)
    m = client.model(client.addref(q), client.loss("mse"), client.opt("sgd", q, 0.5))
    client.train(m, batchsize=8, shuffle=True, seed=4)
    client.train(m, *_data())
    loss, adam = client.loss("ce", smoothing=0.1), client.opt("adam", m, 0.01)
    assert client.model(m, adam, loss) == m  # any order, as the reference takes them by class
    described = client.model(m)
    assert described["loss"] == {"type": "ce", "ignore": -100, "smoothing": 0.1, "reduce": "mean"}
    assert described["optimizer"]["type"] == "adam"
    assert described["train"]["batchsize"] == 8 and described["train_size"] == 60  # options and data kept
    live = {i.handle.id for i in client.handles()}
    assert loss.id not in live and adam.id not in live  # consumed, as by model(q, loss, opt)
    client.run(m)
    oracle = _trained(client, client.loss("ce", smoothing=0.1), lambda q2: client.opt("adam", q2, 0.01))
    assert _weights(client, m) == _weights(client, oracle)


def test_replacing_the_module_with_an_optimizer_over_it(client: Client) -> None:
    first = _module(client, 9)
    m = client.model(first, client.loss("ce"), client.opt("sgd", first, 0.1))
    client.train(m, batchsize=8, shuffle=True, seed=4)
    client.train(m, *_data())
    q = _module(client)
    assert client.model(m, q, client.opt("sgd", q, 0.2, 0.9)) == m
    assert client.model(m)["optimizer"]["momentum"] == 0.9
    client.run(m)
    oracle = _trained(client, client.loss("ce"), lambda q2: client.opt("sgd", q2, 0.2, 0.9))
    assert _weights(client, m) == _weights(client, oracle)


def test_bad_replacements_change_nothing(client: Client, unchanged: Any) -> None:
    q = _module(client)
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q))
    other = _module(client, 2)
    shared = _module(client, 3)
    kept = client.addref(shared)
    parts = [client.loss("mse"), client.loss("nll"), client.opt("sgd", other), client.opt("sgd", shared)]
    d = client.copyparms(q)
    described = client.model(m)
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="give an optimizer built over the new module too"):
            client.model(m, other)
        with pytest.raises(InvalidArgumentError, match="built over a different module"):
            client.model(m, parts[2])
        with pytest.raises(InvalidArgumentError, match="built over a different module"):
            client.model(m, other, parts[3])
        with pytest.raises(InvalidArgumentError, match="two loss handles"):
            client.model(m, parts[0], parts[1])
        with pytest.raises(InvalidArgumentError, match="other handles"):
            client.model(m, shared, parts[3])  # `kept` would reach the model's module under another lock
        with pytest.raises(InvalidArgumentError, match="expecting module or loss or optimizer"):
            client.model(m, d)
    assert client.model(m) == described
    live = {i.handle.id for i in client.handles()}
    assert {kept.id, other.id, shared.id, d.id, *(p.id for p in parts)} <= live  # nothing consumed


def test_a_replacement_that_would_not_take_the_loaded_data_is_refused(client: Client, unchanged: Any) -> None:
    """Found by review: UpdateModel kept data whose dtypes the new parts refuse, and the next run
    failed with torch's own text ("Expected tensor for argument #1 'indices'", "mat1 and mat2 must
    have the same dtype"). Dtypes are checked at upload, never first at run: the swap is refused."""
    x, y = _data()
    q = _module(client)
    m = client.model(q, client.loss("ce"), client.opt("sgd", q))
    client.train(m, x, y)
    client.test(m, x, y)
    embedding = client.module(["sequential", ["embedding", "e", 10, 4], ["linear", "b", 4, 3]])
    wide = _module(client, 2)
    client.to(wide, dtype="float64")
    mse = client.loss("mse")
    over_embedding, over_wide = client.opt("sgd", embedding), client.opt("sgd", wide)
    described = client.model(m)
    with unchanged():
        with pytest.raises(InvalidArgumentError, match=r"holds training inputs in float32.*embedding.*nothing changed"):
            client.model(m, embedding, over_embedding)
        with pytest.raises(InvalidArgumentError, match=r'take float64\); nothing changed: convert the new module to '
                           r'float32 \(to\(q, dtype="float32"\)\)'):
            client.model(m, wide, over_wide)
    assert client.model(m) == described
    client.run(m)
    client.testrun(m)

    # float targets for mse, then a loss that takes class indices only
    r = _module(client, 3)
    reg = client.model(r, mse, client.opt("sgd", r))
    client.train(reg, x, np.eye(3, dtype=np.float32)[y])
    nll = client.loss("nll")
    with unchanged(), pytest.raises(InvalidArgumentError, match="holds training targets in float32.*nll loss"):
        client.model(reg, nll)
    client.run(reg)

    # parts that take the data as held still replace: a float32 module over the same data
    other = _module(client, 4)
    client.model(m, other, client.opt("sgd", other))
    client.run(m)


# -- run(m, x, y), testbatch, testrestore ----------------------------------------------------------


def test_run_with_data_loads_them_then_trains_one_epoch(client: Client) -> None:
    x, y = _data(40, 1)
    q = _module(client)
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.1))
    client.train(m, batchsize=8)
    twin_q = _module(client)
    twin = client.model(client.addref(twin_q), client.loss("ce"), client.opt("sgd", twin_q, 0.1))
    client.train(twin, batchsize=8)
    client.train(twin, x, y)
    assert client.run(m, x, y) == client.run(twin)
    assert client.model(m)["train_size"] == 40
    assert _weights(client, m) == _weights(client, twin)
    with pytest.raises(TypeError):
        client.run(m, x)


def test_testbatch_steps_the_test_data_by_the_test_batchsize(client: Client) -> None:
    q = _module(client)
    m = client.model(q, client.loss("ce"), client.opt("sgd", q))
    with pytest.raises(FailedPreconditionError, match="no testing data"):
        client.testbatch(m)
    assert client.testrestore(m) == -1
    x = np.arange(250 * 4, dtype=np.float32).reshape(250, 4)
    client.test(m, x, np.zeros(250, np.int64))
    client.test(m, batchsize=100)
    client.train(m, *_data(30))
    sizes = []
    while client.testbatch(m):
        out = client.eforward(m)  # a model's eforward uses its test inputs: the batch in place
        sizes.append(client.size(out)[0])
    assert sizes == [100, 100, 50]
    client.testbatch(m)
    assert client.testrestore(m) == 250
    assert client.model(m)["test_size"] == 250 and client.size(client.eforward(m)) == (250, 3)
    assert client.model(m)["train_size"] == 30 and client.size(client.input(m)) == (30, 4)  # untouched
    t = client.tensor(x)
    with grpc.insecure_channel(client.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        for handle, size, message in ((m.id, 5, "test batchsize"), (t.id, 5, "a tensor handle takes none")):
            with pytest.raises(grpc.RpcError) as exc:
                stub.NextBatch(pb.NextBatchRequest(handle=handle, size=size, split=pb.DATA_SPLIT_TEST))
            assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in exc.value.details()


# -- cancellation over the wire ----------------------------------------------------------------------


def test_a_client_cancelling_a_long_run_stops_it_between_batches(client: Client, live_server: Any) -> None:
    """The client cancels the RunEpoch stream; the server stops before its next batch, puts back the
    train flags and the data size, and answers the next call on the same model."""
    q = client.module(["linear", 4, 2])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("adam", q))
    n = 200_000
    client.train(m, batchsize=1)
    client.train(m, np.ones((n, 4), np.float32), np.zeros(n, np.int64))
    xi = client.input(m)
    client.batch(xi, 10)  # the data stand at a batch: run puts them to full size, and so must a cancel
    entry = live_server.registry.get(m.id)
    module = entry.obj.module
    module.eval()  # the flag run sets to train and must put back
    stepped = threading.Event()
    optim = entry.obj.optimizer.optim
    hook = optim.register_step_post_hook(lambda *_: stepped.set())
    try:
        with grpc.insecure_channel(live_server.address) as channel:
            call = pb_grpc.WeightAveragingServiceStub(channel).RunEpoch(pb.RunEpochRequest(model=m.id), timeout=600)
            assert stepped.wait(120), "the epoch never started"
            call.cancel()
            with pytest.raises(grpc.RpcError) as exc:
                list(call)
            assert exc.value.code() is grpc.StatusCode.CANCELLED
    finally:
        hook.remove()
    # The next call on the model waits for its lock, so the stopped epoch has finished cleaning up.
    assert client.restore(m) == n
    steps = [int(s["step"]) for s in optim.state.values()]
    assert steps and 0 < max(steps) < n  # stopped between batches, well before the end
    assert not module.training  # every train flag put back
    assert client.size(xi) == (n, 4)
    client.train(m, batchsize=50_000)
    assert isinstance(client.run(m), float)  # responsive: the same model trains again
