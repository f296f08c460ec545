"""Property-based fuzzing of every RPC through the generated stub: random and malformed requests
(wrong kinds of handles, garbage bytes, shapes that disagree with the data, huge dimensions,
NaN/Inf, unknown enum values, deep specs, enormous option values). The server must never answer
UNKNOWN or INTERNAL (or hang: every call has a deadline), and must answer a Ping after each one.

Runs against its own server with a 256 MiB byte cap, so nothing a fuzzer invents can allocate much.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LiveServer
from weightavg import Client, wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain import tensors as handles
from weightavg_server.ops.app import create_server, set_serving
from weightavg_server.ops.config import ServerConfig
from weightavg_server.store.registry import Registry
from weightavg_server.domain.specs import LAYER_TYPES

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS,  # a chunk's crc32c that does not match its tensor
}
FUZZ = settings(
    # 100 keeps the module near 10 s, the same 100 on every run (conftest's hypothesis profile); for a
    # deeper search by hand, fresh examples: WEIGHTAVG_HYPOTHESIS=explore WEIGHTAVG_FUZZ_EXAMPLES=1500.
    max_examples=int(os.environ.get("WEIGHTAVG_FUZZ_EXAMPLES", "100")), deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIMEOUT = 30
SERVICE = pb.DESCRIPTOR.services_by_name["WeightAveragingService"]


@dataclass
class Fuzzed:
    server: LiveServer
    client: Client
    stub: pb_grpc.WeightAveragingServiceStub
    channel: grpc.Channel


ROLES = ("net", "ref", "copy", "avg", "view", "bufs", "plain", "tensor", "opt", "model")


class Pool:
    """Live handles of every kind; ones the fuzzer freed are made again before the next example."""

    def __init__(self, f: Fuzzed) -> None:
        self.f = f
        self.ids: dict[str, str] = {}

    def refresh(self) -> None:
        live = {h for h, _ in self.f.server.registry.items()}
        if all(i in live for i in self.ids.values()) and self.ids:
            return
        c = self.f.client
        c.purge()
        net = c.module(["sequential", ["linear", "a", 3, 2], ["batchnorm1d", "b", 2], ["relu", "c"]])
        avg = c.copyparms(net)
        c.avgparms(net, avg)
        self.ids = {
            "net": net.id, "ref": c.addref(net).id, "copy": c.copyparms(net).id, "avg": avg.id,
            "view": c.parms(net).id, "bufs": c.buffers(net).id,
            "plain": c.dict({"x": np.ones(3, np.float32), "i": np.arange(2), ".n": 1.0}).id,
            "tensor": c.tensor(np.zeros((2, 2), np.float32)).id,
            "opt": c.opt("sgd", net, 0.1, 0.9).id, "model": self.model(),
        }

    def model(self) -> str:
        """A model over a module like net's, with test data, so soups and outer steps run for real."""
        c = self.f.client
        q = c.module(["sequential", ["linear", "a", 3, 2], ["batchnorm1d", "b", 2], ["relu", "c"]])
        m = c.model(q, c.loss("ce"), c.opt("adam", q))
        c.test(m, np.ones((4, 3), np.float32), np.array([0, 1, 1, 0]))
        return m.id

    def resolve(self, ref: object) -> str:
        return self.ids[ref.role] if isinstance(ref, Role) else str(ref)


@dataclass(frozen=True)
class Role:
    role: str


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    registry = Registry()
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", max_device_bytes=256 << 20, max_handles=10_000)
    server, port, health_servicer = create_server(config, registry=registry)
    server.start()
    set_serving(health_servicer, True)
    address = f"127.0.0.1:{port}"
    with Client(address, timeout=TIMEOUT) as client, grpc.insecure_channel(address) as channel:
        yield Fuzzed(LiveServer(address, registry), client, pb_grpc.WeightAveragingServiceStub(channel), channel)
    server.stop(grace=None)


@pytest.fixture(scope="module")
def pool(fuzzed: Fuzzed) -> Pool:
    return Pool(fuzzed)


def check(f: Fuzzed, call) -> None:  # type: ignore[no-untyped-def]
    """Run one fuzzed call: any status but UNKNOWN/INTERNAL/timeouts, then the server must answer."""
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, f"{exc.code()}: {exc.details()}"
    f.stub.Ping(pb.PingRequest(), timeout=TIMEOUT)


# -- strategies -------------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
handle_refs = st.one_of(
    st.sampled_from(ROLES).map(Role), st.just(""), st.just("dic_" + "0" * 32), st.text(max_size=40)
)
names = st.one_of(
    st.sampled_from(["", "a.weight", "a.bias", "b.weight", "b.running_mean", "x", "i", ".n", "c", "b", "a", "zz"]),
    st.text(max_size=20),
)
dtypes = st.one_of(st.sampled_from(list(pb.Dtype.values())), st.integers(-(2**31), 2**31 - 1))
dims = st.one_of(st.integers(0, 4), st.integers(-3, 2**62), st.sampled_from([2**31, 2**40, 2**63 - 1]))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def consistent_chunk(draw: st.DrawFn) -> pb.TensorChunk:
    """A well-formed tensor (possibly with NaN/Inf), so fuzzing also reaches past the wire checks;
    sometimes declared as a stream of one tensor with its right CRC32C (or a wrong one)."""
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    values = draw(st.lists(floats, min_size=math.prod(shape), max_size=math.prod(shape)))
    name, data = draw(names), np.array(values, np.float32).tobytes()
    chunk = pb.TensorChunk(name=name, dtype=pb.DTYPE_FLOAT32, shape=shape, data=data)
    if draw(st.booleans()):
        chunk.tensor_count, chunk.total_bytes = 1, len(data)
        crc = wire.crc32c(data, wire.tensor_crc(name, pb.DTYPE_FLOAT32, shape))
        chunk.crc32c = crc if draw(st.booleans()) else crc ^ (1 << draw(st.integers(0, 31)))
    return chunk


optional_int64 = st.one_of(st.none(), st.integers(-3, 5), INT64)
raw_chunks = st.builds(
    pb.TensorChunk, name=names, dtype=dtypes, shape=st.lists(dims, max_size=40), data=st.binary(max_size=64),
    # The stream declaration and checksum fields: absent, small, huge, negative, on any chunk.
    tensor_count=optional_int64, total_bytes=optional_int64,
    crc32c=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
chunks = st.one_of(consistent_chunk(), raw_chunks, st.builds(pb.TensorChunk, data=st.binary(max_size=16)))
chunk_lists = st.lists(chunks, max_size=4)

option_values = st.one_of(
    st.builds(pb.OptionValue, null_value=st.just(0)),
    st.builds(pb.OptionValue, bool_value=st.booleans()),
    st.builds(pb.OptionValue, int_value=st.one_of(st.integers(-3, 100), INT64)),
    st.builds(pb.OptionValue, float_value=st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(pb.OptionValue, string_value=st.text(max_size=12)),
    st.builds(pb.OptionValue, int_list=st.builds(pb.IntList, values=st.lists(st.one_of(st.integers(-2, 9), INT64), max_size=5))),
    st.just(pb.OptionValue()),  # no value set
)
option_names = st.one_of(
    st.sampled_from(["in", "out", "bias", "momentum", "eps", "size", "stride", "groups", "p", "affine", "track"]),
    st.text(max_size=8),
)
layer_types = st.one_of(st.sampled_from(list(LAYER_TYPES)), st.text(max_size=12))


def spec_of(children: st.SearchStrategy[list[pb.LayerSpec]]) -> st.SearchStrategy[pb.LayerSpec]:
    return st.builds(
        pb.LayerSpec, type=layer_types, name=st.one_of(st.just(""), st.text(max_size=6)),
        args=st.lists(option_values, max_size=4),
        options=st.lists(st.builds(pb.Option, name=option_names, value=option_values), max_size=3),
        children=children,
    )


specs = st.recursive(spec_of(st.just([])), lambda inner: spec_of(st.lists(inner, max_size=3)), max_leaves=8)
deep_specs = st.integers(0, 95).map(lambda depth: nested(depth))
momenta = st.dictionaries(
    names, st.one_of(st.just(pb.Momentum()), st.builds(pb.Momentum, value=st.floats(allow_nan=True, allow_infinity=True))),
    max_size=3,
)
devices = st.one_of(
    st.sampled_from(["", "cpu", "cuda", "cuda:0", "cpu:0", "cpu:7", "cpu:-1", "meta", "mps", "xla", "cuda:99999999999"]),
    st.text(max_size=12),
)


def nested(depth: int) -> pb.LayerSpec:
    spec = pb.LayerSpec(type="linear", args=[pb.OptionValue(int_value=1)] * 2)
    for _ in range(depth):
        spec = pb.LayerSpec(type="sequential", children=[spec])
    return spec


# -- one property per RPC ---------------------------------------------------------------------------


@FUZZ
@given(spec=st.one_of(specs, deep_specs))
def test_create_module(fuzzed: Fuzzed, pool: Pool, spec: pb.LayerSpec) -> None:
    check(fuzzed, lambda: fuzzed.stub.CreateModule(pb.CreateModuleRequest(spec=spec), timeout=TIMEOUT))


@FUZZ
@given(method=st.sampled_from(["DescribeModule", "ListParameterNames", "ListBufferNames", "ViewParameters",
                               "ViewBuffers", "CopyParameters", "ResetBatchNorm", "GetSize", "AddReference"]),
       handle=handle_refs, child=names)
def test_unary_calls_on_one_handle(fuzzed: Fuzzed, pool: Pool, method: str, handle: object, child: str) -> None:
    pool.refresh()
    request_class = getattr(pb, method + "Request")
    fields = request_class.DESCRIPTOR.fields_by_name
    request = request_class(handle=pool.resolve(handle), **({"child": child} if "child" in fields else {}))
    check(fuzzed, lambda: getattr(fuzzed.stub, method)(request, timeout=TIMEOUT))


@FUZZ
@given(method=st.sampled_from(["LoadParameters", "AverageParameters"]), handle=handle_refs, dictionary=handle_refs)
def test_two_handle_calls(fuzzed: Fuzzed, pool: Pool, method: str, handle: object, dictionary: object) -> None:
    pool.refresh()
    request = getattr(pb, method + "Request")(handle=pool.resolve(handle), dictionary=pool.resolve(dictionary))
    check(fuzzed, lambda: getattr(fuzzed.stub, method)(request, timeout=TIMEOUT))


@FUZZ
@given(handle=handle_refs, values=momenta)
def test_restore_momentum(fuzzed: Fuzzed, pool: Pool, handle: object, values: dict[str, pb.Momentum]) -> None:
    pool.refresh()
    request = pb.RestoreMomentumRequest(handle=pool.resolve(handle), momenta=values)
    check(fuzzed, lambda: fuzzed.stub.RestoreMomentum(request, timeout=TIMEOUT))


@FUZZ
@given(handle=handle_refs, name=names, stream=chunk_lists)
def test_set_parameter(fuzzed: Fuzzed, pool: Pool, handle: object, name: str, stream: list[pb.TensorChunk]) -> None:
    pool.refresh()
    first = pb.SetParameterRequest(handle=pool.resolve(handle), name=name, chunk=stream[0] if stream else None)
    requests = [first, *(pb.SetParameterRequest(chunk=c) for c in stream[1:])]
    check(fuzzed, lambda: fuzzed.stub.SetParameter(iter(requests), timeout=TIMEOUT))


@FUZZ
@given(stream=chunk_lists)
def test_create_dictionary_and_tensor(fuzzed: Fuzzed, pool: Pool, stream: list[pb.TensorChunk]) -> None:
    check(fuzzed, lambda: fuzzed.stub.CreateDictionary(
        iter([pb.CreateDictionaryRequest(chunk=c) for c in stream]), timeout=TIMEOUT))
    check(fuzzed, lambda: fuzzed.stub.CreateTensor(
        iter([pb.CreateTensorRequest(chunk=c) for c in stream]), timeout=TIMEOUT))


@FUZZ
@given(handle=handle_refs, stream=chunk_lists, first_chunk=st.booleans())
def test_update_dictionary(fuzzed: Fuzzed, pool: Pool, handle: object, stream: list[pb.TensorChunk],
                           first_chunk: bool) -> None:
    pool.refresh()
    first = pb.UpdateDictionaryRequest(dictionary=pool.resolve(handle), chunk=stream[0] if stream and first_chunk else None)
    rest = stream[1:] if first_chunk else stream
    requests = [first, *(pb.UpdateDictionaryRequest(chunk=c) for c in rest)]
    check(fuzzed, lambda: fuzzed.stub.UpdateDictionary(iter(requests), timeout=TIMEOUT))


splits = st.one_of(st.sampled_from(list(pb.DataSplit.values())), st.integers(-(2**31), 2**31 - 1))
modes = st.one_of(st.sampled_from(list(pb.ForwardMode.values())), st.integers(-(2**31), 2**31 - 1))


@FUZZ
@given(model=handle_refs, split=splits, mode=modes, input_=st.one_of(st.just(""), handle_refs), stream=chunk_lists,
       shard=st.booleans(), rank=st.one_of(st.none(), st.integers(-2, 2)), again=st.booleans())
def test_model_streams(fuzzed: Fuzzed, pool: Pool, model: object, split: int, mode: int, input_: object,
                       stream: list[pb.TensorChunk], shard: bool, rank: int | None, again: bool) -> None:
    """SetModelData, RunForward and EvaluateModel with any header, any chunks, and (`again`) the header
    fields set again on the second message, as a generated client may."""
    pool.refresh()
    m = pool.resolve(model)
    data = [pb.SetModelDataRequest(model=m, split=split, shard=shard, rank=rank, chunk=stream[0] if stream else None),
            *(pb.SetModelDataRequest(chunk=c, split=split if again else 0) for c in stream[1:])]
    check(fuzzed, lambda: fuzzed.stub.SetModelData(iter(data), timeout=TIMEOUT))
    forward = [pb.RunForwardRequest(handle=m, mode=mode, input=pool.resolve(input_), chunk=stream[0] if stream else None),
               *(pb.RunForwardRequest(chunk=c, handle=m if again else "") for c in stream[1:])]
    check(fuzzed, lambda: fuzzed.stub.RunForward(iter(forward), timeout=TIMEOUT))
    evaluate = [pb.EvaluateModelRequest(model=m, chunk=stream[0] if stream else None),
                *(pb.EvaluateModelRequest(chunk=c, model=m if again else "") for c in stream[1:])]
    check(fuzzed, lambda: fuzzed.stub.EvaluateModel(iter(evaluate), timeout=TIMEOUT))


@FUZZ
@given(handle=handle_refs, keys=st.lists(names, max_size=4))
def test_delete_and_fetch(fuzzed: Fuzzed, pool: Pool, handle: object, keys: list[str]) -> None:
    pool.refresh()
    h = pool.resolve(handle)
    check(fuzzed, lambda: fuzzed.stub.FetchTensors(pb.FetchTensorsRequest(handle=h, names=keys), timeout=TIMEOUT))
    check(fuzzed, lambda: fuzzed.stub.DeleteEntries(pb.DeleteEntriesRequest(dictionary=h, names=keys), timeout=TIMEOUT))


@FUZZ
@given(handle=handle_refs, device=devices, dtype=dtypes)
def test_move_handle(fuzzed: Fuzzed, pool: Pool, handle: object, device: str, dtype: int) -> None:
    pool.refresh()
    request = pb.MoveHandleRequest(handle=pool.resolve(handle), device=device, dtype=dtype)
    check(fuzzed, lambda: fuzzed.stub.MoveHandle(request, timeout=TIMEOUT))


@FUZZ
@given(
    refs=st.lists(handle_refs, max_size=4), everything=st.booleans(), all_tenants=st.booleans(),
    tenant=st.one_of(st.just(""), st.just("default"), st.text(max_size=10)),
)
def test_free_and_list_handles(
    fuzzed: Fuzzed, pool: Pool, refs: list[object], everything: bool, all_tenants: bool, tenant: str
) -> None:
    pool.refresh()
    request = pb.FreeHandlesRequest(
        handles=[pool.resolve(r) for r in refs], all=everything and len(refs) == 1, tenant=tenant if len(refs) == 0 else ""
    )
    check(fuzzed, lambda: fuzzed.stub.FreeHandles(request, timeout=TIMEOUT))
    check(fuzzed, lambda: fuzzed.stub.ListHandles(pb.ListHandlesRequest(all_tenants=all_tenants), timeout=TIMEOUT))


# -- averaging across models --------------------------------------------------------------------------

weight_lists = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 9).map(float)), max_size=5)
merge_options = st.lists(st.builds(pb.Option, name=st.one_of(st.sampled_from([
    "t", "threshold", "density", "lam", "normalize", "seed", "rescale", "consensus", "integers", "metric",
]), st.text(max_size=8)), value=option_values), max_size=4)
layer_values = st.builds(pb.LayerValues, values=weight_lists)
patterns = st.one_of(st.sampled_from(["*", "a.*", "*.bias", "x", "", "[", "b.running_mean", "a.weight"]), st.text(max_size=8))
optional_refs = st.one_of(st.just(""), handle_refs)


@FUZZ
@given(refs=st.lists(handle_refs, max_size=4), weights=weight_lists, into=optional_refs, options=merge_options)
def test_average_dictionaries(fuzzed: Fuzzed, pool: Pool, refs: list[object], weights: list[float], into: object,
                              options: list[pb.Option]) -> None:
    pool.refresh()
    request = pb.AverageDictionariesRequest(
        dictionaries=[pool.resolve(r) for r in refs], weights=weights, into=pool.resolve(into), options=options
    )
    check(fuzzed, lambda: fuzzed.stub.AverageDictionaries(request, timeout=TIMEOUT))


@FUZZ
@given(method=st.one_of(st.sampled_from(["linear", "slerp", "task_arithmetic", "ties", "dare", "della", "breadcrumbs", "multislerp", "model_stock", "karcher", "sce", "nearswap", "ram", "arcee_fusion", "average"]), st.text(max_size=10)),
       refs=st.lists(handle_refs, max_size=4), base=optional_refs, weights=weight_lists, options=merge_options,
       per_tensor=st.lists(st.builds(pb.TensorOptions, pattern=patterns, options=merge_options,
                                     weights=st.lists(layer_values, max_size=3),
                                     densities=st.lists(layer_values, max_size=3)), max_size=2),
       gradients=st.lists(layer_values, max_size=3), densities=st.lists(layer_values, max_size=3))
def test_merge_dictionaries(fuzzed: Fuzzed, pool: Pool, method: str, refs: list[object], base: object,
                            weights: list[float], options: list[pb.Option], per_tensor: list[pb.TensorOptions],
                            gradients: list[pb.LayerValues], densities: list[pb.LayerValues]) -> None:
    pool.refresh()
    request = pb.MergeDictionariesRequest(
        method=method, dictionaries=[pool.resolve(r) for r in refs], base=pool.resolve(base), weights=weights,
        options=options, tensor_options=per_tensor, weight_gradients=gradients, densities=densities,
    )
    check(fuzzed, lambda: fuzzed.stub.MergeDictionaries(request, timeout=TIMEOUT))


@FUZZ
@given(optimizer=handle_refs, average=handle_refs)
def test_apply_outer_step(fuzzed: Fuzzed, pool: Pool, optimizer: object, average: object) -> None:
    pool.refresh()
    request = pb.ApplyOuterStepRequest(optimizer=pool.resolve(optimizer), average=pool.resolve(average))
    check(fuzzed, lambda: fuzzed.stub.ApplyOuterStep(request, timeout=TIMEOUT))


@FUZZ
@given(model=handle_refs, ingredients=st.lists(handle_refs, max_size=3), options=merge_options)
def test_build_greedy_soup(fuzzed: Fuzzed, pool: Pool, model: object, ingredients: list[object],
                           options: list[pb.Option]) -> None:
    pool.refresh()
    request = pb.BuildGreedySoupRequest(
        model=pool.resolve(model), ingredients=[pool.resolve(r) for r in ingredients], options=options
    )
    check(fuzzed, lambda: fuzzed.stub.BuildGreedySoup(request, timeout=TIMEOUT))


enum_values = st.one_of(st.integers(-1, 4), st.integers(-(2**31), 2**31 - 1))


@FUZZ
@given(handle=handle_refs, op=enum_values, weights=weight_lists, rank=st.integers(-(2**31), 2**31 - 1),
       group_size=st.one_of(st.integers(-2, 3), st.integers(-(2**31), 2**31 - 1)))
def test_allreduce_and_broadcast(fuzzed: Fuzzed, pool: Pool, handle: object, op: int, weights: list[float],
                                 rank: int, group_size: int) -> None:
    pool.refresh()
    h = pool.resolve(handle)
    request = pb.AllReduceRequest(handle=h, op=op, weights=weights, group_size=group_size)
    check(fuzzed, lambda: fuzzed.stub.AllReduce(request, timeout=TIMEOUT))
    check(fuzzed, lambda: fuzzed.stub.Broadcast(pb.BroadcastRequest(handle=h, rank=rank), timeout=TIMEOUT))


@pytest.mark.parametrize("request_", [
    pb.AllReduceRequest(op=7),  # an op the contract does not define: was INTERNAL
    pb.AllReduceRequest(weights=[float("nan")]),  # was OK here, and NaN on every rank of a cluster
    pb.AllReduceRequest(weights=[float("inf")]),
    pb.AllReduceRequest(group_size=2),  # a one-rank server has no group of two
    pb.AllReduceRequest(group_size=-1),
], ids=["unknown-op", "nan-weight", "inf-weight", "group-of-two-on-one-rank", "negative-group"])
def test_allreduce_refuses_what_the_contract_does_not_define(
    fuzzed: Fuzzed, pool: Pool, request_: pb.AllReduceRequest
) -> None:
    pool.refresh()
    request = pb.AllReduceRequest(handle=pool.ids["net"])
    request.MergeFrom(request_)
    with pytest.raises(grpc.RpcError) as err:
        fuzzed.stub.AllReduce(request, timeout=TIMEOUT)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert any(fix in err.value.details() for fix in ("REDUCE_OP_MEAN", "finite", "0 for one group of every rank"))


@FUZZ
@given(method=st.sampled_from([m.name for m in SERVICE.methods]), data=st.binary(max_size=200))
def test_garbage_bytes_to_every_rpc(fuzzed: Fuzzed, method: str, data: bytes) -> None:
    """Raw bytes that may not parse at all: INVALID_ARGUMENT (or whatever they decode to), never INTERNAL."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    if descriptor.client_streaming:
        call = fuzzed.channel.stream_unary(path)
        check(fuzzed, lambda: call(iter([data, data]), timeout=TIMEOUT))
    elif descriptor.server_streaming:
        call = fuzzed.channel.unary_stream(path)
        check(fuzzed, lambda: call(data, timeout=TIMEOUT))
    else:
        check(fuzzed, lambda: fuzzed.channel.unary_unary(path)(data, timeout=TIMEOUT))


def raw_deep_spec(depth: int) -> bytes:
    """CreateModuleRequest bytes nested far deeper than the protobuf library lets a message be built."""

    def field(number: int, payload: bytes) -> bytes:
        length, n = b"", len(payload)
        while True:
            byte, n = n & 0x7F, n >> 7
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                return bytes([number << 3 | 2]) + length + payload

    spec = field(1, b"relu")
    for _ in range(depth):
        spec = field(1, b"sequential") + field(5, spec)
    return field(1, spec)


@pytest.mark.parametrize("depth", [33, 99, 100, 101, 200, 5000])
def test_deep_specs_are_invalid_argument(fuzzed: Fuzzed, depth: int) -> None:
    call = fuzzed.channel.unary_unary(f"/{SERVICE.full_name}/CreateModule")
    with pytest.raises(grpc.RpcError) as err:
        call(raw_deep_spec(depth), timeout=TIMEOUT)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    fuzzed.stub.Ping(pb.PingRequest(), timeout=TIMEOUT)


def test_accounting_is_exact_after_fuzzing(fuzzed: Fuzzed, pool: Pool) -> None:
    """Whatever the fuzzers did, the bytes charged equal what the live objects hold, and a final
    free of everything returns the count to zero."""
    registry = fuzzed.server.registry
    held = set().union(*(handles.storages(handles.tensors_of(e.obj)) for _, e in registry.items()))
    expected = handles.storage_bytes(held)
    assert registry.held_bytes() == {d: n for d, n in expected.items() if n}
    fuzzed.client.purge()
    assert registry.held_bytes() == {} and len(registry) == 0
    fuzzed.client.ping()
