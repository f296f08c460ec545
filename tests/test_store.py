"""The store in process: reservations and caps, accounting by storage, freeing, and sessions.

Every test's registry is checked at teardown: the ledger's held bytes must equal the bytes of
distinct storage walked from the live objects, whatever the test did.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from inprocess import (
    assert_no_handle_pending, assert_nothing_pending, caller_session, f32, fits, tensor_dict, walked_bytes,
)
from weightavg_server.domain import modules
from weightavg_server.domain.errors import InvalidArgument, NotFound, ResourceExhausted
from weightavg_server.domain.tensors import TensorHolder, storage_bytes, storages, tensors_of
from weightavg_server.store.accounting import Ledger, Reservation
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Entry, Kind, Registry, Session, locked
from weightavg_server.store.tenants import CALLER, Caller, Quota, Role

NOTHING: dict[str, int] = {}
LINEAR = (3 * 2 + 2) * 4
"""Bytes of a 3 -> 2 linear layer's float32 weight and bias."""


@pytest.fixture
def store() -> Iterator[Registry]:
    registry = Registry(Limits())
    yield registry
    assert registry.held_bytes() == walked_bytes(registry)


def capped(store: Registry, max_device_bytes: int = 0, max_handles: int = 0) -> None:
    store.set_limits(Limits(max_handles=max_handles, max_device_bytes=max_device_bytes))


def add_dict(store: Registry, **entries: torch.Tensor) -> str:
    d = tensor_dict(**entries)
    return store.create(Kind.DICTIONARY, storage_bytes(storages(tensors_of(d))), lambda: d)


def add_linear(store: Registry) -> str:
    return store.create(Kind.MODULE, {"cpu": LINEAR}, lambda: nn.Linear(3, 2))


def cpu(store: Registry) -> int:
    return store.held_bytes().get("cpu", 0)


# -- reservations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "handles", "nbytes", "flag"),
    [
        (Limits(max_handles=3), 3, 0, "--max-handles"),
        (Limits(max_device_bytes=100), 0, 61, "--max-device-bytes"),
        (Limits(max_handles=3, max_device_bytes=100), 1, 61, "--max-device-bytes"),
    ],
    ids=["handles", "bytes", "bytes with a handle that fits"],
)
def test_reservation_over_a_cap_is_refused_naming_the_flag_and_changes_nothing(
    store: Registry, limits: Limits, handles: int, nbytes: int, flag: str
) -> None:
    add_dict(store, a=torch.zeros(10))  # 1 handle, 40 bytes
    store.set_limits(limits)
    held, live = store.held_bytes(), len(store)

    with pytest.raises(ResourceExhausted, match=flag):
        with store.reserve(handles=handles, nbytes={"cpu": nbytes}):
            pytest.fail("the body of a refused reservation ran")

    assert (store.held_bytes(), len(store)) == (held, live)
    if limits.max_device_bytes:
        assert_nothing_pending(store)
    if limits.max_handles:
        assert_no_handle_pending(store)


def test_a_reservation_grown_past_the_cap_gives_back_what_it_had_reserved(store: Registry) -> None:
    capped(store, max_device_bytes=100, max_handles=2)
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        with store.reserve(handles=1, nbytes={"cpu": 60}) as reservation:
            store.grow(reservation, nbytes={"cpu": 40})  # exactly at the cap: granted
            store.grow(reservation, nbytes={"cpu": 1})
    assert_nothing_pending(store)
    assert_no_handle_pending(store)


@pytest.mark.parametrize("fails", [False, True], ids=["body returns", "body raises"])
def test_a_reservations_leftover_is_released_on_exit(store: Registry, fails: bool) -> None:
    capped(store, max_device_bytes=1000, max_handles=5)

    def body() -> None:
        with store.reserve(handles=2, nbytes={"cpu": 1000}) as reservation:
            d = tensor_dict(a=torch.zeros(10))
            store.add(Kind.DICTIONARY, d, reservation)  # spends one handle and 40 bytes
            assert not fits(store, nbytes=1)
            assert not fits(store, handles=4)  # 1 live + 1 still reserved + 4 > 5
            if fails:
                raise RuntimeError("the call failed after adding")

    if fails:
        with pytest.raises(RuntimeError):
            body()
    else:
        body()
    assert cpu(store) == 40 and len(store) == 1
    assert_nothing_pending(store)
    assert_no_handle_pending(store)


@pytest.mark.parametrize(
    ("limits", "handles", "nbytes", "granted"),
    [
        (Limits(max_device_bytes=1000), 0, 100, 10),
        (Limits(max_handles=7), 1, 0, 7),
        (Limits(max_handles=7, max_device_bytes=550), 1, 100, 5),
    ],
    ids=["bytes", "handles", "both"],
)
def test_concurrent_reservations_cannot_together_overshoot_a_cap(
    store: Registry, limits: Limits, handles: int, nbytes: int, granted: int
) -> None:
    store.set_limits(limits)
    threads = 24
    start = threading.Barrier(threads, timeout=10)
    tried = threading.Barrier(threads, timeout=10)
    results: list[bool] = []
    lock = threading.Lock()

    def attempt() -> None:
        start.wait()
        try:
            with store.reserve(handles=handles, nbytes={"cpu": nbytes}):
                ok = True
                tried.wait()  # hold the reservation until every thread has tried
        except ResourceExhausted:
            ok = False
            tried.wait()
        with lock:
            results.append(ok)

    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=20)
    assert not any(w.is_alive() for w in workers)
    assert len(results) == threads
    assert results.count(True) == granted
    if limits.max_device_bytes:
        assert_nothing_pending(store)
    if limits.max_handles:
        assert_no_handle_pending(store)


# -- accounting by storage --------------------------------------------------------------------------


def test_two_handles_to_one_object_count_its_storage_once_until_the_last_is_freed(store: Registry) -> None:
    module = add_linear(store)
    second, kind = store.addref(module)
    assert kind is Kind.MODULE and second != module
    assert store.held_bytes() == {"cpu": LINEAR}

    store.free([module])
    assert store.held_bytes() == {"cpu": LINEAR}
    assert store.get(second).obj is not None

    store.free([second])
    assert store.held_bytes() == {}


def test_a_live_view_of_module_parameters_counts_the_parameters_once(store: Registry) -> None:
    capped(store, max_device_bytes=LINEAR)  # no room for anything new
    module = add_linear(store)
    entry = store.get(module)
    with store.reading(entry):
        view = store.create(Kind.DICTIONARY, NOTHING, lambda: modules.view_parameters(entry.obj), share=entry)
    assert store.held_bytes() == {"cpu": LINEAR}

    store.free([module])
    assert store.held_bytes() == {"cpu": LINEAR}  # the view keeps the parameters alive
    store.free([view])
    assert store.held_bytes() == {}


def test_a_tensor_viewing_part_of_a_held_storage_adds_nothing(store: Registry) -> None:
    d = add_dict(store, a=torch.zeros(100))
    whole = store.get(d).obj.entries["a"]
    with store.reserve(handles=1) as reservation:
        store.add(Kind.TENSOR, TensorHolder(whole[10:20]), reservation)
    assert store.held_bytes() == {"cpu": 400}
    store.free([d])
    assert store.held_bytes() == {"cpu": 400}  # the slice keeps the whole allocation alive


@pytest.mark.parametrize("fails", [False, True], ids=["body returns", "body raises"])
def test_mutate_that_grows_an_object_recharges_it(store: Registry, fails: bool) -> None:
    d = add_dict(store, a=torch.zeros(10))
    entry = store.get(d)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with store.mutate(entry, need={"cpu": 80}):
            entry.obj.entries["b"] = torch.zeros(20)
            if fails:
                raise RuntimeError("failed after growing")
    assert store.held_bytes() == {"cpu": 120}


def test_mutate_that_replaces_a_tensor_charges_the_new_one_and_releases_the_old(store: Registry) -> None:
    d = add_dict(store, a=torch.zeros(10))
    entry = store.get(d)
    with store.mutate(entry, need={"cpu": 8}):
        entry.obj.entries["a"] = torch.zeros(2)
    assert store.held_bytes() == {"cpu": 8}


def test_mutate_recharges_every_object_sharing_the_lock(store: Registry) -> None:
    module = add_linear(store)
    entry = store.get(module)
    holder = TensorHolder(torch.zeros(0))
    with store.reading(entry):
        tensor = store.create(Kind.TENSOR, NOTHING, lambda: holder, share=entry)
    with store.mutate(entry, need={"cpu": 64}):  # changes the tensor handle's object, not the module's
        holder.tensor = torch.zeros(16)
    assert store.held_bytes() == {"cpu": LINEAR + 64}
    assert store.get(tensor).lock is entry.lock


def test_mutate_over_the_cap_is_refused_before_the_body_runs(store: Registry) -> None:
    d = add_dict(store, a=torch.zeros(10))
    capped(store, max_device_bytes=100)
    ran = []
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        with store.mutate(store.get(d), need=lambda: {"cpu": 61}):
            ran.append(True)
    assert ran == []
    assert store.held_bytes() == {"cpu": 40}
    assert_nothing_pending(store)


def test_a_need_function_is_worked_out_while_the_objects_are_locked(store: Registry) -> None:
    entry = store.get(add_dict(store, a=torch.zeros(1)))
    seen: list[bool] = []

    def need() -> dict[str, int]:
        # The lock is held by this thread if another thread cannot take it now.
        other = threading.Thread(target=lambda: seen.append(entry.lock.acquire(blocking=False)))
        other.start()
        other.join(timeout=10)
        return {}

    with store.mutate(entry, need=need):
        pass
    assert seen == [False]


def test_add_replacing_counts_only_what_is_new(store: Registry) -> None:
    module = add_linear(store)
    extra = add_dict(store, a=torch.zeros(10))
    # No room for another handle or another byte.
    capped(store, max_device_bytes=LINEAR + 40, max_handles=2)
    entry = store.get(module)
    with store.reading(entry), store.reserve() as reservation:
        view = store.add(
            Kind.DICTIONARY, modules.view_parameters(entry.obj), reservation, lock=entry.lock, replacing=(entry,)
        )
    assert sorted(h for h, _ in store.items()) == sorted([view, extra])
    assert store.held_bytes() == {"cpu": LINEAR + 40}
    assert entry.freed
    with pytest.raises(NotFound):
        store.get(module)


def test_add_without_replacing_at_the_handle_cap_is_refused(store: Registry) -> None:
    module = add_linear(store)
    capped(store, max_handles=1)
    entry = store.get(module)
    with pytest.raises(ResourceExhausted, match="--max-handles"):
        with store.reading(entry), store.reserve() as reservation:
            store.add(Kind.DICTIONARY, modules.view_parameters(entry.obj), reservation, lock=entry.lock)
    assert [h for h, _ in store.items()] == [module]


def test_add_replacing_a_freed_entry_is_not_found_and_adds_nothing(store: Registry) -> None:
    module = add_linear(store)
    entry = store.get(module)
    store.free([module])
    with pytest.raises(NotFound, match="freed meanwhile"):
        with store.reserve(handles=1) as reservation:
            store.add(Kind.DICTIONARY, modules.view_parameters(entry.obj), reservation, replacing=(entry,))
    assert len(store) == 0 and store.held_bytes() == {}


def test_add_checks_the_exact_bytes_against_the_cap(store: Registry) -> None:
    """A build that allocates more than its caller reserved is refused when the excess does not fit."""
    capped(store, max_device_bytes=100)
    with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
        store.create(Kind.TENSOR, {"cpu": 40}, lambda: TensorHolder(torch.zeros(26)))  # 104 bytes
    assert len(store) == 0
    assert_nothing_pending(store)
    store.create(Kind.TENSOR, {"cpu": 40}, lambda: TensorHolder(torch.zeros(25)))  # 100 bytes: fits
    assert store.held_bytes() == {"cpu": 100}


# -- the ledger on its own --------------------------------------------------------------------------


def test_ledger_counts_a_storage_held_by_two_objects_once() -> None:
    ledger = Ledger(Limits())
    t = torch.zeros(10)
    a, b = TensorHolder(t), TensorHolder(t[2:5])
    keys = frozenset(storages([t]))
    ledger.hold(a, keys)
    ledger.hold(b, keys)
    assert ledger.held() == {"cpu": 40}
    assert ledger.new_bytes(keys) == {}
    ledger.unhold(a)
    assert ledger.held() == {"cpu": 40}
    ledger.unhold(b)
    assert ledger.held() == {}
    assert ledger.new_bytes(keys) == {"cpu": 40}


def test_ledger_recharge_of_an_object_no_handle_holds_changes_nothing() -> None:
    ledger = Ledger(Limits())
    ledger.recharge(TensorHolder(torch.zeros(1)), frozenset(storages([torch.zeros(4)])))
    assert ledger.held() == {}


def test_ledger_spends_a_reservation_only_as_far_as_it_covers_the_bytes() -> None:
    ledger = Ledger(Limits(max_device_bytes=100))
    reservation = Reservation()
    ledger.reserve(reservation, live_handles=0, handles=0, nbytes={"cpu": 30})
    ledger.spend(reservation, {"cpu": 50})
    assert reservation.nbytes == {"cpu": 0}
    ledger.release(reservation)
    ledger.check(0, 0, {"cpu": 100})  # nothing left reserved: the whole cap is free again
    with pytest.raises(ResourceExhausted):
        ledger.check(0, 0, {"cpu": 101})  # and no more than the cap


# -- freeing ----------------------------------------------------------------------------------------


def test_free_is_all_or_nothing(store: Registry) -> None:
    a = add_dict(store, a=torch.zeros(10))
    b = add_dict(store, b=torch.zeros(5))
    with pytest.raises(NotFound, match="nothing freed"):
        store.free([a, "dic_unknown", b])
    assert sorted(h for h, _ in store.items()) == sorted([a, b])
    assert store.held_bytes() == {"cpu": 60}


def test_free_counts_a_handle_named_twice_once(store: Registry) -> None:
    a = add_dict(store, a=torch.zeros(10))
    assert store.free([a, a]) == 1
    assert len(store) == 0 and store.held_bytes() == {}


def test_freeing_a_freed_handle_is_not_found(store: Registry) -> None:
    a = add_dict(store, a=torch.zeros(10))
    store.free([a])
    with pytest.raises(NotFound):
        store.free([a])


@pytest.mark.parametrize(
    "enter",
    [
        lambda store, entry: store.reading(entry),
        lambda store, entry: store.mutate(entry, need={"cpu": 4}),
        lambda store, entry: locked(entry),
    ],
    ids=["reading", "mutate", "locked"],
)
def test_a_call_that_resolved_its_handle_before_the_free_answers_not_found(
    store: Registry, enter: Callable[[Registry, Entry], contextlib.AbstractContextManager[object]]
) -> None:
    entry = store.get(add_dict(store, a=torch.zeros(10)))
    store.free([store.items()[0][0]])
    assert entry.freed
    with pytest.raises(NotFound, match="freed while this call waited"):
        with enter(store, entry):
            pytest.fail("worked on a freed object")
    assert store.held_bytes() == {}


def test_a_call_racing_a_free_finishes_first_or_answers_not_found(store: Registry) -> None:
    handle = add_dict(store, a=torch.zeros(10))
    entry = store.get(handle)
    outcome: list[object] = []

    def racing_call() -> None:
        try:
            with store.mutate(entry, need=NOTHING):
                outcome.append(("worked on it, freed:", entry.freed))
        except NotFound:
            outcome.append("not found")

    with store.reading(entry):  # a call in flight holds the object; both below wait for it
        caller = threading.Thread(target=racing_call)
        freer = threading.Thread(target=store.free, args=([handle],))
        caller.start()
        freer.start()
        assert not entry.freed  # the free waits for the call in flight
    freer.join(timeout=10)
    caller.join(timeout=10)
    assert entry.freed
    assert outcome in (["not found"], [("worked on it, freed:", False)])


def test_free_all_frees_the_caller_s_session_s_handles_and_purge_every_handle(store: Registry) -> None:
    session, other = store.create_session(60), store.create_session(60)
    loose = add_dict(store, a=torch.zeros(10))
    with caller_session(other):
        theirs = add_dict(store, e=torch.zeros(5))
    with caller_session(session):
        owned = [add_dict(store, b=torch.zeros(5)), add_dict(store, c=torch.zeros(5))]
        assert sorted(h for h, _ in store.visible_items()) == sorted(owned)
        assert store.free_all() == 2
    assert [h for h, _ in store.items()] == [loose, theirs]
    assert store.held_bytes() == {"cpu": 60}
    assert store.purge() == 2  # the operator's purge: every handle, every session's
    assert store.items() == [] and store.held_bytes() == {}


# -- sessions ---------------------------------------------------------------------------------------


def test_closing_a_session_frees_its_handles_and_their_bytes(store: Registry) -> None:
    session = store.create_session(60)
    loose = add_dict(store, a=torch.zeros(10))
    with caller_session(session):
        add_dict(store, b=torch.zeros(5))
        add_linear(store)
        ref, _ = store.addref(loose)  # a second handle, owned by the session
    assert store.close_session(session) == 3
    assert [h for h, _ in store.items()] == [loose]
    assert store.held_bytes() == {"cpu": 40}
    assert ref not in dict(store.items())


def test_expire_ends_only_idle_sessions_whose_lease_ran_out(store: Registry) -> None:
    idle_expired = store.create_session(10)
    busy_expired = store.create_session(10)
    not_expired = store.create_session(1000)
    handles = {}
    for session in (idle_expired, busy_expired, not_expired):
        with caller_session(session):
            handles[session] = add_dict(store, a=torch.zeros(10))
    store.begin_call(busy_expired)

    later = time.monotonic() + 100
    assert store.expire(now=later) == [(idle_expired, 1)]
    assert {s.id for s in store.sessions()} == {busy_expired, not_expired}
    assert sorted(h for h, _ in store.items()) == sorted([handles[busy_expired], handles[not_expired]])

    store.end_call(busy_expired)  # its lease of 10 s now counts from the end of the call
    assert store.expire(now=time.monotonic()) == []
    assert store.expire(now=time.monotonic() + 100) == [(busy_expired, 1)]
    assert store.held_bytes() == {"cpu": 40}


def test_adding_into_an_ended_session_is_not_found_and_charges_nothing(store: Registry) -> None:
    capped(store, max_device_bytes=1000, max_handles=10)
    session = store.create_session(60)
    store.close_session(session)
    built: list[bool] = []

    def build() -> TensorHolder:
        built.append(True)
        return TensorHolder(torch.zeros(10))

    with caller_session(session):
        with pytest.raises(NotFound, match="has ended"):
            store.create(Kind.TENSOR, {"cpu": 40}, build)
    assert built == [True] and len(store) == 0 and store.held_bytes() == {}
    assert_nothing_pending(store)
    assert_no_handle_pending(store)


@pytest.mark.parametrize("call", ["renew", "close_session", "begin_call"])
def test_an_ended_session_is_not_found(store: Registry, call: str) -> None:
    session = store.create_session(60)
    store.close_session(session)
    with pytest.raises(NotFound, match="unknown session"):
        getattr(store, call)(session)


def test_closing_a_session_waits_for_a_call_in_flight_on_its_handles(store: Registry) -> None:
    session = store.create_session(60)
    with caller_session(session):
        entry = store.get(add_dict(store, a=torch.zeros(10)))
    closer = threading.Thread(target=store.close_session, args=(session,))
    with store.mutate(entry, need=NOTHING):  # a call from another caller, in flight on the session's handle
        closer.start()
        closer.join(timeout=1)  # long enough for close_session to run through if it does not wait
        freed_during_call, held_during_call = entry.freed, store.held_bytes()
    closer.join(timeout=10)
    assert not freed_during_call, "the handle was freed while a call was working on it"
    assert held_during_call == {"cpu": 40}


class ContendedLock:
    """An RLock that says when another thread has to wait for it (so a test knows a call is
    waiting without sleeping)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.contended.set()
        return self._lock.acquire(blocking, timeout) if blocking else False

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_closing_a_session_whose_handles_change_while_it_waits_frees_the_new_set(store: Registry) -> None:
    """While CloseSession waits for a busy object of its session, another call frees one of its
    tensor handles and makes another: the close must take the new set, not fail comparing the two
    sets' tensors by value (a RuntimeError, INTERNAL to the client, before entries compared by
    identity)."""
    session = store.create_session(60)
    lock = ContendedLock()

    def tensor(value: float) -> str:
        with store.reserve(handles=1, nbytes={"cpu": 16}) as reservation:
            return store.add(Kind.TENSOR, TensorHolder(torch.full((4,), value)), reservation, lock=lock)  # type: ignore[arg-type]

    with caller_session(session):
        tensor(0.0)
        replaced = tensor(1.0)
    outcome: list[object] = []
    closer = threading.Thread(target=lambda: outcome.append(_outcome(lambda: store.close_session(session))))
    with lock:  # a call in flight on the session's objects
        closer.start()
        assert lock.contended.wait(timeout=30), "close_session never waited for the busy objects"
        store.free([replaced])
        with caller_session(session):
            tensor(2.0)
    closer.join(timeout=30)
    assert outcome == [2]
    assert len(store) == 0 and store.held_bytes() == {}


def _outcome(call: Callable[[], object]) -> object:
    """What a call returned, or the exception it raised."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the test compares it
        return exc


def test_handle_ids_are_unguessable_and_carry_their_kind(store: Registry) -> None:
    a, b = add_dict(store, a=torch.zeros(1)), add_dict(store, a=torch.zeros(1))
    assert a.startswith("dic_") and b.startswith("dic_") and a != b
    assert len(a) == len("dic_") + 32


def test_get_with_the_wrong_kind_names_both_kinds(store: Registry) -> None:
    d = add_dict(store, a=torch.zeros(1))
    with pytest.raises(InvalidArgument, match="expecting module or model handle, given dictionary handle"):
        store.get(d, Kind.MODULE, Kind.MODEL)


def test_a_lent_entry_is_seen_only_inside_its_block_and_never_registered(store: Registry) -> None:
    """What the cluster lends for a source that lives on another rank: found by get() in the block of
    this call only, absent from listings and the ledger, and gone afterwards."""
    from weightavg_server.domain.dictionaries import TensorDict

    lent = Entry(Kind.DICTIONARY, TensorDict({"a": torch.ones(3)}), threading.RLock())
    seen_elsewhere: list[bool] = []
    with store.lend("dic_" + "0" * 32, lent):
        assert store.get("dic_" + "0" * 32, Kind.DICTIONARY) is lent
        other = threading.Thread(target=lambda: seen_elsewhere.append(_found(store, "dic_" + "0" * 32)))
        other.start()
        other.join()
        assert store.items() == [] and store.held_bytes().get("cpu", 0) == 0
    assert seen_elsewhere == [False]
    with pytest.raises(NotFound):
        store.get("dic_" + "0" * 32)


def _found(store: Registry, handle: str) -> bool:
    try:
        store.get(handle)
    except NotFound:
        return False
    return True


def test_tensors_walk_finds_the_same_bytes_as_the_ledger_after_a_mixed_sequence(store: Registry) -> None:
    module = add_linear(store)
    ref, _ = store.addref(module)
    d = add_dict(store, a=f32(4, 4), n=torch.tensor(1.0, dtype=torch.float64))
    entry = store.get(d)
    with store.mutate(entry, need={"cpu": 16}):
        entry.obj.entries["b"] = torch.zeros(4)
        del entry.obj.entries["a"]
    store.free([module])
    assert store.held_bytes() == walked_bytes(store) == {"cpu": LINEAR + 8 + 16}
    store.free([ref, d])
    assert store.held_bytes() == walked_bytes(store) == {}


def test_a_session_ends_with_the_handles_it_still_owns(store: Registry) -> None:
    closing, expiring = store.create_session(60), store.create_session(10)
    handles: dict[str, list[str]] = {}
    for session in (closing, expiring):
        with caller_session(session):
            handles[session] = [add_dict(store, a=torch.zeros(10)) for _ in range(3)]
        store.free([handles[session][1]])  # freed by hand first: the session must not free it again
    kept = add_dict(store, a=torch.zeros(10))
    assert store.close_session(closing) == 2
    assert store.expire(now=time.monotonic() + 20) == [(expiring, 2)]
    assert [h for h, _ in store.items()] == [kept]
    assert store.held_bytes() == walked_bytes(store) == {"cpu": 40}


@contextlib.contextmanager
def as_tenant(name: str) -> Iterator[None]:
    token = CALLER.set(Caller(name, Role.USER))
    try:
        yield
    finally:
        CALLER.reset(token)


def test_sessions_are_capped_by_the_server_and_by_each_tenant_quota(store: Registry) -> None:
    store.set_limits(Limits(max_sessions=4))
    store.set_quotas({"alice": Quota(max_sessions=2)})
    with as_tenant("alice"):
        first, _ = store.create_session(60), store.create_session(60)
        with pytest.raises(ResourceExhausted, match=r"tenant 'alice' holds its quota of 2 open sessions .*max_sessions.*close"):
            store.create_session(60)
    with as_tenant("bob"):  # another tenant is not held back by alice's quota, only by the server's cap
        store.create_session(60), store.create_session(60)
        with pytest.raises(ResourceExhausted, match=r"the server holds its cap of 4 open sessions \(--max-sessions\)"):
            store.create_session(60)
    assert len(store.sessions()) == 4  # the refusals started nothing
    with as_tenant("alice"):
        store.close_session(first)
        store.create_session(60)  # a closed session makes room again
    with as_tenant("bob"):
        assert len(store.expire(now=time.monotonic() + 61)) == 4  # so do those whose lease ran out
        store.create_session(60)
    store.create_session(60, session_id="ses_restored", tenant="alice")  # a restored session was open before
    assert len(store.sessions()) == 2


class _CountedSessions(dict[str, Session]):
    """The registry's session table, counting the sweeps that look through it."""

    looks = 0

    def items(self) -> Any:
        type(self).looks += 1
        return super().items()

    def values(self) -> Any:
        type(self).looks += 1
        return super().values()


def test_a_sweep_before_any_lease_can_run_out_looks_at_no_session(store: Registry) -> None:
    sessions = [store.create_session(60) for _ in range(1000)]
    store._sessions = _CountedSessions(store._sessions)  # every call sweeps: it must not walk them all
    _CountedSessions.looks = 0
    for seconds in (0, 1, 30, 50):  # 50, not 59: the first session was made a moment ago, maybe a slow one
        assert store.expire(now=time.monotonic() + seconds) == []
    assert _CountedSessions.looks == 0
    assert len(store.sessions()) == 1000
    ended = store.expire(now=time.monotonic() + 61)
    assert sorted(ended) == sorted((s, 0) for s in sessions) and store.sessions() == []


def test_a_session_made_after_a_sweep_expires_on_time(store: Registry) -> None:
    long = store.create_session(100)
    assert store.expire(now=time.monotonic() + 50) == []  # the sweep's bound: 100 s from now
    short = store.create_session(1)
    assert store.expire(now=time.monotonic() + 2) == [(short, 0)]
    store.begin_call(long)
    store.end_call(long)
    assert store.expire(now=time.monotonic() + 90) == []  # a stall of 10 s between these lines, not of 1 s
    assert store.expire(now=time.monotonic() + 101) == [(long, 0)]


def test_expiry_leaves_a_session_whose_handle_is_busy_for_a_later_sweep(store: Registry) -> None:
    session = store.create_session(60)
    with caller_session(session):
        entry = store.get(add_dict(store, a=torch.zeros(10)))
    busy, done = threading.Event(), threading.Event()

    def call_in_flight() -> None:  # another caller's call, working on the session's handle
        with store.mutate(entry, need=NOTHING):
            busy.set()
            done.wait(10)

    worker = threading.Thread(target=call_in_flight)
    worker.start()
    assert busy.wait(10)
    assert store.expire(now=time.monotonic() + 120) == []
    assert not entry.freed and store.held_bytes() == {"cpu": 40}
    done.set()
    worker.join(10)
    assert store.expire(now=time.monotonic() + 120) == [(session, 1)]
    assert entry.freed and store.held_bytes() == {}


def test_touch_renews_a_live_session_only_for_a_caller_that_may_see_it(store: Registry) -> None:
    """A keep-alive renews its session where it arrives (SessionInterceptor.gate), before the
    session's tenant is checked on a worker: another tenant's keep-alive must not renew it."""
    with as_tenant("alice"):
        session = store.create_session(60)
    before = next(s.expires for s in store.sessions())
    store.touch(session, Caller("bob", Role.USER))
    store.touch("ses_unknown", Caller("alice", Role.USER))  # no error: it is refused on a worker later
    assert next(s.expires for s in store.sessions()) == before
    store.touch(session, Caller("alice", Role.USER))
    assert next(s.expires for s in store.sessions()) > before
