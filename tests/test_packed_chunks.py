"""Packed chunks (TensorChunk.packed): many small tensors in one stream message.

The codec's packing and unpacking in process, and real servers on loopback: uploads and fetches of
many small tensors packed and not, against each other and against what was sent; the stream a
caller that did not ask for packing gets; hand-made packed streams a client in another language
might send; request IDs that do not depend on how an upload was packed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import LiveServer
from weightavg import Client, DataLossError
from weightavg import wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

WAIT = 60.0
SERVICE = "/weightavg.v1.WeightAveragingService"


def small_tensors(count: int = 300) -> dict[str, np.ndarray]:
    """Many small tensors of several dtypes and sizes, a scalar and an empty one among them."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {f"block{i}.weight": rng.standard_normal(1 + i % 37, dtype=np.float32) for i in range(count)}
    out["steps"] = np.array(7, dtype=np.int64)
    out["empty"] = np.zeros((0, 3), np.float32)
    out["half"] = rng.standard_normal((4, 5)).astype(np.float16)
    return out


def same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def messages(values: dict[str, np.ndarray], message_type: type[Any] = pb.FetchTensorsResponse) -> list[bytes]:
    return list(wire.encoded_chunks(values.items(), wire.CHUNK_BYTES, message_type))


# -- the codec, in process ---------------------------------------------------------------------------


def test_a_packed_message_is_what_protobuf_encodes_for_the_same_chunks() -> None:
    """Receivers in other languages parse packed messages with their protobuf library: the hand
    encoding must be exactly protobuf's."""
    plain = messages({"a": np.arange(3, dtype=np.float32), "b": np.ones(2), "c": np.array(5, np.int64)})
    [joined] = wire.packed_stream(plain, wire.CHUNK_BYTES)
    chunks = [pb.FetchTensorsResponse.FromString(m).chunk for m in plain]
    expected = pb.FetchTensorsResponse(chunk=chunks[0])
    expected.chunk.packed.extend(chunks[1:])
    assert joined == expected.SerializeToString()


def test_packing_keeps_every_chunk_in_order_and_large_ones_alone() -> None:
    values = {"small": np.arange(10, dtype=np.float32), "big": np.zeros(wire.PACK_BYTES // 4 + 1, np.float32),
              "tail1": np.ones(3), "tail2": np.ones(4)}
    plain = messages(values)
    packed = list(wire.packed_stream(plain, wire.CHUNK_BYTES))
    assert len(packed) == 3  # "small" alone (the big one does not fit beside it), "big" alone, the tails together
    assert packed[1] == plain[1]  # a message alone is passed on as it was
    got = wire.join_chunks(wire.decode_fetch_response(m) for m in packed)
    assert [n for n, _ in got] == list(values) and all(same(a, values[n]) for n, a in got)


def test_packing_bounds_a_message_by_bytes_and_by_count() -> None:
    plain = messages({f"t{i}": np.zeros(0, np.float32) for i in range(wire.PACK_COUNT + 5)})
    assert [len(pb.FetchTensorsResponse.FromString(m).chunk.packed) for m in wire.packed_stream(plain, 1 << 20)] == [
        wire.PACK_COUNT - 1, 4]
    plain = messages({f"t{i}": np.zeros(100, np.float32) for i in range(10)})  # about 430 bytes a message
    assert len(list(wire.packed_stream(plain, 1000))) == 5  # chunk_bytes bounds a message too


def test_a_packed_chunk_that_packs_chunks_is_data_loss_for_the_client() -> None:
    inner = pb.TensorChunk(name="b", dtype=pb.DTYPE_FLOAT32, shape=[1], data=b"\0\0\0\0")
    inner.packed.add(name="c", dtype=pb.DTYPE_FLOAT32, shape=[0])
    outer = pb.TensorChunk(name="a", dtype=pb.DTYPE_FLOAT32, shape=[0], packed=[inner])
    with pytest.raises(DataLossError, match="packed chunks of its own"):
        wire.join_chunks([wire.decode_fetch_response(pb.FetchTensorsResponse(chunk=outer).SerializeToString())])


# -- real servers ------------------------------------------------------------------------------------


def fetch_stream(address: str, handle: str, packed: bool) -> list[pb.TensorChunk]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        request = pb.FetchTensorsRequest(handle=handle, packed_chunks=packed)
        return [m.chunk for m in stub.FetchTensors(request, timeout=WAIT)]


def test_many_small_tensors_go_up_and_come_back_packed_and_bit_identical(live_server: LiveServer) -> None:
    values = small_tensors()
    with Client(live_server.address, timeout=WAIT) as c:
        assert c.info()["packed_chunks"] is True
        before = c.stats()["methods"]
        d = c.dict(values)
        back = c.dict(d)
        assert list(back) == list(values) and all(same(back[n], v) for n, v in values.items())
        stats = c.stats()["methods"]
        total = sum(v.nbytes for v in values.values())
        sent = stats[f"{SERVICE}/FetchTensors"]["bytes_sent"] - before.get(f"{SERVICE}/FetchTensors", {}).get("bytes_sent", 0)
        got = stats[f"{SERVICE}/CreateDictionary"]["bytes_received"] - before.get(
            f"{SERVICE}/CreateDictionary", {}).get("bytes_received", 0)
        assert (sent, got) == (total, total)  # the statistics count packed chunks' bytes too
        stream = fetch_stream(live_server.address, d.id, packed=True)
        assert len(stream) == 1 and len(stream[0].packed) == len(values) - 1
        c.free(d)


def test_a_caller_that_did_not_ask_gets_one_chunk_a_message(live_server: LiveServer) -> None:
    """Clients from before packing (and other languages' that never set packed_chunks) read every
    stream as before."""
    values = small_tensors(20)
    with Client(live_server.address, timeout=WAIT) as c:
        d = c.dict(values)
        stream = fetch_stream(live_server.address, d.id, packed=False)
        assert len(stream) == len(values) and not any(chunk.packed for chunk in stream)
        got = wire.join_chunks(stream)
        assert all(same(a, values[n]) for n, a in got)
        c.free(d)


def upload(address: str, chunks: list[pb.TensorChunk], request_id: str = "") -> Any:
    def requests() -> Iterator[pb.CreateDictionaryRequest]:
        yield pb.CreateDictionaryRequest(request_id=request_id)
        for chunk in chunks:
            yield pb.CreateDictionaryRequest(chunk=chunk)

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WeightAveragingServiceStub(channel).CreateDictionary(requests(), timeout=WAIT)


def declared_chunks(values: dict[str, np.ndarray], chunk_bytes: int = wire.CHUNK_BYTES) -> list[pb.TensorChunk]:
    return [pb.FetchTensorsResponse.FromString(m).chunk
            for m in wire.encoded_chunks(values.items(), chunk_bytes, pb.FetchTensorsResponse)]


def test_a_hand_packed_upload_may_split_a_tensor_across_messages(live_server: LiveServer) -> None:
    """Packed chunks are taken as if each came alone: a tensor may start in one message's packed
    list and end in the next message (as a client in another language may pack)."""
    values = {"a": np.arange(5, dtype=np.float32), "b": np.arange(40, dtype=np.float64)}
    chunks = declared_chunks(values, chunk_bytes=100)  # "b" (320 bytes) in four chunks
    first = chunks[0]
    first.packed.extend(chunks[1:3])  # "a", and "b"'s header with its first bytes
    second = chunks[3]
    second.packed.extend(chunks[4:])
    reply = upload(live_server.address, [first, second])
    with Client(live_server.address, timeout=WAIT) as c:
        back = c.dict(reply.dictionary.id)
        assert all(same(back[n], v) for n, v in values.items())
        c.free(reply.dictionary.id)


def test_a_packed_chunk_that_packs_chunks_is_refused_and_nothing_is_made(live_server: LiveServer) -> None:
    chunks = declared_chunks({"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32), "c": np.ones(1)})
    chunks[1].packed.append(chunks[2])
    chunks[0].packed.append(chunks[1])
    with Client(live_server.address, timeout=WAIT) as c:
        before = set(c.handles())
        with pytest.raises(grpc.RpcError) as err:
            upload(live_server.address, [chunks[0]])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "packed chunks of its own" in str(err.value.details())
        assert set(c.handles()) == before


def test_a_request_id_names_the_same_upload_however_it_was_packed(live_server: LiveServer) -> None:
    """The exactly-once digest covers the stream's chunks, not its messages: a retry that packs
    otherwise (another client version, or a client that learned the server packs) gets the first
    answer, where a digest of the messages would refuse it as other arguments."""
    values = small_tensors(30)
    request_id = str(uuid.uuid4())
    chunks = declared_chunks(values)
    first = upload(address=live_server.address, chunks=chunks, request_id=request_id)
    packed = [chunks[0]]
    packed[0].packed.extend(chunks[1:])
    again = upload(address=live_server.address, chunks=packed, request_id=request_id)
    assert again.dictionary.id == first.dictionary.id
    with Client(live_server.address, timeout=WAIT) as c:
        assert c.stats()["request_ids"]["duplicates_answered"] >= 1
        c.free(first.dictionary.id)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory in /dev/shm")
def watch_packing(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each chunk the server's upload streams read came packed (a spy on its unpacking)."""
    from weightavg_server.transport import servicer

    seen: list[bool] = []
    unpacked = servicer.unpacked

    def watched(chunks: Any, error: type[Exception]) -> Iterator[Any]:
        for chunk in unpacked(chunks, error):
            seen.append(bool(chunk.packed))
            yield chunk

    monkeypatch.setattr(servicer, "unpacked", watched)
    return seen


def test_many_small_tensors_through_shared_memory_packed(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared-memory uploads pack their headers too (each standing for its tensor's bytes), the
    arrays copied into the region before the message that names them goes. (Small tensors go in the
    stream's messages by default: here every one through the region, SHARED_MIN_TENSOR_BYTES 0.)"""
    from weightavg import _shm

    monkeypatch.setattr(_shm, "SHARED_MIN_TENSOR_BYTES", 0)
    seen = watch_packing(monkeypatch)
    server = start_server(allow_shm=True)
    values = small_tensors(2000)
    assert sum(v.nbytes for v in values.values()) > 16 << 10  # past the client's shared-memory floor
    with Client(server.address, timeout=WAIT, shm=True) as c:
        d = c.dict(values)
        assert any(seen)
        back = c.dict(d)
        assert list(back) == list(values) and all(same(back[n], v) for n, v in values.items())
        assert c.stats()["methods"][f"{SERVICE}/CreateDictionary"]["bytes_received"] == 0  # nothing streamed


def test_packed_shared_memory_headers_stay_within_a_small_message_cap(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server capped at 64 KiB messages takes a client's 32 KiB chunks; packed shared-memory headers
    are bounded by the client's chunk size too (bounded by 1 MiB of the tensors they stand for, 2,000
    headers made one message over the cap: RESOURCE_EXHAUSTED). Every tensor here through the
    region (SHARED_MIN_TENSOR_BYTES 0), and then as the default sends them, in the stream's messages."""
    from weightavg import _shm

    for inline_below in (0, _shm.SHARED_MIN_TENSOR_BYTES):
        monkeypatch.setattr(_shm, "SHARED_MIN_TENSOR_BYTES", inline_below)
        _headers_within_a_small_cap(start_server)


def _headers_within_a_small_cap(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(allow_shm=True, max_message_bytes=64 << 10, chunk_bytes=32 << 10)
    values = {f"a.rather.long.entry.name.of.a.deep.model.block{i}.weight": np.full(8, i, np.float32) for i in range(4000)}
    with Client(server.address, timeout=WAIT, shm=True, chunk_bytes=32 << 10) as c:
        d = c.dict(values)
        with Client(server.address, timeout=WAIT, chunk_bytes=32 << 10) as streamed:  # packed replies fit too
            back = streamed.dict(d)
        assert all(same(back[n], v) for n, v in values.items())


def test_chunks_packed_deeper_than_protobuf_allows_are_refused_without_a_crash(live_server: LiveServer) -> None:
    """A crafted message nesting packed chunks thousands deep (a few bytes a level) is read by the
    hand decoder one level deep only; protobuf's depth limit refuses the rest: INVALID_ARGUMENT,
    where unbounded recursion would exhaust the interpreter's stack."""
    body = pb.TensorChunk(name="x", dtype=pb.DTYPE_FLOAT32, shape=[0]).SerializeToString()
    tag = bytes([9 << 3 | 2])
    for _ in range(5000):
        body = tag + wire._varint(len(body)) + body
    message = bytes([1 << 3 | 2]) + wire._varint(len(body)) + body  # CreateDictionaryRequest.chunk
    with grpc.insecure_channel(live_server.address) as channel:
        create = channel.stream_unary(f"{SERVICE}/CreateDictionary", response_deserializer=pb.CreateDictionaryResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            create(iter([message]), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Exception) as fetched:
        wire.join_chunks([wire.decode_fetch_response(message)])
    assert not isinstance(fetched.value, RecursionError)


def test_the_client_packs_only_for_a_server_that_says_it_reads_packed_chunks(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server from before packing would drop the packed chunks (protobuf skips a field it does not
    know): the client packs only after GetServerInfo said packed_chunks, here answered false."""
    from weightavg_server.transport import servicer

    seen = watch_packing(monkeypatch)
    values = small_tensors(50)
    old_info = servicer.WeightAveragingServicer.GetServerInfo

    def info_of_an_older_server(self: Any, request: Any, context: Any) -> pb.GetServerInfoResponse:
        reply: pb.GetServerInfoResponse = old_info(self, request, context)
        reply.packed_chunks = False
        return reply

    monkeypatch.setattr(servicer.WeightAveragingServicer, "GetServerInfo", info_of_an_older_server)
    server = start_server()
    with Client(server.address, timeout=WAIT) as c:
        d = c.dict(values)
        assert seen and not any(seen)
        assert all(same(c.dict(d)[n], v) for n, v in values.items())
    monkeypatch.setattr(servicer.WeightAveragingServicer, "GetServerInfo", old_info)
    seen.clear()
    with Client(start_server().address, timeout=WAIT) as c:  # a server that says so (handlers bind at start)
        c.dict(values)
        assert any(seen)
