"""Exactly-once calls through real servers: request IDs, the client's retries, lost answers.

A proxy on loopback (faults.CuttingProxy) drops the connection once the server has applied a call
and before its answer reaches the client; the client retries with the same request ID and must get
the first answer, with the call applied once. Calls with chosen IDs go through the generated stub.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from conftest import LiveServer
from faults import CuttingProxy
from weightavg import (
    Client, FailedPreconditionError, Handle, InvalidArgumentError, NotFoundError, RetryPolicy, UnavailableError,
)
from weightavg import wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain import shm
from weightavg_server.ops.app import Runtime, create_runtime
from weightavg_server.ops.cli import build_parser, config_from_args
from weightavg_server.ops.config import ServerConfig
from weightavg_server.store import snapshot
from weightavg_server.store.registry import Registry
from weightavg_server.transport.requests import UPLOAD_DIGEST_TAG

ID = "5b1d8f2a-3c4e-4f60-8a7b-9c0d1e2f3a4b"
OTHER = "6c2e9a3b-4d5f-4a71-9b8c-0d1e2f3a4b5c"
WAIT = 60.0
"""Seconds a test waits for a condition it polls, or for its threads; never an assertion on speed."""
NET = ["sequential", ["linear", "a", 4, 3], ["linear", "b", 3, 2]]


@pytest.fixture
def server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


@pytest.fixture
def proxy(server: LiveServer) -> Iterator[CuttingProxy]:
    with CuttingProxy(server.address) as p:
        yield p


@pytest.fixture
def stub(server: LiveServer) -> Iterator[pb_grpc.WeightAveragingServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.WeightAveragingServiceStub(channel)


def count_of(server: LiveServer, dictionary: Handle) -> float:
    """The samples in an average (a copy not yet averaged into has no ".n": it is one sample)."""
    return float(server.registry.get(dictionary.id).obj.entries.get(".n", 1))


def method_count(c: Client, name: str) -> int:
    stats = c.stats()["methods"].get(f"/weightavg.v1.WeightAveragingService/{name}")
    return 0 if stats is None else int(stats["count"])


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def server_calls_ended(method: str) -> bool:
    """Whether this process's gRPC server sees every call of `method` it still runs as ended
    (cancelled, or past its deadline): what `context.is_active()` tells its handler. A client's
    DEADLINE_EXCEEDED comes from the client's own timer, a moment before the server's call is
    marked, so a test that then frees what the handler waits for must wait for the server too.
    Read from grpc's server contexts (internal, but plain attributes), since no API lists them."""
    import gc
    import grpc._server

    contexts = [o for o in gc.get_objects() if type(o) is grpc._server._Context]  # no isinstance: torch warns
    return all(
        not ctx.is_active() for ctx in contexts if ctx._rpc_event.call_details.method.decode().endswith("/" + method)
    )


def average(stub: pb_grpc.WeightAveragingServiceStub, m: Handle, p: Handle, request_id: str) -> pb.AverageParametersResponse:
    request = pb.AverageParametersRequest(handle=m.id, dictionary=p.id, request_id=request_id)
    response: pb.AverageParametersResponse = stub.AverageParameters(request, timeout=WAIT)
    return response


# -- a lost answer, retried ---------------------------------------------------------------------------------


def test_a_lost_avgparms_answer_is_retried_and_counts_the_sample_once(server: LiveServer, proxy: CuttingProxy) -> None:
    with Client(proxy.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        proxy.arm()
        assert c.avgparms(m, p) == 2
        assert proxy.cuts == 1 and proxy.connections == 2  # the answer was lost; the retry reconnected
        assert count_of(server, p) == 2
        assert method_count(c, "AverageParameters") == 2  # two attempts reached the server...
        assert c.stats()["request_ids"]["duplicates_answered"] == 1  # ...and the second got the first answer
        assert c.avgparms(m, p) == 3  # the next call is a new one


def test_a_lost_dictionary_update_is_retried_from_the_start_and_applied_once(
    server: LiveServer, proxy: CuttingProxy
) -> None:
    with Client(proxy.address, timeout=WAIT, chunk_bytes=256) as c:  # a many-chunk upload, re-sent whole
        d = c.dict({"w": np.zeros(300), "keep": np.ones(2)})
        value = np.arange(300, dtype=np.float64)
        proxy.arm()
        c.dict(d, {"w": value, "extra": np.float32(7)})
        assert proxy.cuts == 1
        assert method_count(c, "UpdateDictionary") == 2
        assert c.stats()["request_ids"]["duplicates_answered"] == 1
        assert list(c.size(d)) == ["w", "keep", "extra"]
        np.testing.assert_array_equal(c.dict(d, "w"), value)


def test_a_lost_create_makes_one_object(proxy: CuttingProxy) -> None:
    with Client(proxy.address, timeout=WAIT) as c:
        before = len(c.handles())
        proxy.arm()
        d = c.dict({"a": np.ones(3)})
        assert proxy.cuts == 1
        assert [h.handle for h in c.handles()][before:] == [d]


def test_a_lost_epoch_trains_once(proxy: CuttingProxy, server: LiveServer) -> None:
    x = np.random.default_rng(0).standard_normal((40, 4), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 2, 40)
    with Client(proxy.address, timeout=WAIT) as c:
        models = []
        for _ in range(2):
            q = c.module(NET)
            models.append(c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1, 0.9)))
            c.train(models[-1], x, y)
        c.copyparms(models[1], c.copyparms(models[0]))  # the same starting weights
        proxy.arm()
        lost = c.run(models[0])
        assert proxy.cuts == 1 and c.stats()["request_ids"]["duplicates_answered"] == 1
        once = c.run(models[1])
        np.testing.assert_array_equal(lost, once)
        for name in c.parmnames(models[0]):
            np.testing.assert_array_equal(c.parm(models[0], name), c.parm(models[1], name))


def test_a_lost_epoch_whose_answer_is_too_large_to_remember_trains_once(
    start_server: Callable[..., LiveServer]
) -> None:
    """An epoch's `output` metric over the byte cap is not remembered; until 2026-11-28 nothing
    was, so the client's retry of a lost answer trained a second epoch. Now the retry is refused
    FAILED_PRECONDITION, naming the flag, and the model holds one epoch's training."""
    server = start_server(max_request_id_bytes=4096)
    x = np.random.default_rng(0).standard_normal((400, 4), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 2, 400)
    with CuttingProxy(server.address) as proxy, Client(proxy.address, timeout=WAIT) as c:
        models = []
        for _ in range(2):
            q = c.module(NET)
            models.append(c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1, 0.9)))
            c.train(models[-1], x, y)
            c.train(models[-1], metrics=["loss", "output"])  # 400 x 2 float32 outputs: 3200 bytes
        c.copyparms(models[1], c.copyparms(models[0]))
        proxy.arm()
        with pytest.raises(FailedPreconditionError, match="ran and succeeded.*--max-request-id-bytes"):
            c.run(models[0])
        assert proxy.cuts == 1 and method_count(c, "RunEpoch") == 2
        c.run(models[1])
        for name in c.parmnames(models[0]):
            np.testing.assert_array_equal(c.parm(models[0], name), c.parm(models[1], name))


def test_a_lost_close_session_answer_is_retried_and_answers_what_it_freed(
    server: LiveServer, proxy: CuttingProxy, stub: pb_grpc.WeightAveragingServiceStub
) -> None:
    """CloseSession carries the session it ends in its metadata: the retry finds that session gone
    and must still reach the request table for the first answer (it was NOT_FOUND before). Without
    a remembered answer, a call in an ended session is still refused."""
    c = Client(proxy.address, timeout=WAIT, session=True)
    try:
        session = c.session
        c.dict({"a": np.ones(3)})
        c.dict({"b": np.ones(3)})
        proxy.arm()
        assert c.close_session() == 2
        assert proxy.cuts == 1 and method_count(c, "CloseSession") == 2
        assert c.stats()["request_ids"]["duplicates_answered"] == 1
        assert len(server.registry) == 0 and server.registry.sessions() == []
    finally:
        c.close()
    in_ended = (("weightavg-session", str(session)),)
    with pytest.raises(grpc.RpcError) as new_close:  # another close, not a retry: nothing to answer
        stub.CloseSession(pb.CloseSessionRequest(request_id=OTHER), metadata=in_ended, timeout=WAIT)
    with pytest.raises(grpc.RpcError) as create:  # other calls in the ended session: refused as before
        stub.CreateTensor(iter([pb.CreateTensorRequest(request_id=ID)]), metadata=in_ended, timeout=WAIT)
    for refused in (new_close, create):
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown session" in str(refused.value.details())
    assert len(server.registry) == 0


def test_without_retries_a_lost_answer_is_an_error_although_the_call_ran(
    server: LiveServer, proxy: CuttingProxy
) -> None:
    """What the retries are for; and a client may turn them off."""
    with Client(proxy.address, timeout=WAIT, retry=RetryPolicy(max_attempts=1)) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        proxy.arm()
        with pytest.raises(UnavailableError):
            c.avgparms(m, p)
        assert count_of(server, p) == 2


def test_only_unavailable_is_retried(client: Client) -> None:
    before = method_count(client, "AverageParameters")
    with pytest.raises(NotFoundError):
        client.avgparms("mod_unknown", "dic_unknown")
    assert method_count(client, "AverageParameters") == before + 1


def test_an_unreachable_server_fails_after_the_attempts_allowed() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound but not listening: refused
        with Client(address, timeout=WAIT, retry=RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0)) as c:
            with pytest.raises(UnavailableError, match="is the server running"):
                c.ping()


# -- the server's side, with chosen IDs ---------------------------------------------------------------------


def test_a_repeated_id_gets_the_same_response_message(
    server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub
) -> None:
    with Client(server.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        first = average(stub, m, p, ID)
        again = average(stub, m, p, ID.upper())
        assert first.count == 2 and again.SerializeToString() == first.SerializeToString()
        assert count_of(server, p) == 2


def test_the_same_id_with_other_arguments_is_invalid_and_changes_nothing(
    server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub
) -> None:
    with Client(server.address, timeout=WAIT) as c:
        m, m2 = c.module(NET), c.module(NET)
        p = c.copyparms(m)
        average(stub, m, p, ID)
        with pytest.raises(grpc.RpcError) as err:
            average(stub, m2, p, ID)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "was first used for average_parameters with other arguments" in str(err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadParameters(pb.LoadParametersRequest(handle=m.id, dictionary=p.id, request_id=ID), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not load_parameters" in str(err.value.details())
        assert count_of(server, p) == 2


def updates(d: Handle, request_id: str, value: np.ndarray) -> Iterator[bytes]:
    yield pb.UpdateDictionaryRequest(dictionary=d.id, request_id=request_id).SerializeToString()
    yield from wire.encoded_chunks([("w", value)], 64, pb.UpdateDictionaryRequest)


def test_an_upload_repeated_with_other_bytes_is_invalid(server: LiveServer) -> None:
    with Client(server.address, timeout=WAIT) as c, grpc.insecure_channel(server.address) as channel:
        update = channel.stream_unary(
            "/weightavg.v1.WeightAveragingService/UpdateDictionary",
            response_deserializer=pb.UpdateDictionaryResponse.FromString,
        )
        d = c.dict({"w": np.zeros(100)})
        value = np.arange(100.0)
        assert list(update(updates(d, ID, value), timeout=WAIT).names) == ["w"]
        assert list(update(updates(d, ID, value), timeout=WAIT).names) == ["w"]  # the same bytes: answered
        changed = value.copy()
        changed[77] = -1.0
        with pytest.raises(grpc.RpcError) as err:
            update(updates(d, ID, changed), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other arguments" in str(err.value.details())
        np.testing.assert_array_equal(c.dict(d, "w"), value)


needs_shm = pytest.mark.skipif(not os.path.isdir(shm.SHM_DIRECTORY), reason="needs POSIX shared memory in /dev/shm")


def region_floats(c: Client, offset: int, count: int) -> np.ndarray:
    """`count` float32s at `offset` of the client's registered upload region, written in place."""
    buffer = c._shm_buffer(1 << 16)
    assert buffer is not None, "the server took no shared memory"
    return np.frombuffer(buffer, dtype=np.float32, count=count, offset=offset)


def shared_update(c: Client, d: Handle, request_id: str, offset: int) -> pb.UpdateDictionaryResponse:
    """UpdateDictionary of entry "w" (4 float32s) whose bytes lie in the client's region at `offset`."""
    first = pb.UpdateDictionaryRequest(dictionary=d.id, request_id=request_id).SerializeToString()
    chunk = pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=[4], tensor_count=1, total_bytes=16,
                           shared=pb.SharedBytes(region=c._shm_names.region, offset=offset))
    body = pb.UpdateDictionaryRequest(chunk=chunk).SerializeToString()
    response: pb.UpdateDictionaryResponse = c._update_dictionary_stream(iter([first, body]), timeout=WAIT)
    return response


@needs_shm
def test_an_upload_repeated_with_other_bytes_in_shared_memory_is_invalid(
    start_server: Callable[..., LiveServer]
) -> None:
    """The bytes of a tensor in the caller's region are arguments as much as streamed bytes are: a
    repeat with other bytes there is refused (until 2026-11-28 it got the first answer, and the
    update applied zero times). The same bytes are the same call wherever they lie: at another
    offset, or sent in the stream (a retry that could not use the region)."""
    server = start_server(allow_shm=True)
    with Client(server.address, timeout=WAIT, shm=True) as c:
        d = c.dict({"w": np.zeros(4, np.float32)})
        region_floats(c, 4096, 4)[:] = [1, 2, 3, 4]
        assert list(shared_update(c, d, ID, 4096).names) == ["w"]
        region_floats(c, 4096, 4)[:] = [9, 9, 9, 9]
        with pytest.raises(grpc.RpcError) as err:
            shared_update(c, d, ID, 4096)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other arguments" in str(err.value.details())
        np.testing.assert_array_equal(c.dict(d, "w"), [1, 2, 3, 4])
        size = c._shm.size if c._shm is not None else 0
        with pytest.raises(grpc.RpcError) as err:  # a repeat's chunks are checked too, though not received
            shared_update(c, d, ID, size - 8)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the region" in str(err.value.details())

        region_floats(c, 8192, 4)[:] = [1, 2, 3, 4]
        assert list(shared_update(c, d, ID, 8192).names) == ["w"]  # the same bytes elsewhere: answered
        inline = updates(d, ID, np.array([1, 2, 3, 4], np.float32))
        assert list(c._update_dictionary_stream(inline, timeout=WAIT).names) == ["w"]  # and in the stream
        assert c.stats()["request_ids"]["duplicates_answered"] == 2
        np.testing.assert_array_equal(c.dict(d, "w"), [1, 2, 3, 4])


@needs_shm
def test_a_client_reusing_an_id_for_other_arrays_through_shared_memory_is_refused(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python client's own shared memory upload (arrays copied into its region, small ones
    packed), its request ID made constant as a buggy client's would be: other arrays under the
    same ID are refused, not answered with the first call's names while the entries keep the
    first arrays."""
    import weightavg._client

    server = start_server(allow_shm=True)
    with Client(server.address, timeout=WAIT, shm=True) as c:
        d = c.dict({"a": np.zeros(10_000, np.float32), "b": np.zeros(5_000, np.float32), "s": np.float32(0)})
        monkeypatch.setattr(weightavg._client, "new_request_id", lambda: ID)
        c.dict(d, {"a": np.ones(10_000, np.float32), "b": np.ones(5_000, np.float32), "s": np.float32(1)})
        assert c._shm is not None and c._shm.size  # the upload went through the region
        with pytest.raises(InvalidArgumentError, match="other arguments"):
            c.dict(d, {"a": np.full(10_000, 2, np.float32), "b": np.ones(5_000, np.float32), "s": np.float32(1)})
        np.testing.assert_array_equal(c.dict(d, "a"), np.ones(10_000, np.float32))


@needs_shm
def test_a_large_tensor_reused_under_an_id_with_other_values_is_refused_by_its_sample(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor from SAMPLED_FROM bytes adds a sample of its region bytes to the digest (reading all
    of them cost a third of a 256 MB upload): other values under the same ID (a training step's,
    which change every weight) are refused; the same values again are answered."""
    import weightavg._client
    from weightavg_server.transport.requests import SAMPLED_FROM

    n = SAMPLED_FROM  # 4 MiB of float32
    server = start_server(allow_shm=True)
    with Client(server.address, timeout=WAIT, shm=True) as c:
        d = c.dict({"w": np.zeros(n, np.float32)})
        monkeypatch.setattr(weightavg._client, "new_request_id", lambda: ID)
        first = np.random.default_rng(3).standard_normal(n).astype(np.float32)
        c.dict(d, {"w": first})
        assert c._shm is not None and c._shm.size  # the upload went through the region
        c.dict(d, {"w": first.copy()})  # the same bytes: the first answer
        assert c.stats()["request_ids"]["duplicates_answered"] == 1
        with pytest.raises(InvalidArgumentError, match="other arguments"):
            c.dict(d, {"w": first * 0.999})
        np.testing.assert_array_equal(c.dict(d, "w"), first)


def test_the_sample_of_a_large_tensor_reads_a_line_of_every_64_kib() -> None:
    from weightavg_server.transport.requests import SAMPLE_EVERY, SAMPLE_LINE, SAMPLED_FROM, sample

    small = bytes(range(256)) * 100
    assert sample(memoryview(small)) == small  # under SAMPLED_FROM: every byte
    data = bytearray(SAMPLED_FROM + 1000)
    lines = SAMPLED_FROM // SAMPLE_EVERY
    assert len(sample(memoryview(data))) == (lines + 1) * SAMPLE_LINE
    before = sample(memoryview(data))
    data[5 * SAMPLE_EVERY + 3] = 1  # in a sampled line
    assert sample(memoryview(data)) != before
    data[-1] = 7  # the last line
    changed = sample(memoryview(data))
    assert changed != before
    data[7 * SAMPLE_EVERY + SAMPLE_LINE] = 9  # between lines: not seen (docs/robust.md's known limit)
    assert sample(memoryview(data)) == changed


@needs_shm
def test_a_dictionary_from_shared_memory_repeated_with_other_bytes_is_invalid(
    start_server: Callable[..., LiveServer]
) -> None:
    """CreateDictionaryFromSharedMemory's digest covers the bytes its tensors have in the region:
    a repeat with other bytes there made no second dictionary but answered the first, holding
    the first bytes (until 2026-11-28)."""
    server = start_server(allow_shm=True)
    with Client(server.address, timeout=WAIT, shm=True) as c:
        request = pb.CreateDictionaryFromSharedMemoryRequest(
            region=c._shm_names.region, request_id=ID,
            tensors=[pb.SharedTensor(name="w", dtype=pb.DTYPE_FLOAT32, shape=[4], offset=4096, byte_size=16)],
        )
        region_floats(c, 4096, 4)[:] = [1, 2, 3, 4]
        first = c._stub.CreateDictionaryFromSharedMemory(request, timeout=WAIT)
        assert c._stub.CreateDictionaryFromSharedMemory(request, timeout=WAIT) == first  # the same bytes
        handles = len(c.handles())
        region_floats(c, 4096, 4)[:] = [9, 9, 9, 9]
        with pytest.raises(grpc.RpcError) as err:
            c._stub.CreateDictionaryFromSharedMemory(request, timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other arguments" in str(err.value.details())
        assert len(c.handles()) == handles
        np.testing.assert_array_equal(c.dict(first.dictionary.id, "w"), [1, 2, 3, 4])


@pytest.mark.parametrize(
    "request_id", ["00000000-0000-0000-0000-000000000000", "not-a-uuid", ID.replace("-", ""), ID + "x"]
)
def test_a_malformed_or_all_zero_id_is_invalid_argument(
    server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub, request_id: str
) -> None:
    with Client(server.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        with pytest.raises(grpc.RpcError) as err:
            average(stub, m, p, request_id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in str(err.value.details())
        assert count_of(server, p) == 1


def test_a_repeat_sent_while_the_first_runs_waits_and_gets_its_answer(
    server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub
) -> None:
    with Client(server.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        lock = server.registry.get(p.id).lock
        answers: list[int] = []

        def send() -> None:
            answers.append(average(stub, m, p, ID).count)

        threads = [threading.Thread(target=send, daemon=True) for _ in range(2)]
        with lock:  # the first call holds the ID and waits for the dictionary
            for t in threads:
                t.start()
            wait_for(lambda: c.stats()["methods"].get(
                "/weightavg.v1.WeightAveragingService/AverageParameters", {}).get("in_flight") == 2,
                "both calls to be in flight")
            assert count_of(server, p) == 1
        for t in threads:
            t.join(WAIT)
        assert answers == [2, 2] and count_of(server, p) == 2
        assert c.stats()["request_ids"]["duplicates_answered"] == 1


def test_a_change_whose_client_went_while_it_waited_for_a_busy_object_is_not_made(
    server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub
) -> None:
    """A client that gives up on an avgparms waiting for a busy object (its deadline passes, or it
    cancels) was told the call failed, yet until 2026-11-28 the server made the change once the
    object was free, so the caller's retry of the update (a new call, a new ID) counted the sample
    twice. Now a change whose client has gone by the time it gets its objects is not made, nor
    remembered: a retry with the same ID runs once. (The test holds the object's lock itself and
    cancels once the call is in flight: a deadline ends the call the same way, `is_active()`.)"""
    method = "/weightavg.v1.WeightAveragingService/AverageParameters"
    with Client(server.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)

        def in_flight() -> int:
            return int(c.stats()["methods"].get(method, {}).get("in_flight", 0))

        with server.registry.get(p.id).lock:
            request = pb.AverageParametersRequest(handle=m.id, dictionary=p.id, request_id=ID)
            call = stub.AverageParameters.future(request, timeout=WAIT)
            wait_for(lambda: in_flight() == 1, "the avgparms to wait for the dictionary")
            call.cancel()
            wait_for(lambda: server_calls_ended("AverageParameters"), "the server to see the call cancelled")
        wait_for(lambda: in_flight() == 0, "the cancelled avgparms to end")
        assert count_of(server, p) == 1  # not averaged in
        assert average(stub, m, p, ID).count == 2  # the retry runs, once
        assert count_of(server, p) == 2


def test_a_repeat_whose_deadline_passes_while_the_first_runs_frees_its_worker(
    server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub
) -> None:
    # A repeat cut off by its deadline kept waiting for the first call on a server worker thread
    # until that call ended: every retry of a long epoch cut off so held one more worker.
    method = "/weightavg.v1.WeightAveragingService/AverageParameters"
    with Client(server.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        answers: list[int] = []
        first = threading.Thread(target=lambda: answers.append(average(stub, m, p, ID).count), daemon=True)

        def in_flight() -> int:
            return int(c.stats()["methods"].get(method, {}).get("in_flight", 0))

        with server.registry.get(p.id).lock:  # the first call holds the ID and waits for the dictionary
            first.start()
            wait_for(lambda: in_flight() == 1, "the first call to be in flight")
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as cut:
                    stub.AverageParameters(
                        pb.AverageParametersRequest(handle=m.id, dictionary=p.id, request_id=ID), timeout=0.2
                    )
                assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: in_flight() == 1, "the repeats to stop waiting once their clients had gone")
            assert count_of(server, p) == 1
        first.join(WAIT)
        assert answers == [2] and count_of(server, p) == 2
        assert average(stub, m, p, ID).count == 2 and count_of(server, p) == 2  # a later retry: the answer


def test_an_id_is_forgotten_after_the_window(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(request_id_window_seconds=0.2)
    with Client(server.address, timeout=WAIT) as c, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        m = c.module(NET)
        p = c.copyparms(m)
        assert average(stub, m, p, ID).count == 2
        wait_for(lambda: c.stats()["request_ids"]["remembered"] == 0, "the window to pass")
        assert average(stub, m, p, ID).count == 3  # forgotten: it runs again


def test_at_the_cap_the_oldest_id_is_forgotten_first(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(max_request_ids=2)
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 4)]
    with Client(server.address, timeout=WAIT) as c:
        m = c.module(NET)
        p = c.copyparms(m)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.WeightAveragingServiceStub(channel)
            assert [average(stub, m, p, i).count for i in ids] == [2, 3, 4]
            assert average(stub, m, p, ids[2]).count == 4  # remembered
            assert average(stub, m, p, ids[0]).count == 5  # forgotten at the cap: runs again
        stats = c.stats()["request_ids"]
        assert stats["remembered"] == 2 and stats["dropped"] >= 2


def test_every_call_that_changes_state_takes_a_request_id() -> None:
    """The contract and the service agree: each request message with request_id is served by an
    exactly-once service method (test_request_table checks that every state-changing one is)."""
    from test_request_table import RUN_ONLY_FOR_THEIR_ANSWER, STATE_CHANGING_WITHOUT_IDS

    service = pb.DESCRIPTOR.services_by_name["WeightAveragingService"]
    keyed = {m.name for m in service.methods if "request_id" in m.input_type.fields_by_name}
    unkeyed = {m.name for m in service.methods} - keyed
    assert unkeyed == {
        "Ping", "GetServerInfo", "GetServerStats", "DescribeModule", "ListParameterNames", "ListBufferNames",
        "FetchTensors", "GetSize", "ListHandles", "GetLearningRate", "DescribeModel", "GetModelOptions",
        "RunTest", "EvaluateModel", "KeepAliveSession", "Snapshot", "FetchTensorsToSharedMemory", "ListSharedMemory",
    }
    assert len(keyed) == 41  # AllReduce and Broadcast: the cluster's
    first_numbered = {"UpdateMovingAverage": 11}  # its message came with the field before the rest got 15
    for m in service.methods:
        if m.name in keyed:
            field = m.input_type.fields_by_name["request_id"]
            assert field.number == first_numbered.get(m.name, 15) and field.type == field.TYPE_STRING, m.name
    assert {"keep_alive", "snapshot"} == STATE_CHANGING_WITHOUT_IDS
    assert {"evaluate", "run_test", "fetch", "fetch_to_shared_memory"} == RUN_ONLY_FOR_THEIR_ANSWER


# -- across a snapshot and a restart -------------------------------------------------------------------------


def test_request_ids_survive_a_snapshot_and_restart(state_server: Runtime, tmp_path: Path) -> None:
    with Client(f"127.0.0.1:{state_server.port}", timeout=WAIT) as c, \
            grpc.insecure_channel(f"127.0.0.1:{state_server.port}") as channel:
        m = c.module(NET)
        p = c.copyparms(m)
        first = average(pb_grpc.WeightAveragingServiceStub(channel), m, p, ID)
        c.snapshot()
    restarted = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "d")))
    restarted.start()
    try:
        address = f"127.0.0.1:{restarted.port}"
        with Client(address, timeout=WAIT) as c, grpc.insecure_channel(address) as channel:
            stub = pb_grpc.WeightAveragingServiceStub(channel)
            again = average(stub, m, p, ID)
            assert again.SerializeToString() == first.SerializeToString()
            assert float(restarted.registry.get(p.id).obj.entries[".n"]) == 2
            assert average(stub, m, p, OTHER).count == 3
            assert c.stats()["request_ids"]["duplicates_answered"] == 1
    finally:
        restarted.stop(None)


@pytest.mark.parametrize("older", ["5f" * 32, "crc32c:" + "5f" * 32])
def test_an_upload_remembered_by_an_older_server_is_answered_after_a_restart(
    state_server: Runtime, tmp_path: Path, older: str
) -> None:
    """A server before the CRC-32C upload digest saved its digests untagged (zlib's CRC-32 inside);
    one before shared memory bytes were hashed tagged them "crc32c:". Restarted from its snapshot,
    this server cannot check a repeat against such a digest, so a retry of that upload gets the
    remembered answer rather than INVALID_ARGUMENT, and runs no second time
    (store/requests.comparable)."""
    value = np.arange(100.0)
    with Client(f"127.0.0.1:{state_server.port}", timeout=WAIT) as c, grpc.insecure_channel(f"127.0.0.1:{state_server.port}") as channel:
        update = channel.stream_unary(
            "/weightavg.v1.WeightAveragingService/UpdateDictionary",
            response_deserializer=pb.UpdateDictionaryResponse.FromString,
        )
        d = c.dict({"w": np.zeros(100)})
        assert list(update(updates(d, ID, value), timeout=WAIT).names) == ["w"]
        c.snapshot()
    root = tmp_path / "d"
    manifest = json.loads((root / snapshot.MANIFEST).read_text())
    state_name = next(n for n in manifest["files"] if n.endswith(".json"))
    state = json.loads((root / state_name).read_text())
    record = next(r for r in state["requests"] if r["id"] == ID)
    assert record["digest"].startswith(UPLOAD_DIGEST_TAG)
    record["digest"] = older  # what the older server wrote
    (root / state_name).write_text(json.dumps(state))
    manifest["files"][state_name] = snapshot._digest(root / state_name)
    (root / snapshot.MANIFEST).write_text(json.dumps(manifest))

    restarted = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(root)))
    restarted.start()
    try:
        address = f"127.0.0.1:{restarted.port}"
        with Client(address, timeout=WAIT) as c, grpc.insecure_channel(address) as channel:
            update = channel.stream_unary(
                "/weightavg.v1.WeightAveragingService/UpdateDictionary",
                response_deserializer=pb.UpdateDictionaryResponse.FromString,
            )
            entry = restarted.registry.get(d.id).obj.entries["w"]
            assert list(update(updates(d, ID, value), timeout=WAIT).names) == ["w"]
            assert restarted.registry.get(d.id).obj.entries["w"] is entry  # answered, not run again
            assert c.stats()["request_ids"]["duplicates_answered"] == 1
            np.testing.assert_array_equal(c.dict(d, "w"), value)
            assert list(update(updates(d, OTHER, value + 1), timeout=WAIT).names) == ["w"]  # a new ID runs
            np.testing.assert_array_equal(c.dict(d, "w"), value + 1)
    finally:
        restarted.stop(None)


def test_a_snapshot_without_request_ids_still_loads(state_server: Runtime, tmp_path: Path) -> None:
    """Snapshots written before request IDs existed have no "requests" in their state."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=WAIT) as c:
        d = c.dict({"a": np.ones(2)})
        c.snapshot()
    root = tmp_path / "d"
    manifest = json.loads((root / snapshot.MANIFEST).read_text())
    state_name = next(n for n in manifest["files"] if n.endswith(".json"))
    state = json.loads((root / state_name).read_text())
    assert state.pop("requests") and state.pop("saved_at")  # this snapshot had some: the client's own calls
    (root / state_name).write_text(json.dumps(state))
    manifest["files"][state_name] = snapshot._digest(root / state_name)
    (root / snapshot.MANIFEST).write_text(json.dumps(manifest))
    registry = Registry()
    assert snapshot.load(registry, root, torch.device("cpu")) == 1
    assert registry.get(d.id) is not None and registry.requests.stats().remembered == 0


# -- configuration and statistics ----------------------------------------------------------------------------


def test_the_window_and_caps_come_from_flags_and_environment() -> None:
    env = {"WEIGHTAVG_REQUEST_ID_WINDOW_SECONDS": "90", "WEIGHTAVG_MAX_REQUEST_IDS": "7",
           "WEIGHTAVG_MAX_REQUEST_ID_BYTES": "5000"}
    config = ServerConfig.from_env(env)
    assert (config.request_id_window_seconds, config.max_request_ids, config.max_request_id_bytes) == (90.0, 7, 5000)
    args = build_parser().parse_args(["--request-id-window-seconds", "2.5", "--max-request-ids", "3"])
    assert (config_from_args(args).request_id_window_seconds, config_from_args(args).max_request_ids) == (2.5, 3)
    assert ServerConfig().request_id_window_seconds == 3600.0
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", **{
        "request_id_window_seconds": 2.5, "max_request_ids": 3, "max_request_id_bytes": 4096}))
    table = runtime.registry.requests
    assert (table.window_seconds, table.max_ids, table.max_bytes) == (2.5, 3, 4096)
    with pytest.raises(ValueError, match="0 or more"):
        create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_request_ids=-1))


def test_metrics_count_remembered_ids_and_duplicates(server: LiveServer, stub: pb_grpc.WeightAveragingServiceStub) -> None:
    from weightavg_server.ops.metrics import start_metrics_server
    from weightavg_server.service import Service, Settings
    from weightavg_server.transport.stats import RpcStats

    service = Service(server.registry, Settings(torch.device("cpu"), 32, 60.0, 3600.0))
    metrics = start_metrics_server("127.0.0.1", 0, RpcStats(), service)
    try:
        with Client(server.address, timeout=WAIT) as c:
            m = c.module(NET)
            p = c.copyparms(m)
            average(stub, m, p, ID)
            average(stub, m, p, ID)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=WAIT) as response:
                text = response.read().decode()
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert float(lines["weightavg_request_ids_remembered"]) == server.registry.requests.stats().remembered >= 3
        assert float(lines["weightavg_duplicate_requests_answered_total"]) == 1
        assert float(lines["weightavg_request_ids_dropped_total"]) == 0
    finally:
        metrics.stop()


def test_the_stats_of_a_fresh_server_have_nothing_remembered(server: LiveServer) -> None:
    with Client(server.address, timeout=WAIT) as c:
        assert c.stats()["request_ids"] == {"remembered": 0, "duplicates_answered": 0, "dropped": 0}


def test_the_client_makes_version_4_uuids_the_server_accepts() -> None:
    """new_request_id formats os.urandom bytes itself (uuid.uuid4 is the slower part of a small call)."""
    import uuid

    from weightavg._retry import new_request_id
    from weightavg_server.store.requests import canonical_id

    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for request_id in ids:
        parsed = uuid.UUID(request_id)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, request_id)
        assert canonical_id(request_id) == request_id
    assert {i[19] for i in ids} == set("89ab")  # the variant digit keeps its two random bits


def test_a_lost_evaluate_answer_is_retried_as_a_read(proxy: CuttingProxy) -> None:
    """EvaluateModel uploads its inputs and streams its answer: a read, retried from its source
    until the answer starts (it was never retried: the interceptor had no stream-stream case)."""
    x = np.random.default_rng(0).standard_normal((6, 4), dtype=np.float32)
    with Client(proxy.address, timeout=WAIT) as c:
        q = c.module(NET)
        m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1))
        expected = c.evaluate(m, x)
        proxy.arm()
        np.testing.assert_array_equal(c.evaluate(m, x), expected)
        assert proxy.cuts == 1 and proxy.connections == 2
