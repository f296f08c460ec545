"""Sessions through a real server: ownership, listing, closing, keep-alive, and leases running out."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from weightavg import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.app import Runtime, create_runtime
from weightavg_server.ops.config import ServerConfig
from weightavg_server.store.registry import Registry

from conftest import LiveServer, StalledUploads

WAIT_LIMIT = 120.0
"""Upper bound on waiting for a lease to run out; never reached unless the feature is broken."""


def _owned(registry: Registry, session: str) -> list[str]:
    return [h for h, e in registry.items() if e.session == session]


def _wait_until(condition, poke=lambda: None) -> None:  # type: ignore[no-untyped-def]
    """Poll until condition() holds (poke() each round); fail only after WAIT_LIMIT seconds."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        poke()
        time.sleep(0.05)


def test_handles_of_a_session_are_listed_only_to_it(live_server: LiveServer, client: Client) -> None:
    plain = client.dict({"x": [1.0]})
    with Client(live_server.address, session=True) as a, Client(live_server.address, session=True) as b:
        da, ma = a.dict({"x": [2.0]}), a.module(["linear", 2, 1])
        view = a.parms(ma)
        db = b.dict({"x": [3.0]})
        assert [h.handle for h in a.handles()] == [da, ma, view]
        assert [h.handle for h in b.handles()] == [db]
        assert [h.handle for h in client.handles()] == [plain]
        # Handles are capabilities: another caller that knows an id may still use it.
        assert b.dict(da, "x").tolist() == [2.0]
        # free() with no arguments frees only what the caller can list.
        assert b.free() == 1
        assert [h.handle for h in a.handles()] == [da, ma, view]
        assert [h.handle for h in client.handles()] == [plain]


def test_a_second_client_s_free_leaves_the_first_client_s_objects_alive(live_server: LiveServer, unchanged) -> None:  # type: ignore[no-untyped-def]
    with Client(live_server.address) as first, Client(live_server.address) as second, \
            Client(live_server.address, session=True) as third:
        m = first.module(["linear", 2, 1])
        p = first.copyparms(m)
        mine = third.dict({"x": [1.0]})
        with unchanged(), pytest.raises(FailedPreconditionError) as err:
            second.free()
        assert str(err.value) == (
            "FAILED_PRECONDITION: free() without handles (FreeHandlesRequest.all) frees your session's handles, and "
            "this call has no session; nothing freed. Name the handles (free(h1, h2); FreeHandlesRequest.handles), use "
            "a session (Client(address, session=True), or CreateSession's id in 'weightavg-session' metadata: closing "
            "it frees what it made), or, as the server's operator, free every handle on it (weightavg purge ADDRESS)"
        )
        assert first.avgparms(m, p) == 2  # both still alive
        assert third.free() == 1 and first.size(p) == {"weight": (1, 2), "bias": (1,), ".n": ()}
        assert first.free(m, p) == 2
        assert mine.id not in {h for h, _ in live_server.registry.items()}


def test_purge_frees_every_handle_of_every_client(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    with Client(server.address) as c, Client(server.address, session=True) as s:
        c.dict({"x": [1.0]}), s.dict({"y": [2.0]}), s.module(["linear", 2, 1])
        assert c.purge() == 3
        assert len(server.registry) == 0 and server.registry.held_bytes() == {}
        with pytest.raises(grpc.RpcError) as err:
            s._stub.FreeHandles(pb.FreeHandlesRequest(purge=True, all=True))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "purge frees every handle on the server: give no handles and not all with it"
        s.dict({"z": [3.0]})  # the session itself lives on
        assert s.free() == 1


def test_the_server_opens_no_more_sessions_than_max_sessions(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(max_sessions=2)
    with Client(server.address, session=True), Client(server.address, session=True) as second:
        with pytest.raises(ResourceExhaustedError, match=r"cap of 2 open sessions \(--max-sessions\); close"):
            Client(server.address, session=True)
        assert len(server.registry.sessions()) == 2
        second.close()
        with Client(server.address, session=True) as third:
            assert third.session is not None


def test_close_session_frees_everything_it_owns_in_one_call(live_server: LiveServer, client: Client) -> None:
    plain = client.dict({"x": [1.0]})
    with Client(live_server.address, session=True) as c:
        m = c.module(["linear", 3, 2])
        p = c.copyparms(m)
        c.addref(plain)  # a second handle to someone else's object belongs to the session too
        session = c.session
        assert session is not None and len(_owned(live_server.registry, session)) == 3
        assert c.close_session() == 3
        assert _owned(live_server.registry, session) == []
        with pytest.raises(NotFoundError):
            c.dict(p)
    assert [h.handle for h in client.handles()] == [plain]
    assert client.dict(plain, "x").tolist() == [1.0]


def test_closing_a_session_client_frees_its_handles(live_server: LiveServer) -> None:
    with Client(live_server.address, session=True) as c:
        c.dict({"x": [1.0]})
        session = c.session
        assert session is not None
    assert _owned(live_server.registry, session) == []
    assert session not in {s.id for s in live_server.registry.sessions()}


def test_handles_without_a_session_outlive_their_client(live_server: LiveServer, client: Client) -> None:
    with Client(live_server.address) as c:
        d = c.dict({"x": [5.0]})
    live_server.registry.expire(now=time.monotonic() + 10**9)  # no lease can touch a sessionless handle
    assert client.dict(d, "x").tolist() == [5.0]


def test_an_unknown_session_is_refused_and_creates_nothing(live_server: LiveServer) -> None:
    before = len(live_server.registry)
    channel = grpc.insecure_channel(live_server.address)
    stub = pb_grpc.WeightAveragingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateModule(
            pb.CreateModuleRequest(spec=pb.LayerSpec(type="relu")),
            metadata=[("weightavg-session", "ses_0123456789abcdef0123456789abcdef")], timeout=30,
        )
    channel.close()
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert "unknown session" in (err.value.details() or "")
    assert len(live_server.registry) == before


@pytest.mark.parametrize("lease", [-1.0, float("nan"), 1e12])
def test_a_lease_out_of_range_is_invalid(live_server: LiveServer, lease: float) -> None:
    with pytest.raises(InvalidArgumentError, match="out of range"):
        Client(live_server.address, session=True, lease=lease)


def test_a_lease_that_runs_out_frees_the_session_handles_with_a_log_line(
    live_server: LiveServer, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Lease expiry decided with an explicit clock, so no sleeping is involved."""
    registry = live_server.registry
    stub = pb_grpc.WeightAveragingServiceStub(client._channel)
    session = stub.CreateSession(pb.CreateSessionRequest(lease_seconds=30), timeout=30).session
    stub.CreateDictionary(iter([]), metadata=[("weightavg-session", session)], timeout=30)
    assert len(_owned(registry, session)) == 1
    assert registry.expire(now=time.monotonic() + 15) == []  # half a lease: still alive
    with caplog.at_level(logging.WARNING, logger="weightavg.sessions"):
        assert registry.expire(now=time.monotonic() + 31) == [(session, 1)]
    assert f"session {session} expired" in caplog.text and "freed 1 handle" in caplog.text
    assert _owned(registry, session) == []
    with pytest.raises(grpc.RpcError) as err:
        stub.KeepAliveSession(pb.KeepAliveSessionRequest(session=session), timeout=30)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_keep_alive_holds_a_session_past_its_lease(live_server: LiveServer) -> None:
    with Client(live_server.address, session=True, lease=2.0) as c:
        d = c.dict({"x": [7.0]})
        assert c.lease == 2.0
        time.sleep(5.0)  # two and a half leases without a call of ours: only the keep-alive thread renews it
        live_server.registry.expire()
        assert c.dict(d, "x").tolist() == [7.0]


@pytest.fixture
def reaped_server() -> Iterator[Runtime]:
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu"))
    runtime.start()
    yield runtime
    runtime.stop(None)


CLIENT_THAT_DIES = """
import os, sys
from weightavg import Client
c = Client(sys.argv[1], session=True, lease=2.0)
c.module(["linear", 4, 4]); c.dict({"a": [1.0, 2.0]})
print(c.session, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_killed_client_s_handles_are_reaped_without_any_further_call(reaped_server: Runtime) -> None:
    """A real client process dies (SIGKILL) holding handles; nobody calls the server again, so only the
    reaper thread can free them."""
    registry = reaped_server.registry
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_THAT_DIES, f"127.0.0.1:{reaped_server.port}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    session = proc.stdout.strip()
    assert session.startswith("ses_")
    _wait_until(lambda: not _owned(registry, session) and session not in {s.id for s in registry.sessions()})
    assert len(registry) == 0


def test_a_session_with_a_call_in_flight_does_not_expire() -> None:
    """A long call (a training epoch) is activity: the lease counts from the end of the last call.
    The lease is long beside any stall between two lines here: with a 1 s lease and `+ 0.5`, a
    thread held off the CPU for half a second after end_call saw its session expire."""
    registry = Registry()
    session = registry.create_session(100.0)
    registry.begin_call(session)
    assert registry.expire(now=time.monotonic() + 10_000) == []
    registry.end_call(session)
    assert registry.expire(now=time.monotonic() + 50) == []
    assert registry.expire(now=time.monotonic() + 150) == [(session, 0)]


def test_a_keep_alive_waiting_for_a_worker_renews_its_session_on_arrival() -> None:
    """Every worker thread busy (long epochs, stalled uploads of other clients): a live client's
    keep-alives wait in gRPC's queue, and its session's lease used to run out there, the reaper
    freeing its handles under it. A keep-alive renews the session when it arrives, before it waits."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=2))
    runtime.start()
    stalled: StalledUploads | None = None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
            stub = pb_grpc.WeightAveragingServiceStub(channel)
            session = stub.CreateSession(pb.CreateSessionRequest(lease_seconds=600), timeout=30).session
            stalled = StalledUploads(stub, 2, timeout=2 * WAIT_LIMIT)
            _wait_until(lambda: _workers_busy(runtime))
            before = _expiry(runtime.registry, session)
            keep_alive = stub.KeepAliveSession.future(
                pb.KeepAliveSessionRequest(), metadata=[("weightavg-session", session)], timeout=WAIT_LIMIT
            )
            _wait_until(lambda: _expiry(runtime.registry, session) > before)  # renewed while it waits
            assert not keep_alive.done()
            stalled.release()
            assert keep_alive.result().lease_seconds == 600
            assert all(u.result().dictionary.id for u in stalled.futures)
    finally:
        if stalled is not None:
            stalled.release()
        runtime.stop(None)


def _expiry(registry: Registry, session: str) -> float:
    return next(s.expires for s in registry.sessions() if s.id == session)


def _workers_busy(runtime: Runtime) -> bool:
    """Whether both stalled uploads are running on the server's two workers."""
    uploads = runtime.stats.snapshot().get("/weightavg.v1.WeightAveragingService/CreateDictionary")
    return uploads is not None and uploads.in_flight == 2
