"""The forward's sizing pass on meta tensors, and the passes it keeps (`footprint._MetaOutputs`).

A kept pass must answer exactly what a fresh one would, and a module changed in any way the pass
reads (dtype, a tensor's shape, an option) must be looked up afresh: a stale answer would reserve
the wrong bytes before a real forward allocates them.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from weightavg_server.domain import footprint


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
    assert module in footprint._MetaOutputs._seen
    gone = weakref.ref(module)
    del module
    gc.collect()
    assert gone() is None  # nothing kept it alive


def test_a_module_keeps_its_last_inputs_only() -> None:
    module = nn.Sequential(nn.Identity())
    for rows in range(1, footprint._MetaOutputs.ENTRIES + 5):
        footprint.forward_bytes(module, torch.zeros(rows), True)
    assert len(footprint._MetaOutputs._seen[module]) == footprint._MetaOutputs.ENTRIES


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
