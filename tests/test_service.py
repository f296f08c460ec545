"""The service in process: the reference workflow, kinds, all-or-nothing failures, caps as an upload
sees them, concurrency and device usage.

No gRPC here: uploads are plain functions that announce each tensor's header through `on_header`
before allocating it, as the transport does, and record what they did. The gRPC versions of the
cap checks are in test_caps.py; these look at what only an in-process caller can see.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from inprocess import (
    RecordingUpload, assert_nothing_pending, assert_same_state, caller_session, f32, fits, names, no_upload, state_of,
    upload, walked_bytes,
)
from weightavg_server.domain.averaging import BufferMode
from weightavg_server.domain.ema import EmaSchedule, EmaState, ScheduleChange
from weightavg_server.domain.errors import (
    FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
)
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Ref, Service, Settings
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Kind, Registry
from weightavg_server.store.tenants import CALLER, DEFAULT_TENANT, Caller, Role

F32, I64 = 4, 8
ROWS, FEATURES, CLASSES = 30, 20, 5
LAYER = (FEATURES * CLASSES + CLASSES) * F32
BATCH_PASS = 5 * ROWS * CLASSES * F32 + 2 * F32 - LAYER
"""One training batch (all ROWS rows) through the linear and ce at its widest, as tests/test_caps.py's
`batch_pass` works it out: logits, log_softmax and both gradients, loss and total weight, one more logits
of margin, less the gradients reserved on their own. A pass without gradients holds its output again."""
"""Bytes of a 20 -> 5 linear layer's float32 weight and bias."""
BIG = 10**9
"""A byte cap far above anything here, so that leftover reservations can be measured against it."""


def settings(device: str = "cpu") -> Settings:
    # The defaults of ops/config.py: spec depth 32, leases of 60 s by default and 24 h at most.
    return Settings(
        device=torch.device(device), max_spec_depth=32, session_lease_seconds=60.0, max_session_lease_seconds=86400.0
    )


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service(Registry(Limits(max_device_bytes=BIG)), settings())
    yield s
    assert s.store.held_bytes() == walked_bytes(s.store)


def cap(s: Service, nbytes: int = BIG, handles: int = 0) -> None:
    s.store.set_limits(Limits(max_handles=handles, max_device_bytes=nbytes))


def held(s: Service) -> int:
    return s.store.held_bytes().get("cpu", 0)


def linear(s: Service, inputs: int = FEATURES, outputs: int = CLASSES) -> str:
    return s.create_module(LayerSpec("linear", args=(inputs, outputs))).id


def x_rows(n: int = ROWS) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(0))


def labels(n: int = ROWS) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(1))


def model(s: Service, momentum: float = 0.9) -> str:
    q = linear(s)
    return s.create_model(q, s.create_loss("ce", (), ()).id, s.create_optimizer(q, "sgd", (0.1, momentum), ()).id).id


def trained_model(s: Service) -> str:
    m = model(s)
    s.set_model_data(m, "train", upload(("x", x_rows()), ("y", labels())))
    return m


def dictionary(s: Service, **entries: torch.Tensor) -> str:
    return s.create_dictionary(upload(*entries.items())).id


def fetched(s: Service, handle: str, *wanted: str) -> dict[str, torch.Tensor]:
    with s.fetch(handle, list(wanted)) as copies:
        return dict(copies)


def never() -> bool:
    return False


# -- the reference workflow -------------------------------------------------------------------------


def test_reference_workflow_averages_a_copy_and_changed_modules_into_their_mean(service: Service) -> None:
    s = service
    q = linear(s, 3, 2)
    p0 = fetched(s, q, "weight", "bias")
    average = s.copy_parameters(q)
    assert average.kind is Kind.DICTIONARY and list(fetched(s, average.id)) == ["weight", "bias"]

    p1 = {"weight": f32(2, 3, start=1.0), "bias": f32(2, start=-4.0)}
    for name, value in p1.items():
        assert s.set_parameter(q, name, upload((name, value))) is False  # copied in, not registered
    assert s.average_parameters(q, average.id) == 2
    got = fetched(s, average.id)
    for name in p1:
        torch.testing.assert_close(got[name], (p0[name] + p1[name]) / 2)
    assert got[".n"].item() == 2.0 and got[".n"].dtype == torch.float64

    p2 = {"weight": f32(2, 3, start=10.0), "bias": f32(2, start=7.0)}
    for name, value in p2.items():
        s.set_parameter(q, name, upload((name, value)))
    assert s.average_parameters(q, average.id) == 3
    mean = {name: (p0[name] + p1[name] + p2[name]) / 3 for name in p1}
    got = fetched(s, average.id, "weight", "bias")
    for name in mean:
        torch.testing.assert_close(got[name], mean[name])

    assert s.load_parameters(q, average.id) == {"weight": True, "bias": True}
    for name, value in fetched(s, q, "weight", "bias").items():
        torch.testing.assert_close(value, mean[name])

    only_weight = dictionary(s, weight=torch.zeros(2, 3), unrelated=torch.ones(4))
    assert s.load_parameters(q, only_weight) == {"weight": True, "bias": False}
    assert torch.equal(fetched(s, q, "weight")["weight"], torch.zeros(2, 3))
    torch.testing.assert_close(fetched(s, q, "bias")["bias"], mean["bias"])


def test_an_ema_keeps_its_schedule_and_step_and_shows_them_in_size_and_listings(service: Service) -> None:
    s = service
    q = linear(s, 3, 2)
    e = s.copy_parameters(q, torch.float64).id
    assert s.size(e).ema is None
    change = ScheduleChange(decay=0.99, warmup=True)
    assert s.update_moving_average(q, e, change, None).step == 1
    s.set_parameter(q, "weight", upload(("weight", f32(2, 3))))
    result = s.update_moving_average(q, e, ScheduleChange(), None)
    kept = EmaState(EmaSchedule(decay=0.99, warmup=True), 2)
    assert (result.step, result.decay) == (2, kept.schedule.decay_at(2))
    assert s.size(e).ema == kept
    assert [summary.ema for ref, summary in s.list_handles() if ref.id == e] == [kept]
    source = dictionary(s, weight=torch.ones(2, 3), bias=torch.zeros(2))  # a dictionary as the source
    assert s.update_moving_average(source, e, ScheduleChange(decay=0.0), 10).step == 10
    assert torch.equal(fetched(s, e, "weight")["weight"], torch.ones(2, 3, dtype=torch.float64))
    assert s.average_parameters(source, e) == 2


def test_set_parameter_registers_a_new_parameter_and_charges_it(service: Service) -> None:
    s = service
    q = linear(s, 3, 2)
    before = held(s)
    assert s.set_parameter(q, "extra", upload(("extra", f32(7)))) is True
    assert s.size(q).parameter_count == 3
    assert held(s) == before + 7 * F32


# -- kinds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objects:
    module: str
    dictionary: str
    tensor: str
    loss: str
    model: str


@pytest.fixture
def objects(service: Service) -> Objects:
    s = service
    return Objects(
        module=linear(s), dictionary=dictionary(s, a=torch.zeros(1)), tensor=s.create_tensor(upload(("", x_rows(2)))).id,
        loss=s.create_loss("mse", (), ()).id, model=model(s),
    )


WRONG_KINDS: list[tuple[str, Callable[[Service, Objects], object], str]] = [
    ("average into a module", lambda s, o: s.average_parameters(o.module, o.module),
     "expecting dictionary handle, given module handle"),
    ("average a tensor", lambda s, o: s.average_parameters(o.tensor, o.dictionary),
     "expecting module or model or optimizer or dictionary handle, given tensor handle"),
    ("ema of a loss", lambda s, o: s.update_moving_average(o.loss, o.dictionary, ScheduleChange(), None),
     "expecting module or model or optimizer or dictionary handle, given loss handle"),
    ("ema into a model", lambda s, o: s.update_moving_average(o.module, o.model, ScheduleChange(), None),
     "expecting dictionary handle, given model handle"),
    ("copy a tensor's parameters", lambda s, o: s.copy_parameters(o.tensor),
     "expecting module or model or optimizer handle, given tensor handle"),
    ("data for a module", lambda s, o: s.set_model_data(o.module, "train", no_upload()),
     "expecting model handle, given module handle"),
    ("a model from a dictionary", lambda s, o: s.create_model(o.dictionary, o.loss, o.loss),
     "expecting module handle, given dictionary handle"),
    ("batches of a dictionary", lambda s, o: s.next_batch(o.dictionary, None, 1),
     "expecting tensor or model handle, given dictionary handle"),
    ("forward on a loss", lambda s, o: s.forward(o.module, "forward", o.loss, no_upload()),
     "expecting tensor handle, given loss handle"),
    ("update a model with a dictionary", lambda s, o: s.update_model(o.model, [o.dictionary]),
     "expecting module or loss or optimizer handle, given dictionary handle"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in WRONG_KINDS], ids=[c[0] for c in WRONG_KINDS])
def test_a_handle_of_the_wrong_kind_is_invalid_naming_both_kinds(
    service: Service, objects: Objects, call: Callable[[Service, Objects], object], message: str
) -> None:
    before, bytes_before = state_of(service.store), service.store.held_bytes()
    with pytest.raises(InvalidArgument, match=message):
        call(service, objects)
    assert_same_state(before, state_of(service.store))
    assert service.store.held_bytes() == bytes_before


UNKNOWN: list[tuple[str, Callable[[Service, Objects], object]]] = [
    ("fetch", lambda s, o: fetched(s, "dic_" + "0" * 32)),
    ("average with an unknown module", lambda s, o: s.average_parameters("mod_" + "0" * 32, o.dictionary)),
    ("average into an unknown dictionary", lambda s, o: s.average_parameters(o.module, "dic_" + "0" * 32)),
    ("addref", lambda s, o: s.addref("ten_" + "0" * 32)),
    ("free", lambda s, o: s.free([o.tensor, "ten_" + "0" * 32], every=False)),
    ("move", lambda s, o: s.move("anything", "cpu", None)),
]


@pytest.mark.parametrize("call", [c[1] for c in UNKNOWN], ids=[c[0] for c in UNKNOWN])
def test_an_unknown_handle_is_not_found_and_changes_nothing(
    service: Service, objects: Objects, call: Callable[[Service, Objects], object]
) -> None:
    before = state_of(service.store)
    with pytest.raises(NotFound, match="unknown handle"):
        call(service, objects)
    assert_same_state(before, state_of(service.store))


def test_an_empty_handle_is_invalid(service: Service) -> None:
    with pytest.raises(InvalidArgument, match="no handle given"):
        service.size("")


# -- all or nothing ---------------------------------------------------------------------------------


def _view(s: Service) -> tuple[str, str]:
    q = linear(s, 3, 2)
    return q, s.view_parameters(q, "").id


FAILING: list[tuple[str, Callable[[Service], Any], Callable[[Service, Any], object], type[Exception]]] = [
    ("average into a dictionary missing a parameter",
     lambda s: (linear(s, 3, 2), dictionary(s, weight=torch.zeros(2, 3))),
     lambda s, st: s.average_parameters(*st), InvalidArgument),
    ("average whose last entry has the wrong shape",
     lambda s: (linear(s, 3, 2), dictionary(s, weight=torch.zeros(2, 3), bias=torch.zeros(5))),
     lambda s, st: s.average_parameters(*st), InvalidArgument),
    ("average with a count that is not a float64",
     lambda s: (linear(s, 3, 2), dictionary(s, weight=torch.zeros(2, 3), bias=torch.zeros(2), **{".n": torch.tensor(3)})),
     lambda s, st: s.average_parameters(*st), InvalidArgument),
    ("update of a live view naming a good entry then an unknown one", _view,
     lambda s, st: s.update_dictionary(st[1], upload(("weight", torch.ones(2, 3)), ("nope", torch.ones(1)))), NotFound),
    ("update of a live view with a good entry then a wrong shape", _view,
     lambda s, st: s.update_dictionary(st[1], upload(("weight", torch.ones(2, 3)), ("bias", torch.ones(3)))),
     InvalidArgument),
    ("update with an empty key after a good one",
     lambda s: dictionary(s, a=torch.zeros(3)),
     lambda s, d: s.update_dictionary(d, upload(("a", torch.ones(3)), ("", torch.ones(100)))), InvalidArgument),
    ("delete of a present and a missing entry",
     lambda s: dictionary(s, a=torch.zeros(3), b=torch.zeros(3)),
     lambda s, d: s.delete_entries(d, ["a", "missing"]), NotFound),
    ("ema with a decay above 1",
     lambda s: (q := linear(s, 3, 2), s.copy_parameters(q).id),
     lambda s, st: s.update_moving_average(*st, ScheduleChange(decay=1.5), None), InvalidArgument),
    ("ema with buffers into a copy without them",
     lambda s: (q := s.create_module(LayerSpec("batchnorm1d", args=(3,))).id, s.copy_parameters(q).id),
     lambda s, st: s.update_moving_average(*st, ScheduleChange(), None, BufferMode.AVERAGE), InvalidArgument),
    ("copy to an integer dtype", lambda s: linear(s), lambda s, q: s.copy_parameters(q, torch.int32), InvalidArgument),
    ("load with a wrongly shaped entry",
     lambda s: (linear(s, 3, 2), dictionary(s, weight=torch.ones(2, 3), bias=torch.ones(7))),
     lambda s, st: s.load_parameters(*st), InvalidArgument),
    ("move of a module to an integer dtype", lambda s: linear(s), lambda s, q: s.move(q, "", torch.int32), InvalidArgument),
    ("move of a live view", _view, lambda s, st: s.move(st[1], "", torch.float64), InvalidArgument),
    ("move to a device that does not exist", lambda s: dictionary(s, a=torch.zeros(3)),
     lambda s, d: s.move(d, "nowhere", None), InvalidArgument),
    ("move of a loss", lambda s: s.create_loss("ce", (), ()).id, lambda s, h: s.move(h, "cpu", None), InvalidArgument),
    ("training data whose lengths differ", model,
     lambda s, m: s.set_model_data(m, "train", upload(("x", x_rows()), ("y", labels(ROWS - 1)))), InvalidArgument),
    ("an epoch over data too wide for the module",
     lambda s: (m := model(s), s.set_model_data(m, "train", upload(("x", torch.ones(ROWS, FEATURES + 1)), ("y", labels()))))[0],
     lambda s, m: s.run_epoch(m, never), InvalidArgument),
    ("a forward pass over an input too wide", lambda s: linear(s),
     lambda s, q: s.forward(q, "forward", "", upload(("", torch.ones(4, FEATURES + 1)))), InvalidArgument),
    ("a model from an optimizer over another module",
     lambda s: (linear(s), s.create_loss("ce", (), ()).id, s.create_optimizer(linear(s), "sgd", (0.1,), ()).id),
     lambda s, st: s.create_model(*st), InvalidArgument),
    ("a model updated with two losses",
     lambda s: (model(s), s.create_loss("ce", (), ()).id, s.create_loss("mse", (), ()).id),
     lambda s, st: s.update_model(st[0], [st[1], st[2]]), InvalidArgument),
]


@pytest.mark.parametrize(
    ("setup", "call", "error"), [c[1:] for c in FAILING], ids=[c[0] for c in FAILING]
)
def test_a_failing_call_leaves_every_object_and_the_charge_as_they_were(
    service: Service, setup: Callable[[Service], Any], call: Callable[[Service, Any], object], error: type[Exception]
) -> None:
    state = setup(service)
    before, bytes_before = state_of(service.store), service.store.held_bytes()
    with pytest.raises(error):
        call(service, state)
    assert_same_state(before, state_of(service.store))
    assert service.store.held_bytes() == bytes_before
    assert_nothing_pending(service.store)


def test_a_failed_epoch_allocates_no_gradients_or_optimizer_state(service: Service) -> None:
    s = service
    m = model(s)
    s.set_model_data(m, "train", upload(("x", torch.ones(ROWS, FEATURES + 1)), ("y", labels())))
    with pytest.raises(InvalidArgument):
        s.run_epoch(m, never)
    obj = s.store.get(m).obj
    assert all(p.grad is None for p in obj.module.parameters())
    assert not obj.optimizer.optim.state


# -- caps, as the service and an upload see them ----------------------------------------------------


@dataclass(frozen=True)
class CapCase:
    """An allocating call: objects it needs (made with no cap), the call, and its sizes: `peak` it
    must be able to hold at once, `delta` it leaves held."""

    name: str
    setup: Callable[[Service], Any]
    call: Callable[[Service, Any, RecordingUpload], object]
    tensors: tuple[tuple[str, torch.Tensor], ...]
    peak: int
    delta: int


EPOCH_LOSS = F32 + F32 + 8 + 8
"""The loss metric of an epoch of one batch (`footprint.scalar_metrics_bytes`): the batch's float32 loss,
its stack, and their float64 copy and mean."""


def _tensor_input(s: Service) -> tuple[str, str]:
    return linear(s), s.create_tensor(upload(("", x_rows()))).id


CAP_CASES = [
    # The weight is also built in a storage of its own before it is copied into the module's buffer.
    CapCase("create_module", lambda s: None, lambda s, _, up: linear(s), (), LAYER + FEATURES * CLASSES * F32, LAYER),
    CapCase("create_dictionary", lambda s: None, lambda s, _, up: s.create_dictionary(up),
            (("x", x_rows()), ("y", labels())), ROWS * FEATURES * F32 + ROWS * I64, ROWS * FEATURES * F32 + ROWS * I64),
    CapCase("set_model_data", model, lambda s, m, up: s.set_model_data(m, "train", up),
            (("x", x_rows()), ("y", labels())), ROWS * FEATURES * F32 + ROWS * I64, ROWS * FEATURES * F32 + ROWS * I64),
    CapCase("run_epoch's first step (gradients and momentum; a copy of the parameters to put back on failure)",
            trained_model, lambda s, m, up: s.run_epoch(m, never), (), 3 * LAYER + BATCH_PASS + EPOCH_LOSS, 2 * LAYER),
    CapCase("forward on a tensor handle, output kept", _tensor_input,
            lambda s, st, up: s.forward(st[0], "eforward", st[1], up), (), 2 * ROWS * CLASSES * F32, ROWS * CLASSES * F32),
    CapCase("forward on an uploaded input, output kept", lambda s: linear(s),
            lambda s, q, up: s.forward(q, "eforward", "", up), (("", x_rows()),),
            ROWS * FEATURES * F32 + 2 * ROWS * CLASSES * F32, ROWS * CLASSES * F32),
    CapCase("move of a dictionary to float64", lambda s: dictionary(s, x=x_rows()),
            lambda s, d, up: s.move(d, "", torch.float64), (), ROWS * FEATURES * 8, ROWS * FEATURES * (8 - F32)),
    CapCase("first average (its count)", lambda s: (q := linear(s), s.copy_parameters(q).id),
            lambda s, st, up: s.average_parameters(*st), (), 8, 8),
    # the weight and bias lie back to back on both sides: one span, cast at once (see test_caps)
    CapCase("ema of a bfloat16 module into float32 (one cast span)", lambda s: _bf16_ema(s),
            lambda s, st, up: s.update_moving_average(*st, ScheduleChange(decay=0.9), None), (),
            LAYER, 0),
    CapCase("copy in float64", lambda s: linear(s), lambda s, q, up: s.copy_parameters(q, torch.float64), (),
            LAYER * 2, LAYER * 2),
]


def _bf16_ema(s: Service) -> tuple[str, str]:
    """A bfloat16 linear layer and a float32 EMA of it past its first update (a copy, which casts nothing)."""
    q = linear(s)
    s.move(q, "", torch.bfloat16)
    e = s.copy_parameters(q, torch.float32).id
    s.update_moving_average(q, e, ScheduleChange(), None)
    return q, e


@pytest.mark.parametrize("case", CAP_CASES, ids=[c.name for c in CAP_CASES])
def test_an_allocating_call_is_refused_one_byte_short_and_charged_exactly_at_the_cap(
    service: Service, case: CapCase
) -> None:
    s = service
    state = case.setup(s)
    base = held(s)

    cap(s, base + case.peak - 1)
    before = state_of(s.store)
    refused = upload(*case.tensors)
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        case.call(s, state, refused)
    assert_same_state(before, state_of(s.store))
    assert held(s) == base
    assert_nothing_pending(s.store)
    if refused.refused:
        # Refused at a header: that tensor and every one after it were never allocated.
        assert refused.events[-1] == ("refused", refused.refused[0])
        assert refused.refused[0] not in refused.allocated

    cap(s, base + case.peak)
    accepted = upload(*case.tensors)
    case.call(s, state, accepted)
    assert accepted.refused == []
    assert held(s) == base + case.delta
    assert s.store.held_bytes() == walked_bytes(s.store)


UPLOADS: list[tuple[str, Callable[[Service], Any], Callable[[Service, Any, RecordingUpload], object]]] = [
    ("create_dictionary", lambda s: None, lambda s, _, up: s.create_dictionary(up)),
    ("update_dictionary", lambda s: dictionary(s, a=torch.zeros(1)), lambda s, d, up: s.update_dictionary(d, up)),
    ("create_tensor", lambda s: None, lambda s, _, up: s.create_tensor(up)),
    ("set_parameter", lambda s: linear(s), lambda s, q, up: s.set_parameter(q, "weight", up)),
    ("set_model_data", model, lambda s, m, up: s.set_model_data(m, "train", up)),
    ("evaluate", model, lambda s, m, up: s.evaluate(m, up, never)),
    ("forward", lambda s: linear(s), lambda s, q, up: s.forward(q, "forward", "", up)),
]


@pytest.mark.parametrize(("setup", "call"), [u[1:] for u in UPLOADS], ids=[u[0] for u in UPLOADS])
def test_an_upload_over_the_cap_is_refused_at_its_first_header_before_any_allocation(
    service: Service, setup: Callable[[Service], Any], call: Callable[[Service, Any, RecordingUpload], object]
) -> None:
    s = service
    state = setup(s)
    dictionary(s, pad=torch.zeros(1))  # something held: a cap of 0 bytes would mean the device's size
    cap(s, held(s))  # not one byte of room
    before = state_of(s.store)
    up = upload(("weight", torch.zeros(CLASSES, FEATURES)), ("second", torch.zeros(ROWS)))
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        call(s, state, up)
    assert up.events == [("header", "weight"), ("refused", "weight")]
    assert_same_state(before, state_of(s.store))
    assert_nothing_pending(s.store)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, up: s.create_dictionary(up),
        lambda s, up: s.create_tensor(up),
        lambda s, up: s.forward(linear_of(s), "forward", "", up),
    ],
    ids=["create_dictionary", "create_tensor", "forward"],
)
def test_a_call_over_the_handle_cap_reads_nothing_of_its_upload(
    service: Service, call: Callable[[Service, RecordingUpload], object]
) -> None:
    s = service
    linear(s)
    cap(s, handles=len(s.store))
    up = upload(("", torch.zeros(3)))
    with pytest.raises(ResourceExhausted, match="--max-handles"):
        call(s, up)
    assert up.calls == 0
    assert len(s.store) == 1


def linear_of(s: Service) -> str:
    """The one module handle of the store."""
    return next(h for h, e in s.store.items() if e.kind is Kind.MODULE)


def test_upload_headers_are_reserved_where_each_entry_will_live() -> None:
    """A dictionary's count ('.n') is reserved on the CPU, the other entries on the server's device:
    with a GPU device and a cap of 64 bytes per device, the count does not take the device's room.
    Refused at the third header, so nothing here needs a GPU."""
    s = Service(Registry(Limits(max_device_bytes=64)), settings("cuda:0"))
    up = upload((".n", torch.tensor(1.0, dtype=torch.float64)), ("a", torch.zeros(15)), ("b", torch.zeros(2)))
    with pytest.raises(ResourceExhausted, match=r"8 more tensor bytes on cuda:0 .*\(60 already held or reserved"):
        s.create_dictionary(up)
    assert up.allocated == [".n", "a"] and up.refused == ["b"]
    assert len(s.store) == 0 and s.store.held_bytes() == {}
    assert_nothing_pending(s.store, "cpu")
    assert_nothing_pending(s.store, "cuda:0")


def test_a_create_refused_at_the_byte_cap_leaves_no_handle_slot_reserved(service: Service) -> None:
    s = service
    linear(s)
    cap(s, held(s), handles=2)
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        linear(s)
    s.store.set_limits(Limits(max_handles=2, max_device_bytes=BIG))
    linear(s)  # the one free slot is still free
    assert len(s.store) == 2


def test_a_model_can_be_made_at_the_handle_cap_since_it_takes_its_parts_handles(service: Service) -> None:
    s = service
    q = linear(s)
    loss, optimizer = s.create_loss("ce", (), ()).id, s.create_optimizer(q, "sgd", (0.1,), ()).id
    cap(s, handles=3)
    m = s.create_model(q, loss, optimizer)
    assert [h for h, _ in s.store.items()] == [m.id]


# -- concurrency ------------------------------------------------------------------------------------


def test_concurrent_averages_of_one_pair_count_every_sample_and_give_the_exact_mean(service: Service) -> None:
    s = service
    q = linear(s, 4, 3)
    s.move(q, "", torch.float64)
    average = s.copy_parameters(q).id
    p0 = fetched(s, average, "weight", "bias")
    p1 = {"weight": f32(3, 4, start=2.0).double(), "bias": f32(3, start=-1.0).double()}
    for name, value in p1.items():
        s.set_parameter(q, name, upload((name, value)))
    threads, rounds = 4, 25
    counts: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads, timeout=10)

    def worker() -> None:
        try:
            start.wait()
            for _ in range(rounds):
                counts.append(s.average_parameters(q, average))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers) and errors == []

    n = 1 + threads * rounds
    assert sorted(counts) == list(range(2, n + 1))  # every call saw its own count
    got = fetched(s, average)
    assert got[".n"].item() == n
    for name in p1:
        torch.testing.assert_close(got[name], (p0[name] + (n - 1) * p1[name]) / n, rtol=1e-12, atol=1e-12)


def _waiting_for_a_lock(thread: threading.Thread) -> bool:
    """Whether the thread is inside the store's `locked` (waiting there for an object's lock)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "__enter__" and frame.f_code.co_filename.endswith("registry.py"):
            return True
        frame = frame.f_back
    return False


def _while_waiting(s: Service, model_handle: str, call: Callable[[], object], meanwhile: Callable[[], None]) -> None:
    """Run `call` on a thread while this one holds the model's lock; once the call waits for that
    lock, run `meanwhile` (which may take the lock again: it is reentrant), then let the call go."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with s.store.get(model_handle).lock:
        thread = threading.Thread(target=run)
        thread.start()
        while not _waiting_for_a_lock(thread):
            thread.join(0.001)
            assert thread.is_alive(), errors
        meanwhile()
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []


def test_a_call_waiting_for_a_model_works_on_the_parts_it_has_once_it_runs(service: Service) -> None:
    """A load into a model and a learning-rate change wait for the busy model while UpdateModel gives
    it another module and optimizer: they change the model's new parts. Resolved before the lock, they
    changed the parts it had lost, answered success, and the model never saw them (found by review)."""
    s = service
    m = model(s)
    sevens = s.create_dictionary(
        upload(("weight", torch.full((CLASSES, FEATURES), 7.0)), ("bias", torch.full((CLASSES,), 7.0)))
    ).id

    def new_module() -> None:
        q = linear(s)
        s.update_model(m, [q, s.create_optimizer(q, "sgd", (0.1,), ()).id])

    _while_waiting(s, m, lambda: s.load_parameters(m, sevens), new_module)
    assert torch.equal(fetched(s, m, "weight", "bias")["bias"], torch.full((CLASSES,), 7.0))

    def new_optimizer() -> None:
        s.update_model(m, [s.create_optimizer(m, "sgd", (0.1,), ()).id])

    _while_waiting(s, m, lambda: s.set_learning_rate(m, 0.25), new_optimizer)
    assert s.learning_rate(m) == 0.25


def test_update_model_never_leaves_the_new_parts_bytes_uncharged(service: Service) -> None:
    """UpdateModel frees the new parts' handles once the model holds them. Freed before the model
    was recharged, the new module's bytes were counted nowhere for a moment (24 bytes held while
    40,400 were reached), room a concurrent call could take past the cap (found by review). The
    update is paused as its free returns, and the ledger is read there."""
    s = service
    q = linear(s, 2, 2)
    m = s.create_model(q, s.create_loss("mse", (), ()).id, s.create_optimizer(q, "sgd", (0.1,), ()).id).id
    n = linear(s, 100, 100)
    o = s.create_optimizer(n, "sgd", (0.1,), ()).id
    freed, resume = threading.Event(), threading.Event()
    seen: list[tuple[dict[str, int], dict[str, int]]] = []

    def pause_after_free(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_name == "free" and frame.f_code.co_filename.endswith("registry.py"):
            def on_return(frame: Any, event: str, arg: Any) -> None:
                if event == "return":
                    freed.set()
                    resume.wait(timeout=30)
            return on_return
        return None

    def update() -> None:
        sys.settrace(pause_after_free)
        try:
            s.update_model(m, [n, o])
        finally:
            sys.settrace(None)
            freed.set()

    thread = threading.Thread(target=update)
    thread.start()
    freed.wait(timeout=30)
    seen.append((s.store.held_bytes(), walked_bytes(s.store)))
    resume.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert seen == [({"cpu": 40_400}, {"cpu": 40_400})]
    assert held(s) == 40_400


# -- device usage -----------------------------------------------------------------------------------


def test_device_usage_matches_the_held_bytes_and_the_handles(service: Service) -> None:
    s = service
    m = trained_model(s)
    s.run_epoch(m, never)
    q = linear(s)
    s.addref(q)
    s.view_parameters(q, "")
    s.model_input(m)
    s.create_loss("mse", (), ())
    s.create_optimizer(q, "sgd", (0.1,), ())  # no state yet, but it keeps its module: on the module's device
    dictionary(s, a=x_rows())

    usage = s.device_usage()
    assert set(usage) == {"", "cpu"}
    assert usage["cpu"].bytes == s.store.held_bytes()["cpu"]
    assert usage[""].bytes == 0
    assert usage[""].handles == 1  # the loss
    assert usage["cpu"].handles + usage[""].handles == len(s.store) == 8


def test_a_forward_s_footprint_leaves_the_module_s_own_tensors_in_place(service: Service) -> None:
    """A forward's footprint runs the module on meta tensors. Given the module itself, the meta pass
    swapped its parameters for meta ones meanwhile, and what read the module without its lock (a
    listing, a stats scrape) saw a "meta" device and the wrong bytes (found by review). Paused
    inside the meta pass (a forward pre-hook that waits when its input is on meta), the module still
    holds its own parameters."""
    s = service
    q = linear(s)
    module = s.store.get(q).obj
    weight = module.weight
    in_meta_pass, resume = threading.Event(), threading.Event()

    def pause_in_meta_pass(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].device.type == "meta":
            in_meta_pass.set()
            resume.wait(timeout=30)

    module.register_forward_pre_hook(pause_in_meta_pass)
    thread = threading.Thread(target=lambda: s.forward(q, "eforward", "", upload(("", x_rows()))))
    thread.start()
    assert in_meta_pass.wait(timeout=30)
    try:
        seen = module.weight
    finally:
        resume.set()
        thread.join(timeout=30)
    assert seen is weight and seen.device.type == "cpu"


def test_a_busy_object_is_listed_and_counted_from_its_charge_without_touching_its_tensors(
    service: Service,
) -> None:
    """Listings and device usage never wait for a busy object, and never walk its tensors: the call
    in flight changes them without the GIL (a backward pass sets gradients), and a stats scrape that
    read a gradient as it was replaced crashed the server (SIGSEGV, found by review). While another
    thread holds the module busy and gives it a gradient, both report what the store charged it."""
    s = service
    q = linear(s)
    entry = s.store.get(q)
    busy, done = threading.Event(), threading.Event()

    def hold() -> None:
        with entry.lock:
            entry.obj.weight.grad = torch.ones_like(entry.obj.weight)  # as a backward pass would, unrecharged
            busy.set()
            done.wait(timeout=30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert busy.wait(timeout=30)
    try:
        usage = s.device_usage()
        listed = {ref.id: summary for ref, summary in s.list_handles()}
    finally:
        done.set()
        thread.join(timeout=30)
    assert usage["cpu"].bytes == LAYER and usage["cpu"].handles == 1
    assert listed[q].device == "cpu" and listed[q].nbytes == LAYER
    entry.obj.weight.grad = None  # the fixture compares the charge with a walk


def test_device_usage_of_an_empty_store_is_empty(service: Service) -> None:
    assert service.device_usage() == {}


# -- sessions and settings through the service ------------------------------------------------------


@pytest.mark.parametrize(
    ("lease", "granted"), [(0.0, 60.0), (5.0, 5.0), (86400.0, 86400.0)], ids=["default", "given", "at the maximum"]
)
def test_a_session_gets_the_lease_asked_for_or_the_default(service: Service, lease: float, granted: float) -> None:
    session, got = service.create_session(lease)
    assert got == granted and session.startswith("ses_")


@pytest.mark.parametrize("lease", [-1.0, 86400.5, float("nan"), float("inf")])
def test_a_lease_out_of_range_is_invalid(service: Service, lease: float) -> None:
    with pytest.raises(InvalidArgument, match="out of range"):
        service.create_session(lease)
    assert service.store.sessions() == []


def test_handles_made_through_the_service_in_a_session_go_with_it(service: Service) -> None:
    s = service
    loose = linear(s)
    session, _ = s.create_session(0)
    with caller_session(session):
        q = linear(s)
        s.copy_parameters(q)
        s.addref(loose)
        assert len(s.list_handles()) == 3
        assert s.keep_alive("") == 60.0
        assert s.close_session("") == 3
    assert [ref.id for ref, _ in s.list_handles()] == [loose]
    assert held(s) == LAYER
    with caller_session(session), pytest.raises(NotFound, match="has ended"):
        linear(s)
    assert held(s) == LAYER and len(s.store) == 1


def test_a_session_call_without_a_session_is_invalid(service: Service) -> None:
    with pytest.raises(InvalidArgument, match="name a session"):
        service.keep_alive("")


def test_a_snapshot_without_a_state_directory_is_a_failed_precondition(service: Service) -> None:
    with pytest.raises(FailedPrecondition, match="--state-dir"):
        service.snapshot()


def test_free_every_frees_the_caller_s_session_handles_and_all_their_bytes(service: Service) -> None:
    s = service
    session, _ = s.create_session(0)
    with caller_session(session):
        m = trained_model(s)
        s.run_epoch(m, never)
        s.model_input(m)
        s.copy_parameters(m)
        assert s.free([], every=True) == 3
    assert s.store.held_bytes() == {} and len(s.store) == 0


def test_free_every_without_a_session_frees_nothing_and_says_what_to_do(service: Service) -> None:
    s = service
    m = trained_model(s)
    before = state_of(s.store)
    with pytest.raises(FailedPrecondition, match=r"this call has no session; nothing freed. Name the handles"):
        s.free([], every=True)
    assert_same_state(before, state_of(s.store))
    with pytest.raises(InvalidArgument, match="give no handles and not all"):
        s.free([m], every=False, purge=True)
    assert s.free([], every=False, purge=True) == 1 and len(s.store) == 0


def test_refs_name_their_kinds(service: Service) -> None:
    s = service
    q = s.create_module(LayerSpec("linear", args=(2, 2)))
    assert q == Ref(q.id, Kind.MODULE)
    assert s.addref(q.id).kind is Kind.MODULE
    assert s.create_loss("ce", (), ()).kind is Kind.LOSS


def test_a_reply_streams_from_reused_memory_that_no_concurrent_reply_shares(service: Service) -> None:
    """fetch(reused=True), as the servicer asks: the copies lie in a block from the host cache, kept
    when the reply's copies go; a second reply while the first streams gets its own, and the first's
    copies stay its own."""
    from weightavg_server.domain import hostcache

    cache = hostcache.cache()
    cache.clear()
    d = service.create_dictionary(upload(("a", f32(512, 600)), ("b", f32(3, start=7.0)))).id
    want = fetched(service, d)
    idle = cache.stats().idle_bytes
    with service.fetch(d, [], reused=True) as first:
        with service.fetch(d, [], reused=True) as second:
            assert first[0][1].data_ptr() != second[0][1].data_ptr()
            second[0][1].fill_(-1.0)  # what a reused block's next reply would write
        assert all(torch.equal(got, want[name]) for name, got in first)
    del first, second
    assert cache.stats().idle_bytes == idle + 2 * (512 * 600 + 3) * 4  # both blocks kept for the next replies
    with service.fetch(d, [], reused=True) as again:
        assert all(torch.equal(got, want[name]) for name, got in again)
    cache.clear()


def test_evaluate_keeps_its_output_reserved_until_the_reply_has_streamed(service: Service) -> None:
    """The output stays reserved while the servicer streams it (inside the block): it had been
    released when the computation returned, so other calls could take its bytes meanwhile."""
    s = service
    m = model(s)
    cap(s)
    base = held(s)
    with contextlib.ExitStack() as replying:  # as the servicer holds it while the reply streams
        output = s.evaluate(m, upload(("x", torch.zeros(ROWS, FEATURES))), never, replying)
        assert output.shape == (ROWS, CLASSES)
        room = BIG - base
        assert not fits(s.store, nbytes=room - output.numel() * F32 + 1)
    assert_nothing_pending(s.store)


# -- tests and evaluations that change the model --------------------------------------------------


@contextlib.contextmanager
def as_reader() -> Iterator[None]:
    """Serve the block as a call made with a reader token of the default tenant (what the tenancy
    interceptor sets); a reader's change is refused by the store itself, whatever the transport lets by."""
    token = CALLER.set(Caller(DEFAULT_TENANT, Role.READER))
    try:
        yield
    finally:
        CALLER.reset(token)


def max_norm_model(s: Service) -> tuple[str, torch.Tensor]:
    """A model whose module is an embedding with max_norm 1 and rows of norm 10 (each forward
    renormalises the rows it reads, in place), with test indices loaded; the model and the weight."""
    q = s.create_module(LayerSpec("embed", args=(ROWS, CLASSES), options=(("maxnorm", 1.0),))).id
    weight = s.store.get(q).obj.weight
    with torch.no_grad():
        weight.copy_(torch.nn.functional.normalize(torch.randn(ROWS, CLASSES), dim=1) * 10)
    m = s.create_model(q, s.create_loss("ce", (), ()).id, s.create_optimizer(q, "sgd", (0.1,), ()).id).id
    s.set_model_data(m, "test", upload(("x", torch.arange(ROWS)), ("y", labels())))
    return m, weight


def test_testrun_and_evaluate_take_the_write_path_where_they_change_the_model(service: Service) -> None:
    """testrun puts the test data back to full size, and a pass over a max_norm embedding
    renormalises the rows it reads: both changes, in place, so both calls go through `mutate` (the
    store's way for changes: a reader token is refused there too) rather than a read, which let a
    reader's call change the model (found by review). An evaluation that writes nothing stays a read."""
    s = service
    m, weight = max_norm_model(s)
    s.set_model_options(m, "test", (("batchsize", 10),))
    assert s.next_batch(m, "test", 0)  # the test data stand at their first batch of 10
    data = s.store.get(m).obj.test_data
    before = weight.detach().clone()
    with as_reader():
        with pytest.raises(PermissionDenied):
            s.run_test(m, never)
        with pytest.raises(PermissionDenied):
            s.evaluate(m, upload(("x", torch.arange(ROWS))), never)
    assert data.x.shape[0] == data.y.shape[0] == 10  # still at the batch they stood at
    assert torch.equal(weight, before)  # no row renormalised
    assert_nothing_pending(s.store)
    # The same calls with a user's token: the rows read are renormalised (as torch does, in eval mode
    # too) and the data put back to full size.
    s.run_test(m, never)
    assert data.x.shape[0] == ROWS
    assert torch.allclose(weight.norm(dim=1), torch.ones(ROWS))
    plain = model(s)
    with as_reader():  # an evaluation that writes nothing is a read, open to any caller the transport lets by
        assert s.evaluate(plain, upload(("x", x_rows())), never).shape == (ROWS, CLASSES)


def transport_upload(s: Service, *named: tuple[str, Any]) -> Callable[[Any], list[tuple[str, torch.Tensor]]]:
    """An upload received as the transport receives one: the real chunk codec, each tensor's buffer
    from the service's `staging_buffer` once its header is reserved."""
    from weightavg import wire
    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg_server.transport import codec

    chunks = [pb.CreateDictionaryRequest.FromString(m).chunk
              for m in wire.encoded_chunks(named, 1 << 20, pb.CreateDictionaryRequest)]
    return lambda on_header: codec.assemble(chunks, 1 << 30, on_header, allocate=s.staging_buffer)


def test_an_upload_staged_on_the_host_for_a_gpu_reserves_its_host_buffer_too() -> None:
    """On a CUDA server each uploaded tensor is received into a host buffer (`staging_buffer`) and
    placed on the GPU after: for the length of the call the host holds a copy as large as the
    tensor. It was reserved on the GPU only, so uploads could fill the host past its cap (found by
    review). Refused at the host's cap before the buffer exists, so nothing here needs a GPU: a
    count ('.n', 8 bytes) held on the CPU leaves 56 bytes of the host's 64, and the 60-byte entry
    fits the GPU's room but not its staging the host's."""
    import numpy as np

    s = Service(Registry(Limits(max_device_bytes=64)), settings("cuda:0"))
    s.create_dictionary(transport_upload(s, (".n", np.float64(1.0))))
    assert s.store.held_bytes() == {"cpu": 8}
    with pytest.raises(ResourceExhausted, match=r"60 more tensor bytes on cpu .*\(8 already held or reserved"):
        s.create_dictionary(transport_upload(s, ("a", np.zeros(15, np.float32))))
    assert len(s.store) == 1 and s.store.held_bytes() == {"cpu": 8}
    assert_nothing_pending(s.store, "cpu")
    assert_nothing_pending(s.store, "cuda:0")


def test_a_shared_memory_upload_staged_on_the_host_for_a_gpu_reserves_its_host_copy_too() -> None:
    """The same through a shared memory region that does not reach the GPU (not page-locked for
    it): each tensor is copied out of the region into a new host tensor and placed on the GPU after,
    and that host tensor went unreserved too (found by review)."""
    import dataclasses

    from inprocess import TensorRegion, caller_session
    from weightavg_server.domain import shm

    s = Service(Registry(Limits(max_device_bytes=64)), dataclasses.replace(settings("cuda:0"), allow_shm=True))
    session = s.store.create_session(60.0)
    with caller_session(session):
        s.store.register_region(session, "r", TensorRegion(torch.zeros(64, dtype=torch.uint8)))
        s.create_dictionary_from_shared_memory("r", [shm.Placement(".n", torch.float64, (), 0, 8)])
        assert s.store.held_bytes() == {"cpu": 8}
        with pytest.raises(ResourceExhausted, match=r"60 more tensor bytes on cpu .*\(8 already held or reserved"):
            s.create_dictionary_from_shared_memory("r", [shm.Placement("a", torch.float32, (15,), 0, 60)])
        assert len(s.store) == 1 and s.store.held_bytes() == {"cpu": 8}
    assert_nothing_pending(s.store, "cpu")
    assert_nothing_pending(s.store, "cuda:0")
