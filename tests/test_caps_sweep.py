"""The byte cap swept across every reservation a call makes, through real servers.

`tests/test_caps.py` puts the cap one byte under a call's peak. A call that reserves in several
steps (an upload tensor by tensor, then its conversion; an epoch's state, then its kept metrics; a
merge's result, then its scratch) can also be refused at any earlier step, after others were
granted and some work done. Here each call first runs on one server with the levels its
reservations reached recorded; then, on a second server in the same state, the cap is set just under
each level and at each level below the last (and at sevenths of the peak): every time a clear
RESOURCE_EXHAUSTED, every object bit for bit as it was, the charge as it was and nothing left
reserved. At the peak the call succeeds, holds no more than the cap, and the charge equals both the
store's walk and the storage the objects keep alive through any reference (`referenced_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest

from conftest import LiveServer, assert_unchanged, snapshot
from inprocess import assert_nothing_pending, referenced_bytes, walked_bytes
from test_caps import CASES, CLASSES, FEATURES, Case, labels, set_cap, x_rows
from weightavg import Client, ResourceExhaustedError
from weightavg_server.store.registry import Registry


def net(c: Client) -> object:
    """A small network with parameters, buffers (batchnorm) and dropout."""
    return c.module([
        "sequential", ["linear", "l1", FEATURES, 16], ["batchnorm1d", "bn", 16], ["relu", "r"], ["drop", "d", 0.1],
        ["linear", "l2", 16, CLASSES],
    ])


def net_model(c: Client, optimizer: str, *args: object, **options: object) -> object:
    q = net(c)
    m = c.model(q, c.loss("ce"), c.opt(optimizer, q, *args, **options))
    c.train(m, x_rows(), labels())
    return m


def with_test_data(c: Client) -> object:
    m = net_model(c, "sgd", 0.1)
    c.test(m, x_rows(), labels())
    return m


MORE = [
    # Each optimizer's first epoch: gradients and the state of a first step, made lazily by torch.
    Case("first adamw epoch with amsgrad", lambda c: net_model(c, "adamw", 0.01, amsgrad=True), lambda c, m: c.run(m), 0, 0),
    Case("first rmsprop epoch, centered, with momentum",
         lambda c: net_model(c, "rmsprop", 0.01, momentum=0.9, centered=True), lambda c, m: c.run(m), 0, 0),
    Case("first shuffled nesterov epoch in batches",
         lambda c: (m := net_model(c, "sgd", 0.1, 0.9, nesterov=True), c.train(m, shuffle=True, batchsize=64))[0],
         lambda c, m: c.run(m), 0, 0),
    Case("adagrad epoch", lambda c: net_model(c, "adagrad", 0.1), lambda c, m: c.run(m), 0, 0),
    Case("forward with gradients", lambda c: (net(c), c.tensor(x_rows())), lambda c, s: c.forward(*s), 0, 0),
    # Growing an existing dictionary: one entry replaced, two new (counted as additions as they arrive).
    Case("three entries set, one replaced and two new", lambda c: c.dict({"a": x_rows()}),
         lambda c, d: c.dict(d, {"a": x_rows() * 2, "b": x_rows(), "c": labels()}), 0, 0),
    Case("training data replaced, converted", lambda c: net_model(c, "sgd", 0.1),
         lambda c, m: c.train(m, x_rows().astype(np.float64), labels().astype(np.int32)), 0, 0),
    Case("testrun over batchnorm", with_test_data, lambda c, m: c.testrun(m), 0, 0),
    Case("batchnorm recalculated", with_test_data, lambda c, m: c.batchnorm(m), 0, 0),
    Case("first adam outer step", lambda c: (q := net(c), c.opt("adam", q, 0.1), c.copyparms(q))[1:],
         lambda c, s: c.outer_step(*s), 0, 0),
    Case("a trained adam model moved to float64 with its data",
         lambda c: (m := net_model(c, "adam", 0.01), c.run(m), c.test(m, x_rows(), labels()))[0],
         lambda c, m: c.to(m, dtype="float64"), 0, 0),
    Case("average of modules into a module", lambda c: [net(c), net(c), net(c)],
         lambda c, qs: c.average(qs[1:], into=qs[0]), 0, 0),
    Case("merge by dare", lambda c: [c.copyparms(net(c)) for _ in range(3)],
         lambda c, ds: c.merge("dare", ds[1:], base=ds[0], density=0.5), 0, 0),
    Case("greedy soup of three", lambda c: (m := with_test_data(c), [c.copyparms(m) for _ in range(3)]),
         lambda c, s: c.soup(s[0], s[1]), 0, 0),
    Case("first average with buffers", lambda c: (m := net_model(c, "sgd", 0.1), c.copyparms(m, buffers=True)),
         lambda c, s: c.avgparms(s[0], s[1], buffers=True), 0, 0),
]
"""Multi-allocation calls beside test_caps' table; their levels are recorded, not worked out (peak 0)."""


def recorded_levels(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The CPU bytes held and reserved that each reservation from now on asks the server's ledger to
    allow (held + reserved + asked), appended as it is checked."""
    levels: list[int] = []
    ledger = registry._ledger
    check = ledger.check

    def recording(live: int, handles: int, nbytes: Mapping[str, int], released: Mapping[str, int] | None = None) -> None:
        asked = nbytes.get("cpu", 0)
        if asked > 0:
            pending = ledger._pending.get("cpu", 0) - (released or {}).get("cpu", 0)
            levels.append(ledger._held.get("cpu", 0) + pending + asked)
        check(live, handles, dict(nbytes), dict(released) if released is not None else None)

    monkeypatch.setattr(ledger, "check", recording)
    return levels


SWEPT = CASES + MORE


@pytest.mark.parametrize("case", SWEPT, ids=[case.name for case in SWEPT])
def test_a_call_refused_at_any_of_its_reservations_changes_nothing(
    start_server: Callable[..., LiveServer], case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = start_server(allow_shm=True), start_server(allow_shm=True)
    with Client(first.address, timeout=60) as c:
        state = case.setup(c)
        held = first.registry.held_bytes().get("cpu", 0)
        levels = recorded_levels(first.registry, monkeypatch)
        case.call(c, state)
        monkeypatch.undo()
    steps = sorted({level - held for level in levels})
    peak = steps[-1] if steps else 0
    if case.peak:
        assert peak == case.peak, steps

    registry = second.registry
    with Client(second.address, timeout=60) as c:
        state = case.setup(c)
        assert registry.held_bytes().get("cpu", 0) == held
        before = snapshot(registry)
        caps = {k - 1 for k in steps} | set(steps[:-1]) | {peak * i // 7 for i in range(7)}
        for k in sorted(k for k in caps if held + k > 0 and k < peak):  # a cap of 0 means the device's size
            set_cap(registry, held + k)
            with pytest.raises(ResourceExhaustedError, match="--max-device-bytes"):
                case.call(c, state)
            assert_unchanged(before, snapshot(registry))
            assert registry.held_bytes().get("cpu", 0) == held, k
            assert_nothing_pending(registry)
        set_cap(registry, held + peak)
        case.call(c, state)
        assert registry.held_bytes().get("cpu", 0) <= held + peak
        assert registry.held_bytes() == walked_bytes(registry) == referenced_bytes(registry)
