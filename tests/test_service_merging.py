"""The service's averaging-across-models methods in process: average, merge, outer_step and soup with
their kinds of handles, all or nothing with the charge unchanged, and the byte cap as each of them
sees it (refused one byte short of its peak, charged exactly at it). No gRPC here; the gRPC versions
are in test_merging.py and the table of test_caps.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from inprocess import assert_nothing_pending, assert_same_state, state_of, upload, walked_bytes
from weightavg_server.domain import selection
from weightavg_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Service, Settings
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Kind, Registry

F32 = 4
ROWS, FEATURES, CLASSES = 30, 20, 5
LAYER = (FEATURES * CLASSES + CLASSES) * F32
ENTRY = ROWS * FEATURES * F32
"""Bytes of one float32 ROWS x FEATURES entry."""
BIG = 10**9


@pytest.fixture
def service() -> Any:
    s = Service(Registry(Limits(max_device_bytes=BIG)), Settings(
        device=torch.device("cpu"), max_spec_depth=32, session_lease_seconds=60.0, max_session_lease_seconds=86400.0,
    ))
    yield s
    assert s.store.held_bytes() == walked_bytes(s.store)


def held(s: Service) -> int:
    return s.store.held_bytes().get("cpu", 0)


def cap(s: Service, nbytes: int) -> None:
    s.store.set_limits(Limits(max_device_bytes=nbytes))


def rows(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, FEATURES, generator=torch.Generator().manual_seed(seed))


def dictionary(s: Service, **entries: torch.Tensor) -> str:
    return s.create_dictionary(upload(*entries.items())).id


def fetched(s: Service, handle: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Host copies of a handle's tensors (the service's fetch holds them reserved while open)."""
    with s.fetch(handle, names or []) as copies:
        return dict(copies)


def linear(s: Service) -> str:
    return s.create_module(LayerSpec("linear", args=(FEATURES, CLASSES))).id


def model_with_test_data(s: Service, width: int = FEATURES) -> str:
    q = linear(s)
    m = s.create_model(q, s.create_loss("ce", (), ()).id, s.create_optimizer(q, "sgd", (0.1,), ()).id).id
    labels = torch.randint(0, CLASSES, (ROWS,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(ROWS, width, generator=torch.Generator().manual_seed(0))
    s.set_model_data(m, "test", upload(("x", x), ("y", labels)))
    return m


def model_and_copy(s: Service) -> tuple[str, str]:
    """A model without data and a copy of its parameters (taken before the model takes the module's handle)."""
    q = linear(s)
    copy = s.copy_parameters(q).id
    m = s.create_model(q, s.create_loss("ce", (), ()).id, s.create_optimizer(q, "sgd", (0.1,), ()).id).id
    return m, copy


def never() -> bool:
    return False


# -- the four calls -----------------------------------------------------------------------------------------


def test_average_of_models_into_a_new_dictionary_and_into_a_model(service: Service) -> None:
    s = service
    a, b = linear(s), linear(s)
    pa, pb = fetched(s, s.copy_parameters(a).id), fetched(s, s.copy_parameters(b).id)
    mean = s.average([a, b, b], None, "")
    assert mean.kind is Kind.DICTIONARY
    got = fetched(s, mean.id)
    for name in pa:
        torch.testing.assert_close(got[name], (pa[name] + 2 * pb[name]) / 3, rtol=0, atol=1e-6)
    assert s.average([mean.id], None, a).id == a  # into the first module's parameters
    torch.testing.assert_close(fetched(s, a, ["weight"])["weight"], got["weight"], rtol=0, atol=0)


def test_merge_makes_a_new_charged_dictionary(service: Service) -> None:
    s = service
    base = dictionary(s, x=rows(0))
    ds = [dictionary(s, x=rows(0) + 0.1 * rows(i)) for i in (1, 2)]
    before = held(s)
    merged = s.merge("ties", ds, base, [1.0, 2.0], (("density", 0.5),), (("x", (("lam", 0.5),)),))
    assert held(s) == before + ENTRY
    assert set(fetched(s, merged.id)) == {"x"}


def test_outer_step_on_a_model_steps_its_optimizer(service: Service) -> None:
    s = service
    q = linear(s)
    m = s.create_model(q, s.create_loss("ce", (), ()).id, s.create_optimizer(q, "sgd", (1.0,), ()).id).id
    target = dictionary(s, weight=torch.zeros(CLASSES, FEATURES), bias=torch.ones(CLASSES))
    norm = s.outer_step(m, target)
    assert norm > 0
    torch.testing.assert_close(fetched(s, m, ["bias"])["bias"], torch.ones(CLASSES), rtol=0, atol=1e-6)


def test_soup_returns_a_new_dictionary_and_puts_the_model_back(service: Service) -> None:
    s = service
    m = model_with_test_data(s)
    weights = fetched(s, m, ["weight", "bias"])
    ingredients = [s.copy_parameters(m).id, dictionary(s, weight=torch.zeros(CLASSES, FEATURES), bias=torch.zeros(CLASSES))]
    made = s.soup(m, ingredients, (), never)
    assert made.dictionary.kind is Kind.DICTIONARY and made.metric == "accuracy" and len(made.scores) == 2
    assert made.score >= max(made.scores)
    for name, t in fetched(s, m, ["weight", "bias"]).items():
        assert torch.equal(t, weights[name])


# -- kinds and all or nothing ---------------------------------------------------------------------------


FAILING: list[tuple[str, Callable[[Service], Any], Callable[[Service, Any], object], type[Exception], str]] = [
    ("average of a loss", lambda s: s.create_loss("ce", (), ()).id, lambda s, h: s.average([h], None, ""),
     InvalidArgument, "expecting dictionary or module or model or optimizer handle, given loss handle"),
    ("average of an unknown handle", lambda s: dictionary(s, x=rows(0)),
     lambda s, d: s.average([d, "dic_" + "0" * 32], None, ""), NotFound, "unknown handle"),
    ("average into a tensor", lambda s: (dictionary(s, x=rows(0)), s.create_tensor(upload(("", rows(0)))).id),
     lambda s, st: s.average([st[0]], None, st[1]), InvalidArgument, "given tensor handle"),
    ("average into one of two with a wrong shape last",
     lambda s: (dictionary(s, x=rows(0), y=torch.zeros(3)), dictionary(s, x=rows(1), y=torch.zeros(3)),
                dictionary(s, x=rows(2), y=torch.zeros(4))),
     lambda s, st: s.average([st[0], st[1]], None, st[2]), InvalidArgument, r"'into' holds shape \[4\]"),
    ("merge by an unknown method", lambda s: dictionary(s, x=rows(0)), lambda s, d: s.merge("mean", [d], "", None),
     InvalidArgument, "one of linear, slerp, task_arithmetic, ties, dare, della, breadcrumbs, multislerp, model_stock"),
    ("merge against an unknown base", lambda s: dictionary(s, x=rows(0)),
     lambda s, d: s.merge("ties", [d], "dic_" + "0" * 32, None, (("density", 0.5),)), NotFound, "unknown handle"),
    ("outer step of a module", lambda s: (linear(s), dictionary(s, x=rows(0))),
     lambda s, st: s.outer_step(st[0], st[1]), InvalidArgument, "expecting optimizer or model handle"),
    ("outer step with an average lacking a parameter",
     lambda s: (s.create_optimizer(linear(s), "sgd", (0.1, 0.9), ()).id, dictionary(s, weight=torch.zeros(CLASSES, FEATURES))),
     lambda s, st: s.outer_step(st[0], st[1]), InvalidArgument, "no entry 'bias'"),
    ("soup without test data", lambda s: model_and_copy(s),
     lambda s, st: s.soup(st[0], [st[1]], (), never), FailedPrecondition, "no test data"),
    # Fails while scoring the first ingredient, after loading it: the model must be put back.
    ("soup whose test data do not fit the model", lambda s: (m := model_with_test_data(s, FEATURES + 1), s.copy_parameters(m).id,
                                                              dictionary(s, weight=torch.ones(CLASSES, FEATURES), bias=torch.ones(CLASSES))),
     lambda s, st: s.soup(st[0], [st[2], st[1]], (), never), InvalidArgument, "testrun"),
    ("soup with an unknown metric", lambda s: (m := model_with_test_data(s), s.copy_parameters(m).id),
     lambda s, st: s.soup(st[0], [st[1]], (("metric", "f1"),), never), InvalidArgument, "one of accuracy, loss"),
]


@pytest.mark.parametrize(("setup", "call", "error", "message"), [c[1:] for c in FAILING], ids=[c[0] for c in FAILING])
def test_a_failing_call_leaves_every_object_and_the_charge_as_they_were(
    service: Service, setup: Callable[[Service], Any], call: Callable[[Service, Any], object], error: type[Exception],
    message: str,
) -> None:
    state = setup(service)
    before, bytes_before = state_of(service.store), service.store.held_bytes()
    with pytest.raises(error, match=message):
        call(service, state)
    assert_same_state(before, state_of(service.store))
    assert service.store.held_bytes() == bytes_before
    assert_nothing_pending(service.store)


# -- the byte cap -----------------------------------------------------------------------------------------


def three(s: Service) -> list[str]:
    return [dictionary(s, x=rows(i)) for i in range(3)]


def optimizer_and_average(s: Service) -> tuple[str, str]:
    q = linear(s)
    return s.create_optimizer(q, "sgd", (0.5, 0.9), ()).id, s.copy_parameters(q).id


def bfloat16_optimizer_and_float32_average(s: Service) -> tuple[str, str]:
    q = linear(s)
    s.move(q, "cpu", torch.bfloat16)
    average = dictionary(s, weight=torch.zeros(CLASSES, FEATURES), bias=torch.zeros(CLASSES))
    return s.create_optimizer(q, "sgd", (0.5, 0.9), ()).id, average


def soup_setup(s: Service) -> tuple[str, list[str]]:
    m = model_with_test_data(s)
    return m, [s.copy_parameters(m).id, s.copy_parameters(m).id]


CAPS: list[tuple[str, Callable[[Service], Any], Callable[[Service, Any], object], int, int]] = [
    # The mean accumulates in the new entry itself: the result is the whole peak.
    ("average into a new dictionary", three, lambda s, ds: s.average(ds, [1.0, 2.0, 3.0], ""), ENTRY, ENTRY),
    # Into one of its inputs: an accumulator per entry, nothing kept.
    ("average into one of its inputs", three, lambda s, ds: s.average(ds, None, ds[0]), ENTRY, 0),
    # The result; delta, |delta|, elected sign, divisor (4 float32) and a bool mask; kthvalue's copy and int64
    # index where the native selection, which allocates nothing, is off.
    ("ties", lambda s: (dictionary(s, x=rows(9)), three(s)),
     lambda s, st: s.merge("ties", st[1], st[0], None, (("density", 0.5),)),
     ENTRY + 4 * ENTRY + ROWS * FEATURES + (0 if selection.active() else ROWS * FEATURES * (F32 + 8)), ENTRY),
    # A pseudo-gradient per parameter (freed) and SGD's momentum buffers (kept).
    ("first outer step with momentum", optimizer_and_average, lambda s, st: s.outer_step(*st), 2 * LAYER, LAYER),
    # bfloat16 gradients (freed), then the larger of their momentum (kept) and the float32 difference of
    # the weight, held while its gradient is cast, with its norm's scalars (outer.sum_of_squares_bytes).
    ("first bfloat16 outer step to a float32 average", bfloat16_optimizer_and_float32_average,
     lambda s, st: s.outer_step(*st), LAYER // 2 + CLASSES * FEATURES * F32 + 48, LAYER // 2),
    # The soup (kept), a copy of the model's parameters to put back (freed), and its scoring's test
    # pass over one batch of ROWS: the logits, its loss's log_softmax and its accuracy's scalars: the
    # batch's int64 matches and positions scored, the stack of one and its sum, the accuracy answered;
    # and what scoring the batch makes and frees (footprint.scoring_bytes): ce's int64 class per row,
    # the bool hits, the ignore index's mask and the masked hits, two sums.
    ("greedy soup", soup_setup, lambda s, st: s.soup(st[0], st[1], (), never),
     2 * LAYER + 2 * ROWS * CLASSES * F32 + (2 * 8 + 8 + 8) + 8 + ROWS * (8 + 3) + 16, LAYER),
]


@pytest.mark.parametrize(("setup", "call", "peak", "delta"), [c[1:] for c in CAPS], ids=[c[0] for c in CAPS])
def test_refused_one_byte_short_of_the_peak_and_charged_exactly_at_it(
    service: Service, setup: Callable[[Service], Any], call: Callable[[Service, Any], object], peak: int, delta: int
) -> None:
    s = service
    state = setup(s)
    base = held(s)
    cap(s, base + peak - 1)
    before = state_of(s.store)
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        call(s, state)
    assert_same_state(before, state_of(s.store))
    assert held(s) == base
    assert_nothing_pending(s.store)

    cap(s, base + peak)
    call(s, state)
    assert held(s) == base + delta
    assert s.store.held_bytes() == walked_bytes(s.store)


def test_a_soup_at_the_handle_cap_is_refused_before_it_scores_anything(service: Service) -> None:
    s = service
    m, ingredients = soup_setup(s)
    s.store.set_limits(Limits(max_device_bytes=BIG, max_handles=len(s.store)))
    before = state_of(s.store)
    with pytest.raises(ResourceExhausted, match="--max-handles"):
        s.soup(m, ingredients, (), lambda: pytest.fail("scored an ingredient"))  # type: ignore[no-any-return]
    assert_same_state(before, state_of(s.store))
