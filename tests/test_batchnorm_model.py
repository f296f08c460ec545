"""batchnorm on a model: the reference's momentum walk-through, its errors, stopping midway, and a
differential test of the whole averaging recipe against torch.optim.swa_utils in-process."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from conftest import module_of
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from weightavg import Client, FailedPreconditionError, InvalidArgumentError
from weightavg_server.domain import losses, optimizers, specs, training
from weightavg_server.domain.errors import Cancelled

# The reference's network, scaled down: linear a, batchnorm b (eps 1e-7, momentum .1), relu c, linear d.
NET = ["sequential", ["linear", "a", 12, 24], ["batchnorm1d", "b", 24, 1e-7, 0.1], ["relu", "c"], ["linear", "d", 24, 3]]


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 12)) * 2 + 1).astype(np.float32)
    return x, x[:, :3].argmax(1).astype(np.int64)


def momentum(client: Client, q: Any) -> Any:
    return next(r for r in client.module(q) if r.module == "batchnorm1d").options["momentum"]


def test_momentum_walk_through(client: Client) -> None:
    """The reference's 'Momentum example', step by step, on synthetic data."""
    q = client.module(NET)
    b = client.buffers(q, "b")
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.05, 0.9, nesterov=True))
    x, y = data(400)
    client.train(m, batchsize=20, shuffle=True)
    assert client.train(m, x, y) == 20
    client.test(m, batchsize=1000, metrics="accuracy")
    client.test(m, x, y)
    for _ in range(3):
        client.run(m)
    assert client.testrun(m) > 80
    b1 = client.dict(b)
    assert b1["num_batches_tracked"] == 3 * 20

    # Data order fixed from here on, so the manual path sees the same batches as batchnorm(m).
    client.train(m, shuffle=False)
    assert client.batchnorm(m) == {"b": 0.1}
    b2 = client.dict(b)
    assert b2["num_batches_tracked"] == 20
    assert not np.allclose(b1["running_mean"], b2["running_mean"], rtol=0, atol=1e-6)
    assert momentum(client, q) == 0.1

    assert client.batchnorm(q) == {"b": 0.1}
    assert momentum(client, q) is None
    reset = client.dict(b)
    np.testing.assert_array_equal(reset["running_mean"], np.zeros(24, np.float32))
    np.testing.assert_array_equal(reset["running_var"], np.ones(24, np.float32))
    assert reset["num_batches_tracked"] == 0

    assert client.restore(m) == 400
    xi = client.input(m)
    assert client.size(xi) == (400, 12)
    while client.batch(xi, 20):
        client.free(client.nforward(q, xi))
    b3 = client.dict(b)
    # Same batches through the same kernels: the statistics are bit for bit those of batchnorm(m).
    for key in b2:
        np.testing.assert_array_equal(b3[key], b2[key], err_msg=key)
    assert client.batchnorm(q, {"b": 0.1}) is None
    assert momentum(client, q) == 0.1
    assert client.module(q)[2].options == {"in": 24, "eps": 1e-7, "momentum": 0.1, "affine": True, "track": True}


def test_batchnorm_model_without_data_resets_nothing(client: Client, unchanged: Any) -> None:
    q = client.module(NET)
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q))
    client.dict(client.buffers(q, "b"), {"running_mean": 0.5, "running_var": 2.0, "num_batches_tracked": 7})
    with unchanged(), pytest.raises(FailedPreconditionError, match="no training data"):
        client.batchnorm(m)
    assert momentum(client, q) == 0.1


def test_batchnorm_model_failing_midway_puts_everything_back(client: Client, live_server: Any, unchanged: Any) -> None:
    q = client.module(NET)
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q))
    client.dict(client.buffers(q, "b"), {"running_mean": 0.5, "running_var": 2.0, "num_batches_tracked": 7})
    x, y = data(33)
    client.train(m, x, y)  # batches of 32 and 1: batchnorm cannot take a batch of one in train mode
    module_of(live_server.registry, q.id).eval()
    with unchanged(), pytest.raises(InvalidArgumentError, match="batch 2 of 2.*more than 1 value per channel"):
        client.batchnorm(m)
    assert momentum(client, q) == 0.1
    assert client.module(q)[2].options["momentum"] == 0.1
    assert client.restore(m) == 33
    client.train(m, droplast=True)
    assert client.batchnorm(m) == {"b": 0.1}
    assert client.dict(client.buffers(q, "b"), "num_batches_tracked") == 1


def test_batchnorm_model_without_batchnorm_layers(client: Client) -> None:
    q = client.module(["linear", 12, 3])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q))
    client.train(m, *data(10))
    assert client.batchnorm(m) == {}


def test_stopping_midway_puts_statistics_momenta_and_flags_back() -> None:
    """Domain level, where the stop signal can be given after an exact number of batches."""
    module = specs.build_module(specs.LayerSpec("sequential", children=(
        specs.LayerSpec("linear", "a", (12, 24)), specs.LayerSpec("batchnorm1d", "b", (24, 1e-7, 0.3)),
    )))
    model = training.create_model(module, losses.create_loss("ce"), optimizers.create_optimizer("sgd", module))
    x, y = data(100)
    training.set_data(model, "train", torch.from_numpy(x), torch.from_numpy(y), torch.device("cpu"))
    training.set_options(model, "train", [("batchsize", 10)])
    module.b.running_mean.fill_(0.5)
    module.eval()
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled, match="stopped after 3 of 10 batches"):
        training.recalculate_batchnorm(model, stop_after_three)
    assert torch.equal(module.b.running_mean, torch.full((24,), 0.5))
    assert int(module.b.num_batches_tracked) == 0 and module.b.momentum == 0.3
    assert not any(m.training for m in module.modules())
    calls.clear()
    with pytest.raises(Cancelled, match="run stopped after 3 of 10"):
        training.run_epoch(model, stop_after_three)
    assert not module.training and x.shape[0] == training.restore_data(model)
    assert training.recalculate_batchnorm(model) == {"b": 0.3}
    assert int(module.b.num_batches_tracked) == 10


def _local_net(client: Client, q: Any) -> torch.nn.Module:
    net = torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(12, 24), b=torch.nn.BatchNorm1d(24, eps=1e-7, momentum=0.1), c=torch.nn.ReLU(),
        d=torch.nn.Linear(24, 3),
    ))
    state = {**client.dict(client.parms(q)), **client.dict(client.buffers(q))}
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return net


def test_averaging_recipe_matches_torch_swa_utils(client: Client) -> None:
    """Train, average over epochs, copy the average back and recalculate batchnorm: through the
    server, and in plain PyTorch with AveragedModel and update_bn on the same seeds, data order and
    hyper-parameters. The two agree to float32 rounding (the averages use lerp_ on one side and
    p + (q - p)/(n + 1) on the other), well inside 1e-6."""
    seed, w, n = 11, 25, 300
    x, y = data(n, seed=3)
    q = client.module(NET)
    net = _local_net(client, q)
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.05, 0.9, nesterov=True))
    client.train(m, batchsize=w, shuffle=True, seed=seed)
    client.train(m, x, y)

    local_opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(seed)
    lx, ly = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

    def local_epoch() -> float:
        nonlocal lx, ly
        perm = torch.randperm(n, generator=generator)
        lx, ly = lx[perm], ly[perm]
        losses = []
        net.train()
        for i in range(0, n, w):
            local_opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(lx[i:i + w]), ly[i:i + w])
            loss.backward()
            local_opt.step()
            losses.append(loss.item())
        return float(np.mean(losses))

    for _ in range(3):
        assert client.run(m) == pytest.approx(local_epoch(), rel=1e-6)
    p = client.copyparms(m)
    swa = AveragedModel(net)
    swa.update_parameters(net)
    for _ in range(4):
        client.run(m)
        assert client.avgparms(m, p) == _ + 2
        local_epoch()
        swa.update_parameters(net)
    assert client.copyparms(m, p) == dict.fromkeys(client.parmnames(q), True)
    assert client.batchnorm(m) == {"b": 0.1}
    update_bn([lx[i:i + w] for i in range(0, n, w)], swa)

    remote = {**client.dict(client.parms(q)), **client.dict(client.buffers(q))}
    local = swa.module.state_dict()
    assert remote.keys() == local.keys()
    worst = 0.0
    for key, value in remote.items():
        diff = np.abs(np.asarray(value, np.float64) - local[key].double().numpy()).max()
        worst = max(worst, float(diff))
    assert worst <= 1e-6, worst
    assert remote["b.num_batches_tracked"] == n // w
    # The server's data ended in the same order as the local copy (same generator draws).
    np.testing.assert_array_equal(client.tensor(client.input(m)), lx.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_averaging_recipe_on_cuda_matches_cpu_torch() -> None:
    """The same recipe with the server's objects on the GPU; CUDA kernels round differently from
    the CPU ones, so the comparison allows 1e-4 after a few hundred steps."""
    from weightavg_server.ops.app import create_server
    from weightavg_server.ops.config import ServerConfig

    server, port, _ = create_server(ServerConfig(host="127.0.0.1", port=0, device="cuda"))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            x, y = data(300, seed=3)
            q = c.module(NET)
            net = _local_net(c, q)
            m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.05))
            c.train(m, batchsize=25)
            c.train(m, x, y)
            local_opt = torch.optim.SGD(net.parameters(), lr=0.05)
            lx, ly = torch.from_numpy(x), torch.from_numpy(y)
            for _ in range(2):
                c.run(m)
                for i in range(0, 300, 25):
                    local_opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(lx[i:i + 25]), ly[i:i + 25]).backward()
                    local_opt.step()
            assert c.batchnorm(m) == {"b": 0.1}
            update_bn([lx[i:i + 25] for i in range(0, 300, 25)], net)
            remote = {**c.dict(c.parms(q)), **c.dict(c.buffers(q))}
            for key, value in net.state_dict().items():
                np.testing.assert_allclose(np.asarray(remote[key]), value.numpy(), rtol=0, atol=1e-4, err_msg=key)
            assert c.handles()[0].device.startswith("cuda")
            np.testing.assert_allclose(c.evaluate(m, x), net.eval()(lx).detach().numpy(), rtol=0, atol=1e-4)
    finally:
        server.stop(grace=None)
