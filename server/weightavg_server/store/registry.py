"""The store: live objects under opaque random handle IDs, their locks, sessions, and the memory
accounting every allocating call goes through.

Two constructs carry every change, so none can forget the caps:
- `reserve` (with `grow` as an upload's headers arrive) sets bytes and handles aside before anything
  is allocated, and `add` registers a new object, charging what it really holds;
- `mutate` locks the objects a call changes, reserves what the call will allocate, and afterwards
  recharges every object guarded by those locks from the allocations it really reaches.

Each handle belongs to a tenant (store/tenants.py): the caller's, when the handle is made. Every
reservation and charge counts twice, against the server's caps and against the owning tenant's
quota, in a ledger of its own per tenant; another tenant's handles are invisible to a caller that is
not an admin (NOT_FOUND, as if they did not exist), and a reader token changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..domain.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted
from ..domain.shm import Region
from ..domain.tensors import (
    Bytes, HandleSummary, StorageKey, add_bytes, storage_bytes, storages, summarize, tensors_of,
)
from .accounting import Ledger, Reservation
from .limits import Limits
from .requests import CALL_ACTIVE, RequestTable, register_answer_type
from .shm import SharedRegions, close_regions
from . import versions
from .tenants import CALLER, DEFAULT_TENANT, Caller, Quota
from .versions import GroupLock

log = logging.getLogger("weightavg.sessions")

CALLER_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("weightavg_caller_session", default=None)
"""The session of the call being served (set by the session interceptor from call metadata), or None."""

ENDED_CALLS_WAIT_SECONDS = 2.0
"""How long, at most, a call refused for want of room waits for the room that calls which have ended
still hold (`Registry.grow`). gRPC closes the reply of a stream its client cancelled (or broke) on
the stream's worker thread, a moment after the client has gone, and the fetch's copies stay reserved
until then: a fetch sent straight after a cancelled one was refused RESOURCE_EXHAUSTED now and then
(4 of 30 in review, under a cap with room for one fetch). Closing takes milliseconds; a reply still
open after this long is one gRPC left to the garbage collector, and the call is refused."""
CANCEL_SEEN_SECONDS = 0.5
"""How long a refused call also waits for the room of calls that still look live: one its client has
just cancelled is marked so only once gRPC has read the cancel (`_wait_for_ended_calls`). A refusal
for room a live reader holds comes after this long."""
WAIT_SLICE_SECONDS = 0.05
"""How often a waiting call looks whether its own client is still there (gone: it is refused at once)."""


@register_answer_type  # answers holding handles name their kinds, and survive a snapshot
class Kind(enum.Enum):
    """What a handle refers to; the values are the names users see."""

    MODULE = "module"
    MODEL = "model"
    OPTIMIZER = "optimizer"
    LOSS = "loss"
    DICTIONARY = "dictionary"
    TENSOR = "tensor"


MODULE_KINDS = (Kind.MODULE, Kind.MODEL, Kind.OPTIMIZER)
"""Kinds that stand for a module: a model means its module, an optimizer the module it was built from."""

def _kind_hint(wanted: tuple[Kind, ...], given: Kind) -> str:
    """How to make a handle of the wanted kind from the one given, for the mistakes a new user makes
    first: training a bare module (a model wraps it with a loss and an optimizer), averaging into a
    module (the average is a dictionary, made by copyparms). "expecting model handle, given module
    handle" alone named the kinds but not the way from one to the other. The client's verbs come with
    the RPCs they call, for a client generated from the .proto, which has no copyparms."""
    if given is Kind.MODULE and Kind.MODULE not in wanted and (Kind.MODEL in wanted or Kind.OPTIMIZER in wanted):
        if Kind.OPTIMIZER in wanted:
            return (
                "; make an optimizer over the module first: opt('sgd', m, lr) (or a model: model(m, loss, optimizer))"
                " (CreateOptimizer; CreateModel)"
            )
        return "; make a model of the module first: model(m, loss('ce'), opt('sgd', m, lr)) (CreateModel)"
    if wanted == (Kind.DICTIONARY,) and given in MODULE_KINDS:
        return (
            "; copyparms(m) (CopyParameters) copies a module's parameters into a dictionary (averages take the "
            "module first and the dictionary second: avgparms(m, d), ema(m, e); on the wire, the module in "
            "handle and the dictionary in dictionary)"
        )
    return ""


_PREFIXES = {
    Kind.MODULE: "mod", Kind.MODEL: "mdl", Kind.OPTIMIZER: "opt",
    Kind.LOSS: "los", Kind.DICTIONARY: "dic", Kind.TENSOR: "ten",
}


@dataclass(eq=False)
class Entry:
    """One live handle: its kind, the object (shared by addref handles) and the object's lock.

    Objects that share tensors (a module, the model and optimizer built on it, live views of it, a
    model's input) share one lock, so a call that changes one is never concurrent with a call on
    another. `freed` turns true, under the lock, when the handle is freed, so a call that was waiting
    for the lock answers NOT_FOUND instead of working on a freed object.

    Entries compare by identity (eq=False): each is one handle, and two handles to equal-looking
    objects are still two. Compared by value, ending a session whose handles changed while it
    waited compared their objects, and a tensor's `==` is elementwise: `bool()` of it raised, and
    CloseSession (or the expiry sweep of any call) answered INTERNAL (found by review).
    """

    kind: Kind
    obj: Any
    lock: GroupLock
    created: float = field(default_factory=time.monotonic)
    freed: bool = False
    session: str | None = None
    """The session that owns the handle (freed with it), or None: lives until freed."""
    tenant: str = DEFAULT_TENANT
    """The tenant that owns the handle: only its callers (and admins) see it, its quota pays for it."""


@dataclass
class Session:
    """A client's lease: it ends `lease` seconds after its last call unless a call is in flight."""

    id: str
    lease: float
    expires: float
    active: int = 0
    tenant: str = DEFAULT_TENANT
    """The tenant that started it; only its callers (and admins) may use it."""


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant holds now, and its quota."""

    handles: int
    nbytes: Bytes
    quota: Quota
    sessions: int = 0


HANDLE_BITS: contextvars.ContextVar[Callable[[], str] | None] = contextvars.ContextVar(
    "weightavg_handle_bits", default=None
)
"""While set, where new handle IDs take their 128 bits (32 hex digits) from: the cluster sets it to a
generator seeded by rank 0 with fresh random bits, so the ranks of a replicated call create the same
handles, still unguessable."""


def new_handle_id(kind: Kind) -> str:
    """An unguessable ID: 128 random bits behind a short kind prefix that only helps reading logs."""
    bits = HANDLE_BITS.get()
    return f"{_PREFIXES[kind]}_{bits() if bits is not None else secrets.token_hex(16)}"


_LENT: contextvars.ContextVar[Mapping[str, Entry]] = contextvars.ContextVar("weightavg_lent", default={})
"""Handles that resolve, for the call being run only, to entries that are not registered (`Registry.lend`)."""

Need = Mapping[str, int] | Callable[[], Mapping[str, int]]
"""Bytes a call will allocate, by device, or a function that works them out once the locks are held."""


class Changes:
    """A count of the changes to what a snapshot holds (objects, handles, sessions, remembered
    answers), and the count the last complete snapshot held: so a periodic snapshot of a server that
    changed nothing since is not written again (`--snapshot-every` on an idle server rewrote every
    tensor at each interval).

    A change is counted once made, before its locks are released; a snapshot reads the count
    before it takes its cut (`snapshot.save`), so every change counted after that read may be
    missing from the snapshot and leaves the count above the one it saved."""

    __slots__ = ("_lock", "_count", "_saved")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._saved: int | None = None

    def note(self) -> None:
        """One more change made."""
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def saved(self, count: int) -> None:
        """A snapshot that read `count` before its cut is complete on disk (or was just loaded)."""
        with self._lock:
            if self._saved is None or count > self._saved:
                self._saved = count

    def unsaved(self) -> bool:
        """Whether anything changed since the newest complete snapshot (True before any)."""
        with self._lock:
            return self._saved is None or self._count != self._saved


class Registry:
    """Maps handle IDs to entries and session IDs to leases, and accounts for handles and tensor
    bytes against the caps. A handle created while serving a call that carries a session
    (CALLER_SESSION) belongs to that session.

    Lookups and accounting take a short internal lock that is never held while waiting for an
    object's lock; work on objects takes theirs (see `locked`), so the lock order is always object
    locks first, then the internal lock.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        self._groups: dict[int, dict[str, Entry]] = {}
        """Live entries by id of their lock: the objects that may share tensors."""
        self._sessions: dict[str, Session] = {}
        self._open_sessions: dict[str, int] = {}
        """Sessions open per tenant, for its quota's max_sessions."""
        self._by_session: dict[str, dict[str, Entry]] = {}
        """Live entries by the session that owns them, so ending a session never walks every handle."""
        self._due_from = math.inf
        """No idle session's lease runs out before this (monotonic seconds): a lower bound, lowered
        under the lock as a session is made or its last call ends, and set afresh by each sweep that
        looks. Expiries only move later, so a stale read of it is a lower bound still (see `expire`)."""
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        """Notified whenever room is given back (`_release`), for calls waiting on ended calls' room."""
        self._watched: weakref.WeakValueDictionary[int, Reservation] = weakref.WeakValueDictionary()
        """Reservations made for calls (their `active` set), by id: whose room an ended call still holds."""
        self._ledger = Ledger(limits or Limits())
        self.changes = Changes()
        """Changes to what a snapshot holds, so that a periodic one of an unchanged server is skipped."""
        self.requests = RequestTable(on_remember=self.changes.note)
        """Answers remembered by request ID, so a retried call changes state once (requests.py)."""
        self._quotas: dict[str, Quota] = {}
        self._tenants: dict[str, Ledger] = {}
        """One ledger per tenant that has held or reserved anything: its objects' storage, its quota."""
        self._owned: dict[str, int] = {}
        """Live handles per tenant."""
        self.shared = SharedRegions()
        """Shared memory regions registered by sessions; each session's go when it ends (shm.py)."""
        self.on_expiry: list[Callable[[str], None]] = []
        """Called with the ID of each session whose lease ran out, after its handles here were freed
        (outside the locks): a cluster frees what the session made on its other ranks."""

    @property
    def limits(self) -> Limits:
        """The caps in force."""
        return self._ledger.limits

    def set_limits(self, limits: Limits) -> None:
        """Change the caps; what is already held stays, new requests are checked against them."""
        with self._lock:
            self._ledger.limits = limits

    def held_bytes(self) -> Bytes:
        """Bytes of distinct allocations held by live handles, by device."""
        with self._lock:
            return self._ledger.held()

    # -- tenants ------------------------------------------------------------------------------------

    @property
    def quotas(self) -> dict[str, Quota]:
        """Each tenant's quota in force (a copy): what a cluster's rank 0 gives the other ranks."""
        with self._lock:
            return dict(self._quotas)

    def set_quotas(self, quotas: Mapping[str, Quota]) -> None:
        """Each tenant's quota (tenants not named have none); what is held stays, new requests are
        checked against them. A tenant removed from the tokens file keeps its objects and sessions.
        The ledgers of tenants that hold and reserve nothing are dropped here (a tenant's next
        reservation makes its ledger afresh): one was kept for every tenant that ever held
        anything, so the tables grew with every tenant a reload renamed (found by review)."""
        with self._lock:
            self._quotas = dict(quotas)
            for name in [name for name, ledger in self._tenants.items() if ledger.idle()]:
                del self._tenants[name]
            for name, ledger in self._tenants.items():
                ledger.limits = _quota_limits(self._quotas.get(name, Quota()))

    def tenant_usage(self) -> dict[str, TenantUsage]:
        """Per tenant that holds something (a handle, a reservation or a session open) or has a quota:
        its live handles, the bytes of distinct storage they reach by device, its quota and its open
        sessions; sorted by tenant. A tenant that once held something and now holds nothing is not
        listed (its ledger may stay until the next `set_quotas`)."""
        with self._lock:
            held = {name for name, ledger in self._tenants.items() if not ledger.idle()}
            names = sorted(held | set(self._quotas) | set(self._open_sessions))
            return {
                name: TenantUsage(
                    self._owned.get(name, 0),
                    self._tenants[name].held() if name in self._tenants else {},
                    self._quotas.get(name, Quota()),
                    self._open_sessions.get(name, 0),
                )
                for name in names
            }

    def _tenant(self, name: str) -> Ledger:
        """The tenant's ledger, made on first use (internal lock held)."""
        ledger = self._tenants.get(name)
        if ledger is None:
            ledger = self._tenants[name] = Ledger(_quota_limits(self._quotas.get(name, Quota())), tenant=name)
        return ledger

    def _visible(self, entry: Entry) -> bool:
        return CALLER.get().may_see(entry.tenant)

    # -- reserving before allocating ----------------------------------------------------------------

    @contextlib.contextmanager
    def reserve(
        self, handles: int = 0, nbytes: Mapping[str, int] | None = None, *, tenant_quota: bool = True,
    ) -> Iterator[Reservation]:
        """Set aside room for a call, checked against the caps before it allocates anything.

        `add` spends the reservation; whatever is left is released on exit. With tenant_quota=False
        (a snapshot's copies and restore only) the room is checked against the server's caps alone:
        both span every tenant and run as one (the default tenant, or the admin's), whose quota
        paid for all of them, so a `default` tenant with a quota in the tokens file stopped every
        periodic snapshot and a restore that fit (found by review).

        Raises:
            ResourceExhausted: the handles or bytes would not fit.
        """
        reservation = Reservation(
            tenant=CALLER.get().tenant, quota=Reservation(), tenant_quota=tenant_quota, active=CALL_ACTIVE.get(),
        )
        try:
            self.grow(reservation, handles, nbytes)
            yield reservation
        finally:
            self._release(reservation)

    def _release(self, reservation: Reservation) -> None:
        """Give back what is left of a reservation, in the server's ledger and its tenant's."""
        with self._lock:
            self._ledger.release(reservation)
            if reservation.tenant is not None and reservation.quota is not None:
                self._tenant(reservation.tenant).release(reservation.quota)
            self._released.notify_all()

    def grow(self, reservation: Reservation, handles: int = 0, nbytes: Mapping[str, int] | None = None) -> None:
        """Add to a reservation (e.g. as each tensor's header of an upload arrives), checked against
        the server's caps and the tenant's quota; a refusal by either sets nothing aside.

        Where the room is missing only because calls that have ended (their clients cancelled or
        their replies finished; `Reservation.active`) have not given theirs back yet, it waits for
        that room, at most `ENDED_CALLS_WAIT_SECONDS` and never once its own client has gone; a
        refusal that such room would not cure comes at once."""
        wanted = {device: n for device, n in (nbytes or {}).items() if n > 0}
        if not handles and not wanted and reservation.quota is not None:
            return  # nothing to add to a reservation already set up (the arena's later tensors)
        refused: float | None = None
        while True:
            try:
                with self._lock:
                    self._grow(reservation, handles, wanted)
                return
            except ResourceExhausted:
                refused = refused if refused is not None else time.monotonic()
                if not self._wait_for_ended_calls(reservation, handles, wanted, refused):
                    raise

    def _wait_for_ended_calls(self, reservation: Reservation, handles: int, wanted: Bytes, refused: float) -> bool:
        """Wait a moment for the room of calls that have ended, if giving it back would let `reservation`
        grow: True to try again, False to refuse now (no such room would do, `ENDED_CALLS_WAIT_SECONDS`
        have passed since the first refusal at `refused`, or this call's own client has gone). For
        the first `CANCEL_SEEN_SECONDS`, the room of calls that still look live counts too: a cancel
        reaches the server a moment after the client sent it, and a fetch sent straight after one
        found the cancelled call live and was refused at once (1 in 5 runs of the test below)."""
        own = CALL_ACTIVE.get()
        with self._lock:
            holding = [r for r in list(self._watched.values()) if r is not reservation and _holds_room(r)]
        # gRPC's is_active takes the call's own lock: asked outside the store's lock
        calls = [r for r in holding if r.active is not None]
        waited = time.monotonic() - refused
        ended = calls if waited < CANCEL_SEEN_SECONDS else [r for r in calls if r.active is not None and not r.active()]
        if not ended or waited >= ENDED_CALLS_WAIT_SECONDS or (own is not None and not own()):
            return False
        with self._lock:
            ended = [r for r in ended if _holds_room(r)]
            if not ended:
                return True  # given back meanwhile
            if not self._fits_without(ended, reservation, handles, wanted):
                return False
            left = refused + ENDED_CALLS_WAIT_SECONDS - time.monotonic()
            self._released.wait(max(0.0, min(WAIT_SLICE_SECONDS, left)))
        return True

    def _fits_without(self, ended: list[Reservation], reservation: Reservation, handles: int, wanted: Bytes) -> bool:
        """Whether `handles` and `wanted` would fit in `reservation` once the `ended` reservations are
        given back, under the server's caps and its tenant's quota (internal lock held)."""
        name = reservation.tenant if reservation.tenant is not None else CALLER.get().tenant
        quotas = [r.quota for r in ended if r.tenant == name and r.quota is not None]
        try:
            self._ledger.check(
                len(self._entries), handles, wanted, add_bytes(*(r.nbytes for r in ended)),
                sum(r.handles for r in ended),
            )
            if reservation.tenant_quota:
                self._tenant(name).check(
                    self._owned.get(name, 0), handles, wanted, add_bytes(*(q.nbytes for q in quotas)),
                    sum(q.handles for q in quotas),
                )
        except ResourceExhausted:
            return False
        return True

    def _grow(self, reservation: Reservation, handles: int, wanted: Bytes) -> None:
        """`grow` once, refused or not (internal lock held)."""
        if reservation.tenant is None:
            reservation.tenant = CALLER.get().tenant
        if reservation.quota is None:
            reservation.quota = Reservation()
        tenant = self._tenant(reservation.tenant)
        owned = self._owned.get(reservation.tenant, 0)
        self._ledger.check(len(self._entries), handles, wanted)
        if reservation.tenant_quota:
            tenant.check(owned, handles, wanted)
        self._ledger.reserve(reservation, len(self._entries), handles, wanted)
        if reservation.tenant_quota:
            tenant.reserve(reservation.quota, owned, handles, wanted)
        if reservation.active is not None:
            self._watched[id(reservation)] = reservation

    def mutate(
        self, *entries: Entry, need: Need, reading: tuple[Entry, ...] = (), in_place: Callable[[], bool] | None = None,
        etag: str = "",
    ) -> contextlib.AbstractContextManager[Reservation]:
        """The one way to change held objects: lock them (and `reading`, objects the change only
        reads), check `etag` (when given) against the first entry's, reserve what the change will
        allocate (`need`, worked out under the locks when it is a function), and afterwards, failed
        or not, recharge every object that shares the locks of `entries` from the allocations it
        really reaches, and give their groups new versions (`versions`).

        `in_place`, asked on the way out, says that the change only wrote into tensors the objects
        already held (no tensor added, removed or replaced, so every object still reaches the same
        allocations): the recharge, a walk of every tensor of every such object, is skipped. It must
        be true only then: tests/test_caps.py checks the ledger against a fresh walk after each
        verb that says so.

        Raises:
            NotFound: a handle was freed while this call waited for its lock.
            Aborted: `etag` is not the first entry's current one; nothing was changed.
            ResourceExhausted: the change would not fit under the caps; nothing was changed.
            PermissionDenied: the caller's token is a reader's.
        """
        return _Mutation(self, entries, need, reading, in_place, etag)

    def reading(self, *entries: Entry) -> contextlib.AbstractContextManager[None]:
        """Lock objects for a call that changes nothing they hold.

        Raises:
            NotFound: a handle was freed while this call waited for its lock.
        """
        return locked(*entries)

    def create(self, kind: Kind, need: Mapping[str, int], build: Callable[[], Any], *, share: Entry | None = None) -> str:
        """Reserve a handle and `need` bytes, build the object, and register it.

        With `share`, the new object joins that entry's lock (a view, an optimizer or a model over
        its module); the caller holds that lock.
        """
        with self.reserve(handles=1, nbytes=need) as reservation:
            return self.add(kind, build(), reservation, lock=share.lock if share is not None else None)

    def recharge(self, *entries: Entry) -> None:
        """Recharge now, before `mutate` does on its way out, every object guarded by these entries'
        locks (the caller holds them): for a change that then frees handles whose objects the changed
        one took over (UpdateModel), so that their bytes are never counted nowhere in between."""
        self._recharge({id(e.lock) for e in entries})

    def _recharge(self, lock_ids: set[int]) -> None:
        """Recharge every object guarded by one of these locks (their holders hold the locks), in the
        server's ledger and in the ledger of each tenant with a handle to it."""
        with self._lock:
            entries = [e for lock in lock_ids for e in self._groups.get(lock, {}).values()]
        if len(entries) == 1:  # the usual: one handle to the object changed
            entry = entries[0]
            reached = frozenset(storages(tensors_of(entry.obj)))
            with self._lock:
                self._ledger.recharge(entry.obj, reached)
                self._tenant(entry.tenant).recharge(entry.obj, reached)
            return
        objs = {id(e.obj): e.obj for e in entries}
        owners: dict[int, set[str]] = {}
        for e in entries:
            owners.setdefault(id(e.obj), set()).add(e.tenant)
        keys = {key: frozenset(storages(tensors_of(obj))) for key, obj in objs.items()}
        with self._lock:
            for key, obj in objs.items():
                self._ledger.recharge(obj, keys[key])
                for tenant in owners[key]:
                    self._tenant(tenant).recharge(obj, keys[key])

    # -- handles ------------------------------------------------------------------------------------

    def add(
        self,
        kind: Kind,
        obj: Any,
        reservation: Reservation,
        *,
        lock: GroupLock | None = None,
        replacing: tuple[Entry, ...] = (),
        handle_id: str | None = None,
        session: str | None = None,
        tenant: str | None = None,
    ) -> str:
        """Register obj under a new handle, charging the allocations it reaches that no live object
        holds yet (and, in its tenant's ledger, that no object of the tenant holds), and return the
        handle's ID.

        Args:
            reservation: room set aside by `reserve`; it pays for the handle and the bytes.
            lock: another object's lock to share (addref handles, views, objects over a module).
            replacing: entries whose handles go in the same step (a model takes its parts' handles),
                so the check counts only what is really new.
            handle_id: only for restoring a snapshot.
            session: the owning session (default: the caller's; None outside a session).
            tenant: only for restoring a snapshot: the owning tenant, charged without checking its
                quota (the objects were held before). Default: the reservation's (the caller's).

        Raises:
            ResourceExhausted: over a cap or the tenant's quota (checked here with the exact bytes).
            NotFound: the session has ended (the object is then dropped).
            PermissionDenied: the caller's token is a reader's.
        """
        CALLER.get().require_writer("creating a handle")
        owner = session if session is not None else CALLER_SESSION.get()
        if reservation.tenant is None:
            reservation.tenant = CALLER.get().tenant
        if reservation.quota is None:
            reservation.quota = Reservation()
        paid_by = tenant if tenant is not None else reservation.tenant
        entry = Entry(kind, obj, lock if lock is not None else GroupLock(), session=owner, tenant=paid_by)
        handle = handle_id or new_handle_id(kind)
        keys = frozenset(storages(tensors_of(obj)))
        with self._lock:
            if owner is not None and owner not in self._sessions:
                raise NotFound(f"session '{owner}' has ended (lease expired or closed); nothing created")
            if handle in self._entries:
                raise InvalidArgument(f"handle '{handle}' already exists")
            gone = [e for e in replacing if e.freed]
            if gone:
                raise NotFound(f"the {gone[0].kind.value} handle was freed meanwhile; nothing changed")
            reserved_slot = reservation.handles > 0
            new = {} if self._ledger.is_held(obj) else self._ledger.new_bytes(keys)
            self._ledger.check(len(self._entries) - len(replacing), 0 if reserved_slot else 1, new, reservation.nbytes)
            ledger = self._tenant(paid_by)
            quota_checked = paid_by == reservation.tenant and reservation.tenant_quota
            quota = reservation.quota if quota_checked else Reservation()
            tenant_new = {} if ledger.is_held(obj) else ledger.new_bytes(keys)
            if quota_checked:
                ledger.check(
                    self._owned.get(paid_by, 0) - sum(1 for e in replacing if e.tenant == paid_by),
                    0 if quota.handles > 0 else 1, tenant_new, quota.nbytes,
                )
            if reserved_slot:
                reservation.handles -= 1
                self._ledger.pending_handles -= 1
            if quota.handles > 0:
                quota.handles -= 1
                ledger.pending_handles -= 1
            self._ledger.spend(reservation, new)
            ledger.spend(quota, tenant_new)
            self._ledger.hold(obj, keys)
            ledger.hold(obj, keys)
            self._entries[handle] = entry
            if owner is not None:
                self._by_session.setdefault(owner, {})[handle] = entry
            self._owned[paid_by] = self._owned.get(paid_by, 0) + 1
            self._groups.setdefault(id(entry.lock), {})[handle] = entry
            for old in replacing:
                self._remove(self._handle_of(old), old)
            self.changes.note()
        return handle

    def _handle_of(self, entry: Entry) -> str:
        """The handle ID of a live entry (internal lock held)."""
        return next(h for h, e in self._groups[id(entry.lock)].items() if e is entry)

    def get(self, handle: str, *kinds: Kind) -> Entry:
        """The entry for handle; NotFound when unknown or freed, InvalidArgument when of the wrong kind."""
        if not handle:  # a generated client's default for a field it did not set
            takes = f"a handle of kind {' or '.join(k.value for k in kinds)}" if kinds else "a handle"
            raise InvalidArgument(
                f"no handle given: an empty id where the call takes {takes}; pass the id a call returned"
            )
        entry = _LENT.get().get(handle)
        if entry is None:
            with self._lock:
                entry = self._entries.get(handle)
        if entry is None or not self._visible(entry):  # another tenant's handle does not exist for the caller
            raise NotFound(f"unknown handle '{handle}' (never created, or already freed)")
        if kinds and entry.kind not in kinds:
            wanted = " or ".join(k.value for k in kinds)
            raise InvalidArgument(
                f"expecting {wanted} handle, given {entry.kind.value} handle '{handle}'{_kind_hint(kinds, entry.kind)}"
            )
        return entry

    @contextlib.contextmanager
    def lend(self, handle: str, entry: Entry) -> Iterator[None]:
        """Within the block, and for this call only, `get(handle)` is `entry`: a copy of an object
        that lives on another rank, brought here for one verb of the cluster (cluster.py). It is
        never registered, so no other call, listing or snapshot sees it; the caller holds a
        reservation for its bytes while the block runs."""
        token = _LENT.set({**_LENT.get(), handle: entry})
        try:
            yield
        finally:
            _LENT.reset(token)

    def handles_sharing(self, lock: GroupLock, besides: tuple[Entry, ...] = ()) -> list[str]:
        """Handles whose objects are guarded by `lock`, other than `besides` (another tenant's, which
        the caller may not learn, as "a handle of another tenant")."""
        with self._lock:
            group = self._groups.get(id(lock), {})
            return [
                h if self._visible(e) else "a handle of another tenant"
                for h, e in group.items() if not any(e is b for b in besides)
            ]

    def objects_sharing(self, lock: GroupLock) -> list[object]:
        """The objects guarded by `lock`: those that stand on one module (its handles, optimizers,
        models, views), which a move of the module must carry along (`domain.moves.group`)."""
        with self._lock:
            return [e.obj for e in self._groups.get(id(lock), {}).values()]

    def addref(self, handle: str) -> tuple[str, Kind]:
        """A second handle to the same object, sharing its lock, owned by the caller's session; never
        one to an object being freed."""
        entry = self.get(handle)
        with locked(entry), self.reserve(handles=1) as reservation:
            return self.add(entry.kind, entry.obj, reservation, lock=entry.lock), entry.kind

    def free(self, handles: list[str]) -> int:
        """Release handles, all or nothing: every one must exist (duplicates count once).

        Waits for calls in flight on the objects, so a call either finishes before the free or
        answers NOT_FOUND; it never works on a freed object.
        """
        CALLER.get().require_writer("freeing handles")
        unique = list(dict.fromkeys(handles))
        with self._lock:
            found = [(h, e if e is not None and self._visible(e) else None) for h in unique for e in [self._entries.get(h)]]
        missing = [h for h, e in found if e is None]
        if missing:
            raise NotFound(f"unknown handle '{missing[0]}' (never created, or already freed); nothing freed")
        entries = [(h, e) for h, e in found if e is not None]
        with locked(*(e for _, e in entries)), self._lock:
            gone = [h for h, e in entries if self._entries.get(h) is not e]
            if gone:
                raise NotFound(f"handle '{gone[0]}' was freed meanwhile; nothing freed")
            for h, e in entries:
                self._remove(h, e)
        return len(entries)

    def free_all(self) -> int:
        """Release every handle the caller can list (its tenant's, of its session or of no session),
        each once its calls in flight have finished."""
        CALLER.get().require_writer("freeing handles")
        return self._free_entries(self.visible_items())

    def purge(self, tenant: str | None = None) -> int:
        """Admins only: release every handle of `tenant` (e.g. a tenant whose tokens were removed),
        or with None every handle on the server, in every session, each once its calls in flight
        have finished; how many."""
        what = f"freeing every handle of tenant '{tenant}'" if tenant is not None else "freeing every handle"
        CALLER.get().require_admin(what)
        return self._free_entries([(h, e) for h, e in self.items() if tenant is None or e.tenant == tenant])

    def release(self, handles: Sequence[str]) -> list[str]:
        """The server's own clean-up, asked for by no caller (a cluster rank freeing what an ended
        session made there): free whichever of these handles exist, of any tenant, each once its calls
        in flight have finished; the handles freed. Handles that are gone already are skipped."""
        with self._lock:
            entries = [(h, e) for h in dict.fromkeys(handles) if (e := self._entries.get(h)) is not None]
        with locked(*(e for _, e in entries), check_live=False), self._lock:
            live = [(h, e) for h, e in entries if self._entries.get(h) is e]
            for h, e in live:
                self._remove(h, e)
        return [h for h, _ in live]

    def has_session(self, session_id: str) -> bool:
        """Whether the session is still open (neither closed nor expired)."""
        with self._lock:
            return session_id in self._sessions

    def _free_entries(self, entries: list[tuple[str, Entry]]) -> int:
        with locked(*(e for _, e in entries), check_live=False), self._lock:
            live = [(h, e) for h, e in entries if self._entries.get(h) is e]
            for h, e in live:
                self._remove(h, e)
        return len(live)

    def _remove(self, handle: str, entry: Entry) -> None:
        """Drop one handle and, with its object's last handle, the object's allocations (lock held)."""
        del self._entries[handle]
        if entry.session is not None:
            owned = self._by_session[entry.session]
            del owned[handle]
            if not owned:
                del self._by_session[entry.session]
        group = self._groups[id(entry.lock)]
        del group[handle]
        if not group:
            del self._groups[id(entry.lock)]
        entry.freed = True
        self._ledger.unhold(entry.obj)
        self._tenant(entry.tenant).unhold(entry.obj)
        left = self._owned[entry.tenant] - 1
        if left:
            self._owned[entry.tenant] = left
        else:
            del self._owned[entry.tenant]
        self.changes.note()

    def describe(self, entry: Entry) -> HandleSummary | None:
        """A summary for a listing, without waiting for a busy object; None once the handle is freed.

        An idle object is summarized under its lock. A busy one (say, training) is described by what
        the store charges it (its devices and bytes as of its last recharge; no dtype or tensor
        count), and none of its tensors is touched: the call in flight changes them without the GIL
        (autograd sets gradients, batching narrows data in place), and a listing that walked them
        read a gradient as a backward pass replaced it and crashed the server (found by review).
        """
        if entry.lock.acquire(blocking=False):
            try:
                return None if entry.freed else replace(summarize(entry.obj), etag=versions.etag(entry.lock))
            finally:
                entry.lock.release()
        keys = self.charged(entry)
        if entry.freed:
            return None
        # The version before the change in flight, which renews it when it ends: a conditional change
        # with this etag is then refused, as it should be.
        return HandleSummary(
            device=",".join(sorted({device for device, _, _ in keys})), dtype=None,
            nbytes=sum(storage_bytes(keys).values()), tensor_count=0,
            ema=entry.obj.ema if entry.kind is Kind.DICTIONARY else None, etag=versions.etag(entry.lock),
        )

    def charged(self, entry: Entry) -> frozenset[StorageKey]:
        """The allocations the entry's object was charged for at its last recharge: what a reader
        that may not wait for the object's lock (a listing, a stats scrape) reports of a busy one."""
        with self._lock:
            return self._ledger.keys_of(entry.obj)

    def items(self) -> list[tuple[str, Entry]]:
        """A snapshot of every live handle, oldest first."""
        with self._lock:
            return sorted(self._entries.items(), key=lambda item: item[1].created)

    def visible_items(self, all_tenants: bool = False) -> list[tuple[str, Entry]]:
        """Live handles listed to the caller, oldest first: its tenant's, of its session or of no
        session. With `all_tenants` (admins only), every live handle.

        Raises:
            PermissionDenied: all_tenants for a caller that is not an admin.
        """
        if all_tenants:
            CALLER.get().require_admin("listing every tenant's handles")
            return self.items()
        owner, tenant = CALLER_SESSION.get(), CALLER.get().tenant
        return [(h, e) for h, e in self.items() if e.session == owner and e.tenant == tenant]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(self, lease: float, session_id: str | None = None, tenant: str | None = None) -> str:
        """Start a session of the caller's tenant whose lease is `lease` seconds; `session_id` and
        `tenant` only when restoring a snapshot (a restored session was open before: no cap refuses it).

        Raises:
            ResourceExhausted: the server holds its cap of sessions (--max-sessions), or the tenant
                its quota's max_sessions; nothing is started.
        """
        caller = CALLER.get()
        caller.require_writer("starting a session")
        sid = session_id or f"ses_{secrets.token_hex(16)}"
        owner = tenant or caller.tenant
        with self._lock:
            if session_id is None:
                self._check_session_room(owner)
            session = Session(sid, lease, time.monotonic() + lease, tenant=owner)
            self._sessions[sid] = session
            self._open_sessions[owner] = self._open_sessions.get(owner, 0) + 1
            self._due_from = min(self._due_from, session.expires)
            self.changes.note()
        return sid

    def _check_session_room(self, tenant: str) -> None:
        """ResourceExhausted unless one more session fits the server's cap and the tenant's quota (lock held)."""
        cap = self._ledger.limits.max_sessions
        if cap > 0 and len(self._sessions) >= cap:  # as max_handles: 0 or less is no cap
            raise ResourceExhausted(
                f"the server holds its cap of {cap} open sessions (--max-sessions); close the sessions you no "
                "longer use (Client.close(), CloseSession) or let their leases run out first"
            )
        quota = self._quotas.get(tenant, Quota()).max_sessions
        if quota > 0 and self._open_sessions.get(tenant, 0) >= quota:
            raise ResourceExhausted(
                f"tenant '{tenant}' holds its quota of {quota} open sessions (max_sessions in the tokens file); "
                "close the sessions it no longer uses (Client.close(), CloseSession) or let their leases run out first"
            )

    def _forget_session(self, session_id: str) -> None:
        """Drop an ended session's record (lock held)."""
        tenant = self._sessions.pop(session_id).tenant
        self.changes.note()
        left = self._open_sessions[tenant] - 1
        if left:
            self._open_sessions[tenant] = left
        else:
            del self._open_sessions[tenant]

    def sessions(self) -> list[Session]:
        """Every live session (copies of their records)."""
        with self._lock:
            return [Session(s.id, s.lease, s.expires, s.active, s.tenant) for s in self._sessions.values()]

    def renew(self, session_id: str) -> float:
        """Push a session's expiry a full lease from now; returns the lease. NotFound once it has ended."""
        with self._lock:
            session = self._live_session(session_id)
            session.expires = time.monotonic() + session.lease
            return session.lease

    def touch(self, session_id: str, caller: Caller) -> None:
        """Renew a session a full lease from now if it is live and `caller` may see it; nothing
        otherwise (no error: this runs where a call arrives, before any check answers it).

        A keep-alive renews its session here on arrival, on gRPC's polling thread, before it waits
        for a worker: with every worker busy (long epochs) the keep-alives of a live client waited
        in the queue while its lease ran out, and the reaper freed its handles (found by review).
        """
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and caller.may_see(session.tenant):
                session.expires = max(session.expires, time.monotonic() + session.lease)

    def begin_call(self, session_id: str) -> None:
        """A call carrying the session started: renew it and keep it alive until `end_call`."""
        with self._lock:
            session = self._live_session(session_id)
            session.active += 1
            session.expires = time.monotonic() + session.lease

    def end_call(self, session_id: str) -> None:
        """A call carrying the session ended: its lease counts from now."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.active -= 1
                session.expires = time.monotonic() + session.lease
                if session.active == 0:
                    self._due_from = min(self._due_from, session.expires)

    def register_region(self, session_id: str, name: str, region: Region) -> None:
        """Hold `region` as the caller's session's region `name`, replacing any of that name.

        The session is looked up under the store's lock, as `close_session` and `expire` take its
        regions: a registration that races with the session's end is either taken with it or refused
        (NotFound), never left mapped with no session to end it. `region` is closed if refused.
        """
        tenant = CALLER.get().tenant
        with self._lock:
            try:
                self._live_session(session_id)
            except NotFound:
                region.close()  # new: no copy can be running in it
                raise
            replaced = self.shared.register(tenant, session_id, name, region)
        if replaced is not None:
            close_regions([replaced])  # outside the lock: closing waits for the region's copies

    def close_session(self, session_id: str) -> int:
        """End a session and free every handle it owns, each once its calls in flight have finished;
        returns how many were freed."""
        CALLER.get().require_writer("closing a session")
        while True:
            with self._lock:
                self._live_session(session_id)
                owned = self._session_entries(session_id)
            with locked(*owned, check_live=False), self._lock:
                self._live_session(session_id)
                if self._session_entries(session_id) != owned:
                    continue  # a handle joined the session while this call waited: lock it too
                self._forget_session(session_id)
                regions = self.shared.take_session(session_id)
                freed = self._drop(owned)
            close_regions(regions)  # outside the locks: closing waits for the regions' copies
            return freed

    def expire(self, now: float | None = None) -> list[tuple[str, int]]:
        """End sessions whose lease ran out with no call in flight, freeing their handles.

        A session whose objects are busy with another caller's call is left for a later sweep, so
        the sweep never waits and never frees an object a call is working on. Returns (session id,
        handles freed) for each session ended; each is also logged.

        Every call sweeps, so a sweep before any lease can have run out (`_due_from`) returns at once,
        without the lock: a server's calls cost the same with ten thousand sessions as with none.
        The sweep that looks at the sessions sets that bound afresh, from the idle ones it leaves
        (one due but busy keeps it due, so the next call looks again).
        """
        if not self._sessions:  # without sessions, no lock (a stale read waits a sweep)
            return []
        now = time.monotonic() if now is None else now
        if now < self._due_from:
            return []
        with self._lock:
            due = [sid for sid, s in self._sessions.items() if s.active == 0 and s.expires <= now]
            if not due:
                self._due_from = _earliest_idle_expiry(self._sessions)
        ended: list[tuple[str, int]] = []
        regions: list[Region] = []
        for sid in due:
            with self._lock:
                owned = self._session_entries(sid)
            with _try_locked(owned) as idle, self._lock:
                session = self._sessions.get(sid)
                if not idle or session is None or session.active or session.expires > now:
                    continue
                if self._session_entries(sid) != owned:
                    continue
                self._forget_session(sid)
                regions.extend(self.shared.take_session(sid))
                ended.append((sid, self._drop(owned)))
        if due:
            with self._lock:
                self._due_from = _earliest_idle_expiry(self._sessions)
        close_regions(regions)  # outside the locks: closing waits for the regions' copies
        for sid, freed in ended:
            log.warning("session %s expired (no call for its lease); freed %d handle(s)", sid, freed)
            for listener in self.on_expiry:
                listener(sid)
        return ended

    def _live_session(self, session_id: str) -> Session:
        """The session record; call with self._lock held."""
        session = self._sessions.get(session_id) if session_id else None
        if session is None or not CALLER.get().may_see(session.tenant):  # another tenant's does not exist
            raise NotFound(
                f"unknown session '{session_id}': it expired (no call within its lease), was closed, "
                "or never existed; its handles are gone"
            )
        return session

    def _session_entries(self, session_id: str) -> list[Entry]:
        """The entries a session owns (internal lock held)."""
        return list(self._by_session.get(session_id, {}).values())

    def _drop(self, entries: list[Entry]) -> int:
        """Remove these live entries' handles (internal lock held, and their objects' locks)."""
        for entry in entries:
            self._remove(self._handle_of(entry), entry)
        return len(entries)


def _earliest_idle_expiry(sessions: Mapping[str, Session]) -> float:
    """When the first lease of a session with no call in flight runs out (inf: none); a session
    with calls in flight counts again when its last one ends (`end_call`)."""
    return min((s.expires for s in sessions.values() if s.active == 0), default=math.inf)


@contextlib.contextmanager
def _try_locked(entries: list[Entry]) -> Iterator[bool]:
    """Hold the locks of these entries if every one is free now (yields True), else none (False)."""
    with contextlib.ExitStack() as stack:
        for _, lock in sorted({id(e.lock): e.lock for e in entries}.items()):
            if not lock.acquire(blocking=False):
                break
            stack.callback(lock.release)
        else:
            yield True
            return
    yield False


class _Locked:
    """What `locked` returns: a context manager written out rather than a generator, since every
    call takes one (a generator-based one costs several times as many Python steps)."""

    __slots__ = ("_entries", "_check_live", "_taken", "waited")

    def __init__(self, entries: tuple[Entry, ...], check_live: bool) -> None:
        self._entries = entries
        self._check_live = check_live
        self._taken: list[GroupLock] = []
        self.waited = False
        """Whether a lock was held by another thread, so that this call waited for it."""

    def __enter__(self) -> None:
        entries = self._entries
        if len(entries) == 1:
            locks = [entries[0].lock]
        elif len(entries) == 2:  # most changes: an average's two objects, without building a dict to sort
            a, b = entries[0].lock, entries[1].lock
            locks = [a] if a is b else [a, b] if id(a) < id(b) else [b, a]
        else:
            locks = [lock for _, lock in sorted({id(e.lock): e.lock for e in entries}.items())]
        taken = self._taken
        try:
            for lock in locks:
                if not lock.acquire(False):  # busy: wait for it (a lock this thread holds never is)
                    self.waited = True
                    lock.acquire()
                taken.append(lock)
            if self._check_live:
                for e in entries:
                    if e.freed:
                        raise NotFound(f"the {e.kind.value} handle was freed while this call waited for it")
        except BaseException:
            self._release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        taken = self._taken
        while taken:
            taken.pop().release()


def locked(*entries: Entry, check_live: bool = True) -> contextlib.AbstractContextManager[None]:
    """Hold the locks of several entries, taken in one global order (by id) so two calls never deadlock.

    Once they are held, a handle freed while this call waited raises NotFound (unless check_live
    is false), so nothing works on an object after its handle is gone.
    """
    return _Locked(entries, check_live)


class _Mutation:
    """What `Registry.mutate` returns (written out, not a generator, as `_Locked` is): the locks,
    then the reservation; on the way out, failed or not, the recharge, the reservation's release
    and the locks'."""

    __slots__ = ("_registry", "_entries", "_need", "_in_place", "_etag", "_locks", "_reservation")

    def __init__(
        self, registry: Registry, entries: tuple[Entry, ...], need: Need, reading: tuple[Entry, ...],
        in_place: Callable[[], bool] | None, etag: str,
    ) -> None:
        self._registry = registry
        self._entries = entries
        self._need = need
        self._in_place = in_place
        self._etag = etag
        self._locks = _Locked(entries + reading, True)
        self._reservation: Reservation | None = None

    def __enter__(self) -> Reservation:
        caller = CALLER.get()
        caller.require_writer("changing an object")
        self._locks.__enter__()
        try:
            if self._locks.waited:
                _refuse_if_caller_gone()
            if self._etag:
                versions.check(self._entries[0].lock, self._etag, self._entries[0].kind.value)
            reservation = Reservation(tenant=caller.tenant, active=CALL_ACTIVE.get())  # its quota's record: if it grows
            need = self._need
            wanted = need() if callable(need) else need
            if wanted:  # most changes allocate nothing: no trip through the caps for an empty need
                self._registry.grow(reservation, nbytes=wanted)  # refused: nothing set aside
        except BaseException:
            self._locks.__exit__()
            raise
        self._reservation = reservation
        return reservation

    def __exit__(self, *exc: object) -> None:
        try:
            try:
                in_place = self._in_place
                if in_place is None or not in_place():
                    self._registry._recharge({id(e.lock) for e in self._entries})
            finally:
                reservation = self._reservation
                if reservation is not None and _holds_room(reservation):  # the body may have grown it
                    self._registry._release(reservation)
        finally:
            self._registry.changes.note()  # made or not (a change may fail midway): counted under its locks
            if self._reservation is not None:  # the change ran (made or not): new versions
                for e in self._entries:
                    versions.changed(e.lock)
            self._locks.__exit__()




def _refuse_if_caller_gone() -> None:
    """Cancelled when the call's client has gone (cancelled, or past its deadline; `CALL_ACTIVE`).

    Asked once a change has waited for a busy object, before it changes anything: the client that
    gave up has been answered DEADLINE_EXCEEDED or CANCELLED, and a change made after that was a
    trap: the caller's retry (a new call, a new request ID) made it twice (found by review; an
    avgparms counted its sample twice). A change that gets its objects at once is made: its client
    was there a moment ago, and the change itself stops for no one.
    """
    active = CALL_ACTIVE.get()
    if active is not None and not active():
        raise Cancelled(
            "the call ended (cancelled, or past its deadline) while it waited for an object another call held; "
            "nothing changed"
        )


def _holds_room(reservation: Reservation) -> bool:
    """Whether giving the reservation back would change a ledger (handles or bytes left in it or its quota)."""
    quota = reservation.quota
    return bool(
        reservation.handles or any(reservation.nbytes.values())
        or (quota is not None and (quota.handles or any(quota.nbytes.values())))
    )


def _quota_limits(quota: Quota) -> Limits:
    """A tenant ledger's limits: its quota (0 means none)."""
    return Limits(max_handles=quota.max_handles, max_device_bytes=quota.max_device_bytes)
