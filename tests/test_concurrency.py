"""Many clients at once: calls on one handle are serialised, calls on different handles run in
parallel, free never races with a call in flight, and no mix of calls deadlocks.

Every call has a deadline (the clients' timeout), so a deadlock fails the test with
DEADLINE_EXCEEDED instead of hanging it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from conftest import LiveServer
from inprocess import assert_no_handle_pending, assert_nothing_pending, walked_bytes
from weightavg import (
    Client, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError,
)

TIMEOUT = 60.0


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..count-1) on count threads started together; re-raise the first error."""
    barrier = threading.Barrier(count)

    def start(i: int) -> Any:
        barrier.wait(timeout=TIMEOUT)
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start, i) for i in range(count)]
        return [f.result(timeout=600) for f in futures]


def test_16_threads_x_500_avgparms_on_one_dictionary(live_server: LiveServer, client: Client) -> None:
    """Thread i averages a module whose parameters all equal i into one shared dictionary.

    The running mean is order-independent, so the result is exact whatever the interleaving:
    (0 + 500 * (1 + ... + 16)) / 8001 = 68000 / 8001. A lost or torn update shows as a count below
    8001 or a mean off by at least (16 - 8.5) / 8001 ~ 1e-3.
    """
    threads, calls = 16, 500
    modules = []
    for i in range(1, threads + 1):
        m = client.module(["linear", 2, 1])
        client.parm(m, "weight", float(i))
        client.parm(m, "bias", float(i))
        modules.append(m)
    # weight in float64: 8000 steps of round-off of ~1e-15 each stay far below 1e-9. bias in float32,
    # as the reference keeps it: each lerp step rounds to ~3 ulp of 16 (3e-6), and earlier errors
    # shrink by (1 - w), so 8000 steps stay below 8000 * 3e-6 = 0.024 in the worst case.
    avg = client.dict({"weight": np.zeros((1, 2), np.float64), "bias": np.zeros(1, np.float32)})

    def work(i: int) -> list[int]:
        with Client(live_server.address, timeout=TIMEOUT) as c:
            return [c.avgparms(modules[i], avg) for _ in range(calls)]

    counts = [n for ns in run_threads(threads, work) for n in ns]
    assert sorted(counts) == list(range(2, threads * calls + 2))  # every count handed out exactly once
    values = client.dict(avg)
    assert values[".n"] == threads * calls + 1 == 8001
    exact = Fraction(calls * sum(range(1, threads + 1)), threads * calls + 1)
    np.testing.assert_allclose(values["weight"], np.full((1, 2), float(exact)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(values["bias"], np.full(1, float(exact)), rtol=0, atol=0.024)


def test_calls_on_other_handles_proceed_while_one_is_busy(live_server: LiveServer, client: Client) -> None:
    """Holding one object's lock (as a long call would) blocks calls on it and on nothing else."""
    busy, other = client.module(["linear", 4, 4]), client.module(["linear", 4, 4])
    busy_copy = client.copyparms(busy)
    entry = live_server.registry.get(busy.id)
    with ThreadPoolExecutor(1) as pool:
        with entry.lock:
            waiting = pool.submit(client.avgparms, busy, busy_copy)
            # Every call below runs to completion while `busy` is held.
            p = client.copyparms(other)
            assert client.avgparms(other, p) == 2
            assert client.size(other) == 2
            assert {h.handle.id for h in client.handles()} >= {busy.id, other.id, p.id}
            assert not waiting.done()
        assert waiting.result(timeout=TIMEOUT) == 2


def test_a_call_waiting_for_a_handle_that_gets_freed_answers_not_found(
    live_server: LiveServer, client: Client
) -> None:
    """A call that looked a handle up, then waited for its lock while the handle was freed, must not
    then work on the freed object (its result would be lost, and the object alive again)."""
    m = client.module(["linear", 4, 4])
    d = client.copyparms(m)
    entry = live_server.registry.get(d.id)
    with ThreadPoolExecutor(1) as pool:
        with entry.lock:
            waiting = pool.submit(client.avgparms, m, d)
            time.sleep(0.5)  # lets the call reach the lock; it answers NOT_FOUND either way
            live_server.registry.free([d.id])  # the lock is reentrant: this thread holds it
        with pytest.raises(NotFoundError):
            waiting.result(timeout=TIMEOUT)
    assert ".n" not in entry.obj.entries  # the freed dictionary was not averaged into


def test_free_waits_for_the_call_in_flight(live_server: LiveServer, client: Client) -> None:
    """free of a handle whose object is busy returns only once the call in flight has finished."""
    m = client.module(["linear", 4, 4])
    d = client.copyparms(m)
    entry = live_server.registry.get(d.id)
    with ThreadPoolExecutor(1) as pool:
        with entry.lock:
            freeing = pool.submit(client.free, d)
            time.sleep(0.2)
            assert not freeing.done()  # blocked behind this thread's hold on the object
            assert d.id in {h.handle.id for h in client.handles()}  # listing does not wait for it
        assert freeing.result(timeout=TIMEOUT) == 1
    with pytest.raises(NotFoundError):
        client.avgparms(m, d)


def test_crossed_two_handle_calls_do_not_deadlock(live_server: LiveServer, client: Client) -> None:
    """Threads load and average a into b's view and b into a's view at once: the two locks are taken
    in one global order whichever argument comes first, so every call completes."""
    a, b = client.module(["linear", 8, 8]), client.module(["linear", 8, 8])
    view_a, view_b = client.parms(a), client.parms(b)
    pa, pb = client.copyparms(a), client.copyparms(b)

    def work(i: int) -> int:
        with Client(live_server.address, timeout=TIMEOUT) as c:
            for _ in range(100):
                if i % 2:
                    c.copyparms(a, view_b)
                    c.avgparms(b, pa)
                else:
                    c.copyparms(b, view_a)
                    c.avgparms(a, pb)
        return i

    assert run_threads(8, work) == list(range(8))


def test_reads_never_see_a_half_applied_load(live_server: LiveServer, client: Client) -> None:
    """Writers load all-zero or all-one dictionaries into a module; concurrent copies and fetches
    (through copyparms, parm and a live view) always see one or the other, never a mix."""
    m = client.module(["sequential", ["linear", "a", 64, 64], ["linear", "b", 64, 64]])
    names = client.parmnames(m)
    zeros = client.dict({n: 0.0 for n in names})
    ones = client.dict({n: 1.0 for n in names})
    view = client.parms(m)
    client.copyparms(m, zeros)

    def uniform(values: dict[str, Any]) -> float:
        flat = np.concatenate([np.ravel(v) for v in values.values()])
        assert flat.min() == flat.max(), "torn read"
        return float(flat[0])

    def work(i: int) -> set[float]:
        seen = set()
        with Client(live_server.address, timeout=TIMEOUT) as c:
            for k in range(60):
                if i < 2:
                    c.copyparms(m, ones if k % 2 else zeros)
                elif i < 4:
                    copy = c.copyparms(m)
                    seen.add(uniform(c.dict(copy)))
                    c.free(copy)
                elif i < 6:
                    seen.add(uniform(c.dict(view)))
                else:
                    seen.add(uniform(dict(zip(names, c.dict(view, names)))))
        return seen

    seen = set().union(*run_threads(8, work))
    assert seen <= {0.0, 1.0}



def test_copies_never_see_a_test_or_evaluation_half_way_through_renormalising(
    live_server: LiveServer, client: Client
) -> None:
    """An embedding with max_norm renormalises the rows it reads in place, in eval mode too, so
    testrun and evaluate change the module batch by batch. Writers put back rows of norm 10 while
    testruns and evaluations (16 batches each, over every row) and copies run at once: each copy
    sees every row at norm 10 or every row renormalised, never a pass half done, and every testrun
    sees the whole test data from its start (the same matches: renormalising keeps each row's argmax).
    testrun and such an evaluate change the model, so they are serialised with every other call on it."""
    rows, cols = 256, 32
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    weight *= 10 / np.linalg.norm(weight, axis=1, keepdims=True)
    q = client.module(["sequential", ["embed", "e", rows, cols, {"maxnorm": 1.0}]])
    full = client.dict({"e.weight": weight})
    client.copyparms(q, full)
    m = client.model(client.addref(q), client.loss("ce"), client.opt("sgd", q))
    x, y = np.arange(rows, dtype=np.int64), rng.integers(0, cols, rows).astype(np.int64)
    client.test(m, x, y)
    client.test(m, batchsize=16, metrics="matches")
    expected = int(np.sum(weight.argmax(1) == y))

    def norms_of(values: np.ndarray) -> float:
        norms = np.linalg.norm(values, axis=1)
        assert np.allclose(norms, 10, rtol=1e-4) or np.allclose(norms, 1, rtol=1e-4), "a pass half done"
        return 10.0 if norms[0] > 5 else 1.0

    def work(i: int) -> set[Any]:
        seen: set[Any] = set()
        with Client(live_server.address, timeout=TIMEOUT) as c:
            for k in range(20):
                if i < 2:
                    c.copyparms(q, full)
                elif i < 4:
                    seen.add(("matches", int(c.testrun(m))))
                elif i < 5:
                    seen.add(("argmax", tuple(np.asarray(c.evaluate(m, x)).argmax(1))))
                else:
                    copy = c.copyparms(q)
                    seen.add(("norms", norms_of(np.asarray(c.dict(copy)["e.weight"]))))
                    c.free(copy)
        return seen

    seen = set().union(*run_threads(6, work))
    assert {v for k, v in seen if k == "matches"} == {expected}
    assert {v for k, v in seen if k == "argmax"} == {tuple(weight.argmax(1))}
    assert {v for k, v in seen if k == "norms"} <= {10.0, 1.0}


def test_mixed_load_ends_consistent(live_server: LiveServer, client: Client) -> None:
    """12 threads mix copy, average, batchnorm, dictionary updates, addref, free and listings.

    Expected errors are only NOT_FOUND on the victim dictionary, freed midway. At the end every
    average's count is one plus the averages that succeeded into it and its mean is exact; each
    module's batchnorm momentum is restored; the board holds each thread's last write; and the
    live handles are exactly those the test kept.
    """
    threads, steps = 12, 80
    nets, avgs = [], []
    for k in range(3):
        net = client.module(["sequential", ["linear", "a", 3, 2], ["batchnorm1d", "b", 2]])
        for name in client.parmnames(net):
            client.parm(net, name, float(k + 1))
        nets.append(net)
        shapes = client.size(net_copy := client.copyparms(net))
        client.free(net_copy)
        avgs.append(client.dict({n: np.zeros(s, np.float64) for n, s in shapes.items()}))
    victim = client.copyparms(nets[0])
    board = client.dict({})
    kept = {h.handle.id for h in client.handles()} - {victim.id}
    averaged = [[0] * 3 for _ in range(threads)]
    summed = [[0.0] * 3 for _ in range(threads)]
    errors: list[str] = []

    def work(i: int) -> None:
        rng = random.Random(i)
        with Client(live_server.address, timeout=TIMEOUT) as c:
            for step in range(steps):
                if i == 0 and step == steps // 2:
                    c.free(victim)
                op = rng.randrange(8)
                try:
                    if op == 0:
                        k = rng.randrange(3)
                        c.avgparms(nets[k], avgs[k])
                        averaged[i][k] += 1
                        summed[i][k] += k + 1
                    elif op == 1:
                        k = rng.randrange(3)
                        copy = c.copyparms(nets[k])
                        c.copyparms(nets[k], copy)  # loads the same values back: averages stay exact
                        c.free(copy)
                    elif op == 2 and i < 3:
                        # Only thread k resets module k, so its momentum is restored to 0.1 at the end.
                        momenta = c.batchnorm(nets[i])
                        c.batchnorm(nets[i], momenta)
                    elif op == 3:
                        c.dict(board, f"t{i}", float(step))
                    elif op == 4:
                        ref = c.addref(avgs[rng.randrange(3)])
                        c.size(ref)
                        c.free(ref)
                    elif op == 5:
                        c.handles()
                    elif op == 6:
                        try:
                            c.avgparms(nets[0], victim)
                        except NotFoundError:
                            pass
                    else:
                        view = c.parms(nets[rng.randrange(3)])
                        c.dict(view)
                        c.free(view)
                except Exception as exc:  # noqa: BLE001 - collect every unexpected error
                    errors.append(f"thread {i} op {op}: {exc!r}")
            c.dict(board, f"t{i}", float(steps))

    run_threads(threads, work)
    assert errors == []
    for k in range(3):
        count = sum(averaged[i][k] for i in range(threads))
        values = client.dict(avgs[k])
        assert values[".n"] == count + 1
        # Each average folds in parameters equal to k + 1 over an initial zero sample.
        expected = (k + 1) * count / (count + 1)
        for name, v in values.items():
            if name != ".n":
                np.testing.assert_allclose(v, expected, rtol=0, atol=1e-9)
        assert [r.options["momentum"] for r in client.module(nets[k]) if r.module == "batchnorm1d"] == [0.1]
    assert client.dict(board) == {f"t{i}": float(steps) for i in range(threads)}
    live = {h.handle.id for h in client.handles()}
    assert live == kept  # no temporary survived, the victim is gone
    assert len(live_server.registry) == len(kept)


def test_a_forward_output_is_its_own_tensor_whatever_the_module(live_server: LiveServer, client: Client) -> None:
    """A module that only reshapes returns a view of its input; its output handle, under a lock of
    its own, must not share the input's storage, or a shuffled epoch that reorders the model's
    inputs in place (under the model's lock) rewrote the output too (found by review)."""
    m = client.module(["sequential", ["linear", 4, 2]])
    model = client.model(m, client.loss("mse"), client.opt("sgd", m))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    client.train(model, x, np.ones((8, 2), np.float32))
    client.train(model, shuffle=True, batchsize=4)
    inputs = client.input(model)
    outputs = [
        verb(client.module(spec), inputs) for spec in (["identity"], ["flatten"]) for verb in (client.eforward, client.nforward)
    ]
    outputs.append(client.eforward(client.module(["drop", 0.5]), inputs))  # eval mode: x itself
    client.run(model)
    assert not np.array_equal(client.tensor(inputs), x)  # the epoch did reorder the inputs in place
    for out in outputs:
        np.testing.assert_array_equal(client.tensor(out), x)


def test_concurrent_mixed_calls_leave_the_books_exactly_at_zero(start_server: Callable[..., LiveServer]) -> None:
    """10 threads mix every kind of call on shared handles (creates, copies, views, addrefs, averages
    into and out of modules and models, loads, moves, forwards, epochs, part swaps, listings, stats,
    frees), near the byte and handle caps. Only NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION and
    RESOURCE_EXHAUSTED may answer; the charge equals a walk of every object, and once everything is
    freed nothing is held, reserved or listed."""
    server = start_server(max_device_bytes=400_000, max_handles=120)
    spec = ["sequential", ["linear", "a", 16, 8], ["batchnorm1d", "b", 8], ["relu"], ["linear", "c", 8, 4]]
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    y = np.arange(32) % 4
    pool: list[Any] = []
    pool_lock = threading.Lock()
    allowed = (NotFoundError, InvalidArgumentError, FailedPreconditionError, ResourceExhaustedError)

    def pick(rng: random.Random, n: int = 1) -> list[Any] | None:
        with pool_lock:
            return rng.sample(pool, n) if len(pool) >= n else None

    def keep(*handles: Any) -> None:
        with pool_lock:
            pool.extend(handles)

    def step(c: Client, rng: random.Random) -> None:
        op = rng.randrange(16)
        h = pick(rng, 2)
        if op == 0 or h is None:
            keep(c.module(spec))
        elif op == 1:
            m = c.module(spec)
            model = c.model(c.addref(m), c.loss("ce"), c.opt(rng.choice(["sgd", "adam"]), m))
            keep(m, model)
            c.train(model, x, y)
            c.train(model, batchsize=8, shuffle=True)
        elif op == 2:
            c.run(h[0])
        elif op == 3:
            keep(c.copyparms(h[0]))
        elif op == 4:
            keep(rng.choice([c.parms, c.addref, c.input])(h[0]))
        elif op == 5:
            c.avgparms(h[0], h[1])
        elif op == 6:
            c.copyparms(h[0], h[1])
        elif op == 7:
            c.to(h[0], dtype=rng.choice(["float32", "float64"]))
        elif op == 8:
            keep(c.average(h))
        elif op == 9:
            keep(c.forward(h[0], x), c.eforward(c.module(["identity"]), h[1]))
        elif op == 10 and h[0].kind == "model":
            c.model(h[0], c.opt("sgd", h[0]))
        elif op == 11:
            c.dict(h[0], "a.bias", np.ones(8, np.float32))
        elif op == 12:
            c.handles()
            c.stats()
        else:
            with pool_lock:
                gone = pool.pop(rng.randrange(len(pool))) if pool else None
            if gone is not None:
                c.free(gone)

    def work(i: int) -> None:
        rng = random.Random(i)
        with Client(server.address, timeout=TIMEOUT) as c:
            for _ in range(60):
                try:
                    step(c, rng)
                except allowed:
                    pass

    run_threads(10, work)
    assert server.registry.held_bytes() == walked_bytes(server.registry)
    with Client(server.address, timeout=TIMEOUT) as c:
        c.purge()
        assert c.stats()["devices"] == {} and c.handles() == []
    assert server.registry.held_bytes() == {} and len(server.registry) == 0
    assert_nothing_pending(server.registry)
    assert_no_handle_pending(server.registry)
