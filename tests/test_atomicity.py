"""Every mutating RPC, with every kind of bad argument, fails as a whole: a snapshot of every live
handle (values, dtypes, shapes, keys, batchnorm momenta, train flags) is bit-identical before and
after, and no handle appears or disappears.

Requests go through the generated stub, not the client's conveniences, so malformed streams can
be sent as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from conftest import LiveServer
from weightavg import Client, wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
AB = grpc.StatusCode.ABORTED
UNKNOWN_ID = "dic_" + "0" * 32
STALE = "00000000-1"
"""An etag that is no object's: a change conditional on it is ABORTED (docs/robust.md, "Conditional changes")."""


@dataclass
class World:
    """A spread of live handles of every kind, in several states, to be left untouched."""

    net: str  # sequential: linear a (4->3), batchnorm1d b (momentum None after a reset), linear d
    ref: str  # a second handle to net
    copy: str  # copyparms(net)
    avg: str  # an average with '.n' = 2
    view: str  # live view of net's parameters
    bufs: str  # live view of net's buffers
    plain: str  # mixed dtypes: int64, bool, float16, float64
    tensor: str
    bad_n: str  # a dictionary with net's parameters and an int64 '.n'
    small: str  # a dictionary with net's parameter names but shapes that do not fit
    opt: str = ""  # sgd with momentum over net, never stepped (no state)
    model: str = ""  # a linear 4 -> 3 model without test data


def _set_as_sent(client: Client, dictionary: str, name: str, value: np.ndarray) -> None:
    """Set an entry through the bare stub, as another language's client may send it: the Python
    client sends an integer count '.n' as the float64 the server counts in."""
    messages = [
        pb.UpdateDictionaryRequest.FromString(m)
        for m in wire.encoded_chunks([(name, value)], 1 << 20, pb.UpdateDictionaryRequest)
    ]
    messages[0].dictionary = dictionary
    with grpc.insecure_channel(client.address) as channel:
        pb_grpc.WeightAveragingServiceStub(channel).UpdateDictionary(iter(messages), timeout=30)


@pytest.fixture
def world(client: Client) -> World:
    net = client.module(["sequential", ["linear", "a", 4, 3], ["batchnorm1d", "b", 3], ["linear", "d", 3, 2]])
    client.batchnorm(net)  # momentum None: a restore must not happen by accident
    avg = client.copyparms(net)
    client.parm(net, "a.weight", 0.5)
    client.avgparms(net, avg)
    bad_n = client.copyparms(net)
    _set_as_sent(client, bad_n.id, ".n", np.array(3, np.int64))
    small = client.dict({name: np.ones((7,), np.float32) for name in client.parmnames(net)})
    return World(
        net=net.id, ref=client.addref(net).id, copy=client.copyparms(net).id, avg=avg.id,
        view=client.parms(net).id, bufs=client.buffers(net).id,
        plain=client.dict({
            "i": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.array([True, False]),
            "h": np.ones(3, np.float16), "x": np.linspace(0, 1, 5),
        }).id,
        tensor=client.tensor(np.arange(4, dtype=np.float32)).id,
        bad_n=bad_n.id, small=small.id, opt=client.opt("sgd", net, 0.1, 0.9).id, model=linear_model(client),
    )


def linear_model(client: Client) -> str:
    q = client.module(["linear", 4, 3])
    return client.model(q, client.loss("ce"), client.opt("sgd", q, 0.1)).id


@pytest.fixture
def stub(live_server: LiveServer) -> Iterator[pb_grpc.WeightAveragingServiceStub]:
    with grpc.insecure_channel(live_server.address) as channel:
        yield pb_grpc.WeightAveragingServiceStub(channel)


def header(name: str = "", dtype: int = pb.DTYPE_FLOAT32, shape: tuple[int, ...] = (), data: bytes = b"") -> pb.TensorChunk:
    return pb.TensorChunk(name=name, dtype=dtype, shape=list(shape), data=data)


def f32(*values: float) -> bytes:
    return np.array(values, np.float32).tobytes()


GOOD = header("g", shape=(2,), data=f32(1, 2))
"""A well-formed tensor, sent before a bad one to show the good part is not kept either."""

BAD_STREAMS: dict[str, list[pb.TensorChunk]] = {
    "data before header": [pb.TensorChunk(data=b"\0\0\0\0")],
    "too many bytes": [GOOD, header("x", shape=(2,), data=f32(1, 2, 3))],
    "stream ends inside a tensor": [GOOD, header("x", shape=(3,), data=f32(1, 2))],
    "next header before the data is in": [GOOD, header("x", shape=(2,), data=f32(1)), header("y", shape=())],
    "unknown dtype": [GOOD, header("x", dtype=999, shape=(1,), data=b"\0" * 4)],
    "negative dimension": [GOOD, header("x", shape=(2, -1))],
    "too many dimensions": [GOOD, header("x", shape=(1,) * 33, data=f32(1))],
    "bool other than 0 or 1": [GOOD, header("x", dtype=pb.DTYPE_BOOL, shape=(2,), data=b"\x01\x02")],
    "empty key": [GOOD, header("", shape=(), data=f32(1))],
    "huge declared shape, no data": [GOOD, header("x", shape=(2**20, 2**20))],  # 4 TiB of float32
    "no elements but strides that overflow": [GOOD, header("x", shape=(0, 2**62, 4))],  # found by fuzzing
    "a name given twice": [GOOD, header("g", shape=(2,), data=f32(3, 4))],  # found by review: both kept in the answer
}
MANY_TENSORS_ONLY = ("empty key", "a name given twice")
"""Bad only in a stream of named tensors: SetParameter and CreateTensor take one, and no name."""


def declared(chunk: pb.TensorChunk, count: int | None = 1, total: int | None = None, crc: int | None = None,
             right_crc: bool = True) -> pb.TensorChunk:
    """A copy of a one-chunk tensor declared as a stream (count, bytes) with its CRC32C (or a wrong one)."""
    out = pb.TensorChunk()
    out.CopyFrom(chunk)
    if count is not None:
        out.tensor_count, out.total_bytes = count, len(chunk.data) if total is None else total
    good = wire.crc32c(chunk.data, wire.tensor_crc(chunk.name, chunk.dtype, chunk.shape))
    if crc is not None or right_crc:
        out.crc32c = good if crc is None else crc
    return out


X8 = header("x", shape=(2,), data=f32(3, 4))
DECLARED_STREAMS: dict[str, list[pb.TensorChunk]] = {
    # Each alone is refused: a declared stream carries what it declares, each tensor with its checksum.
    "declared two tensors, sent one": [declared(X8, count=2, total=16)],
    "declared more bytes than sent": [declared(X8, total=12)],
    "declared fewer bytes than sent": [declared(X8, total=4)],
    "declared without a checksum": [declared(X8, right_crc=False)],
    "checksum that does not match": [declared(X8, crc=0x1234)],
    "declaration after the first chunk": [header("x", shape=(2,), data=f32(3, 4)), pb.TensorChunk(tensor_count=1, total_bytes=8)],
    "checksum on a chunk that does not complete its tensor": [
        declared(header("x", shape=(3,), data=f32(1, 2)), total=12, crc=1), pb.TensorChunk(data=f32(3))],
    "half a declaration": [pb.TensorChunk(name="x", dtype=pb.DTYPE_FLOAT32, shape=[2], data=f32(3, 4), tensor_count=1)],
    "negative count": [declared(X8, count=-1)],
    "declared, but none sent": [pb.TensorChunk(tensor_count=1, total_bytes=8)],
}
"""Streams that break the declaration rules (TensorChunk in the .proto): INVALID_ARGUMENT, a
checksum mismatch DATA_LOSS."""
DL = grpc.StatusCode.DATA_LOSS


def code_of(kind: str) -> grpc.StatusCode:
    return RE if "huge" in kind else DL if "does not match" in kind else IA


@dataclass(frozen=True)
class Case:
    id: str
    code: grpc.StatusCode
    call: Callable[[pb_grpc.WeightAveragingServiceStub, World], object]


def unary(method: str, make: Callable[[World], object]) -> Callable[[pb_grpc.WeightAveragingServiceStub, World], object]:
    return lambda stub, w: getattr(stub, method)(make(w), timeout=60)


def streamed(method: str, make: Callable[[World], list[object]]) -> Callable[[pb_grpc.WeightAveragingServiceStub, World], object]:
    return lambda stub, w: getattr(stub, method)(iter(make(w)), timeout=60)


def set_parameter(handle: Callable[[World], str], name: str, chunks: list[pb.TensorChunk]):  # type: ignore[no-untyped-def]
    def make(w: World) -> list[object]:
        first = pb.SetParameterRequest(handle=handle(w), name=name, chunk=chunks[0] if chunks else None)
        return [first, *(pb.SetParameterRequest(chunk=c) for c in chunks[1:])]

    return streamed("SetParameter", make)


def update(dictionary: Callable[[World], str], chunks: list[pb.TensorChunk]):  # type: ignore[no-untyped-def]
    def make(w: World) -> list[object]:
        return [pb.UpdateDictionaryRequest(dictionary=dictionary(w)), *(pb.UpdateDictionaryRequest(chunk=c) for c in chunks)]

    return streamed("UpdateDictionary", make)


def momenta(**values: float | None) -> dict[str, pb.Momentum]:
    return {k.replace("_", "."): pb.Momentum() if v is None else pb.Momentum(value=v) for k, v in values.items()}


W3 = header(shape=(3, 4), data=f32(*range(12)))
"""A value that fits parameter a.weight."""

CASES = [
    # SetParameter
    Case("set/unknown handle", NF, set_parameter(lambda w: UNKNOWN_ID, "a.weight", [W3])),
    Case("set/no handle", IA, set_parameter(lambda w: "", "a.weight", [W3])),
    Case("set/dictionary handle", IA, set_parameter(lambda w: w.copy, "a.weight", [W3])),
    Case("set/tensor handle", IA, set_parameter(lambda w: w.tensor, "a.weight", [W3])),
    Case("set/unknown dotted name", IA, set_parameter(lambda w: w.net, "a.nope", [W3])),
    Case("set/empty name", IA, set_parameter(lambda w: w.net, "", [W3])),
    Case("set/name of an attribute", IA, set_parameter(lambda w: w.net, "training", [W3])),
    Case("set/shape that does not broadcast", IA, set_parameter(lambda w: w.net, "a.weight",
                                                                 [header(shape=(5,), data=f32(*range(5)))])),
    Case("set/complex into a real parameter", IA, set_parameter(lambda w: w.net, "a.bias", [
        header(dtype=pb.DTYPE_COMPLEX64, shape=(), data=f32(3, 4))])),  # found by review: 3+4j became 3
    Case("set/two tensors", IA, set_parameter(lambda w: w.net, "a.weight", [W3, W3])),
    Case("set/no tensor", IA, set_parameter(lambda w: w.net, "a.weight", [])),
    Case("set/empty stream", IA, lambda stub, w: stub.SetParameter(iter([]), timeout=60)),
    *[Case(f"set/{k}", RE if "huge" in k else IA, set_parameter(lambda w: w.net, "a.weight", v[1:] or v))
      for k, v in BAD_STREAMS.items() if k not in MANY_TENSORS_ONLY],
    *[Case(f"set/{k}", code_of(k), set_parameter(lambda w: w.net, "a.bias", v)) for k, v in DECLARED_STREAMS.items()],
    # LoadParameters
    Case("load/unknown module", NF, unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=UNKNOWN_ID, dictionary=w.copy))),
    Case("load/unknown dictionary", NF, unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.net, dictionary=UNKNOWN_ID))),
    Case("load/module as dictionary", IA, unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.net, dictionary=w.net))),
    Case("load/dictionary as module", IA, unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.copy, dictionary=w.copy))),
    Case("load/tensor as dictionary", IA, unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.net, dictionary=w.tensor))),
    Case("load/shapes that do not fit", IA, unary("LoadParameters", lambda w: pb.LoadParametersRequest(handle=w.net, dictionary=w.small))),
    # AverageParameters
    Case("avg/unknown module", NF, unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=UNKNOWN_ID, dictionary=w.avg))),
    Case("avg/unknown dictionary", NF, unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.net, dictionary=UNKNOWN_ID))),
    Case("avg/wrong kinds", IA, unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.avg, dictionary=w.net))),
    Case("avg/missing parameters", IA, unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.net, dictionary=w.plain))),
    Case("avg/shapes that do not fit", IA, unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.net, dictionary=w.small))),
    Case("avg/integer count", IA, unary("AverageParameters", lambda w: pb.AverageParametersRequest(handle=w.net, dictionary=w.bad_n))),
    Case("avg/buffers missing from the average", IA, unary("AverageParameters", lambda w: pb.AverageParametersRequest(
        handle=w.net, dictionary=w.avg, buffers=pb.BUFFER_MODE_COPY))),
    Case("avg/unknown buffer mode", IA, unary("AverageParameters", lambda w: pb.AverageParametersRequest(
        handle=w.net, dictionary=w.avg, buffers=99))),  # type: ignore[arg-type]
    Case("avg/dictionary source with an entry the average lacks", IA, unary("AverageParameters",
         lambda w: pb.AverageParametersRequest(handle=w.plain, dictionary=w.avg))),
    # UpdateMovingAverage: a request that would update the average (with '.n' = 2) but for one field
    *[Case(f"ema/{name}", code, unary("UpdateMovingAverage", lambda w, fields=fields: pb.UpdateMovingAverageRequest(**{
        "handle": w.net, "dictionary": w.avg, "decay": 0.5, **fields(w)})))
      for name, code, fields in [
          ("unknown module", NF, lambda w: {"handle": UNKNOWN_ID}),
          ("unknown dictionary", NF, lambda w: {"dictionary": UNKNOWN_ID}),
          ("tensor source", IA, lambda w: {"handle": w.tensor}),
          ("module as the average", IA, lambda w: {"dictionary": w.net}),
          ("decay above 1", IA, lambda w: {"decay": 1.01}),
          ("NaN decay", IA, lambda w: {"decay": math.nan}),
          ("warm-up gamma 0", IA, lambda w: {"warmup": True, "warmup_gamma": 0.0}),
          ("negative update_after_step", IA, lambda w: {"update_after_step": -1}),
          ("negative step", IA, lambda w: {"step": -5}),
          ("missing parameters", IA, lambda w: {"dictionary": w.plain}),
          ("shapes that do not fit", IA, lambda w: {"dictionary": w.small}),
          ("buffers missing from the average", IA, lambda w: {"buffers": pb.BUFFER_MODE_AVERAGE}),
          ("buffers with a dictionary source", IA, lambda w: {"handle": w.copy, "buffers": pb.BUFFER_MODE_COPY}),
      ]],
    # CopyParameters
    Case("copy/integer dtype", IA, unary("CopyParameters", lambda w: pb.CopyParametersRequest(handle=w.net, dtype=pb.DTYPE_INT64))),
    Case("copy/unknown dtype", IA, unary("CopyParameters", lambda w: pb.CopyParametersRequest(handle=w.net, dtype=999))),  # type: ignore[arg-type]
    Case("copy/dictionary handle", IA, unary("CopyParameters", lambda w: pb.CopyParametersRequest(handle=w.copy, buffers=True))),
    # ResetBatchNorm
    Case("reset/unknown handle", NF, unary("ResetBatchNorm", lambda w: pb.ResetBatchNormRequest(handle=UNKNOWN_ID))),
    Case("reset/dictionary handle", IA, unary("ResetBatchNorm", lambda w: pb.ResetBatchNormRequest(handle=w.view))),
    Case("reset/tensor handle", IA, unary("ResetBatchNorm", lambda w: pb.ResetBatchNormRequest(handle=w.tensor))),
    Case("reset/no handle", IA, unary("ResetBatchNorm", lambda w: pb.ResetBatchNormRequest())),
    # RestoreMomentum: a valid entry first, so a partial restore would show
    Case("restore/unknown handle", NF, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=UNKNOWN_ID, momenta=momenta(b=0.1)))),
    Case("restore/wrong kind", IA, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.avg, momenta=momenta(b=0.1)))),
    Case("restore/unknown layer", NF, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.net, momenta=momenta(b=0.1, zz=0.1)))),
    Case("restore/not a batchnorm", IA, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.net, momenta=momenta(b=0.1, a=0.1)))),
    Case("restore/root", IA, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.net, momenta={"b": pb.Momentum(value=0.1), "": pb.Momentum(value=0.1)}))),
    Case("restore/NaN", IA, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.net, momenta=momenta(b=math.nan)))),
    Case("restore/infinity", IA, unary("RestoreMomentum", lambda w: pb.RestoreMomentumRequest(handle=w.net, momenta=momenta(b=math.inf)))),
    # UpdateDictionary
    Case("update/unknown dictionary", NF, update(lambda w: UNKNOWN_ID, [GOOD])),
    Case("update/module handle", IA, update(lambda w: w.net, [GOOD])),
    Case("update/no dictionary", IA, update(lambda w: "", [GOOD])),
    Case("update/empty stream", IA, lambda stub, w: stub.UpdateDictionary(iter([]), timeout=60)),
    Case("update/view: unknown key", NF, update(lambda w: w.view, [header("a.weight", shape=(), data=f32(1)), GOOD])),
    Case("update/view: complex into a real parameter", IA, update(lambda w: w.view, [
        header("a.bias", dtype=pb.DTYPE_COMPLEX64, shape=(), data=f32(3, 4))])),
    Case("update/view: shape that does not fit", IA, update(lambda w: w.view, [
        header("a.weight", shape=(), data=f32(1)), header("a.bias", shape=(2,), data=f32(1, 2))])),
    *[Case(f"update/{k}", RE if "huge" in k else IA, update(lambda w: w.plain, v)) for k, v in BAD_STREAMS.items()],
    *[Case(f"update/{k}", code_of(k), update(lambda w: w.plain, v)) for k, v in DECLARED_STREAMS.items()],
    # DeleteEntries
    Case("delete/unknown dictionary", NF, unary("DeleteEntries", lambda w: pb.DeleteEntriesRequest(dictionary=UNKNOWN_ID, names=["i"]))),
    Case("delete/module handle", IA, unary("DeleteEntries", lambda w: pb.DeleteEntriesRequest(dictionary=w.net, names=["a.weight"]))),
    Case("delete/missing key after a present one", NF, unary("DeleteEntries", lambda w: pb.DeleteEntriesRequest(dictionary=w.plain, names=["i", "zz"]))),
    Case("delete/from a live view", IA, unary("DeleteEntries", lambda w: pb.DeleteEntriesRequest(dictionary=w.view, names=["a.weight"]))),
    # FreeHandles
    Case("free/unknown among known", NF, unary("FreeHandles", lambda w: pb.FreeHandlesRequest(handles=[w.copy, UNKNOWN_ID, w.tensor]))),
    Case("free/empty id among known", NF, unary("FreeHandles", lambda w: pb.FreeHandlesRequest(handles=[w.copy, ""]))),
    # MoveHandle
    Case("move/unknown handle", NF, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=UNKNOWN_ID, device="cpu"))),
    Case("move/unknown device", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.plain, device="gpu"))),
    Case("move/negative index", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.plain, device="cpu:-1"))),
    Case("move/meta device", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.net, device="meta"))),
    Case("move/CUDA on a CPU server", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.net, device="cuda:0"))),
    Case("move/unknown dtype", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.plain, dtype=999))),
    Case("move/module to an integer dtype", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.net, dtype=pb.DTYPE_INT32))),
    # found by review: a dictionary moved to bool held only True, a tensor to int8 was truncated
    Case("move/dictionary to bool", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.plain, dtype=pb.DTYPE_BOOL))),
    Case("move/tensor to an integer dtype", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.tensor, dtype=pb.DTYPE_INT8))),
    Case("move/live view", IA, unary("MoveHandle", lambda w: pb.MoveHandleRequest(handle=w.view, dtype=pb.DTYPE_FLOAT64))),
    # CreateModule
    Case("module/no spec", IA, unary("CreateModule", lambda w: pb.CreateModuleRequest())),
    Case("module/unknown type", IA, unary("CreateModule", lambda w: pb.CreateModuleRequest(spec=pb.LayerSpec(type="pickle")))),
    Case("module/bad option in a deep child", IA, unary("CreateModule", lambda w: pb.CreateModuleRequest(spec=pb.LayerSpec(
        type="sequential", children=[pb.LayerSpec(type="linear", args=[pb.OptionValue(int_value=2)] * 2),
                                     pb.LayerSpec(type="linear", args=[pb.OptionValue(string_value="x")])])))),
    Case("module/duplicate child names", IA, unary("CreateModule", lambda w: pb.CreateModuleRequest(spec=pb.LayerSpec(
        type="sequential", children=[pb.LayerSpec(type="relu", name="r")] * 2)))),
    Case("module/too deep", IA, unary("CreateModule", lambda w: pb.CreateModuleRequest(spec=deep_spec(40)))),
    Case("module/too big", RE, unary("CreateModule", lambda w: pb.CreateModuleRequest(spec=pb.LayerSpec(
        type="linear", args=[pb.OptionValue(int_value=2**40)] * 2)))),
    # CreateDictionary and CreateTensor
    *[Case(f"dict/{k}", RE if "huge" in k else IA,
           streamed("CreateDictionary", lambda w, v=v: [pb.CreateDictionaryRequest(chunk=c) for c in v]))
      for k, v in BAD_STREAMS.items()],
    *[Case(f"dict/{k}", code_of(k), streamed("CreateDictionary", lambda w, v=v: [pb.CreateDictionaryRequest(chunk=c) for c in v]))
      for k, v in DECLARED_STREAMS.items()],
    *[Case(f"tensor/{k}", code_of(k), streamed("CreateTensor", lambda w, v=v: [pb.CreateTensorRequest(chunk=c) for c in v]))
      for k, v in DECLARED_STREAMS.items()],
    Case("tensor/none", IA, streamed("CreateTensor", lambda w: [])),
    Case("tensor/two", IA, streamed("CreateTensor", lambda w: [pb.CreateTensorRequest(chunk=GOOD)] * 2)),
    *[Case(f"tensor/{k}", RE if "huge" in k else IA,
           streamed("CreateTensor", lambda w, v=v: [pb.CreateTensorRequest(chunk=c) for c in v[1:] or v]))
      for k, v in BAD_STREAMS.items() if k not in MANY_TENSORS_ONLY],
    # AddReference
    Case("addref/unknown handle", NF, unary("AddReference", lambda w: pb.AddReferenceRequest(handle=UNKNOWN_ID))),
    # AverageDictionaries: a good input first, so a partial average would show
    *[Case(f"average/{k}", code, unary("AverageDictionaries", make)) for k, code, make in (
        ("unknown dictionary", NF, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, UNKNOWN_ID])),
        ("none", IA, lambda w: pb.AverageDictionariesRequest()),
        ("tensor handle", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, w.tensor])),
        ("names that differ", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, w.plain])),
        ("shapes that do not broadcast", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, w.small])),
        ("weights of the wrong count", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, w.avg], weights=[1])),
        ("a negative weight", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, w.avg], weights=[2, -1])),
        ("a NaN weight", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy, w.avg], weights=[1, math.nan])),
        ("unknown option", IA, lambda w: pb.AverageDictionariesRequest(
            dictionaries=[w.copy, w.avg], options=[pb.Option(name="integer", value=pb.OptionValue(string_value="max"))])),
        ("into a dictionary lacking entries", IA, lambda w: pb.AverageDictionariesRequest(
            dictionaries=[w.copy, w.avg], into=w.plain)),
        ("into a module whose shapes do not fit", IA, lambda w: pb.AverageDictionariesRequest(
            dictionaries=[w.small, w.small], into=w.net)),
        ("into a tensor", IA, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy], into=w.tensor)),
        ("into an unknown handle", NF, lambda w: pb.AverageDictionariesRequest(dictionaries=[w.copy], into=UNKNOWN_ID)),
    )],
    # MergeDictionaries
    *[Case(f"merge/{k}", code, unary("MergeDictionaries", make)) for k, code, make in (
        ("unknown method", IA, lambda w: pb.MergeDictionariesRequest(method="mean", dictionaries=[w.copy, w.avg])),
        ("ties without a base", IA, lambda w: pb.MergeDictionariesRequest(
            method="ties", dictionaries=[w.copy, w.avg], options=[pb.Option(name="density", value=pb.OptionValue(float_value=0.5))])),
        ("unknown base", NF, lambda w: pb.MergeDictionariesRequest(method="task_arithmetic", dictionaries=[w.copy], base=UNKNOWN_ID)),
        ("slerp of three", IA, lambda w: pb.MergeDictionariesRequest(
            method="slerp", dictionaries=[w.copy, w.avg, w.copy], options=[pb.Option(name="t", value=pb.OptionValue(float_value=0.5))])),
        ("density 0", IA, lambda w: pb.MergeDictionariesRequest(
            method="dare", dictionaries=[w.copy], base=w.avg, options=[pb.Option(name="density", value=pb.OptionValue(float_value=0))])),
        ("a rescale norm that is none", IA, lambda w: pb.MergeDictionariesRequest(
            method="dare", dictionaries=[w.copy], base=w.avg, options=[
                pb.Option(name="density", value=pb.OptionValue(float_value=0.5)),
                pb.Option(name="rescale_norm", value=pb.OptionValue(string_value="l3"))])),
        ("a pattern that matches nothing", IA, lambda w: pb.MergeDictionariesRequest(
            method="slerp", dictionaries=[w.copy, w.avg], options=[pb.Option(name="t", value=pb.OptionValue(float_value=0.5))],
            tensor_options=[pb.TensorOptions(pattern="zz*", options=[pb.Option(name="t", value=pb.OptionValue(float_value=1))])])),
        ("base of other names", IA, lambda w: pb.MergeDictionariesRequest(
            method="task_arithmetic", dictionaries=[w.copy], base=w.plain)),
        ("weights and weight gradients both", IA, lambda w: pb.MergeDictionariesRequest(
            method="linear", dictionaries=[w.copy, w.avg], weights=[1, 2],
            weight_gradients=[pb.LayerValues(values=[1, 0]), pb.LayerValues(values=[2])])),
        ("an empty weight gradient", IA, lambda w: pb.MergeDictionariesRequest(
            method="linear", dictionaries=[w.copy, w.avg],
            weight_gradients=[pb.LayerValues(values=[1, 0]), pb.LayerValues()])),
        ("gradients that sum to 0 at an entry", IA, lambda w: pb.MergeDictionariesRequest(
            method="linear", dictionaries=[w.copy, w.avg],
            weight_gradients=[pb.LayerValues(values=[1, -1]), pb.LayerValues(values=[-1, 1])])),
        ("a pattern's weights of the wrong count", IA, lambda w: pb.MergeDictionariesRequest(
            method="linear", dictionaries=[w.copy, w.avg],
            tensor_options=[pb.TensorOptions(pattern="*", weights=[pb.LayerValues(values=[1])])])),
        ("densities beside the density option", IA, lambda w: pb.MergeDictionariesRequest(
            method="ties", dictionaries=[w.copy, w.avg], base=w.copy,
            options=[pb.Option(name="density", value=pb.OptionValue(float_value=0.5))],
            densities=[pb.LayerValues(values=[0.5]), pb.LayerValues(values=[0.5])])),
        ("a density gradient past 1", IA, lambda w: pb.MergeDictionariesRequest(
            method="dare", dictionaries=[w.copy, w.avg], base=w.copy,
            densities=[pb.LayerValues(values=[0.5, 1.5]), pb.LayerValues(values=[0.5])])),
        ("a pattern's densities for linear", IA, lambda w: pb.MergeDictionariesRequest(
            method="linear", dictionaries=[w.copy, w.avg],
            tensor_options=[pb.TensorOptions(pattern="*", densities=[pb.LayerValues(values=[0.5]),
                                                                     pb.LayerValues(values=[0.5])])])),
        ("model_stock of one model", IA, lambda w: pb.MergeDictionariesRequest(
            method="model_stock", dictionaries=[w.copy], base=w.avg)),
        ("model_stock with weights", IA, lambda w: pb.MergeDictionariesRequest(
            method="model_stock", dictionaries=[w.copy, w.avg], base=w.copy, weights=[1, 2])),
        ("slerp of each diagonal", IA, lambda w: pb.MergeDictionariesRequest(
            method="slerp", dictionaries=[w.copy, w.avg], options=[
                pb.Option(name="t", value=pb.OptionValue(float_value=0.5)),
                pb.Option(name="vectors", value=pb.OptionValue(string_value="diagonals"))])),
        ("karcher with a base", IA, lambda w: pb.MergeDictionariesRequest(
            method="karcher", dictionaries=[w.copy, w.avg], base=w.copy)),
        ("karcher with a negative weight", IA, lambda w: pb.MergeDictionariesRequest(
            method="karcher", dictionaries=[w.copy, w.avg], weights=[2, -1])),
        ("karcher with a negative max_iter", IA, lambda w: pb.MergeDictionariesRequest(
            method="karcher", dictionaries=[w.copy, w.avg],
            options=[pb.Option(name="max_iter", value=pb.OptionValue(int_value=-1))])),
        ("sce with weights", IA, lambda w: pb.MergeDictionariesRequest(
            method="sce", dictionaries=[w.copy, w.avg], base=w.copy, weights=[1, 2])),
        ("sce with select_topk past 1", IA, lambda w: pb.MergeDictionariesRequest(
            method="sce", dictionaries=[w.copy, w.avg], base=w.copy,
            options=[pb.Option(name="select_topk", value=pb.OptionValue(float_value=1.5))])),
        ("nearswap of two models", IA, lambda w: pb.MergeDictionariesRequest(
            method="nearswap", dictionaries=[w.copy, w.avg], base=w.copy,
            options=[pb.Option(name="t", value=pb.OptionValue(float_value=0.1))])),
        ("nearswap without t", IA, lambda w: pb.MergeDictionariesRequest(
            method="nearswap", dictionaries=[w.copy], base=w.avg)),
        ("nearswap with a negative t", IA, lambda w: pb.MergeDictionariesRequest(
            method="nearswap", dictionaries=[w.copy], base=w.avg,
            options=[pb.Option(name="t", value=pb.OptionValue(float_value=-0.1))])),
        ("ram with a negative epsilon", IA, lambda w: pb.MergeDictionariesRequest(
            method="ram", dictionaries=[w.copy, w.avg], base=w.copy,
            options=[pb.Option(name="epsilon", value=pb.OptionValue(float_value=-1e-5))])),
        ("arcee_fusion of two models", IA, lambda w: pb.MergeDictionariesRequest(
            method="arcee_fusion", dictionaries=[w.copy, w.avg], base=w.copy)),
        ("della with epsilon past its density", IA, lambda w: pb.MergeDictionariesRequest(
            method="della", dictionaries=[w.copy, w.avg], base=w.copy, options=[
                pb.Option(name="density", value=pb.OptionValue(float_value=0.2)),
                pb.Option(name="epsilon", value=pb.OptionValue(float_value=0.3))])),
        ("breadcrumbs with gamma past 1", IA, lambda w: pb.MergeDictionariesRequest(
            method="breadcrumbs", dictionaries=[w.copy, w.avg], base=w.copy, options=[
                pb.Option(name="density", value=pb.OptionValue(float_value=0.5)),
                pb.Option(name="gamma", value=pb.OptionValue(float_value=1.5))])),
        ("ties with neither density nor densities", IA, lambda w: pb.MergeDictionariesRequest(
            method="ties", dictionaries=[w.copy, w.avg], base=w.copy)),
        ("slerp with a pattern's weights", IA, lambda w: pb.MergeDictionariesRequest(
            method="slerp", dictionaries=[w.copy, w.avg], options=[pb.Option(name="t", value=pb.OptionValue(float_value=0.5))],
            tensor_options=[pb.TensorOptions(pattern="*", weights=[pb.LayerValues(values=[1]),
                                                                   pb.LayerValues(values=[2])])])),
    )],
    # ApplyOuterStep: the optimizer has no state, so a partial step would show in its momentum
    *[Case(f"outer/{k}", code, unary("ApplyOuterStep", make)) for k, code, make in (
        ("unknown optimizer", NF, lambda w: pb.ApplyOuterStepRequest(optimizer=UNKNOWN_ID, average=w.copy)),
        ("module as optimizer", IA, lambda w: pb.ApplyOuterStepRequest(optimizer=w.net, average=w.copy)),
        ("unknown average", NF, lambda w: pb.ApplyOuterStepRequest(optimizer=w.opt, average=UNKNOWN_ID)),
        ("average of shapes that do not fit", IA, lambda w: pb.ApplyOuterStepRequest(optimizer=w.opt, average=w.small)),
        ("average lacking parameters", IA, lambda w: pb.ApplyOuterStepRequest(optimizer=w.model, average=w.copy)),
        ("average that is a tensor", IA, lambda w: pb.ApplyOuterStepRequest(optimizer=w.opt, average=w.tensor)),
    )],
    # Conditional changes (etags): each request is a valid change but for its stale etag
    Case("etag/set parameter", AB, streamed("SetParameter", lambda w: [
        pb.SetParameterRequest(handle=w.net, name="a.weight", chunk=W3, etag=STALE)])),
    Case("etag/update dictionary", AB, streamed("UpdateDictionary", lambda w: [
        pb.UpdateDictionaryRequest(dictionary=w.plain, etag=STALE), pb.UpdateDictionaryRequest(chunk=GOOD)])),
    Case("etag/delete entries", AB, unary("DeleteEntries", lambda w: pb.DeleteEntriesRequest(
        dictionary=w.plain, names=["i"], etag=STALE))),
    Case("etag/load parameters", AB, unary("LoadParameters", lambda w: pb.LoadParametersRequest(
        handle=w.net, dictionary=w.copy, etag=STALE))),
    Case("etag/average parameters", AB, unary("AverageParameters", lambda w: pb.AverageParametersRequest(
        handle=w.net, dictionary=w.avg, etag=STALE))),
    Case("etag/moving average", AB, unary("UpdateMovingAverage", lambda w: pb.UpdateMovingAverageRequest(
        handle=w.net, dictionary=w.avg, decay=0.5, etag=STALE))),
    Case("etag/average into", AB, unary("AverageDictionaries", lambda w: pb.AverageDictionariesRequest(
        dictionaries=[w.copy, w.copy], into=w.avg, etag=STALE))),
    Case("etag/without into", IA, unary("AverageDictionaries", lambda w: pb.AverageDictionariesRequest(
        dictionaries=[w.copy, w.copy], etag=STALE))),
    # BuildGreedySoup
    *[Case(f"soup/{k}", code, unary("BuildGreedySoup", make)) for k, code, make in (
        ("unknown model", NF, lambda w: pb.BuildGreedySoupRequest(model=UNKNOWN_ID, ingredients=[w.copy])),
        ("module as model", IA, lambda w: pb.BuildGreedySoupRequest(model=w.net, ingredients=[w.copy])),
        ("no test data", grpc.StatusCode.FAILED_PRECONDITION, lambda w: pb.BuildGreedySoupRequest(
            model=w.model, ingredients=[w.model])),
        ("unknown ingredient", NF, lambda w: pb.BuildGreedySoupRequest(model=w.model, ingredients=[UNKNOWN_ID])),
        ("unknown metric", IA, lambda w: pb.BuildGreedySoupRequest(
            model=w.model, ingredients=[w.copy], options=[pb.Option(name="metric", value=pb.OptionValue(string_value="f1"))])),
    )],
]


def deep_spec(depth: int) -> pb.LayerSpec:
    spec = pb.LayerSpec(type="relu")
    for _ in range(depth):
        spec = pb.LayerSpec(type="sequential", children=[spec])
    return spec


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failed_call_changes_nothing(case: Case, world: World, stub, unchanged) -> None:  # type: ignore[no-untyped-def]
    with unchanged(), pytest.raises(grpc.RpcError) as err:
        case.call(stub, world)
    assert err.value.code() is case.code, err.value.details()
    stub.Ping(pb.PingRequest(), timeout=60)


def test_the_world_is_what_the_cases_assume(world: World, client: Client) -> None:
    """The fixtures the cases rely on: a momentum of None, a count of 2, a live view, a bad count."""
    assert [r.options["momentum"] for r in client.module(client_handle(world.net)) if r.module == "batchnorm1d"] == [None]
    assert client.dict(world.avg, ".n") == 2.0
    assert set(client.size(world.view)) == {"a.weight", "a.bias", "b.weight", "b.bias", "d.weight", "d.bias"}
    # The same calls with good arguments do change things, so the cases above can fail.
    client.dict(world.plain, "i", 0)
    assert client.dict(world.plain, "i") == 0
    client.batchnorm(world.net, {"b": 0.1})
    assert [r.options["momentum"] for r in client.module(client_handle(world.net)) if r.module == "batchnorm1d"] == [0.1]


def client_handle(handle_id: str):  # type: ignore[no-untyped-def]
    from weightavg import Handle

    return Handle(handle_id, "module")


def test_a_move_that_would_lose_values_is_refused_and_a_lossless_one_is_not(client: Client, unchanged) -> None:  # type: ignore[no-untyped-def]
    """Found by review: a module with a complex parameter moved to float64 kept only the real parts
    (torch's ComplexWarning went to the server's log), and an int64 tensor of 70000 and 2**40 moved
    to float16 held inf. Both are refused, changing nothing; conversions that keep every value run."""
    from weightavg import InvalidArgumentError

    m = client.module(["linear", 2, 2])
    client.parm(m, "z", np.array([1 + 2j, 3 - 4j], np.complex64))
    t = client.tensor(np.array([70000, 3, 2**40], np.int64))
    c = client.tensor(np.array([1 + 1j], np.complex64))
    for handle, dtype, match in [(m, "float64", "imaginary"), (m, "float32", "imaginary"), (c, "float32", "imaginary"),
                                 (t, "float16", "cannot hold"), (t, "float32", "cannot hold")]:
        with unchanged(), pytest.raises(InvalidArgumentError, match=match):
            client.to(handle, dtype=dtype)
    client.to(m, dtype="complex128")
    np.testing.assert_array_equal(client.parm(m, "z"), np.array([1 + 2j, 3 - 4j]))
    assert client.parm(m, "weight").dtype == np.complex128
    client.to(t, dtype="float64")  # 2**40 fits float64's 53 bits
    np.testing.assert_array_equal(client.tensor(t), np.array([70000, 3, 2**40], np.float64))
    small = client.tensor(np.array([-2048, 2048], np.int16))
    client.to(small, dtype="float16")
    np.testing.assert_array_equal(client.tensor(small), np.array([-2048, 2048], np.float16))


def test_free_with_handles_and_all_is_refused_rather_than_freeing_the_whole_session(live_server: LiveServer, unchanged) -> None:  # type: ignore[no-untyped-def]
    """Found by review: FreeHandles(handles=[one], all=True) ignored the handles and freed every
    handle of the caller's session. The generated stub lets a client set both; now nothing is freed."""
    with Client(live_server.address, timeout=60, session=True) as s:
        keep, named = s.dict({"x": np.ones(3)}), s.tensor(np.ones(2, np.float32))
        with unchanged(), pytest.raises(grpc.RpcError) as err:
            s._stub.FreeHandles(pb.FreeHandlesRequest(handles=[named.id], all=True), timeout=60)
        assert err.value.code() is IA and "nothing freed" in (err.value.details() or "")
        assert {i.handle.id for i in s.handles()} == {keep.id, named.id}
        assert s.free(named) == 1 and s.free() == 1
