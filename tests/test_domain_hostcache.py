"""The host cache: blocks of freed large CPU tensors kept for the next tensor of their size, within a
bound in bytes and in time (domain/hostcache.py), and the server's uploads and copies that use it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from conftest import LiveServer
from weightavg import Client, wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain import hostcache
from weightavg_server.domain.hostcache import MIN_BYTES, HostCache

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_freed_tensors_block_is_the_next_one_of_its_size() -> None:
    cache = HostCache(capacity=64 * MB)
    t = cache.empty(4 * MB).view(torch.float32).reshape(1024, 1024)
    address = t.data_ptr()
    t.fill_(1.5)
    assert cache.stats().idle_blocks == 0
    del t
    assert cache.stats().idle_bytes == 4 * MB
    again = cache.empty(4 * MB)
    assert again.data_ptr() == address and again.numel() == 4 * MB and again.dtype is torch.uint8
    assert cache.stats().reused == 1 and cache.stats().idle_bytes == 0
    other = cache.empty(8 * MB)  # another size takes a new block
    assert other.data_ptr() != address and cache.stats().allocated == 2


def test_a_block_stays_lent_while_any_tensor_over_it_lives() -> None:
    """Views, reshapes and Parameters share the storage; the block comes back with the last of them."""
    cache = HostCache(capacity=64 * MB)
    base = cache.empty(2 * MB)
    param = torch.nn.Parameter(base.view(torch.float32).reshape(512, 1024))
    row = param[3]
    del base
    gc.collect()
    assert cache.stats().idle_blocks == 0
    del param
    assert cache.stats().idle_blocks == 0  # the row still reaches the storage
    del row
    assert cache.stats().idle_blocks == 1


def test_small_tensors_and_a_cache_of_no_bytes_keep_nothing() -> None:
    cache = HostCache(capacity=64 * MB)
    small = cache.empty(MIN_BYTES - 1)
    del small
    assert cache.stats() == hostcache.CacheStats(0, 0, 0, 0)
    cache.configure(0)
    big = cache.empty(4 * MB)
    del big
    assert cache.stats().idle_bytes == 0
    lent = HostCache(capacity=64 * MB)
    held = lent.empty(4 * MB)
    lent.configure(0)  # a block lent before the bound fell is dropped when it comes back
    del held
    assert lent.stats().idle_bytes == 0


def test_every_large_tensor_made_over_new_memory_counts_as_new_whatever_the_bound() -> None:
    """`weightavg_host_cache_blocks_total{block="new"}`: with --host-cache-bytes 0, or for a tensor
    larger than the bound, every large tensor was made over new memory and none was counted, so the
    metric read as though the server had made no large tensor at all (found by review)."""
    cache = HostCache(capacity=0)
    made = [cache.empty(2 * MB), cache.empty(3 * MB, up_to=6 * MB)]
    assert cache.stats() == hostcache.CacheStats(idle_bytes=0, idle_blocks=0, reused=0, allocated=2)
    bounded = HostCache(capacity=4 * MB)
    made += [bounded.empty(8 * MB), bounded.empty(MIN_BYTES - 1)]  # larger than the bound; small (not counted)
    assert bounded.stats().allocated == 1
    del made
    assert cache.stats().idle_bytes == bounded.stats().idle_bytes == 0


def test_a_block_the_host_has_no_memory_for_gives_the_idle_blocks_back_before_it_is_refused() -> None:
    """A large tensor the host could not allocate was refused ("server out of memory") while the
    cache kept up to its bound idle; the idle blocks now go first, and it is tried once more. 1 PB:
    torch's CPU allocator refuses it at once, both times, touching no memory."""
    cache = HostCache(capacity=64 * MB)
    for nbytes in (2 * MB, 4 * MB):
        t = cache.empty(nbytes)
        del t
    assert cache.stats().idle_bytes == 6 * MB
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        cache.empty(1 << 50)
    assert cache.stats().idle_bytes == 0


def test_the_oldest_idle_blocks_go_first_past_the_bound() -> None:
    clock = Clock()
    cache = HostCache(capacity=10 * MB, clock=clock)
    first, second = cache.empty(4 * MB), cache.empty(4 * MB)
    first_address, second_address = first.data_ptr(), second.data_ptr()
    del first
    cache.stats()  # settled at 100
    clock.now = 101.0
    del second
    assert cache.stats().idle_bytes == 8 * MB
    third = cache.empty(6 * MB)  # a new block; kept when freed, which drops the oldest to stay within 10 MB
    del third
    stats = cache.stats()
    assert stats.idle_bytes == 10 * MB and stats.idle_blocks == 2
    assert cache.empty(4 * MB).data_ptr() == second_address != first_address


def test_trim_gives_back_blocks_idle_too_long() -> None:
    clock = Clock()
    cache = HostCache(capacity=64 * MB, idle_seconds=30.0, clock=clock)
    old, young = cache.empty(2 * MB), cache.empty(3 * MB)
    del old
    cache.stats()
    clock.now += 20
    del young
    cache.stats()
    clock.now += 15  # old idle 35 s, young 15 s
    assert cache.trim() == 2 * MB
    assert cache.stats().idle_bytes == 3 * MB
    clock.now += 30
    assert cache.trim() == 3 * MB and cache.stats().idle_blocks == 0


def test_a_transient_copy_takes_a_kept_block_of_up_to_twice_its_size() -> None:
    """`up_to` (what `lending` asks for a reply's copies): the smallest kept block that fits within it;
    the tensor has the bytes asked, and the whole block comes back with it."""
    cache = HostCache(capacity=64 * MB)
    four = cache.empty(4 * MB)
    address = four.data_ptr()
    del four
    three = cache.empty(3 * MB, up_to=6 * MB)
    assert three.data_ptr() == address and three.numel() == 3 * MB
    del three
    assert cache.stats().idle_bytes == 4 * MB  # the whole block is back
    assert cache.empty(MB, up_to=2 * MB).data_ptr() != address  # more than twice the size: a new block
    assert cache.empty(5 * MB, up_to=10 * MB).data_ptr() != address  # too small
    assert cache.empty(3 * MB).data_ptr() != address  # a kept tensor takes only its exact size


def test_the_bytes_a_lent_block_holds_beyond_its_tensor_count_within_the_bound() -> None:
    """An 8 MiB block lent to a 5 MiB reply holds 3 MiB that no cap counts (the reservation is the
    reply's 5 MiB): they count within --host-cache-bytes with the idle blocks, so the process holds at
    most the bound beside what the caps count, as ops.md says. Idle blocks filled the whole bound
    beside it (found by review)."""
    clock = Clock()
    cache = HostCache(capacity=8 * MB, clock=clock)
    first = cache.empty(8 * MB)
    address = first.data_ptr()
    del first
    reply = cache.empty(5 * MB, up_to=10 * MB)
    assert reply.data_ptr() == address
    clock.now += 1
    uploads = [cache.empty(4 * MB), cache.empty(4 * MB)]
    del uploads
    assert cache.stats().idle_bytes == 4 * MB  # 4 MB idle and 3 MB spare: one 4 MB block had to go
    clock.now += 1
    del reply  # the whole 8 MB block is idle again, and the older 4 MB one goes
    assert cache.stats().idle_bytes == 8 * MB
    assert cache.empty(8 * MB).data_ptr() == address


def test_lending_gives_blocks_from_the_processs_cache(kept: HostCache) -> None:
    with hostcache.lending() as lend:
        block = lend(2 * MB)
        address = block.data_ptr()
    del block
    with hostcache.lending() as lend:
        assert lend(2 * MB - 100).data_ptr() == address


def test_the_bounds_are_checked() -> None:
    cache = HostCache()
    with pytest.raises(ValueError, match="--host-cache-bytes must be 0"):
        cache.configure(-1)
    with pytest.raises(ValueError, match="idle time must be positive"):
        cache.configure(MB, 0.0)


def test_empty_as_gives_the_dtype_and_elements_asked_for() -> None:
    t = hostcache.empty_as(MB, torch.float64)
    assert t.dtype is torch.float64 and t.shape == (MB,) and t.is_contiguous()
    assert t.untyped_storage().nbytes() == 8 * MB  # what the store counts: the tensor's own bytes


# -- served: uploads and copies reuse the memory of freed ones ------------------------------------------------


@pytest.fixture
def kept() -> Iterator[HostCache]:
    """The process's cache (one, as the server's), emptied around the test."""
    cache = hostcache.cache()
    cache.clear()
    yield cache
    cache.clear()


def _addresses(server: LiveServer, handle: str) -> set[int]:
    entries = server.registry.get(handle).obj.entries
    return {t.untyped_storage().data_ptr() for t in entries.values()}


def test_an_upload_after_a_free_lands_in_the_freed_memory(live_server: LiveServer, client: Client, kept: HostCache) -> None:
    rng = np.random.default_rng(0)
    first = {f"w{i}": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(3)}
    d = client.dict(first)
    used = _addresses(live_server, d.id)
    client.free(d)
    second = {name: value + 1 for name, value in first.items()}
    d = client.dict(second)
    assert _addresses(live_server, d.id) == used  # no new memory to fault in
    got = client.dict(d)
    for name, value in second.items():
        np.testing.assert_array_equal(got[name], value)
    assert kept.stats().reused >= 3


def test_a_copy_after_a_free_lands_in_the_freed_memory(live_server: LiveServer, client: Client, kept: HostCache) -> None:
    m = client.module(["sequential", ["linear", "a", 1024, 512], ["linear", "b", 512, 256]])
    d = client.copyparms(m)
    used = _addresses(live_server, d.id)
    client.free(d)
    again = client.copyparms(m)
    assert _addresses(live_server, again.id) == used
    values = client.dict(again)
    for name in client.parmnames(m):
        np.testing.assert_array_equal(values[name], client.parm(m, name))



def test_a_snapshot_copies_into_the_memory_the_last_one_freed(start_server, tmp_path, kept: HostCache) -> None:  # type: ignore[no-untyped-def]
    """A snapshot's host copies (a periodic one on a changing server) took new memory every time, every
    page faulted in; they now come from the host cache, and a restart restores the same values."""
    server = start_server(state_dir=str(tmp_path))
    weights = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)  # 4 MiB
    with Client(server.address, timeout=60) as c:
        d = c.dict({"w": weights})
        c.snapshot()
        reused = kept.stats().reused
        c.snapshot()
        assert kept.stats().reused == reused + 1
        np.testing.assert_array_equal(c.dict(d)["w"], weights)


def test_a_reply_streaming_to_a_stalled_reader_keeps_its_bytes_while_its_object_is_freed_and_its_memory_reused(
    live_server: LiveServer, client: Client, kept: HostCache
) -> None:
    """The worst failure of kept memory: a block handed back while a reply still streams from it, so
    the next upload overwrites what the stalled reader has yet to get. The reply's copies hold their
    block until the reply ends, whatever happens to the object meanwhile."""
    n = 8 << 20  # 32 MB of float32: far more than the 64 KiB windows of a channel without BDP probing
    d = client.dict({"w": np.full(n, 1.0, np.float32)})
    channel = grpc.insecure_channel(live_server.address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                  ("grpc.http2.bdp_probe", 0)])
    with channel:
        reply = pb_grpc.WeightAveragingServiceStub(channel).FetchTensors(
            pb.FetchTensorsRequest(handle=d.id, packed_chunks=True), timeout=120
        )
        first = next(reply)  # the copies are made; the rest waits on this reader
        client.free(d)
        others = [client.dict({"w": np.full(n, float(k), np.float32)}) for k in range(2, 5)]
        got = dict(wire.join_chunks(m.chunk for m in [first, *reply]))
    assert np.count_nonzero(got["w"] != 1.0) == 0
    for k, other in enumerate(others, start=2):
        assert np.all(client.dict(other)["w"] == k)
    client.free(*others)

# -- freed memory given back when idle -------------------------------------------------------------------


def test_freed_memory_is_given_back_once_per_idle_spell_and_again_when_the_cache_drops_blocks() -> None:
    """After a burst of calls a server holding nothing kept 1.4 GB resident, 1.0 GB of it memory
    glibc held freed in its arenas: it is now trimmed once the server has been idle (no call
    started) for the idle time, once per idle spell, and again when the cache drops blocks then
    (blocks under glibc's mmap threshold go back to its heaps, not to the system)."""
    now, calls, released = [0.0], [0], []
    idle = hostcache.IdleRelease(lambda: calls[0], idle_seconds=30.0, clock=lambda: now[0],
                                 release=lambda: released.append(now[0]) is None)

    def at(t: float, started: int = 0, dropped: int = 0) -> bool:
        now[0] = t
        calls[0] += started
        return idle.tick(dropped)

    assert [at(t) for t in (1.0, 29.0)] == [False, False]  # not idle long enough
    assert at(30.0) and released == [30.0]
    assert not at(31.0) and not at(100.0)  # once per spell
    assert at(101.0, dropped=1 << 20) and released == [30.0, 101.0]  # the cache dropped blocks
    assert not at(102.0, started=1)  # a call: a new spell begins
    assert not at(131.0) and at(132.0) and released == [30.0, 101.0, 132.0]
    assert not at(140.0, started=1) and not at(150.0, dropped=1 << 20)  # dropped, but not idle long enough


def test_giving_freed_memory_back_runs_on_this_c_library() -> None:
    """glibc's malloc_trim is found and called (False, not a crash, where a C library has none)."""
    block = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    del block
    assert isinstance(hostcache.release_freed_memory(), bool)
