"""Losses, optimizers, models, options, data, epochs, forwards and batching through a real server.

Oracles are in-process PyTorch computations on the same weights and data; every error path also
checks that the failed call changed nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from conftest import LiveServer, module_of
from faults import stalling_channel
import torch

from weightavg import (
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

BN_NET = ["sequential", ["linear", "a", 8, 16], ["batchnorm1d", "b", 16, 1e-5, 0.1], ["relu", "c"], ["linear", "d", 16, 4]]


def data(n: int = 96, d: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable synthetic classification data: the label is the argmax of the first `classes` features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, x[:, :classes].argmax(1).astype(np.int64)


def _layer(row: Any) -> torch.nn.Module:
    o = row.options
    if row.module == "linear":
        return torch.nn.Linear(o["in"], o["out"], bias=o["bias"])
    if row.module == "batchnorm1d":
        return torch.nn.BatchNorm1d(o["in"], eps=o["eps"], momentum=o["momentum"])
    if row.module == "relu":
        return torch.nn.ReLU()
    raise AssertionError(row.module)


def local_copy(client: Client, q: Any) -> torch.nn.Module:
    """An in-process torch module with the server module's layout, parameters and buffers."""
    rows = client.module(q)
    if rows[0].module == "sequential":
        net: torch.nn.Module = torch.nn.Sequential(OrderedDict((row.name, _layer(row)) for row in rows[1:]))
    else:
        net = _layer(rows[0])
    state = {**client.dict(client.parms(q)), **client.dict(client.buffers(q))}
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return net


def server_state(client: Client, q: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in {**client.dict(client.parms(q)), **client.dict(client.buffers(q))}.items()}


def assert_state_close(client: Client, q: Any, net: torch.nn.Module, atol: float) -> None:
    remote = server_state(client, q)
    local = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    assert remote.keys() == local.keys()
    for k in remote:
        assert remote[k].dtype == local[k].dtype, k
        np.testing.assert_allclose(remote[k], local[k], rtol=0, atol=atol, err_msg=k)


def new_model(client: Client, spec: Any = None, *opt: Any, **opt_kw: Any) -> tuple[Any, Any]:
    q = client.module(spec or ["linear", 8, 4])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, *opt, **opt_kw))
    return q, m


# -- losses -----------------------------------------------------------------------------------------

LOSS_CASES = [
    ("ce", (), {}, lambda o, y: torch.nn.functional.cross_entropy(o, y)),
    ("ce", (), {"smoothing": 0.2, "reduce": "sum"},
     lambda o, y: torch.nn.functional.cross_entropy(o, y, label_smoothing=0.2, reduction="sum")),
    ("ce", (1,), {}, lambda o, y: torch.nn.functional.cross_entropy(o, y, ignore_index=1)),
    ("nll", (), {}, lambda o, y: torch.nn.functional.nll_loss(o, y)),
    ("mse", (), {}, lambda o, y: torch.nn.functional.mse_loss(o, y)),
    ("bcelogits", ("sum",), {}, lambda o, y: torch.nn.functional.binary_cross_entropy_with_logits(o, y, reduction="sum")),
    ("smoothl1", (), {"beta": 0.5}, lambda o, y: torch.nn.functional.smooth_l1_loss(o, y, beta=0.5)),
]


@pytest.mark.parametrize(("kind", "args", "kwargs", "oracle"), LOSS_CASES)
def test_loss_values_match_torch(client: Client, kind: str, args: tuple, kwargs: dict, oracle: Any) -> None:
    x, labels = data(40)
    q = client.module(["linear", 8, 4])
    loss = client.loss(kind, *args, **kwargs)
    m = client.model(client.addref(q), loss, client.opt("sgd", q))
    target = labels if kind in ("ce", "nll") else np.eye(4, dtype=np.float32)[labels]
    client.test(m, x, target)
    client.test(m, batchsize=40, metrics="loss")
    net = local_copy(client, q)
    with torch.no_grad():
        expected = oracle(net(torch.from_numpy(x)), torch.from_numpy(target))
    assert client.testrun(m) == pytest.approx(float(expected), rel=1e-6)


def test_bce_needs_probabilities_and_describes_options(client: Client) -> None:
    x, labels = data(20)
    q = client.module(["sequential", ["linear", 8, 1], "sigmoid"])
    m = client.model(client.addref(q), client.loss("bce"), client.opt("adam", q))
    client.test(m, x, (labels[:, None] > 1).astype(np.float32))
    assert isinstance(client.testrun(m), float)
    assert client.model(m)["loss"] == {"type": "bce", "reduce": "mean"}


def test_loss_errors(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="unrecognized loss"):
        client.loss("hinge")
    with pytest.raises(InvalidArgumentError, match="unknown option 'weight'"):
        client.loss("ce", weight=1.0)
    with pytest.raises(InvalidArgumentError, match="smoothing"):
        client.loss("ce", smoothing=1.5)
    with pytest.raises(InvalidArgumentError, match="reduce"):
        client.loss("mse", "none")
    with pytest.raises(InvalidArgumentError, match="too many positional"):
        client.loss("mse", "sum", 1)
    with pytest.raises(InvalidArgumentError, match="given by position and by name"):
        client.loss("smoothl1", "sum", reduce="mean")
    assert client.handles() == []


# -- optimizers -------------------------------------------------------------------------------------

OPT_CASES = [
    ("sgd", (0.05, 0.9), {"nesterov": True}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", (), {"decay": 0.01, "dampening": 0.1, "momentum": 0.5},
     lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.5, dampening=0.1, weight_decay=0.01)),
    ("adam", (0.01,), {"amsgrad": True}, lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True)),
    ("adamw", (), {"beta1": 0.8}, lambda p: torch.optim.AdamW(p, lr=0.001, betas=(0.8, 0.999), weight_decay=0.01)),
    ("rmsprop", (0.01, 0.9), {"centered": True, "momentum": 0.1},
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, centered=True, momentum=0.1)),
    ("adagrad", (0.1,), {"lrdecay": 0.01, "init": 0.1},
     lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
]


@pytest.mark.parametrize(("kind", "args", "kwargs", "oracle"), OPT_CASES)
def test_optimizer_steps_match_torch(client: Client, kind: str, args: tuple, kwargs: dict, oracle: Any) -> None:
    x, y = data(48)
    q = client.module(["linear", 8, 4])
    m = client.model(client.addref(q), client.loss("ce"), client.opt(kind, q, *args, **kwargs))
    net = local_copy(client, q)
    client.train(m, batchsize=16)
    assert client.train(m, x, y) == 3
    local = oracle(list(net.parameters()))
    for _ in range(2):
        losses = client.train(m, metrics="batchloss") or client.run(m)
        for i in range(3):
            local.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[i * 16:(i + 1) * 16])), torch.from_numpy(y[i * 16:(i + 1) * 16]))
            loss.backward()
            local.step()
            assert losses[i] == pytest.approx(loss.item(), rel=1e-6)
    # Same kernels on the same values in the same order: equal up to float32 rounding.
    assert_state_close(client, q, net, atol=1e-6)


def test_opt_defaults_options_and_lr(client: Client) -> None:
    q = client.module(["linear", 8, 4])
    o = client.opt("sgd", q)
    assert client.lr(o) == 0.01
    assert client.lr(o, 0.2) is None and client.lr(o) == 0.2
    m = client.model(q, client.loss("ce"), o)
    assert client.model(m)["optimizer"] == {
        "type": "sgd", "lr": 0.2, "momentum": 0.0, "dampening": 0.0, "decay": 0.0, "nesterov": False,
    }
    client.lr(m, 0.04)
    assert client.lr(m) == 0.04
    client.lr(m, np.float32(0.5))  # numpy numbers are numbers
    assert client.lr(m) == pytest.approx(0.5)
    for wrong in (True, np.bool_(True), "0.3"):  # float() took these as 1.0 and 0.3; opt() refuses them
        with pytest.raises(TypeError, match="the learning rate must be a number"):
            client.lr(m, wrong)
    assert client.lr(m) == pytest.approx(0.5)
    q2 = client.module(["linear", 8, 4])
    defaults = {
        "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay": 0.0, "amsgrad": False},
        "adamw": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay": 0.01, "amsgrad": False},
        "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "decay": 0.0, "momentum": 0.0, "centered": False},
        "adagrad": {"lr": 0.01, "lrdecay": 0.0, "decay": 0.0, "init": 0.0, "eps": 1e-10},
    }
    for kind, expected in defaults.items():
        m2 = client.model(client.addref(q2), client.loss("mse"), client.opt(kind, q2))
        assert client.model(m2)["optimizer"] == {"type": kind, **expected}


def test_opt_errors(client: Client, unchanged: Any) -> None:
    q = client.module(["linear", 8, 4])
    o = client.opt("sgd", q)
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="unrecognized optimizer"):
            client.opt("lamb", q)
        with pytest.raises(InvalidArgumentError, match="(?i)nesterov"):
            client.opt("sgd", q, 0.1, nesterov=True)
        with pytest.raises(InvalidArgumentError, match="unknown option 'betas'"):
            client.opt("adam", q, betas=0.9)
        with pytest.raises(InvalidArgumentError, match="'lr' must be non-negative"):
            client.opt("sgd", q, -1)
        with pytest.raises(InvalidArgumentError, match="expects bool"):
            client.opt("sgd", q, 0.1, 0.9, 0, 0, 1)
        with pytest.raises(InvalidArgumentError, match="expecting module or model or optimizer handle|over another optimizer"):
            client.opt("sgd", o)
        with pytest.raises(InvalidArgumentError, match="expecting optimizer or model"):
            client.lr(q)
        with pytest.raises(InvalidArgumentError, match="non-negative"):
            client.lr(o, -0.5)
        with pytest.raises(NotFoundError):
            client.opt("sgd", "mod_nonexistent")


def test_optimizer_options_torch_would_fail_on_or_train_to_nan_with_are_refused(client: Client, unchanged: Any) -> None:
    q = client.module(["linear", 8, 4])
    with unchanged():
        # Adagrad fills its sums with `init` as it is built: torch's overflow there answered INTERNAL.
        with pytest.raises(InvalidArgumentError, match=r"adagrad: option 'init' must fit the parameters' dtype \(float32"):
            client.opt("adagrad", q, init=1e39)
        # RMSprop's alpha over 1 weighs the new squared gradient negatively: NaN after the first step.
        with pytest.raises(InvalidArgumentError, match="rmsprop: option 'alpha' must be between 0 and 1, given 1.5"):
            client.opt("rmsprop", q, 0.01, 1.5)
        # eps 0 divides 0 by 0 wherever a gradient has an exact zero (a dead ReLU unit): NaN weights.
        for kind in ("adam", "adamw", "rmsprop", "adagrad"):
            with pytest.raises(InvalidArgumentError, match=f"{kind}: option 'eps' must be positive, given 0"):
                client.opt(kind, q, eps=0)
        # An eps that rounds to 0 in the parameters' dtype adds nothing to the denominator: as eps 0.
        with pytest.raises(InvalidArgumentError, match=r"adam: option 'eps' is 0 in the parameters' dtype float32"):
            client.opt("adam", q, eps=1e-300)
    client.to(q, "cpu", "float16")
    with unchanged():
        with pytest.raises(InvalidArgumentError, match=r"float16 holds at most 65504\), given 70000"):
            client.opt("adagrad", q, init=7e4)
        # Adam's default eps, 1e-8, is 0 in float16: a weight whose gradient is exactly 0 became NaN.
        with pytest.raises(InvalidArgumentError, match=r"adamw: option 'eps' is 0 in the parameters' dtype float16, given 1e-08: give at least"):
            client.opt("adamw", q)
    assert client.lr(client.opt("adagrad", q, init=65504.0)) == 0.01  # the largest that fits is taken
    assert client.lr(client.opt("adam", q, eps=1e-4)) == 0.001


def test_a_step_whose_lr_or_decay_overflows_the_parameters_dtype_names_them_and_changes_nothing(
    client: Client, unchanged: Any
) -> None:
    # torch said only "value cannot be converted to type float without overflow".
    q = client.module(["linear", 8, 4])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q, 1e300))
    client.train(m, *data(16))
    with unchanged(), pytest.raises(
        InvalidArgumentError,
        match=r"run \(batch 1 of 1\): the sgd optimizer's lr 1e\+300 and decay 0 overflow float32 in its step: "
        r"give a smaller learning rate \(lr\(m, value\); SetLearningRate\) or build the optimizer with a smaller decay; "
        r"nothing changed",
    ):
        client.run(m)
    client.lr(m, 0.1)
    assert np.isfinite(client.run(m))


def test_a_model_moved_to_float16_after_its_optimizer_was_made_still_trains(client: Client) -> None:
    # The check on a new optimizer's eps looks at the dtype it is made over, not at a later move: the
    # first step after one sizes its state with a twin built as the optimizer was, unchecked.
    q = client.module(["linear", 8, 4])
    m = client.model(q, client.loss("mse"), client.opt("adam", q, 0.01))
    client.to(m, "cpu", "float16")
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float16)
    client.train(m, x, np.zeros((8, 4), np.float16))
    assert np.isfinite(client.run(m))


# -- models -----------------------------------------------------------------------------------------


def test_model_consumes_its_argument_handles(client: Client) -> None:
    q = client.module(["linear", 8, 4])
    loss, o = client.loss("ce"), client.opt("sgd", q, 0.04)
    m = client.model(q, loss, o)
    assert m.kind == "model"
    for h in (q, loss, o):
        with pytest.raises(NotFoundError):
            client.free(h)
    assert [h.handle for h in client.handles()] == [m]
    assert client.parmnames(m) == ["weight", "bias"]
    assert client.size(m) == 2


def test_model_shares_the_module_kept_by_addref(client: Client) -> None:
    q = client.module(["linear", 8, 4])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q))
    client.parm(q, "bias", 3)
    np.testing.assert_array_equal(client.parm(m, "bias"), np.full(4, 3, np.float32))
    x, y = data(32)
    client.train(m, x, y)
    client.run(m)
    np.testing.assert_array_equal(client.parm(q, "weight"), client.parm(m, "weight"))
    description = client.model(m)
    assert [r.module for r in description["module"]] == ["linear"]
    assert description["loss"] == {"type": "ce", "ignore": -100, "smoothing": 0.0, "reduce": "mean"}
    assert description["train_size"] == 32 and description["test_size"] == -1


def test_model_errors_free_nothing(client: Client, unchanged: Any) -> None:
    q = client.module(["linear", 8, 4])
    q2 = client.module(["linear", 8, 4])
    loss, o2 = client.loss("ce"), client.opt("sgd", q2)
    before = client.handles()
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="different module"):
            client.model(q, loss, o2)
        with pytest.raises(InvalidArgumentError, match="expecting loss handle"):
            client.model(q, q2, o2)
        with pytest.raises(NotFoundError):
            client.model(q, loss, "opt_missing")
    assert client.handles() == before
    with pytest.raises(TypeError):
        client.model(q, loss)


# -- options ----------------------------------------------------------------------------------------


def test_train_and_test_options(client: Client, unchanged: Any) -> None:
    _, m = new_model(client)
    loss = client.loss("ce")
    assert client.train(m) == {"batchsize": 32, "droplast": False, "shuffle": False, "seed": 0, "metrics": ["loss"]}
    assert client.test(m) == {"batchsize": 100, "droplast": False, "metrics": ["loss"]}
    assert client.train(m, batchsize=100, shuffle=True) is None
    assert client.train(m, "batchsize") == 100
    assert client.train(m, ["shuffle", "droplast"]) == [True, False]
    client.test(m, {"batchsize": 1000, "metrics": "accuracy"})
    assert client.test(m) == {"batchsize": 1000, "droplast": False, "metrics": ["accuracy"]}
    client.test(m, metrics=["loss", "accuracy", "matches"])
    assert client.test(m, "metrics") == ["loss", "accuracy", "matches"]
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="unrecognized train setting: bogus"):
            client.train(m, batchsize=7, bogus=1)
        with pytest.raises(InvalidArgumentError, match="shuffle: not set for evaluation"):
            client.test(m, shuffle=True)
        with pytest.raises(InvalidArgumentError, match="seed: not set for evaluation"):
            client.test(m, seed=3)
        with pytest.raises(InvalidArgumentError, match="unrecognized metric 'auc'"):
            client.test(m, batchsize=10, metrics="accuracy,auc")
        with pytest.raises(InvalidArgumentError, match="positive"):
            client.train(m, batchsize=0)
        with pytest.raises(InvalidArgumentError, match="expects bool"):
            client.train(m, shuffle=1)
        with pytest.raises(InvalidArgumentError, match="expecting model handle"):
            client.train(loss, batchsize=1)
    assert client.train(m, "batchsize") == 100 and client.test(m, "batchsize") == 1000
    with pytest.raises(KeyError):
        client.train(m, "bogus")


# -- data -------------------------------------------------------------------------------------------


def test_data_batches_and_errors(client: Client, unchanged: Any) -> None:
    _, m = new_model(client)
    x, y = data(250)
    client.train(m, batchsize=100)
    assert client.train(m, x, y) == 3
    client.train(m, droplast=True)
    assert client.model(m)["train_size"] == 250
    assert client.test(m, x[:10], y[:10]) == 1
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="tensor size mismatch, 250 vs 10"):
            client.train(m, x, y[:10])
        with pytest.raises(InvalidArgumentError, match="at least one sample"):
            client.test(m, np.float32(1), np.int64(1))
        with pytest.raises(TypeError):
            client.train(m, x, y, 1)
        with pytest.raises(TypeError, match=r"\(m, x, y\)"):
            client.train(m, x)
    _, m2 = new_model(client)
    with unchanged():
        with pytest.raises(FailedPreconditionError, match="no training data"):
            client.run(m2)
        with pytest.raises(FailedPreconditionError, match="no testing data"):
            client.testrun(m2)
        with pytest.raises(FailedPreconditionError, match="no training data"):
            client.input(m2)
    assert client.restore(m2) == -1


@pytest.mark.slow
def test_uploads_a_full_mnist_sized_training_set(client: Client) -> None:
    q, m = new_model(client, ["linear", 784, 10])
    x = np.ones((60000, 784), np.float32)  # 188 MB: 45 streamed chunks of 4 MiB
    x[-1] = 2
    assert client.train(m, x, np.zeros(60000, np.int64)) == 1875
    xi = client.input(m)
    assert client.size(xi) == (60000, 784)
    client.train(m, batchsize=59999)
    assert client.batch(xi, 59999) and client.batch(xi, 59999)
    np.testing.assert_array_equal(client.tensor(xi), np.full((1, 784), 2, np.float32))


# -- run, testrun, evaluate -------------------------------------------------------------------------


def test_metrics_of_run_and_testrun(client: Client) -> None:
    q, m = new_model(client, None, 0.1)
    x, y = data(100)
    client.train(m, x, y)
    client.test(m, x, y)
    client.train(m, metrics=["loss", "batchloss", "accuracy", "matches", "predict", "output"])
    loss, batchloss, accuracy, matches, predict, output = client.run(m)
    assert isinstance(loss, float) and batchloss.shape == (4,) and batchloss.dtype == np.float32
    assert loss == pytest.approx(float(batchloss.astype(np.float64).mean()))
    assert predict.shape == (100,) and predict.dtype == np.int64 and output.shape == (100, 4)
    np.testing.assert_array_equal(predict, output.argmax(1))
    assert matches == int((predict == y).sum()) and accuracy == pytest.approx(matches)
    client.test(m, batchsize=30, metrics="accuracy,matches,predict")
    accuracy, matches, predict = client.testrun(m)
    expected = client.evaluate(m, x).argmax(1)
    np.testing.assert_array_equal(predict, expected)
    assert matches == int((expected == y).sum()) and accuracy == pytest.approx(100 * matches / 100)
    client.test(m, metrics="accuracy")
    assert client.testrun(m) == accuracy


def test_training_improves_accuracy_and_restores_the_train_flag(client: Client, live_server: Any) -> None:
    q, m = new_model(client, BN_NET, 0.05, 0.9, nesterov=True)
    x, y = data(512)
    client.train(m, batchsize=64, shuffle=True)
    client.train(m, x, y)
    client.test(m, x, y)
    client.test(m, metrics="accuracy")
    before = client.testrun(m)
    module = module_of(live_server.registry, m.id)
    module.eval()
    for _ in range(5):
        client.run(m)
    assert not any(layer.training for layer in module.modules())
    assert client.testrun(m) > max(before, 90)
    assert client.dict(client.buffers(q, "b"), "num_batches_tracked") == 5 * 8


def test_shuffle_is_reproducible_by_seed(client: Client) -> None:
    x, y = data(128)
    weights = []
    for seed in (5, 5, 6):
        q = client.module(["linear", 8, 4])
        client.parm(q, "weight", 0.1)
        client.parm(q, "bias", 0)
        m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.1))
        client.train(m, batchsize=16, shuffle=True, seed=seed)
        client.train(m, x, y)
        client.run(m)
        client.run(m)
        weights.append(client.parm(q, "weight"))
    np.testing.assert_array_equal(weights[0], weights[1])
    assert not np.array_equal(weights[0], weights[2])


def test_run_checks_inputs_before_training(client: Client, unchanged: Any) -> None:
    q, m = new_model(client, BN_NET)
    x, y = data(65)
    client.train(m, x[:, :5], y)
    with unchanged(), pytest.raises(InvalidArgumentError, match="run: mat1 and mat2 shapes cannot be multiplied"):
        client.run(m)
    with unchanged(), pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: y \(targets\) is float32 of shape \[65\]"):
        client.train(m, x, y.astype(np.float32))  # refused at upload now, not at every run
    # 65 samples in batches of 32 leave a last batch of one, which batchnorm cannot train on.
    client.train(m, x, y)
    with unchanged(), pytest.raises(InvalidArgumentError, match="more than 1 value per channel"):
        client.run(m)
    client.train(m, droplast=True)
    assert isinstance(client.run(m), float)


def test_running_out_of_memory_in_a_forward_pass_is_resource_exhausted_and_changes_nothing(
    live_server: LiveServer, client: Client, unchanged: Any
) -> None:
    """A module whose middle layer makes a 16 PB activation from a 4-sample input: torch's CPU
    allocator refuses it with a plain RuntimeError ("can't allocate memory"), which every forward
    pass answered INVALID_ARGUMENT, as if the inputs were wrong (found by review). Each pass is now
    sized on meta first, so the server's cap (the host's memory) refuses it before it runs; with the
    cap raised past any memory, torch's own refusal is RESOURCE_EXHAUSTED too. The allocation fails
    at once, so the test touches no real memory."""
    q = client.module(
        ["sequential", ["adaptavg3d", "p", [100000, 100000, 100000]], ["adaptavg3d", "a", [1, 1, 1]],
         ["flatten", "f"], ["linear", "l", 1, 1]]
    )
    m = client.model(client.addref(q), client.loss("mse"), client.opt("sgd", q, 0.1, 0.9))
    x, y = np.ones((4, 1, 1, 1, 1), np.float32), np.ones((4, 1), np.float32)
    client.train(m, x, y)
    client.test(m, x, y)
    calls = {
        "forward": lambda: client.forward(q, x), "nforward": lambda: client.nforward(m),
        "eforward": lambda: client.eforward(m), "run": lambda: client.run(m), "testrun": lambda: client.testrun(m),
        "evaluate": lambda: client.evaluate(m, x), "batchnorm": lambda: client.batchnorm(m),
    }
    for name, call in calls.items():
        with unchanged(), pytest.raises(ResourceExhaustedError, match="would exceed the cap.*--max-device-bytes"):
            call()
    limits = live_server.registry.limits
    live_server.registry.set_limits(dataclasses.replace(limits, max_device_bytes=1 << 62))
    try:
        for name, call in calls.items():
            with unchanged(), pytest.raises(ResourceExhaustedError, match=rf"^RESOURCE_EXHAUSTED: {name}.*out of memory"):
                call()
    finally:
        live_server.registry.set_limits(limits)


def test_indices_out_of_range_are_refused_before_any_forward_pass_or_loss_sees_them(
    client: Client, unchanged: Any
) -> None:
    """run checks every embedding input and class label before it trains, since torch finds one out
    of range only inside the lookup or the loss, and on CUDA with a device-side assert that ends the
    server's use of the GPU. testrun, evaluate, forward, eforward and batchnorm(m) passed theirs
    straight to torch (found by review): each now refuses them first, naming the sample."""
    c = client
    q = c.module(["sequential", ["embed", "e", 10, 4], ["linear", "d", 4, 3]])
    m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.1))
    x, y = np.arange(20, dtype=np.int64) % 10, np.arange(20, dtype=np.int64) % 3
    bad_x, bad_y = x.copy(), y.copy()
    bad_x[7], bad_y[13] = 12, 5
    c.train(m, x, y)
    c.run(m)
    c.test(m, batchsize=5)
    embedding = r"input 12 of sample 7 is out of range for the embedding's 10 rows \(0-9\); nothing changed"
    c.test(m, bad_x, y)
    c.train(m, bad_x, y)
    for name, call in {
        "testrun": lambda: c.testrun(m), "evaluate": lambda: c.evaluate(m, bad_x),
        "forward": lambda: c.forward(q, bad_x.astype(np.int32)), "nforward": lambda: c.nforward(m),
        "eforward": lambda: c.eforward(m), "batchnorm": lambda: c.batchnorm(m),
    }.items():
        with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: {name}: {embedding}"):
            call()
    c.test(m, x, bad_y)
    with unchanged(), pytest.raises(
        InvalidArgumentError, match=r"^INVALID_ARGUMENT: testrun: target 5 of sample 13 is out of bounds: the output has "
        r"3 classes \(0-2\) and the loss ignores -100"
    ):
        c.testrun(m)
    c.test(m, metrics="accuracy")  # no loss, nothing for the loss to look up
    assert c.testrun(m) == pytest.approx(100 * np.mean(c.evaluate(m, x).argmax(1) == bad_y))


def test_evaluate_and_forward_variants(client: Client, live_server: Any, unchanged: Any) -> None:
    q, m = new_model(client, BN_NET)
    x, y = data(50)
    b = client.buffers(q, "b")
    net = local_copy(client, q).eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(client.evaluate(m, x), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(client.tensor(client.eforward(q, x)), expected, rtol=0, atol=1e-6)
    assert client.dict(b, "num_batches_tracked") == 0
    out = client.nforward(q, x)
    assert out.kind == "tensor" and client.size(out) == (50, 4)
    assert client.dict(b, "num_batches_tracked") == 1
    xt = client.tensor(x)
    client.forward(m, xt)
    assert client.dict(b, "num_batches_tracked") == 2
    module = module_of(live_server.registry, q.id)
    assert module.training  # a new module is in train mode; eforward put it back
    module.eval()
    client.nforward(q, xt)
    assert not module.training
    client.train(m, x, y)
    client.test(m, x[:7], y[:7])
    assert client.size(client.eforward(m)) == (7, 4)
    assert client.size(client.nforward(m)) == (50, 4)
    view = client.parms(q)
    broken = client.module(["sequential", ["linear", "a", 8, 6], ["batchnorm1d", "b", 6], ["linear", "d", 5, 2]])
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="nforward: mat1 and mat2") as err:
            client.nforward(q, x[:, :3])
        assert "send x as" not in str(err.value)  # a shape error: no dtype hint
        # forward converts no inputs (the reference's neither): the refusal says what to send
        with pytest.raises(InvalidArgumentError, match=r"x is float64 and the module's parameters are float32: send x as float32"):
            client.eforward(q, x.astype(np.float64))
        with pytest.raises(InvalidArgumentError, match=r"x is int64 .*send x as float32"):
            client.forward(q, np.ones((2, 8), np.int64))
        with pytest.raises(InvalidArgumentError, match="needs an input"):
            client.nforward(q)
        with pytest.raises(InvalidArgumentError, match="evaluate"):
            client.evaluate(m, x[:, :3])
        with pytest.raises(InvalidArgumentError, match="expecting tensor handle"):
            client.eforward(q, view)
        # batchnorm statistics updated before a later layer failed are put back
        with pytest.raises(InvalidArgumentError, match="forward"):
            client.forward(broken, x)
        with pytest.raises(InvalidArgumentError, match="nforward"):
            client.nforward(broken, x)


def test_deadline_stops_a_long_epoch_between_batches(client: Client, live_server: Any) -> None:
    q = client.module(["linear", 4, 2])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("adam", q))
    n = 200_000
    client.train(m, batchsize=1, shuffle=True)
    client.train(m, np.ones((n, 4), np.float32), np.zeros(n, np.int64))
    xi = client.input(m)
    client.batch(xi, 10)
    with Client(live_server.address, timeout=0.5) as hasty:
        with pytest.raises(DeadlineExceededError):
            hasty.run(m)
    # The next call waits for the model's lock, so the stopped epoch has finished cleaning up.
    assert client.restore(m) == n
    assert client.size(xi) == (n, 4)
    optimizer = live_server.registry.get(m.id).obj.optimizer.optim
    steps = [int(s["step"]) for s in optimizer.state.values()] or [0]
    assert max(steps) < n
    module = module_of(live_server.registry, q.id)
    assert module.training


# -- input, restore, batch ----------------------------------------------------------------------


def test_batch_steps_a_tensor_in_place(client: Client, unchanged: Any) -> None:
    x = np.arange(250 * 2, dtype=np.float32).reshape(250, 2)
    t = client.tensor(x)
    sizes = []
    while client.batch(t, 100):
        sizes.append(client.size(t)[0])
        assert client.tensor(t)[0, 0] == 2 * 100 * (len(sizes) - 1)
    assert sizes == [100, 100, 50]
    np.testing.assert_array_equal(client.tensor(t), x)
    scalar, relu = client.tensor(np.float32(1)), client.module(["relu"])
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="batch: size 250 not in the range 1-249"):
            client.batch(t, 250)
        with pytest.raises(InvalidArgumentError, match="batch: size 0"):
            client.batch(t)
        with pytest.raises(InvalidArgumentError, match="0-dim"):
            client.batch(scalar, 1)
        with pytest.raises(InvalidArgumentError, match="expecting tensor or model handle"):
            client.batch(relu, 1)


def test_input_restore_and_batch_share_the_models_data(client: Client) -> None:
    q, m = new_model(client)
    x, y = data(70)
    client.train(m, batchsize=32)
    client.train(m, x, y)
    xi = client.input(m)
    assert client.size(xi) == (70, 8)
    assert client.batch(m) and client.batch(m)
    assert client.size(xi) == (32, 8)  # the same tensor: batching the model batched the handle
    np.testing.assert_array_equal(client.tensor(xi), x[32:64])
    assert client.restore(m) == 70 and client.size(xi) == (70, 8)
    assert client.batch(xi, 50)
    assert client.model(m)["train_size"] == 70
    assert client.restore(m) == 70
    steps = 0
    while client.batch(m):
        steps += 1
    assert steps == 3 and client.size(xi) == (70, 8)
    with pytest.raises(InvalidArgumentError, match="train batchsize"):
        client.batch(m, 10)


# -- layers that write their input in place ---------------------------------------------------------


def _inplace_model(client: Client, first: Any) -> tuple[Any, Any, torch.nn.Module]:
    """A model [first, linear 3 -> 2] with mse, and an in-process torch copy of its module."""
    q = client.module(["sequential", first, ["linear", 3, 2]])
    m = client.model(client.addref(q), client.loss("mse"), client.opt("sgd", q, 0.1))
    params = client.dict(client.parms(q))
    layer = torch.nn.LeakyReLU(first[1], True) if first[0] == "leakyrelu" else torch.nn.Dropout(first[1], True)
    net = torch.nn.Sequential(layer, torch.nn.Linear(3, 2))
    with torch.no_grad():
        for name, value in params.items():
            getattr(net[1], name.rsplit(".", 1)[1]).copy_(torch.as_tensor(np.asarray(value)))
    return q, m, net


def test_in_place_layers_leave_the_held_data_as_they_were(client: Client) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    sent = x.copy()
    q, m, net = _inplace_model(client, ["leakyrelu", 0.5, True])
    client.train(m, batchsize=4)
    client.train(m, x, y)
    client.test(m, x, y)
    first = client.testrun(m)
    assert client.testrun(m) == first  # each testrun used to scale the negative inputs once more
    np.testing.assert_array_equal(client.evaluate(m, x), client.evaluate(m, x))
    held = client.input(m)
    client.tensor(client.forward(m))
    client.tensor(client.eforward(m, held))
    np.testing.assert_array_equal(client.tensor(held), sent)
    # An epoch equals the in-process torch loop on a copy of the data, bit for bit.
    client.run(m)
    optim = torch.optim.SGD(net.parameters(), 0.1)
    for i in range(2):
        optim.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(torch.tensor(sent[4 * i:4 * i + 4])), torch.tensor(y[4 * i:4 * i + 4]))
        loss.backward()
        optim.step()
    for name, value in client.dict(client.parms(q)).items():
        expected = getattr(net[1], name.rsplit(".", 1)[1]).detach().numpy()
        np.testing.assert_array_equal(np.asarray(value), expected, err_msg=name)
    np.testing.assert_array_equal(client.tensor(held), sent)


def test_in_place_dropout_first_does_not_wear_the_data_away(client: Client) -> None:
    x = np.ones((16, 3), np.float32)
    q, m, _ = _inplace_model(client, ["drop", 0.5, True])
    client.train(m, x, np.zeros((16, 2), np.float32))
    for _ in range(3):
        client.run(m)
    np.testing.assert_array_equal(client.tensor(client.input(m)), np.ones((16, 3), np.float32))


# -- metrics of outputs not shaped [N, C] ----------------------------------------------------------


@pytest.mark.parametrize("length", [3, 5])
def test_accuracy_of_per_position_classes_uses_the_class_dimension(client: Client, length: int) -> None:
    rng = np.random.default_rng(length)
    x = rng.standard_normal((8, 2, length)).astype(np.float32)
    y = rng.integers(0, 3, (8, length)).astype(np.int64)
    q = client.module(["conv1d", 2, 3, 1])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.1))
    client.test(m, x, y)
    client.test(m, batchsize=3, metrics="accuracy,matches,predict")
    accuracy, matches, predict = client.testrun(m)
    expected = client.evaluate(m, x).argmax(1)  # cross entropy's class dimension is 1
    np.testing.assert_array_equal(predict, expected)
    assert matches == int((expected == y).sum())
    assert accuracy == pytest.approx(100 * matches / (8 * length))
    client.train(m, x, y)
    client.train(m, batchsize=3, metrics="accuracy,matches,predict")
    accuracy, matches, predict = client.run(m)
    assert predict.shape == (8, length) and matches == int((predict == y).sum())
    assert accuracy == pytest.approx(100 * matches / (8 * length))



@pytest.mark.parametrize(("kind", "ignore"), [("ce", None), ("nll", 2), ("ce", 0)])
def test_accuracy_leaves_out_the_targets_the_loss_ignores(client: Client, kind: str, ignore: int | None) -> None:
    """Targets equal to the loss's ignore index (-100 unless set) are left out of accuracy and
    matches, total and hits alike, as torch's loss leaves them out and torchmetrics' ignore_index
    does; they were counted as misses (found by review). Checked against a hand computation in torch
    on the server's own outputs, in testrun and run, with every third target ignored and a whole
    batch of them (no division by zero); an ignore index that is a class (2, 0) leaves out targets
    the model may well predict right."""
    ignored = -100 if ignore is None else ignore
    x, y = data(90)
    y[::3] = ignored
    y[60:75] = ignored  # the fifth batch of 15: nothing in it is scored
    q = client.module(["linear", 8, 4])
    loss = client.loss(kind) if ignore is None else client.loss(kind, ignore=ignore)
    m = client.model(client.addref(q), loss, client.opt("sgd", q, 0.1))
    target = torch.as_tensor(y)
    scored = target != ignored
    client.test(m, x, y)
    client.test(m, batchsize=15, metrics="accuracy,matches")
    accuracy, matches = client.testrun(m)
    hits = int((torch.as_tensor(client.evaluate(m, x)).argmax(1)[scored] == target[scored]).sum())
    assert matches == hits
    assert accuracy == pytest.approx(100 * hits / int(scored.sum()), abs=1e-12)
    client.train(m, x, y)
    client.train(m, batchsize=15, metrics="accuracy,matches,predict")
    accuracy, matches, predict = client.run(m)
    hits = int((torch.as_tensor(predict)[scored] == target[scored]).sum())
    assert matches == hits
    assert accuracy == pytest.approx(100 * hits / int(scored.sum()), abs=1e-12)


def test_accuracy_leaves_out_ignored_positions_and_is_nan_with_nothing_scored(client: Client) -> None:
    """Per-position classes ([N, C, L] outputs, padding positions ignored) are scored position by
    position; with every target ignored accuracy is NaN, as the mean loss is, and matches 0 (it
    read 0.0, a model that is always wrong)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 2, 5)).astype(np.float32)
    y = rng.integers(0, 3, (8, 5)).astype(np.int64)
    y[:, 3:] = -100  # padding at the end of each sequence
    q = client.module(["conv1d", 2, 3, 1])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.1))
    client.test(m, x, y)
    client.test(m, batchsize=3, metrics="accuracy,matches")
    accuracy, matches = client.testrun(m)
    predicted = torch.as_tensor(client.evaluate(m, x)).argmax(1)
    hits = int((predicted[:, :3] == torch.as_tensor(y[:, :3])).sum())
    assert (matches, accuracy) == (hits, pytest.approx(100 * hits / 24, abs=1e-12))
    client.test(m, x, np.full((8, 5), -100, np.int64))
    client.test(m, metrics="accuracy,matches,loss")
    accuracy, matches, mean_loss = client.testrun(m)
    assert math.isnan(accuracy) and matches == 0 and math.isnan(mean_loss)
    client.train(m, x, np.full((8, 5), -100, np.int64))
    client.train(m, batchsize=3, metrics="accuracy,matches")
    accuracy, matches = client.run(m)
    assert math.isnan(accuracy) and matches == 0


def test_metrics_of_a_one_dimensional_output(client: Client) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    y = rng.standard_normal(10).astype(np.float32)
    q = client.module(["sequential", ["linear", 4, 1], ["flatten", 0]])
    m = client.model(client.addref(q), client.loss("mse"), client.opt("sgd", q, 0.1))
    client.train(m, x, y)
    client.test(m, x, y)
    client.train(m, batchsize=4, metrics="predict,accuracy,matches")
    client.test(m, batchsize=4, metrics="predict,accuracy,matches")
    # One value per sample and no class dimension: each sample's one output is its prediction 0,
    # as for an output [N, 1].
    for predict, accuracy, matches in (client.run(m), client.testrun(m)):
        np.testing.assert_array_equal(predict, np.zeros(10, np.int64))
        assert (accuracy, matches) == (100.0, 10)


# -- regression targets must match the output -------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "smoothl1", "bcelogits"])
def test_regression_targets_of_another_shape_are_refused_before_training(
    client: Client, unchanged: Any, loss: str
) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    y = rng.random(20).astype(np.float32)
    q = client.module(["linear", 4, 1])
    m = client.model(client.addref(q), client.loss(loss), client.opt("sgd", q, 0.1))
    client.train(m, x, y)  # torch would broadcast [20] with the output [20, 1] to [20, 20]
    client.test(m, x, y)
    message = r"targets of shape \[20\] do not match the output's \[20, 1\].*reshape y to \[N, 1\]"
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: run: {message}"):
        client.run(m)
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: testrun: {message}"):
        client.testrun(m)
    client.train(m, x, y.reshape(20, 1))
    client.test(m, x, y.reshape(20, 1))
    assert isinstance(client.run(m), float) and isinstance(client.testrun(m), float)


def test_class_probabilities_of_another_shape_are_refused_naming_both_shapes(client: Client, unchanged: Any) -> None:
    """ce takes float targets as class probabilities, one column per class: two columns for a
    three-class output got torch's "0D or 1D target tensor expected, multi-target not supported",
    which names neither shape nor the fix."""
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    q = client.module(["linear", 4, 3])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q, 0.1))
    client.train(m, x, np.full((8, 2), 0.5, dtype=np.float32))
    client.test(m, x, np.full((8, 2), 0.5, dtype=np.float32))
    message = (r"targets of shape \[8, 2\] do not match the output's \[8, 3\]: the ce loss takes class probabilities "
               r"shaped as the output \(one column per class\), or integer class indices; send y of shape \[N, 3\]")
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: run: {message}"):
        client.run(m)
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: testrun: {message}"):
        client.testrun(m)
    client.train(m, x, np.full((8, 3), 1 / 3, dtype=np.float32))
    assert isinstance(client.run(m), float)


@pytest.mark.parametrize("loss", ["ce", "nll"])
@pytest.mark.parametrize(
    ("labels", "module", "fit"),
    [
        ((8, 1), ["linear", 4, 3], r"\[N\] \(y.reshape\(-1\) for a column of labels\)"),  # a column of labels
        ((8, 3, 2), ["linear", 4, 3], r"\[N\]"),
        ((8,), ["sequential", ["linear", 4, 6], ["reshape", [-1, 3, 2]]], r"\[N, 2\]"),  # per position
    ],
)
def test_class_indices_of_another_shape_are_refused_saying_the_shape_to_send(
    client: Client, unchanged: Any, loss: str, labels: tuple[int, ...], module: list[Any], fit: str
) -> None:
    """Integer targets of ce and nll must have the output's shape without its class dimension: labels
    sent as a column [N, 1] (the commonest slip) got torch's "0D or 1D target tensor expected,
    multi-target not supported", which names neither shape nor the fix (found by review)."""
    x = np.random.default_rng(4).standard_normal((8, 4)).astype(np.float32)
    y = np.zeros(labels, np.int64)
    q = client.module(module)
    m = client.model(q, client.loss(loss), client.opt("sgd", q, 0.1))
    client.train(m, x, y)
    client.test(m, x, y)
    message = rf"targets of shape \[{', '.join(map(str, labels))}\] do not match the output's .* send y of shape {fit}"
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: run: {message}.*nothing changed"):
        client.run(m)
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: testrun: {message}"):
        client.testrun(m)


@pytest.mark.parametrize(
    ("loss", "y"),
    [
        ("ce", np.arange(10).reshape(10, 1) % 3),  # labels as a column, read as all class 0
        ("nll", np.arange(10).reshape(10, 1) % 3),
        ("mse", (np.arange(10).reshape(10, 1) % 3).astype(np.float32)),
    ],
)
def test_accuracy_refuses_a_column_of_labels_it_would_read_as_class_0(
    client: Client, unchanged: Any, loss: str, y: np.ndarray
) -> None:
    """Targets with as many dimensions as the output are read by their argmax (one-hot rows, class
    probabilities), so a column of labels [N, 1] read as class 0 throughout: a testrun asking for no
    loss gave a plausible, wrong accuracy (the share of samples predicted 0) where it should say what
    to send (found by review). One-hot rows of another width still name classes, and are taken."""
    x = np.random.default_rng(6).standard_normal((10, 4)).astype(np.float32)
    q = client.module(["linear", 4, 3])
    m = client.model(q, client.loss(loss), client.opt("sgd", q, 0.1))
    client.test(m, x, y)
    for metrics in ("accuracy", "matches", "predict"):
        client.test(m, metrics=metrics)
        message = r"^INVALID_ARGUMENT: accuracy: targets of shape \[10, 1\] hold one column where the output \[10, 3\]"
        with unchanged(), pytest.raises(InvalidArgumentError, match=message + r".*send class indices of shape \[N\]"):
            client.testrun(m)
    client.test(m, x, y.reshape(-1))
    client.test(m, metrics="matches")
    predicted = client.evaluate(m, x).argmax(1)
    assert client.testrun(m) == int((predicted == y.reshape(-1)).sum())


# -- moving a model ------------------------------------------------------------------------------


@pytest.mark.parametrize("named", ["model", "module", "optimizer"])
def test_a_moved_model_trains_on_as_torch_does_after_the_same_move(client: Client, named: str) -> None:
    """A module moves with its optimizers' state and its models' data, whichever handle is named;
    training goes on in the new dtype as torch's loop does after `net.double()` and the optimizer's
    state loaded back (torch casts floating state to the parameters' dtype, the step count stays).
    Moving only the module had left Adam's state float32 (the next step failed) and the data too."""
    x, y = data(48)
    q = client.module(["linear", 8, 4])
    o = client.opt("adam", q, 0.01)
    handles = {"module": client.addref(q), "optimizer": client.addref(o)}
    m = client.model(q, client.loss("ce"), o)
    handles["model"] = m
    net = local_copy(client, m)
    local = torch.optim.Adam(net.parameters(), lr=0.01)
    client.train(m, x, y)
    client.train(m, batchsize=16, metrics="batchloss")

    def epoch(dtype: torch.dtype) -> list[float]:
        losses = []
        for i in range(3):
            local.zero_grad(set_to_none=True)
            xb, yb = torch.from_numpy(x[i * 16:(i + 1) * 16]).to(dtype), torch.from_numpy(y[i * 16:(i + 1) * 16])
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            local.step()
            losses.append(loss.item())
        return losses

    assert client.run(m) == pytest.approx(epoch(torch.float32), rel=1e-6)
    assert client.to(handles[named], dtype="float64") == handles[named]
    net.double()
    local.load_state_dict(local.state_dict())
    assert client.run(m) == pytest.approx(epoch(torch.float64), rel=1e-12)
    assert_state_close(client, m, net, atol=1e-12)  # also checks every parameter is float64
    assert client.tensor(client.input(m)).dtype == np.float64


def test_a_moved_model_keeps_its_batch_and_the_input_handle_sees_the_moved_data(client: Client) -> None:
    x, y = data(48)
    _, m = new_model(client)
    client.train(m, x, y)
    client.train(m, batchsize=16)
    held = client.input(m)
    assert client.batch(m) and client.batch(m)  # rows 16-31
    client.to(m, dtype="float64")
    np.testing.assert_array_equal(client.tensor(held), x[16:32].astype(np.float64))
    assert client.restore(m) == 48
    np.testing.assert_array_equal(client.tensor(held), x.astype(np.float64))
    assert isinstance(client.run(m), float)  # the labels stayed int64, as the loss takes them


def test_a_model_move_reserves_its_data_and_optimizer_state_and_is_refused_whole_over_the_cap(
    start_server: Any,
) -> None:
    from conftest import assert_unchanged, snapshot

    server = start_server(max_device_bytes=300_000)
    with Client(server.address) as c:
        x, y = data(4096)  # 131,072 bytes of float32 inputs, 32,768 of int64 labels
        q = c.module(["linear", 8, 4])
        m = c.model(q, c.loss("ce"), c.opt("adam", q))
        c.train(m, x, y)
        c.run(m)
        before = snapshot(server.registry)
        # float64 copies of the inputs (262,144 bytes) do not fit beside what is held; the module
        # and Adam's state alone (about 900 bytes) would.
        with pytest.raises(ResourceExhaustedError):
            c.to(m, dtype="float64")
        assert_unchanged(before, snapshot(server.registry))
        assert isinstance(c.run(m), float)


def test_a_model_holding_real_data_is_not_moved_to_a_complex_dtype(client: Client, unchanged: Any) -> None:
    _, m = new_model(client)
    client.train(m, *data(32))
    with unchanged(), pytest.raises(InvalidArgumentError, match="real floating dtype"):
        client.to(m, dtype="complex64")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_moved_to_the_gpu_trains_on_as_torch_does_after_the_same_move(start_server: Any) -> None:
    """Built and trained on the host, moved with `to(m, "cuda")`: parameters, Adam's moments and
    the data go to the GPU, the step counts stay on the host (as torch keeps them), and the next
    epoch follows torch's loop after `net.cuda()` and the state loaded back."""
    x, y = data(48)
    with Client(start_server(device="cpu").address) as c:
        q = c.module(["linear", 8, 4])
        m = c.model(q, c.loss("ce"), c.opt("adam", q, 0.01))
        net = local_copy(c, m)
        local = torch.optim.Adam(net.parameters(), lr=0.01)
        c.train(m, x, y)
        c.train(m, batchsize=48)
        c.run(m)
        local.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        local.step()
        held = c.input(m)
        c.to(m, "cuda")
        assert next(i.device for i in c.handles() if i.handle == held) == "cuda:0"
        net.cuda()
        local.load_state_dict(local.state_dict())
        local.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x).cuda()), torch.from_numpy(y).cuda())
        loss.backward()
        local.step()
        assert c.run(m) == pytest.approx(loss.item(), rel=1e-5)
        for name, value in c.dict(c.parms(m)).items():
            np.testing.assert_allclose(np.asarray(value), net.state_dict()[name].cpu().numpy(), rtol=1e-5, atol=1e-6)


def test_a_handle_on_the_models_inputs_moves_with_the_model_only(client: Client) -> None:
    """Moved alone, the handle from input(m) became a copy: batching the model no longer batched it,
    and the model trained on its own, unmoved data. Now it is refused as a live view is, and
    moving the model moves the data the handle shows."""
    q, m = new_model(client, ["linear", 8, 4])
    x, y = data(12)
    client.train(m, x, y)
    client.train(m, batchsize=4)
    xi = client.input(m)
    with pytest.raises(InvalidArgumentError, match="a model's training inputs and moves with them: move the model"):
        client.to(xi, dtype="float64")
    client.to(m, dtype="float64")
    assert client.tensor(xi).dtype == np.float64
    assert client.batch(m) and client.size(xi) == (4, 8)


@pytest.mark.parametrize("verb", ["run", "testrun"])
def test_output_metrics_stay_reserved_while_their_reply_streams(start_server: Any, verb: str) -> None:
    """An epoch's or a test's `output` metric stays reserved until its reply has streamed, as
    evaluate's output does: it was released with the model's lock, so while a slow reader held
    20 MB of outputs another call took those bytes under the cap (found by review)."""
    import grpc
    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

    mb = 1_000_000
    server = start_server(max_device_bytes=60 * mb)
    with Client(server.address, timeout=120) as c, stalling_channel(server.address) as channel:
        q = c.module(["linear", 10, 5_000])
        m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1))
        # 20 MB of outputs in 10 batches, kept with their concatenation (40 MB) until the reply has
        # streamed; a batch's pass (10 MB with its gradients on the way back) fits beside them.
        x, y = np.ones((1_000, 10), np.float32), np.zeros(1_000, np.int64)
        load = c.train if verb == "run" else c.test
        load(m, batchsize=100, metrics="output")
        load(m, x, y)
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        call = (
            stub.RunEpoch(pb.RunEpochRequest(model=m.id, max_chunk_bytes=1 << 20), timeout=120) if verb == "run"
            else stub.RunTest(pb.RunTestRequest(model=m.id, max_chunk_bytes=1 << 20), timeout=120)
        )
        first = next(call)  # the rest waits on the server, as for a reader that stalls
        assert first.chunk.name == "output" and list(first.chunk.shape) == [1_000, 5_000]
        with pytest.raises(ResourceExhaustedError, match="would exceed the cap"):
            c.dict({"w": np.zeros(35 * mb // 4, np.float32)})
        rest = list(call)  # the reply ends only once the server's generator has returned
        assert len(rest) == 19
        c.free(c.dict({"w": np.zeros(35 * mb // 4, np.float32)}))


def test_refused_testrun_and_batchnorm_keep_the_batch_the_data_stood_at(client: Client, unchanged: Any) -> None:
    """testrun and batchnorm(m) put the data back to full size before they start; refused (an index
    out of range) or failing midway (a last batch of one through batchnorm), they left them there
    after `testbatch`/`batch` had stepped them, while saying nothing changed (found by review)."""
    q = client.module(["sequential", ["embed", 5, 3], ["flatten"], ["linear", 6, 2]])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q, 0.1))
    x, y = np.array([[0, 1]] * 9 + [[7, 1]]), np.zeros(10, np.int64)  # sample 9 is out of range
    client.train(m, batchsize=4)
    client.test(m, batchsize=4)
    client.train(m, x, y)
    client.test(m, x, y)
    assert client.testbatch(m) and client.batch(m)
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="testrun: input 7 of sample 9 is out of range"):
            client.testrun(m)
        with pytest.raises(InvalidArgumentError, match="batchnorm: input 7 of sample 9 is out of range"):
            client.batchnorm(m)
    bn = client.module(["sequential", ["linear", 2, 4], ["batchnorm1d", 4]])
    m2 = client.model(bn, client.loss("mse"), client.opt("sgd", bn, 0.1))
    client.train(m2, batchsize=4)
    client.train(m2, np.ones((9, 2), np.float32), np.ones((9, 4), np.float32))  # batches of 4, 4, 1
    assert client.batch(m2)
    with unchanged():
        with pytest.raises(InvalidArgumentError, match=r"batchnorm \(batch 3 of 3\): Expected more than 1 value"):
            client.batchnorm(m2)


def test_replies_cut_at_exactly_1_kib_carry_every_metric_and_a_smaller_cut_is_refused(client: Client, live_server: Any) -> None:
    """max_chunk_bytes at its floor (1024): six metrics of an epoch and a test (a 4-d output, 3-d
    predictions, 0-d and 1-d values) and an evaluate's output larger than a chunk come back equal to
    the replies cut at the server's own size; 1023 on EvaluateModel is refused before the model runs,
    as on RunEpoch and RunTest (tests/test_fetch_chunk_bytes.py)."""
    import grpc
    from weightavg import wire
    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

    rng = np.random.default_rng(5)
    x, y = rng.random((50, 6), dtype=np.float32), rng.integers(0, 3, (50, 4, 5))
    q = client.module(["sequential", ["linear", 6, 60], ["reshape", [-1, 3, 4, 5]]])
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q, 0.0))  # lr 0: epochs alike
    every = "loss,batchloss,accuracy,matches,predict,output"
    client.train(m, batchsize=7, metrics=every)
    client.test(m, batchsize=7, metrics=every)
    client.train(m, x, y)
    client.test(m, x, y)

    def evaluate(cut: int) -> Any:
        yield pb.EvaluateModelRequest(model=m.id, max_chunk_bytes=cut)
        for chunk in wire.array_chunks("", x, 1 << 20):
            yield pb.EvaluateModelRequest(chunk=chunk)

    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        for cut_at, expected in (
            (lambda cut: stub.RunEpoch(pb.RunEpochRequest(model=m.id, max_chunk_bytes=cut)), client.run(m)),
            (lambda cut: stub.RunTest(pb.RunTestRequest(model=m.id, max_chunk_bytes=cut)), client.testrun(m)),
            (lambda cut: stub.EvaluateModel(evaluate(cut)), [client.evaluate(m, x)]),
        ):
            chunks = [r.chunk for r in cut_at(1024)]
            assert max(len(c.data) for c in chunks) <= 1024 and len(chunks) > len(expected)
            got = [value for _, value in wire.join_chunks(chunks)]
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        before = client.dict(client.buffers(q)) | client.dict(client.parms(q))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.EvaluateModel(evaluate(1023)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_chunk_bytes (1023)" in (refused.value.details() or "")
        after = client.dict(client.buffers(q)) | client.dict(client.parms(q))
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_the_copies_of_input_batches_are_reserved_in_evaluate_testrun_and_batchnorm(start_server: Any) -> None:
    """evaluate converts each piece of its inputs to the parameters' dtype, and testrun and
    batchnorm(m) give a module with an in-place layer a copy of each batch: none of those copies was
    reserved, so with the batch size at the data's size a 10 MB uint8 upload became 40 MB of float32
    under a 40 MB cap, and a 10 MB batch was copied with 5 MB of room (found by review). Each is
    refused now, changing nothing, and runs once there is room."""
    mb = 1_000_000
    server = start_server(max_device_bytes=40 * mb)
    with Client(server.address, timeout=120) as c:
        q = c.module(["linear", 500, 1])
        m = c.model(q, c.loss("mse"), c.opt("sgd", q, 0.1))
        c.test(m, batchsize=20_000)
        images = np.ones((20_000, 500), np.uint8)  # 10 MB sent, 40 MB as float32
        with pytest.raises(ResourceExhaustedError, match="40080000 more tensor bytes"):
            c.evaluate(m, images)
        assert c.evaluate(m, images[:2_000]).shape == (2_000, 1)  # 4 MB converted: room enough
        c.free(m)
        rq = c.module(["sequential", ["relu", True], ["linear", 500, 1]])
        rm = c.model(rq, c.loss("mse"), c.opt("sgd", rq, 0.1))
        x = np.ones((5_000, 500), np.float32)  # 10 MB, held once as train and once as test data
        c.train(rm, batchsize=5_000)
        c.test(rm, batchsize=5_000)
        c.train(rm, x, np.ones((5_000, 1), np.float32))
        c.test(rm, x, np.ones((5_000, 1), np.float32))
        ballast = c.dict({"w": np.zeros(15 * mb // 4, np.float32)})  # 35 MB held: no room for a 10 MB copy
        from conftest import assert_unchanged, snapshot

        # The 10 MB copy of a batch, and the pass's output while it runs (5,000 float32 rows); testrun's
        # loss also makes an output-sized tensor (`footprint.testing_pass_bytes`; its scalars are
        # reserved before, with what the reply keeps: `footprint.metrics_bytes`).
        for verb, nbytes in ((c.testrun, 10_040_000), (c.batchnorm, 10_020_000)):
            before = snapshot(server.registry)
            with pytest.raises(ResourceExhaustedError, match=f"{nbytes} more tensor bytes"):
                verb(rm)
            assert_unchanged(before, snapshot(server.registry))
        c.free(ballast)
        assert isinstance(c.testrun(rm), float) and c.batchnorm(rm) == {}


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize(
    "metrics", ["loss", "output", "predict", "batchloss", "loss,batchloss,accuracy,matches,predict,output"]
)
@pytest.mark.parametrize("rows,batchsize,droplast", [(10, 4, False), (10, 4, True), (3, 8, False)])
def test_metrics_reply_bytes_are_the_bytes_of_the_metrics_answered(
    split: str, metrics: str, rows: int, batchsize: int, droplast: bool
) -> None:
    """A cluster's rank 0 reserves footprint.metrics_reply_bytes for each other rank's metrics before
    any rank runs (cluster.py, `_rank_metrics`): it must be what the epoch or the test answers."""
    from weightavg_server.domain import footprint, losses, optimizers, training

    module = torch.nn.Sequential(torch.nn.Linear(3, 5))
    model = training.create_model(module, losses.create_loss("ce"), optimizers.create_optimizer("sgd", module))
    training.set_options(model, split, [("metrics", metrics), ("batchsize", batchsize), ("droplast", droplast)])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 3, generator=gen), torch.randint(0, 5, (rows,), generator=gen)
    training.set_data(model, split, x, y, torch.device("cpu"))
    expected = footprint.metrics_reply_bytes(model, split)
    answered = training.run_epoch(model) if split == "train" else training.test_epoch(model)
    assert expected == sum(t.numel() * t.element_size() for _, t in answered)
