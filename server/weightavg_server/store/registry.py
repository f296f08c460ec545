"""The one shared registry: live objects under opaque random handle IDs, with per-object locks."""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..domain.errors import InvalidArgument, NotFound, ResourceExhausted
from .limits import Limits

log = logging.getLogger("weightavg.sessions")

CALLER_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("weightavg_caller_session", default=None)
"""The session of the call being served (set by the session interceptor from call metadata), or None."""


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


@dataclass
class TensorHolder:
    """A tensor handle's object: a box so that moving the tensor keeps every handle to it valid."""

    tensor: torch.Tensor


@dataclass
class Entry:
    """One live handle: its kind, the object (shared by addref handles) and the object's lock.

    `owner` is the object whose tensors the handle keeps alive and is charged for: the object
    itself, or for a live view the module it shows. `freed` turns true, under the lock, when the
    handle is freed, so a call that was waiting for the lock answers NOT_FOUND instead of working
    on a freed object.
    """

    kind: Kind
    obj: Any
    lock: threading.RLock
    created: float = field(default_factory=time.monotonic)
    owner: Any = None
    freed: bool = False
    session: str | None = None
    """The session that owns the handle (freed with it), or None: lives until freed."""

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = self.obj


Bytes = dict[str, int]
"""Tensor bytes by device name ("cpu", "cuda:0")."""


@dataclass
class Reservation:
    """Handles and bytes set aside for a call in progress, so concurrent calls cannot overshoot a cap."""

    handles: int = 0
    nbytes: Bytes = field(default_factory=dict)


@dataclass
class _Charge:
    """Bytes charged for one owner object, and how many handles keep it alive."""

    owner: Any
    refs: int
    nbytes: Bytes


_PREFIXES = {
    Kind.MODULE: "mod", Kind.MODEL: "mdl", Kind.OPTIMIZER: "opt",
    Kind.LOSS: "los", Kind.DICTIONARY: "dic", Kind.TENSOR: "ten",
}


@dataclass
class Session:
    """A client's lease: it ends `lease` seconds after its last call unless a call is in flight."""

    id: str
    lease: float
    expires: float
    active: int = 0


def new_handle_id(kind: Kind) -> str:
    """An unguessable ID: 128 random bits behind a short kind prefix that only helps reading logs."""
    return f"{_PREFIXES[kind]}_{secrets.token_hex(16)}"


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
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._limits = limits or Limits()
        self._held: Bytes = {}
        self._pending: Bytes = {}
        self._pending_handles = 0
        self._charges: dict[int, _Charge] = {}

    @property
    def limits(self) -> Limits:
        """The caps in force."""
        return self._limits

    def set_limits(self, limits: Limits) -> None:
        """Change the caps; what is already held stays, new requests are checked against them."""
        with self._lock:
            self._limits = limits

    def held_bytes(self) -> Bytes:
        """Tensor bytes charged to live handles, by device."""
        with self._lock:
            return {device: n for device, n in self._held.items() if n}

    # -- caps -------------------------------------------------------------------------------------

    def _check_room(self, handles: int, nbytes: Bytes, released: Bytes | None = None) -> None:
        """Raise ResourceExhausted unless `handles` more handles and `nbytes` more bytes fit (lock held)."""
        cap = self._limits.max_handles
        if handles > 0 and cap > 0 and len(self._entries) + self._pending_handles + handles > cap:
            raise ResourceExhausted(
                f"the server holds its cap of {cap} live handles (--max-handles); free some handles first"
            )
        for device, n in nbytes.items():
            if n <= 0:
                continue
            held = self._held.get(device, 0) + self._pending.get(device, 0) - (released or {}).get(device, 0)
            limit = self._limits.bytes_cap(device)
            if held + n > limit:
                raise ResourceExhausted(
                    f"{n} more tensor bytes on {device} would exceed the cap of {limit} bytes per device "
                    f"({held} already held or reserved; --max-device-bytes); free some handles first"
                )

    @contextlib.contextmanager
    def reserve(self, handles: int = 0, nbytes: Bytes | None = None) -> Iterator[Reservation]:
        """Set aside room for a call, checked against the caps before it allocates anything.

        `add` and `recharge` consume the reservation; whatever is left is released on exit.

        Raises:
            ResourceExhausted: the handles or bytes would not fit.
        """
        reservation = Reservation()
        try:
            self.grow(reservation, handles, nbytes or {})
            yield reservation
        finally:
            with self._lock:
                self._pending_handles -= reservation.handles
                self._release_bytes(reservation)

    def grow(self, reservation: Reservation, handles: int = 0, nbytes: Bytes | None = None) -> None:
        """Add to a reservation (e.g. as each tensor's header of an upload arrives)."""
        nbytes = {device: n for device, n in (nbytes or {}).items() if n > 0}
        with self._lock:
            self._check_room(handles, nbytes)
            reservation.handles += handles
            self._pending_handles += handles
            for device, n in nbytes.items():
                reservation.nbytes[device] = reservation.nbytes.get(device, 0) + n
                self._pending[device] = self._pending.get(device, 0) + n

    def _release_bytes(self, reservation: Reservation) -> None:
        for device, n in reservation.nbytes.items():
            self._pending[device] -= n
        reservation.nbytes = {}

    # -- handles ----------------------------------------------------------------------------------

    def add(
        self,
        kind: Kind,
        obj: Any,
        lock: threading.RLock | None = None,
        *,
        owner: Any = None,
        charge: Bytes | None = None,
        reservation: Reservation | None = None,
        handle_id: str | None = None,
        session: str | None = None,
    ) -> str:
        """Register obj under a new handle and return its ID.

        Args:
            lock: another object's lock to share (addref handles, live views).
            owner: the object charged for the tensors (default obj); an owner already charged
                through another handle is charged once.
            charge: the owner's tensor bytes by device, when it is new.
            reservation: room set aside by `reserve`; it pays for the handle and the bytes.
            handle_id: only for restoring a snapshot.
            session: the owning session (default: the caller's; None outside a session).

        Raises:
            ResourceExhausted: over a cap (checked again here, with the exact bytes).
            NotFound: the session has ended (the object is then dropped).
        """
        session_owner = session if session is not None else CALLER_SESSION.get()
        entry = Entry(kind, obj, lock if lock is not None else threading.RLock(), owner=owner, session=session_owner)
        handle = handle_id or new_handle_id(kind)
        key = id(entry.owner)
        with self._lock:
            if session_owner is not None and session_owner not in self._sessions:
                raise NotFound(f"session '{session_owner}' has ended (lease expired or closed); nothing created")
            if handle in self._entries:
                raise InvalidArgument(f"handle '{handle}' already exists")
            reserved_slot = reservation is not None and reservation.handles > 0
            new_owner = key not in self._charges
            nbytes = (charge or {}) if new_owner else {}
            self._check_room(0 if reserved_slot else 1, nbytes, reservation.nbytes if reservation else None)
            if reservation is not None:
                if reserved_slot:
                    reservation.handles -= 1
                    self._pending_handles -= 1
                self._release_bytes(reservation)
            if new_owner:
                self._charges[key] = _Charge(entry.owner, 0, dict(nbytes))
                for device, n in nbytes.items():
                    self._held[device] = self._held.get(device, 0) + n
            self._charges[key].refs += 1
            self._entries[handle] = entry
        return handle

    def recharge(self, entry: Entry, charge: Bytes, reservation: Reservation | None = None) -> None:
        """Record what an entry's owner holds after a call changed it (caller holds the entry's lock)."""
        with self._lock:
            if reservation is not None:
                self._release_bytes(reservation)
            record = self._charges.get(id(entry.owner))
            if record is None:
                return
            for device in set(record.nbytes) | set(charge):
                self._held[device] = self._held.get(device, 0) + charge.get(device, 0) - record.nbytes.get(device, 0)
            record.nbytes = dict(charge)

    def get(self, handle: str, *kinds: Kind) -> Entry:
        """The entry for handle; NotFound when unknown or freed, InvalidArgument when of the wrong kind."""
        if not handle:
            raise InvalidArgument("no handle given")
        with self._lock:
            entry = self._entries.get(handle)
        if entry is None:
            raise NotFound(f"unknown handle '{handle}' (never created, or already freed)")
        if kinds and entry.kind not in kinds:
            wanted = " or ".join(k.value for k in kinds)
            raise InvalidArgument(f"expecting {wanted} handle, given {entry.kind.value} handle '{handle}'")
        return entry

    def module(self, handle: str) -> tuple[Entry, torch.nn.Module]:
        """Resolve a module, model or optimizer handle to the module it stands for."""
        entry = self.get(handle, *MODULE_KINDS)
        module = entry.obj if entry.kind is Kind.MODULE else entry.obj.module
        return entry, module

    def addref(self, handle: str) -> str:
        """A second handle to the same object, sharing its lock, owned by the caller's session; never
        one to an object being freed."""
        entry = self.get(handle)
        with locked(entry):
            return self.add(entry.kind, entry.obj, entry.lock, owner=entry.owner)

    def free(self, handles: list[str]) -> int:
        """Release handles, all or nothing: every one must exist (duplicates count once).

        Waits for calls in flight on the objects, so a call either finishes before the free or
        answers NOT_FOUND; it never works on a freed object.
        """
        unique = list(dict.fromkeys(handles))
        with self._lock:
            found = [(h, self._entries.get(h)) for h in unique]
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
        """Release every handle the caller can list (its session's, or those of no session), each
        once its calls in flight have finished."""
        entries = self.visible_items()
        with locked(*(e for _, e in entries), check_live=False), self._lock:
            live = [(h, e) for h, e in entries if self._entries.get(h) is e]
            for h, e in live:
                self._remove(h, e)
        return len(live)

    def _remove(self, handle: str, entry: Entry) -> None:
        """Drop one handle and, with its owner's last handle, the owner's charge (lock held)."""
        del self._entries[handle]
        entry.freed = True
        key = id(entry.owner)
        record = self._charges[key]
        record.refs -= 1
        if record.refs == 0:
            for device, n in record.nbytes.items():
                self._held[device] -= n
            del self._charges[key]

    def items(self) -> list[tuple[str, Entry]]:
        """A snapshot of every live handle, oldest first."""
        with self._lock:
            return sorted(self._entries.items(), key=lambda item: item[1].created)

    def visible_items(self) -> list[tuple[str, Entry]]:
        """Live handles listed to the caller, oldest first: its session's, or those of no session."""
        owner = CALLER_SESSION.get()
        return [(h, e) for h, e in self.items() if e.session == owner]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(self, lease: float, session_id: str | None = None) -> str:
        """Start a session whose lease is `lease` seconds; `session_id` only when restoring a snapshot."""
        sid = session_id or f"ses_{secrets.token_hex(16)}"
        with self._lock:
            self._sessions[sid] = Session(sid, lease, time.monotonic() + lease)
        return sid

    def sessions(self) -> list[Session]:
        """Every live session (copies of their records)."""
        with self._lock:
            return [Session(s.id, s.lease, s.expires, s.active) for s in self._sessions.values()]

    def renew(self, session_id: str) -> float:
        """Push a session's expiry a full lease from now; returns the lease. NotFound once it has ended."""
        with self._lock:
            session = self._live_session(session_id)
            session.expires = time.monotonic() + session.lease
            return session.lease

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

    def close_session(self, session_id: str) -> int:
        """End a session and free every handle it owns; returns how many were freed."""
        with self._lock:
            self._live_session(session_id)
            del self._sessions[session_id]
            return self._drop_owned(session_id)

    def expire(self, now: float | None = None) -> list[tuple[str, int]]:
        """End sessions whose lease ran out with no call in flight, freeing their handles.

        Returns (session id, handles freed) for each; each is also logged.
        """
        now = time.monotonic() if now is None else now
        ended: list[tuple[str, int]] = []
        with self._lock:
            for sid, session in list(self._sessions.items()):
                if session.active == 0 and session.expires <= now:
                    del self._sessions[sid]
                    ended.append((sid, self._drop_owned(sid)))
        for sid, freed in ended:
            log.warning("session %s expired (no call for its lease); freed %d handle(s)", sid, freed)
        return ended

    def _live_session(self, session_id: str) -> Session:
        """The session record; call with self._lock held."""
        session = self._sessions.get(session_id) if session_id else None
        if session is None:
            raise NotFound(
                f"unknown session '{session_id}': it expired (no call within its lease), was closed, "
                "or never existed; its handles are gone"
            )
        return session

    def _drop_owned(self, session_id: str) -> int:
        """Remove every handle a session owns; call with self._lock held."""
        doomed = [(h, e) for h, e in self._entries.items() if e.session == session_id]
        for h, e in doomed:
            self._remove(h, e)
        return len(doomed)


@contextlib.contextmanager
def locked(*entries: Entry, check_live: bool = True) -> Iterator[None]:
    """Hold the locks of several entries, taken in one global order (by id) so two calls never deadlock.

    Once they are held, a handle freed while this call waited raises NotFound (unless check_live
    is false), so nothing works on an object after its handle is gone.
    """
    locks = sorted({id(e.lock): e.lock for e in entries}.items())
    with contextlib.ExitStack() as stack:
        for _, lock in locks:
            stack.enter_context(lock)
        if check_live:
            for e in entries:
                if e.freed:
                    raise NotFound(f"the {e.kind.value} handle was freed while this call waited for it")
        yield
