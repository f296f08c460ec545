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

VALUE_FIELDS = "null_value, bool_value, int_value, float_value, string_value, int_list"
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
