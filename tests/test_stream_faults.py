"""Fault injection on declared tensor streams, over loopback: uploads cut at random byte offsets and
uploads with one bit flipped are refused with nothing changed, and the whole upload, sent between
them, is never refused. The same faults on a fetched stream are caught by the client's check.

Seeded and bounded: the same few dozen faults each run.
"""

from __future__ import annotations

import random
import threading
import time
import types
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from conftest import LiveServer, assert_unchanged, snapshot
from weightavg import Client, DataLossError
from weightavg import wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg_server.transport import codec, servicer

import torch

SERVICE = pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED}
"""A fault may also turn a dimension huge (over the upload cap); any of these refuses the whole call."""
CUTS, FLIPS = 40, 60

rng = np.random.default_rng(7)
TENSORS = [
    ("weights", rng.standard_normal((30, 100)).astype(np.float32)),  # 12000 bytes: three 4 KiB chunks and a tail
    ("steps", np.arange(10, dtype=np.int64)),
    (".n", np.float64(3.0)),
    ("mask", (rng.random(5000) > 0.5)),
    ("empty", np.zeros((0, 4), np.float32)),
]
CHUNK = 4096


def messages(message_type: type, pack: bool = False) -> list[bytes]:
    """The stream a client sends: encoded messages, declared, a CRC32C per tensor; with `pack`,
    small chunks packed together as the client packs them for a server that reads packed chunks."""
    encoded = wire.encoded_chunks(TENSORS, CHUNK, message_type)
    return list(wire.packed_stream(encoded, CHUNK) if pack else encoded)


@pytest.fixture(scope="module")
def channel(live_server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live_server.address) as ch:
        yield ch


def send(channel: grpc.Channel, method: str, response: type, stream: list[bytes]) -> object:
    """Raw bytes as request messages (no serializer), so broken messages go out as they are."""
    call = channel.stream_unary(f"/{SERVICE}/{method}", response_deserializer=response.FromString)
    return call(iter(stream), timeout=60)


def cut(stream: list[bytes], offset: int) -> list[bytes]:
    """The stream as far as byte `offset` of its concatenation: whole messages, then the part of the
    one the cut falls in (sent as a message of its own, as a proxy that forwards what it has might)."""
    out, start = [], 0
    for message in stream:
        if start + len(message) <= offset:
            out.append(message)
        elif start < offset:
            out.append(message[: offset - start])
        start += len(message)
    return out


def flip(stream: list[bytes], r: random.Random) -> list[bytes]:
    """The stream with one bit flipped in one message."""
    i = r.randrange(len(stream))
    raw = bytearray(stream[i])
    bit = r.randrange(len(raw) * 8)
    raw[bit // 8] ^= 1 << (bit % 8)
    return [*stream[:i], bytes(raw), *stream[i + 1:]]


def offsets(stream: list[bytes], r: random.Random) -> list[int]:
    """Every message boundary inside the stream (a cut between two tensors among them), and random
    byte offsets, each with at least one byte sent and at least one missing."""
    total = sum(map(len, stream))
    bounds, at = [], 0
    for message in stream[:-1]:
        at += len(message)
        bounds.append(at)
    return sorted(set(bounds) | {r.randrange(1, total) for _ in range(CUTS)})


@pytest.mark.parametrize("pack", [False, True])
def test_cut_and_flipped_dictionary_uploads_are_refused_whole_uploads_never(
    live_server: LiveServer, channel: grpc.Channel, client: Client, pack: bool
) -> None:
    stream = messages(pb.CreateDictionaryRequest, pack)
    assert len(stream) > (3 if pack else len(TENSORS))  # several chunks a tensor: cuts inside tensors and between them
    assert pack == any(pb.CreateDictionaryRequest.FromString(m).chunk.packed for m in stream)
    r = random.Random(15)
    faults = [cut(stream, o) for o in offsets(stream, r)] + [flip(stream, r) for _ in range(FLIPS)]
    for n, faulty in enumerate(faults):
        before = snapshot(live_server.registry)
        with pytest.raises(grpc.RpcError) as err:
            send(channel, "CreateDictionary", pb.CreateDictionaryResponse, faulty)
        assert err.value.code() in REFUSED, (n, err.value.code(), err.value.details())
        assert_unchanged(before, snapshot(live_server.registry))
        if n % 10 == 0:  # the whole stream, between faults, is taken and holds what was sent
            made = send(channel, "CreateDictionary", pb.CreateDictionaryResponse, stream)
            handle = made.dictionary.id  # type: ignore[attr-defined]
            got = client.dict(handle_of(handle))
            assert list(got) == [name for name, _ in TENSORS]
            for name, value in TENSORS:
                assert np.array_equal(got[name], value)
            client.free(handle)


def test_cut_and_flipped_updates_change_nothing(live_server: LiveServer, channel: grpc.Channel, client: Client) -> None:
    d = client.dict({"keep": np.arange(4, dtype=np.float32)})
    first = pb.UpdateDictionaryRequest(dictionary=d.id).SerializeToString()
    stream = messages(pb.UpdateDictionaryRequest)
    r = random.Random(16)
    faults = [cut(stream, o) for o in offsets(stream, r)[: CUTS // 2]] + [flip(stream, r) for _ in range(FLIPS // 2)]
    for n, faulty in enumerate(faults):
        before = snapshot(live_server.registry)
        with pytest.raises(grpc.RpcError) as err:
            send(channel, "UpdateDictionary", pb.UpdateDictionaryResponse, [first, *faulty])
        assert err.value.code() in REFUSED, (n, err.value.code(), err.value.details())
        assert_unchanged(before, snapshot(live_server.registry))
    send(channel, "UpdateDictionary", pb.UpdateDictionaryResponse, [first, *stream])
    assert list(client.dict(d)) == ["keep", *(name for name, _ in TENSORS)]


def test_an_undeclared_stream_from_an_older_client_is_still_taken(live_server: LiveServer, channel: grpc.Channel, client: Client) -> None:
    """Old clients send neither count nor checksums: the contract only grew, so they keep working."""
    old = [
        pb.CreateDictionaryRequest(chunk=pb.TensorChunk(name="a", dtype=pb.DTYPE_FLOAT32, shape=[2],
                                                        data=np.array([1, 2], np.float32).tobytes())).SerializeToString(),
    ]
    made = send(channel, "CreateDictionary", pb.CreateDictionaryResponse, old)
    handle = made.dictionary.id  # type: ignore[attr-defined]
    assert list(client.dict(handle_of(handle))["a"]) == [1.0, 2.0]
    client.free(handle)


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_undeclared_uploads_the_client_abandons_change_nothing(
    live_server: LiveServer, channel: grpc.Channel, client: Client, ending: str
) -> None:
    """A client generated from the .proto need not declare its streams. When it cancels an upload, or
    its deadline passes, gRPC ends the server's request stream as if the client had sent its last
    message, and marks the call over only a moment later: about one time in four the server used to
    commit what had arrived (a dictionary created, an entry set) and answer CANCELLED or
    DEADLINE_EXCEEDED. Twelve tries of each of two uploads, each leaving every handle as it was."""
    d = client.dict({"keep": np.arange(4, dtype=np.float32)})
    chunk = pb.TensorChunk(name="keep", dtype=pb.DTYPE_FLOAT32, shape=[4], data=np.ones(4, np.float32).tobytes())
    uploads = [
        ("UpdateDictionary", pb.UpdateDictionaryResponse, pb.UpdateDictionaryRequest(dictionary=d.id, chunk=chunk)),
        ("CreateDictionary", pb.CreateDictionaryResponse, pb.CreateDictionaryRequest(chunk=chunk)),
    ]
    for _ in range(12):
        for method, response, first in uploads:
            before = snapshot(live_server.registry)
            gate = threading.Event()

            def requests() -> Iterator[bytes]:
                yield first.SerializeToString()
                gate.wait(30)  # neither more messages nor the end of the stream until the call is over

            call = channel.stream_unary(f"/{SERVICE}/{method}", response_deserializer=response.FromString)
            future = call.future(requests(), timeout=0.1 if ending == "deadline" else 30)
            time.sleep(0.05)  # the first message reaches the server
            if ending == "cancel":
                future.cancel()
            with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
                future.result()
            gate.set()
            # The server's side of the call finishes (a call cancelled before it reached the server
            # is not among its methods: a fresh server under load can see none of them).
            while client.stats()["methods"].get(f"/{SERVICE}/{method}", {}).get("in_flight", 0):
                time.sleep(0.005)
            assert_unchanged(before, snapshot(live_server.registry))
    client.free(d)


def test_only_undeclared_streams_of_tensors_wait_to_learn_how_they_ended(  # type: ignore[no-untyped-def]
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait above (servicer.SETTLE_SECONDS) is for an undeclared stream that carried tensors.
    Declared uploads (the Python client's) and streams of no tensor (RunForward on an input handle,
    on every training step) answer at once: a first version waited on those too, 20 ms a forward
    pass. The waits are recorded, not timed: a clock read around the calls can fail on a loaded machine."""
    waits: list[float | None] = []

    class RecordedEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return super().wait(timeout)

    monkeypatch.setattr(servicer, "threading", types.SimpleNamespace(Event=RecordedEvent))
    server = start_server()
    with Client(server.address, timeout=60) as c, grpc.insecure_channel(server.address) as ch:
        q, x = c.module(["linear", 2, 1]), c.tensor(np.ones((1, 2), np.float32))
        c.forward(q, x)
        c.dict({"w": np.ones(2, np.float32)})
        assert waits == []
        chunk = pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=[1], data=b"\0" * 4)  # undeclared
        call = ch.stream_unary(f"/{SERVICE}/CreateDictionary", response_deserializer=pb.CreateDictionaryResponse.FromString)
        call(iter([pb.CreateDictionaryRequest(chunk=chunk).SerializeToString()]), timeout=60)
        assert waits == [servicer.SETTLE_SECONDS]


@pytest.mark.parametrize("pack", [False, True])
def test_a_fetched_stream_cut_or_flipped_is_caught_by_the_client(pack: bool) -> None:
    named = [(name, torch.from_numpy(np.array(value))) for name, value in TENSORS]
    stream = [encoded.message for encoded in codec.encoded_chunks(named, CHUNK, pack=pack)]
    assert len(stream) > 1
    whole = wire.join_chunks(wire.decode_fetch_response(m) for m in stream)
    assert [name for name, _ in whole] == [name for name, _ in TENSORS]
    r = random.Random(17)
    for end in range(1, len(stream)):  # gRPC frames whole messages: a reply can only lose its last ones
        with pytest.raises(DataLossError):  # as docs/clients.md says (it was a bare ValueError inside a tensor)
            wire.join_chunks(wire.decode_fetch_response(m) for m in stream[:end])
    for _ in range(FLIPS):
        # DecodeError: a message protobuf cannot parse, raised by the deserializer (gRPC's call fails)
        with pytest.raises((DataLossError, DecodeError)):
            wire.join_chunks(wire.decode_fetch_response(m) for m in flip(stream, r))


def handle_of(handle_id: str):  # type: ignore[no-untyped-def]
    from weightavg import Handle

    return Handle(handle_id, "dictionary")
