"""Models: a module with a loss, an optimizer, train/test options and data; epochs, tests, forwards
and batchnorm recalculation over the model's data.

Long loops take `should_stop`, a plain callable checked between batches, and stop with Cancelled
after putting back what they changed (train flags, batchnorm momenta and statistics, data size).
Every call checks what it can before it changes anything, so a bad request leaves the model as it was;
an epoch that fails midway all the same puts back everything it changed (rollback.py).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import batching, dtypes, rollback
from .batchnorm import Momenta, reset_batchnorm, restore_momentum
from .errors import Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted, did_you_mean
from .losses import Loss
from .optimizers import Optimizer, get_lr
from .options import NON_NEGATIVE, POSITIVE, Opt, Value, Values, ValueType, Wording, coerce, float_value, int_value
from .tensors import module_tensors

StopCheck = Callable[[], bool]

METRICS = ("loss", "batchloss", "accuracy", "matches", "predict", "output")
"""What run and testrun can return, in the reference's names."""

TRAIN_OPTIONS = (
    Opt("batchsize", ValueType.INT, 32, POSITIVE),
    Opt("droplast", ValueType.BOOL, False),
    Opt("shuffle", ValueType.BOOL, False),
    Opt("seed", ValueType.INT, 0, NON_NEGATIVE),
    Opt("metrics", ValueType.STR, "loss"),
)
TEST_OPTIONS = (
    Opt("batchsize", ValueType.INT, 100, POSITIVE),
    Opt("droplast", ValueType.BOOL, False),
    Opt("metrics", ValueType.STR, "loss"),
)
TRAIN_ONLY = frozenset(o.name for o in TRAIN_OPTIONS) - frozenset(o.name for o in TEST_OPTIONS)


def never_stop() -> bool:
    """A StopCheck for callers without a deadline."""
    return False


@dataclass
class Data:
    """Inputs and targets with the same first dimension, each a tensor that owns its storage."""

    x: torch.Tensor
    y: torch.Tensor


def _default(opts: Sequence[Opt]) -> dict[str, Value]:
    return {o.name: o.default for o in opts}


@dataclass
class Model:
    """A model handle's object. It shares the module with any module handle and optimizer."""

    module: nn.Module
    loss: Loss
    optimizer: Optimizer
    train: dict[str, Value] = field(default_factory=lambda: _default(TRAIN_OPTIONS))
    test: dict[str, Value] = field(default_factory=lambda: _default(TEST_OPTIONS))
    train_data: Data | None = None
    test_data: Data | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.generator.manual_seed(int_value(self.train, "seed"))

    def tensors(self) -> Iterator[torch.Tensor]:
        """Parameters, their gradients, buffers, optimizer state, and the train and test data."""
        yield from module_tensors(self.module)
        yield from self.optimizer.state_tensors()
        yield from self.loss.tensors()
        for data in (self.train_data, self.test_data):
            if data is not None:
                yield data.x
                yield data.y


# -- building and describing ------------------------------------------------------------------------


def create_model(module: nn.Module, loss: Loss, optimizer: Optimizer) -> Model:
    """Join the parts; the optimizer must update this very module."""
    if optimizer.module is not module:
        raise InvalidArgument("the optimizer was built over a different module; build it over this module")
    return Model(module, loss, optimizer)


def _split(split: str) -> tuple[Sequence[Opt], str]:
    if split == "train":
        return TRAIN_OPTIONS, "train"
    if split == "test":
        return TEST_OPTIONS, "test"
    raise InvalidArgument("say whether train or test options or data are meant")


def get_options(model: Model, split: str) -> dict[str, Value]:
    """All train or test options, in order; metrics is a comma-separated string."""
    _split(split)
    return dict(model.train if split == "train" else model.test)


def _metrics(value: str) -> str:
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise InvalidArgument(f"metrics: at least one of {', '.join(METRICS)} required")
    for name in names:
        if name not in METRICS:
            raise InvalidArgument(
                f"metrics: unrecognized metric '{name}'{did_you_mean(name, METRICS)} (one of {', '.join(METRICS)})"
            )
    if len(set(names)) != len(names):
        raise InvalidArgument(f"metrics: a metric is named twice in '{value}'")
    return ",".join(names)


def set_options(model: Model, split: str, values: Sequence[tuple[str, Value]]) -> dict[str, Value]:
    """Set train or test options, all or nothing; returns every option afterwards.

    Raises:
        InvalidArgument: unknown option, train-only option on test, wrong type or range, unknown metric.

    Example: set_options(m, "train", [("batchsize", 100), ("shuffle", True)]).
    """
    opts, name = _split(split)
    by_name = {o.name: o for o in opts}
    checked: dict[str, Value] = {}
    for key, value in values:
        if key in TRAIN_ONLY and split == "test":
            raise InvalidArgument(f"{key}: not set for evaluation (a train-only option); nothing set")
        if key not in by_name:
            raise InvalidArgument(
                f"unrecognized {name} setting: {key}{did_you_mean(key, by_name)} (settings: {', '.join(by_name)}); "
                "nothing set"
            )
        if key in checked:
            raise InvalidArgument(f"{name} setting {key} given twice; nothing set")
        value = coerce(name, by_name[key], value, Wording.SETTING)
        checked[key] = _metrics(str(value)) if key == "metrics" else value
    target = model.train if split == "train" else model.test
    target.update(checked)
    if "seed" in checked:
        model.generator.manual_seed(int_value(checked, "seed"))
    return dict(target)


def batch_count(n: int, w: int, droplast: bool) -> int:
    """Batches of w over n samples: the last one partial unless droplast; w larger than n means one batch."""
    if n <= 0:
        return 0
    w = min(w, n)
    return n // w if droplast else math.ceil(n / w)


def _plan(data: Data, options: Values) -> tuple[int, int, int]:
    """(n, effective batch size, number of batches) with the data at full size."""
    n = data.x.shape[0]
    w = min(int_value(options, "batchsize"), n)
    return n, w, batch_count(n, w, bool(options["droplast"]))


def batches(model: Model, split: str) -> int:
    """The number of batches of the train or test data with the current options; -1 without data."""
    data = model.train_data if split == "train" else model.test_data
    if data is None:
        return -1
    return _plan(data, model.train if split == "train" else model.test)[2]


def data_size(model: Model, split: str) -> int:
    """The number of train or test samples at full size; -1 without data."""
    data = model.train_data if split == "train" else model.test_data
    return -1 if data is None else batching.full_size(data.x)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A tensor that spans exactly its own storage, so it can be batched in place."""
    if t.storage_offset() != 0 or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.contiguous().clone()
    return t


# -- what data a model takes ---------------------------------------------------------------------

INDEX_LOSSES = frozenset({"ce", "nll"})
"""Losses whose targets are class indices (cross entropy also takes class probabilities)."""


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter, or None when it has none."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _first_layer(module: nn.Module) -> nn.Module | None:
    """The first module without children, the one the inputs go through first; None for none."""
    return next((m for m in module.modules() if not any(True for _ in m.children())), None)


def _takes_indices(module: nn.Module) -> bool:
    """True when the module's first layer is an embedding, which takes integer indices."""
    return isinstance(_first_layer(module), nn.Embedding)


def input_dtype(module: nn.Module, x: torch.Tensor, name: str = "x") -> torch.dtype:
    """The dtype inputs x are held in for this module, or InvalidArgument saying what to send.

    - An embedding first takes integer indices: any integer dtype, widened to int64.
    - Otherwise the dtype of the module's parameters (float32 usually): integers and bool are
      converted when every value converts exactly (uint8, int8 and int16 always do for float32),
      other floating dtypes are rounded to it (float64 images, say x = img / 255); complex is refused.
    - A module without floating parameters takes x as it is.
    """
    if _takes_indices(module):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise InvalidArgument(
                f"{name} (inputs) is {dtypes.name(x.dtype)}; the model's first layer is an embedding, which takes "
                "integer indices: send an integer dtype (it is widened to int64); nothing loaded"
            )
        return torch.int64
    expected = _parameter_dtype(module)
    if expected is None or x.dtype == expected:
        return x.dtype
    if x.is_complex():
        raise InvalidArgument(
            f"{name} (inputs) is {dtypes.name(x.dtype)}; the model's parameters are {dtypes.name(expected)}: send real "
            f"{dtypes.name(expected)} values (integers and other float widths are converted); nothing loaded"
        )
    if not x.is_floating_point() and not dtypes.holds_exactly(x, expected):
        raise InvalidArgument(
            f"{name} (inputs) is {dtypes.name(x.dtype)} with values that {dtypes.name(expected)} cannot hold exactly; "
            f"send {dtypes.name(expected)}; nothing loaded"
        )
    return expected


def target_dtype(model: Model, y: torch.Tensor, name: str = "y") -> torch.dtype:
    """The dtype targets y are held in, or InvalidArgument saying what to send for the model's loss.

    Integer (and bool) targets are held as int64, a lossless widening whatever the loss, so a loss
    replaced later still finds its labels; floating targets in the parameters' dtype, rounded.
    - ce and nll (classification) need class indices: integers; ce also takes class
      probabilities, a floating y with a column per class.
    - mse, smoothl1, bce, bcelogits take either; integers become the parameters' dtype a batch at a
      time (`batch_targets`).
    """
    return _target_dtype(model.module, model.loss.type, y, name)


def _target_dtype(module: nn.Module, loss: str, y: torch.Tensor, name: str) -> torch.dtype:
    """target_dtype for a module and a loss type (the parts a model would have after UpdateModel)."""
    expected = _parameter_dtype(module) or torch.float32
    if y.is_complex():
        raise InvalidArgument(
            f"{name} (targets) is {dtypes.name(y.dtype)}; the {loss} loss takes real targets: integer labels, or "
            f"{dtypes.name(expected)} values (other float widths are converted); nothing loaded"
        )
    if not y.is_floating_point():
        return torch.int64
    if loss in INDEX_LOSSES and not (loss == "ce" and y.dim() >= 2):
        also = " or class probabilities (floating, one column per class)" if loss == "ce" else ""
        raise InvalidArgument(
            f"{name} (targets) is {dtypes.name(y.dtype)} of shape {list(y.shape)}; the {loss} loss takes integer class "
            f"indices (any integer dtype, widened to int64){also}: send integer labels; nothing loaded"
        )
    return expected


ELEMENTWISE_LOSSES = frozenset({"mse", "smoothl1", "bce", "bcelogits"})
"""Losses that compare output and target element for element. torch broadcasts targets of another
shape for some of them with only a warning (mse, smoothl1), so `check_targets` requires the output's shape."""


def check_targets(model: Model, output: torch.Tensor, yb: torch.Tensor, what: str) -> None:
    """InvalidArgument, saying the shapes and the fix, when targets that must have the output's shape
    do not: an elementwise loss's (a target [N] with an output [N, 1] would train on [N, N]
    differences), and ce's class probabilities (torch refuses them with "0D or 1D target tensor
    expected, multi-target not supported", which names neither shape)."""
    loss = model.loss.type
    if loss in INDEX_LOSSES and not yb.is_floating_point():
        _check_index_shape(loss, output, yb, what)
        return
    probabilities = loss == "ce" and yb.is_floating_point()
    if (loss not in ELEMENTWISE_LOSSES and not probabilities) or yb.shape == output.shape:
        return
    fit = "[" + ", ".join(["N", *(str(d) for d in output.shape[1:])]) + "]" if output.dim() else "[]"
    if probabilities:
        raise InvalidArgument(
            f"{what}: targets of shape {list(yb.shape)} do not match the output's {list(output.shape)}: the ce "
            f"loss takes class probabilities shaped as the output (one column per class), or integer class "
            f"indices; send y of shape {fit}, or integer labels; nothing changed"
        )
    raise InvalidArgument(
        f"{what}: targets of shape {list(yb.shape)} do not match the output's {list(output.shape)}: the {loss} "
        f"loss compares them element for element (torch would broadcast them); reshape y to {fit}; "
        "nothing changed"
    )


def _check_index_shape(loss: str, output: torch.Tensor, yb: torch.Tensor, what: str) -> None:
    """InvalidArgument, saying the shape to send, unless class-index targets of ce or nll have the
    output's shape without its class dimension ([N] for [N, C], [N, L] for [N, C, L]). torch refuses
    others with "0D or 1D target tensor expected, multi-target not supported", which names neither
    shape nor the fix, for the commonest slip of all: labels sent as a column [N, 1] (found by review)."""
    if output.dim() < 2 or yb.shape == output.shape[:1] + output.shape[2:]:
        return  # an unbatched output: torch's own message
    fit = "[" + ", ".join(["N", *(str(d) for d in output.shape[2:])]) + "]"
    column = " (y.reshape(-1) for a column of labels)" if yb.dim() == 2 and yb.shape[1] == 1 and output.dim() == 2 else ""
    also = ", or class probabilities shaped as the output" if loss == "ce" else ""
    raise InvalidArgument(
        f"{what}: targets of shape {list(yb.shape)} do not match the output's {list(output.shape)}: the {loss} loss "
        f"takes one class index per sample{' and position' if output.dim() > 2 else ''}, shaped as the output "
        f"without its class dimension 1; send y of shape {fit}{column}{also}; nothing changed"
    )


def batch_targets(model: Model, yb: torch.Tensor) -> torch.Tensor:
    """A batch of targets as the loss takes them: integer targets of a regression loss (mse, bce, ...)
    in the parameters' dtype, everything else as held."""
    if model.loss.type in INDEX_LOSSES or yb.is_floating_point():
        return yb
    return yb.to(_parameter_dtype(model.module) or torch.float32)


def check_probabilities(model: Model, output: torch.Tensor, target: torch.Tensor, what: str) -> None:
    """InvalidArgument, saying the fix, unless the bce loss's inputs and targets all lie in [0, 1].

    torch refuses others on the CPU with an error, but on CUDA with a device-side assert, which ends
    the server process's use of the GPU (every model on it): a module without a final sigmoid, a
    diverged one (NaN), or a label 2 must never reach the kernel. Checked before each batch's loss,
    on every device alike (one reduction and one synchronisation per batch, bce only)."""
    if model.loss.type != "bce":
        return
    for name, t, fix in (
        ("output holds", output, "end the module with a sigmoid, or use the bcelogits loss on its raw output"),
        ("targets hold", target, "send labels 0 and 1, or probabilities"),
    ):
        with torch.no_grad():
            bad = ~((t >= 0) & (t <= 1))  # NaN too
            if bool(bad.any()):
                value = float(t[bad].reshape(-1)[0])
                raise InvalidArgument(
                    f"{what}: the bce loss takes probabilities in [0, 1], and the {name} {value}: {fix}; "
                    "nothing changed"
                )


def data_dtypes(model: Model, x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y")) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes set_data will hold x and y in (InvalidArgument when it would refuse them)."""
    return input_dtype(model.module, x, names[0]), target_dtype(model, y, names[1])


def set_data(
    model: Model, split: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
    names: tuple[str, str] = ("x", "y"),
) -> int:
    """Store inputs and targets for training or testing, all or nothing; returns the number of batches.

    Both are checked first and converted as `input_dtype` and `target_dtype` say (uint8 or float64
    images become float32, labels of any integer width int64), so a dtype the model cannot use is
    refused here, naming the argument, rather than at every later run.

    Raises:
        InvalidArgument: a 0-dim or empty tensor, first dimensions that differ, or a dtype the model
            cannot take.
    """
    _split(split)
    for what, t in (("inputs", x), ("targets", y)):
        if t.dim() == 0 or t.shape[0] == 0 or t.numel() == 0:
            raise InvalidArgument(f"{what} need at least one sample and a first dimension, given shape {list(t.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InvalidArgument(f"tensor size mismatch, {x.shape[0]} vs {y.shape[0]} (inputs vs targets)")
    x_dtype, y_dtype = data_dtypes(model, x, y, names)
    data = Data(_own(x.to(device, x_dtype)), _own(y.to(device, y_dtype)))
    if split == "train":
        model.train_data = data
    else:
        model.test_data = data
    return batches(model, split)


def _load_hint(split: str) -> str:
    """How to load a split's data: the client's verb and, for a client generated from the .proto, the RPC."""
    verb = "train(m, x, y)" if split == "train" else "test(m, x, y)"
    return f"{verb} (SetModelData, split DATA_SPLIT_{split.upper()})"


def _loaded(model: Model, split: str) -> Data:
    """The train or test data, standing where they are, or FailedPrecondition saying how to load them."""
    data = model.train_data if split == "train" else model.test_data
    if data is None:
        raise FailedPrecondition(f"no {split}ing data loaded for the model; load it with {_load_hint(split)}")
    return data


def require_data(model: Model, split: str) -> None:
    """FailedPrecondition, saying how to load them, unless the model holds data for the split (a
    cluster asks every rank before a replicated model's epoch starts on any)."""
    _loaded(model, split)


@contextlib.contextmanager
def _from_start(model: Model, split: str) -> Iterator[Data]:
    """The train or test data put back to full size for a pass over all of them (run, testrun,
    batchnorm(m)), or FailedPrecondition saying how to load them. A pass that fails, refused before
    it starts included, puts them back at the batch they stood at (`_batch_kept`): testrun and
    batchnorm(m) refused an out-of-range embedding index after `testbatch`/`batch` had stepped the
    data, said nothing changed, and left the data at full size (found by review)."""
    data = _loaded(model, split)
    with _batch_kept(data):
        batching.restore(data.x)
        batching.restore(data.y)
        yield data


# -- helpers for forward passes -------------------------------------------------------------------


def writes_inputs(module: nn.Module) -> bool:
    """True when a layer of the module writes its input in place (`inplace=True`: relu, leakyrelu,
    drop). Such a module is given a copy of each batch (`_batch`), since a batch of held data is a
    view of them and, on the module's device, `.to` returns that same memory."""
    return any(getattr(m, "inplace", False) is True for m in module.modules())


def _batch(t: torch.Tensor, device: torch.device, fresh: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on the device (in `dtype`, if given): a copy when `fresh`, else t itself where it already is."""
    return t.to(device, dtype or t.dtype, copy=fresh)


def _device(module: nn.Module) -> torch.device:
    """Where the module's first parameter or buffer lives, so batches are moved next to it."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _flags(module: nn.Module, training: bool) -> Iterator[None]:
    """Set every submodule's train flag, and put each one's own flag back afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def out_of_memory(exc: BaseException) -> bool:
    """True for an allocator running out of memory: CUDA's OutOfMemoryError, Python's MemoryError,
    and torch's CPU allocator, which reports it as a plain RuntimeError ("can't allocate memory")."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


@contextlib.contextmanager
def _torch_errors(what: str, hint: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Errors torch raises for inputs that do not fit the module become InvalidArgument (with
    `hint()`, the fix where the caller can tell it); running out of memory (for activations, which
    the byte cap does not count) becomes ResourceExhausted, as the transport answers it elsewhere,
    rather than a complaint about the inputs."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError, TypeError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if out_of_memory(exc):
            raise ResourceExhausted(
                f"{what}: out of memory ({first}); fewer samples per batch or per call need less"
            ) from None
        raise InvalidArgument(f"{what}: {first}{hint()}") from None


def _input_dtype_hint(module: nn.Module, x: torch.Tensor) -> Callable[[], str]:
    """The fix for a forward input whose dtype is not the module's: forward, as the reference's,
    converts no inputs (torch's own message names neither the input nor what to send)."""
    def hint() -> str:
        held = _parameter_dtype(module)
        if held is None or x.dtype == held or _takes_indices(module):
            return ""
        return (
            f" (x is {dtypes.name(x.dtype)} and the module's parameters are {dtypes.name(held)}: send x as "
            f"{dtypes.name(held)}; forward converts no inputs, evaluate and the model's data do)"
        )

    return hint


def renormalised(module: nn.Module) -> list[torch.Tensor]:
    """The weight of each embedding with max_norm, which renormalises the rows it reads in place, in
    eval mode and without gradients too: a pass that fails puts it back from a copy (reserved by the
    caller: footprint.renorm_copy_bytes)."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding) and m.max_norm is not None]


def writes_in_eval_mode(module: nn.Module) -> bool:
    """Whether a forward pass in eval mode, without gradients, writes the module: only an embedding with
    max_norm does (`renormalised`); batchnorm statistics change in train mode alone."""
    return bool(renormalised(module))


def written_by_forward(module: nn.Module) -> list[torch.Tensor]:
    """What a forward pass may write in place, gradients or not: every buffer (batchnorm statistics,
    in train mode) and the weights `renormalised` names. Each pass keeps a copy of them to put back
    (`_buffers_kept`; reserved by the caller: footprint.forward_copy_bytes)."""
    return [*module.buffers(), *renormalised(module)]


@contextlib.contextmanager
def _buffers_kept(module: nn.Module, always: bool = False) -> Iterator[None]:
    """Copy what a forward pass may write in place (`written_by_forward`: batchnorm statistics, the
    rows a max_norm embedding renormalises) back to its value at entry: on error, or always."""
    saved = [(b, b.detach().clone()) for b in written_by_forward(module)]
    try:
        yield
    except BaseException:
        _put_back(saved)
        raise
    if always:
        _put_back(saved)


def _put_back(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, value in saved:
            b.copy_(value)


def _stopped(what: str, done: int, total: int) -> Cancelled:
    return Cancelled(f"{what} stopped after {done} of {total} batches: the caller cancelled or its deadline passed")


# -- metrics --------------------------------------------------------------------------------------


def class_dim(loss: str, output: torch.Tensor) -> int | None:
    """The output's class dimension, as the loss reads it: for ce and nll dimension 1 ([N, C],
    [N, C, d1, ...]), or 0 for an unbatched [C]; for the other losses the last of two or more
    dimensions (one-hot regression targets). None where there is none: a 0-d output, or a 1-D
    output of a regression loss, one value per sample."""
    if output.dim() == 0:
        return None
    if loss in INDEX_LOSSES:
        return 1 if output.dim() >= 2 else 0
    return output.dim() - 1 if output.dim() >= 2 else None


def predictions(loss: str, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, truth) of the same shape: the argmax over the class dimension (`class_dim`) and
    the targets as class indices (a target with the output's dimensions, class probabilities or one-hot,
    by its argmax too). Without a class dimension each value is its own only class, predicted 0.

    Raises:
        InvalidArgument: targets that do not compare with the predictions element for element.
    """
    dim = class_dim(loss, output)
    predicted = (
        torch.zeros(output.shape, dtype=torch.int64, device=output.device) if dim is None else output.argmax(dim)
    )
    if target.dim() == output.dim() and target.dim() > 0:
        if dim is not None and target.shape[dim] == 1 < output.shape[dim]:
            # Read by their argmax, one-hot rows or class probabilities of any width name classes,
            # but a single column names none: labels sent as a column [N, 1] were all read as class
            # 0, a plausible, wrong accuracy (80% for a 3-class model; testrun asks for no loss to
            # refuse them; found by review).
            indices = "[" + ", ".join(["N", *(str(d) for d in predicted.shape[1:])]) + "]"
            raise InvalidArgument(
                f"accuracy: targets of shape {list(target.shape)} hold one column where the output "
                f"{list(output.shape)} has {output.shape[dim]} classes: targets with as many dimensions as the "
                f"output are one-hot rows or class probabilities, read by their argmax, so a column of labels "
                f"reads as class 0 throughout; send class indices of shape {indices}, or one column per class; "
                "nothing changed"
            )
        truth = torch.zeros_like(target, dtype=torch.int64) if dim is None else target.argmax(dim)
    else:
        truth = target
    if truth.shape != predicted.shape:
        raise InvalidArgument(
            f"accuracy: predictions of shape {list(predicted.shape)} (the output {list(output.shape)} by its "
            f"class dimension) do not compare with targets of shape {list(target.shape)}"
        )
    return predicted, truth


def scored(loss: str, output: torch.Tensor, target: torch.Tensor, ignore: int | None) -> torch.Tensor | None:
    """The positions accuracy scores, as a bool mask of the predictions' shape, or None for all of them:
    of class-index targets of ce and nll, those other than the loss's ignore index, which torch's loss
    leaves out (an unlabelled or padding position); torchmetrics' `ignore_index` leaves them out of
    accuracy the same way. Counted as misses, 10 ignored of 40 samples read 75% for a perfect model
    (found by review). Class probabilities and one-hot rows (read by their argmax) have no ignore index."""
    if ignore is None or not masks_scored(loss, output.dim(), target.dim(), target.is_floating_point()):
        return None
    return target != ignore


def masks_scored(loss: str, output_dim: int, target_dim: int, floating: bool) -> bool:
    """Whether `scored` gives a mask for a loss's output and targets of these dimensions (its targets
    floating or not), given the loss's ignore index: only class indices of ce and nll, which lack the
    output's class dimension. An accuracy so masked keeps a count per batch beside its matches."""
    return loss in INDEX_LOSSES and not floating and not (target_dim == output_dim and target_dim > 0)


def _own_scalar(loss: torch.Tensor) -> torch.Tensor:
    """A batch's loss as the metrics keep it until the epoch or test ends: detached, in a storage of
    its own (a copy on its device, no synchronisation). torch's CPU mse and smoothl1 losses return
    their mean as a view into the unreduced loss, a buffer the size of the output: kept as it was,
    every batch's loss held an output's bytes until the end, unreserved, 400 MB for an epoch of
    2,000 batches of 200 KB outputs (found by review)."""
    kept = loss.detach()
    return kept.clone() if kept.untyped_storage().nbytes() > kept.numel() * kept.element_size() else kept


class _Metrics:
    """Per-batch results gathered on the device, turned into named tensors once at the end.

    `ignore` is the loss's ignore index (ce, nll): targets equal to it count in neither the matches
    nor the total of accuracy (`scored`). With no position scored at all, accuracy is NaN, as the
    loss's mean over them is: no prediction was compared."""

    def __init__(self, names: Sequence[str], loss: str, ignore: int | None = None) -> None:
        self.names = list(names)
        self.loss = loss
        self.ignore = ignore
        self.needs_loss = bool({"loss", "batchloss"} & set(names))
        self.needs_predict = bool({"accuracy", "matches", "predict"} & set(names))
        self.losses: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.matches: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.count = 0
        self.counts: list[torch.Tensor] = []  # positions scored where some are ignored, summed once at the end

    def add(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self.losses.append(_own_scalar(loss))
        if self.needs_predict:
            predicted, truth = predictions(self.loss, output, target)
            if "predict" in self.names:  # kept only to be returned; accuracy and matches keep counts
                self.predicted.append(predicted.reshape(-1) if predicted.dim() == 0 else predicted)
            hits = predicted == truth
            mask = scored(self.loss, output, target, self.ignore)
            if mask is None:
                self.matches.append(hits.sum())
                self.count += predicted.numel()  # the elements compared: a prediction per sample and position
            else:
                self.matches.append((hits & mask).sum())
                self.counts.append(mask.sum())  # kept on the device: no synchronisation per batch
        if "output" in self.names:
            self.outputs.append(output.detach().reshape(-1) if output.dim() == 0 else output.detach())

    def result(self) -> list[tuple[str, torch.Tensor]]:
        out: list[tuple[str, torch.Tensor]] = []
        losses = torch.stack(self.losses).cpu() if self.losses else torch.empty(0)
        matches = int(torch.stack(self.matches).sum()) if self.matches else 0
        count = self.count + (int(torch.stack(self.counts).sum()) if self.counts else 0)
        for name in self.names:
            if name == "loss":
                out.append((name, losses.double().mean()))
            elif name == "batchloss":
                out.append((name, losses))
            elif name == "accuracy":
                out.append((name, torch.tensor(100.0 * matches / count if count else math.nan, dtype=torch.float64)))
            elif name == "matches":
                out.append((name, torch.tensor(matches, dtype=torch.int64)))
            elif name == "predict":
                out.append((name, _joined(self.predicted).cpu()))
            else:
                out.append((name, _joined(self.outputs).cpu()))
        return out


def _joined(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-batch results as one tensor: a single piece as it is (torch.cat would copy it), several
    concatenated. footprint.metrics_bytes and evaluate_bytes reserve what this keeps."""
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))


def _metric_names(options: dict[str, Value]) -> list[str]:
    return str(options["metrics"]).split(",")


def _gathered(model: Model, options: dict[str, Value]) -> _Metrics:
    """The metrics a run or testrun with these options gathers, with the loss's ignore index (ce, nll)."""
    ignore = int_value(model.loss.options, "ignore") if model.loss.type in INDEX_LOSSES else None
    return _Metrics(_metric_names(options), model.loss.type, ignore)


# -- training and testing -------------------------------------------------------------------------


def _probe(
    model: Model, xb: torch.Tensor, yb: torch.Tensor, fresh: bool, check: Callable[[torch.Size], None]
) -> None:
    """Run the forward pass and loss on one batch without changing anything, to turn inputs that do
    not fit (shapes, dtypes, a batch of one through batchnorm, targets the asked-for accuracy cannot
    compare with) into InvalidArgument before training. `check` gets the output's shape, which says
    how many classes the module predicts, before the loss sees any target: an out-of-range class
    index gets the message that names its sample rather than torch's (and, on CUDA, never reaches
    the loss kernel's device-side assert); bce's outputs and targets are checked to lie in [0, 1]
    first (`check_probabilities`). The caller has checked the batch's embedding inputs
    (`_check_inputs`). `fresh`: the module writes its input in place, so it is given a copy of xb."""
    dev = xb.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        with _buffers_kept(model.module, always=True), _flags(model.module, True), _torch_errors("run"):
            output: torch.Tensor = model.module(_batch(xb, dev, fresh))
            check_targets(model, output, yb, "run")
            check(output.shape)
            targets = batch_targets(model, yb)
            check_probabilities(model, output, targets, "run")
            model.loss(output, targets)
        if _gathered(model, model.train).needs_predict:
            predictions(model.loss.type, output, yb)


def _out_of_range(t: torch.Tensor, low: int, high: int, allowed: int | None, w: int) -> tuple[int, int] | None:
    """The first row of t holding a value outside [low, high) other than `allowed`, with that value;
    None when there is none. One min and max settle the usual case; otherwise t is scanned w rows at
    a time, so no mask of the whole of t is made."""
    if t.numel() == 0:
        return None
    smallest, largest = torch.aminmax(t)
    if int(smallest) >= low and int(largest) < high:
        return None
    for start in range(0, t.shape[0], w):
        chunk = t[start:start + w]
        bad = (chunk < low) | (chunk >= high)
        if allowed is not None:
            bad &= chunk != allowed
        rows = bad.reshape(bad.shape[0], -1).any(1).nonzero()
        if rows.numel():
            row = int(rows[0])
            return start + row, int(chunk[row][bad[row]].reshape(-1)[0])
    return None


def _sample(perm: torch.Tensor | None, row: int) -> int:
    """The place in the data as loaded of the sample at `row` of the epoch's order."""
    return int(perm[row]) if perm is not None else row


def _check_inputs(model: Model, order: Data, perm: torch.Tensor | None, rows: int, w: int) -> None:
    """Refuse inputs to a first embedding layer beyond its rows, which torch would find only at their
    batch, after the batches before it had trained (and on CUDA with a device-side assert that ends
    the process's use of the GPU). Called before any forward pass, the probe's included. `order`
    holds the data in the order the epoch trains them (`perm` made it from the data as loaded, if
    shuffled); its first `rows` are trained, the rest droplast leaves out. A sample is named by its
    place in the data as loaded.

    Raises:
        InvalidArgument: the first out-of-range index, its value and sample.
    """
    check_embedding_inputs(model.module, order.x[:rows], w, "run", lambda row: _sample(perm, row))


def _check_labels(
    model: Model, order: Data, perm: torch.Tensor | None, output: torch.Size, rows: int, w: int
) -> None:
    """Refuse class-index targets of ce and nll beyond the output's classes other than the loss's
    ignore index, for the same reasons and with the same arguments as `_check_inputs`; `output` is
    the module's output shape, which gives the number of classes. Called before the loss sees any
    target, the probe's included.

    Raises:
        InvalidArgument: the first out-of-range index, its value and sample.
    """
    check_classes(model, output, order.y[:rows], w, "run", lambda row: _sample(perm, row))


def _as_loaded(row: int) -> int:
    return row


def check_embedding_inputs(
    module: nn.Module, x: torch.Tensor, w: int, what: str, sample: Callable[[int], int] = _as_loaded
) -> None:
    """InvalidArgument unless every integer input x holds for a module whose first layer is an
    embedding names one of its rows. torch finds one out of range only inside the lookup, on CUDA
    with a device-side assert that ends the process's use of the GPU, so every pass over such a
    module (run, testrun, evaluate, forward, batchnorm) checks its inputs first. `sample` turns a row
    of x into the sample named in the message; x is scanned w rows at a time."""
    first = _first_layer(module)
    if not isinstance(first, nn.Embedding) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        return
    found = _out_of_range(x.reshape(1) if x.dim() == 0 else x, 0, first.num_embeddings, None, max(w, 1))
    if found is not None:
        row, value = found
        raise InvalidArgument(
            f"{what}: input {value} of sample {sample(row)} is out of range for the embedding's "
            f"{first.num_embeddings} rows (0-{first.num_embeddings - 1}); nothing changed"
        )


def check_classes(
    model: Model, output: torch.Size, y: torch.Tensor, w: int, what: str, sample: Callable[[int], int] = _as_loaded
) -> None:
    """InvalidArgument unless every class-index target in y of a ce or nll loss names one of the
    output's classes (an output of shape `output`) or is the loss's ignore index: torch checks them
    inside the loss, on CUDA with a device-side assert. Named and scanned as check_embedding_inputs."""
    if model.loss.type not in INDEX_LOSSES or y.is_floating_point():
        return
    classes = output[1] if len(output) >= 2 else output[0]
    ignore = int_value(model.loss.options, "ignore")
    found = _out_of_range(y, 0, classes, ignore, max(w, 1))
    if found is not None:
        row, value = found
        raise InvalidArgument(
            f"{what}: target {value} of sample {sample(row)} is out of bounds: the output has {classes} classes "
            f"(0-{classes - 1}) and the loss ignores {ignore}; nothing changed"
        )


@contextlib.contextmanager
def _batch_kept(data: Data) -> Iterator[None]:
    """Put the data back at the batch they stood at (`next_model_batch`) if the block fails. A
    cancelled block leaves them at full size, where it put them to start."""
    saved = [(t, batching.position(t), t.shape[0]) for t in (data.x, data.y)]
    try:
        yield
    except Cancelled:
        raise
    except BaseException:
        for t, start, rows in saved:
            batching.seek(t, start, rows)
        raise


def _epoch_order(model: Model, data: Data, n: int) -> tuple[Data, torch.Tensor | None]:
    """The data in the order the epoch trains them, and the permutation that made them. With
    `shuffle`: a reordered copy, by a permutation drawn from the model's generator, written over the
    data only once the epoch has trained (`_reorder`), so a failed epoch leaves them as they were.
    Without: the data themselves."""
    if not model.train["shuffle"]:
        return data, None
    perm = torch.randperm(n, generator=model.generator).to(data.x.device)
    return Data(data.x.index_select(0, perm), data.y.index_select(0, perm)), perm


def _reorder(data: Data, order: Data) -> None:
    """Write the order the epoch trained in over the data (in place: `input(m)` handles see it)."""
    if order is not data:
        with torch.no_grad():
            data.x.copy_(order.x)
            data.y.copy_(order.y)


def _train_batches(
    model: Model, order: Data, w: int, nb: int, dev: torch.device, should_stop: StopCheck
) -> _Metrics:
    """Per batch of w rows of `order`: zero_grad(set_to_none), forward in train mode, loss,
    backward, optimizer step. Cancelled when should_stop turns true before a batch."""
    metrics = _gathered(model, model.train)
    optim = model.optimizer.optim
    fresh = writes_inputs(model.module)
    with _flags(model.module, True):
        for i in range(nb):
            if should_stop():
                raise _stopped("run", i, nb)
            yb = order.y[i * w:(i + 1) * w].to(dev)
            optim.zero_grad(set_to_none=True)
            with _torch_errors(f"run (batch {i + 1} of {nb})"):
                output = model.module(_batch(order.x[i * w:(i + 1) * w], dev, fresh))
                targets = batch_targets(model, yb)
                check_probabilities(model, output, targets, f"run (batch {i + 1} of {nb})")
                loss = model.loss(output, targets)
                torch.autograd.backward(loss)  # loss.backward(), through torch's typed entry point
                _step(model.optimizer, f"run (batch {i + 1} of {nb})")
            # Its loss is kept only for the loss metrics: every batch's was, a scalar a batch, unreserved.
            metrics.add(output.detach(), yb, loss if metrics.needs_loss else None)
    return metrics


def _step(optimizer: Optimizer, what: str) -> None:
    """optim.step(), naming the fix when a setting overflows the parameters' dtype: torch multiplies
    by lr and decay in that dtype and says only "value cannot be converted to type float without
    overflow" for an lr of 1e300 (or 1e5 once the module is float16), found by review."""
    try:
        optimizer.optim.step()
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        held = _parameter_dtype(optimizer.module)
        dtype = dtypes.name(held) if held is not None else "parameters'"
        settings = f"lr {get_lr(optimizer):g} and decay {float_value(optimizer.options, 'decay'):g}"
        raise InvalidArgument(
            f"{what}: the {optimizer.type} optimizer's {settings} overflow {dtype} in its step: give a "
            "smaller learning rate (lr(m, value); SetLearningRate) or build the optimizer with a smaller decay; "
            "nothing changed"
        ) from None


def run_epoch(model: Model, should_stop: StopCheck = never_stop) -> list[tuple[str, torch.Tensor]]:
    """Train one epoch over the training data and return the train metrics, by name.

    The data are reshuffled when `shuffle` is on, with a permutation drawn from the model's generator
    (seeded by the `seed` option), so runs are reproducible: the epoch trains on a reordered copy,
    written over the data in place when it ends. Then, per batch: zero_grad(set_to_none), forward in
    train mode, loss, backward, optimizer step. The train flags are restored at the end.

    All or nothing: before any batch trains, the last batch runs through the module and loss, and
    every index the epoch will look up is checked (`_check_inputs`, `_check_labels`). An epoch that still fails midway
    (any error torch raises, out of memory included) puts back the parameters, gradients, buffers,
    optimizer state, generator and data, order and batch position, as they were (`rollback.kept`):
    their copies, and the reordered data, are reserved by the caller (footprint.epoch_bytes). When
    `should_stop` turns true the epoch stops before the next batch instead: the batches done stay
    trained, the data stay in the order they were trained in, and Cancelled is raised.

    Raises:
        FailedPrecondition: no training data.
        InvalidArgument: the data do not fit the module or the loss, an index is out of range, or
            torch refused a batch.
        Cancelled: should_stop turned true.
    """
    with _from_start(model, "train") as data:
        n, w, nb = _plan(data, model.train)
        dev = _device(model.module)
        last = (nb - 1) * w
        fresh = writes_inputs(model.module)
        with rollback.kept(model.module, model.optimizer.optim, model.generator):
            # The probe inside: a forward can change weights too (an embedding with max_norm
            # renormalises the rows it reads in place, gradients or not; found by review).
            order, perm = _epoch_order(model, data, n)
            rows = min(nb * w, n)
            _check_inputs(model, order, perm, rows, w)
            # The epoch's own last batch, so the probe reads only rows the checks cover (with shuffle
            # and droplast, the data's last rows as loaded may be rows the epoch leaves out).
            _probe(model, order.x[last:last + w].to(dev), order.y[last:last + w].to(dev), fresh,
                   lambda output: _check_labels(model, order, perm, output, rows, w))
            try:
                metrics = _train_batches(model, order, w, nb, dev, should_stop)
            except Cancelled:
                _reorder(data, order)  # the batches done stay trained, in the order they were trained in
                raise
            result = metrics.result()
            _reorder(data, order)
            return result


def test_epoch(model: Model, should_stop: StopCheck = never_stop) -> list[tuple[str, torch.Tensor]]:
    """Evaluate over the test data in eval mode without gradients and return the test metrics.

    The loss is computed only when loss or batchloss is asked for. It covers the data from the
    start; on success or when stopped they are left at full size. Nothing changes on failure: the
    data stay at the batch they stood at (`_from_start`).
    """
    with _from_start(model, "test") as data:
        n, w, nb = _plan(data, model.test)
        dev = _device(model.module)
        metrics = _gathered(model, model.test)
        fresh = writes_inputs(model.module)
        check_embedding_inputs(model.module, data.x[:min(nb * w, n)], w, "testrun")
        with _buffers_kept(model.module), _flags(model.module, False), torch.no_grad():
            for i in range(nb):
                if should_stop():
                    raise _stopped("testrun", i, nb)
                yb = data.y[i * w:(i + 1) * w].to(dev)
                with _torch_errors(f"testrun (batch {i + 1} of {nb})"):
                    output = model.module(_batch(data.x[i * w:(i + 1) * w], dev, fresh))
                loss = None
                if metrics.needs_loss:
                    check_targets(model, output, yb, "testrun")
                    check_classes(model, output.shape, yb, w, "testrun", lambda row: i * w + row)
                    targets = batch_targets(model, yb)
                    check_probabilities(model, output, targets, f"testrun (batch {i + 1} of {nb})")
                    with _torch_errors(f"testrun (batch {i + 1} of {nb})"):
                        loss = model.loss(output, targets)
                metrics.add(output, yb, loss)
                # Dropped before the next batch's pass, which would otherwise run beside this one's output
                # (`footprint.testing_pass_bytes` reserves one batch's).
                del output, loss
        return metrics.result()


def evaluate_plan(model: Model, x: torch.Tensor) -> tuple[int, int, int]:
    """(n, batch size, number of batches) evaluate(model, x) runs: test-batchsize pieces, the last partial."""
    if x.dim() == 0 or x.shape[0] == 0:
        raise InvalidArgument(f"evaluate needs at least one sample, given shape {list(x.shape)}")
    n = x.shape[0]
    w = min(int_value(model.test, "batchsize"), n)
    return n, w, math.ceil(n / w)


def evaluate(model: Model, x: torch.Tensor, should_stop: StopCheck = never_stop) -> torch.Tensor:
    """The module's outputs for x in eval mode without gradients, computed in test-batchsize pieces
    (their memory is reserved by the caller: footprint.evaluate_bytes)."""
    _, w, nb = evaluate_plan(model, x)
    dev = _device(model.module)
    dtype = input_dtype(model.module, x)  # converted a batch at a time, as set_data converts
    check_embedding_inputs(model.module, x, w, "evaluate")
    fresh = writes_inputs(model.module)
    outputs = []
    with _buffers_kept(model.module), _flags(model.module, False), torch.no_grad():
        for i in range(nb):
            if should_stop():
                raise _stopped("evaluate", i, nb)
            with _torch_errors("evaluate"):
                outputs.append(model.module(_batch(x[i * w:(i + 1) * w], dev, fresh, dtype)))
    return _joined(outputs)


FORWARD_MODES = {"forward": (True, True), "nforward": (True, False), "eforward": (False, False)}
"""Mode -> (train flag, gradients), as the reference's forward, nforward and eforward."""


def forward_flags(mode: str) -> tuple[bool, bool]:
    """(train flag, gradients) of a forward mode, for the pass and for the sizing of its output.

    Raises:
        InvalidArgument: not a mode of FORWARD_MODES.
    """
    if mode not in FORWARD_MODES:
        raise InvalidArgument(f"unknown forward mode '{mode}' (one of {', '.join(FORWARD_MODES)})")
    return FORWARD_MODES[mode]


def forward(module: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Run the module on x with the mode's train flag and gradient setting; return the output detached.

    Each submodule's train flag is restored afterwards. In train mode batchnorm layers update their
    running statistics; if the call fails, those are put back. A module that writes its input in
    place runs on a copy of x (reserved by the caller, footprint.forward_bytes), so x stays as it was.

    The output owns its storage: a module that only reshapes (identity, flatten, reshape, dropout in
    eval mode) returns a view of x, and the output becomes a handle of its own, under its own lock.
    Sharing x's storage, it changed when x did (a shuffled epoch reorders a model's inputs in
    place), and was read under one lock while written under another (found by review). The copy is
    the output's size, which footprint.forward_bytes reserves.
    """
    training, grad = forward_flags(mode)
    check_embedding_inputs(module, x, x.shape[0] if x.dim() else 1, mode)
    with _buffers_kept(module), _flags(module, training), torch.set_grad_enabled(grad):
        with _torch_errors(mode, _input_dtype_hint(module, x)):
            output: torch.Tensor = module(_batch(x, _device(module), writes_inputs(module)))
    output = output.detach()
    return output.clone() if _same_storage(output, x) else output


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of one allocation."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def default_input(model: Model, mode: str) -> torch.Tensor:
    """A model's own inputs for a forward call without one: test inputs for eforward, else train."""
    split = "test" if mode == "eforward" else "train"
    data = model.test_data if split == "test" else model.train_data
    if data is None:
        raise FailedPrecondition(
            f"no input given and the model has no {split}ing data: give an input (a tensor handle or a streamed "
            f"tensor), or load the data with {_load_hint(split)}"
        )
    return data.x


# -- data access ----------------------------------------------------------------------------------


def input_tensor(model: Model) -> torch.Tensor:
    """The model's training input tensor itself (same object: batching one batches the other)."""
    if model.train_data is None:
        raise FailedPrecondition(f"no training data loaded for the model; load it with {_load_hint('train')}")
    return model.train_data.x


def restore_data(model: Model, split: str = "train") -> int:
    """Put the training (or test) data back to full size; the number of samples, -1 without data."""
    _split(split)
    data = model.train_data if split == "train" else model.test_data
    if data is None:
        return -1
    batching.restore(data.y)
    return batching.restore(data.x)


def next_model_batch(model: Model, split: str = "train") -> bool:
    """Step the model's training (or, for testbatch, test) inputs and targets together to their next
    batch of the split's `batchsize`."""
    _split(split)
    data = model.train_data if split == "train" else model.test_data
    if data is None:
        raise FailedPrecondition(f"no {split}ing data loaded for the model; load it with {_load_hint(split)}")
    w = int_value(model.train if split == "train" else model.test, "batchsize")
    batching.check_size(data.x, w)
    batching.check_size(data.y, w)
    more = batching.next_batch(data.x, w)
    batching.next_batch(data.y, w)
    return more


def replace_parts(
    model: Model, module: nn.Module | None = None, loss: Loss | None = None, optimizer: Optimizer | None = None
) -> None:
    """Replace parts of a model, as the reference's model(m, obj...): all or nothing, options and
    data kept. The optimizer must update the model's module, the new one if given.

    Raises:
        InvalidArgument: no part given, a new module without a new optimizer, an optimizer over
            another module, or new parts that would not take the loaded data in the dtypes they are
            held in (`_check_held`).

    Example: replace_parts(m, optimizer=create_optimizer("adam", m.module)) switches SGD to Adam.
    """
    check_parts(model, module, loss, optimizer)
    if module is not None:
        model.module = module
    if loss is not None:
        model.loss = loss
    if optimizer is not None:
        model.optimizer = optimizer


def check_parts(
    model: Model, module: nn.Module | None = None, loss: Loss | None = None, optimizer: Optimizer | None = None
) -> None:
    """What replace_parts checks before it changes anything (the same Raises)."""
    if module is None and loss is None and optimizer is None:
        raise InvalidArgument("name at least one part to replace: a module, a loss or an optimizer")
    target = module if module is not None else model.module
    if module is not None and optimizer is None:
        raise InvalidArgument(
            "the model's optimizer updates its current module: give an optimizer built over the new module too"
        )
    if optimizer is not None and optimizer.module is not target:
        which = "the new module" if module is not None else "this model's module"
        raise InvalidArgument(f"the optimizer was built over a different module; build it over {which}")
    if module is not None or loss is not None:
        for split, data in (("train", model.train_data), ("test", model.test_data)):
            if data is not None:
                _check_held(target, (loss or model.loss).type, data, split)


def _check_held(module: nn.Module, loss: str, data: Data, split: str) -> None:
    """InvalidArgument unless data held for the model are already in the dtypes set_data would hold
    them in for these parts: the dtypes are checked at upload, never first at run, so parts that
    would take them otherwise (an embedding first, float64 parameters, a loss that wants integer
    labels) are refused rather than leaving data the next run cannot use."""
    for what, held in (("inputs", data.x), ("targets", data.y)):
        try:
            wanted = input_dtype(module, held) if what == "inputs" else _target_dtype(module, loss, held, "y")
        except InvalidArgument as refused:
            why = str(refused).removesuffix("; nothing loaded")
        else:
            if wanted == held.dtype:
                continue
            why = f"the new parts take {dtypes.name(wanted)}"
        convert = (
            f'convert the new module to {dtypes.name(held.dtype)} (to(q, dtype="{dtypes.name(held.dtype)}")), or '
            if what == "inputs" and held.is_floating_point() and not _takes_indices(module) else ""
        )
        raise InvalidArgument(
            f"the model holds {split}ing {what} in {dtypes.name(held.dtype)}, which the new parts do not take as they "
            f"are ({why}); nothing changed: {convert}build a new model from these parts and send the data to it "
            "again (their dtypes are checked and converted at upload)"
        )


# -- batchnorm recalculation ----------------------------------------------------------------------


def recalculate_batchnorm(model: Model, should_stop: StopCheck = never_stop) -> Momenta:
    """Reset every batchnorm layer and recompute its running statistics over the training data.

    As `torch.optim.swa_utils.update_bn`: momentum None (a cumulative mean over batches), running
    statistics reset, the module in train mode without gradients, a forward pass over every training
    batch (train batchsize and droplast, in the data's current order), then each momentum and train
    flag put back. Returns {layer path: momentum}.

    Unlike the reference, nothing is reset without training data, and a forward pass that fails or
    is stopped midway puts back the statistics, momenta and train flags before the error, and one
    that fails (not one stopped) the data's batch position (`_from_start`).

    Raises:
        FailedPrecondition: no training data.
        InvalidArgument: a forward pass failed on the data.
        Cancelled: should_stop turned true.

    Example: for the reference's network with batchnorm child 'b' this returns {'b': 0.1} and leaves
    b.num_batches_tracked equal to the number of batches.
    """
    with _from_start(model, "train") as data:
        n, w, nb = _plan(data, model.train)
        module = model.module
        dev = _device(module)
        check_embedding_inputs(module, data.x[:min(nb * w, n)], w, "batchnorm")
        saved = [(t, t.detach().clone()) for t in written_by_forward(module)]  # before the reset
        fresh = writes_inputs(module)
        momenta = reset_batchnorm(module)
        try:
            with _flags(module, True), torch.no_grad():
                for i in range(nb):
                    if should_stop():
                        raise _stopped("batchnorm", i, nb)
                    with _torch_errors(f"batchnorm (batch {i + 1} of {nb})"):
                        module(_batch(data.x[i * w:(i + 1) * w], dev, fresh))
        except BaseException:
            _put_back(saved)
            raise
        finally:
            restore_momentum(module, momenta)
        return momenta
