"""The hand-written tensor-stream codec: the same bytes as protobuf, and peers using plain protobuf still work."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from weightavg import Client, InvalidArgumentError
from weightavg.wire import ChunkView, decode_chunk_message, decode_fetch_response, encode_chunk, encoded_chunks
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.transport import codec as wire

HEADERS = [
    ("weight", pb.DTYPE_FLOAT32, (10, 64), b"\x01\x02\x03\x04" * 7),
    ("", pb.DTYPE_UNSPECIFIED, (), b"x" * 300),  # a continuation chunk: only data
    (".n", pb.DTYPE_FLOAT64, (), b"\x00" * 8),  # a 0-dim tensor
    ("empty", pb.DTYPE_INT64, (0, 3), b""),  # no data at all
    ("big-dims", pb.DTYPE_UINT8, (1 << 40, 2), b"ab"),  # multi-byte varints
    ("ünï", pb.DTYPE_BOOL, (2,), b"\x00\x01"),
]


@pytest.mark.parametrize("name,code,shape,data", HEADERS)
@pytest.mark.parametrize(
    "message_type,field",
    [(pb.FetchTensorsResponse, 1), (pb.CreateDictionaryRequest, 1), (pb.UpdateDictionaryRequest, 2)],
)
def test_encode_chunk_is_protobufs_encoding(name, code, shape, data, message_type, field) -> None:  # type: ignore[no-untyped-def]
    expected = message_type()
    chunk = expected.chunk
    chunk.name, chunk.dtype, chunk.data = name, code, data
    chunk.shape.extend(shape)
    encoded = encode_chunk(field, name, code, shape, memoryview(data))
    assert encoded == expected.SerializeToString()
    assert message_type.FromString(encoded) == expected


@pytest.mark.parametrize("name,code,shape,data", HEADERS)
def test_decode_reads_back_what_protobuf_wrote(name, code, shape, data) -> None:  # type: ignore[no-untyped-def]
    message = pb.UpdateDictionaryRequest(dictionary="d-123")
    message.chunk.name, message.chunk.dtype, message.chunk.data = name, code, data
    message.chunk.shape.extend(shape)
    decoded = decode_chunk_message(message.SerializeToString(), 2, {1: "dictionary"})
    assert decoded["dictionary"] == "d-123"
    view = decoded["chunk"]
    assert (view.name, view.dtype, view.shape, bytes(view.data)) == (name, code, tuple(shape), data)


def test_decode_reads_unpacked_shapes_and_negative_dimensions() -> None:
    # shape as separate (unpacked) varints, legal protobuf though not what protobuf writes for proto3
    raw = b"\x0a\x0d" + b"\x18\x02" + b"\x18" + b"\xff" * 9 + b"\x01"
    view = decode_fetch_response(raw)
    assert isinstance(view, ChunkView)
    assert view.shape == (2, -1)


def test_decode_falls_back_to_protobuf_on_unexpected_fields() -> None:
    message = pb.SetParameterRequest(handle="h", name="w")
    message.chunk.data = b"abc"
    with pytest.raises(ValueError):
        decode_chunk_message(message.SerializeToString(), 3, {1: "handle"})  # field 2 not expected
    # a FetchTensorsResponse carrying an unknown field 9: the decoder hands it to protobuf
    raw = pb.FetchTensorsResponse(chunk=pb.TensorChunk(data=b"xyz")).SerializeToString() + b"\x48\x01"
    chunk = decode_fetch_response(raw)
    assert isinstance(chunk, pb.TensorChunk) and chunk.data == b"xyz"


def test_server_chunks_decode_with_plain_protobuf() -> None:
    t = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    messages = [pb.FetchTensorsResponse.FromString(m) for m in wire.encoded_chunks([("t", t)], 16)]
    assert [len(m.chunk.data) for m in messages] == [16, 16, 8]
    assert (messages[0].chunk.name, list(messages[0].chunk.shape)) == ("t", [2, 5])
    assert b"".join(m.chunk.data for m in messages) == t.numpy().tobytes()
    assert wire.assemble([m.chunk for m in messages], 1 << 20)[0][1].equal(t)


def test_client_chunks_split_at_chunk_bytes() -> None:
    a = np.arange(10, dtype=np.int32)
    messages = [pb.CreateDictionaryRequest.FromString(m) for m in encoded_chunks([("a", a), ("b", 1.5)], 12, field=1)]
    assert [(m.chunk.name, len(m.chunk.data)) for m in messages] == [("a", 12), ("", 12), ("", 12), ("", 4), ("b", 8)]


def test_plain_protobuf_peers_still_fetch_and_upload(client: Client) -> None:
    """A client built from the generated stubs alone (another language, an older client) sees no change."""
    values = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(client.address))
    requests = []
    for name, array in values.items():
        message = pb.CreateDictionaryRequest()
        message.chunk.name, message.chunk.dtype = name, pb.DTYPE_FLOAT32 if array.dtype == np.float32 else pb.DTYPE_FLOAT16
        message.chunk.shape.extend(array.shape)
        message.chunk.data = array.tobytes()
        requests.append(message)
    d = stub.CreateDictionary(iter(requests), timeout=30).dictionary
    fetched = client.dict(client.addref(d.id))
    for name, array in values.items():
        np.testing.assert_array_equal(fetched[name], array)
    replies = list(stub.FetchTensors(pb.FetchTensorsRequest(handle=d.id, names=["w"]), timeout=30))
    assert replies[0].chunk.name == "w" and list(replies[0].chunk.shape) == [2, 3]
    assert b"".join(r.chunk.data for r in replies) == values["w"].tobytes()


def test_large_tensors_round_trip_across_many_chunks(client: Client) -> None:
    with Client(client.address, chunk_bytes=1000) as small_chunks:
        a = np.random.default_rng(0).standard_normal((37, 101)).astype(np.float32)
        d = small_chunks.dict({"a": a, "n": np.int64(3)})
        small_chunks.dict(d, "c", a[:3])
        back = small_chunks.dict(d)
        np.testing.assert_array_equal(back["a"], a)
        np.testing.assert_array_equal(back["c"], a[:3])
        assert back["n"] == 3
        np.testing.assert_array_equal(small_chunks.tensor(small_chunks.tensor(a)), a)
        small_chunks.free(d)


def test_bad_bool_bytes_are_still_refused(client: Client, unchanged) -> None:  # type: ignore[no-untyped-def]
    with unchanged(), pytest.raises(InvalidArgumentError, match="bool"):
        client.dict({"b": np.frombuffer(b"\x00\x02", np.bool_)})
