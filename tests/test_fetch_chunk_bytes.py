"""FetchTensorsRequest.max_chunk_bytes: a reader whose gRPC receive limit is below the server's
--chunk-bytes fetches tensors of any size, against a real server on loopback.

Before the field, every reply message carried up to the server's chunk (4 MiB by default) plus a
header, and a client with a 1 MiB receive limit got RESOURCE_EXHAUSTED "Received message larger
than max" for any tensor over 1 MiB, every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import LiveServer
from weightavg import Client
from weightavg import wire
from weightavg.v1 import weightavg_pb2 as pb

MIB = 1 << 20
SERVER_CHUNK = wire.CHUNK_BYTES
"""The shared server's --chunk-bytes: the default, 4 MiB."""
FETCH = "/weightavg.v1.WeightAveragingService/FetchTensors"


def same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture
def small_limit(live_server: LiveServer) -> Iterator[Client]:
    """A client whose messages, both ways, are at most 1 MiB: a quarter of the server's chunk."""
    with Client(live_server.address, timeout=120, max_message_bytes=MIB, chunk_bytes=MIB - 1024) as c:
        yield c


def raw_fetch(address: str, request: pb.FetchTensorsRequest) -> list[bytes]:
    """The reply's messages as they came, serialized (a receive limit of 64 MiB)."""
    options = [("grpc.max_receive_message_length", 64 * MIB)]  # above any chunk the server sends
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream(
            FETCH, request_serializer=pb.FetchTensorsRequest.SerializeToString, response_deserializer=lambda b: b
        )
        return list(call(request, timeout=120))


def chunks_of(messages: list[bytes]) -> list[pb.TensorChunk]:
    """Each message's chunk (its packed chunks inside it: wire.join_chunks reads them)."""
    return [pb.FetchTensorsResponse.FromString(message).chunk for message in messages]


def data_sizes(chunks: list[pb.TensorChunk]) -> list[int]:
    """Every chunk's data bytes, packed ones too."""
    return [len(c.data) for chunk in chunks for c in (chunk, *chunk.packed)]


def test_a_client_with_a_1_mib_limit_fetches_a_16_mb_tensor_bit_identically(
    client: Client, small_limit: Client
) -> None:
    x = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)  # 16 MB
    d = client.dict({"w": x})
    t = client.tensor(x)
    assert same(small_limit.dict(d, "w"), x)
    assert same(small_limit.tensor(t), x)


def test_a_client_with_a_1_mib_limit_fetches_large_and_packed_small_tensors_and_long_names(
    client: Client, small_limit: Client
) -> None:
    """Many small tensors (packed replies) around large ones, and a name of 3,000 bytes, whose header
    goes alone, its data after it: with a full chunk it went over the limit."""
    rng = np.random.default_rng(1)
    values: dict[str, np.ndarray] = {f"b{i}": rng.standard_normal(1 + i % 300).astype(np.float32) for i in range(500)}
    values["big"] = rng.standard_normal((1000, 700))  # 5.6 MB of float64
    values["n" * 3000] = rng.integers(0, 255, 3 * MIB, dtype=np.uint8)
    d = client.dict(values)
    got = small_limit.dict(d)
    assert list(got) == list(values)
    assert all(same(got[k], v) for k, v in values.items())


def test_the_server_cuts_and_packs_no_more_than_max_chunk_bytes(client: Client, live_server: LiveServer) -> None:
    rng = np.random.default_rng(2)
    values = {f"s{i}": rng.standard_normal(100).astype(np.float32) for i in range(400)}  # 400 B each
    values["big"] = rng.standard_normal(1_000_000).astype(np.float32)  # 4 MB
    d = client.dict(values)
    limit = 64 << 10
    request = pb.FetchTensorsRequest(handle=d.id, packed_chunks=True, max_chunk_bytes=limit)
    messages = raw_fetch(live_server.address, request)
    chunks = chunks_of(messages)
    assert max(data_sizes(chunks)) == limit  # the big tensor is cut at the limit
    assert max(len(m) for m in messages) <= limit + 64  # packing respects it too (plus framing)
    assert any(len(pb.FetchTensorsResponse.FromString(m).chunk.packed) > 0 for m in messages)  # and still packs
    got = dict(wire.join_chunks(chunks))
    assert all(same(got[k], v) for k, v in values.items())


def test_a_max_chunk_bytes_above_the_servers_chunk_or_unset_gives_the_servers(
    client: Client, live_server: LiveServer
) -> None:
    x = np.random.default_rng(3).standard_normal(3_000_000).astype(np.float32)  # 12 MB: three 4 MiB chunks
    d = client.dict({"w": x})
    for asked in (0, SERVER_CHUNK + 1, 1 << 40, (1 << 64) - 1):
        chunks = chunks_of(raw_fetch(live_server.address, pb.FetchTensorsRequest(handle=d.id, max_chunk_bytes=asked)))
        assert max(data_sizes(chunks)) == SERVER_CHUNK, asked
        assert same(dict(wire.join_chunks(chunks))["w"], x)


@pytest.mark.parametrize("asked", [1, 1023])
def test_a_max_chunk_bytes_below_1_kib_is_refused_naming_the_fix(
    client: Client, live_server: LiveServer, asked: int
) -> None:
    d = client.dict({"w": np.arange(10, dtype=np.float32)})
    with pytest.raises(grpc.RpcError) as caught:
        raw_fetch(live_server.address, pb.FetchTensorsRequest(handle=d.id, max_chunk_bytes=asked))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_chunk_bytes ({asked})" in caught.value.details()
    assert "give at least 1024, or 0" in caught.value.details()
    # the smallest value taken works
    chunks = chunks_of(raw_fetch(live_server.address, pb.FetchTensorsRequest(handle=d.id, max_chunk_bytes=1024)))
    assert same(dict(wire.join_chunks(chunks))["w"], np.arange(10, dtype=np.float32))


def test_the_client_asks_for_its_chunk_bytes_within_its_receive_limit(live_server: LiveServer) -> None:
    """What each fetch of a Client asks: its chunk_bytes, less the header room under its limit; never
    below the server's floor; with a channel of the caller's (whose limit it does not know), its
    chunk_bytes."""
    def asked(c: Client) -> int:
        with c:
            return c._reply_chunk_bytes

    address = live_server.address
    assert asked(Client(address)) == SERVER_CHUNK
    assert asked(Client(address, max_message_bytes=MIB, chunk_bytes=MIB - 1024)) == MIB - 1024
    assert asked(Client(address, chunk_bytes=100)) == 1024
    assert asked(Client(address, max_message_bytes=-1, chunk_bytes=8 * MIB)) == 8 * MIB
    with grpc.insecure_channel(address) as channel:
        assert asked(Client(address, channel=channel, chunk_bytes=2 * MIB)) == 2 * MIB


LONG = "n" * 3000
"""An entry name of 3,000 bytes: a header over the wire's 512 bytes of header room, under its old 4 KiB."""


def test_a_long_named_tensor_goes_up_through_a_limit_that_keeps_1_kib_of_room(
    client: Client, small_limit: Client
) -> None:
    """Its header went up with a full chunk (1 MiB less 1 KiB plus 3,000 bytes): RESOURCE_EXHAUSTED
    "CLIENT: Sent message larger than max" from a client whose chunk_bytes its own check allowed."""
    x = np.random.default_rng(4).integers(0, 255, 3 * MIB, dtype=np.uint8)
    d = small_limit.dict({LONG: x})
    assert same(client.dict(d, LONG), x)


def test_a_server_at_its_own_cap_sends_a_long_named_tensor(start_server: Any) -> None:
    """--chunk-bytes at --max-message-bytes less 1024, as the server's config allows: the header of a
    long name with a full chunk went over the server's own send cap (RESOURCE_EXHAUSTED "SERVER:
    Sent message larger than max"), to every client, whatever it asked."""
    server = start_server(max_message_bytes=MIB, chunk_bytes=MIB - 1024)
    x = np.random.default_rng(5).integers(0, 255, 3 * MIB, dtype=np.uint8)
    with Client(server.address, timeout=120, chunk_bytes=64 << 10) as c:
        d = c.dict({LONG: x})
        assert same(c.dict(d, LONG), x)
        chunks = chunks_of(raw_fetch(server.address, pb.FetchTensorsRequest(handle=d.id)))  # the server's chunks
        assert same(dict(wire.join_chunks(chunks))[LONG], x)


# -- the other streamed replies: RunEpoch, RunTest, EvaluateModel ------------------------------------

WIDE = ["sequential", ["linear", "a", 8, 1024]]
"""Outputs of 4 KiB a row: 600 rows make 2.4 MB, over the small client's 1 MiB."""


def _wide_model(c: Client, rows: int = 600) -> tuple[Any, Any, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((rows, 8), dtype=np.float32), rng.integers(0, 1024, rows).astype(np.int64)
    q = c.module(WIDE)
    m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.01))  # q stays the module's handle too
    c.train(m, x, y)
    c.test(m, x, y)
    return q, m, x


def test_epoch_test_and_evaluate_replies_fit_a_small_receive_limit(live_server: LiveServer, small_limit: Client) -> None:
    """Each used to fail at the client with "Received message larger than max" once its output
    metric or output passed the client's limit: the server cut them at its own 4 MiB."""
    with Client(live_server.address, timeout=120) as wide:
        q, m, x = _wide_model(wide)
        expected = wide.evaluate(m, x)
        assert expected.nbytes > 2 * MIB
        assert same(small_limit.evaluate(m, x), expected)
        small_limit.test(m, metrics="output")
        assert same(small_limit.testrun(m), wide.testrun(m))
        small_limit.train(m, metrics="output")
        output = small_limit.run(m)
        assert output.shape == (600, 1024) and np.isfinite(output).all()


@pytest.mark.parametrize("method", ["RunEpoch", "RunTest"])
def test_a_too_small_reply_chunk_is_refused_before_the_epoch_or_test_runs(live_server: LiveServer, method: str) -> None:
    with Client(live_server.address, timeout=120) as c:
        q, m, _ = _wide_model(c, rows=40)
        view = c.parms(q)
        before = c.dict(view)
        request = (pb.RunEpochRequest if method == "RunEpoch" else pb.RunTestRequest)(model=m.id, max_chunk_bytes=1)
        with grpc.insecure_channel(live_server.address) as channel:
            call = channel.unary_stream(
                f"/weightavg.v1.WeightAveragingService/{method}", request_serializer=type(request).SerializeToString,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as err:
                list(call(request, timeout=120))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_chunk_bytes (1)" in (err.value.details() or "")
        after = c.dict(view)
        assert all(same(before[k], after[k]) for k in before)  # nothing trained
