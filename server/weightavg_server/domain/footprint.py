"""What an operation is about to allocate, worked out before it allocates anything.

The store reserves these bytes against the caps first, so a call over a cap is refused with
nothing allocated and nothing changed. Where the size depends on what torch will do (a module's
parameters, a forward pass's output, an optimizer's state), the same torch code runs on the meta
device, which computes shapes and dtypes without memory; the answer is exact, not a guess.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import averaging, batching, merging, optimizers, outer, rollback, soups, specs, training
from .dictionaries import COUNT_KEY, TensorDict
from .errors import ResourceExhausted
from .options import Value, Values, bool_value, int_value
from .tensors import Bytes, add_bytes, device_name, module_tensors, tensor_bytes
from .training import Model


def module_bytes(spec: specs.LayerSpec, device: torch.device, max_depth: int) -> Bytes:
    """Bytes of the parameters and buffers of the module `spec` builds, once moved to `device`; on
    a device other than the CPU, also on the CPU: the module is built and initialised there first,
    then moved (`Service._built`), so the host holds all of it until the move ends (it was not
    reserved; found by review). And, on the CPU while it is built, its largest parameter once more:
    each layer makes a parameter in a storage of its own before `flat.building` copies it into the
    module's buffer, so one parameter's own storage lives beside the buffers (not reserved: a
    [1000, 1000] linear layer's creation allocated 4 MB more than it reserved; found by review). Counted
    beside all the buffers, it is over by the buffers made after that parameter (520 bytes for a
    64-wide batchnorm after the largest linear), at most the buffers' bytes."""
    with torch.device("meta"):
        module = specs.build_module(spec, max_depth=max_depth)
    tensors = list(module_tensors(module))
    host = tensor_bytes(tensors, "cpu") if torch.device(device).type != "cpu" else {}
    largest = max((p.numel() * p.element_size() for p in module.parameters()), default=0)
    return add_bytes(tensor_bytes(tensors, device), host, {"cpu": largest} if largest else {})


def _meta_output(module: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor | None:
    """`module(x)` run on meta copies of its parameters and buffers (and of x), with every layer's
    train flag `train` (the flag of the real pass it sizes): the output's shape and dtype
    without memory, or None when the pass fails on meta or gives no tensor.

    The flag is the real pass's, not the module's own (which is on between calls): a batch of one
    through batchnorm fails in train mode only, so an eval-mode pass (evaluate, eforward, a test)
    of one row was sized in train mode, failed there, and reserved nothing for an output the real
    pass then made (found by review).

    Nothing real changes (not even batchnorm's running statistics), and nothing real is touched:
    `functional_call` puts the meta tensors into the module it is given for the length of the pass,
    so it is given a shadow of the module (`_shadow`). Given the module itself, a listing or a stats
    scrape, which read a busy object without its lock, saw its parameters on the meta device for that
    moment (GetServerStats listed a "meta" device, ListHandles a 665,600-byte module as 16,640 bytes;
    found by review).

    A pass already run for the same structure and input is answered from `_OUTPUTS`.

    Raises:
        ResourceExhausted: the output (or a tensor made on the way) would have more bytes than int64
            counts, which meta refuses; no real pass may run then (see `_overflowed`). Raised every
            time, never kept.
    """
    return _meta_result(module, x, train)[0]


def _meta_result(
    module: nn.Module, x: torch.Tensor, train: bool, grad: bool = False
) -> tuple[torch.Tensor | None, int]:
    """`_meta_output`'s output, and the bytes its pass allocated at its widest, output included
    (`_PeakBytes`; 0 where it failed), from `_OUTPUTS` where the same pass ran before. With `grad`,
    the pass records autograd's graph as the real pass does (see `pass_bytes`)."""
    key = (_structure(module), tuple(x.shape), x.dtype, train, grad)
    seen, known = _OUTPUTS.get(module, key)
    if seen:
        return (None, 0) if known is None else (torch.empty(known[0], dtype=known[1], device="meta"), known[2])
    meter = _PeakBytes()
    output = _meta_pass(module, x, train, meter, grad)
    _OUTPUTS.put(module, key, None if output is None else (tuple(output.shape), output.dtype, meter.peak))
    return output, meter.peak if output is not None else 0


def _meta_pass(
    module: nn.Module, x: torch.Tensor, train: bool, meter: _PeakBytes | None = None, grad: bool = False
) -> torch.Tensor | None:
    """The pass of `_meta_output` itself, uncached; under `meter`, which then holds its widest point.
    Without gradients unless `grad`: then each parameter's meta copy requires a gradient where the
    parameter does, so autograd saves what the real pass saves."""
    state = {
        name: t.detach().to("meta").requires_grad_(grad and t.requires_grad)
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    }
    shadow, x = _shadow(module, train), x.to("meta")
    try:
        with torch.set_grad_enabled(grad), meter if meter is not None else contextlib.nullcontext():
            output = functional_call(shadow, state, (x,))
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as exc:
        if _overflowed(exc):
            raise ResourceExhausted(
                f"the module's output for an input of shape {list(x.shape)} would be larger than any memory "
                f"({exc}); check its layers' padding, dilation and output sizes"
            ) from None
        return None
    return output if isinstance(output, torch.Tensor) else None


def _structure(module: nn.Module) -> Hashable:
    """Everything of the module that a meta pass reads: each submodule's type and options (as its
    `extra_repr` shows them) and each parameter's and buffer's name, shape, dtype and whether it
    takes a gradient (a frozen layer saves nothing for backward, so a training batch's pass is
    narrower). Equal structures give equal outputs and peaks for equal inputs; values and devices do
    not matter on meta."""
    layers = tuple((name, type(m), m.extra_repr()) for name, m in module.named_modules())
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.requires_grad)
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    )
    return layers, tensors


OutputShape = tuple[tuple[int, ...], torch.dtype, int] | None
"""A meta pass's output, its shape and dtype, and the bytes the pass allocated at its widest; or None
where the pass failed or gave no tensor."""

V = TypeVar("V")


class _Kept(Generic[V]):
    """Meta passes already run, per module (weakly: a freed module's go with it) and per structure
    and input: a forward of the bench's MLP spent 3.1 ms in its meta pass (torch's Python
    decomposition of `addmm` on meta) against 0.5 ms in the forward itself (docs/perf.md). A key
    holds the module's whole structure (`_structure`), so a module changed by `to()`, a load or an
    option is looked up afresh; a module's last `ENTRIES` keys are kept."""

    ENTRIES = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, V]] = weakref.WeakKeyDictionary()

    def get(self, module: nn.Module, key: Hashable) -> tuple[bool, V | None]:
        """Whether the pass was seen, and what it gave."""
        with self._lock:
            known = self._seen.get(module, {})
            return (True, known[key]) if key in known else (False, None)

    def put(self, module: nn.Module, key: Hashable, value: V) -> None:
        with self._lock:
            known = self._seen.setdefault(module, {})
            known[key] = value
            while len(known) > self.ENTRIES:  # dicts keep insertion order: the oldest goes first
                del known[next(iter(known))]


_OUTPUTS: _Kept[OutputShape] = _Kept()
"""Forward passes without gradients (`_meta_result`)."""
_BATCH_PASSES: _Kept[int | None] = _Kept()
"""Training batches' passes (`batch_pass_bytes`)."""


def _shadow(module: nn.Module, train: bool) -> nn.Module:
    """A shallow copy of the module tree whose own tables of parameters, buffers and submodules are
    copies: what `functional_call` swaps in them leaves the real module as it is. Every layer of it
    has the train flag `train` (the real module's flags stay as they are). Everything else (the
    tensors, hooks, options) is shared, and nothing is allocated."""
    shadow = copy.copy(module)
    shadow.training = train
    shadow._parameters = dict(module._parameters)
    shadow._buffers = dict(module._buffers)
    shadow._modules = {name: None if m is None else _shadow(m, train) for name, m in module._modules.items()}
    return shadow


def _overflowed(exc: Exception) -> bool:
    """Whether a pass failed on meta because a tensor's size overflows int64. Reserving nothing and
    letting the real pass fail is wrong there: torch's CPU convolution computes such sizes in 32 bits,
    so a conv2d with dilation 2**32+1 and padding 2**32 answered a [1, 1, 1, 1] output where the true
    one is [1, 1, 2**32+1, 2**32+1], and padding 2**31-1 tried to allocate 34 GB, unreserved (found by
    review)."""
    return isinstance(exc, RuntimeError) and "Storage size calculation overflowed" in str(exc)


def _module_device(module: nn.Module) -> torch.device:
    """Where a pass of the module runs, as `training._device` places it: by its first tensor, on
    the CPU for a module with none (x is moved there, and its output made there)."""
    return next((t.device for t in module_tensors(module)), torch.device("cpu"))


def forward_bytes(module: nn.Module, x: torch.Tensor, train: bool) -> Bytes:
    """Bytes of the output of `module(x)` with every layer's train flag `train` (the pass's
    mode, `training.forward_flags`), on the module's device, and of the copy of x the pass takes
    there: for a module that writes its input in place (`inplace=True`), so that x stays as it
    was, and for x on another device (an upload, received on the host, into a module on a GPU: a
    copy of x on the GPU that was not reserved; found by review).

    A forward pass that fails on meta reserves nothing here; the real pass then fails with torch's
    own message, or the store checks what it really made.
    """
    output = _meta_output(module, x, train)
    if output is None:
        return {}
    copied = training.writes_inputs(module) or x.device != _module_device(module)
    copy = [torch.empty(x.shape, dtype=x.dtype, device="meta")] if copied else []
    return add_bytes(tensor_bytes([output, *copy], _module_device(module)), forward_copy_bytes(module))


def pass_bytes(module: nn.Module, x: torch.Tensor, train: bool, grad: bool = False) -> Bytes:
    """Bytes a pass of `module(x)` allocates at its widest on the module's device, its output
    included: without gradients, each layer's output lives until the next layer has made its own,
    so a convolution net's feature maps can take many times its output (they were not reserved);
    with gradients (`grad`: RunForward's "forward" mode), autograd keeps what backward would need
    (each linear's input, each activation's output) until the pass ends, most of the layers'
    outputs at once: sized without them, a forward with gradients allocated twice what was reserved
    (found by review). For the length of the pass, beside the output's own reservation, which
    outlives it: the output is counted twice while the pass runs, the margin for a device kernel's
    own temporaries. Measured on meta (`_meta_result`, with every layer's train flag `train` and
    gradients as `grad`); nothing where that pass fails."""
    peak = _meta_result(module, x, train, grad)[1]
    return {str(_module_device(module)): peak} if peak else {}


def _split(model: Model, split: str) -> tuple[training.Data | None, Values]:
    """The data and options of a model's split ("train" or "test")."""
    return (model.train_data, model.train) if split == "train" else (model.test_data, model.test)


def _metric_names(model: Model, split: str, metrics: str | None = None) -> set[str]:
    """The metrics an epoch or a test computes: the split's, or `metrics` (a soup's scoring)."""
    return set(str(_split(model, split)[1]["metrics"] if metrics is None else metrics).split(","))


def _meta_batch(model: Model, split: str) -> torch.Tensor | None:
    """A meta stand-in for one full batch of the split's inputs (its batch size, at most the rows);
    None without data."""
    data, options = _split(model, split)
    if data is None:
        return None
    w = min(int_value(options, "batchsize"), batching.full_size(data.x))
    return torch.empty((w, *data.x.shape[1:]), dtype=data.x.dtype, device="meta")


def _batch_output(model: Model, split: str) -> torch.Tensor | None:
    """The meta output of one full batch of the split's data, in the split's mode; None without
    data, or where the pass fails on meta."""
    x = _meta_batch(model, split)
    return None if x is None else _meta_output(model.module, x, train=split == "train")


def data_pass_bytes(model: Model, split: str) -> Bytes:
    """`pass_bytes` of one batch of the model's `split` data ("train": batchnorm(m)'s passes, in
    train mode; "test": a test's, in eval mode); nothing without data."""
    x = _meta_batch(model, split)
    return {} if x is None else pass_bytes(model.module, x, train=split == "train")


def _predicted(loss: str, output: torch.Tensor) -> int:
    """How many classes an output predicts: one per row and position along its class dimension
    (`training.class_dim`), or one per value where it has none."""
    dim = training.class_dim(loss, output)
    return output.numel() if dim is None else output.numel() // max(output.shape[dim], 1)


_SCORED = frozenset({"loss", "batchloss", "accuracy", "matches", "predict"})
"""Metrics a test computes from each batch's output beyond the output itself (the loss, predictions)."""


def testing_pass_bytes(model: Model, metrics: str | None = None) -> Bytes:
    """Bytes a test over the model's test data (RunTest; a soup's scoring, with `metrics` its own)
    allocates at its widest beyond the outputs and predictions its metrics keep (`metrics_bytes`):
    one batch's pass (`data_pass_bytes`) and, where it computes the loss or predictions, what they
    make beside the batch's output: one output more (ce's log_softmax, the CPU's unreduced mse);
    that were not reserved: a test of three batches with the ce loss allocated twice its pass (found by
    review). The scalars its metrics keep per batch are `metrics_bytes`'."""
    base = data_pass_bytes(model, "test")
    if not base or not _metric_names(model, "test", metrics) & _SCORED:
        return base
    output = _batch_output(model, "test")
    if output is None:
        return base
    beside = {str(_module_device(model.module)): output.numel() * output.element_size()}
    return add_bytes(base, beside, scoring_bytes(model, "test", metrics))


_PREDICTED = frozenset({"accuracy", "matches", "predict"})
"""Metrics that compare each batch's predictions with its targets (`training.predictions`)."""


def scoring_bytes(model: Model, split: str, metrics: str | None = None) -> Bytes:
    """Bytes one batch's predictions and their comparison make beside its output, on the module's
    device, for an epoch (`split` "train") or a test with accuracy, matches or predict (the split's
    metrics, or `metrics`): the int64 class predicted per row and position (or a zero per value where
    the output has no class dimension), the targets' int64 argmax where they are one-hot rows or
    probabilities, the bool hits and, where an ignore index masks the targets, the mask and the
    masked hits; freed before the next batch (the predictions `predict` keeps are `metrics_bytes`',
    not counted here).
    Not reserved before: a test with accuracy over single-column outputs allocated 1,260 bytes over
    its reservation for batches of 100 (its int64 predictions and targets are twice the float32
    output; found by review). Nothing without data or these metrics."""
    data, _ = _split(model, split)
    names = _metric_names(model, split, metrics)
    output = _batch_output(model, split) if names & _PREDICTED else None
    if data is None or output is None:
        return {}
    predicted = _predicted(model.loss.type, output)
    argmax = data.y.dim() == output.dim() and data.y.dim() > 0  # one-hot rows or probabilities: read by their argmax
    truth = predicted * 8 if argmax else 0
    masked = training.masks_scored(model.loss.type, output.dim(), data.y.dim(), data.y.is_floating_point())
    masks = predicted * (3 if masked else 1)  # the hits; with a mask, it and the masked hits
    made = 0 if "predict" in names else predicted * 8  # `predict` keeps them: metrics_bytes has them
    return {str(_module_device(model.module)): made + truth + masks + 16}  # and the two sums


def evaluate_pass_bytes(model: Model, x: torch.Tensor) -> Bytes:
    """`pass_bytes` of one of the test-batchsize pieces evaluate(model, x) runs, in eval mode."""
    dtype = training.input_dtype(model.module, x)
    _, w, _ = training.evaluate_plan(model, x)
    return pass_bytes(model.module, torch.empty((w, *x.shape[1:]), dtype=dtype, device="meta"), train=False)


def forward_copy_bytes(module: nn.Module) -> Bytes:
    """Bytes of the copy a forward pass (forward, testrun, evaluate, batchnorm(m), run's probe, a
    soup's scoring) keeps of what it may write in place, to put it back if the pass fails
    (`training.written_by_forward`): the weight of each embedding with max_norm, which it
    renormalises, and every buffer (batchnorm's running statistics). The buffers' copies were not
    reserved: a forward with gradients through a batchnorm allocated more than it reserved (found
    by review)."""
    return tensor_bytes(training.written_by_forward(module))


def _kept_bytes(pieces: int, batches: int, device: torch.device) -> Bytes:
    """Bytes of per-batch results of `pieces` bytes in all, kept on `device` until the end: the pieces,
    their concatenation when there are several (one piece is handed over as it is), and the host
    copy the reply is made from when they are not on the host."""
    if pieces == 0:
        return {}
    kept = {str(device): pieces * (2 if batches > 1 else 1)}
    return add_bytes(kept, {"cpu": pieces} if device.type != "cpu" else {})


def evaluate_bytes(model: Model, x: torch.Tensor) -> Bytes:
    """Bytes evaluate(model, x) allocates: the outputs of its test-batchsize pieces, kept until
    they are joined into the one output (`_kept_bytes`), and the piece of x each pass takes when it
    is a copy: converted to the parameters' dtype (uint8 images become float32, four times their
    upload), moved to the module's device, or copied for a module that writes its input in place.
    That copy was not reserved: with the test batchsize at the data's size, a 10 MB uint8 upload
    became 40 MB of float32 under a 30 MB cap (found by review). Raises what evaluate would for a
    dtype it refuses, before anything is reserved."""
    dtype = training.input_dtype(model.module, x)
    n, w, nb = training.evaluate_plan(model, x)
    device = _module_device(model.module)
    copied = dtype != x.dtype or device != x.device or training.writes_inputs(model.module)
    piece = tensor_bytes([torch.empty((w, *x.shape[1:]), dtype=dtype, device="meta")], device) if copied else {}
    output = _meta_output(model.module, torch.empty((n, *x.shape[1:]), dtype=dtype, device="meta"), train=False)
    if output is None:
        return piece
    kept = _kept_bytes(output.numel() * output.element_size(), nb, device)
    return add_bytes(kept, forward_copy_bytes(model.module), piece)


def metrics_bytes(model: Model, split: str, metrics: str | None = None) -> Bytes:
    """Bytes an epoch (`split` "train") or a test ("test") keeps for its metrics (the split's, or
    `metrics`: a soup's scoring): for `output` and `predict`, every batch's outputs and the int64
    class each row's output predicts, until they are joined at the end (`_kept_bytes`); and the
    scalars the others keep per batch, with what they make at the end (`scalar_metrics_bytes`).
    Nothing without data."""
    pieces, nb = _kept_metrics(model, split, metrics)
    return add_bytes(_kept_bytes(pieces, nb, _module_device(model.module)), scalar_metrics_bytes(model, split, metrics))


def scalar_metrics_bytes(model: Model, split: str, metrics: str | None = None) -> Bytes:
    """Bytes an epoch or a test holds at its widest for its scalar metrics (`training._Metrics`), on
    the module's device and the host: per batch, for `loss` and `batchloss` the batch's loss (a 0-dim
    tensor in the output's dtype), for `accuracy`, `matches` and `predict` its int64 count of matches
    and, where the loss's ignore index masks the targets (`training.masks_scored`), of positions
    scored; at the end, the losses stacked (copied to the host from a GPU), the stack of the counts
    and their sum (one list at a time), the float64 copy of float32 losses and their mean, and the
    0-dim accuracy and matches answered. An epoch's were not reserved at all (about 30 bytes a batch,
    every batch's loss kept even without a loss metric), a test's by a bound of 48 bytes a batch
    (found by review). The last two steps are counted as if at once (at most 16 bytes over); exact
    elsewhere. Nothing without data or without these metrics."""
    data, options = _split(model, split)
    names = _metric_names(model, split, metrics)
    losses, counted = bool({"loss", "batchloss"} & names), bool(_PREDICTED & names)
    if data is None or not (losses or counted):
        return {}
    n = batching.full_size(data.x)
    nb = training.batch_count(n, min(int_value(options, "batchsize"), n), bool_value(options, "droplast"))
    output = _batch_output(model, split)
    size = output.element_size() if output is not None else 8  # a loss's dtype is its output's
    masked = counted and (output is None or training.masks_scored(
        model.loss.type, output.dim(), data.y.dim(), data.y.is_floating_point()))
    per_batch = nb * ((size if losses else 0) + (8 if counted else 0) + (8 if masked else 0))
    stacked = nb * size if losses else 0
    summed = nb * 8 + 8 if counted else 0  # a stack of counts and its sum
    mean = (nb * 8 if size != 8 else 0) + 8 if "loss" in names else 0  # the float64 losses and their mean
    answered = 8 * len({"accuracy", "matches"} & names)
    device = _module_device(model.module)
    if device.type == "cpu":
        return {"cpu": per_batch + stacked + max(summed, mean) + answered}
    return add_bytes({str(device): per_batch + max(stacked, summed)}, {"cpu": stacked + mean + answered})


def metrics_reply_bytes(model: Model, split: str) -> int:
    """Host bytes of the metric tensors an epoch or a test answers: the joined `output` and
    `predict` (`_kept_metrics`), the float32 `batchloss` (one value a batch) and the 0-d scalars.
    On a cluster, rank 0 receives another rank's metrics and holds them until the reply has
    streamed: it reserves this much for each such rank before any rank runs (cluster.py,
    `_rank_metrics`). Nothing without data, as the epoch then answers nothing."""
    if _split(model, split)[0] is None:
        return 0
    names = _metric_names(model, split)
    pieces, nb = _kept_metrics(model, split)
    scalars = sum(8 for name in names if name in ("loss", "accuracy", "matches"))  # float64, int64
    return pieces + scalars + (4 * nb if "batchloss" in names else 0)


def _kept_metrics(model: Model, split: str, metrics: str | None = None) -> tuple[int, int]:
    """The bytes of the joined `output` and `predict` metrics of an epoch or a test (the split's
    metrics, or `metrics`), and its batch count (0, 0 without data or without either metric)."""
    data, options = _split(model, split)
    names = _metric_names(model, split, metrics)
    if data is None:
        return 0, 0
    n = batching.full_size(data.x)
    w = min(int_value(options, "batchsize"), n)
    nb = training.batch_count(n, w, bool_value(options, "droplast"))
    if not names & {"output", "predict"}:
        return 0, nb
    x = torch.empty((min(nb * w, n), *data.x.shape[1:]), dtype=data.x.dtype, device="meta")
    output = _meta_output(model.module, x, train=split == "train")
    if output is None:
        return 0, nb
    pieces = output.numel() * output.element_size() if "output" in names else 0
    if "predict" in names:
        predicted = _predicted(model.loss.type, output)
        pieces += predicted * torch.empty((), dtype=torch.int64).element_size()
    return pieces, nb


def _meta_twin(params: Sequence[nn.Parameter]) -> nn.ParameterList:
    """Meta-device stand-ins for parameters: same shapes, dtypes and requires_grad, no memory."""
    return nn.ParameterList(
        nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in params
    )


def _state_bytes(optim: torch.optim.Optimizer, real: Sequence[nn.Parameter], twins: Sequence[nn.Parameter]) -> Bytes:
    """Bytes of the state `optim` (built over `twins`) holds, placed where the real optimizer keeps it:
    per-parameter buffers on their parameter's device, scalars (Adam's step) where torch put them."""
    device_of = {id(t): p.device for p, t in zip(real, twins)}
    total: Bytes = {}
    for twin, state in optim.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                device = device_of[id(twin)] if value.device.type == "meta" else value.device
                total = add_bytes(total, tensor_bytes([value], device))
    return total


def optimizer_bytes(
    type_name: str, module: nn.Module, args: tuple[Value, ...], kwargs: tuple[tuple[str, Value], ...]
) -> Bytes:
    """Bytes a new optimizer over `module` allocates when built (Adagrad's sums; most allocate none)."""
    real = list(module.parameters())
    twins = _meta_twin(real)
    holder = nn.Module()
    holder.params = twins
    built = optimizers.create_optimizer(type_name, holder, args, kwargs)
    return _state_bytes(built.optim, real, list(twins))


def _missing_state(optimizer: optimizers.Optimizer) -> list[nn.Parameter]:
    """Trainable parameters that have no optimizer state yet (their first step allocates it)."""
    return [p for p in optimizer.module.parameters() if p.requires_grad and not optimizer.optim.state.get(p)]


def step_bytes(optimizer: optimizers.Optimizer) -> Bytes:
    """Bytes the next step allocates at its widest: the state it makes (`step_state_bytes`) and what
    it makes and frees on the way (`step_temporaries`)."""
    return add_bytes(step_state_bytes(optimizer), step_temporaries(optimizer))


def step_state_bytes(optimizer: optimizers.Optimizer) -> Bytes:
    """Bytes of the state the next step leaves: for parameters stepped for the first time, found by
    stepping a twin optimizer of the same type and options over meta parameters."""
    real = _missing_state(optimizer)
    if not real:
        return {}
    twins = _meta_twin(real)
    for t in twins:
        t.grad = torch.empty_like(t)
    twin = _twin_optimizer(optimizer, list(twins), real)
    twin.step()
    return _state_bytes(twin, real, list(twins))


def _twin_optimizer(
    optimizer: optimizers.Optimizer, twins: Sequence[nn.Parameter], real: Sequence[nn.Parameter]
) -> torch.optim.Optimizer:
    """An optimizer of the same type and options over meta `twins` of `real`, taking the path torch
    takes for the real ones: the multi-tensor (foreach) kernels where every parameter is on CUDA,
    which torch picks by default there and never on meta or the CPU. Built as the optimizer was,
    without create_optimizer's checks on new optimizers: those look at the parameters' dtypes now,
    which a move may have changed since it was made."""
    twin = optimizers.OPTIMIZER_TYPES[optimizer.type].build(list(twins), optimizer.options)
    foreach = bool(real) and all(p.device.type == "cuda" for p in real)
    for group in twin.param_groups:
        if "foreach" in group:
            group["foreach"] = foreach
    return twin


STEP_TEMPORARIES_BOUND = 3
"""Where a step cannot be measured on meta, what it is reserved for its temporaries, in multiples of
the trainable parameters' bytes: measured over every optimizer type and option here, on either path,
at most 2.84 (Adam with amsgrad and decay one tensor at a time: decayed gradient, root and quotient of
the largest parameter, 3 of its size); the multi-tensor paths 1-2."""

_STEPS: _Kept[Bytes] = _Kept()
"""Optimizer steps' temporaries (`step_temporaries`), per module."""


def step_temporaries(optimizer: optimizers.Optimizer) -> Bytes:
    """Bytes a step makes and frees before it returns, at its widest, on the parameters' device (on
    each, where they are on several): Adam's square root of its second moment and that divided by
    the bias correction, a parameter's size each on the CPU, the whole model's at once with CUDA's
    multi-tensor kernels; RMSprop's average's root. They were not reserved: an Adam step over a
    [30, 40] linear layer allocated 9,600 bytes beyond its state (found by review).

    Measured on a twin over meta parameters (`_twin_optimizer`) under `_PeakBytes`: its first step
    less the state it leaves, and its second, the larger. Kept per module, optimizer type, options and
    the trainable parameters' shapes, dtypes and devices."""
    params = [p for p in optimizer.module.parameters() if p.requires_grad]
    if not params:
        return {}
    key = (optimizer.type, repr(sorted(optimizer.options.items())),
           tuple((tuple(p.shape), p.dtype, str(p.device)) for p in params))
    seen, known = _STEPS.get(optimizer.module, key)
    if seen and known is not None:
        return known
    twins = _meta_twin(params)
    for t in twins:
        t.grad = torch.empty_like(t)
    twin = _twin_optimizer(optimizer, list(twins), params)
    widest = 0
    try:
        for _ in range(2):  # the first step makes the state it keeps, the second only temporaries
            meter = _PeakBytes()
            with meter:
                twin.step()
            widest = max(widest, meter.peak - meter.live)
    except Exception:  # noqa: BLE001 - torch's step failing on meta: the real step decides; reserve its bound
        widest = STEP_TEMPORARIES_BOUND * sum(p.numel() * p.element_size() for p in params)
    made = {device_name(p): widest for p in params} if widest else {}
    _STEPS.put(optimizer.module, key, made)
    return made


def gradient_bytes(module: nn.Module) -> Bytes:
    """Bytes of the gradients a backward pass allocates: one per trainable parameter without one."""
    return tensor_bytes(p for p in module.parameters() if p.requires_grad and p.grad is None)


class _PeakBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The bytes of the storages that the ops run under it make, while they live, and the most that
    lived at once: what a pass allocates at its widest (a storage an op returns that none of its
    inputs had is new). Run on meta, where no byte is real, it gives
    what the same pass on a real device allocates, op for op (the same torch code makes the same
    storages; tests/test_domain_footprint.py checks it against a CPU pass). A storage is counted
    when an op returns it and uncounted when it is freed (a finalizer on the storage, whose Python
    object torch keeps while the storage lives), so views and in-place ops count nothing, and an
    activation freed once backward has used it stops counting then. Temporaries inside one kernel
    (never a storage) are not seen."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = tree_leaves((args, kwargs))
        given = {leaf.untyped_storage()._cdata for leaf in inputs if isinstance(leaf, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf, given)
        return out

    def _count(self, t: torch.Tensor, given: set[int]) -> None:
        """Count t's storage if the op made it: not one of its inputs' (a view, an in-place or `out=`
        op: a parameter's `weight.t()` counted its whole weight again) and not counted already."""
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key in given or key in self._counted or not nbytes:
            return
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes


def train_batch_rows(model: Model) -> int:
    """Rows of one training batch: the batchsize, at most the training data's rows (0 without data)."""
    data = model.train_data
    return 0 if data is None else min(int_value(model.train, "batchsize"), batching.full_size(data.x))


def batch_pass_bytes(model: Model) -> Bytes:
    """Bytes one training batch allocates at its widest on the module's device beyond the gradients
    (`gradient_bytes`): the activations autograd saves for backward, the output and the loss, and
    the gradients flowing back through the layers. Before, none of it was reserved: a batch size
    whose activations did not fit ran into the host's or the GPU's memory instead of the cap
    (RESOURCE_EXHAUSTED from torch, or the server killed by the kernel's OOM killer).

    Measured by running the forward pass in train mode, the loss and backward over one full batch on
    meta copies of the module's tensors, in a shadow of it (`_shadow`: nothing real changes), under
    `_PeakBytes`. The peak counts the parameters' gradients made on the way, which the module's
    charge or `gradient_bytes` already holds: they are taken off. A device's own kernels may make
    what meta's do not (the CPU's `mse_loss` keeps its unreduced loss, a tensor the size of the
    output, where meta's makes a scalar): the output's bytes are added for that, so the reservation
    is at least what the CPU allocates and at most one output more. Kept per module for its structure,
    batch shape and loss (`_BATCH_PASSES`); nothing without training data, and
    nothing where the pass fails on meta (the real pass then fails with torch's own message)."""
    data, w = model.train_data, train_batch_rows(model)
    if data is None or w <= 0:
        return {}
    x = torch.empty((w, *data.x.shape[1:]), dtype=data.x.dtype, device="meta")
    y = torch.empty((w, *data.y.shape[1:]), dtype=data.y.dtype, device="meta")
    key = (_structure(model.module), tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, model.loss.type,
           repr(sorted(model.loss.options.items())))
    seen, peak = _BATCH_PASSES.get(model.module, key)
    if not seen:
        peak = _batch_pass_peak(model, x, y)
        _BATCH_PASSES.put(model.module, key, peak)
    return {str(_module_device(model.module)): peak} if peak else {}


def _batch_pass_peak(model: Model, x: torch.Tensor, y: torch.Tensor) -> int | None:
    """The pass of `batch_pass_bytes` itself, uncached: its peak less the gradients it made, plus the
    output's bytes, or None where it fails on meta.

    Raises:
        ResourceExhausted: a tensor of the pass would have more bytes than int64 counts.
    """
    module = model.module
    state = {name: p.detach().to("meta").requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
    state.update({name: b.to("meta") for name, b in module.named_buffers()})
    meter = _PeakBytes()
    try:
        with torch.enable_grad(), meter:
            output = functional_call(_shadow(module, True), state, (x,))
            loss = model.loss(output, training.batch_targets(model, y))
            torch.autograd.backward(loss)
    except Exception as exc:  # any failure on meta (torch's own asserts included): the real pass decides
        if _overflowed(exc):
            raise ResourceExhausted(
                f"a training batch of shape {list(x.shape)} would need more memory than any machine has "
                f"({exc}); lower the batch size (train(m, batchsize=w)) or check the layers' sizes"
            ) from None
        return None
    grads = sum(t.grad.numel() * t.grad.element_size() for t in state.values() if t.grad is not None)
    margin = output.numel() * output.element_size() if isinstance(output, torch.Tensor) else 0
    return max(meter.peak - grads, 0) + margin


def training_bytes(model: Model) -> Bytes:
    """Bytes an epoch leaves allocated beyond what the model holds: gradients and first-step state."""
    return add_bytes(gradient_bytes(model.module), step_state_bytes(model.optimizer))


def batch_or_step_bytes(model: Model) -> Bytes:
    """The wider, on each device, of a training batch's forward, loss and backward
    (`batch_pass_bytes`) and its optimizer step's temporaries (`step_temporaries`) beside the batch's
    output and loss: by the step, backward has freed what the pass saved, and only those (and the
    gradients, counted apart) are left (a drawn epoch found the loss still alive there:
    tests/test_reservation_properties.py). Summed, an Adam epoch over a 32 -> 10 linear layer
    reserved 38% more than it allocated."""
    passed = batch_pass_bytes(model)
    temporaries = step_temporaries(model.optimizer)
    if not temporaries:
        return passed
    device = _module_device(model.module)
    output = _batch_output(model, "train") if train_batch_rows(model) > 0 else None
    # The output, and the loss: on the CPU mse and smoothl1 keep their unreduced, output-sized loss
    # under the mean (the pass's own margin is that output more), and a scalar elsewhere.
    beside = {str(device): 2 * output.numel() * output.element_size() + 16} if output is not None else {}
    stepping = add_bytes(temporaries, beside)
    return {d: max(passed.get(d, 0), stepping.get(d, 0)) for d in passed.keys() | stepping.keys()}


def rollback_bytes(model: Model) -> Bytes:
    """Bytes an epoch holds to put the model back if it fails midway: a host copy of every tensor it
    writes in place (parameters, buffers, optimizer state), and the gradients it replaces, held where
    they are until it ends while their replacements are made."""
    optim = model.optimizer.optim
    copies = tensor_bytes(rollback.written(model.module, optim), "cpu")
    return add_bytes(copies, tensor_bytes(rollback.replaced(optim)))


def shuffle_bytes(model: Model) -> Bytes:
    """Bytes a shuffled epoch holds while it runs: the permutation (int64, drawn on the CPU and moved
    next to the data) and the reordered copy of the inputs and targets at full size, which it trains
    on and then writes over the data."""
    data = model.train_data
    if data is None or not model.train["shuffle"]:
        return {}
    n = batching.full_size(data.x)
    device = device_name(data.x)
    rows = {device: n * sum(math.prod(t.shape[1:]) * t.element_size() for t in (data.x, data.y))}
    index = torch.empty(n, dtype=torch.int64, device="meta")
    moved = tensor_bytes([index], device) if device != "cpu" else {}
    return add_bytes(rows, tensor_bytes([index], "cpu"), moved)


def batch_copy_bytes(model: Model, split: str = "train") -> Bytes:
    """Bytes of the copy of one batch of inputs a pass over the model's data (an epoch, batchnorm(m)
    on "train", a test on "test") gives a module that writes its input in place
    (`training.writes_inputs`), so the held data stay as they were; nothing for other modules. A
    test's and batchnorm(m)'s copies were not reserved (found by review)."""
    data, x = _split(model, split)[0], _meta_batch(model, split)
    if data is None or x is None or not training.writes_inputs(model.module):
        return {}
    return {device_name(data.x): x.numel() * x.element_size()}


def epoch_bytes(model: Model) -> Bytes:
    """Bytes an epoch needs at its widest beyond what the model holds, for as long as it runs: what
    it leaves allocated (`training_bytes`), its copies to put the model back (`rollback_bytes`),
    shuffled, the reordered data (`shuffle_bytes`), for a module that writes its input in place, a
    copy of a batch (`batch_copy_bytes`), and the probe's copy of what a pass writes in place (a
    max_norm embedding's weight, the buffers: `forward_copy_bytes`, held before training starts:
    counted on top, at most too much), the wider of what one batch's forward, loss and backward
    allocate and what its step makes (`batch_or_step_bytes`), and its metrics' predictions and hits for
    a batch (`scoring_bytes`). The outputs and predictions its metrics keep (`metrics_bytes`) are not
    here: they outlive the epoch until its reply has streamed, so the caller reserves them for that long."""
    return add_bytes(
        training_bytes(model), rollback_bytes(model), shuffle_bytes(model), batch_copy_bytes(model),
        forward_copy_bytes(model.module), batch_or_step_bytes(model), scoring_bytes(model, "train"),
    )


def count_bytes(d: TensorDict) -> Bytes:
    """Bytes a running average's new count takes (a fresh 0-dim float64 on the CPU each update)."""
    return {} if COUNT_KEY in d.entries else tensor_bytes([torch.empty((), dtype=torch.float64)])


def update_bytes(update: averaging.Update, d: TensorDict) -> Bytes:
    """Bytes an average's update holds at its peak: a running average's first count, and the one
    value it casts to its entry's dtype at a time (a bfloat16 parameter into a float32 average)."""
    count = count_bytes(d) if update.count is not None else {}
    cast = update.cast_bytes()
    return add_bytes(count, cast) if count or cast else {}  # most updates: nothing new, nothing cast


def copy_bytes(module: nn.Module, dtype: torch.dtype | None, buffers: bool) -> Bytes:
    """Bytes of copy_parameters(module, dtype, buffers): each copy in its new dtype, on its device."""
    totals: Bytes = {}
    for _, t in averaging.copied_tensors(module, buffers):
        device = device_name(t)
        totals[device] = totals.get(device, 0) + t.numel() * averaging.copy_dtype(t, dtype).itemsize
    return totals


def data_bytes(
    model: Model, x: torch.Tensor, y: torch.Tensor, device: torch.device, names: tuple[str, str] = ("x", "y")
) -> Bytes:
    """Bytes set_data allocates beyond the uploaded tensors: the converted copy of each one whose
    dtype changes (uint8 images to float32 take four times their upload), on the model's device.
    Raises what set_data would for a dtype it refuses, before anything is reserved."""
    x_dtype, y_dtype = training.data_dtypes(model, x, y, names)
    new = [torch.empty(t.shape, dtype=d, device="meta") for t, d in ((x, x_dtype), (y, y_dtype)) if t.dtype != d]
    return {str(device): sum(t.numel() * t.element_size() for t in new)} if new else {}


# -- averaging across models ----------------------------------------------------------------------------


def merge_bytes(plan: merging.Plan) -> Bytes:
    """Bytes an average or merge holds at its widest: the new result's tensors (none when it writes
    into an existing dictionary), the one scratch buffer `run` takes for every entry (`Plan.buffer_bytes`:
    the largest entry's buffers, `Slot.buffers`) and the most any entry allocates inside an operation
    beside it (`Slot.internal`: TIES's selection, slerp's float64 chunks and sums). The largest of each
    slot's buffers and internal bytes together fell short where two entries differ: a float64 entry's
    buffers with a float32 one's float64 chunks (found by a drawn merge, tests/test_reservation_properties.py)."""
    result: Bytes = {}
    if not plan.into:
        for s in plan.slots:
            result = add_bytes(result, {str(s.device): s.nbytes})
    scratch = plan.buffer_bytes() + max((s.internal for s in plan.slots), default=0)
    return add_bytes(result, {str(plan.device): scratch} if plan.device is not None else {})


def outer_step_bytes(optimizer: optimizers.Optimizer, average: TensorDict | None = None) -> Bytes:
    """Bytes an outer step holds at its widest: a pseudo-gradient per trainable parameter (freed after
    the step) and the larger of what the optimizer's step allocates (its first step's state, kept,
    and its temporaries: `step_bytes`) and, while the gradients are made, one difference held in a
    wider dtype than its parameter's with its sum of squares' temporaries (freed; see
    `outer.pseudo_gradient`). Without an average, as if every entry had its parameter's dtype."""
    params = outer.trainable(optimizer)
    state = step_bytes(optimizer)
    wider = _difference_bytes(params, average)
    larger = {device: max(state.get(device, 0), wider.get(device, 0)) for device in state.keys() | wider.keys()}
    return add_bytes(tensor_bytes(p for _, p in params), larger)


def _difference_bytes(params: Sequence[tuple[str, nn.Parameter]], average: TensorDict | None) -> Bytes:
    """The most an outer step holds apart from its gradients while it makes them, by device: for one
    parameter, the difference in the dtype it and its (wider) average entry promote to, where that is
    neither (float16 against bfloat16: float32) the copy of the entry torch makes to subtract it on
    the CPU, and what the difference's sum of squares allocates (`outer.sum_of_squares_bytes`; not
    reserved before: 28 bytes over for a [40, 30] layer, found by review)."""
    largest: Bytes = {}
    for name, p in params:
        entry = p if average is None else average.entries[name]
        wide = torch.promote_types(p.dtype, entry.dtype)
        nbytes = outer.sum_of_squares_bytes(p.numel(), wide)
        if wide != p.dtype:
            nbytes += p.numel() * wide.itemsize
            if wide != entry.dtype and p.device.type == "cpu":
                nbytes += entry.numel() * wide.itemsize
        device = device_name(p)
        largest[device] = max(largest.get(device, 0), nbytes)
    return largest


def soup_bytes(plan: soups.SoupPlan) -> Bytes:
    """Bytes a greedy soup holds at its widest: the soup dictionary (kept) and a copy of the model's
    souped tensors, to put them back afterwards (freed)."""
    return {device: 2 * n for device, n in tensor_bytes(plan.targets).items()}
