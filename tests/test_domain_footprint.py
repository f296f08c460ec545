"""The forward's sizing pass on meta tensors, and the passes it keeps (`footprint._OUTPUTS`).

A kept pass must answer exactly what a fresh one would, and a module changed in any way the pass
reads (dtype, a tensor's shape, an option) must be looked up afresh: a stale answer would reserve
the wrong bytes before a real forward allocates them.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from inprocess import CpuPeak
from weightavg_server.domain import flat, footprint, losses, optimizers, specs, tensors, training
from weightavg_server.domain.errors import InvalidArgument


def _fresh(module: nn.Module, x: torch.Tensor, train: bool = True) -> tuple[tuple[int, ...], torch.dtype] | None:
    output = footprint._meta_pass(module, x, train)
    return None if output is None else (tuple(output.shape), output.dtype)


def _kept(module: nn.Module, x: torch.Tensor, train: bool = True) -> tuple[tuple[int, ...], torch.dtype] | None:
    output = footprint._meta_output(module, x, train)
    return None if output is None else (tuple(output.shape), output.dtype)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


KEPT = 8 * 4 * 2 + 8
"""Bytes of the copy of _mlp's batchnorm buffers a forward keeps to put them back (`forward_copy_bytes`)."""


@pytest.mark.parametrize("rows", [2, 5, 100])
def test_a_kept_pass_answers_what_a_fresh_one_does(rows: int) -> None:
    module, x = _mlp(), torch.randn(rows, 12)
    first = footprint.forward_bytes(module, x, True)
    assert first == {"cpu": rows * 3 * 4 + KEPT}
    assert footprint.forward_bytes(module, x, True) == first  # from the kept pass
    assert _kept(module, x) == _fresh(module, x) == ((rows, 3), torch.float32)


def test_each_input_shape_and_dtype_has_its_own_pass() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Identity())
    assert footprint.forward_bytes(module, torch.zeros(2, 3, 4), True) == {"cpu": 2 * 12 * 4}
    assert footprint.forward_bytes(module, torch.zeros(2, 3, 5), True) == {"cpu": 2 * 15 * 4}
    assert footprint.forward_bytes(module, torch.zeros(2, 3, 4, dtype=torch.float64), True) == {"cpu": 2 * 12 * 8}


def test_a_module_moved_to_another_dtype_is_sized_afresh() -> None:
    module, x = _mlp(), torch.randn(4, 12)
    assert footprint.forward_bytes(module, x, True) == {"cpu": 4 * 3 * 4 + KEPT}
    module.to(torch.float64)
    assert _kept(module, x) == _fresh(module, x)  # the same float32 input, answered afresh
    assert footprint.forward_bytes(module, x.double(), True) == {"cpu": 4 * 3 * 8 + 2 * KEPT - 8}
    assert _kept(module, x.double()) == _fresh(module, x.double())


def test_a_tensor_of_another_shape_is_sized_afresh() -> None:
    module, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)
    assert footprint.forward_bytes(module, x, True) == {"cpu": 2 * 3 * 4}
    module[0].weight = nn.Parameter(torch.zeros(7, 4))  # what a load of another shape would leave
    module[0].bias = nn.Parameter(torch.zeros(7))
    assert footprint.forward_bytes(module, x, True) == {"cpu": 2 * 7 * 4}


def test_an_option_changed_in_place_is_sized_afresh() -> None:
    flatten, x = nn.Flatten(), torch.zeros(2, 3, 4)
    module = nn.Sequential(flatten)
    assert _kept(module, x) == ((2, 12), torch.float32)
    flatten.start_dim = 0  # shown by extra_repr, so part of the structure
    assert _kept(module, x) == _fresh(module, x) == ((24,), torch.float32)


def test_a_failed_pass_is_kept_as_failed_and_an_overflow_is_raised_every_time() -> None:
    module = nn.Sequential(nn.Linear(4, 3))
    assert _kept(module, torch.zeros(2, 5)) is None  # the real pass fails with torch's message
    assert _kept(module, torch.zeros(2, 5)) is None
    conv = nn.Sequential(nn.Conv2d(1, 1, 2, dilation=2**32 + 1, padding=2**32))
    for _ in range(2):
        with pytest.raises(footprint.ResourceExhausted):
            footprint.forward_bytes(conv, torch.zeros(1, 1, 1, 1), True)


def test_a_freed_module_takes_its_passes_with_it() -> None:
    module = _mlp()
    footprint.forward_bytes(module, torch.randn(2, 12), True)
    assert module in footprint._OUTPUTS._seen
    gone = weakref.ref(module)
    del module
    gc.collect()
    assert gone() is None  # nothing kept it alive


def test_a_module_keeps_its_last_inputs_only() -> None:
    module = nn.Sequential(nn.Identity())
    for rows in range(1, footprint._OUTPUTS.ENTRIES + 5):
        footprint.forward_bytes(module, torch.zeros(rows), True)
    assert len(footprint._OUTPUTS._seen[module]) == footprint._OUTPUTS.ENTRIES


def test_the_pass_runs_in_the_real_pass_mode_and_each_mode_is_kept_apart() -> None:
    """A batch of one through batchnorm fails in train mode only: sized with the module's own flag
    (on between calls), an eval-mode pass of one row reserved nothing for the output it then made."""
    module, x = _mlp(), torch.randn(1, 12)
    assert _kept(module, x, train=True) is None  # the real train-mode pass fails too
    assert _kept(module, x, train=False) == _fresh(module, x, train=False) == ((1, 3), torch.float32)
    assert footprint.forward_bytes(module, x, False) == {"cpu": 1 * 3 * 4 + KEPT}
    assert all(m.training for m in module.modules())  # the module's own flags are left as they were


def test_a_forward_reserves_the_copy_of_an_input_on_another_device_than_the_module() -> None:
    """The pass moves x next to the module (`training._batch`): an upload, received on the host,
    into a module on a GPU is copied there, and that copy was not reserved (found by review). The
    meta device stands in here for a GPU: the copy is counted where the module lives."""
    x = torch.zeros(10, 4)
    on_host = nn.Linear(4, 3)
    assert footprint.forward_bytes(on_host, x, train=False) == {"cpu": 10 * 3 * 4}
    elsewhere = nn.Linear(4, 3, device="meta")
    assert footprint.forward_bytes(elsewhere, x, train=False) == {"meta": 10 * 3 * 4 + 10 * 4 * 4}
    # A module without tensors runs on the CPU (`training._device`): an x held elsewhere is copied
    # there and the output made there, where they were counted on x's device.
    away = torch.zeros(10, 4, device="meta")
    assert footprint.forward_bytes(nn.ReLU(), away, train=False) == {"cpu": 2 * 10 * 4 * 4}


# -- one training batch's pass (`batch_pass_bytes`), measured on meta ------------------------------------

def _seq(*layers: tuple[str, tuple[object, ...]]) -> specs.LayerSpec:
    return specs.LayerSpec("sequential", children=tuple(
        specs.LayerSpec(kind, f"l{i}", args) for i, (kind, args) in enumerate(layers)  # type: ignore[arg-type]
    ))


def _targets(n: int, classes: int) -> torch.Tensor:
    return torch.arange(n) % classes


PASSES = {
    "mlp": (_seq(("linear", (20, 64)), ("relu", ()), ("linear", (64, 64)), ("gelu", ()), ("linear", (64, 5))),
            torch.randn(48, 20), _targets(48, 5), "ce"),
    "batchnorm, dropout, in-place relu": (
        _seq(("linear", (20, 32)), ("batchnorm1d", (32,)), ("relu", (True,)), ("drop", (0.3,)), ("linear", (32, 5))),
        torch.randn(48, 20), _targets(48, 5), "ce"),
    "conv, pools": (
        _seq(("conv2d", (1, 8, 3)), ("relu", ()), ("maxpool2d", (2,)), ("conv2d", (8, 4, 3)), ("avgpool2d", (2,)),
             ("flatten", ()), ("linear", (4 * 2 * 2, 3))),
        torch.randn(16, 1, 14, 14), _targets(16, 3), "ce"),
    "embedding, layernorm": (
        _seq(("embed", (50, 16)), ("layernorm", (16,)), ("flatten", ()), ("linear", (16 * 6, 1)), ("sigmoid", ())),
        torch.arange(60).reshape(10, 6) % 50, (torch.arange(10) % 2).float().reshape(10, 1), "bce"),
    "regression": (_seq(("linear", (8, 32)), ("tanh", ()), ("linear", (32, 2))), torch.randn(64, 8),
                   torch.randn(64, 2), "mse"),
}


def _model(spec: specs.LayerSpec, x: torch.Tensor, y: torch.Tensor, loss: str, batchsize: int) -> training.Model:
    module = specs.build_module(spec)
    model = training.create_model(module, losses.create_loss(loss), optimizers.create_optimizer("sgd", module, (0.1,)))
    training.set_data(model, "train", x, y, torch.device("cpu"))
    training.set_options(model, "train", [("batchsize", batchsize)])
    return model


@pytest.mark.parametrize("name", PASSES)
def test_a_training_batch_allocates_on_the_cpu_what_its_pass_on_meta_says(name: str) -> None:
    """The bytes reserved for one batch's forward, loss and backward are at least what the same batch
    really allocates on the CPU at its widest (live storages, counted the same way), gradients left out,
    and at most one output more (the margin for a device kernel's own temporaries)."""
    spec, x, y, loss = PASSES[name]
    batchsize = x.shape[0] // 2
    model = _model(spec, x, y, loss, batchsize)
    reserved = footprint.batch_pass_bytes(model)

    real = copy.deepcopy(model.module).train()
    meter = footprint._PeakBytes()
    with meter:
        output = real(x[:batchsize])
        torch.autograd.backward(model.loss(output, training.batch_targets(model, y[:batchsize])))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in real.parameters() if p.grad is not None)
    out = output.numel() * output.element_size()
    assert grads > 0
    assert meter.peak - grads <= reserved["cpu"] <= meter.peak - grads + out
    assert meter.peak - grads > 2 * out  # the activations saved for backward, beyond the output and the loss
    assert all(p.grad is None for p in model.module.parameters())  # the pass on meta touched nothing real


def test_the_meter_counts_storages_ops_make_not_views_of_their_inputs() -> None:
    """A view (a linear's `weight.t()`, a batch sliced from the data) or an in-place op makes no memory;
    counting their storages counted a whole weight, or the whole data set, for each view."""
    data, weight = torch.randn(100, 10), torch.randn(10, 10)
    meter = footprint._PeakBytes()
    with meter:
        view, batch = weight.t(), data[:10]
        batch.mul_(1.0)
        assert meter.peak == 0
        made = view + 1
        assert meter.live == meter.peak == 400
        del made
        assert meter.live == 0
    assert meter.peak == 400


def test_a_batch_that_does_not_fit_the_module_reserves_nothing_for_its_pass() -> None:
    """The real pass then fails with torch's own message (the epoch's probe turns it into INVALID_ARGUMENT)."""
    spec, x, y, loss = PASSES["mlp"]
    model = _model(spec, torch.randn(48, 7), y, loss, 24)
    assert footprint.batch_pass_bytes(model) == {}


def test_the_pass_is_kept_per_batch_size_and_measured_afresh_for_a_new_one() -> None:
    spec, x, y, loss = PASSES["mlp"]
    model = _model(spec, x, y, loss, 8)
    small = footprint.batch_pass_bytes(model)
    training.set_options(model, "train", [("batchsize", 32)])
    large = footprint.batch_pass_bytes(model)
    assert large["cpu"] > 3 * small["cpu"]
    training.set_options(model, "train", [("batchsize", 8)])
    assert footprint.batch_pass_bytes(model) == small


# -- every allowlisted layer kind and loss, against the same pass on the CPU ----------------------------

ROWS = 7
"""An odd number of rows, so no kernel's even split hides a row."""

LAYERS = {
    "conv1d, maxpool1d": (_seq(("conv1d", (3, 8, 3)), ("relu", ()), ("maxpool1d", (2,)), ("flatten", ()),
                                ("linear", (8 * 7, 4))), (3, 16)),
    "conv2d, maxpool2d, adaptavg2d": (_seq(("conv2d", (1, 6, 3)), ("maxpool2d", (2,)), ("adaptavg2d", (3,)),
                                           ("flatten", ()), ("linear", (54, 4))), (1, 14, 14)),
    "conv3d, avgpool3d": (_seq(("conv3d", (2, 4, 3)), ("avgpool3d", (2,)), ("flatten", ()), ("linear", (32, 4))),
                          (2, 6, 6, 6)),
    "convtranspose1d": (_seq(("convtranspose1d", (3, 4, 3)), ("flatten", ()), ("linear", (40, 4))), (3, 8)),
    "convtranspose2d": (_seq(("convtranspose2d", (3, 4, 3, 2)), ("flatten", ()), ("linear", (4 * 11 * 11, 4))),
                        (3, 5, 5)),
    "convtranspose3d": (_seq(("convtranspose3d", (2, 3, 2)), ("flatten", ()), ("linear", (3 * 125, 4))), (2, 4, 4, 4)),
    "avgpool1d, adaptavg1d": (_seq(("avgpool1d", (2,)), ("adaptavg1d", (4,)), ("flatten", ()), ("linear", (12, 4))),
                              (3, 10)),
    "maxpool3d, adaptavg3d": (_seq(("maxpool3d", (2,)), ("adaptavg3d", (2,)), ("flatten", ()), ("linear", (16, 4))),
                              (2, 5, 5, 5)),
    "batchnorm1d": (_seq(("linear", (10, 32)), ("batchnorm1d", (32,)), ("linear", (32, 4))), (10,)),
    "batchnorm2d": (_seq(("conv2d", (1, 6, 3)), ("batchnorm2d", (6,)), ("flatten", ()), ("linear", (216, 4))),
                    (1, 8, 8)),
    "batchnorm3d": (_seq(("batchnorm3d", (2,)), ("flatten", ()), ("linear", (54, 4))), (2, 3, 3, 3)),
    "instancenorm1d": (_seq(("instancenorm1d", (3,)), ("flatten", ()), ("linear", (30, 4))), (3, 10)),
    "instancenorm2d, affine, tracked": (_seq(("instancenorm2d", (3, 1e-5, 0.1, True, True)), ("flatten", ()),
                                              ("linear", (48, 4))), (3, 4, 4)),
    "instancenorm3d": (_seq(("instancenorm3d", (2,)), ("flatten", ()), ("linear", (54, 4))), (2, 3, 3, 3)),
    "groupnorm": (_seq(("conv2d", (1, 6, 3)), ("groupnorm", (3, 6)), ("flatten", ()), ("linear", (216, 4))),
                  (1, 8, 8)),
    "layernorm, silu": (_seq(("linear", (10, 16)), ("layernorm", (16,)), ("silu", ()), ("linear", (16, 4))), (10,)),
    "embed with maxnorm": (_seq(("embed", (50, 16, None, 1.0)), ("flatten", ()), ("linear", (96, 4))), (6,)),
    "drop, gelu": (_seq(("linear", (10, 32)), ("drop", (0.5,)), ("gelu", ("tanh",)), ("linear", (32, 4))), (10,)),
    "in-place drop and leakyrelu": (_seq(("linear", (10, 32)), ("drop", (0.5, True)), ("leakyrelu", (0.1, True)),
                                          ("linear", (32, 4))), (10,)),
    "tanh, softmax": (_seq(("linear", (10, 32)), ("tanh", ()), ("linear", (32, 4)), ("softmax", (1,))), (10,)),
    "sigmoid, logsoftmax": (_seq(("linear", (10, 32)), ("sigmoid", ()), ("linear", (32, 4)), ("logsoftmax", (1,))),
                            (10,)),
    "reshape, flatten, identity": (_seq(("linear", (10, 32)), ("reshape", ((-1, 2, 16),)), ("flatten", ()),
                                         ("identity", ()), ("linear", (32, 4))), (10,)),
}
"""Every allowlisted layer kind (bilinear aside: it takes two inputs, which no pass here gives it), each
ending in 4 outputs."""

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _inputs(name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
    shape = LAYERS[name][1]
    if name.startswith("embed"):
        return torch.arange(rows * shape[0]).reshape(rows, *shape) % 50
    return torch.randn(rows, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _slack(real: int, out: int) -> int:
    """The most a reservation may exceed what the CPU allocates: one output (the margin for a device
    kernel's temporaries), and as much again, for meta's batch and instance norm (in eval mode, or
    bfloat16), which make per-channel statistics (in float32) that the CPU's kernels skip there: a
    bfloat16 batchnorm1d of one row in eval mode reserves twice what it allocates."""
    return out + real


@pytest.mark.parametrize("name", LAYERS)
def test_a_forward_reserves_at_least_what_it_allocates_on_the_cpu(name: str) -> None:
    """For every layer kind, dtype, mode (with gradients and without, train and eval flags) and batch
    of one or an odd number of rows: what RunForward reserves (its output and input copy,
    `forward_bytes`, and its pass at its widest, `pass_bytes`) is at least what `training.forward`
    allocates on the CPU, counted the same way, and not much more. Sized without gradients, a
    forward with them allocated twice what it reserved (found by review)."""
    checked = 0
    for dtype in DTYPES:
        module = specs.build_module(LAYERS[name][0]).to(dtype)
        for mode in training.FORWARD_MODES:
            train, grad = training.forward_flags(mode)
            for rows in (1, ROWS):
                x = _inputs(name, rows, dtype)
                reserved = footprint.forward_bytes(module, x, train).get("cpu", 0)
                reserved += footprint.pass_bytes(module, x, train, grad).get("cpu", 0)
                meter = footprint._PeakBytes()
                try:
                    with meter:
                        output = training.forward(module, x, mode)
                except (InvalidArgument, NotImplementedError):  # batchnorm on one row, bfloat16 conv3d
                    continue
                out = output.numel() * output.element_size()
                assert meter.peak <= reserved <= meter.peak + _slack(meter.peak, out), (dtype, mode, rows)
                checked += 1
    assert checked >= 6


TRAINED = {
    **{f"{name}, ce": (name, "ce") for name in LAYERS},
    "sigmoid, logsoftmax, nll": ("sigmoid, logsoftmax", "nll"),
    "tanh, softmax, bce": ("tanh, softmax", "bce"),
    **{f"{name}, {loss}": (name, loss) for name in ("batchnorm2d", "layernorm, silu") for loss in
       ("mse", "bcelogits", "smoothl1")},
}
"""Every layer kind under the ce loss, and every other loss."""


def _labels(loss: str, rows: int) -> torch.Tensor:
    if loss in ("ce", "nll"):
        return _targets(rows, 4)
    if loss in ("bce", "bcelogits"):
        return (torch.arange(rows * 4).reshape(rows, 4) % 3 == 0).float()
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", TRAINED)
def test_every_layer_kind_and_loss_reserves_at_least_what_a_cpu_training_batch_allocates(case: str) -> None:
    """`batch_pass_bytes` against one batch's forward, loss and backward on the CPU, counted the same
    way, gradients left out: float32, float64 and bfloat16 modules, batches of one and an odd number."""
    name, loss = TRAINED[case]
    checked = 0
    for dtype in DTYPES:
        for rows in (1, ROWS):
            x = _inputs(name, 2 * rows, dtype)
            module = specs.build_module(LAYERS[name][0]).to(dtype)
            model = training.create_model(module, losses.create_loss(loss), optimizers.create_optimizer("sgd", module, (0.1,)))
            training.set_data(model, "train", x, _labels(loss, 2 * rows), torch.device("cpu"))
            training.set_options(model, "train", [("batchsize", rows)])
            reserved = footprint.batch_pass_bytes(model).get("cpu", 0)
            real = copy.deepcopy(model.module).train()
            xb, yb = model.train_data.x[:rows], model.train_data.y[:rows]  # type: ignore[union-attr]
            if training.writes_inputs(real):
                xb = xb.clone()  # the epoch's copy of a batch, reserved apart (`batch_copy_bytes`)
            meter = footprint._PeakBytes()
            try:
                with meter:
                    output = real(xb)
                    torch.autograd.backward(model.loss(output, training.batch_targets(model, yb)))
            except (ValueError, RuntimeError, NotImplementedError):  # batchnorm on one row, bfloat16 conv3d
                assert not reserved or dtype == torch.bfloat16
                continue
            grads = sum(p.grad.numel() * p.grad.element_size() for p in real.parameters() if p.grad is not None)
            out = output.numel() * output.element_size()
            assert meter.peak - grads <= reserved <= meter.peak - grads + _slack(meter.peak - grads, out), (dtype, rows)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize(("loss", "metrics"), [
    ("mse", "loss,batchloss"), ("smoothl1", "loss,batchloss"), ("ce", "loss,batchloss"), ("ce", "accuracy"),
    ("ce", "loss,batchloss,accuracy,matches"), ("ce", "predict"), ("ce", "output"), ("mse", "batchloss"),
])
@pytest.mark.parametrize("batches", [3, 200])
def test_an_epoch_allocates_no_more_than_it_reserves_over_several_batches(loss: str, metrics: str, batches: int) -> None:
    """torch's CPU mse and smoothl1 losses return their mean as a view into the unreduced loss, an
    output-sized buffer: the metrics kept each batch's loss as it was, so every batch held an output's
    bytes until the epoch ended, unreserved (found by review: 400 KB over the reservation here, 400 MB
    for 2,000 such batches). Kept as a scalar of its own, the epoch stays within what it reserved.
    Those per-batch scalars, every batch's loss (asked for or not) and its count of matches, and
    their stacks at the end, were not reserved either: 2,840 bytes over the reservation for 100
    batches with accuracy (found by review; `footprint.scalar_metrics_bytes`)."""
    rows, classes = (100, 500) if batches < 10 else (4, 3)
    module = specs.build_module(_seq(("linear", (20, classes))))
    model = training.create_model(module, losses.create_loss(loss), optimizers.create_optimizer("sgd", module, (0.1,)))
    y = _targets(rows * batches, classes) if loss == "ce" else torch.rand(rows * batches, classes)
    training.set_data(model, "train", torch.randn(rows * batches, 20), y, torch.device("cpu"))
    training.set_options(model, "train", [("batchsize", rows), ("metrics", metrics)])
    reserved = footprint.add_bytes(footprint.epoch_bytes(model), footprint.metrics_bytes(model, "train"))["cpu"]
    meter = footprint._PeakBytes()
    with meter:
        training.run_epoch(model)
    assert meter.peak <= reserved


@pytest.mark.parametrize(("loss", "metrics"), [("ce", "loss"), ("ce", "loss,accuracy"), ("mse", "batchloss"),
                                               ("smoothl1", "loss"), ("bcelogits", "loss"), ("ce", "accuracy"),
                                               ("ce", "loss,batchloss,accuracy,matches"), ("ce", "predict")])
@pytest.mark.parametrize("batches", [3, 200])
def test_a_test_allocates_no_more_than_it_reserves(loss: str, metrics: str, batches: int) -> None:
    """A test reserved one batch's pass alone, but its loss makes an output-sized tensor beside the
    output (ce's log_softmax, the CPU's unreduced mse), and each batch's output lived on while the next
    batch's pass ran: a test of three batches allocated twice what it reserved (found by review). Now
    each batch's output is dropped before the next pass, and the loss's output and the per-batch scalars
    are reserved (`testing_pass_bytes`, `scalar_metrics_bytes`); over many batches the scalars are the
    most of it, and their reservation is what they hold at their widest, to the byte: beyond it, the
    reservation holds no more than one batch's pass (the two are summed, though they come one after
    the other), 16 bytes (`scalar_metrics_bytes`) and, with predict, the counts' stack, freed before
    the predictions are joined."""
    rows, classes = (100, 50) if batches < 10 else (4, 3)
    module = specs.build_module(_seq(("linear", (20, classes))))
    model = training.create_model(module, losses.create_loss(loss), optimizers.create_optimizer("sgd", module, (0.1,)))
    y = _targets(rows * batches, classes) if loss == "ce" else torch.rand(rows * batches, classes)
    training.set_data(model, "test", torch.randn(rows * batches, 20), y, torch.device("cpu"))
    training.set_options(model, "test", [("batchsize", rows), ("metrics", metrics)])
    reserved = footprint.add_bytes(footprint.metrics_bytes(model, "test"), footprint.testing_pass_bytes(model))["cpu"]
    meter = footprint._PeakBytes()
    with meter:
        training.test_epoch(model)
    joined_after_the_counts = batches * 8 + 8 if "predict" in metrics else 0  # their stack and sum, gone by then
    one_pass = footprint.data_pass_bytes(model, "test")["cpu"] + rows * classes * 4  # and its loss's output
    scoring = footprint.scoring_bytes(model, "test").get("cpu", 0)  # a batch's predictions and hits, one at a time
    assert meter.peak <= reserved <= meter.peak + one_pass + 16 + joined_after_the_counts + scoring


@pytest.mark.parametrize("spec", [
    _seq(("linear", (200, 300)), ("batchnorm1d", (300,)), ("linear", (300, 10))),
    _seq(("embed", (500, 64)), ("linear", (64, 8))),
], ids=["mlp with batchnorm", "embedding"])
def test_building_a_module_allocates_no_more_than_it_reserves(spec: specs.LayerSpec) -> None:
    """A module is built flat: each layer makes its parameter in a storage of its own, which
    `flat.building` then copies into the module's buffer, so the largest parameter lives twice for a
    moment. Only the module's own bytes were reserved: a 200 x 300 weight's 240 KB went unreserved
    (found by review)."""
    reserved = footprint.module_bytes(spec, torch.device("cpu"), 32)["cpu"]
    meter = CpuPeak()
    with meter:
        module = flat.build_flat(lambda: specs.build_module(spec, max_depth=32))
    held = sum(t.numel() * t.element_size() for t in tensors.module_tensors(module))
    largest = max(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    assert meter.peak <= reserved <= meter.peak + buffers and reserved == held + largest


def test_a_parameter_frozen_or_thawed_is_sized_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a parameter takes a gradient changes what a training batch's pass saves for backward;
    the kept pass is keyed on it (the key lacked it until a review noted it)."""
    spec, x, y, loss = PASSES["mlp"]
    model = _model(spec, x, y, loss, 8)
    thawed = footprint.batch_pass_bytes(model)
    for p in model.module.parameters():
        p.requires_grad_(False)
    frozen = footprint.batch_pass_bytes(model)
    monkeypatch.setattr(footprint, "_BATCH_PASSES", type(footprint._BATCH_PASSES)())  # measured with nothing kept
    assert frozen == footprint.batch_pass_bytes(model) and frozen != thawed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("name", "options"), [
    ("sgd", ()), ("sgd", (("momentum", 0.9), ("nesterov", True), ("decay", 0.01))),
    ("adam", ()), ("adam", (("amsgrad", True), ("decay", 0.1))), ("adamw", ()),
    ("rmsprop", (("centered", True), ("momentum", 0.5), ("decay", 0.1))), ("adagrad", (("decay", 0.1),)),
    ("fedadam", (("tau", 1e-3),)), ("fedyogi", ()), ("fedadagrad", (("tau", 1e-3),)),
])
def test_an_optimizer_step_allocates_no_more_than_it_reserves(
    name: str, options: tuple[tuple[str, float | bool], ...], dtype: torch.dtype
) -> None:
    """A step's temporaries were not reserved: Adam's square root of its second moment and that
    divided by the bias correction, a weight decay's gradient plus decayed weights, a parameter's
    size each (an Adam step over a [40, 30] layer allocated 9,600 bytes beyond its state; found by
    review). Every step reserves its first step's state and its widest temporaries: the first at
    most the state it leaves over (its state is made parameter by parameter), the later ones exactly."""
    module = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 5)).to(dtype)
    optimizer = optimizers.create_optimizer(name, module, (0.01,), options)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    for step in range(3):
        reserved = footprint.step_bytes(optimizer).get("cpu", 0)
        meter = footprint._PeakBytes()
        with meter:
            optimizer.optim.step()
        assert meter.peak <= reserved <= meter.peak + meter.live, (step, reserved, meter.peak, meter.live)
        if step:
            assert reserved == meter.peak


def test_an_epoch_with_adam_reserves_its_steps_temporaries() -> None:
    """The epoch reserves each step's widest temporaries with the first step's state (`step_bytes`)."""
    module = specs.build_module(_seq(("linear", (20, 50)), ("relu", ()), ("linear", (50, 3))))
    model = training.create_model(
        module, losses.create_loss("ce"), optimizers.create_optimizer("adam", module, (0.01,), (("decay", 0.1),))
    )
    training.set_data(model, "train", torch.randn(60, 20), _targets(60, 3), torch.device("cpu"))
    training.set_options(model, "train", [("batchsize", 20), ("metrics", "loss")])
    for _ in range(2):  # the first epoch makes the state, the second only its steps' temporaries
        reserved = footprint.add_bytes(footprint.epoch_bytes(model), footprint.metrics_bytes(model, "train"))["cpu"]
        meter = footprint._PeakBytes()
        with meter:
            training.run_epoch(model)
        assert meter.peak <= reserved


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize(("loss", "classes", "metrics"), [
    ("mse", 1, "accuracy"), ("mse", 2, "loss,accuracy"), ("bcelogits", 1, "matches"), ("smoothl1", 3, "accuracy"),
    ("ce", 3, "accuracy,predict"), ("nll", 1, "accuracy"),
])
def test_scoring_a_batch_allocates_no_more_than_it_reserves(split: str, loss: str, classes: int, metrics: str) -> None:
    """Each batch's predictions, the targets' argmax and the hits, int64 and bool tensors as large as
    the predictions, freed before the next batch, were not reserved: over single-column outputs they
    are twice the float32 output, and a test with accuracy allocated 1,260 bytes over its reservation
    for batches of 100, an epoch 248 (found by review; `footprint.scoring_bytes`)."""
    rows, batches = 100, 3
    module = specs.build_module(_seq(("linear", (20, classes))))
    model = training.create_model(module, losses.create_loss(loss), optimizers.create_optimizer("sgd", module, (0.1,)))
    torch.manual_seed(0)
    y = _targets(rows * batches, classes) if loss in ("ce", "nll") else torch.rand(rows * batches, classes).round()
    training.set_data(model, split, torch.randn(rows * batches, 20), y, torch.device("cpu"))
    training.set_options(model, split, [("batchsize", rows), ("metrics", metrics)])
    run, need = (training.run_epoch, footprint.epoch_bytes) if split == "train" else (
        training.test_epoch, footprint.testing_pass_bytes)
    reserved = footprint.add_bytes(need(model), footprint.metrics_bytes(model, split))["cpu"]
    meter = footprint._PeakBytes()
    with meter:
        run(model)
    assert meter.peak <= reserved


def test_a_step_that_fails_on_meta_reserves_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's step failing on meta must not fail the call (the real step decides): its temporaries
    are reserved at `STEP_TEMPORARIES_BOUND` times the trainable parameters' bytes."""
    module = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 5))
    optimizer = optimizers.create_optimizer("adam", module, (0.01,))

    def fails(self: torch.optim.Optimizer, closure: object = None) -> None:
        raise RuntimeError("not on meta")

    monkeypatch.setattr(torch.optim.Adam, "step", fails)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    assert footprint.step_temporaries(optimizer) == {"cpu": footprint.STEP_TEMPORARIES_BOUND * params}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "options"), [
    ("sgd", (("momentum", 0.9), ("nesterov", True), ("decay", 0.01))), ("adam", (("amsgrad", True), ("decay", 0.1))),
    ("adamw", ()), ("rmsprop", (("centered", True), ("momentum", 0.5))), ("adagrad", (("decay", 0.1),)),
    ("fedyogi", ()),
])
def test_on_cuda_an_optimizer_step_allocates_no_more_than_it_reserves(
    name: str, options: tuple[tuple[str, float | bool], ...]
) -> None:
    """On CUDA torch steps with its multi-tensor kernels, whose temporaries span every parameter at
    once (Adam's roots of all its second moments): `step_temporaries` measures them on a twin that
    takes the same path. Checked against the caching allocator's peak (64 KiB for its rounding)."""
    module = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 10)).cuda()
    optimizer = optimizers.create_optimizer(name, module, (0.01,), options)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    for step in range(3):
        reserved = footprint.step_bytes(optimizer).get("cuda:0", 0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        optimizer.optim.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        assert peak <= reserved + (64 << 10), (step, peak, reserved)
