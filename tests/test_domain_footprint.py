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

from weightavg_server.domain import footprint, losses, optimizers, specs, training


def _fresh(module: nn.Module, x: torch.Tensor, train: bool = True) -> tuple[tuple[int, ...], torch.dtype] | None:
    output = footprint._meta_pass(module, x, train)
    return None if output is None else (tuple(output.shape), output.dtype)


def _kept(module: nn.Module, x: torch.Tensor, train: bool = True) -> tuple[tuple[int, ...], torch.dtype] | None:
    output = footprint._meta_output(module, x, train)
    return None if output is None else (tuple(output.shape), output.dtype)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("rows", [2, 5, 100])
def test_a_kept_pass_answers_what_a_fresh_one_does(rows: int) -> None:
    module, x = _mlp(), torch.randn(rows, 12)
    first = footprint.forward_bytes(module, x, True)
    assert first == {"cpu": rows * 3 * 4}
    assert footprint.forward_bytes(module, x, True) == first  # from the kept pass
    assert _kept(module, x) == _fresh(module, x) == ((rows, 3), torch.float32)


def test_each_input_shape_and_dtype_has_its_own_pass() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Identity())
    assert footprint.forward_bytes(module, torch.zeros(2, 3, 4), True) == {"cpu": 2 * 12 * 4}
    assert footprint.forward_bytes(module, torch.zeros(2, 3, 5), True) == {"cpu": 2 * 15 * 4}
    assert footprint.forward_bytes(module, torch.zeros(2, 3, 4, dtype=torch.float64), True) == {"cpu": 2 * 12 * 8}


def test_a_module_moved_to_another_dtype_is_sized_afresh() -> None:
    module, x = _mlp(), torch.randn(4, 12)
    assert footprint.forward_bytes(module, x, True) == {"cpu": 4 * 3 * 4}
    module.to(torch.float64)
    assert _kept(module, x) == _fresh(module, x)  # the same float32 input, answered afresh
    assert footprint.forward_bytes(module, x.double(), True) == {"cpu": 4 * 3 * 8}
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
    assert footprint.forward_bytes(module, x, False) == {"cpu": 1 * 3 * 4}
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
