"""Requests that only a client generated from the .proto sends (the Python client never builds them),
against a real server through the generated stubs: each gets a status whose message names what is
wrong and what to set, in the contract's terms, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from conftest import LiveServer
from weightavg import Client
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

VALUE_FIELDS = "null_value, bool_value, int_value, float_value, string_value, int_list, float_list"
"""OptionValue's one-of, which a refusal of an empty OptionValue lists."""


def _linear(*options: pb.Option, args: tuple[pb.OptionValue, ...] = ()) -> pb.LayerSpec:
    return pb.LayerSpec(
        type="linear", args=list(args or (pb.OptionValue(int_value=2), pb.OptionValue(int_value=1))), options=list(options)
    )


EMPTY_OPTION_VALUES: dict[str, tuple[Callable[[pb_grpc.WeightAveragingServiceStub, str], object], str]] = {
    # What Go's &pb.Option{Name: "bias"} or JSON's {"name": "bias"} sends: the value forgotten.
    "layer keyword": (
        lambda stub, _: stub.CreateModule(pb.CreateModuleRequest(spec=_linear(pb.Option(name="bias"))), timeout=30),
        "linear: option 'bias' has no value",
    ),
    "layer position": (
        lambda stub, _: stub.CreateModule(
            pb.CreateModuleRequest(spec=_linear(args=(pb.OptionValue(int_value=2), pb.OptionValue()))), timeout=30
        ),
        "linear: args[1] has no value",
    ),
    "loss keyword": (
        lambda stub, _: stub.CreateLoss(pb.CreateLossRequest(type="ce", options=[pb.Option(name="reduction")]), timeout=30),
        "option 'reduction' has no value",
    ),
    "optimizer position": (
        lambda stub, m: stub.CreateOptimizer(
            pb.CreateOptimizerRequest(module=m, type="sgd", args=[pb.OptionValue()]), timeout=30
        ),
        "args[0] has no value",
    ),
    "merge pattern": (
        lambda stub, m: stub.MergeDictionaries(
            pb.MergeDictionariesRequest(
                method="linear", dictionaries=[m], tensor_options=[pb.TensorOptions(pattern="*", options=[pb.Option(name="t")])]
            ),
            timeout=30,
        ),
        "tensor_options[0] option 't' has no value",
    ),
}


@pytest.mark.parametrize("case", sorted(EMPTY_OPTION_VALUES))
def test_an_option_value_with_nothing_set_is_named_with_the_fields_to_set(
    case: str, live_server: LiveServer, client: Client, unchanged  # type: ignore[no-untyped-def]
) -> None:
    """An OptionValue that sets none of its one-of (a default-built message) was refused as 'option
    value has no value set': no option named, nothing said of what to set."""
    call, where = EMPTY_OPTION_VALUES[case]
    module = client.module(["linear", 2, 1]).id
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(live_server.address))
    with unchanged(), pytest.raises(grpc.RpcError) as err:
        call(stub, module)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == f"{where}: set one of OptionValue's fields ({VALUE_FIELDS})"


WIRE_FIXES: dict[str, tuple[Callable[[pb_grpc.WeightAveragingServiceStub, str, str], object], grpc.StatusCode, tuple[str, ...]]] = {
    # A request that names a module where its parameters are wanted: FetchTensors without names.
    "fetch a whole module": (
        lambda stub, m, d: list(stub.FetchTensors(pb.FetchTensorsRequest(handle=m), timeout=30)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("FetchTensorsRequest.names", "ViewParameters, ViewBuffers or CopyParameters (with buffers)"),
    ),
    "free all without a session": (
        lambda stub, m, d: stub.FreeHandles(pb.FreeHandlesRequest(all=True), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("FreeHandlesRequest.all", "FreeHandlesRequest.handles", "CreateSession's id in 'weightavg-session' metadata"),
    ),
    "average into a module": (
        lambda stub, m, d: stub.AverageParameters(pb.AverageParametersRequest(handle=d, dictionary=m), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("copyparms(m) (CopyParameters)", "the module in handle and the dictionary in dictionary"),
    ),
    "train a module": (
        lambda stub, m, d: list(stub.RunEpoch(pb.RunEpochRequest(model=m), timeout=30)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("(CreateModel)",),
    ),
    "learning rate of a module": (
        lambda stub, m, d: stub.GetLearningRate(pb.GetLearningRateRequest(handle=m), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("(CreateOptimizer; CreateModel)",),
    ),
    "shared memory on a server without it": (
        lambda stub, m, d: stub.RegisterSharedMemory(
            pb.RegisterSharedMemoryRequest(name="r", key="k", byte_size=64), timeout=30
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("move tensors through the streams (FetchTensors, and uploads whose TensorChunk carries data, not shared",),
    ),
}


@pytest.mark.parametrize("case", sorted(WIRE_FIXES))
def test_a_mistake_whose_fix_is_a_client_verb_also_names_the_fix_on_the_wire(
    case: str, live_server: LiveServer, client: Client, unchanged  # type: ignore[no-untyped-def]
) -> None:
    """The messages named only the Python client's way out ("Name the handles (free(h1, h2)), use a
    session (Client(address, session=True))", "fetch them all through a view: dict(parms(m))"),
    which a client generated from the .proto cannot follow: each now names the fields or RPCs too."""
    call, code, fixes = WIRE_FIXES[case]
    module = client.module(["linear", 2, 1]).id
    dictionary = client.copyparms(module).id
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(live_server.address))
    with unchanged(), pytest.raises(grpc.RpcError) as err:
        call(stub, module, dictionary)
    assert err.value.code() is code, err.value.details()
    for fix in fixes:
        assert fix in err.value.details(), err.value.details()


def test_a_shared_memory_region_without_a_session_names_the_session_metadata(start_server) -> None:  # type: ignore[no-untyped-def]
    """Regions belong to a session; the refusal said "Client(..., session=True)" only."""
    server = start_server(allow_shm=True)
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(name="r", key="k", byte_size=64), timeout=30)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert "call with a session (CreateSession's id in 'weightavg-session' metadata; the Python client: " in (
        err.value.details()
    )


def test_model_data_missing_names_set_model_data_and_its_split(
    live_server: LiveServer, client: Client, unchanged  # type: ignore[no-untyped-def]
) -> None:
    """"load it with train(m, x, y)" is the Python client's verb; SetModelData and the split do it on the wire."""
    q = client.module(["linear", 2, 1])
    model = client.model(q, client.loss("mse"), client.opt("sgd", q, 0.1)).id
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(live_server.address))
    for call, split in (
        (lambda: list(stub.RunEpoch(pb.RunEpochRequest(model=model), timeout=30)), "TRAIN"),
        (lambda: list(stub.RunTest(pb.RunTestRequest(model=model), timeout=30)), "TEST"),
        # A forward without an input said only "no input given and the model has no training data".
        (lambda: stub.RunForward(iter([pb.RunForwardRequest(handle=model, mode=pb.FORWARD_MODE_TRAIN)]), timeout=30),
         "TRAIN"),
        (lambda: stub.RunForward(iter([pb.RunForwardRequest(handle=model, mode=pb.FORWARD_MODE_EVAL)]), timeout=30),
         "TEST"),
    ):
        with unchanged(), pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert f"(SetModelData, split DATA_SPLIT_{split})" in err.value.details(), err.value.details()


def test_a_refused_dtype_is_named_as_the_wire_names_it_not_as_torch_prints_it(
    live_server: LiveServer, client: Client, unchanged  # type: ignore[no-untyped-def]
) -> None:
    """CopyParameters with DTYPE_INT64 answered "... not torch.int64", and a complex move of a model with
    data "... not torch.complex64": torch's spelling, which no client sends."""
    q = client.module(["linear", 2, 1])
    model = client.model(q, client.loss("mse"), client.opt("sgd", q, 0.1))
    client.train(model, [[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0]])
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(live_server.address))
    for call, name in (
        (lambda: stub.CopyParameters(pb.CopyParametersRequest(handle=model.id, dtype=pb.DTYPE_INT64), timeout=30), "int64"),
        (lambda: stub.MoveHandle(pb.MoveHandleRequest(handle=model.id, dtype=pb.DTYPE_COMPLEX64), timeout=30), "complex64"),
    ):
        with unchanged(), pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().endswith(f", not {name}") and "torch." not in err.value.details()


def test_a_name_in_another_unicode_form_is_told_apart_from_the_one_held(
    live_server: LiveServer, client: Client, unchanged  # type: ignore[no-untyped-def]
) -> None:
    """A dictionary holding 'maské' spelled e + combining acute (NFD, as macOS file names and some
    platforms' strings have it), asked for with a precomposed é (NFC): the refusal said "dictionary
    has no entry 'maské'; did you mean 'maské'?", two names that print alike. It now spells both out."""
    held, given = "maske\u0301", "mask\u00e9"
    d = client.dict({held: [1.0], "other": [2.0]})
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(live_server.address))
    with unchanged(), pytest.raises(grpc.RpcError) as err:
        list(stub.FetchTensors(pb.FetchTensorsRequest(handle=d.id, names=[given]), timeout=30))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND, err.value.details()
    assert err.value.details() == (
        f"dictionary has no entry '{given}'; did you mean '{held}'? It is the name given in another Unicode "
        "normalization form ('mask\\u00e9' given, 'maske\\u0301' held): names match code point for code point, "
        "never normalized"
    )


def test_a_tensor_sent_more_bytes_than_its_shape_names_its_wire_dtype(
    live_server: LiveServer, unchanged  # type: ignore[no-untyped-def]
) -> None:
    """Bytes past a tensor's size were refused naming "dtype torch.bfloat16", torch's spelling, to a
    client that had sent DTYPE_BFLOAT16."""
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(live_server.address))
    header = pb.TensorChunk(name="x", dtype=pb.DTYPE_BFLOAT16, shape=[2], data=bytes(2))
    requests = [pb.CreateDictionaryRequest(chunk=header), pb.CreateDictionaryRequest(chunk=pb.TensorChunk(data=bytes(4)))]
    with unchanged(), pytest.raises(grpc.RpcError) as err:
        stub.CreateDictionary(iter(requests), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == "tensor 'x' of shape [2] and dtype DTYPE_BFLOAT16 holds 4 bytes; received at least 6"
