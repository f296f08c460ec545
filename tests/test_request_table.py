"""Request IDs in process: the store's table (store/requests.py) and the service's use of it.

No gRPC here. The table runs on a clock the test moves, so the window is tested without waiting.
Where a test needs a thread to be waiting inside the table before it goes on, the clock tells it:
the table reads the clock, under its lock, before it decides to wait, so once a thread has read it
that thread waits before anything else can change the table.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from inprocess import caller_session, f32, upload
from weightavg_server.domain.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Ref, Service, Settings
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Kind, Registry
from weightavg_server.store import requests
from weightavg_server.store.requests import (
    CALL_ACTIVE, AnswerNotKept, RequestKey, RequestStats, RequestTable, answer_bytes, comparable, decode, encode,
    parse_saved, scheme,
)

ID = "3f0c6d1e-8a2b-4c5d-9e7f-0123456789ab"
OTHER = "b6a1f0e2-1111-4222-8333-444455556666"
JOIN = 10.0
"""Seconds a test waits for its own threads; a deadlock fails instead of hanging."""


class Clock:
    """A clock the test moves; `watch(thread)` sets an event once that thread has read it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._watched: dict[threading.Thread, threading.Event] = {}

    def __call__(self) -> float:
        event = self._watched.get(threading.current_thread())
        if event is not None:
            event.set()
        return self.now

    def watch(self, thread: threading.Thread) -> threading.Event:
        self._watched[thread] = threading.Event()
        return self._watched[thread]


class Counter:
    """An operation that counts its runs and answers the count."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self) -> int:
        self.runs += 1
        return self.runs


def key(request_id: str = ID, digest: str = "args") -> RequestKey:
    return RequestKey(request_id, lambda: digest)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> RequestTable:
    return RequestTable(window_seconds=60.0, max_ids=100, max_bytes=1 << 20, clock=clock)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """A started-later thread running target; its result or exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    return threading.Thread(target=run, daemon=True), out


# -- the table ------------------------------------------------------------------------------------------


def test_a_repeated_id_gets_the_first_answer_without_running_again(table: RequestTable) -> None:
    op = Counter()
    assert table.answer(key(), "average_parameters", None, op) == 1
    assert table.answer(key(), "average_parameters", None, op) == 1
    assert table.answer(key(ID.upper()), "average_parameters", None, op) == 1  # the same UUID
    assert op.runs == 1
    assert table.stats() == RequestStats(1, 2, 0)


def test_without_an_id_every_call_runs(table: RequestTable) -> None:
    op = Counter()
    assert [table.answer(None, "average_parameters", None, op) for _ in range(3)] == [1, 2, 3]
    assert table.stats().remembered == 0


@pytest.mark.parametrize(
    "request_id, says",
    [
        ("", "not a UUID"), ("not-a-uuid", "not a UUID"), ("3f0c6d1e8a2b4c5d9e7f0123456789ab", "not a UUID"),
        ("{3f0c6d1e-8a2b-4c5d-9e7f-0123456789ab}", "not a UUID"), (ID + "0", "not a UUID"), ("x" * 10000, "not a UUID"),
        ("00000000-0000-0000-0000-000000000000", "all-zero"),
    ],
)
def test_a_malformed_or_all_zero_id_is_invalid_and_nothing_runs(table: RequestTable, request_id: str, says: str) -> None:
    op = Counter()
    with pytest.raises(InvalidArgument, match=says) as err:
        table.answer(key(request_id), "average_parameters", None, op)
    assert op.runs == 0
    assert len(str(err.value)) < 300  # a huge ID is not echoed back whole


@pytest.mark.parametrize(
    "method, session, digest, says",
    [
        ("average_parameters", None, "other args", "with other arguments"),
        ("load_parameters", None, "args", "first used for average_parameters, not load_parameters"),
        ("average_parameters", "ses_other", "args", "in another session"),
    ],
)
def test_the_same_id_for_another_call_is_invalid_and_changes_nothing(
    table: RequestTable, method: str, session: str | None, digest: str, says: str
) -> None:
    op = Counter()
    table.answer(key(), "average_parameters", None, op)
    with pytest.raises(InvalidArgument, match=says) as err:
        table.answer(key(digest=digest), method, session, op)
    assert "each new call needs a new request ID" in str(err.value)
    assert op.runs == 1
    assert table.stats().duplicates_answered == 0


def test_a_deferred_digest_is_computed_only_when_a_repeat_or_a_snapshot_needs_it(table: RequestTable) -> None:
    """A unary call's key defers its digest (transport/requests.key): a first call never computes it."""
    computed: list[str] = []

    def deferred(digest: str) -> RequestKey:
        return RequestKey(ID, lambda: computed.append(digest) or digest, kept_bytes=100)

    run = Counter()
    assert table.answer(deferred("args"), "m", None, run) == 1
    assert computed == []
    assert table.answer(deferred("args"), "m", None, run) == 1  # the repeat's digest and the first's
    assert computed == ["args", "args"]
    with pytest.raises(InvalidArgument, match="other arguments"):
        table.answer(deferred("other"), "m", None, run)
    assert computed == ["args", "args", "other"]  # the first's, once computed, is kept
    assert [r["digest"] for r in table.export()] == ["args"] and run.runs == 1


def test_a_failed_call_is_not_remembered_and_its_retry_runs(table: RequestTable) -> None:
    def fail() -> int:
        raise NotFound("unknown handle")

    with pytest.raises(NotFound):
        table.answer(key(), "average_parameters", None, fail)
    assert table.answer(key(), "average_parameters", None, Counter()) == 1
    assert table.stats() == RequestStats(1, 0, 0)


def test_a_repeat_in_flight_waits_for_the_first_and_gets_its_answer(table: RequestTable, clock: Clock) -> None:
    op, release = Counter(), threading.Event()

    def slow() -> int:
        assert release.wait(JOIN)
        return op()

    first, first_out = in_thread(lambda: table.answer(key(), "average_parameters", None, slow))
    claimed = clock.watch(first)
    first.start()
    assert claimed.wait(JOIN)  # the first holds the ID (see the module docstring)
    repeat, repeat_out = in_thread(lambda: table.answer(key(), "average_parameters", None, op))
    arrived = clock.watch(repeat)
    repeat.start()
    assert arrived.wait(JOIN)  # the repeat is waiting (see the module docstring)
    release.set()
    first.join(JOIN)
    repeat.join(JOIN)
    assert first_out == [1] and repeat_out == [1] and op.runs == 1
    assert table.stats().duplicates_answered == 1


def test_a_repeat_whose_client_is_gone_stops_waiting_and_the_first_still_answers(
    table: RequestTable, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A repeat waited for its first call however long that ran, after its own client had gone: each
    # retry cut off during a long epoch held a server worker thread until the epoch ended.
    monkeypatch.setattr(requests, "WAIT_CHECK_SECONDS", 0.01)
    op, release, client_there = Counter(), threading.Event(), threading.Event()
    client_there.set()

    def slow() -> int:
        assert release.wait(JOIN)
        return op()

    def repeat_call() -> int:
        CALL_ACTIVE.set(client_there.is_set)  # as the transport sets it: the call's context.is_active
        return table.answer(key(), "average_parameters", None, op)

    first, first_out = in_thread(lambda: table.answer(key(), "average_parameters", None, slow))
    claimed = clock.watch(first)
    first.start()
    assert claimed.wait(JOIN)
    repeat, repeat_out = in_thread(repeat_call)
    arrived = clock.watch(repeat)
    repeat.start()
    assert arrived.wait(JOIN)  # the repeat is waiting
    client_there.clear()  # its client is gone (cancelled, or past its deadline)
    repeat.join(JOIN)
    assert not repeat.is_alive(), "the repeat still waits for the first call"
    assert isinstance(repeat_out[0], Cancelled) and "retry with the same ID" in str(repeat_out[0])
    release.set()
    first.join(JOIN)
    assert first_out == [1] and op.runs == 1
    assert table.answer(key(), "average_parameters", None, op) == 1  # a later retry gets the answer


def test_a_repeat_waiting_for_a_first_call_that_fails_runs_in_its_place(table: RequestTable, clock: Clock) -> None:
    op, release = Counter(), threading.Event()

    def failing() -> int:
        assert release.wait(JOIN)
        raise NotFound("the dictionary was freed")

    first, first_out = in_thread(lambda: table.answer(key(), "average_parameters", None, failing))
    claimed = clock.watch(first)
    first.start()
    assert claimed.wait(JOIN)
    repeat, repeat_out = in_thread(lambda: table.answer(key(), "average_parameters", None, op))
    arrived = clock.watch(repeat)
    repeat.start()
    assert arrived.wait(JOIN)
    release.set()
    first.join(JOIN)
    repeat.join(JOIN)
    assert isinstance(first_out[0], NotFound) and repeat_out == [1] and op.runs == 1


def test_an_answer_is_forgotten_once_its_window_has_passed(table: RequestTable, clock: Clock) -> None:
    op = Counter()
    table.answer(key(), "average_parameters", None, op)
    clock.now += 59.9
    assert table.answer(key(), "average_parameters", None, op) == 1
    clock.now += 0.2
    assert table.stats().remembered == 0
    assert table.answer(key(), "average_parameters", None, op) == 2  # runs again
    assert table.stats() == RequestStats(1, 1, 0)  # an expired answer is not counted as dropped


def test_at_the_id_cap_the_oldest_answer_goes_first(clock: Clock) -> None:
    table = RequestTable(window_seconds=60.0, max_ids=2, max_bytes=1 << 20, clock=clock)
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 4)]
    ops = [Counter() for _ in ids]
    for i, op in zip(ids, ops):
        table.answer(key(i), "average_parameters", None, op)
    assert table.stats() == RequestStats(2, 0, 1)
    assert table.answer(key(ids[2]), "average_parameters", None, ops[2]) == 1  # still remembered
    assert table.answer(key(ids[0]), "average_parameters", None, ops[0]) == 2  # forgotten: runs again
    assert table.stats() == RequestStats(2, 1, 2)  # remembering ids[0] again dropped ids[1]


def test_at_a_cap_the_tenant_holding_the_most_gives_up_its_oldest(clock: Clock) -> None:
    """One table serves every tenant: Bob's burst of calls pushed Alice's one ID out, and her
    retried call ran twice (found by review). At a cap the tenant with the most IDs (or bytes) now
    loses its oldest; within one tenant, as before, the oldest goes first."""
    table = RequestTable(window_seconds=60.0, max_ids=3, max_bytes=1 << 20, clock=clock)
    alice, first = "00000000-0000-4000-8000-0000000000a1", Counter()
    table.answer(key(alice), "average_parameters", None, first, tenant="alice")
    bob = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 6)]
    for i in bob:
        table.answer(key(i), "create_loss", None, Counter(), tenant="bob")
    assert table.stats() == RequestStats(3, 0, 3)
    assert table.answer(key(alice), "average_parameters", None, first, tenant="alice") == 1  # answered, not run
    again = Counter()
    table.answer(key(bob[0]), "create_loss", None, again, tenant="bob")
    assert again.runs == 1  # Bob's own oldest went first
    big = torch.zeros(1000)
    table = RequestTable(window_seconds=60.0, max_ids=100, max_bytes=2 * answer_bytes(big) + 2000, clock=clock)
    table.answer(key(alice), "run_epoch", None, lambda: [("loss", big)], tenant="alice")
    for i in bob[:3]:
        table.answer(key(i), "run_epoch", None, lambda: [("loss", big)], tenant="bob")
    assert table.answer(key(alice), "run_epoch", None, lambda: 1 / 0, tenant="alice")[0][0] == "loss"  # kept


def test_the_byte_cap_counts_what_answers_hold(clock: Clock) -> None:
    big = torch.zeros(1000)  # 4000 bytes of data
    table = RequestTable(window_seconds=60.0, max_ids=100, max_bytes=2 * answer_bytes(big) + 2000, clock=clock)
    for i in range(3):
        table.answer(key(f"00000000-0000-4000-8000-00000000000{i + 1}"), "run_epoch", None, lambda: [("loss", big)])
    assert table.stats() == RequestStats(2, 0, 1)


def test_an_answer_over_the_whole_byte_cap_is_not_remembered_and_forgets_no_other(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An epoch whose metrics alone exceed the byte cap used to push out every other remembered ID
    of its tenant, and then itself: the retry of an avgparms whose answer was lost ran twice. Then
    it was not remembered at all, so its own retry trained a second epoch (until 2026-11-28): now
    the table keeps that it ran, and a repeat is refused FAILED_PRECONDITION, naming the flag."""
    big = torch.zeros(10_000)
    table = RequestTable(window_seconds=60.0, max_ids=100, max_bytes=answer_bytes(big) // 2, clock=clock)
    op = Counter()
    assert table.answer(key(), "average_parameters", None, op) == 1
    epoch = Counter()

    def run_epoch() -> list[tuple[str, torch.Tensor]]:
        epoch()
        return [("output", big)]

    with caplog.at_level(logging.WARNING, logger="weightavg.requests"):
        table.answer(key(OTHER), "run_epoch", None, run_epoch)
    assert table.stats() == RequestStats(2, 0, 1)  # the epoch's answer dropped, that it ran kept
    assert "--max-request-id-bytes" in caplog.text
    assert table.answer(key(), "average_parameters", None, op) == 1  # still remembered: not run again
    assert op.runs == 1
    with pytest.raises(FailedPrecondition, match="ran and succeeded.*--max-request-id-bytes"):
        table.answer(key(OTHER), "run_epoch", None, run_epoch)  # its answer was not kept: refused, not run
    assert epoch.runs == 1
    with pytest.raises(InvalidArgument, match="other arguments"):
        table.answer(key(OTHER, "other"), "run_epoch", None, run_epoch)  # still checked as any repeat
    saved = table.export()
    restored = RequestTable(window_seconds=60.0, max_ids=100, max_bytes=answer_bytes(big) // 2, clock=clock)
    assert restored.restore(parse_saved(saved)) == 2
    with pytest.raises(FailedPrecondition):
        restored.answer(key(OTHER), "run_epoch", None, run_epoch)  # after a restart too
    assert epoch.runs == 1
    tiny = RequestTable(window_seconds=60.0, max_ids=100, max_bytes=100, clock=clock)
    tiny.answer(key(OTHER), "run_epoch", None, run_epoch)  # a cap below a bare record keeps nothing
    assert tiny.stats() == RequestStats(0, 0, 1)


def test_a_window_or_cap_of_zero_remembers_nothing(clock: Clock) -> None:
    for window, cap in ((0.0, 10), (60.0, 0)):
        table = RequestTable(window_seconds=window, max_ids=cap, clock=clock)
        op = Counter()
        assert [table.answer(key(), "average_parameters", None, op) for _ in range(2)] == [1, 2]
        with pytest.raises(InvalidArgument):
            table.answer(key("nope"), "average_parameters", None, op)  # IDs are still checked


@pytest.mark.parametrize("window, ids, nbytes", [(-1.0, 1, 1), (math.nan, 1, 1), (math.inf, 1, 1), (1.0, -1, 1), (1.0, 1, -1)])
def test_a_negative_or_non_finite_setting_is_refused(window: float, ids: int, nbytes: int) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        RequestTable(window, ids, nbytes)


def test_a_snapshot_pause_holds_new_calls_back_but_answers_repeats(table: RequestTable, clock: Clock) -> None:
    table.answer(key(), "average_parameters", None, Counter())
    with table.paused():
        assert table.answer(key(), "average_parameters", None, Counter()) == 1  # a repeat changes nothing
        new, out = in_thread(lambda: table.answer(key(OTHER), "average_parameters", None, Counter()))
        arrived = clock.watch(new)
        new.start()
        assert arrived.wait(JOIN)  # it read the clock and is now waiting for the pause to end
        assert not out
    new.join(JOIN)
    assert out == [1]


def test_a_snapshot_pause_waits_for_the_calls_running(table: RequestTable, clock: Clock) -> None:
    release, op = threading.Event(), Counter()

    def slow() -> int:
        assert release.wait(JOIN)
        return op()

    first, _ = in_thread(lambda: table.answer(key(), "average_parameters", None, slow))
    claimed = clock.watch(first)
    first.start()
    assert claimed.wait(JOIN)
    paused = threading.Event()

    def pause() -> None:
        with table.paused():
            paused.set()

    snapshot, _ = in_thread(pause)
    snapshot.start()
    assert not paused.wait(0.05)  # not a timing claim: only that it has not got through yet
    release.set()
    snapshot.join(JOIN)
    assert paused.is_set() and table.stats().remembered == 1


# -- answers survive a snapshot ---------------------------------------------------------------------------

ANSWERS: list[Any] = [
    None, True, False, 0, 7, -(2**62), 1.5, -0.0, "names", [], ["a.weight", "a.bias"], (), ("ses_x", 60.0),
    {"a.weight": True, "b": False}, {"bn": None, "bn2": 0.1}, {"batchsize": 32, "metrics": "loss", "shape": (1, 2)},
    Ref("dic_0123", Kind.DICTIONARY), Kind.MODEL, AnswerNotKept(1 << 40),
    [("loss", torch.tensor([0.5, 0.25])), ("accuracy", torch.tensor(97.5, dtype=torch.float64))],
    [("x", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)), ("b", torch.tensor([True, False])),
     ("e", torch.empty(0, 3)), ("c", torch.tensor([1 + 2j], dtype=torch.complex128))],
]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and (a == b or (a != a and b != b)) and str(a) == str(b)  # str: -0.0 stays -0.0


@pytest.mark.parametrize("answer", ANSWERS, ids=[type(a).__name__ + str(i) for i, a in enumerate(ANSWERS)])
def test_every_kind_of_answer_round_trips_through_json(answer: Any) -> None:
    import json

    assert same(decode(json.loads(json.dumps(encode(answer)))), answer)


def test_nan_and_infinite_momenta_round_trip() -> None:
    import json

    back = decode(json.loads(json.dumps(encode({"a": math.nan, "b": math.inf}))))
    assert math.isnan(back["a"]) and back["b"] == math.inf


def test_export_and_restore_keep_answers_order_and_age(table: RequestTable, clock: Clock) -> None:
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 4)]
    for i, request_id in enumerate(ids):
        table.answer(key(request_id, f"d{i}"), "create_dictionary", "ses_a", lambda i=i: Ref(f"dic_{i}", Kind.DICTIONARY))
        clock.now += 10.0
    saved = table.export()
    assert [r["id"] for r in saved] == ids and [r["age"] for r in saved] == [30.0, 20.0, 10.0]

    later = Clock()
    restored = RequestTable(window_seconds=60.0, max_ids=100, clock=later)
    assert restored.restore(parse_saved(saved), elapsed=35.0) == 2  # ages now 65 (past the window), 55, 45
    op = Counter()
    got = restored.answer(key(ids[1], "d1"), "create_dictionary", "ses_a", op)
    assert got == Ref("dic_1", Kind.DICTIONARY) and op.runs == 0
    with pytest.raises(InvalidArgument, match="other arguments"):
        restored.answer(key(ids[2], "x"), "create_dictionary", "ses_a", op)
    assert restored.answer(key(ids[0], "d0"), "create_dictionary", "ses_a", op) == 1  # forgotten: runs
    later.now += 5.1  # ids[1] is 60.1 s old now
    assert restored.stats().remembered == 2  # ids[2] and ids[0]


def test_a_repeat_remembered_under_an_older_digest_scheme_is_taken_as_the_same_call(clock: Clock) -> None:
    """An upload's digest changed scheme (zlib's CRC-32, untagged, to a tagged CRC-32C): a repeat of a
    first call that an older server remembered and saved cannot be checked, so it gets the answer;
    within one scheme a difference is still refused."""
    saved = [{"id": ID, "method": "create_dictionary", "digest": "ab" * 32, "session": None, "age": 1.0,
              "answer": encode(Ref("dic_1", Kind.DICTIONARY)), "tenant": "default"}]
    table = RequestTable(window_seconds=60.0, max_ids=100, clock=clock)
    assert table.restore(parse_saved(saved)) == 1
    op = Counter()
    assert table.answer(key(ID, "crc32c:" + "cd" * 32), "create_dictionary", None, op) == Ref("dic_1", Kind.DICTIONARY)
    assert op.runs == 0
    table.answer(key(OTHER, "crc32c:" + "cd" * 32), "create_dictionary", None, op)
    with pytest.raises(InvalidArgument, match="other arguments"):
        table.answer(key(OTHER, "crc32c:" + "ef" * 32), "create_dictionary", None, op)
    assert [scheme(d) for d in ("ab" * 32, "crc32c:" + "cd" * 32)] == ["", "crc32c"]
    assert comparable("crc32c:1", "crc32c:2") and not comparable("ab", "crc32c:ab")


def test_an_uploads_digest_is_tagged_and_the_same_however_the_bytes_are_chunked() -> None:
    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg_server.transport.requests import UPLOAD_DIGEST_TAG, StreamDigest

    data = bytes(range(256)) * 40

    def chunks(size: int, payload: bytes = data) -> list[pb.TensorChunk]:
        first = pb.TensorChunk(name="a", dtype=pb.DTYPE_FLOAT32, shape=[len(payload) // 4], data=payload[:size])
        return [first, *(pb.TensorChunk(data=payload[i:i + size]) for i in range(size, len(payload), size))]

    digests = {StreamDigest(b"fields", chunks(size)).digest() for size in (1000, 4096, len(data))}
    assert len(digests) == 1 and next(iter(digests)).startswith(UPLOAD_DIGEST_TAG)
    changed = bytearray(data)
    changed[5000] ^= 1
    assert StreamDigest(b"fields", chunks(4096, bytes(changed))).digest() not in digests
    assert StreamDigest(b"other fields", chunks(4096)).digest() not in digests


def test_an_answer_that_cannot_be_saved_is_left_out_with_an_error(
    table: RequestTable, caplog: pytest.LogCaptureFixture
) -> None:
    table.answer(key(), "odd", None, lambda: object())
    table.answer(key(OTHER), "average_parameters", None, lambda: 2)
    with caplog.at_level(logging.ERROR, "weightavg.requests"):
        assert [r["id"] for r in table.export()] == [OTHER]
    assert "is not saved in the snapshot" in caplog.text


@pytest.mark.parametrize(
    "record",
    [{"id": "nope"}, {"id": ID, "method": "m", "digest": "d", "session": None, "age": 1.0, "answer": {"what": 1}},
     {"id": ID, "method": "m", "digest": "d", "session": None, "age": 1.0, "answer": {"enum": "Unknown", "value": 1}}],
)
def test_a_saved_record_that_is_not_understood_is_refused(record: dict[str, Any]) -> None:
    with pytest.raises((ValueError, KeyError, TypeError, InvalidArgument)):
        parse_saved([record])


# -- the service ------------------------------------------------------------------------------------------


@pytest.fixture
def service() -> Iterator[Service]:
    yield Service(
        Registry(Limits(max_device_bytes=10**9)),
        Settings(device=torch.device("cpu"), max_spec_depth=32, session_lease_seconds=60.0,
                 max_session_lease_seconds=86400.0),
    )


def linear(s: Service) -> str:
    return s.create_module(LayerSpec("linear", args=(3, 2))).id


def test_a_repeated_average_counts_its_sample_once(service: Service) -> None:
    m = linear(service)
    p = service.copy_parameters(m).id
    assert service.average_parameters(m, p, request=key()) == 2
    assert service.average_parameters(m, p, request=key()) == 2
    assert float(service.store.get(p).obj.entries[".n"]) == 2
    assert service.average_parameters(m, p, request=key(OTHER)) == 3  # a new ID is a new call


def test_a_repeat_is_answered_before_its_handles_are_looked_up(service: Service) -> None:
    """A retried free or model creation whose first call consumed the handles still gets its answer."""
    p = service.copy_parameters(linear(service)).id
    assert service.free([p], False, request=key()) == 1
    assert service.free([p], False, request=key()) == 1  # not NOT_FOUND: the first answer
    q = linear(service)
    loss = service.create_loss("mse", (), ()).id
    opt = service.create_optimizer(q, "sgd", (0.1,), ()).id
    model = service.create_model(q, loss, opt, request=key(OTHER))
    assert service.create_model(q, loss, opt, request=key(OTHER)) == model
    with pytest.raises(NotFound):
        service.create_model(q, loss, opt)  # without the ID it is a new call, on handles now gone


def test_a_repeated_upload_is_checked_but_not_received(service: Service) -> None:
    d = service.create_dictionary(upload(("a", f32(3)))).id
    drained: list[str] = []

    def digest() -> str:
        drained.append("read")
        return "upload-digest"

    first = upload(("a", f32(3, start=10.0)))
    assert service.update_dictionary(d, first, request=RequestKey(ID, digest)) == ["a"]
    again = upload(("a", f32(3, start=10.0)))
    assert service.update_dictionary(d, again, request=RequestKey(ID, digest)) == ["a"]
    assert first.calls == 1 and again.calls == 0 and drained == ["read", "read"]
    with pytest.raises(InvalidArgument, match="other arguments"):
        service.update_dictionary(d, upload(("a", f32(3))), request=RequestKey(ID, lambda: "another-digest"))
    assert torch.equal(service.store.get(d).obj.entries["a"], f32(3, start=10.0))


def test_a_repeat_from_another_session_is_invalid(service: Service) -> None:
    session, _ = service.create_session(0.0)
    with caller_session(session):
        d = service.create_dictionary(upload(("a", f32(1))), request=key()).id
    with pytest.raises(InvalidArgument, match="another session"):
        service.create_dictionary(upload(("a", f32(1))), request=key())
    with caller_session(session):
        assert service.create_dictionary(upload(("a", f32(1))), request=key()).id == d


def test_request_id_stats_come_from_the_store(service: Service) -> None:
    m = linear(service)
    service.copy_parameters(m, request=key())
    service.copy_parameters(m, request=key())
    assert service.request_id_stats() == RequestStats(1, 1, 0)


STATE_CHANGING_WITHOUT_IDS = {"keep_alive", "snapshot"}
"""Repeating them has the effect of doing them once: a renewal, and writing the current state."""
RUN_ONLY_FOR_THEIR_ANSWER = {"evaluate", "run_test", "fetch", "fetch_to_shared_memory"}


def test_every_state_changing_service_method_is_exactly_once() -> None:
    """A new operation that changes state must take a request ID (or say here why not)."""
    from test_caps import ALLOCATING, HOLD_NOTHING_NEW

    keyed = {
        name for name, value in vars(Service).items()
        if callable(value) and not name.startswith("_") and "request" in inspect.signature(value).parameters
    }
    assert keyed == (ALLOCATING | HOLD_NOTHING_NEW) - STATE_CHANGING_WITHOUT_IDS - RUN_ONLY_FOR_THEIR_ANSWER
    for name in keyed:
        method = getattr(Service, name)
        assert method.__wrapped__ is not None, f"{name} takes a request but is not @_exactly_once"
        assert inspect.signature(method).parameters["request"].kind is inspect.Parameter.KEYWORD_ONLY


def test_a_repeat_by_another_tenant_is_invalid_and_reveals_nothing(service: Service) -> None:
    """Request IDs are per tenant: another tenant's retry with the same ID neither gets the first
    answer (a handle of another tenant) nor learns which operation it was."""
    from weightavg_server.store.tenants import CALLER, Caller, Role

    token = CALLER.set(Caller("alice", Role.USER))
    try:
        first = service.create_dictionary(upload(("a", f32(1))), request=key())
    finally:
        CALLER.reset(token)
    token = CALLER.set(Caller("bob", Role.USER))
    try:
        with pytest.raises(InvalidArgument) as err:
            service.create_dictionary(upload(("a", f32(1))), request=key())
    finally:
        CALLER.reset(token)
    assert "already used" in str(err.value) and "create_dictionary" not in str(err.value)
    assert first.id not in str(err.value)
