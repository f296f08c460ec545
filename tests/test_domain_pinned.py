"""Pinned staging buffers (domain/pinned.py): the rule that bounds torch's caching host allocator, and,
on a GPU, the copies that go through it; and page-locking memory in place (`lock`), which never
fails a caller."""

from __future__ import annotations

import contextlib

import pytest
import torch

from weightavg_server.domain import pinned
from weightavg_server.domain.tensors import host_copies

CUDA = torch.device("cuda", 0)
MB = 1 << 20


@pytest.mark.parametrize("nbytes, block", [(1, 1), (2, 2), (3, 4), (MB, MB), (MB + 1, 2 * MB), (3 * MB, 4 * MB)])
def test_blocks_are_rounded_up_to_a_power_of_two(nbytes: int, block: int) -> None:
    assert pinned.block_bytes(nbytes) == block


class Allocator:
    """torch's host allocator statistics as this test sets them, and whether its cache was emptied."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, held: int | None, active: int | None, can_empty: bool = True):
        self.held, self.active, self.emptied = held, active, 0
        monkeypatch.setattr(torch.cuda, "host_memory_stats", self.stats)
        monkeypatch.setattr(pinned, "_empty_idle_cache", self.empty if can_empty else lambda: False)

    def stats(self) -> dict[str, int]:
        return {k: v for k, v in (("allocated_bytes.current", self.held), ("active_bytes.current", self.active))
                if v is not None}

    def empty(self) -> bool:
        self.emptied += 1
        self.held = self.active
        return True


@pytest.mark.parametrize(
    "held, active, nbytes, room, emptied",
    [
        (0, 0, 3 * MB, True, 0),  # a 4 MB block in an empty cache
        (pinned.CACHE_BYTES - 4 * MB, 0, 3 * MB, True, 0),  # exactly fills the bound
        (pinned.CACHE_BYTES - 4 * MB, 0, 4 * MB + 1, True, 1),  # an 8 MB block: the idle cache is emptied first
        (pinned.CACHE_BYTES - 4 * MB, 4 * MB, 4 * MB + 1, False, 0),  # blocks in use: pageable, nothing emptied
        (0, 0, pinned.CACHE_BYTES + 1, False, 0),  # a block over the bound on its own
        (None, None, MB, False, 0),  # a torch without these statistics: no bound to keep, so no pinning
    ],
)
def test_the_cache_stays_within_its_bound(
    monkeypatch: pytest.MonkeyPatch, held: int | None, active: int | None, nbytes: int, room: bool, emptied: int
) -> None:
    allocator = Allocator(monkeypatch, held, active)
    assert pinned._room(nbytes) is room
    assert allocator.emptied == emptied


def test_a_bound_of_zero_stages_nothing_and_a_negative_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    Allocator(monkeypatch, 0, 0)
    monkeypatch.setattr(pinned, "_cache_bytes", pinned.CACHE_BYTES)  # restored after the test
    pinned.set_cache_bytes(0)
    assert pinned._room(1) is False and pinned._room(pinned.MIN_BYTES) is False
    pinned.set_cache_bytes(8 * MB)
    assert pinned._room(8 * MB) is True and pinned._room(8 * MB + 1) is False
    with pytest.raises(ValueError, match="--pinned-cache-bytes must be 0"):
        pinned.set_cache_bytes(-1)
    assert pinned._room(8 * MB) is True  # the refused value changed nothing


def test_a_full_idle_cache_that_cannot_be_emptied_gives_pageable_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    Allocator(monkeypatch, pinned.CACHE_BYTES, 0, can_empty=False)
    assert pinned._room(MB) is False


def test_small_buffers_and_host_tensors_never_ask_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> dict[str, int]:
        raise AssertionError("the pinned allocator was consulted")

    monkeypatch.setattr(torch.cuda, "host_memory_stats", refuse)
    small = pinned.empty((pinned.MIN_BYTES // 4 - 1,), torch.float32, CUDA)
    large = pinned.empty((MB,), torch.float32, torch.device("cpu"))
    assert not small.is_pinned() and not large.is_pinned()
    assert (small.dtype, small.shape, large.shape) == (torch.float32, (pinned.MIN_BYTES // 4 - 1,), (MB,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host that cannot pin: here torch's pinned allocator fails for real")
def test_a_staging_buffer_the_host_will_not_pin_is_pageable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator's statistics say there is room, and torch's pinned allocation then fails (here
    for want of CUDA, on a GPU server when cudaHostAlloc is refused): the fetch or upload staging
    through it failed INTERNAL; a pageable buffer gives the same bytes."""
    Allocator(monkeypatch, held=0, active=0)
    assert pinned._room(MB)
    with pytest.raises(RuntimeError):
        torch.empty((MB,), dtype=torch.float32, pin_memory=True)
    buffer = pinned.empty((MB,), torch.float32, CUDA)
    assert (buffer.device.type, buffer.shape, buffer.is_pinned()) == ("cpu", (MB,), False)


def test_host_copies_of_cpu_tensors_are_copies() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    (name, copy), = host_copies([("w", t)])
    assert name == "w" and torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_copies_go_through_pinned_blocks_and_equal_the_device_values() -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    named = [("big", torch.randn(1 << 20, device="cuda", generator=g)),
             ("strided", torch.randn(512, 1024, device="cuda", generator=g).t()),
             ("bf16", torch.randn(1 << 18, device="cuda", generator=g).to(torch.bfloat16)),
             ("small", torch.randn(4, device="cuda", generator=g))]
    copies = host_copies(named)
    assert [n for n, _ in copies] == [n for n, _ in named]
    for (_, t), (_, c) in zip(named, copies):
        assert c.device.type == "cpu" and c.is_contiguous() and c.dtype == t.dtype and torch.equal(c, t.cpu())
    assert [c.is_pinned() for _, c in copies] == [True, True, True, False]
    assert torch.cuda.host_memory_stats()["allocated_bytes.current"] <= pinned.CACHE_BYTES


def test_a_region_the_device_refuses_to_lock_stays_pageable_and_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """pinned.lock never raises: a driver that refuses, or a CUDA error on the way (a broken
    context), leaves the memory pageable and the locked-bytes count where it was, so registering a
    region cannot fail for it."""

    class Driver:
        result = 1  # CUDA_ERROR_INVALID_VALUE

        def cuMemHostRegister_v2(self, address: int, n: int, flags: int) -> int:  # noqa: N802 - the driver's name
            return self.result

    class Stream:
        def query(self) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pinned, "_driver", lambda: Driver())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    cuda = torch.device("cuda", 0)
    assert not pinned.lock(4096, 1 << 20, cuda) and pinned.locked_bytes() == 0  # the CUDA error
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: type("Ok", (), {"query": lambda self: True})())
    assert not pinned.lock(4096, 1 << 20, cuda) and pinned.locked_bytes() == 0  # the driver's refusal
    monkeypatch.setattr(pinned, "_locked_bound", pinned.LOCKED_BYTES)  # restored after the test
    pinned.set_locked_bytes(1 << 19)
    Driver.result = 0
    assert not pinned.lock(4096, 1 << 20, cuda) and pinned.locked_bytes() == 0  # past the bound: not asked
    assert not pinned.lock(4096, 1 << 20, torch.device("cpu"))


def test_the_locked_bytes_bound_is_the_servers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-locked-bytes: regions lock while they fit under it, the one past it stays pageable, 0
    locks none, and a negative bound is refused with the flag's name (a fake driver: no GPU here)."""
    asked: list[int] = []

    class Driver:
        def cuMemHostRegister_v2(self, address: int, n: int, flags: int) -> int:  # noqa: N802 - the driver's name
            asked.append(n)
            return 0

        def cuMemHostUnregister(self, address: int) -> int:  # noqa: N802
            return 0

    monkeypatch.setattr(pinned, "_driver", lambda: Driver())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: type("Ok", (), {"query": lambda self: True})())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(pinned, "_locked_bound", pinned.LOCKED_BYTES)  # both restored after the test
    monkeypatch.setattr(pinned, "_locked_bytes", 0)
    cuda = torch.device("cuda", 0)

    pinned.set_locked_bytes(3 * MB)
    assert pinned.lock(4096, 2 * MB, cuda) and pinned.lock(8192, MB, cuda)  # exactly fills the bound
    assert not pinned.lock(16384, 1, cuda) and pinned.locked_bytes() == 3 * MB
    pinned.unlock(4096, 2 * MB, cuda)
    assert pinned.lock(16384, 2 * MB, cuda) and asked == [2 * MB, MB, 2 * MB]
    pinned.unlock(8192, MB, cuda)
    pinned.unlock(16384, 2 * MB, cuda)

    pinned.set_locked_bytes(0)
    assert not pinned.lock(4096, 1, cuda) and pinned.locked_bytes() == 0 and len(asked) == 3
    with pytest.raises(ValueError, match=r"--max-locked-bytes must be 0 \(lock no shared memory region\) or more; got -1"):
        pinned.set_locked_bytes(-1)


def test_the_host_memory_bounds_come_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """--pinned-cache-bytes and --max-locked-bytes (or WEIGHTAVG_*) reach the process's bounds when
    the server is built."""
    from weightavg_server.ops.app import create_server
    from weightavg_server.ops.cli import build_parser, config_from_args
    from weightavg_server.ops.config import ServerConfig

    monkeypatch.setattr(pinned, "_cache_bytes", pinned.CACHE_BYTES)  # both restored after the test
    monkeypatch.setattr(pinned, "_locked_bound", pinned.LOCKED_BYTES)
    assert ServerConfig.from_env({"WEIGHTAVG_MAX_LOCKED_BYTES": "4096"}).max_locked_bytes == 4096
    args = build_parser().parse_args(["--port", "0", "--device", "cpu", "--host", "127.0.0.1",
                                      "--pinned-cache-bytes", "12345", "--max-locked-bytes", "0"])
    server, _, _ = create_server(config_from_args(args))
    try:
        assert (pinned._cache_bytes, pinned._locked_bound) == (12345, 0)
    finally:
        server.stop(None)
