"""Domain errors: each class names a real gRPC status code, and every error a domain function raises on
purpose is the class (and so the code) its contract says. The transport maps `code` straight to
grpc.StatusCode[code], so a wrong class here is a wrong status on the wire."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from weightavg_server.domain import (
    averaging, batching, batchnorm, dictionaries, errors, losses, modules, optimizers, specs, training,
)
from weightavg_server.domain.dictionaries import COUNT_KEY, TensorDict
from weightavg_server.domain.specs import LayerSpec

CODES = {
    errors.WeightavgError: "INTERNAL",
    errors.InvalidArgument: "INVALID_ARGUMENT",
    errors.NotFound: "NOT_FOUND",
    errors.FailedPrecondition: "FAILED_PRECONDITION",
    errors.ResourceExhausted: "RESOURCE_EXHAUSTED",
    errors.Cancelled: "CANCELLED",
    errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
    errors.PermissionDenied: "PERMISSION_DENIED",
    errors.DataLoss: "DATA_LOSS",
    errors.Unavailable: "UNAVAILABLE",
    errors.Aborted: "ABORTED",
}


def test_every_error_class_has_its_grpc_status_code() -> None:
    defined = {cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.WeightavgError)}
    assert defined == set(CODES)  # a new class needs a row here
    for cls, code in CODES.items():
        assert cls.code == code and cls("x").code == code
        assert grpc.StatusCode[code].name == code
        assert issubclass(cls, Exception)


def _model() -> training.Model:
    module = torch.nn.Linear(2, 2)
    return training.create_model(module, losses.create_loss("ce"), optimizers.create_optimizer("sgd", module))


def _model_with_data() -> training.Model:
    model = _model()
    training.set_data(model, "train", torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.device("cpu"))
    training.set_data(model, "test", torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.device("cpu"))
    return model


def _live() -> TensorDict:
    return modules.view_parameters(torch.nn.Linear(2, 2))


def _always() -> bool:
    return True


RAISES: list[tuple[str, Callable[[], object], type[errors.WeightavgError]]] = [
    # averaging
    ("average-missing-entry", lambda: averaging.average_parameters(torch.nn.Linear(2, 2), TensorDict()), errors.InvalidArgument),
    ("average-bad-count", lambda: averaging.average_parameters(
        torch.nn.Linear(2, 2), TensorDict({COUNT_KEY: torch.tensor(1)})), errors.InvalidArgument),
    ("load-wrong-shape", lambda: averaging.load_parameters(
        torch.nn.Linear(2, 2), TensorDict({"weight": torch.zeros(3, 3)})), errors.InvalidArgument),
    ("broadcast-shape", lambda: averaging.broadcast_shape((2,), (3,)), errors.InvalidArgument),
    # dictionaries
    ("set-empty-key", lambda: dictionaries.set_entries(TensorDict(), [("", torch.zeros(1))], torch.device("cpu")), errors.InvalidArgument),
    ("set-live-unknown", lambda: dictionaries.set_entries(_live(), [("x", torch.zeros(1))], torch.device("cpu")), errors.NotFound),
    ("set-live-shape", lambda: dictionaries.set_entries(_live(), [("bias", torch.zeros(3))], torch.device("cpu")), errors.InvalidArgument),
    ("delete-missing", lambda: dictionaries.delete_entries(TensorDict(), ["x"]), errors.NotFound),
    ("delete-live", lambda: dictionaries.delete_entries(_live(), ["bias"]), errors.InvalidArgument),
    ("select-missing", lambda: dictionaries.select(TensorDict(), ["x"]), errors.NotFound),
    ("move-live", lambda: dictionaries.move(_live(), None, torch.float64), errors.InvalidArgument),
    # modules
    ("child-missing", lambda: modules.child(torch.nn.Linear(2, 2), "x"), errors.NotFound),
    ("parameter-missing", lambda: modules.parameter(torch.nn.Linear(2, 2), "x"), errors.NotFound),
    ("set-parameter-shape", lambda: modules.set_parameter(torch.nn.Linear(2, 2), "bias", torch.zeros(3)), errors.InvalidArgument),
    ("set-parameter-dotted", lambda: modules.set_parameter(torch.nn.Linear(2, 2), "a.b", torch.zeros(3)), errors.InvalidArgument),
    # batchnorm
    ("restore-unknown", lambda: batchnorm.restore_momentum(torch.nn.Linear(2, 2), {"x": 0.1}), errors.NotFound),
    ("restore-not-batchnorm", lambda: batchnorm.restore_momentum(torch.nn.Linear(2, 2), {"": 0.1}), errors.InvalidArgument),
    ("restore-nan", lambda: batchnorm.restore_momentum(torch.nn.BatchNorm1d(2), {"": float("nan")}), errors.InvalidArgument),
    # batching
    ("batch-size", lambda: batching.next_batch(torch.zeros(3), 3), errors.InvalidArgument),
    ("batch-0-dim", lambda: batching.full_size(torch.tensor(1.0)), errors.InvalidArgument),
    ("seek-outside", lambda: batching.seek(torch.zeros(3), 2, 2), errors.InvalidArgument),
    # losses, optimizers, specs
    ("loss-unknown", lambda: losses.create_loss("hinge"), errors.InvalidArgument),
    ("loss-option", lambda: losses.create_loss("ce", (), (("smoothing", 2.0),)), errors.InvalidArgument),
    ("optimizer-unknown", lambda: optimizers.create_optimizer("lbfgs", torch.nn.Linear(2, 2)), errors.InvalidArgument),
    ("optimizer-no-parameters", lambda: optimizers.create_optimizer("sgd", torch.nn.ReLU()), errors.InvalidArgument),
    ("optimizer-torch-refuses", lambda: optimizers.create_optimizer(
        "sgd", torch.nn.Linear(2, 2), (), (("nesterov", True),)), errors.InvalidArgument),
    ("set-lr-negative", lambda: optimizers.set_lr(optimizers.create_optimizer("sgd", torch.nn.Linear(2, 2)), -1.0),
     errors.InvalidArgument),
    ("spec-unknown", lambda: specs.build_module(LayerSpec("nosuch")), errors.InvalidArgument),
    ("spec-too-large", lambda: specs.build_module(LayerSpec("linear", args=(1000, 1000)), max_elements=100),
     errors.ResourceExhausted),
    # training
    ("model-other-optimizer", lambda: training.create_model(
        torch.nn.Linear(2, 2), losses.create_loss("ce"), optimizers.create_optimizer("sgd", torch.nn.Linear(2, 2))),
     errors.InvalidArgument),
    ("options-unknown", lambda: training.set_options(_model(), "train", [("x", 1)]), errors.InvalidArgument),
    ("data-mismatch", lambda: training.set_data(
        _model(), "train", torch.zeros(2, 2), torch.zeros(3), torch.device("cpu")), errors.InvalidArgument),
    ("run-no-data", lambda: training.run_epoch(_model()), errors.FailedPrecondition),
    ("test-no-data", lambda: training.test_epoch(_model()), errors.FailedPrecondition),
    ("batchnorm-no-data", lambda: training.recalculate_batchnorm(_model()), errors.FailedPrecondition),
    ("batch-no-data", lambda: training.next_model_batch(_model()), errors.FailedPrecondition),
    ("input-no-data", lambda: training.input_tensor(_model()), errors.FailedPrecondition),
    ("default-input-no-data", lambda: training.default_input(_model(), "eforward"), errors.FailedPrecondition),
    ("run-stopped", lambda: training.run_epoch(_model_with_data(), _always), errors.Cancelled),
    ("test-stopped", lambda: training.test_epoch(_model_with_data(), _always), errors.Cancelled),
    ("evaluate-stopped", lambda: training.evaluate(_model(), torch.zeros(3, 2), _always), errors.Cancelled),
    ("batchnorm-stopped", lambda: training.recalculate_batchnorm(_model_with_data(), _always), errors.Cancelled),
    ("forward-mode", lambda: training.forward(torch.nn.Linear(2, 2), torch.zeros(1, 2), "xforward"), errors.InvalidArgument),
    ("forward-shape", lambda: training.forward(torch.nn.Linear(2, 2), torch.zeros(1, 3), "eforward"), errors.InvalidArgument),
    ("replace-nothing", lambda: training.replace_parts(_model()), errors.InvalidArgument),
    ("replace-module-alone", lambda: training.replace_parts(_model(), module=torch.nn.Linear(2, 2)), errors.InvalidArgument),
]


@pytest.mark.parametrize("call, expected", [(call, cls) for _, call, cls in RAISES], ids=[name for name, _, _ in RAISES])
def test_domain_functions_raise_the_error_class_of_their_contract(
    call: Callable[[], object], expected: type[errors.WeightavgError]
) -> None:
    with pytest.raises(errors.WeightavgError) as info:
        call()
    assert type(info.value) is expected
    assert info.value.code == CODES[expected]
    assert str(info.value)  # a message for the client, never empty


def test_the_domain_imports_no_grpc() -> None:
    """The domain is plain torch: importing every module of it must not pull in grpc."""
    package = Path(errors.__file__).parent
    names = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    script = (
        "import sys\n"
        f"for name in {names!r}: __import__('weightavg_server.domain.' + name)\n"
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_', 'google.protobuf')))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    server = str(package.parent.parent)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": server, "PATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr


# -- unknown names suggest the closest valid ones ---------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: specs.build_module(LayerSpec("batchnorm", args=(4,))),
         "unrecognized module type: 'batchnorm'; did you mean 'batchnorm1d', 'batchnorm2d' or 'batchnorm3d'? "
         "(every type: weightavg info ADDRESS, or GetServerInfo's layer_types)"),
        (lambda: specs.build_module(LayerSpec("linear", args=(2, 1), options=(("biass", False),))),
         "linear: unknown option 'biass'; did you mean 'bias'? (options: in, out, bias)"),
        (lambda: losses.create_loss("mce"), "unrecognized loss: 'mce'; did you mean 'ce', 'bce' or 'mse'? "
         "(one of ce, nll, mse, bce, bcelogits, smoothl1)"),
        (lambda: losses.create_loss("ce", (), (("smoothng", 0.1),)),
         "ce: unknown option 'smoothng'; did you mean 'smoothing'? (options: ignore, smoothing, reduce)"),
        (lambda: optimizers.create_optimizer("adamm", specs.build_module(LayerSpec("linear", args=(2, 1)))),
         "unrecognized optimizer: 'adamm'; did you mean 'adam', 'adamw' or 'fedadam'? (one of sgd, adam, adamw, rmsprop, adagrad, fedadam, fedyogi, fedadagrad)"),
        (lambda: training.set_options(_model(), "train", [("metrics", "accuracy,los")]),
         "metrics: unrecognized metric 'los'; did you mean 'loss'? (one of loss, batchloss, accuracy, matches, "
         "predict, output)"),
        (lambda: training.set_options(_model(), "train", [("batchsze", 10)]),
         "unrecognized train setting: batchsze; did you mean 'batchsize'? (settings: batchsize, droplast, shuffle, "
         "seed, metrics); nothing set"),
    ],
    ids=["layer-type", "layer-option", "loss", "loss-option", "optimizer", "metric", "setting"],
)
def test_unknown_names_suggest_the_closest_valid_ones(make: Callable[[], object], message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        make()
    assert str(err.value) == message


def test_an_unknown_name_with_nothing_close_lists_every_valid_one() -> None:
    assert errors.did_you_mean("xyzzy", specs.LAYER_TYPES) == ""
    with pytest.raises(errors.InvalidArgument) as err:
        specs.build_module(LayerSpec("xyzzy"))
    assert str(err.value) == f"unrecognized module type: 'xyzzy' ({', '.join(specs.LAYER_TYPES)})"
