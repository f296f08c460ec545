"""Tenants through real servers: each token's tenant sees, fetches, changes and frees only its own
objects (every RPC that takes a handle, table-driven); a reader changes nothing; quotas hold under
concurrent clients; SIGHUP reloads the tokens file; every call that changes something leaves one JSON
audit line without the token; snapshots keep each object's tenant."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from conftest import HalfOpenCalls, LiveServer, StalledUploads, assert_unchanged, snapshot
from test_snapshot import start_server as start_process
from weightavg import Client, NotFoundError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError
from weightavg import wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.app import Runtime, create_runtime
from weightavg_server.ops.config import ServerConfig
from weightavg_server.ops.tokens import TokensFileError, load_tokens
from weightavg_server.transport.tenancy import ACCESS, HANDLE_FIELDS, Access

ALICE, ALICE_READER, BOB, CAROL, ADMIN = (
    "alice-user-token-000001", "alice-reader-token-0002", "bob-user-token-000000003", "carol-user-token-00004",
    "ops-admin-token-0000005",
)
TOKENS = f"""
[tenants.carol]
max_device_bytes = 65536
max_handles = 8
max_sessions = 2

[[tokens]]
token = "{ALICE}"
tenant = "alice"
role = "user"

[[tokens]]
token = "{ALICE_READER}"
tenant = "alice"
role = "reader"

[[tokens]]
token = "{BOB}"
tenant = "bob"
role = "user"

[[tokens]]
token = "{CAROL}"
tenant = "carol"
role = "user"

[[tokens]]
sha256 = "{__import__('hashlib').sha256(ADMIN.encode()).hexdigest()}"
tenant = "ops"
role = "admin"
"""
UNKNOWN = "unknown handle"
PROTO = Path(__file__).resolve().parent.parent / "proto" / "weightavg" / "v1" / "weightavg.proto"


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    path.write_text(TOKENS)
    return path


@pytest.fixture(scope="module")
def server(tokens_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = create_runtime(ServerConfig(
        host="127.0.0.1", port=0, device="cpu", tokens=str(tokens_file),
        state_dir=str(tmp_path_factory.mktemp("state")),
    ))
    runtime.start()
    yield runtime
    runtime.server.stop(None)
    runtime.reaper.stop()


def connect(server: Runtime, token: str, **options: Any) -> Client:
    return Client(f"127.0.0.1:{server.port}", token=token, timeout=60, **options)


def declared(*named: tuple[str, Any]) -> list[pb.TensorChunk]:
    """A declared stream's chunks, as the client sends them."""
    return [pb.FetchTensorsResponse.FromString(m).chunk for m in wire.encoded_chunks(named, 1 << 20, pb.FetchTensorsResponse)]


@dataclass
class World:
    """Alice's objects of every kind, and Bob's own, for calls that take two handles."""

    net: str
    d: str
    t: str
    m: str
    loss: str
    session: str
    bnet: str
    bd: str
    bt: str
    bloss: str
    bopt: str


@pytest.fixture(scope="module")
def world(server: Runtime) -> Iterator[World]:
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    y = np.arange(8) % 2
    with connect(server, ALICE) as a, connect(server, BOB) as b, connect(server, ALICE, session=True) as s:
        net = a.module(["sequential", ["linear", "a", 4, 3], ["batchnorm1d", "b", 3], ["linear", "d", 3, 2]])
        q = a.module(["linear", 4, 2])
        m = a.model(q, a.loss("ce"), a.opt("sgd", q, 0.1))
        a.train(m, x, y)
        a.test(m, x, y)
        a.run(m)
        bnet = b.module(["sequential", ["linear", "a", 4, 3], ["batchnorm1d", "b", 3], ["linear", "d", 3, 2]])
        w = World(
            net=net.id, d=a.copyparms(net).id, t=a.tensor(np.arange(8, dtype=np.float32).reshape(4, 2)).id, m=m.id,
            loss=a.loss("mse").id, session=s.session or "",
            bnet=bnet.id, bd=b.copyparms(bnet).id, bt=b.tensor(np.zeros((4, 4), np.float32)).id, bloss=b.loss("ce").id,
            bopt=b.opt("sgd", bnet).id,
        )
        yield w
    with connect(server, ADMIN) as admin:  # free() without handles needs a session: the operator cleans up
        admin.purge("alice")
        admin.purge("bob")


Call = Callable[[pb_grpc.WeightAveragingServiceStub, World], object]


@dataclass(frozen=True)
class Case:
    method: str
    call: Call
    id: str = ""


def unary(method: str, make: Callable[[World], object]) -> Case:
    return Case(method, lambda stub, w: getattr(stub, method)(make(w), timeout=30))


def streamed_reply(method: str, make: Callable[[World], object]) -> Case:
    return Case(method, lambda stub, w: list(getattr(stub, method)(make(w), timeout=30)))


def upload(method: str, first: Callable[[World], object], chunks: list[pb.TensorChunk], reply_streams: bool = False) -> Case:
    message = getattr(pb, f"{method}Request")

    def call(stub: pb_grpc.WeightAveragingServiceStub, w: World) -> object:
        requests = iter([first(w), *(message(chunk=c) for c in chunks)])
        result = getattr(stub, method)(requests, timeout=30)
        return list(result) if reply_streams else result

    return Case(method, call)


def named(case: Case, label: str) -> Case:
    return Case(case.method, case.call, f"{case.method}/{label}")


X4 = declared(("", np.ones((2, 4), np.float32)))
CASES: list[Case] = [
    unary("DescribeModule", lambda w: pb.DescribeModuleRequest(handle=w.net)),
    unary("ListParameterNames", lambda w: pb.ListParameterNamesRequest(handle=w.net)),
    unary("ListBufferNames", lambda w: pb.ListBufferNamesRequest(handle=w.net)),
    upload("SetParameter", lambda w: pb.SetParameterRequest(handle=w.net, name="a.bias"), declared(("", np.ones(3, np.float32)))),
    unary("ViewParameters", lambda w: pb.ViewParametersRequest(handle=w.net)),
    unary("ViewBuffers", lambda w: pb.ViewBuffersRequest(handle=w.net)),
    unary("CopyParameters", lambda w: pb.CopyParametersRequest(handle=w.m)),
    named(unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.net, dictionary=w.bd)), "their module"),
    named(unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.bnet, dictionary=w.d)), "their dictionary"),
    named(unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.net, dictionary=w.bd)), "their module"),
    named(unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.bnet, dictionary=w.d)), "their dictionary"),
    named(unary("UpdateMovingAverage", lambda w: pb.UpdateMovingAverageRequest(handle=w.net, dictionary=w.bd)),
          "their module"),
    named(unary("UpdateMovingAverage", lambda w: pb.UpdateMovingAverageRequest(handle=w.bnet, dictionary=w.d)),
          "their dictionary"),
    named(unary("ApplyOuterStep", lambda w: pb.ApplyOuterStepRequest(optimizer=w.m, average=w.bd)), "their model"),
    named(unary("ApplyOuterStep", lambda w: pb.ApplyOuterStepRequest(optimizer=w.bopt, average=w.d)),
          "their dictionary"),
    named(unary("BuildGreedySoup", lambda w: pb.BuildGreedySoupRequest(model=w.m, ingredients=[w.bd])), "their model"),
    named(unary("AverageDictionaries", lambda w: pb.AverageDictionariesRequest(dictionaries=[w.bd, w.d])),
          "own and theirs"),
    named(unary("AverageDictionaries", lambda w: pb.AverageDictionariesRequest(dictionaries=[w.bd], into=w.d)),
          "their into"),
    named(unary("MergeDictionaries", lambda w: pb.MergeDictionariesRequest(method="linear", dictionaries=[w.bd, w.d])),
          "own and theirs"),
    named(unary("MergeDictionaries", lambda w: pb.MergeDictionariesRequest(
        method="task_arithmetic", dictionaries=[w.bd], base=w.d)), "their base"),
    unary("ResetBatchNorm", lambda w: pb.ResetBatchNormRequest(handle=w.net)),
    unary("AllReduce", lambda w: pb.AllReduceRequest(handle=w.net)),
    unary("Broadcast", lambda w: pb.BroadcastRequest(handle=w.net)),
    unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.net, momenta={"b": pb.Momentum(value=0.5)})),
    upload("UpdateDictionary", lambda w: pb.UpdateDictionaryRequest(dictionary=w.d), declared(("z", np.ones(2, np.float32)))),
    unary("DeleteEntries", lambda w: pb.DeleteEntriesRequest(dictionary=w.d, names=["a.weight"])),
    named(streamed_reply("FetchTensors", lambda w: pb.FetchTensorsRequest(handle=w.d)), "dictionary"),
    named(streamed_reply("FetchTensors", lambda w: pb.FetchTensorsRequest(handle=w.net, names=["a.weight"])), "module"),
    unary("GetSize", lambda w: pb.GetSizeRequest(handle=w.t)),
    unary("FetchTensorsToSharedMemory", lambda w: pb.FetchTensorsToSharedMemoryRequest(handle=w.d, region="r")),
    named(unary("FreeHandles", lambda w: pb.FreeHandlesRequest(handles=[w.t])), "theirs"),
    named(unary("FreeHandles", lambda w: pb.FreeHandlesRequest(handles=[w.bt, w.t])), "own and theirs"),
    unary("AddReference", lambda w: pb.AddReferenceRequest(handle=w.d)),
    unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.d, dtype=pb.DTYPE_FLOAT64)),
    unary("CreateOptimizer", lambda w: pb.CreateOptimizerRequest(type="sgd", module=w.net)),
    unary("GetLearningRate", lambda w: pb.GetLearningRateRequest(handle=w.m)),
    unary("SetLearningRate", lambda w: pb.SetLearningRateRequest(handle=w.m, lr=0.5)),
    unary("CreateModel", lambda w: pb.CreateModelRequest(module=w.net, loss=w.bloss, optimizer=w.bopt)),
    named(unary("UpdateModel", lambda w: pb.UpdateModelRequest(model=w.m, parts=[w.bloss])), "their model"),
    named(unary("UpdateModel", lambda w: pb.UpdateModelRequest(model=w.m, parts=[w.loss])), "their model and part"),
    unary("DescribeModel", lambda w: pb.DescribeModelRequest(model=w.m)),
    unary("GetModelOptions", lambda w: pb.GetModelOptionsRequest(model=w.m, split=pb.DATA_SPLIT_TRAIN)),
    unary("SetModelOptions", lambda w: pb.SetModelOptionsRequest(model=w.m, split=pb.DATA_SPLIT_TRAIN, options=[
        pb.Option(name="batchsize", value=pb.OptionValue(int_value=2))])),
    upload("SetModelData", lambda w: pb.SetModelDataRequest(model=w.m, split=pb.DATA_SPLIT_TRAIN),
           declared(("x", np.ones((2, 4), np.float32)), ("y", np.zeros(2, np.int64)))),
    streamed_reply("RunEpoch", lambda w: pb.RunEpochRequest(model=w.m)),
    streamed_reply("RunTest", lambda w: pb.RunTestRequest(model=w.m)),
    upload("EvaluateModel", lambda w: pb.EvaluateModelRequest(model=w.m), X4, reply_streams=True),
    named(upload("RunForward", lambda w: pb.RunForwardRequest(handle=w.net, mode=pb.FORWARD_MODE_EVAL), X4), "their module"),
    named(unary("RunForward", lambda w: iter([pb.RunForwardRequest(handle=w.bnet, mode=pb.FORWARD_MODE_EVAL, input=w.t)])),
          "their input"),
    unary("GetModelInput", lambda w: pb.GetModelInputRequest(model=w.m)),
    unary("RestoreModelData", lambda w: pb.RestoreModelDataRequest(model=w.m)),
    named(unary("NextBatch", lambda w: pb.NextBatchRequest(handle=w.t, size=1)), "tensor"),
    named(unary("NextBatch", lambda w: pb.NextBatchRequest(handle=w.m)), "model"),
    unary("RecalculateBatchNorm", lambda w: pb.RecalculateBatchNormRequest(model=w.m)),
    unary("KeepAliveSession", lambda w: pb.KeepAliveSessionRequest(session=w.session)),
    unary("CloseSession", lambda w: pb.CloseSessionRequest(session=w.session)),
]
CASES = [c if c.id else Case(c.method, c.call, c.method) for c in CASES]


def stub_for(server: Runtime, token: str) -> tuple[grpc.Channel, pb_grpc.WeightAveragingServiceStub]:
    """A raw stub whose calls carry the token (the client's own channel, so its metadata travels)."""
    client = connect(server, token)
    return client._raw_channel, client._stub  # noqa: SLF001 - raw requests with the client's credentials


def test_every_rpc_has_an_access_class() -> None:
    service = pb.DESCRIPTOR.services_by_name["WeightAveragingService"]
    assert {m.name for m in service.methods} == set(ACCESS)


def test_the_table_covers_every_rpc_that_takes_a_handle() -> None:
    fields = {*HANDLE_FIELDS, "session"}
    service = pb.DESCRIPTOR.services_by_name["WeightAveragingService"]
    taking = {m.name for m in service.methods if fields & set(m.input_type.fields_by_name)}
    assert taking <= {c.method for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_another_tenants_handles_do_not_exist(case: Case, server: Runtime, world: World) -> None:
    """Bob names Alice's handles: NOT_FOUND, worded as for a handle that never existed, nothing changed."""
    channel, stub = stub_for(server, BOB)
    before = snapshot(server.registry)
    with channel, pytest.raises(grpc.RpcError) as err:
        case.call(stub, world)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND, err.value.details()
    assert UNKNOWN in err.value.details() or "unknown session" in err.value.details()
    assert_unchanged(before, snapshot(server.registry))


def test_listings_and_stats_show_only_the_callers_tenant(server: Runtime, world: World) -> None:
    with connect(server, BOB) as b, connect(server, ALICE) as a, connect(server, ADMIN) as admin:
        assert {h.handle.id for h in b.handles()} == {world.bnet, world.bd, world.bt, world.bloss, world.bopt}
        assert {h.tenant for h in b.handles()} == {"bob"}
        assert world.net in {h.handle.id for h in a.handles()}
        assert set(b.stats()["tenants"]) == {"bob"}
        with pytest.raises(PermissionDeniedError, match="admin token"):
            b.handles(all_tenants=True)
        everything = admin.handles(all_tenants=True)
        assert {world.net, world.bnet} <= {h.handle.id for h in everything}
        assert {"alice", "bob"} <= {h.tenant for h in everything}
        tenants = admin.stats()["tenants"]
        assert tenants["alice"]["handles"] >= 5 and tenants["alice"]["bytes"]["cpu"] > 0
        assert tenants["bob"]["calls"] > 0
        assert tenants["carol"]["max_device_bytes"] == 65536
        usage = server.registry.tenant_usage()
        assert usage["alice"].nbytes == tenants["alice"]["bytes"]


def test_server_wide_figures_are_an_admins_and_a_user_sees_its_tenants(server: Runtime, world: World) -> None:
    """GetServerStats and GetServerInfo counted every tenant's objects, bytes and calls for any
    caller (found by review: Bob, holding nothing, read Alice's 1.2 MB). A user now sees its
    tenant's handles and bytes, and no per-method or request-ID figures."""
    usage = server.registry.tenant_usage()
    with connect(server, BOB) as b, connect(server, ADMIN) as admin:
        stats, info = b.stats(), b.info()
        bob = usage["bob"]
        assert sum(d["handles"] for d in stats["devices"].values()) == bob.handles
        assert stats["devices"]["cpu"]["bytes"] == bob.nbytes["cpu"]
        assert stats["methods"] == {} and stats["request_ids"] == {"remembered": 0, "duplicates_answered": 0, "dropped": 0}
        assert (info["ranks"][0]["handles"], info["ranks"][0]["bytes"]) == (bob.handles, sum(bob.nbytes.values()))
        everything = admin.stats()
        assert sum(d["handles"] for d in everything["devices"].values()) == len(server.registry)
        assert everything["methods"] and admin.info()["ranks"][0]["handles"] == len(server.registry)


def test_an_admin_may_use_any_tenants_handle(server: Runtime, world: World) -> None:
    with connect(server, ADMIN) as admin:
        assert admin.size(wire_handle(world.t)) == (4, 2)


def wire_handle(handle_id: str) -> Any:
    from weightavg import Handle

    return Handle(handle_id, "tensor")


@pytest.mark.parametrize(
    "case", [c for c in CASES if ACCESS[c.method] is not Access.READ], ids=[c.id for c in CASES if ACCESS[c.method] is not Access.READ]
)
def test_a_reader_changes_nothing(case: Case, server: Runtime, world: World) -> None:
    """Alice's reader token on Alice's own objects: every call that would change or run something is
    PERMISSION_DENIED before it reads its request, and nothing changes."""
    channel, stub = stub_for(server, ALICE_READER)
    before = snapshot(server.registry)
    with channel, pytest.raises(grpc.RpcError) as err:
        case.call(stub, world)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert "role reader" in err.value.details()
    assert_unchanged(before, snapshot(server.registry))


def test_a_reader_fetches_and_lists_its_tenants_objects_and_creates_nothing(server: Runtime, world: World) -> None:
    before = snapshot(server.registry)
    with connect(server, ALICE_READER) as r:
        assert set(r.dict(world.d)) == {"a.weight", "a.bias", "b.weight", "b.bias", "d.weight", "d.bias"}
        assert world.d in {h.handle.id for h in r.handles()}
        for create in (lambda: r.module(["linear", 2, 2]), lambda: r.dict({"a": 1.0}), lambda: r.tensor(np.ones(2)),
                       lambda: r.loss("ce"), lambda: r.snapshot()):
            with pytest.raises(PermissionDeniedError):
                create()
        with pytest.raises(PermissionDeniedError):
            connect(server, ALICE_READER, session=True)
    assert_unchanged(before, snapshot(server.registry))


def test_snapshots_and_purges_need_an_admin(server: Runtime, world: World) -> None:
    with connect(server, ALICE) as a:
        with pytest.raises(PermissionDeniedError, match="Snapshot needs an admin token"):
            a.snapshot()
        with pytest.raises(PermissionDeniedError, match="admin token"):
            a.purge("bob")
    with connect(server, BOB) as b, connect(server, ADMIN) as admin:
        extra = [b.tensor(np.ones(3)) for _ in range(3)]
        assert admin.snapshot()["handles"] == len(server.registry)
        before = {h for h, e in server.registry.items() if e.tenant == "bob"}
        assert {h.id for h in extra} <= before
        assert admin.purge("bob") == len(before)
        assert not [h for h, e in server.registry.items() if e.tenant == "bob"]
        with pytest.raises(NotFoundError):
            b.size(extra[0])


def test_quotas_hold_under_16_concurrent_clients_while_another_tenant_is_served(server: Runtime) -> None:
    """Carol's quota is 65536 bytes: of 16 concurrent 10,000-byte uploads exactly 6 fit; Bob, with
    none, uploads 16 at the same time, all of which succeed."""
    value = np.zeros(2500, np.float32)

    def upload_as(token: str) -> str:
        with connect(server, token) as c:
            try:
                c.dict({"v": value})
                return "ok"
            except ResourceExhaustedError as exc:
                # Over the byte quota, or (handle slots are reserved first) over the 8-handle quota.
                assert "tenant 'carol'" in str(exc) and "tokens file" in str(exc)
                return "refused"

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        carol = [pool.submit(upload_as, CAROL) for _ in range(16)]
        bob = [pool.submit(upload_as, BOB) for _ in range(16)]
        outcomes = [f.result(timeout=120) for f in carol], [f.result(timeout=120) for f in bob]
    assert outcomes[0].count("ok") == 6 and outcomes[0].count("refused") == 10
    assert outcomes[1] == ["ok"] * 16
    usage = server.registry.tenant_usage()
    assert usage["carol"].nbytes == {"cpu": 60000} and usage["carol"].handles == 6
    with connect(server, CAROL) as c:  # the handle quota: 8, 6 held
        c.tensor(np.zeros(1, np.float32))
        c.tensor(np.zeros(1, np.float32))
        with pytest.raises(ResourceExhaustedError, match="quota of 8 live handles"):
            c.tensor(np.zeros(1, np.float32))
    with connect(server, ADMIN) as admin:
        assert admin.purge("carol") == 8
        admin.purge("bob")
    assert server.registry.tenant_usage()["carol"].nbytes == {}
    # Other tests' tenants may still hold bytes on this module's server, or none (run alone): {} then.
    held = sum(u.nbytes.get("cpu", 0) for u in server.registry.tenant_usage().values())
    assert server.registry.held_bytes() == ({"cpu": held} if held else {})


def test_a_tenant_opens_no_more_sessions_than_its_quota_and_others_are_not_held_back(server: Runtime) -> None:
    """Carol's quota allows 2 open sessions: a third is refused (RESOURCE_EXHAUSTED, saying what to
    do) and starts nothing; Bob, with no quota, opens his; once Carol closes one, she may open another."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(connect(server, CAROL, session=True))
        stack.enter_context(connect(server, CAROL, session=True))
        before = len(server.registry.sessions())
        with pytest.raises(ResourceExhaustedError, match=r"tenant 'carol' holds its quota of 2 open sessions .*close"):
            connect(server, CAROL, session=True)
        assert len(server.registry.sessions()) == before
        with connect(server, ADMIN) as admin:
            carol = admin.stats()["tenants"]["carol"]
            assert carol["sessions"] == 2 and carol["max_sessions"] == 2
        with connect(server, BOB, session=True) as bob:
            assert bob.session is not None
        first.close()
        with connect(server, CAROL, session=True) as again:
            assert again.session is not None


def test_audit_lines_for_each_change_and_none_for_reads(server: Runtime, world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="weightavg.audit")
    with connect(server, ALICE) as a, connect(server, ALICE_READER) as r:
        d = a.dict({"a": np.ones(3, np.float32)})
        a.dict(d, "b", np.zeros(2))
        a.dict(d)
        a.size(d)
        a.handles()
        with pytest.raises(NotFoundError):
            a.free("dic_" + "0" * 32)
        with pytest.raises(PermissionDeniedError):
            r.delete(d, "a")
        a.free(d)
    with pytest.raises(UnauthenticatedError):
        Client(f"127.0.0.1:{server.port}", token="not-a-token-of-this-server", timeout=10).free()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "weightavg.audit"]
    assert [(x["method"], x["tenant"], x["outcome"]) for x in lines] == [
        ("CreateDictionary", "alice", "OK"), ("UpdateDictionary", "alice", "OK"), ("FreeHandles", "alice", "NOT_FOUND"),
        ("DeleteEntries", "alice", "PERMISSION_DENIED"), ("FreeHandles", "alice", "OK"),
        ("FreeHandles", None, "UNAUTHENTICATED"),
    ]
    assert lines[0]["handles"] == [d.id] and lines[1]["handles"] == [d.id] and lines[4]["handles"] == [d.id]
    assert lines[3]["role"] == "reader"
    for line in lines:
        assert set(line) >= {"time", "tenant", "role", "method", "handles", "request_id", "session", "outcome"}
        assert line["time"].endswith("+00:00")
    text = "\n".join(r.getMessage() for r in caplog.records)
    for token in (ALICE, ALICE_READER, BOB, ADMIN, "not-a-token-of-this-server"):
        assert token not in text


def test_an_open_server_audits_changes_as_its_one_admin_and_counts_every_call(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Without tokens every caller is the default tenant's admin. A call that writes no audit line
    takes a short path (no metadata read, no record): its tenant's statistics still count it, a
    failure too; with the audit logger on, a change's line still names the tenant, role, session,
    handles and request ID."""
    with Client(live_server.address, timeout=60, session=True) as c:
        m = c.module(["linear", 2, 1])
        p = c.copyparms(m)
        before = c.stats()["tenants"]["default"]
        assert c.avgparms(m, p) == 2
        with pytest.raises(NotFoundError):
            c.avgparms(m, "dic_" + "0" * 32)
        after = c.stats()["tenants"]["default"]
        assert after["calls"] - before["calls"] == 3  # the two averages and the first stats call
        assert after["failures"] - before["failures"] == 1
        assert not [r for r in caplog.records if r.name == "weightavg.audit"]

        caplog.set_level(logging.INFO, logger="weightavg.audit")
        assert c.avgparms(m, p) == 3
        c.size(p)  # a read: no line
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "weightavg.audit"]
        assert [(x["method"], x["tenant"], x["role"], x["outcome"]) for x in lines] == [
            ("AverageParameters", "default", "admin", "OK")
        ]
        assert lines[0]["session"] == c.session and lines[0]["handles"] == [m.id, p.id]
        assert len(lines[0]["request_id"]) == 36
        c.purge()


def proto_field_comments() -> dict[tuple[str, str], str]:
    """Each message field's leading comment in the .proto, by (message name, field name)."""
    comments: dict[tuple[str, str], str] = {}
    message, lines = "", []
    for line in PROTO.read_text().splitlines():
        text = line.strip()
        if started := re.match(r"message (\w+) \{", text):
            message, lines = started.group(1), []
        elif text.startswith("//"):
            lines.append(text[2:].strip())
        else:
            if message and (field := re.match(r"(?:repeated |optional )?\S+ (\w+) = \d+;", text)):
                comments[message, field.group(1)] = " ".join(lines)
            lines = []
    return comments


def test_the_audited_handle_fields_are_every_handle_field_of_the_proto() -> None:
    """Five request fields holding handle ids were missing from the audit's list, so a refused call
    that probed other tenants' ids through them was audited naming none (found by review). The
    proto's comments say which fields hold handle ids: those of every request must be HANDLE_FIELDS
    exactly, each at the top of its request (the audit reads nothing nested), and no other request
    field may have one of their names."""
    comments = proto_field_comments()
    handles: set[str] = set()
    others: set[str] = set()
    seen: set[str] = set()

    def walk(message: Any, top: bool) -> None:
        for field in message.fields:
            where = f"{message.name}.{field.name}"
            assert field.message_type is not pb.Handle.DESCRIPTOR, f"{where}: the audit reads handle ids from strings"
            if field.message_type is not None:
                if field.message_type.full_name not in seen:
                    seen.add(field.message_type.full_name)
                    walk(field.message_type, False)
            elif field.type == field.TYPE_STRING:
                if re.search(r"\bhandle ids?\b", comments.get((message.name, field.name), ""), re.IGNORECASE):
                    assert top, f"{where} holds a handle id inside a request, where the audit line does not look"
                    handles.add(field.name)
                elif top:
                    others.add(field.name)

    for method in pb.DESCRIPTOR.services_by_name["WeightAveragingService"].methods:
        walk(method.input_type, True)
    assert len(set(HANDLE_FIELDS)) == len(HANDLE_FIELDS)
    assert handles == set(HANDLE_FIELDS)
    assert not handles & others, "a field name must hold handle ids in every request or in none"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "weightavg.audit"]


def test_a_probe_of_another_tenants_ids_is_audited_naming_every_id(
    server: Runtime, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob names Alice's ids beside his own through every field that was missing from the audit's
    list: each refused call's line names all of them (they said "handles": [], so such probes left
    no trace; found by review)."""
    caplog.set_level(logging.INFO, logger="weightavg.audit")
    w = world
    probes = [
        (pb.AverageDictionariesRequest(dictionaries=[w.bd, w.d], into=w.t), [w.bd, w.d, w.t]),
        (pb.MergeDictionariesRequest(method="task_arithmetic", dictionaries=[w.bd], base=w.d), [w.bd, w.d]),
        (pb.ApplyOuterStepRequest(optimizer=w.bopt, average=w.d), [w.bopt, w.d]),
        (pb.BuildGreedySoupRequest(model=w.m, ingredients=[w.bd, w.d]), [w.m, w.bd, w.d]),
    ]
    channel, stub = stub_for(server, BOB)
    with channel:
        for request, _ in probes:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, request.DESCRIPTOR.name.removesuffix("Request"))(request, timeout=30)
            assert err.value.code() is grpc.StatusCode.NOT_FOUND, err.value.details()
    assert [(x["method"], x["tenant"], x["outcome"], x["handles"]) for x in audit_lines(caplog)] == [
        (request.DESCRIPTOR.name.removesuffix("Request"), "bob", "NOT_FOUND", ids) for request, ids in probes
    ]


def test_the_audit_line_names_the_session_a_call_opens_or_closes(
    server: Runtime, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Called without session metadata, CreateSession's line names the session it opened and
    CloseSession(session=...)'s the one it closed (both said "session": null; found by review), and
    Bob's refused CloseSession of Alice's session names it."""
    caplog.set_level(logging.INFO, logger="weightavg.audit")
    channel, stub = stub_for(server, ALICE)
    with channel:
        opened = stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session
        stub.CloseSession(pb.CloseSessionRequest(session=opened), timeout=30)
    channel, stub = stub_for(server, BOB)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.CloseSession(pb.CloseSessionRequest(session=world.session), timeout=30)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert [(x["method"], x["tenant"], x["outcome"], x["session"]) for x in audit_lines(caplog)] == [
        ("CreateSession", "alice", "OK", opened), ("CloseSession", "alice", "OK", opened),
        ("CloseSession", "bob", "NOT_FOUND", world.session),
    ]


def test_an_audit_line_stays_small_whatever_the_caller_sends(server: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    """FreeHandles of an 8 MiB id wrote an 8 MB audit line (found by review). Each id, the request ID
    and the session keep their first 256 characters and say how many more there were; at most 64
    ids are listed, with a count of the rest."""
    caplog.set_level(logging.INFO, logger="weightavg.audit")
    ids = ["x" * (1 << 20), *(f"dic_{i:032x}" for i in range(100))]
    channel, stub = stub_for(server, ALICE)
    with channel, pytest.raises(grpc.RpcError):
        stub.FreeHandles(
            pb.FreeHandlesRequest(handles=ids, request_id="r" * 100_000), metadata=[("weightavg-session", "s" * 4000)],
            timeout=30,
        )
    (line,) = [r.getMessage() for r in caplog.records if r.name == "weightavg.audit"]
    assert len(line) < 8192
    record = json.loads(line)
    assert record["handles"] == ["x" * 256 + f"...[{(1 << 20) - 256} more characters]", *ids[1:64]]
    assert record["handles_omitted"] == len(ids) - 64
    assert record["request_id"] == "r" * 256 + "...[99744 more characters]"
    assert record["session"] == "s" * 256 + "...[3744 more characters]"


def test_a_server_logging_only_warnings_still_writes_the_audit_trail(tmp_path: Path, tokens_file: Path) -> None:
    """`--log-level WARNING` quiets the server's log, not its audit trail: the audit logger stays at
    INFO (it followed --log-level, so such a server audited nothing; found by review)."""
    server = start_process(tmp_path / "state", "--log-level", "WARNING", "--tokens", str(tokens_file))
    try:
        with Client(server.address, token=ALICE, timeout=60) as a:
            a.free(a.tensor(np.ones(2, np.float32)))
            a.size(a.tensor(np.ones(2, np.float32)))
    finally:
        code, err = server.terminate()
    assert code == 0, err
    audited = [line.split(" weightavg.audit ", 1)[1] for line in err.splitlines() if " weightavg.audit " in line]
    assert [(x["method"], x["tenant"], x["outcome"]) for x in map(json.loads, audited)] == [
        ("CreateTensor", "alice", "OK"), ("FreeHandles", "alice", "OK"), ("CreateTensor", "alice", "OK"),
    ]
    assert not [line for line in err.splitlines() if " INFO " in line and " weightavg.audit " not in line]


def test_sessions_are_a_tenants_own(server: Runtime, world: World) -> None:
    """A session id of another tenant is unknown: it cannot be joined to create handles in it, nor
    closed, whether named in the request or carried in the metadata (which CloseSession, unlike
    other calls, takes past an unknown session, so that its retry reaches the request table)."""
    with pytest.raises(NotFoundError, match="unknown session"):
        connect(server, BOB, session=world.session)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        bob = ("authorization", f"Bearer {BOB}")
        for request, metadata in (
            (pb.CloseSessionRequest(session=world.session), [bob]),
            (pb.CloseSessionRequest(), [bob, ("weightavg-session", world.session)]),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.CloseSession(request, metadata=metadata, timeout=60)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert world.session in {s.id for s in server.registry.sessions()}


# -- tokens file, SIGHUP, snapshots ---------------------------------------------------------------------


@pytest.mark.parametrize("text,error", [
    ('[[tokens]]\ntoken = "short"\ntenant = "a"\nrole = "user"\n', "at least 16 characters"),
    ('[[tokens]]\ntoken = "long-enough-token-xyz"\ntenant = "a b"\nrole = "user"\n', "tenant name"),
    ('[[tokens]]\ntoken = "long-enough-token-xyz"\ntenant = "a"\nrole = "root"\n', "role must be one of"),
    ('[[tokens]]\ntoken = "long-enough-token-xyz"\ntenant = "a"\nrole = "user"\nquota = 1\n', "unknown key"),
    ('[tenants.a]\nmax_device_bytes = -1\n[[tokens]]\ntoken = "long-enough-token-xyz"\ntenant = "a"\nrole = "user"\n',
     "whole number"),
    ('[[tokens]]\ntoken = "long-enough-token-xyz"\ntenant = "a"\nrole = "user"\n' * 2, "given twice"),
    ("tokens = [", "does not parse"),
    ("", "has no token"),
])
def test_a_bad_tokens_file_is_refused_saying_where_and_never_echoing_the_token(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=error) as err:
        load_tokens(path)
    assert "long-enough-token-xyz" not in str(err.value) and "short\"" not in str(err.value)


MISPLACED = "y-secret-token-000000010!"
ONE_TOKEN = '[[tokens]]\ntoken = "long-enough-token-xyz"\ntenant = "a"\nrole = "user"\n'


@pytest.mark.parametrize("text,error", [
    (ONE_TOKEN.replace('tenant = "a"', f'tenant = "{MISPLACED}"'), r"tokens\[0\]: tenant name is not valid: use 1 to 64"),
    (ONE_TOKEN.replace('role = "user"', f'role = "{MISPLACED}"'),
     r"tokens\[0\] \(tenant 'a'\): role must be one of \['admin', 'user', 'reader'\]$"),
    (f'[tenants.ok]\n[tenants."{MISPLACED}"]\nmax_handles = 1\n' + ONE_TOKEN,
     r"tenants, table 1 \(counting from 0\): tenant name is not valid"),
    (f'[tenants.a]\nmax_handles = "{MISPLACED}"\n' + ONE_TOKEN, r"tenants\.a\.max_handles must be a whole number .*, not str$"),
    ('[tenants.a]\nmax_handles = -3\n' + ONE_TOKEN, r"tenants\.a\.max_handles must be .*, not a negative number$"),
], ids=["tenant", "role", "tenants table", "quota", "negative quota"])
def test_a_secret_in_the_wrong_field_of_a_tokens_file_is_never_echoed(tmp_path: Path, text: str, error: str) -> None:
    """A token pasted as a tenant name, a role, a tenant's table or a quota was quoted by the error,
    and so landed in the log (found by review): the error names the entry and the rule instead."""
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=error) as err:
        load_tokens(path)
    assert MISPLACED not in str(err.value) and "long-enough-token-xyz" not in str(err.value)


def test_json_tokens_files_are_read_too(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {"a": {"max_handles": 3, "max_sessions": 5}},
                                "tokens": [{"token": "long-enough-token-xyz", "tenant": "a", "role": "reader"}]}))
    table = load_tokens(path)
    assert table.caller("long-enough-token-xyz") is not None
    assert table.quotas["a"].max_handles == 3 and table.quotas["a"].max_sessions == 5


def test_sighup_reloads_the_tokens_file_revoking_a_token_mid_run(tmp_path: Path) -> None:
    """A client of Bob's calls in a loop; the file loses Bob's token and gains Dave's; SIGHUP: Bob's
    next call is UNAUTHENTICATED, Dave is served, Bob's objects stay (listed to the admin), and the
    audit file holds JSON lines without any token. A file that does not load changes nothing."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    audit = tmp_path / "audit.jsonl"
    proc = start_process(tmp_path / "state", "--tokens", str(tokens), "--audit-log", str(audit), "--log-level", "WARNING")
    dave = "dave-user-token-0000006"
    try:
        with Client(proc.address, token=BOB, timeout=30) as b:
            kept = b.dict({"w": np.ones(3, np.float32)})
            tokens.write_text(TOKENS.replace(BOB, dave).replace('tenant = "bob"', 'tenant = "dave"'))
            calls, revoked = 0, False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    b.size(kept)
                    calls += 1
                except UnauthenticatedError:
                    revoked = True
                    break
                if calls == 3:
                    proc.proc.send_signal(signal.SIGHUP)
            assert revoked and calls >= 3
        with Client(proc.address, token=dave, timeout=30) as d:
            d.dict({"x": 1.0})
            with pytest.raises(NotFoundError):
                d.size(kept)
        with Client(proc.address, token=ADMIN, timeout=30) as admin:
            assert {(h.handle.id, h.tenant) for h in admin.handles(all_tenants=True)} >= {(kept.id, "bob")}
            bob = admin.stats()["tenants"]["bob"]  # his calls forgotten with his tokens, his handle still listed
            assert (bob["calls"], bob["handles"]) == (0, 1)
            tokens.write_text("tokens = [")  # a broken file: the tokens in force stay
            proc.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)  # not an assertion on time: SIGHUP is asynchronous, the next calls must pass anyway
            admin.ping()
            with Client(proc.address, token=dave, timeout=30) as d:
                d.ping()
    finally:
        code, err = proc.terminate()
    assert code == 0, err
    assert "tokens file not reloaded" in err
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert ("CreateDictionary", "bob", "OK") in [(x["method"], x["tenant"], x["outcome"]) for x in lines]
    assert ("CreateDictionary", "dave", "OK") in [(x["method"], x["tenant"], x["outcome"]) for x in lines]
    for token in (BOB, dave, ADMIN):
        assert token not in audit.read_text() and token not in err


def test_snapshots_keep_each_objects_tenant(tmp_path: Path, tokens_file: Path) -> None:
    state = tmp_path / "state"
    proc = start_process(state, "--tokens", str(tokens_file))
    try:
        with Client(proc.address, token=ALICE, timeout=30) as a, Client(proc.address, token=BOB, timeout=30) as b:
            mine = a.dict({"a": np.arange(3.0)})
            theirs = b.tensor(np.ones(2, np.float32))
    finally:
        assert proc.terminate()[0] == 0
    proc = start_process(state, "--tokens", str(tokens_file))
    try:
        with Client(proc.address, token=ALICE, timeout=30) as a, Client(proc.address, token=BOB, timeout=30) as b:
            assert [h.handle.id for h in a.handles()] == [mine.id]
            assert [h.handle.id for h in b.handles()] == [theirs.id]
            with pytest.raises(NotFoundError):
                b.dict(mine)
            assert list(a.dict(mine)["a"]) == [0.0, 1.0, 2.0]
    finally:
        assert proc.terminate()[0] == 0


def test_snapshots_written_before_tenants_load_as_the_default_tenants(tmp_path: Path) -> None:
    """A state file without "tenant" keys (as every snapshot before tenants): its objects and sessions
    are the default tenant's, which a server without a tokens file (or with --token) serves."""
    import hashlib
    from weightavg_server.store import snapshot as snapshots
    from weightavg_server.store.registry import Registry
    import torch

    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path)))
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=30, session=True, lease=600) as c:
            d = c.dict({"a": np.arange(3.0)})
            c.snapshot()
            session = c.session
            c._owns_session = False  # noqa: SLF001 - keep the session in the snapshot
    finally:
        runtime.server.stop(None)
        runtime.reaper.stop()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    state_name = next(name for name in manifest["files"] if name.startswith("state-"))
    state = json.loads((tmp_path / state_name).read_text())
    for record in state["handles"] + state["sessions"]:
        del record["tenant"]
    raw = json.dumps(state).encode()
    (tmp_path / state_name).write_bytes(raw)
    manifest["files"][state_name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    registry = Registry()
    assert snapshots.load(registry, tmp_path, torch.device("cpu")) == 1
    assert [(h, e.tenant, e.session) for h, e in registry.items()] == [(d.id, "default", session)]
    assert [s.tenant for s in registry.sessions()] == ["default"]


def test_an_open_server_serves_everyone_as_the_default_admin(live_server: LiveServer) -> None:
    with Client(live_server.address, timeout=30) as c:
        t = c.tensor(np.ones(2, np.float32))
        assert [h.tenant for h in c.handles() if h.handle.id == t.id] == ["default"]
        assert "default" in c.stats()["tenants"]
        c.free(t)


def test_one_tenant_cannot_hold_every_worker(tokens_file: Path) -> None:
    """Calls hold a worker thread while they run, an upload until its last message: a review found
    Bob holding all of them with uploads that sent one message, and Alice not served at all. On a
    server with tokens a tenant has at most half the workers; past that its calls are
    RESOURCE_EXHAUSTED at once, and other tenants (and admins) are served."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens_file), max_workers=4))
    runtime.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{runtime.port}") as channel, connect(runtime, BOB) as b, \
                connect(runtime, ALICE) as a, connect(runtime, ADMIN) as admin, \
                StalledUploads(pb_grpc.WeightAveragingServiceStub(channel), 2, BOBS) as stalled:
            assert "tenant 'bob' has 2 calls in flight" in _share_full(runtime, b).message
            a.ping()
            admin.ping()
            assert a.module(["linear", 2, 1]).kind == "module"
            stalled.release()
            assert all(u.result(timeout=30).dictionary.id for u in stalled.futures)
            b.ping()
    finally:
        runtime.server.stop(None)
        runtime.reaper.stop()


BOBS = [("authorization", f"Bearer {BOB}")]


def test_calls_that_never_send_their_request_count_against_the_tenants_share(tokens_file: Path) -> None:
    """grpc reads a single request on the worker thread before any behaviour runs, and a share
    counted a call only once its behaviour ran: a review held every worker with Pings (and
    keep-alives) of Bob's token that sent their headers and never their message, and Alice was not
    served. Such calls are now counted while their request is awaited: two of Bob's four wait (his
    share of four workers), one keep-alive of four (a quarter of the workers: no share counts
    keep-alives), the rest RESOURCE_EXHAUSTED at once, and Alice is served."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens_file), max_workers=4))
    runtime.start()
    half_open = HalfOpenCalls(f"127.0.0.1:{runtime.port}", BOBS)
    try:
        calls = half_open.open("/weightavg.v1.WeightAveragingService/Ping", 4)
        calls += half_open.open("/weightavg.v1.WeightAveragingService/KeepAliveSession", 4)
        ended = threading.Semaphore(0)
        for call in calls:
            call.add_done_callback(lambda _: ended.release())
        assert all(ended.acquire(timeout=60) for _ in range(5)), "the calls past the share were not refused"
        refused = [call.details() for call in calls if call.done()]
        assert sum("tenant 'bob' has 2 calls in flight" in (d or "") for d in refused) == 2
        assert sum("KeepAliveSession: 1 calls that no tenant's share counts" in (d or "") for d in refused) == 3
        assert all(call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for call in calls if call.done())
        with connect(runtime, ALICE) as a:
            a.ping()  # it was DEADLINE_EXCEEDED: Bob's calls held all four workers
            assert a.module(["linear", 2, 1]).kind == "module"
    finally:
        half_open.close()
        runtime.server.stop(None)
        runtime.reaper.stop()


UPLOADS = "/weightavg.v1.WeightAveragingService/CreateDictionary"


def _share_full(runtime: Runtime, b: Client) -> ResourceExhaustedError:
    """Once Bob's two stalled uploads are in flight (as an admin's stats show), a Ping of his: the
    refusal. Pinging while the uploads were still arriving raced them: a Ping that took a slot of
    his share for an instant got one upload refused in its place, and the share never filled (the
    test failed now and then under load)."""
    with connect(runtime, ADMIN) as admin:
        deadline = time.monotonic() + 30
        while admin.stats()["methods"].get(UPLOADS, {}).get("in_flight", 0) < 2:
            assert time.monotonic() < deadline, "the stalled uploads never arrived"
            time.sleep(0.02)
    with pytest.raises(ResourceExhaustedError) as refused:
        b.ping()
    return refused.value
def test_a_tenant_whose_share_is_full_still_keeps_its_sessions_alive(tokens_file: Path) -> None:
    """A refused KeepAliveSession costs more than the call: the session's lease runs out and every
    handle it owns is freed, under a client that is alive and renewing. While Bob's other calls
    (long epochs, stalled uploads) fill his share of the workers, his idle clients' keep-alives
    must still be served (a review found them RESOURCE_EXHAUSTED, so their sessions expired)."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens_file), max_workers=4))
    runtime.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{runtime.port}") as channel, connect(runtime, BOB) as b, \
                connect(runtime, BOB, session=True, lease=600) as idle:
            d = idle.dict({"x": [7.0]})
            with StalledUploads(pb_grpc.WeightAveragingServiceStub(channel), 2, BOBS) as stalled:
                _share_full(runtime, b)
                assert idle.keepalive() == 600.0
                with pytest.raises(ResourceExhaustedError, match="share"):
                    idle.dict(d, "x")  # other calls are still held to the share
                stalled.release()
                assert all(u.result(timeout=30).dictionary.id for u in stalled.futures)
            assert idle.dict(d, "x").tolist() == [7.0]
    finally:
        runtime.server.stop(None)
        runtime.reaper.stop()




def test_tenants_together_leave_the_workers_kept_for_health_checks(tokens_file: Path) -> None:
    """Each tenant's share is half the workers, but two tenants together could hold them all: with
    four workers, Bob's two stalled uploads and two of Alice's, a liveness probe's health Check (no
    token) waited for a worker until its deadline (found by review). All tenants' calls together (and
    health Watch streams) now take at most the workers but the quarter kept for Checks and
    keep-alives: Alice's second upload, and then a Watch, are RESOURCE_EXHAUSTED at once, the Check
    is answered, an admin is still served, and once the uploads end everyone is served again. An
    open Watch counts in the total; one past the Watch streams' own bound is refused by that bound."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens_file), max_workers=4))
    runtime.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{runtime.port}") as channel, connect(runtime, BOB) as b, \
                connect(runtime, ALICE) as a, connect(runtime, ADMIN) as admin:
            stub = pb_grpc.WeightAveragingServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            with StalledUploads(stub, 2, BOBS) as bobs:
                _share_full(runtime, b)
                with StalledUploads(stub, 2, [("authorization", f"Bearer {ALICE}")]) as alices:
                    ended = threading.Semaphore(0)
                    for upload in alices.futures:
                        upload.add_done_callback(lambda _: ended.release())
                    assert ended.acquire(timeout=60), "neither of Alice's uploads was refused"
                    (refused,) = [upload for upload in alices.futures if upload.done()]
                    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "have 3 of this server's 4 workers in flight" in (refused.details() or "")
                    with pytest.raises(grpc.RpcError) as watch:
                        next(health.Watch(HealthCheckRequest(), timeout=30))
                    assert watch.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    # It was DEADLINE_EXCEEDED: four uploads held all four workers.
                    assert health.Check(HealthCheckRequest(), timeout=30).status == HealthCheckResponse.SERVING
                    with pytest.raises(ResourceExhaustedError, match="all they may take together"):
                        a.ping()
                    admin.ping()
                    bobs.release()
                    alices.release()
                    assert all(u.result(timeout=30).dictionary.id for u in bobs.futures)
                    assert [u for u in alices.futures if u is not refused][0].result(timeout=30).dictionary.id
            a.ping()
            b.ping()
            watch_open = health.Watch(HealthCheckRequest(), timeout=60)
            assert next(watch_open).status == HealthCheckResponse.SERVING  # its own slot, and a place of the total
            with StalledUploads(stub, 2, BOBS):
                _share_full(runtime, b)  # the total is full too: the Watch and Bob's two
                # A Watch past its own bound is refused there, never counting in the total on its way: a
                # flood of them took the total's last place for an instant each, refusing tenants' calls.
                with pytest.raises(grpc.RpcError) as watch:
                    next(health.Watch(HealthCheckRequest(), timeout=30))
                assert "(health Watch streams) are open" in (watch.value.details() or "")
                assert health.Check(HealthCheckRequest(), timeout=30).status == HealthCheckResponse.SERVING
            watch_open.cancel()
    finally:
        runtime.server.stop(None)
        runtime.reaper.stop()


def test_a_tenant_that_holds_nothing_still_shows_its_calls_and_failures(tmp_path: Path) -> None:
    # GetServerStats listed a tenant only once it held something (or had a quota or a session): the
    # calls and failures of one that only made failing calls were in the metrics, not in the stats.
    dave, admin_token = "dave-token-" + "d" * 32, "admin-token-" + "a" * 32
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\ntoken = "{dave}"\ntenant = "dave"\nrole = "user"\n\n'
        f'[[tokens]]\ntoken = "{admin_token}"\ntenant = "ops"\nrole = "admin"\n'
    )
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens)))
    runtime.start()
    try:
        with connect(runtime, dave) as d, connect(runtime, admin_token) as admin:
            d.ping()
            with pytest.raises(NotFoundError):
                d.free("no-such-handle")
            mine = d.stats()["tenants"]
            assert set(mine) == {"dave"}
            assert mine["dave"]["calls"] >= 2 and mine["dave"]["failures"] == 1 and mine["dave"]["handles"] == 0
            everyone = admin.stats()["tenants"]
            assert everyone["dave"]["failures"] == 1 and everyone["dave"]["calls"] >= 3
    finally:
        runtime.server.stop(None)
        runtime.reaper.stop()


def _tenant_series(url: str) -> dict[str, set[str]]:
    """Each tenant a scrape of /metrics names, with the names of its series."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "tenant" in sample.labels:
                found.setdefault(sample.labels["tenant"], set()).add(sample.name)
    return found


def test_a_reload_drops_the_series_of_the_tenants_it_removed(tmp_path: Path) -> None:
    """/metrics and GetServerStats kept every tenant a tokens file had ever named (their call
    counters, and an empty row for every tenant that had once held something), so each SIGHUP that
    renamed tenants added rows for good (found by review). Now a reload forgets the calls of the
    tenants it removed: one that holds nothing disappears; one that still holds objects keeps its
    handle and byte series (what an admin has to purge) without call counters, until it is purged;
    renaming tenants again and again leaves only the current ones; a tenant named again starts
    from zero. A removed tenant's objects stay, its token is UNAUTHENTICATED, and an admin still
    reads and frees them."""
    from weightavg_server.ops.metrics import start_metrics_server

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    tokens.chmod(0o600)
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens)))
    runtime.start()
    metrics = start_metrics_server("127.0.0.1", 0, runtime.stats, runtime.service)
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    try:
        with connect(runtime, BOB) as b, connect(runtime, ALICE) as a, connect(runtime, ADMIN) as admin, \
                connect(runtime, BOB, session=True, lease=600) as in_session:
            kept = b.tensor(np.ones(250, np.float32))
            in_session.tensor(np.ones(2, np.float32))
            a.free(a.tensor(np.ones(4, np.float32)))  # Alice held something once, and nothing now
            before = _tenant_series(url)
            assert {"weightavg_tenant_calls_total", "weightavg_tenant_handles"} <= before["bob"]
            assert {"weightavg_tenant_calls_total", "weightavg_tenant_handles"} <= before["alice"]

            tokens.write_text(TOKENS.replace(f'tenant = "bob"', 'tenant = "ops"').replace(BOB, "x" * 24)
                              .replace('tenant = "alice"', 'tenant = "ops"').replace(ALICE, "y" * 24)
                              .replace(ALICE_READER, "z" * 24))
            assert runtime.reload_tokens()
            with pytest.raises(UnauthenticatedError):
                b.ping()
            with pytest.raises(UnauthenticatedError):
                in_session.keepalive()  # its session is no longer renewed: it ends with its lease
            after = _tenant_series(url)
            assert "alice" not in after
            assert after["bob"] == {"weightavg_tenant_handles", "weightavg_tenant_sessions", "weightavg_tenant_tensor_bytes"}
            stats = admin.stats()["tenants"]
            assert "alice" not in stats
            assert (stats["bob"]["handles"], stats["bob"]["sessions"], stats["bob"]["bytes"]) == (2, 1, {"cpu": 1008})

            assert admin.tensor(kept).tolist() == [1.0] * 250  # the objects stay, for an admin to read or purge
            with connect(runtime, ADMIN, session=in_session.session) as joined:
                assert joined.close_session() == 1  # an admin may end the session now
            assert admin.purge("bob") == 1
            assert "bob" not in _tenant_series(url) and "bob" not in admin.stats()["tenants"]

        for generation in range(3):  # tenants renamed at each reload: only the current ones are listed
            names = [f"team{generation}-{i}" for i in range(3)]
            entries = "".join(
                f'\n[[tokens]]\ntoken = "{name}-token-0000000"\ntenant = "{name}"\nrole = "user"\n' for name in names
            )
            tokens.write_text(TOKENS + entries)
            assert runtime.reload_tokens()
            for name in names:
                with connect(runtime, f"{name}-token-0000000") as c:
                    c.free(c.tensor(np.ones(2, np.float32)))
            named = set(_tenant_series(url))
            assert named - {"ops", "carol"} == set(names), named

        tokens.write_text(TOKENS)  # Bob and Alice again: their counters start from zero
        assert runtime.reload_tokens()
        with connect(runtime, ALICE) as a:
            a.ping()
        with connect(runtime, ADMIN) as admin:
            stats = admin.stats()["tenants"]
        assert stats["alice"]["calls"] == 1 and "bob" not in stats
    finally:
        metrics.stop()
        runtime.server.stop(None)
        runtime.reaper.stop()


def test_a_reservation_spent_in_a_ledger_a_reload_dropped_is_given_back_cleanly() -> None:
    """A reload drops the ledgers of tenants that hold and reserve nothing. An upload whose bytes
    were all spent on its new handle, that handle freed by another call and a reload coming before
    the upload's reservation was given back: the release went to a ledger made afresh, which knew
    nothing of the device, and failed with a KeyError (found in review of the dropping itself)."""
    import torch

    from weightavg_server.domain.tensors import TensorHolder
    from weightavg_server.store.registry import Kind, Registry

    registry = Registry()
    with registry.reserve(handles=1, nbytes={"cpu": 12}) as reservation:
        handle = registry.add(Kind.TENSOR, TensorHolder(torch.ones(3)), reservation)
        assert registry.free([handle]) == 1
        registry.set_quotas({})
    assert registry.tenant_usage() == {} and registry.held_bytes() == {}
    with registry.reserve(handles=1, nbytes={"cpu": 12}) as reservation:  # the tenant's ledger, made again
        registry.add(Kind.TENSOR, TensorHolder(torch.ones(3)), reservation)
    assert registry.tenant_usage()["default"].nbytes == {"cpu": 12}
