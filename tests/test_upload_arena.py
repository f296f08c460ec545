"""A dictionary upload's entries lie back to back in one buffer on a CPU server (transport/codec.py
`_Arena`, `Service.upload_arena`), so averages and merges over uploaded dictionaries run over spans as
over `copyparms`' flat copies: each entry at an offset its element size divides (one that would not
be gets a buffer of its own), the buffer reserved whole with the first tensor, the entries charged
exactly their bytes (what a restored snapshot holds), every byte as sent. Training data, parameters, single tensors and undeclared
streams keep a storage of their own each. Real server, real gRPC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LiveServer
from weightavg import Client, Handle
from weightavg.v1 import weightavg_pb2 as pb
from weightavg_server.domain import flat
from weightavg_server.domain.tensors import storage_bytes, storages, tensors_of
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
        "wide": rng.standard_normal(1),
        "c": (rng.standard_normal(2) + 1j * rng.standard_normal(2)).astype(np.complex128),
    }
    d = client.dict(values)
    entries = _entries(live_server.registry, d)
    shared = entries["mask"].untyped_storage().data_ptr()
    # 'mask' (7 B) opens the buffer; 'half', 'steps', 'w', 'wide' and 'c' would start at an offset their
    # element size does not divide, so each goes apart; 'byte' (uint8) follows 'mask'.
    in_buffer = [n for n, t in entries.items() if t.untyped_storage().data_ptr() == shared]
    assert in_buffer == ["mask", "byte"]
    assert entries["mask"].untyped_storage().nbytes() == 7 + 3  # exactly the bytes of the entries in it
    for t in entries.values():
        assert t.data_ptr() % t.element_size() == 0
    assert sum(t.untyped_storage().nbytes() for t in entries.values() if t.untyped_storage().data_ptr() != shared) == (
        sum(v.nbytes for v in values.values()) - 10
    )
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
    client.dict(d, {"b": np.zeros(3, np.float32), "c": np.zeros(2, np.int64)})  # 'b' left the first buffer
    assert registry.held_bytes().get("cpu", 0) == before + 40 + 12 + 16
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
