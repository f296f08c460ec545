"""domain.training in process, on tiny models built from layer specs: data, epochs, tests, evaluate,
forward modes, batchnorm recalculation and stopping midway.

Oracles are plain PyTorch on a deep copy of the same module (hand-written loops, eval-mode forwards,
torch.optim.swa_utils.update_bn). Every refused or stopped call is checked to put back what it says it
puts back. The data are a separable toy problem: the label says whether x0 + x1 > 0.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim.swa_utils import update_bn

from weightavg_server.domain import losses, optimizers, specs, training
from weightavg_server.domain.errors import Cancelled, FailedPrecondition, InvalidArgument
from weightavg_server.domain.specs import LayerSpec

CPU = torch.device("cpu")

PLAIN = LayerSpec("sequential", children=(
    LayerSpec("linear", "a", (2, 8)), LayerSpec("relu", "r"), LayerSpec("linear", "d", (8, 2)),
))
WITH_BN = LayerSpec("sequential", children=(
    LayerSpec("linear", "a", (2, 8)), LayerSpec("batchnorm1d", "b", (8, 1e-5, 0.3)), LayerSpec("relu", "r"),
    LayerSpec("linear", "d", (8, 2)),
))


def toy(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * 2 + 0.5
    return x, (x[:, 0] + x[:, 1] > 0).long()


def make(spec: LayerSpec = PLAIN, lr: float = 0.1, init_seed: int = 0, momentum: float = 0.0) -> training.Model:
    torch.manual_seed(init_seed)
    module = specs.build_module(spec)
    optimizer = optimizers.create_optimizer("sgd", module, (lr, momentum))
    return training.create_model(module, losses.create_loss("ce"), optimizer)


def with_data(model: training.Model, n: int = 40, batchsize: int = 8, **options: Any) -> training.Model:
    x, y = toy(n)
    training.set_options(model, "train", [("batchsize", batchsize), *options.items()])
    training.set_data(model, "train", x, y, CPU)
    return model


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_state(module: torch.nn.Module, expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    now = module.state_dict()
    assert list(now) == list(expected)
    for name, t in expected.items():
        torch.testing.assert_close(now[name], t, rtol=0, atol=atol, msg=name)


def flags(module: torch.nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def mixed_flags(module: torch.nn.Module) -> list[bool]:
    """Root in eval mode, one child left in train mode: each flag must come back as it was."""
    module.eval()
    list(module.children())[1].train()
    return flags(module)


def metric(result: list[tuple[str, torch.Tensor]], name: str) -> torch.Tensor:
    return dict(result)[name]


# -- parts and options ----------------------------------------------------------------------------


def test_create_model_refuses_an_optimizer_over_another_module() -> None:
    module = specs.build_module(PLAIN)
    other = specs.build_module(PLAIN)
    with pytest.raises(InvalidArgument, match="different module"):
        training.create_model(module, losses.create_loss("ce"), optimizers.create_optimizer("sgd", other))


@pytest.mark.parametrize(
    "split, values, message",
    [
        ("train", [("batchsize", 5), ("metrics", "loss,bogus")], "unrecognized metric 'bogus'"),
        ("train", [("batchsize", 5), ("batchsize", 6)], "given twice"),
        ("train", [("batchsize", 5), ("nosuch", 1)], "unrecognized train setting: nosuch"),
        ("train", [("batchsize", 0)], "positive"),
        ("test", [("batchsize", 5), ("shuffle", True)], "not set for evaluation"),
        ("test", [("metrics", "loss,loss")], "named twice"),
        ("valid", [("batchsize", 5)], "train or test"),
    ],
    ids=["metric", "twice", "unknown", "zero-batch", "train-only-on-test", "metric-twice", "split"],
)
def test_set_options_is_all_or_nothing(split: str, values: list[tuple[str, Any]], message: str) -> None:
    model = make()
    before = (dict(model.train), dict(model.test))
    with pytest.raises(InvalidArgument, match=message):
        training.set_options(model, split, values)
    assert (model.train, model.test) == before


# -- set_data -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, batchsize, droplast, batches",
    [(40, 8, False, 5), (41, 8, False, 6), (41, 8, True, 5), (5, 8, False, 1), (5, 8, True, 1), (1, 1, False, 1)],
)
def test_set_data_returns_the_number_of_batches(n: int, batchsize: int, droplast: bool, batches: int) -> None:
    model = make()
    training.set_options(model, "train", [("batchsize", batchsize), ("droplast", droplast)])
    x, y = toy(n)
    assert training.set_data(model, "train", x, y, CPU) == batches
    assert training.batches(model, "train") == batches and training.data_size(model, "train") == n
    assert training.batch_count(n, batchsize, droplast) == batches


def test_without_data_batches_and_size_are_minus_one() -> None:
    model = make()
    assert training.batches(model, "test") == -1 and training.data_size(model, "train") == -1
    assert training.restore_data(model) == -1


@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.tensor(1.0), torch.tensor(1), "inputs need at least one sample"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "inputs need at least one sample"),
        (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long), "inputs need at least one sample"),
        (torch.zeros(3, 2), torch.tensor(1), "targets need at least one sample"),
        (torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), "tensor size mismatch, 3 vs 4"),
    ],
    ids=["0-dim", "no-rows", "empty-rows", "0-dim-targets", "mismatch"],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_set_data_refuses_bad_tensors_and_keeps_the_old_data(
    x: torch.Tensor, y: torch.Tensor, message: str, split: str
) -> None:
    model = make()
    good = toy(10)
    training.set_data(model, split, *good, CPU)
    old = model.train_data if split == "train" else model.test_data
    with pytest.raises(InvalidArgument, match=message):
        training.set_data(model, split, x, y, CPU)
    assert (model.train_data if split == "train" else model.test_data) is old


def test_set_data_needs_a_split() -> None:
    with pytest.raises(InvalidArgument, match="train or test"):
        training.set_data(make(), "valid", *toy(4), CPU)


# -- dtypes at upload: converted when exact (or a documented rounding), refused naming the argument --


def make_loss(loss: str, spec: LayerSpec = PLAIN) -> training.Model:
    module = specs.build_module(spec)
    return training.create_model(module, losses.create_loss(loss), optimizers.create_optimizer("sgd", module, (0.1,)))


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (torch.tensor([[0, 255], [7, 9]], dtype=torch.uint8), torch.tensor([1, 0], dtype=torch.int32)),
        (torch.tensor([[0, 255], [7, 9]], dtype=torch.float64) / 255, torch.tensor([1, 0], dtype=torch.uint8)),
        (torch.tensor([[-5, 3], [2**24, -(2**24)]], dtype=torch.int64), torch.tensor([1, 0], dtype=torch.int16)),
        (torch.tensor([[True, False], [False, True]]), torch.tensor([True, False])),
    ],
    ids=["uint8-images", "float64-images", "int64-exact", "bool"],
)
def test_set_data_converts_inputs_to_the_parameters_dtype_and_widens_labels(x: torch.Tensor, y: torch.Tensor) -> None:
    model = make()
    training.set_data(model, "train", x, y, CPU)
    data = model.train_data
    assert data is not None and data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert torch.equal(data.x, x.to(torch.float32)) and torch.equal(data.y, y.long())
    assert training.run_epoch(model)[0][0] == "loss"  # the epoch runs on what was stored


@pytest.mark.parametrize(
    ("loss", "x", "y", "message"),
    [
        ("ce", torch.zeros(3, 2), torch.zeros(3, dtype=torch.float64),
         "y (targets) is float64 of shape [3]; the ce loss takes integer class indices (any integer dtype, widened "
         "to int64) or class probabilities (floating, one column per class): send integer labels; nothing loaded"),
        ("nll", torch.zeros(3, 2), torch.zeros(3, 2),
         "y (targets) is float32 of shape [3, 2]; the nll loss takes integer class indices (any integer dtype, "
         "widened to int64): send integer labels; nothing loaded"),
        ("ce", torch.zeros(3, 2, dtype=torch.complex64), torch.zeros(3, dtype=torch.long),
         "x (inputs) is complex64; the model's parameters are float32: send real float32 values (integers and "
         "other float widths are converted); nothing loaded"),
        ("ce", torch.tensor([[2**24 + 1, 0]] * 3), torch.zeros(3, dtype=torch.long),
         "x (inputs) is int64 with values that float32 cannot hold exactly; send float32; nothing loaded"),
        ("mse", torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.complex128),
         "y (targets) is complex128; the mse loss takes real targets: integer labels, or float32 values (other "
         "float widths are converted); nothing loaded"),
    ],
    ids=["ce-float-labels", "nll-probabilities", "complex-inputs", "inexact-int64", "mse-complex"],
)
def test_set_data_refuses_dtypes_the_model_cannot_use_and_keeps_the_old_data(
    loss: str, x: torch.Tensor, y: torch.Tensor, message: str
) -> None:
    model = make_loss(loss)
    training.set_data(model, "train", *toy(4), CPU)
    old = model.train_data
    with pytest.raises(InvalidArgument) as err:
        training.set_data(model, "train", x, y, CPU)
    assert str(err.value).startswith(message)
    assert model.train_data is old


def test_targets_follow_the_loss() -> None:
    x = torch.zeros(3, 2, dtype=torch.float64)
    probabilities = torch.full((3, 2), 0.5, dtype=torch.float64)
    assert training.data_dtypes(make_loss("ce"), x, probabilities) == (torch.float32, torch.float32)
    assert training.data_dtypes(make_loss("mse"), x, torch.ones(3, 2, dtype=torch.int16)) == (torch.float32, torch.int64)
    assert training.data_dtypes(make_loss("bce"), x, torch.ones(3, 2, dtype=torch.float16)) == (torch.float32,) * 2
    embedding = LayerSpec("sequential", children=(LayerSpec("embed", "e", (10, 4)), LayerSpec("flatten", "f")))
    assert training.input_dtype(specs.build_module(embedding), torch.tensor([[1, 2]], dtype=torch.uint8)) == torch.int64
    with pytest.raises(InvalidArgument, match=r"^x \(inputs\) is float32; the model's first layer is an embedding"):
        training.input_dtype(specs.build_module(embedding), torch.zeros(1, 2))
    assert training.input_dtype(specs.build_module(LayerSpec("relu")), torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_integer_targets_of_a_regression_loss_train_as_floats() -> None:
    model = make_loss("mse")
    x, y = toy(8)
    training.set_data(model, "train", x, torch.stack([y, 1 - y], 1).to(torch.uint8), CPU)
    assert model.train_data is not None and model.train_data.y.dtype == torch.int64
    assert training.run_epoch(model)[0][0] == "loss"


def test_evaluate_converts_inputs_as_set_data_does() -> None:
    model = make()
    x = toy(6)[0].double()
    torch.testing.assert_close(training.evaluate(model, x), training.evaluate(model, x.float()), rtol=0, atol=0)


def test_set_data_from_views_stores_tensors_that_can_be_batched_in_place() -> None:
    model = make()
    x, y = toy(30)
    wide = torch.cat([x, x], 1)
    xs, ys = wide[5:25, 1:3], y[5:25]  # neither owns its storage
    training.set_data(model, "train", xs, ys, CPU)
    data = model.train_data
    assert data is not None
    assert torch.equal(data.x, xs) and torch.equal(data.y, ys)
    assert training.data_size(model, "train") == 20
    training.set_options(model, "train", [("batchsize", 8)])
    assert training.next_model_batch(model) and training.next_model_batch(model)
    assert training.input_tensor(model).shape == (8, 2) and torch.equal(training.input_tensor(model), xs[8:16])
    assert training.restore_data(model) == 20 and data.x.shape == (20, 2)


# -- run_epoch ------------------------------------------------------------------------------------


def test_run_epoch_decreases_the_loss_on_a_separable_problem() -> None:
    model = with_data(make(lr=0.2), n=200, batchsize=20, shuffle=True, seed=1)
    losses_ = [float(metric(training.run_epoch(model), "loss")) for _ in range(6)]
    assert losses_[-1] < 0.5 * losses_[0], losses_
    training.set_options(model, "test", [("metrics", "accuracy")])
    training.set_data(model, "test", *toy(200, seed=9), CPU)
    assert float(metric(training.test_epoch(model), "accuracy")) > 90.0


def test_run_epoch_equals_a_hand_written_torch_loop() -> None:
    """Same permutation (the model's generator, seeded by the seed option), zero_grad(set_to_none),
    forward in train mode, cross entropy, backward, SGD step: parameters, loss and data order agree."""
    seed, n, w = 4, 45, 10
    model = with_data(make(WITH_BN, lr=0.05, momentum=0.9), n=n, batchsize=w, shuffle=True, seed=seed)
    net = copy.deepcopy(model.module)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    lx, ly = toy(n)
    for _ in range(2):
        perm = torch.randperm(n, generator=generator)
        lx, ly = lx[perm], ly[perm]
        batch_losses = []
        net.train()
        for i in range(0, n, w):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(lx[i:i + w]), ly[i:i + w])
            loss.backward()
            opt.step()
            batch_losses.append(loss.detach())
        result = training.run_epoch(model)
        assert [name for name, _ in result] == ["loss"]
        reported = metric(result, "loss")
        assert reported.dtype == torch.float64 and reported.dim() == 0
        torch.testing.assert_close(reported, torch.stack(batch_losses).double().mean(), rtol=0, atol=1e-7)
    assert_state(model.module, state(net), atol=1e-6)
    data = model.train_data
    assert data is not None and torch.equal(data.x, lx) and torch.equal(data.y, ly)


def test_run_epoch_with_the_same_seed_is_reproducible_and_another_seed_is_not() -> None:
    def train(seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
        model = with_data(make(WITH_BN), n=60, batchsize=8, shuffle=True, seed=seed)
        out = [float(metric(training.run_epoch(model), "loss")) for _ in range(3)]
        return state(model.module), out

    first, second, other = train(7), train(7), train(8)
    assert first[1] == second[1]
    for name, t in first[0].items():
        assert torch.equal(t, second[0][name]), name
    assert any(not torch.equal(t, other[0][name]) for name, t in first[0].items())


def test_run_epoch_returns_the_metrics_asked_for_in_order() -> None:
    model = with_data(make(), n=42, batchsize=10, metrics="matches,batchloss,loss,accuracy,predict")
    result = training.run_epoch(model)
    assert [name for name, _ in result] == ["matches", "batchloss", "loss", "accuracy", "predict"]
    batchloss = metric(result, "batchloss")
    assert batchloss.shape == (5,)
    torch.testing.assert_close(metric(result, "loss"), batchloss.double().mean())
    predict = metric(result, "predict")
    data = model.train_data
    assert data is not None and predict.shape == (42,)
    matches = int((predict == data.y).sum())
    assert int(metric(result, "matches")) == matches
    torch.testing.assert_close(metric(result, "accuracy"), torch.tensor(100.0 * matches / 42, dtype=torch.float64))


def test_run_epoch_puts_every_train_flag_back() -> None:
    model = with_data(make(WITH_BN))
    before = mixed_flags(model.module)
    training.run_epoch(model)
    assert flags(model.module) == before


def test_run_epoch_without_data_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="no training data"):
        training.run_epoch(make())


@pytest.mark.parametrize(
    "n, features, message",
    [(40, 3, r"run: .*shapes cannot be multiplied"), (41, 2, r"run: Expected more than 1 value per channel")],
    ids=["wrong-width", "last-batch-of-one-through-batchnorm"],
)
def test_run_epoch_on_data_that_does_not_fit_changes_nothing(n: int, features: int, message: str) -> None:
    """The last batch is tried first: a batch of one fails in batchnorm only at the end of the epoch."""
    model = make(WITH_BN, momentum=0.9)
    x = torch.randn(n, features)
    training.set_options(model, "train", [("batchsize", 8)])
    training.set_data(model, "train", x, torch.zeros(n, dtype=torch.long), CPU)
    before, before_flags = state(model.module), mixed_flags(model.module)
    with pytest.raises(InvalidArgument, match=message):
        training.run_epoch(model)
    assert_state(model.module, before)
    assert flags(model.module) == before_flags
    assert not model.optimizer.optim.state  # no step taken


# -- test_epoch and evaluate ----------------------------------------------------------------------


def trained_bn_model() -> training.Model:
    model = with_data(make(WITH_BN), n=48, batchsize=8, shuffle=True)
    training.run_epoch(model)
    return model


@pytest.mark.parametrize("droplast, batches, count", [(False, 3, 20), (True, 2, 14)])
def test_test_epoch_metrics_equal_an_eval_mode_torch_pass(droplast: bool, batches: int, count: int) -> None:
    model = trained_bn_model()
    x, y = toy(20, seed=5)
    training.set_options(model, "test", [("batchsize", 7), ("droplast", droplast),
                                         ("metrics", "loss,batchloss,accuracy,matches,predict,output")])
    training.set_data(model, "test", x, y, CPU)
    before, before_flags = state(model.module), mixed_flags(model.module)
    result = dict(training.test_epoch(model))

    net = copy.deepcopy(model.module).eval()
    with torch.no_grad():
        outputs = [net(x[i:i + 7]) for i in range(0, 7 * batches, 7)]
        batch_losses = torch.stack([torch.nn.functional.cross_entropy(o, y[i * 7:i * 7 + 7]) for i, o in enumerate(outputs)])
    output = torch.cat(outputs)
    predict = output.argmax(-1)
    matches = int((predict == y[:count]).sum())
    torch.testing.assert_close(result["output"], output, rtol=0, atol=1e-6)
    assert torch.equal(result["predict"], predict)
    torch.testing.assert_close(result["batchloss"], batch_losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["loss"], batch_losses.double().mean(), rtol=0, atol=1e-6)
    assert result["matches"].dtype == torch.int64 and int(result["matches"]) == matches
    torch.testing.assert_close(result["accuracy"], torch.tensor(100.0 * matches / count, dtype=torch.float64))
    assert_state(model.module, before)  # eval mode: the batchnorm statistics are read, not updated
    assert flags(model.module) == before_flags


def test_test_epoch_computes_the_loss_only_when_asked() -> None:
    """Probability targets of the wrong width break cross entropy but not accuracy (argmax of targets)."""
    model = make()
    x, _ = toy(10)
    y = torch.nn.functional.one_hot((x[:, 0] + x[:, 1] > 0).long(), 3).float()
    training.set_data(model, "test", x, y, CPU)
    training.set_options(model, "test", [("metrics", "accuracy")])
    assert 0.0 <= float(metric(training.test_epoch(model), "accuracy")) <= 100.0
    training.set_options(model, "test", [("metrics", "accuracy,loss")])
    with pytest.raises(InvalidArgument, match=r"testrun: targets of shape \[10, 3\] do not match the output's \[10, 2\]"):
        training.test_epoch(model)


def test_test_epoch_without_test_data_is_a_failed_precondition() -> None:
    model = with_data(make())
    with pytest.raises(FailedPrecondition, match="no testing data"):
        training.test_epoch(model)


@pytest.mark.parametrize("batchsize", [1, 3, 10, 100])
def test_evaluate_in_batches_equals_one_eval_mode_forward(batchsize: int) -> None:
    model = trained_bn_model()
    training.set_options(model, "test", [("batchsize", batchsize)])
    x, _ = toy(10, seed=3)
    before = state(model.module)
    model.module.train()
    out = training.evaluate(model, x)
    assert all(flags(model.module)) and not out.requires_grad
    assert_state(model.module, before)
    net = copy.deepcopy(model.module).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "x, message",
    [(torch.tensor(1.0), "at least one sample"), (torch.zeros(0, 2), "at least one sample"), (torch.zeros(4, 3), "evaluate: ")],
    ids=["0-dim", "empty", "wrong-width"],
)
def test_evaluate_refuses_inputs_that_do_not_fit(x: torch.Tensor, message: str) -> None:
    model = trained_bn_model()
    before, before_flags = state(model.module), mixed_flags(model.module)
    with pytest.raises(InvalidArgument, match=message):
        training.evaluate(model, x)
    assert_state(model.module, before)
    assert flags(model.module) == before_flags


# -- forward modes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, train_flag, grad, updates_statistics",
    [("forward", True, True, True), ("nforward", True, False, True), ("eforward", False, False, False)],
)
def test_forward_modes_set_flag_and_gradients_for_the_call_only(
    mode: str, train_flag: bool, grad: bool, updates_statistics: bool
) -> None:
    model = trained_bn_model()
    module = model.module
    x, _ = toy(6, seed=2)
    reference = copy.deepcopy(module).train(train_flag)
    seen: list[tuple[bool, bool]] = []
    module.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    before, before_flags = state(module), mixed_flags(module)
    with torch.set_grad_enabled(grad):
        expected = reference(x)

    out = training.forward(module, x, mode)
    assert seen == [(train_flag, grad)]
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-6)
    assert flags(module) == before_flags
    changed = not torch.equal(module.b.running_mean, before["b.running_mean"])
    assert changed is updates_statistics
    assert_state(module, state(reference), atol=1e-6)  # statistics as torch's own call left them


def test_forward_that_fails_puts_batchnorm_statistics_and_flags_back() -> None:
    """The failing layer comes after batchnorm, so the statistics were updated before the error."""
    module = specs.build_module(LayerSpec("sequential", children=(
        LayerSpec("linear", "a", (2, 8)), LayerSpec("batchnorm1d", "b", (8,)), LayerSpec("linear", "d", (5, 2)),
    )))
    before, before_flags = state(module), mixed_flags(module)
    with pytest.raises(InvalidArgument, match=r"nforward: .*shapes cannot be multiplied"):
        training.forward(module, torch.randn(6, 2), "nforward")
    assert_state(module, before)
    assert flags(module) == before_flags


def test_forward_with_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown forward mode 'tforward'"):
        training.forward(make().module, torch.zeros(2, 2), "tforward")


@pytest.mark.parametrize("mode, split", [("forward", "train"), ("nforward", "train"), ("eforward", "test")])
def test_default_input_is_the_model_data_for_the_mode(mode: str, split: str) -> None:
    model = make()
    with pytest.raises(FailedPrecondition, match=f"no {split}ing data"):
        training.default_input(model, mode)
    training.set_data(model, split, *toy(5), CPU)
    data = model.train_data if split == "train" else model.test_data
    assert data is not None and training.default_input(model, mode) is data.x


# -- recalculate_batchnorm ------------------------------------------------------------------------


@pytest.mark.parametrize("n, droplast", [(45, False), (45, True), (40, False)])
def test_recalculate_batchnorm_equals_torch_update_bn(n: int, droplast: bool) -> None:
    model = with_data(make(WITH_BN), n=n, batchsize=10, shuffle=True, seed=2)
    training.run_epoch(model)  # moves the statistics away from their reset values, and shuffles the data
    training.set_options(model, "train", [("droplast", droplast)])
    data = model.train_data
    assert data is not None
    net = copy.deepcopy(model.module)
    model.module.eval()
    net.eval()
    batches = [data.x[i:i + 10] for i in range(0, (n // 10) * 10 if droplast else n, 10)]

    assert training.recalculate_batchnorm(model) == {"b": 0.3}
    update_bn(batches, net)
    assert_state(model.module, state(net))  # same batches through the same kernels: bit for bit
    assert int(model.module.b.num_batches_tracked) == len(batches)
    assert model.module.b.momentum == 0.3 and not any(flags(model.module))


def test_recalculate_batchnorm_uses_every_batch_after_manual_batching() -> None:
    """Unlike the reference, a model stepped part way with next_model_batch is recalculated over all data."""
    model = with_data(make(WITH_BN), n=40, batchsize=10)
    assert training.next_model_batch(model) and training.next_model_batch(model)
    training.recalculate_batchnorm(model)
    assert int(model.module.b.num_batches_tracked) == 4
    data = model.train_data
    assert data is not None and data.x.shape == (40, 2)


def test_recalculate_batchnorm_without_data_resets_nothing() -> None:
    model = make(WITH_BN)
    with torch.no_grad():
        model.module.b.running_mean.fill_(0.5)
    before = state(model.module)
    with pytest.raises(FailedPrecondition, match="no training data"):
        training.recalculate_batchnorm(model)
    assert_state(model.module, before)
    assert model.module.b.momentum == 0.3


def test_recalculate_batchnorm_on_a_failing_forward_puts_everything_back() -> None:
    model = make(WITH_BN)
    training.set_data(model, "train", torch.randn(20, 3), torch.zeros(20, dtype=torch.long), CPU)
    with torch.no_grad():
        model.module.b.running_var.fill_(2.0)
    before, before_flags = state(model.module), mixed_flags(model.module)
    with pytest.raises(InvalidArgument, match=r"batchnorm \(batch 1 of 1\)"):
        training.recalculate_batchnorm(model)
    assert_state(model.module, before)
    assert model.module.b.momentum == 0.3 and flags(model.module) == before_flags


def test_recalculate_batchnorm_without_batchnorm_layers_returns_empty() -> None:
    model = with_data(make(PLAIN))
    before = state(model.module)
    assert training.recalculate_batchnorm(model) == {}
    assert_state(model.module, before)


# -- stopping midway ------------------------------------------------------------------------------


def stop_after(checks: int) -> Callable[[], bool]:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > checks

    return should_stop


def _run(model: training.Model, stop: Callable[[], bool]) -> object:
    return training.run_epoch(model, stop)


def _test(model: training.Model, stop: Callable[[], bool]) -> object:
    return training.test_epoch(model, stop)


def _evaluate(model: training.Model, stop: Callable[[], bool]) -> object:
    return training.evaluate(model, toy(50, seed=1)[0], stop)


def _batchnorm(model: training.Model, stop: Callable[[], bool]) -> object:
    return training.recalculate_batchnorm(model, stop)


@pytest.mark.parametrize(
    "call, what",
    [(_test, "testrun"), (_evaluate, "evaluate"), (_batchnorm, "batchnorm")],
    ids=["test_epoch", "evaluate", "recalculate_batchnorm"],
)
@pytest.mark.parametrize("checks", [0, 2, 4])
def test_stopping_midway_raises_cancelled_and_changes_nothing(
    call: Callable[[training.Model, Callable[[], bool]], object], what: str, checks: int
) -> None:
    model = trained_bn_model()
    training.set_options(model, "train", [("batchsize", 10)])
    training.set_options(model, "test", [("batchsize", 10)])
    training.set_data(model, "train", *toy(50, seed=4), CPU)
    training.set_data(model, "test", *toy(50, seed=5), CPU)
    before, before_flags = state(model.module), mixed_flags(model.module)
    with pytest.raises(Cancelled, match=f"{what} stopped after {checks} of 5 batches") as info:
        call(model, stop_after(checks))
    assert info.value.code == "CANCELLED"
    assert_state(model.module, before)
    assert model.module.b.momentum == 0.3 and flags(model.module) == before_flags


@pytest.mark.parametrize("checks", [1, 3])
def test_stopping_run_epoch_keeps_the_batches_done_and_puts_flags_back(checks: int) -> None:
    """A run stopped after k batches leaves the module exactly as a run over those k batches alone."""
    stopped = with_data(make(WITH_BN, momentum=0.9), n=50, batchsize=10)
    alone = make(WITH_BN, momentum=0.9)
    x, y = toy(50)
    training.set_options(alone, "train", [("batchsize", 10)])
    training.set_data(alone, "train", x[:checks * 10], y[:checks * 10], CPU)
    before_flags = mixed_flags(stopped.module)
    with pytest.raises(Cancelled, match=f"run stopped after {checks} of 5 batches"):
        training.run_epoch(stopped, stop_after(checks))
    training.run_epoch(alone)
    assert_state(stopped.module, state(alone.module))
    assert flags(stopped.module) == before_flags
    assert training.data_size(stopped, "train") == 50 and training.restore_data(stopped) == 50


@pytest.mark.parametrize("checks", [0, 2])
def test_stopping_a_shuffled_run_epoch_keeps_the_order_it_trained_in(checks: int) -> None:
    """Cancelled, a shuffled epoch keeps its permutation, as it keeps its batches: the data stay
    reordered and the generator stays past the draw, even before the first batch."""
    model = with_data(make(), n=40, batchsize=8, shuffle=True, seed=5)
    x, y = toy(40)
    generator = torch.Generator().manual_seed(5)
    perm = torch.randperm(40, generator=generator)
    with pytest.raises(Cancelled, match=f"run stopped after {checks} of 5 batches"):
        training.run_epoch(model, stop_after(checks))
    data = model.train_data
    assert data is not None and torch.equal(data.x, x[perm]) and torch.equal(data.y, y[perm])
    assert torch.equal(model.generator.get_state(), generator.get_state())


# -- an epoch that fails midway ---------------------------------------------------------------------


def partly_optimized() -> training.Model:
    """A batchnorm network whose optimizer holds every layer but the last, after one shuffled epoch:
    gradients, momentum, statistics and a drawn permutation to put back, and the last layer's
    gradients, which zero_grad never clears, adding up in place across batches."""
    torch.manual_seed(0)
    module = specs.build_module(WITH_BN)
    held = [p for name, p in module.named_parameters() if not name.startswith("d.")]
    optimizer = optimizers.Optimizer("sgd", {}, module, torch.optim.SGD(held, lr=0.1, momentum=0.9))
    model = training.create_model(module, losses.create_loss("ce"), optimizer)
    with_data(model, n=40, batchsize=8, shuffle=True, seed=2)
    training.run_epoch(model)
    return model


def everything(model: training.Model) -> list[torch.Tensor]:
    """Parameters, gradients, buffers, optimizer state, data, and the generator's state."""
    return [t.detach().clone() for t in model.tensors()] + [model.generator.get_state()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (s, t) in enumerate(zip(a, b)):
        assert s.dtype == t.dtype and torch.equal(s, t), i


def test_an_epoch_failing_midway_puts_back_everything_it_changed() -> None:
    """A fault in the third batch, after two have trained, leaves the model bit for bit as it was,
    and its next epoch equals that of a twin that never ran the failed one."""
    failed, never = partly_optimized(), partly_optimized()
    before = everything(failed)
    forwards = itertools.count()

    def fault(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if next(forwards) == 3:  # 0 is the check on the last batch, then batches 1, 2, 3
            raise RuntimeError("injected fault")

    hook = failed.module.register_forward_hook(fault)
    with pytest.raises(InvalidArgument, match=r"run \(batch 3 of 5\): injected fault"):
        training.run_epoch(failed)
    hook.remove()
    assert_same(everything(failed), before)
    assert_same([t for _, t in training.run_epoch(failed)], [t for _, t in training.run_epoch(never)])
    assert_same(everything(failed), everything(never))


@pytest.mark.parametrize(
    "loss, output, target, predicted",
    [
        ("ce", torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([1]), torch.tensor([1])),
        ("ce", torch.zeros(2, 3, 4).index_fill(1, torch.tensor([2]), 1.0), torch.full((2, 4), 2), torch.full((2, 4), 2)),
        ("nll", torch.tensor([0.0, 2.0, 1.0]), torch.tensor(1), torch.tensor(1)),  # unbatched [C]
        ("ce", torch.tensor([[0.0, 2.0]]), torch.tensor([[0.9, 0.1]]), torch.tensor([1])),  # probabilities
        ("mse", torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([1])),  # one-hot
        ("mse", torch.tensor([0.5, -1.0]), torch.tensor([0.5, 3.0]), torch.tensor([0, 0])),  # no class dim
        ("mse", torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0)),
    ],
)
def test_predictions_take_the_class_dimension_the_loss_reads(
    loss: str, output: torch.Tensor, target: torch.Tensor, predicted: torch.Tensor
) -> None:
    got, truth = training.predictions(loss, output, target)
    assert torch.equal(got, predicted) and got.shape == truth.shape


def test_predictions_that_do_not_compare_with_the_targets_are_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"predictions of shape \[2, 5\].*targets of shape \[2, 3\]"):
        training.predictions("ce", torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(InvalidArgument, match=r"targets of shape \[2, 1\] hold one column where the output \[2, 3\]"):
        training.predictions("ce", torch.zeros(2, 3), torch.ones(2, 1, dtype=torch.int64))  # a column of labels
    with pytest.raises(InvalidArgument, match=r"targets of shape \[2, 1\] hold one column where the output \[2, 3\]"):
        training.predictions("mse", torch.zeros(2, 3), torch.ones(2, 1))
    _, truth = training.predictions("mse", torch.zeros(2, 3), torch.eye(2))  # one-hot rows of another width name classes
    assert torch.equal(truth, torch.tensor([0, 1]))
