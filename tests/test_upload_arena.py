"""A dictionary upload's entries lie back to back in one buffer on a CPU server (transport/codec.py
`_Arena`, `Service.upload_arena`), so averages and merges over uploaded dictionaries run over spans as
over `copyparms`' flat copies: each entry at an offset its element size divides (one that would not
be is padded there out of the room entries apart left, or gets a buffer of its own), the buffer
reserved whole with the first tensor and charged whole (exactly the entries' bytes where they all went
in unpadded), every byte as sent. Training data, parameters, single tensors and undeclared streams keep
a storage of their own each. Real server, real gRPC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LiveServer
from inprocess import LedgerPeak
from weightavg import Client, Handle, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg_server.domain import flat, hostcache
from weightavg_server.domain.tensors import storage_bytes, storages, tensors_of
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Registry
from weightavg_server.transport import codec

def _entries(registry: Registry, handle: Handle) -> dict[str, torch.Tensor]:
    entries: dict[str, torch.Tensor] = registry.get(handle.id).obj.entries
    return entries


def _walked(registry: Registry) -> dict[str, int]:
    keys = set().union(*(storages(tensors_of(entry.obj)) for _, entry in registry.items()))
    return {device: n for device, n in storage_bytes(keys).items() if n}


def test_a_float32_dictionarys_entries_lie_back_to_back_and_average_as_one_span(
    client: Client, live_server: LiveServer
) -> None:
    rng = np.random.default_rng(0)
    values = {f"layer{i}.weight": rng.standard_normal((40, 33), dtype=np.float32) for i in range(6)}
    d = client.dict(values)
    entries = _entries(live_server.registry, d)
    tensors = list(entries.values())
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert all(b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(tensors, tensors[1:]))
    assert tensors[0].untyped_storage().nbytes() == sum(t.nbytes for t in tensors)
    copy = client.dict(values)  # a second upload: an average of one into the other fuses into one run
    pairs = list(zip(_entries(live_server.registry, copy).values(), tensors))
    assert flat.fuse(pairs) == [(0, len(pairs), sum(t.numel() for t in tensors))]
    client.avgparms(d, copy)
    got = client.dict(copy)
    for name, value in values.items():
        np.testing.assert_array_equal(got[name], value)  # the average of two equal values, bit for bit


def test_mixed_dtypes_at_odd_sizes_arrive_bit_identical_each_aligned(client: Client, live_server: LiveServer) -> None:
    rng = np.random.default_rng(1)
    values = {
        "mask": rng.integers(0, 2, 7).astype(np.bool_),
        "half": rng.standard_normal(3).astype(np.float16),
        "steps": rng.integers(-9, 9, 5).astype(np.int64),
        "byte": rng.integers(0, 255, 3).astype(np.uint8),
        "w": rng.standard_normal((5, 3), dtype=np.float32),
        "brain": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "wide": rng.standard_normal(1),
        "c": (rng.standard_normal(2) + 1j * rng.standard_normal(2)).astype(np.complex128),
    }
    d = client.dict(values)
    entries = _entries(live_server.registry, d)
    shared = entries["mask"].untyped_storage().data_ptr()
    # The 170-byte buffer, front and back: 'mask' (one-byte) from the back, 163..170; 'half' 0..6; 'steps'
    # fits neither at 8 nor at 120 with room for the 117 bytes after it: apart, leaving 40 spare; 'byte'
    # 160..163; 'w' 100..160 (unpadded at the back, not padded to 8 at the front); 'brain' 6..20; 'wide'
    # padded to 24 out of the spare bytes (as much as at the back); 'c' 32..64.
    in_buffer = {n: t.storage_offset() * t.element_size() for n, t in entries.items()
                 if t.untyped_storage().data_ptr() == shared}
    assert in_buffer == {"mask": 163, "half": 0, "byte": 160, "w": 100, "brain": 6, "wide": 24, "c": 32}
    declared = sum(v.nbytes for v in values.values())
    assert entries["mask"].untyped_storage().nbytes() == declared  # the whole buffer, charged whole
    for t in entries.values():
        assert t.data_ptr() % t.element_size() == 0
    apart = [n for n, t in entries.items() if t.untyped_storage().data_ptr() != shared]
    assert apart == ["steps"] and entries["steps"].untyped_storage().nbytes() == 40
    got = client.dict(d)
    for name, value in values.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name
    assert live_server.registry.held_bytes() == _walked(live_server.registry)


def test_entries_deleted_or_replaced_keep_the_charge_equal_to_what_is_held(
    client: Client, live_server: LiveServer
) -> None:
    """An uploaded dictionary's buffer lives while any entry reaches it (as a flat copy's does), and
    the ledger charges exactly the storage still reached, as the registry's walk finds it."""
    registry = live_server.registry
    before = registry.held_bytes().get("cpu", 0)
    d = client.dict({"a": np.ones(1000, np.float32), "b": np.ones(500, np.float32)})
    buffer = 1500 * 4
    assert registry.held_bytes().get("cpu", 0) == before + buffer
    client.dict(d, "a", np.zeros(10, np.float32))  # replaced by a one-tensor upload: a storage of its own
    assert registry.held_bytes().get("cpu", 0) == before + buffer + 40
    # 'b' left the first buffer, which goes; 'c' would start at 12, which 8 does not divide, and padded to 16
    # would leave no room: it goes apart, and the new buffer (28 bytes, 16 of them unused) is charged whole.
    client.dict(d, {"b": np.zeros(3, np.float32), "c": np.zeros(2, np.int64)})
    assert registry.held_bytes().get("cpu", 0) == before + 40 + (12 + 16) + 16
    assert registry.held_bytes() == _walked(registry)
    client.free(d)
    assert registry.held_bytes().get("cpu", 0) == before


def test_training_data_single_tensors_and_undeclared_streams_keep_storages_of_their_own(
    client: Client, live_server: LiveServer
) -> None:
    registry = live_server.registry
    q = client.module(["linear", 4, 2])
    m = client.model(q, client.loss("ce"), client.opt("sgd", q))
    client.train(m, np.ones((8, 4), np.float32), np.zeros(8, np.int64))
    data = registry.get(m.id).obj.train_data  # x and y: each owns its storage (training.Data)
    assert data is not None and all(t.storage_offset() == 0 for t in (data.x, data.y))
    assert data.x.untyped_storage().data_ptr() != data.y.untyped_storage().data_ptr()
    assert registry.held_bytes() == _walked(registry)
    one = client.dict({"only": np.ones(16, np.float32)})
    assert _entries(registry, one)["only"].untyped_storage().nbytes() == 64
    # A foreign client's stream without a declaration (no tensor_count, no total_bytes).
    channel_chunks = [pb.TensorChunk(name=n, dtype=pb.DTYPE_FLOAT32, shape=[2], data=np.ones(2, np.float32).tobytes())
                      for n in ("p", "q")]
    assembler = codec.TensorAssembler(1 << 20, arena=lambda nbytes: pytest.fail("an arena for an undeclared stream"))
    for chunk in channel_chunks:
        assembler.feed(chunk)
    p, q = (t for _, t in assembler.finish())
    assert p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()


def test_a_declared_stream_refused_partway_leaves_nothing_held(client: Client, live_server: LiveServer) -> None:
    registry = live_server.registry
    before = registry.held_bytes()
    chunks = list(codec.tensors_chunks([("a", torch.ones(4)), ("b", torch.ones(3))]))
    assembler = codec.TensorAssembler(1 << 20, arena=lambda nbytes: torch.zeros(nbytes, dtype=torch.uint8))
    for chunk in chunks[:-1]:
        assembler.feed(chunk)
    with pytest.raises(Exception, match="ended|declared"):
        assembler.feed(pb.TensorChunk(name="x", dtype=pb.DTYPE_FLOAT32, shape=[100]))
        assembler.finish()
    assert registry.held_bytes() == before


def _blocks_handed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (address, bytes) of every host-cache block handed out from now on (an upload's buffers)."""
    handed: list[tuple[int, int]] = []
    empty = hostcache.empty

    def recorded(nbytes: int, **kwargs: Any) -> torch.Tensor:
        block = empty(nbytes, **kwargs)
        handed.append((block.data_ptr(), nbytes))
        return block

    monkeypatch.setattr(hostcache, "empty", recorded)
    return handed


def _bytes_of_blocks_reached(blocks: list[tuple[int, int]], tensors: list[torch.Tensor]) -> int:
    """The bytes of the blocks any of the tensors lies in: each is held whole while one does."""
    return sum(n for start, n in blocks if any(start <= t.data_ptr() < start + n for t in tensors))


MIXED = {
    "scale": np.ones(1, np.float16),  # 2 bytes: no float32 after it starts aligned unpadded
    "mask": np.arange(7) % 2 == 0,  # one-byte: from the back of the buffer
    "w0": np.full((30, 20), 1.5, np.float32),  # apart: padding it would leave 'w1' and 'w2' no room
    "w1": np.full((30, 20), -2.0, np.float32),  # padded to 4 out of the room 'w0' left
    "w2": np.full(11, 3.0, np.float32),
}


def test_every_byte_an_upload_keeps_alive_is_charged(
    client: Client, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger charges the whole of every buffer an uploaded dictionary's entries lie in: a buffer's
    tail left unused (the bytes of the entries that went apart) is held while any entry in it lives.
    Before, the entries were rebased onto a storage of the bytes in use and the tail went uncharged:
    this upload held about twice what it was charged (every float32 apart, and its bytes in the
    buffer unused)."""
    registry = live_server.registry
    handed = _blocks_handed(monkeypatch)
    before = registry.held_bytes().get("cpu", 0)
    d = client.dict(MIXED)
    charged = registry.held_bytes().get("cpu", 0) - before
    assert _bytes_of_blocks_reached(handed, list(_entries(registry, d).values())) == charged
    assert charged == sum(v.nbytes for v in MIXED.values()) + MIXED["w0"].nbytes  # the buffer, and 'w0' apart
    client.delete(d, "w0", "mask")  # the buffer lives on while the other entries reach it: charged whole still
    assert _bytes_of_blocks_reached(handed, list(_entries(registry, d).values())) == charged - MIXED["w0"].nbytes
    assert registry.held_bytes().get("cpu", 0) - before == charged - MIXED["w0"].nbytes
    assert registry.held_bytes() == _walked(registry)
    client.free(d)
    assert registry.held_bytes().get("cpu", 0) == before


def test_an_upload_fits_a_cap_at_exactly_what_it_is_charged(start_server: Callable[..., LiveServer]) -> None:
    """The reservation of a mixed upload (an entry apart, the one buffer) equals its charge: a cap at
    what the same upload was charged before lets it in, a byte less refuses it with nothing held."""
    server = start_server()
    registry = server.registry
    with Client(server.address, timeout=60) as c:
        c.free(c.dict(MIXED))
        base = registry.held_bytes().get("cpu", 0)
        first = c.dict(MIXED)
        charge = registry.held_bytes().get("cpu", 0) - base
        held = registry.held_bytes().get("cpu", 0)
        registry.set_limits(Limits(max_device_bytes=held + charge - 1))
        with pytest.raises(ResourceExhaustedError):
            c.dict(MIXED)
        assert registry.held_bytes().get("cpu", 0) == held
        registry.set_limits(Limits(max_device_bytes=held + charge))
        second = c.dict(MIXED)
        assert registry.held_bytes().get("cpu", 0) == held + charge
        assert registry.held_bytes() == _walked(registry)
        registry.set_limits(Limits())  # a fetch reserves its copies too
        for d in (first, second):
            got = c.dict(d)
            for name, value in MIXED.items():
                assert got[name].tobytes() == value.tobytes(), name


def test_a_misaligned_entry_does_not_push_the_rest_apart(client: Client, live_server: LiveServer) -> None:
    """An odd-sized float16 scalar first left every float32 entry after it unaligned, so each went
    apart and the merge ran entry by entry. Now the first goes apart and the bytes it left in the
    buffer pad the next to its alignment: the rest lie back to back and fuse into one run."""
    rng = np.random.default_rng(4)
    values: dict[str, np.ndarray] = {"scale": np.ones(1, np.float16)}
    values |= {f"layer{i}.weight": rng.standard_normal((40, 33), dtype=np.float32) for i in range(6)}
    a, b = client.dict(values), client.dict(values)
    ta, tb = (_entries(live_server.registry, d) for d in (a, b))
    rest = [f"layer{i}.weight" for i in range(1, 6)]
    assert len({ta[n].untyped_storage().data_ptr() for n in rest}) == 1
    pairs = [(tb[n], ta[n]) for n in rest]
    assert flat.fuse(pairs) == [(0, len(pairs), sum(t.numel() for t, _ in pairs))]
    got = client.dict(b)
    for name, value in values.items():
        assert got[name].tobytes() == value.tobytes(), name
    assert live_server.registry.held_bytes() == _walked(live_server.registry)


def test_a_shared_memory_upload_lies_as_a_streamed_one(start_server: Callable[..., LiveServer]) -> None:
    """Through a shared memory region (TensorAssembler._shared) an upload takes the same buffer, laid
    out the same way, and is charged the same, as one streamed over gRPC."""
    server = start_server(allow_shm=True)
    registry = server.registry

    def layout(d: Handle) -> list[tuple[str, bool, int, int]]:
        """Each entry: whether it shares the first entry's buffer, its offset in its own, that one's size."""
        entries = _entries(registry, d)
        first = entries["mask"].untyped_storage().data_ptr()
        return [
            (n, t.untyped_storage().data_ptr() == first, t.storage_offset() * t.element_size(),
             t.untyped_storage().nbytes())
            for n, t in entries.items()
        ]

    with Client(server.address, timeout=60) as c, Client(server.address, timeout=60, shm=True) as fast:
        before = registry.held_bytes().get("cpu", 0)
        streamed = c.dict(MIXED)
        charge = registry.held_bytes().get("cpu", 0) - before
        shared = fast.dict(MIXED)
        assert registry.held_bytes().get("cpu", 0) - before == 2 * charge
        assert layout(shared) == layout(streamed)
        got = fast.dict(shared)
        for name, value in MIXED.items():
            assert got[name].tobytes() == value.tobytes(), name


DRAWN_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64,
                ml_dtypes.bfloat16, np.complex64]


@st.composite
def _drawn_dictionaries(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Up to eight entries of drawn dtypes and shapes (empty ones too), in a drawn order."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    out: dict[str, np.ndarray] = {}
    for i in range(draw(st.integers(2, 8))):
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        dtype = draw(st.sampled_from(DRAWN_DTYPES))
        raw = rng.integers(0, 256, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        value = raw.view(dtype).reshape(shape) if dtype is not np.bool_ else (raw % 2).astype(np.bool_).reshape(shape)
        out[f"e{i}"] = value
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=_drawn_dictionaries())
def test_a_drawn_dictionary_arrives_bit_identical_aligned_and_charged_what_it_holds(
    client: Client, live_server: LiveServer, values: dict[str, np.ndarray]
) -> None:
    """Whatever the dtypes, sizes and order, the block's front-and-back placement (`codec._Arena`)
    gives every entry an offset its element size divides, every byte as sent (NaN payloads included:
    compared as raw bytes), a charge equal to what the entries keep alive and to what the upload
    reserved as it arrived; freed, nothing held."""
    registry = live_server.registry
    before = registry.held_bytes().get("cpu", 0)
    with pytest.MonkeyPatch.context() as patch:
        ledger = LedgerPeak(patch)
        ledger.most = before
        d = client.dict(values)
    charged = registry.held_bytes().get("cpu", 0) - before
    assert ledger.most - before == charged  # reserved as it arrived exactly what it is charged
    for name, t in _entries(registry, d).items():
        assert t.data_ptr() % t.element_size() == 0, name
    got = client.dict(d)
    for name, value in values.items():
        # 0-dim entries come back as scalars (`wire.plain`: Python's own where it holds them exactly)
        back = np.asarray(got[name], dtype=value.dtype) if value.ndim == 0 else got[name]
        assert back.dtype == value.dtype and back.shape == value.shape, name
        assert back.tobytes() == value.tobytes(), name
    assert registry.held_bytes() == _walked(registry)
    client.free(d)
    assert registry.held_bytes().get("cpu", 0) == before
