"""Moves of a module's group (domain/moves.py) in process: what `move_bytes` promises is what the
move allocates, and what stays in place is neither copied nor counted."""

from __future__ import annotations

import pytest
import torch

from weightavg_server.domain import averaging, flat, losses, moves, optimizers, specs, training
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.domain.errors import InvalidArgument
from weightavg_server.domain.tensors import TensorHolder, tensors_of

CPU = torch.device("cpu")
NET = LayerSpec("sequential", children=(
    LayerSpec("linear", "a", (3, 8)), LayerSpec("batchnorm1d", "b", (8,)), LayerSpec("linear", "d", (8, 2)),
))


def trained(kind: str) -> training.Model:
    """A model with train and test data, its optimizer's state made by one epoch."""
    torch.manual_seed(0)
    module = specs.build_module(NET)
    model = training.create_model(module, losses.create_loss("ce"), optimizers.create_optimizer(kind, module, (0.01,)))
    x = torch.randn(40, 3)
    training.set_options(model, "train", [("batchsize", 8)])
    training.set_data(model, "train", x, (x[:, 0] > 0).long(), CPU)
    training.set_data(model, "test", x[:16], (x[:16, 0] > 0).long(), CPU)
    training.run_epoch(model)
    return model


def _storages(model: training.Model) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_of(model)}


@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop", "adagrad", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32])
def test_move_bytes_is_what_the_move_allocates(kind: str, dtype: torch.dtype) -> None:
    model = trained(kind)
    g = moves.group(model, ())
    promised = moves.move_bytes(model, None, dtype, g)
    before = _storages(model)
    old = list(tensors_of(model))  # kept alive, so no new storage lands at a freed address
    moves.move(model, None, dtype, g)
    new = {ptr: n for ptr, n in _storages(model).items() if ptr not in before}
    assert promised.get("cpu", 0) == sum(new.values())
    assert old  # the old tensors lived through the comparison
    if dtype == torch.float32:
        assert promised == {}  # nothing changes place: nothing copied, nothing counted


def test_labels_and_step_counts_stay_as_they_are() -> None:
    model = trained("adam")
    assert model.train_data is not None
    labels, steps = model.train_data.y, [s["step"] for s in model.optimizer.optim.state.values()]
    label_storage = labels.untyped_storage().data_ptr()
    moves.move(model, None, torch.float64)
    assert model.train_data.y is labels and labels.untyped_storage().data_ptr() == label_storage
    assert [s["step"] for s in model.optimizer.optim.state.values()] == steps  # same objects, float32 on the host
    assert all(s["exp_avg"].dtype == torch.float64 for s in model.optimizer.optim.state.values())
    assert model.train_data.x.dtype == torch.float64 and model.test_data is not None
    assert model.test_data.x.dtype == torch.float64 and model.test_data.y.dtype == torch.int64


def test_a_move_that_changes_nothing_keeps_the_averaging_plans_and_one_that_does_ends_them() -> None:
    """A plan is ended by any module's data swapped anywhere (`flat.swaps`), since a freed storage's
    address may come back. A move to where a module already is swaps nothing, yet it ended every
    plan on the server: the service moves each new module to its device, so every create_module on
    a CPU server made every next average walk and check its pairs again."""
    source = flat.build_flat(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    d = averaging.copy_parameters(source)
    first = averaging.prepare_average(source, d)
    other = torch.nn.Linear(2, 2)
    moves.move(other, torch.device("cpu"), None)
    moves.move(source, torch.device("cpu"), torch.float32)
    assert averaging.prepare_average(source, d).runs is first.runs  # the plan, reused
    moves.move(other, None, torch.float64)
    again = averaging.prepare_average(source, d)
    assert again.runs is not first.runs and again.runs == first.runs  # planned afresh, the same pairing


def test_a_move_that_would_drop_imaginary_parts_or_round_integers_is_refused_before_it_counts() -> None:
    """move_bytes (asked first, for the caps) and move both refuse, and nothing is replaced."""
    module = torch.nn.Linear(2, 2)
    module.register_parameter("z", torch.nn.Parameter(torch.tensor([1 + 2j], dtype=torch.complex64)))
    before = module.z
    for call in (moves.move_bytes, moves.move):
        with pytest.raises(InvalidArgument, match="imaginary"):
            call(module, None, torch.float64)
    assert module.z is before and module.z.dtype == torch.complex64 and module.weight.dtype == torch.float32
    holder = TensorHolder(torch.tensor([2**24 + 1], dtype=torch.int32))
    for call in (moves.move_bytes, moves.move):
        with pytest.raises(InvalidArgument, match="cannot hold"):
            call(holder, None, torch.float32)
    assert holder.tensor.dtype == torch.int32
    assert moves.move_bytes(holder, None, torch.float64) == {"cpu": 8}
