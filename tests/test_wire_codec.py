"""The hand-written tensor-stream codec: the same bytes as protobuf, and peers using plain protobuf still work."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from conftest import LiveServer
from weightavg import Client, InvalidArgumentError
from weightavg.wire import (
    ChunkView,
    array_chunks,
    chunk_field,
    decode_chunk_message,
    decode_fetch_response,
    encode_chunk,
    encoded_chunks,
    join_chunks,
    string_fields,
    to_array,
)
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
@pytest.mark.parametrize("message_type", [pb.FetchTensorsResponse, pb.CreateDictionaryRequest, pb.UpdateDictionaryRequest])
def test_encode_chunk_is_protobufs_encoding(name, code, shape, data, message_type) -> None:  # type: ignore[no-untyped-def]
    expected = message_type()
    chunk = expected.chunk
    chunk.name, chunk.dtype, chunk.data = name, code, data
    chunk.shape.extend(shape)
    encoded = encode_chunk(chunk_field(message_type), name, code, shape, memoryview(data))
    assert encoded == expected.SerializeToString()
    assert message_type.FromString(encoded) == expected


@pytest.mark.parametrize("name,code,shape,data", HEADERS)
def test_decode_reads_back_what_protobuf_wrote(name, code, shape, data) -> None:  # type: ignore[no-untyped-def]
    message = pb.UpdateDictionaryRequest(dictionary="d-123")
    message.chunk.name, message.chunk.dtype, message.chunk.data = name, code, data
    message.chunk.shape.extend(shape)
    decoded = decode_chunk_message(
        message.SerializeToString(), chunk_field(pb.UpdateDictionaryRequest), string_fields(pb.UpdateDictionaryRequest)
    )
    assert decoded["dictionary"] == "d-123"
    view = decoded["chunk"]
    assert (view.name, view.dtype, view.shape, bytes(view.data)) == (name, code, tuple(shape), data)


def test_decode_reads_unpacked_shapes_and_negative_dimensions() -> None:
    # shape as separate (unpacked) varints, legal protobuf though not what protobuf writes for proto3
    raw = b"\x0a\x0d" + b"\x18\x02" + b"\x18" + b"\xff" * 9 + b"\x01"
    view = decode_fetch_response(raw)
    assert isinstance(view, ChunkView)
    assert view.shape == (2, -1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


# Varints a client in another language (or a hand-made message) may send: negatives in 10 bytes, values
# past 32 bits in an enum, and a 10th byte with bits past 64.
ODD_VARINTS = [0, 1, 99, 2**31, 2**32 - 1, 2**32 + 1, 2**63, 2**64 - 1, 2**64 + 5, 2**70 - 1]


@pytest.mark.parametrize("value", ODD_VARINTS)
def test_decode_reads_every_varint_as_protobuf_does(value: int) -> None:
    """The hand decoder (CreateDictionary, UpdateDictionary, CreateTensor, fetches) and protobuf (every
    other RPC) read the same bytes as the same dtype, shape and declaration: an int32 enum keeps its low
    32 bits, an int64 its low 64. The dtype -1 used to read as 18446744073709551615."""
    raw = b"".join(bytes([field << 3]) + _varint(value) for field in (2, 3, 5, 6))  # dtype, shape, count, total
    expected = pb.TensorChunk.FromString(raw)
    view = decode_fetch_response(b"\x0a" + _varint(len(raw)) + raw)
    assert isinstance(view, ChunkView), "read by hand, not handed to protobuf"
    assert (view.dtype, view.shape, view.tensor_count, view.total_bytes) == (
        expected.dtype, tuple(expected.shape), expected.tensor_count, expected.total_bytes
    )


def test_an_unknown_dtype_is_named_as_sent_with_the_fix(client: Client, unchanged) -> None:  # type: ignore[no-untyped-def]
    """A generated client's dtype -1 is reported as -1 by the hand-decoded uploads, as by the others."""
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(client.address))
    chunk = pb.TensorChunk(name="w", dtype=-1, shape=[1], data=b"\0" * 4)  # type: ignore[arg-type]
    module = client.module(["linear", 1, 1]).id
    calls = [
        lambda: stub.CreateDictionary(iter([pb.CreateDictionaryRequest(chunk=chunk)]), timeout=30),
        lambda: stub.CreateTensor(iter([pb.CreateTensorRequest(chunk=chunk)]), timeout=30),
        lambda: stub.SetParameter(iter([pb.SetParameterRequest(handle=module, name="weight", chunk=chunk)]), timeout=30),
    ]
    for call in calls:
        with unchanged(), pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "dtype code -1: set dtype to one of DTYPE_FLOAT32 (1)" in err.value.details()


@pytest.mark.parametrize("value", [2**64, [1, "a"], [[1.0, 2.0], [3.0]]], ids=["int past int64", "mixed", "ragged"])
def test_a_value_numpy_makes_an_object_array_of_is_refused_saying_why(value: object) -> None:
    """Python values numpy holds only as objects were refused as 'dtype object cannot be sent', which
    says nothing of what to change."""
    with pytest.raises(TypeError, match="object array: a Python int past int64, values of mixed types, or rows"):
        to_array(np.array(value, dtype=object) if isinstance(value, list) else value)


def test_decode_falls_back_to_protobuf_on_unexpected_fields() -> None:
    message = pb.SetParameterRequest(handle="h", name="w")
    message.chunk.data = b"abc"
    handle_only = {number: name for number, name in string_fields(pb.SetParameterRequest).items() if name == "handle"}
    with pytest.raises(ValueError):  # the `name` field is not expected
        decode_chunk_message(message.SerializeToString(), chunk_field(pb.SetParameterRequest), handle_only)
    # a FetchTensorsResponse carrying an unknown field 9: the decoder hands it to protobuf
    raw = pb.FetchTensorsResponse(chunk=pb.TensorChunk(data=b"xyz")).SerializeToString() + b"\x48\x01"
    chunk = decode_fetch_response(raw)
    assert isinstance(chunk, pb.TensorChunk) and chunk.data == b"xyz"


def test_server_chunks_decode_with_plain_protobuf() -> None:
    t = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    messages = [pb.FetchTensorsResponse.FromString(m.message) for m in wire.encoded_chunks([("t", t)], 16)]
    assert [len(m.chunk.data) for m in messages] == [16, 16, 8]
    assert (messages[0].chunk.name, list(messages[0].chunk.shape)) == ("t", [2, 5])
    assert b"".join(m.chunk.data for m in messages) == t.numpy().tobytes()
    assert wire.assemble([m.chunk for m in messages], 1 << 20)[0][1].equal(t)


def test_client_chunks_split_at_chunk_bytes() -> None:
    a = np.arange(10, dtype=np.int32)
    encoded = encoded_chunks([("a", a), ("b", 1.5)], 12, pb.CreateDictionaryRequest)
    messages = [pb.CreateDictionaryRequest.FromString(m) for m in encoded]
    assert [(m.chunk.name, len(m.chunk.data)) for m in messages] == [("a", 12), ("", 12), ("", 12), ("", 4), ("b", 8)]


@pytest.mark.parametrize("chunk_bytes", [0, -5, 2.5, True, "4096"])
def test_a_chunk_size_that_is_not_a_positive_whole_number_is_refused_before_anything_is_sent(
    live_server: LiveServer, chunk_bytes: object
) -> None:
    """Below 0 no chunk of a tensor was sent (range() with a negative step is empty), and the server
    created a dictionary without it; 0 failed in gRPC's request thread as UNKNOWN."""
    before = len(live_server.registry)
    with pytest.raises(ValueError, match="chunk_bytes must be a whole number of bytes above 0"):
        Client(live_server.address, chunk_bytes=chunk_bytes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_bytes must be"):
        list(encoded_chunks([("a", np.arange(10, dtype=np.int32))], chunk_bytes, pb.CreateDictionaryRequest))  # type: ignore[arg-type]
    assert len(live_server.registry) == before
    with Client(live_server.address, chunk_bytes=np.int64(12)) as c:  # type: ignore[arg-type]
        d = c.dict({"a": np.arange(10, dtype=np.int32)})
        assert np.array_equal(c.dict(d, "a"), np.arange(10, dtype=np.int32))
        c.free(d)


CHUNK_MESSAGES = [
    getattr(pb, name)
    for name, descriptor in pb.DESCRIPTOR.message_types_by_name.items()
    if "chunk" in descriptor.fields_by_name
]
UPLOADS = [m for m in CHUNK_MESSAGES if m.DESCRIPTOR.name.endswith("Request")]


def test_every_upload_request_is_covered() -> None:
    """The lists below come from the .proto itself, so a new upload stream is tested without editing this file."""
    assert {m.DESCRIPTOR.name for m in UPLOADS} >= {
        "SetParameterRequest", "CreateDictionaryRequest", "UpdateDictionaryRequest", "CreateTensorRequest",
        "SetModelDataRequest", "EvaluateModelRequest", "RunForwardRequest",
    }


@pytest.mark.parametrize("message_type", CHUNK_MESSAGES, ids=lambda m: m.DESCRIPTOR.name)
def test_field_numbers_come_from_the_descriptors(message_type) -> None:  # type: ignore[no-untyped-def]
    fields = message_type.DESCRIPTOR.fields_by_name
    assert chunk_field(message_type) == fields["chunk"].number
    assert string_fields(message_type) == {
        f.number: name for name, f in fields.items() if f.type == f.TYPE_STRING and not f.is_repeated
    }


def test_string_fields_are_the_handle_fields_the_etag_and_the_request_id() -> None:
    fields = pb.UpdateDictionaryRequest.DESCRIPTOR.fields_by_name
    assert string_fields(pb.UpdateDictionaryRequest) == {
        fields["dictionary"].number: "dictionary", fields["etag"].number: "etag", fields["request_id"].number: "request_id"
    }
    assert string_fields(pb.CreateDictionaryRequest) == {15: "request_id"}


def test_chunk_field_refuses_a_message_without_a_chunk() -> None:
    with pytest.raises(TypeError, match="GetSizeRequest"):
        chunk_field(pb.GetSizeRequest)


@pytest.mark.parametrize("message_type", UPLOADS, ids=lambda m: m.DESCRIPTOR.name)
def test_client_encoding_parses_with_protobuf_for_every_upload(message_type) -> None:  # type: ignore[no-untyped-def]
    values = [("w", np.arange(12, dtype=np.float32).reshape(3, 4)), (".n", np.float64(2.0))]
    messages = [message_type.FromString(m) for m in encoded_chunks(values, 20, message_type)]
    assert all(m.ListFields() == [(m.DESCRIPTOR.fields_by_name["chunk"], m.chunk)] for m in messages)
    joined = join_chunks(m.chunk for m in messages)
    assert [name for name, _ in joined] == ["w", ".n"]
    for (_, expected), (_, got) in zip(values, joined):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("message_type", UPLOADS, ids=lambda m: m.DESCRIPTOR.name)
def test_server_decoder_reads_every_upload_by_its_descriptor(message_type) -> None:  # type: ignore[no-untyped-def]
    message = message_type(chunk=pb.TensorChunk(name="w", dtype=pb.DTYPE_UINT8, shape=[3], data=b"abc"))
    strings = string_fields(message_type)
    for name in strings.values():
        setattr(message, name, f"{name}-1")
    decoded = wire.request_decoder(message_type)(message.SerializeToString())
    assert isinstance(decoded.chunk, ChunkView), "read by hand, not handed to protobuf"
    assert decoded.chunk.name == "w" and bytes(decoded.chunk.data) == b"abc"
    assert all(getattr(decoded, name) == f"{name}-1" for name in strings.values())


def test_server_encoding_follows_the_message_type() -> None:
    t = torch.arange(3, dtype=torch.int16)
    (encoded,) = wire.encoded_chunks([("t", t)], 1 << 20, pb.EvaluateModelResponse)
    message = pb.EvaluateModelResponse.FromString(encoded.message)
    assert encoded.data_bytes == 6
    assert (message.chunk.name, list(message.chunk.shape), message.chunk.data) == ("t", [3], t.numpy().tobytes())


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


def test_large_chunks_are_received_with_streaming_stores_at_any_offset(streamed_copies: list[int]) -> None:
    """An upload's chunks of `native.STREAM_MIN_BYTES` or more are copied into the tensor with
    streaming stores, at whatever offset the chunk before left (here an odd one); smaller ones with
    numpy: every byte as sent either way."""
    from weightavg_server.domain import native

    g = torch.Generator().manual_seed(5)
    named = [("w", torch.randn((1 << 19) + 7, generator=g)), ("b", torch.randint(0, 256, (999,), dtype=torch.uint8, generator=g))]
    chunk = native.STREAM_MIN_BYTES + 3
    got = wire.assemble(wire.tensors_chunks(named, chunk), max_bytes=1 << 30)
    assert streamed_copies == [chunk, chunk]  # the first two of "w"; its 22-byte tail and "b" through numpy
    assert [n for n, _ in got] == ["w", "b"]
    assert all(torch.equal(t, want) and t.dtype == want.dtype for (_, t), (_, want) in zip(got, named))


def test_an_entry_of_a_long_name_travels_within_the_message_cap_both_ways(start_server) -> None:  # type: ignore[no-untyped-def]
    """A header chunk carried its name and a whole chunk of data, so an entry whose name is longer than
    the cap's room above chunk_bytes was refused on upload (RESOURCE_EXHAUSTED, though the client's
    chunks fit the cap) and, sent in smaller chunks, stored but never fetched: the server's reply
    went over its own cap ('Sent message larger than max'), for that entry and for the whole
    dictionary. A long header now goes alone, its data in the chunks after it."""
    cap, chunk = 64 << 10, 16 << 10
    server = start_server(max_message_bytes=cap, chunk_bytes=chunk)
    name = "layer." * (8 << 10)  # 48 KiB: the name and one chunk are over the cap, the name alone is not
    value = np.arange(10_000, dtype=np.float32)
    with Client(server.address, chunk_bytes=chunk, timeout=60) as c:
        d = c.dict({name: value, "short": value[:5]})
        np.testing.assert_array_equal(c.dict(d, name), value)
        back = c.dict(d)
        np.testing.assert_array_equal(back[name], value)
        np.testing.assert_array_equal(back["short"], value[:5])
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(server.address))
    replies = [r.chunk for r in stub.FetchTensors(pb.FetchTensorsRequest(handle=d.id, names=[name, "short"]), timeout=30)]
    assert all(r.ByteSize() <= chunk + (4 << 10) or not r.data for r in replies)
    assert replies[0].name == name and not replies[0].data  # the long header alone
    assert replies[-1].name == "short" and replies[-1].data == value[:5].tobytes()  # a short one keeps its data


def test_short_headers_still_carry_the_first_chunk() -> None:
    """The common case is unchanged: a header with an ordinary name carries the first bytes, and
    data chunks start at multiples of chunk_bytes (the server's streaming stores like them there)."""
    a = np.arange(1000, dtype=np.float32)
    chunks = list(array_chunks("encoder.layers.11.attention.query.weight", a, 1024))
    assert [len(c.data) for c in chunks] == [1024, 1024, 1024, 928]
    assert chunks[0].name and chunks[0].tensor_count == 1 and chunks[-1].HasField("crc32c")
    assert [name for name, _ in join_chunks(chunks)] == ["encoder.layers.11.attention.query.weight"]
