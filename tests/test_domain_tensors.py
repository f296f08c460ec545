"""device_name: the storage walk's cheap stand-in for str(t.device) must name every device alike."""

from __future__ import annotations

import pytest
import torch

from weightavg_server.domain.tensors import device_name, storage_key


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_device_name_is_str_of_the_device(device: str) -> None:
    for t in (torch.zeros(3, device=device), torch.zeros(2, 3, device=device).t(), torch.zeros((), device=device)):
        assert device_name(t) == str(t.device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_name_names_each_gpu_by_its_index() -> None:
    for index in range(torch.cuda.device_count()):
        t = torch.zeros(3, device=f"cuda:{index}")
        assert device_name(t) == str(t.device) == f"cuda:{index}"
        assert device_name(t[1:]) == f"cuda:{index}"
    assert device_name(torch.zeros(1)) == "cpu"  # after a GPU's name was cached


def test_a_storage_key_names_the_device_the_allocation_and_its_size() -> None:
    t = torch.zeros(4, dtype=torch.float64)
    assert storage_key(t[2:]) == ("cpu", t.untyped_storage().data_ptr(), 32) == storage_key(t)
