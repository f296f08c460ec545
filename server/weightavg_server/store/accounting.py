"""Memory accounting: what live objects hold, what calls in progress have reserved, and the caps.

Bytes are counted by allocation (storage), not by object: a storage that several objects reach
(a module and the model built on it, a live view of its parameters, a model's input held by a
tensor handle) is one allocation and counts once, so the total equals the memory really held. The
ledger has no lock of its own: the registry calls it under its internal lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..domain.errors import ResourceExhausted
from ..domain.tensors import Bytes, StorageKey, storage_bytes
from .limits import Limits


@dataclass
class Reservation:
    """Handles and bytes set aside for a call in progress, so concurrent calls cannot overshoot a cap.

    The registry sets the same room aside twice: against the server's caps (this reservation) and
    against the quota of the caller's tenant (`quota`, in that tenant's ledger).
    """

    handles: int = 0
    nbytes: Bytes = field(default_factory=dict)
    tenant: str | None = None
    """The tenant whose quota the room also counts against; None outside the registry."""
    quota: Reservation | None = None
    """The same room in that tenant's ledger."""
    tenant_quota: bool = True
    """False for a snapshot's host copies and its restore, which span every tenant: the room counts
    against the server's caps alone (`Registry.add` still charges each restored object to its own
    tenant)."""
    active: Callable[[], bool] | None = None
    """Whether the call that holds the room still has its client (`requests.CALL_ACTIVE` when the
    room was set aside; None outside a call): the room of a call that has ended is about to be given
    back, and a call refused for want of it waits for it (`Registry.grow`)."""


@dataclass
class _Holder:
    """One object kept alive by handles: how many handles, and the allocations it reaches."""

    obj: object
    refs: int
    keys: frozenset[StorageKey]


class Ledger:
    """Allocations held by live objects, reservations, and the caps they are checked against.

    The registry keeps one for the whole server (caps from the command line: 0 bytes means the
    device's memory) and one per tenant (`tenant` set: its quota from the tokens file, 0 meaning no
    quota), each counting the distinct storage its objects reach.
    """

    def __init__(self, limits: Limits, tenant: str | None = None) -> None:
        self.limits = limits
        self.tenant = tenant
        self._holders: dict[int, _Holder] = {}
        self._storages: dict[StorageKey, int] = {}
        self._held: Bytes = {}
        self._pending: Bytes = {}
        self.pending_handles = 0

    def idle(self) -> bool:
        """Whether the ledger counts nothing: no object held, nothing reserved (a tenant's ledger
        that may be dropped, and made afresh when the tenant next reserves or holds something)."""
        return not self._holders and self.pending_handles == 0 and not any(self._pending.values())

    def held(self) -> Bytes:
        """Bytes of distinct allocations held by live objects, by device."""
        return {device: n for device, n in self._held.items() if n}

    def in_use(self, device: str) -> int:
        """Bytes held and reserved on a device: what a new reservation there is checked on top of."""
        return self._held.get(device, 0) + self._pending.get(device, 0)

    def new_bytes(self, keys: frozenset[StorageKey]) -> Bytes:
        """Bytes of the allocations among `keys` that no live object holds yet."""
        return storage_bytes(k for k in keys if k not in self._storages)

    # -- caps ---------------------------------------------------------------------------------------

    def check(
        self, live_handles: int, handles: int, nbytes: Bytes, released: Bytes | None = None, released_handles: int = 0,
    ) -> None:
        """Raise ResourceExhausted unless `handles` more handles and `nbytes` more bytes fit, counting
        what is held and reserved, less `released` bytes and `released_handles` (a reservation about
        to be spent, or reservations about to be given back)."""
        cap = self.limits.max_handles
        if handles > 0 and cap > 0 and live_handles + self.pending_handles - released_handles + handles > cap:
            if self.tenant is not None:
                raise ResourceExhausted(
                    f"tenant '{self.tenant}' holds its quota of {cap} live handles (max_handles in the tokens file); "
                    "free some of its handles first"
                )
            raise ResourceExhausted(
                f"the server holds its cap of {cap} live handles (--max-handles); free some handles first"
            )
        for device, n in nbytes.items():
            if n <= 0:
                continue
            held = self.in_use(device) - (released or {}).get(device, 0)
            if self.tenant is not None:
                limit = self.limits.max_device_bytes
                if limit > 0 and held + n > limit:
                    raise ResourceExhausted(
                        f"{n} more tensor bytes on {device} would exceed the quota of tenant '{self.tenant}', "
                        f"{limit} bytes per device ({held} already held or reserved; max_device_bytes in the tokens "
                        "file); free some of its handles first"
                    )
                continue
            limit = self.limits.bytes_cap(device)
            if held + n > limit:
                raise ResourceExhausted(
                    f"{n} more tensor bytes on {device} would exceed the cap of {limit} bytes per device "
                    f"({held} already held or reserved; --max-device-bytes); free some handles first"
                )

    def reserve(self, reservation: Reservation, live_handles: int, handles: int, nbytes: Bytes) -> None:
        """Add to a reservation after checking that it fits."""
        nbytes = {device: n for device, n in nbytes.items() if n > 0}
        self.check(live_handles, handles, nbytes)
        reservation.handles += handles
        self.pending_handles += handles
        for device, n in nbytes.items():
            reservation.nbytes[device] = reservation.nbytes.get(device, 0) + n
            self._pending[device] = self._pending.get(device, 0) + n

    def release_bytes(self, reservation: Reservation) -> None:
        """Give back a reservation's bytes (spent or not). A device whose bytes were all spent is
        skipped: the tenant ledger they were spent in may have been dropped since (`idle`), and the
        one made afresh in its place has never heard of the device."""
        for device, n in reservation.nbytes.items():
            if n:
                self._pending[device] -= n
        reservation.nbytes = {}

    def spend(self, reservation: Reservation, nbytes: Bytes) -> None:
        """Take bytes now held out of a reservation (as far as it covers them)."""
        for device, n in nbytes.items():
            spent = min(n, reservation.nbytes.get(device, 0))
            if spent:
                reservation.nbytes[device] -= spent
                self._pending[device] -= spent

    def release(self, reservation: Reservation) -> None:
        """Give back everything left in a reservation."""
        self.pending_handles -= reservation.handles
        reservation.handles = 0
        self.release_bytes(reservation)

    # -- holders ------------------------------------------------------------------------------------

    def hold(self, obj: object, keys: frozenset[StorageKey]) -> None:
        """One more handle keeps `obj` alive; the first one records the allocations it reaches."""
        holder = self._holders.get(id(obj))
        if holder is None:
            holder = self._holders[id(obj)] = _Holder(obj, 0, frozenset())
            self._set_keys(holder, keys)
        holder.refs += 1

    def keys_of(self, obj: object) -> frozenset[StorageKey]:
        """The allocations a held object was charged for at its last recharge (none if not held)."""
        holder = self._holders.get(id(obj))
        return holder.keys if holder is not None else frozenset()

    def is_held(self, obj: object) -> bool:
        """Whether a live handle keeps `obj` alive."""
        return id(obj) in self._holders

    def recharge(self, obj: object, keys: frozenset[StorageKey]) -> None:
        """Record the allocations a held object reaches after a call changed it."""
        holder = self._holders.get(id(obj))
        if holder is not None:
            self._set_keys(holder, keys)

    def unhold(self, obj: object) -> None:
        """One handle fewer keeps `obj` alive; with the last, its allocations are no longer its."""
        holder = self._holders[id(obj)]
        holder.refs -= 1
        if holder.refs == 0:
            self._set_keys(holder, frozenset())
            del self._holders[id(obj)]

    def _set_keys(self, holder: _Holder, keys: frozenset[StorageKey]) -> None:
        if keys == holder.keys:  # the usual recharge: a change in place reaches the same allocations
            return
        for key in holder.keys - keys:
            self._storages[key] -= 1
            if self._storages[key] == 0:
                del self._storages[key]
                self._held[key[0]] -= key[2]
        for key in keys - holder.keys:
            if key not in self._storages:
                self._storages[key] = 0
                self._held[key[0]] = self._held.get(key[0], 0) + key[2]
            self._storages[key] += 1
        holder.keys = keys
