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


# -- host copies for replies, in reused blocks (domain/hostcache.py) ----------------------------------


def _mixed() -> list[tuple[str, torch.Tensor]]:
    """Every element size, a non-contiguous view, a scalar and an empty tensor: over MIN_BYTES in all."""
    g = torch.Generator().manual_seed(0)
    return [
        ("i8", torch.randint(-100, 100, (3,), dtype=torch.int8, generator=g)),
        ("f32", torch.randn(512, 513, generator=g)),
        ("bool", torch.tensor([True, False, True])),
        ("c128", torch.randn(5, dtype=torch.complex128, generator=g)),
        ("bf16", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("t", torch.randn(300, 200, dtype=torch.float64, generator=g).t()),
        ("scalar", torch.tensor(2.5, dtype=torch.float16)),
        ("empty", torch.zeros(0, 4)),
    ]


def test_host_copies_into_one_reused_block_are_the_tensors_bit_for_bit() -> None:
    from weightavg_server.domain import hostcache
    from weightavg_server.domain.tensors import host_copies

    named = _mixed()
    cache = hostcache.cache()
    cache.clear()
    with hostcache.lending() as lend:
        copies = host_copies(named, lend)
        assert [n for n, _ in copies] == [n for n, _ in named]
        for (_, got), (_, want) in zip(copies, named):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
            assert got.is_contiguous() and (got.data_ptr() != want.data_ptr() or not got.numel())
        blocks = {got.untyped_storage().data_ptr() for _, got in copies if got.numel()}
        assert len(blocks) == 1  # one block, packed with no padding
        first = next(iter(blocks))
    del copies, got
    assert cache.stats().idle_bytes == sum(t.numel() * t.element_size() for _, t in named)  # kept when they went
    with hostcache.lending() as lend:  # the next reply of that size gets the same memory
        again = host_copies(named, lend)
        assert {got.untyped_storage().data_ptr() for _, got in again if got.numel()} == {first}
    small = [("x", torch.arange(4.0))]  # under MIN_BYTES: a plain copy
    with hostcache.lending() as lend:
        (_, x), = host_copies(small, lend)
        assert torch.equal(x, small[0][1]) and x.untyped_storage().data_ptr() != first
    cache.clear()


def test_host_copies_stream_the_large_contiguous_tensors_and_copy_the_rest(streamed_copies: list[int]) -> None:
    """A reply's block is read only as the reply streams, so its large contiguous copies go with
    streaming stores on the threads (`native.stream_copies`); a strided, conjugated or small tensor
    takes torch's copy. Every copy equals its tensor."""
    from weightavg_server.domain import hostcache, native
    from weightavg_server.domain.tensors import host_copies

    g = torch.Generator().manual_seed(1)
    big = native.STREAM_MIN_BYTES
    named = [*_mixed(), ("conj", torch.randn(big // 8 + 1, dtype=torch.complex64, generator=g).conj()),
             ("wide", torch.randn(3, big // 4, generator=g)), ("strided", torch.randn(1024, 300, generator=g).t())]
    with hostcache.lending() as lend:
        copies = host_copies(named, lend)
        assert sorted(streamed_copies) == sorted(t.numel() * t.element_size() for n, t in named if n in ("f32", "wide"))
        assert all(torch.equal(got.resolve_conj(), want.resolve_conj()) for (_, got), (_, want) in zip(copies, named))
