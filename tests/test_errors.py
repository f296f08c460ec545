"""Bad input gets a clear status with a message naming the problem, and changes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import numpy as np
import pytest

from weightavg import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

from conftest import LiveServer


def test_unknown_and_freed_handles_are_not_found(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 3, 2])
    p = client.copyparms(m)
    with unchanged():
        with pytest.raises(NotFoundError, match="unknown handle 'mod_nope'"):
            client.copyparms("mod_nope")
        with pytest.raises(NotFoundError):
            client.avgparms(m, "dic_nope")
    assert client.free(p) == 1
    with unchanged(), pytest.raises(NotFoundError, match="already freed"):
        client.dict(p)
    with unchanged(), pytest.raises(NotFoundError):
        client.free(p)


def test_wrong_kind_of_handle_is_invalid_argument(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 3, 2])
    p = client.copyparms(m)
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="expecting module or model or optimizer handle, given dictionary"):
            client.copyparms(p)
        with pytest.raises(InvalidArgumentError, match="expecting dictionary handle, given module"):
            client.avgparms(m, m)
        with pytest.raises(InvalidArgumentError):
            client.copyparms(m, m)
        with pytest.raises(InvalidArgumentError):
            client.batchnorm(p)


def test_bad_specs_name_the_problem(client: Client, unchanged: Any) -> None:
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="unrecognized module type: 'lstmx'"):
            client.module(["lstmx", 3])
        with pytest.raises(InvalidArgumentError, match="linear: unknown option 'foo'"):
            client.module(["linear", 3, 2, {"foo": 1}])
        with pytest.raises(InvalidArgumentError, match="positive input size"):
            client.module(["linear", 0, 2])
        with pytest.raises(InvalidArgumentError, match="number of input features"):
            client.module(["batchnorm1d"])
        with pytest.raises(InvalidArgumentError, match="deeper"):
            spec: Any = ["relu"]
            for _ in range(40):
                spec = ["sequential", spec]
            client.module(spec)
    assert client.handles() == []


def test_copyparms_failure_copies_nothing(client: Client, unchanged: Any) -> None:
    q = client.module(["sequential", ["linear", "a", 4, 3], ["linear", "b", 3, 2]])
    p = client.dict({"a.weight": 7.0, "a.bias": 7.0, "b.weight": np.ones((5, 5), np.float32)})
    with unchanged(), pytest.raises(InvalidArgumentError, match="b: the dictionary's 'b.weight', shape \\[5, 5\\]\\); nothing changed"):
        client.copyparms(q, p)
    assert not np.any(client.parm(q, "a.weight") == 7.0)


def test_avgparms_missing_name_changes_nothing(client: Client, unchanged: Any) -> None:
    q = client.module(["sequential", ["linear", "a", 4, 3], ["linear", "b", 3, 2]])
    p = client.copyparms(q)
    client.delete(p, "b.bias")
    with unchanged(), pytest.raises(InvalidArgumentError, match="parameter 'b.bias' not found"):
        client.avgparms(q, p)
    assert ".n" not in client.size(p)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.ones((3, 5), np.float32), "must match the size"),
        (0.0, r"output with shape \[\] doesn't match the broadcast shape"),
        (np.ones((2, 3), np.int64), "floating-point"),
    ],
)
def test_avgparms_ill_shaped_entry_changes_nothing(client: Client, unchanged: Any, value: Any, message: str) -> None:
    q = client.module(["sequential", ["linear", "a", 4, 3], ["linear", "b", 3, 2]])
    p = client.copyparms(q)
    client.parm(q, "a.weight", 1.0)
    client.dict(p, "b.weight", value)
    with unchanged(), pytest.raises(InvalidArgumentError, match=message):
        client.avgparms(q, p)


def test_bad_count_entry_is_refused(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 2, 1])
    p = client.copyparms(m)
    # A float32 count (an integer one the client sends as float64: test_client_checks.py); the
    # server's check is for every client.
    client.dict(p, ".n", np.float32(5))
    with unchanged(), pytest.raises(InvalidArgumentError, match="'.n' must be a 0-dim float64 count, found float32"):
        client.avgparms(m, p)
    client.dict(p, ".n", 5.0)
    assert client.avgparms(m, p) == 6


def test_restore_momentum_is_all_or_nothing(client: Client, unchanged: Any) -> None:
    q = client.module(["sequential", ["batchnorm1d", "b", 4], ["linear", "l", 4, 2]])
    r = client.batchnorm(q)
    with unchanged():
        with pytest.raises(NotFoundError, match="unable to locate batchnorm module 'zz'"):
            client.batchnorm(q, {**r, "zz": 0.5})
        with pytest.raises(InvalidArgumentError, match="'l' is Linear, not a batchnorm layer"):
            client.batchnorm(q, {"b": 0.3, "l": 0.1})
        with pytest.raises(InvalidArgumentError, match="finite"):
            client.batchnorm(q, {"b": float("nan")})


def test_dictionary_and_parameter_lookups(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 2, 1])
    p = client.copyparms(m)
    view = client.parms(m)
    with unchanged():
        with pytest.raises(NotFoundError, match="no entry 'nope'"):
            client.dict(p, "nope")
        with pytest.raises(NotFoundError, match="nothing deleted"):
            client.delete(p, "weight", "nope")
        with pytest.raises(NotFoundError, match="parameter 'nope' not found"):
            client.parm(m, "nope")
        with pytest.raises(InvalidArgumentError, match="without '.'"):
            client.parm(m, "a.b", 1.0)
        with pytest.raises(InvalidArgumentError, match="must match the size"):
            client.parm(m, "weight", np.ones(3, np.float32))
        with pytest.raises(NotFoundError, match="not a tensor of the module"):
            client.dict(view, "extra", 1.0)
        with pytest.raises(InvalidArgumentError, match="nothing changed"):
            client.dict(view, {"bias": 2.0, "weight": np.ones((4, 4), np.float32)})
        with pytest.raises(InvalidArgumentError, match="live view"):
            client.delete(view, "weight")
        with pytest.raises(NotFoundError, match="no child 'zz'"):
            client.parmnames(m, "zz")
        with pytest.raises(NotFoundError, match="nothing freed"):
            client.free(p, "dic_nope")
        # A repeated name was copied and streamed once per repeat (a million repeats of one name fit
        # in a request: minutes of the server's work for one entry); the client kept one value.
        with pytest.raises(InvalidArgumentError, match="'weight' is named twice"):
            client.dict(p, ["weight", "bias", "weight"])


def test_devices_that_do_not_exist(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 2, 1])
    with unchanged():
        with pytest.raises(InvalidArgumentError, match="not supported|unknown device"):
            client.to(m, "tpu")
        if not _has_cuda():
            with pytest.raises(InvalidArgumentError, match="no CUDA device"):
                client.to(m, "cuda")


def test_a_device_is_named_as_its_tensors_are_however_it_is_spelled() -> None:
    """The store reserves by device name: "cpu:0" must be the "cpu" its tensors report, and on a
    CUDA server "cuda" the current device (a move to "cuda" was checked against nothing)."""
    import torch

    from weightavg_server.domain import devices

    assert devices.parse("cpu:0") == devices.parse("cpu") == torch.device("cpu")
    assert str(devices.parse("cpu:0")) == "cpu"
    if _has_cuda():
        assert devices.parse("cuda") == torch.device("cuda", torch.cuda.current_device())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _stub(live_server: LiveServer, max_bytes: int = 4 << 20) -> tuple[grpc.Channel, pb_grpc.WeightAveragingServiceStub]:
    channel = grpc.insecure_channel(live_server.address, options=[("grpc.max_send_message_length", max_bytes)])
    return channel, pb_grpc.WeightAveragingServiceStub(channel)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 12)], "holds 8 bytes"),
        ([pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 4)], "stream ended inside"),
        ([pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=[-1])], "negative dimension"),
        ([pb.TensorChunk(name="w", dtype=999, shape=[1], data=b"\0")], "unsupported dtype"),
        ([pb.TensorChunk(data=b"\0")], "before a header"),
        ([pb.TensorChunk(name="w", dtype=pb.DTYPE_BOOL, shape=[1], data=b"\7")], "bytes other than 0 and 1"),
        ([pb.TensorChunk(name="w", dtype=pb.DTYPE_UINT8, shape=[2], data=b"\0"),
          pb.TensorChunk(name="v", dtype=pb.DTYPE_UINT8, shape=[1], data=b"\0")], "ended early"),
        ([pb.TensorChunk(name="", dtype=pb.DTYPE_UINT8, shape=[1], data=b"\0")], "keys must not be empty"),
    ],
)
def test_malformed_tensor_streams(live_server: LiveServer, client: Client, unchanged: Any,
                                  chunks: list[pb.TensorChunk], message: str) -> None:
    channel, stub = _stub(live_server)
    with channel, unchanged(), pytest.raises(grpc.RpcError) as err:
        stub.CreateDictionary(iter([pb.CreateDictionaryRequest(chunk=c) for c in chunks]), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def _later(method: str, client: Client) -> tuple[Any, Any, str]:
    """A two-message upload of `method` as a generated client might send it: the first message names the
    target; the second sets a header field again, to another value (the field's name is returned)."""
    chunk = pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=[1], data=b"\0" * 4)
    if method == "SetParameter":
        m = client.module(["linear", 1, 1])
        return (pb.SetParameterRequest(handle=m.id, name="bias", chunk=chunk),
                pb.SetParameterRequest(name="weight"), "name")
    if method == "UpdateDictionary":
        d = client.dict({"w": np.zeros(1, np.float32)})
        return (pb.UpdateDictionaryRequest(dictionary=d.id, chunk=chunk),
                pb.UpdateDictionaryRequest(dictionary=client.dict({"w": np.ones(1, np.float32)}).id), "dictionary")
    if method == "CreateDictionary":
        return (pb.CreateDictionaryRequest(chunk=chunk),
                pb.CreateDictionaryRequest(request_id=str(uuid.uuid4())), "request_id")
    return pb.CreateTensorRequest(chunk=chunk), pb.CreateTensorRequest(request_id=str(uuid.uuid4())), "request_id"


@pytest.mark.parametrize("method", ["SetParameter", "UpdateDictionary", "CreateDictionary", "CreateTensor"])
def test_a_header_field_set_otherwise_on_a_later_message_is_refused(
    live_server: LiveServer, client: Client, unchanged: Any, method: str
) -> None:
    """Header fields go on a stream's first message. A later message that set them to another value
    was ignored: a request ID there made no exactly-once call, another handle there was not the
    target, and the call answered OK. Now INVALID_ARGUMENT naming the field; a later message that
    repeats the first one's value is still taken."""
    first, later, field = _later(method, client)
    same = type(first)()
    same.CopyFrom(first)
    same.ClearField("chunk")
    channel, stub = _stub(live_server)
    with channel:
        with unchanged(), pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(iter([first, later]), timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert f"message 2 of the {method}Request stream sets {field}" in err.value.details()
        getattr(stub, method)(iter([first, same]), timeout=30)


def test_a_handle_field_left_unset_says_which_kind_it_takes(live_server: LiveServer, client: Client,
                                                            unchanged: Any) -> None:
    """A generated client that leaves a handle field unset sends an empty id. CreateModel takes three;
    the answer was "no handle given" whichever was missing. Now it names the kind the empty one takes."""
    m = client.module(["linear", 1, 2])
    parts = {"module": m.id, "loss": client.loss("ce").id, "optimizer": client.opt("sgd", m).id}
    channel, stub = _stub(live_server)
    with channel:
        for missing in parts:
            request = pb.CreateModelRequest(**{k: v for k, v in parts.items() if k != missing})
            with unchanged(), pytest.raises(grpc.RpcError) as err:
                stub.CreateModel(request, timeout=30)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"no handle given: an empty id where the call takes a handle of kind {missing};" in err.value.details()


def test_huge_declared_shape_is_refused_before_allocating(live_server: LiveServer, unchanged: Any) -> None:
    channel, stub = _stub(live_server)
    chunk = pb.TensorChunk(name="w", dtype=pb.DTYPE_FLOAT64, shape=[1 << 40, 1 << 20])
    with channel, unchanged(), pytest.raises(grpc.RpcError) as err:
        stub.CreateDictionary(iter([pb.CreateDictionaryRequest(chunk=chunk)]), timeout=30)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_oversized_message_is_resource_exhausted(live_server: LiveServer, unchanged: Any) -> None:
    channel, stub = _stub(live_server, max_bytes=128 << 20)
    request = pb.CreateModuleRequest(spec=pb.LayerSpec(type="linear", name="x" * (65 << 20)))
    with channel, unchanged(), pytest.raises(grpc.RpcError) as err:
        stub.CreateModule(request, timeout=60)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_empty_header_stream_is_invalid(live_server: LiveServer, unchanged: Any) -> None:
    channel, stub = _stub(live_server)
    with channel, unchanged(), pytest.raises(grpc.RpcError) as err:
        stub.UpdateDictionary(iter([]), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_avgparms_size_error_uses_pytorch_wording(client: Client, unchanged: Any) -> None:
    m = client.module(["linear", 4, 2])
    p = client.copyparms(m)
    client.dict(p, "weight", np.ones((2, 3), np.float32))
    with unchanged(), pytest.raises(InvalidArgumentError) as err:
        client.avgparms(m, p)
    assert err.value.message.startswith(
        "The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 1"
    )


def test_a_message_echoing_a_huge_name_is_cut_so_the_status_arrives(live_server: LiveServer) -> None:
    """gRPC caps the trailer that carries the status message (16 KiB): a message that echoed a
    20,000-character handle arrived as RESOURCE_EXHAUSTED "received metadata size exceeds hard
    limit" instead of its own status (found by review). Messages are cut to 1,000 characters."""
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        for handle in ("z" * 20000, "\u00e9" * 20000):
            with pytest.raises(grpc.RpcError) as err:
                stub.FreeHandles(pb.FreeHandlesRequest(handles=[handle]), timeout=60)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            details = err.value.details()
            assert len(details) <= 1000 and details.startswith("unknown handle") and "more characters)" in details



def test_a_call_past_the_clients_timeout_names_the_timeout_and_where_to_set_it() -> None:
    """gRPC's own "Deadline Exceeded" named neither the deadline nor the setting: it read as a server
    fault. The server's one worker is held by a stalled upload, so the call cannot be answered in time."""
    import time

    from conftest import StalledUploads
    from weightavg import DeadlineExceededError
    from weightavg._cli import _CliClient
    from weightavg_server.ops.app import create_runtime
    from weightavg_server.ops.config import ServerConfig

    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=1))
    runtime.start()
    address = f"127.0.0.1:{runtime.port}"
    uploads = "/weightavg.v1.WeightAveragingService/CreateDictionary"
    try:
        with grpc.insecure_channel(address) as channel, StalledUploads(pb_grpc.WeightAveragingServiceStub(channel), 1):
            deadline = time.monotonic() + 60  # a bound on a hang, not a timing
            while getattr(runtime.stats.snapshot().get(uploads), "in_flight", 0) != 1:
                assert time.monotonic() < deadline, "the stalled upload never reached the server's worker"
                time.sleep(0.05)
            with Client(address, timeout=0.5) as c, pytest.raises(DeadlineExceededError) as err:
                c.ping()
            assert err.value.message == (
                "Deadline Exceeded (no answer within this client's timeout of 0.5 s; give a longer Client(..., timeout=...))"
            )
            with _CliClient(address, timeout=0.5) as cli, pytest.raises(DeadlineExceededError, match="--timeout 0.5 s"):
                cli.ping()
    finally:
        runtime.stop(None)


def test_entries_already_held_are_named_by_the_dtypes_clients_send(
    client: Client, unchanged: Any
) -> None:
    """Refusals about a tensor the server holds printed torch's spelling ("'w' holds torch.int32",
    "'into' holds torch.int64, the inputs torch.int32"), a name no client sends: they now print the
    table's ("int32"), as `to(q, dtype=...)` and the client's arrays name it."""
    q = client.module(["linear", 2, 1])
    ints = client.dict({"weight": np.zeros((1, 2), np.int32), "bias": np.zeros(1, np.int32)})
    a, b = client.dict({"w": np.ones(2, np.int32)}), client.dict({"w": np.ones(2, np.int32)})
    into = client.dict({"w": np.zeros(2, np.int64)})
    opt = client.opt("sgd", q, 0.1)
    for call, message in (
        (lambda: client.avgparms(q, ints), "'weight' holds int32; an average needs a floating-point entry"),
        (lambda: client.average([a, b], into=into), "'into' holds int64, the inputs int32; integer entries must agree"),
        (lambda: client.outer_step(opt, ints), "outer step: entry 'weight' holds int32; an average needs floating values"),
    ):
        with unchanged(), pytest.raises(InvalidArgumentError) as err:
            call()
        assert message in str(err.value) and "torch." not in str(err.value), str(err.value)
