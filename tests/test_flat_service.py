"""Flat layouts through the service: modules are created flat, copies and moves stay flat, the
fused path gives the per-tensor answer, and the store's charges stay exact (the ledger equals a
walk of every live object's distinct storages after each step)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from inprocess import upload, walked_bytes
from weightavg_server.domain import flat
from weightavg_server.domain.averaging import BufferMode
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Service, Settings
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Kind, Registry

F32 = 4
NET = LayerSpec("sequential", children=(
    LayerSpec("linear", args=(6, 5)), LayerSpec("batchnorm1d", args=(5,)), LayerSpec("linear", args=(5, 3)),
))
PARAMS = (6 * 5 + 5 + 5 + 5 + 5 * 3 + 3) * F32
"""Bytes of NET's parameters (two linears with biases, the batchnorm's weight and bias)."""


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service(Registry(Limits(max_device_bytes=10**9)), Settings(
        device=torch.device("cpu"), max_spec_depth=32, session_lease_seconds=60.0, max_session_lease_seconds=86400.0
    ))
    yield s
    assert s.store.held_bytes() == walked_bytes(s.store)


def exact(s: Service) -> int:
    held = s.store.held_bytes()
    assert held == walked_bytes(s.store)
    return held.get("cpu", 0)


def module_of(s: Service, handle: str) -> torch.nn.Module:
    obj = s.store.get(handle, Kind.MODULE).obj
    assert isinstance(obj, torch.nn.Module)
    return obj


def test_a_created_module_and_its_copy_are_flat_and_average_as_one_kernel_each(service: Service) -> None:
    m = service.create_module(NET).id
    module = module_of(service, m)
    assert flat.is_flat(list(module.parameters()))
    d = service.copy_parameters(m).id
    entries = service.store.get(d, Kind.DICTIONARY).obj.entries
    assert flat.is_flat(list(entries.values()))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    expected = {n: t.clone().lerp_(p.detach(), 0.5) for (n, t), p in zip(entries.items(), module.parameters())}
    assert service.average_parameters(m, d) == 2
    for name, value in expected.items():
        assert torch.equal(entries[name], value)


def test_charges_stay_exact_through_moves_new_parameters_deletions_and_frees(service: Service) -> None:
    m = service.create_module(NET).id
    buffers = 2 * 5 * F32 + 8  # running mean and variance (float32), num_batches_tracked (int64)
    assert exact(service) == PARAMS + buffers
    d = service.copy_parameters(m, buffers=True).id
    assert exact(service) == 2 * (PARAMS + buffers)
    service.move(m, "", torch.float64)
    assert flat.is_flat(list(module_of(service, m).parameters()))
    assert exact(service) == 2 * PARAMS + 2 * 5 * 8 + 8 + PARAMS + buffers  # the module in float64
    service.average_parameters(m, d, BufferMode.AVERAGE)  # float64 into float32, and the new count
    service.set_parameter(m, "extra", upload(("v", torch.ones(4))))
    service.update_dictionary(d, upload(("extra", torch.zeros(4))))
    service.average_parameters(m, d)
    entries = service.store.get(d, Kind.DICTIONARY).obj.entries
    torch.testing.assert_close(entries["extra"], torch.full((4,), 1 / 3))
    exact(service)
    # deleting entries of the flat copy frees nothing while one of its views lives
    before = exact(service)
    service.delete_entries(d, ["0.weight", "0.bias", "1.weight", "1.bias"])
    assert exact(service) == before
    service.free([m], False)
    exact(service)
    service.free([d], False)
    assert exact(service) == 0


def test_a_live_view_of_a_child_is_charged_the_module_buffer_it_keeps_alive(service: Service) -> None:
    m = service.create_module(NET).id
    view = service.view_parameters(m, "2").id
    service.free([m], False)
    # the view holds two slices of the module's one parameter buffer: all of it stays allocated
    assert exact(service) == PARAMS
    service.free([view], False)
    assert exact(service) == 0
