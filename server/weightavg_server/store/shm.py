"""The shared memory regions clients have registered, each owned by one tenant's session and
unregistered when that session ends (closed or expired)."""

from __future__ import annotations

import logging
import resource
import threading
from dataclasses import dataclass

from ..domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..domain.shm import NAME, Region

log = logging.getLogger("weightavg.shm")

MAX_REGIONS_PER_SESSION = 16
"""A client holds up to six (its reused region, four pooled ones, a CUDA buffer), each under names of
its own, so two clients may share a session; a registration past the cap is answered
RESOURCE_EXHAUSTED, and the client sends that call's bytes through the stream. The cap stops a
runaway loop from holding thousands of mappings and file descriptors."""
MAX_REGIONS = 4096
"""Most regions on the server at once, whatever its file descriptor limit (`region_cap`): each is
also a mapping, and a process has 65,530 of them by default (vm.max_map_count), which torch's large
allocations need too. A co-located client holds up to six (its region, four pooled ones, a CUDA buffer)."""


def region_cap() -> int:
    """Most regions the server holds at once: an eighth of its file descriptor limit (each region
    keeps two open), so that however many sessions register them, a quarter of the descriptors at
    most go to regions and the rest stay for connections. Read at each registration: `weightavg
    serve` raises its soft limit to the hard one when it starts (ops/cli.py)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_REGIONS
    return max(MAX_REGIONS_PER_SESSION, min(MAX_REGIONS, soft // 8))


@dataclass
class _Registered:
    tenant: str
    session: str
    region: Region


def check_name(name: str) -> None:
    """Refuse a region name that is not 1 to 64 safe characters (the service checks it before it maps
    anything, so a bad name is reported as such, not as a key that failed to open)."""
    if not NAME.fullmatch(name):
        raise InvalidArgument(
            f"a shared memory region's name must be 1 to 64 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit; got {len(name)} characters"
        )


class SharedRegions:
    """Regions by (session, name). Only the registering tenant's session finds its regions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], _Registered] = {}

    def register(self, tenant: str, session: str, name: str, region: Region) -> Region | None:
        """Hold `region` as the session's `name`; the region it replaces, for the caller to close
        (`close_regions`) once it holds no lock. A refused region is closed here (it is new: no copy
        can be running in it). The caller checks that the session is live, under the store's lock."""
        try:
            check_name(name)
        except InvalidArgument:
            region.close()
            raise
        with self._lock:
            for (other_session, _), held in self._regions.items():
                if held.region.identity == region.identity and other_session != session:
                    region.close()
                    # Which session holds it is not this caller's business.
                    raise FailedPrecondition(
                        "that shared memory region is registered by another session; create a region of your own"
                    )
            old = self._regions.get((session, name))
            mine = [k for k in self._regions if k[0] == session and k[1] != name]
            if len(mine) >= MAX_REGIONS_PER_SESSION:
                region.close()
                raise ResourceExhausted(
                    f"a session may register at most {MAX_REGIONS_PER_SESSION} shared memory regions; "
                    "unregister one first"
                )
            cap = region_cap()
            if old is None and len(self._regions) >= cap:
                region.close()
                raise ResourceExhausted(
                    f"the server holds its cap of {cap} shared memory regions (an eighth of its file descriptor "
                    "limit); unregister regions or close sessions that hold them, or use the stream"
                )
            self._regions[(session, name)] = _Registered(tenant, session, region)
        return None if old is None else old.region

    def get(self, tenant: str, session: str | None, name: str) -> Region:
        with self._lock:
            held = self._regions.get((session or "", name))
        if held is None or held.tenant != tenant:
            raise NotFound(
                f"no shared memory region '{name}' is registered by this session; register it first "
                "(regions belong to the session that registered them and end with it)"
            )
        return held.region

    def unregister(self, tenant: str, session: str, name: str) -> int:
        """Forget the session's region `name` (every one of its regions when empty); how many."""
        with self._lock:
            keys = [k for k, v in self._regions.items() if k[0] == session and v.tenant == tenant and name in ("", k[1])]
            if name and not keys:
                raise NotFound(f"no shared memory region '{name}' is registered by this session")
            dropped = [self._regions.pop(k) for k in keys]
        close_regions([held.region for held in dropped])  # forgotten either way
        return len(dropped)

    def listed(self, tenant: str, session: str, name: str) -> list[tuple[str, Region]]:
        """The session's regions by name, in the order registered (only `name` when given: NotFound if
        the session has no such region)."""
        with self._lock:
            found = [(k[1], v.region) for k, v in self._regions.items()
                     if k[0] == session and v.tenant == tenant and name in ("", k[1])]
        if name and not found:
            raise NotFound(f"no shared memory region '{name}' is registered by this session")
        return found

    def end_session(self, session: str) -> int:
        """The session ended: forget its regions; how many."""
        regions = self.take_session(session)
        close_regions(regions)
        return len(regions)

    def take_session(self, session: str) -> list[Region]:
        """Forget the ended session's regions without closing them: for a caller holding the store's
        lock, which closes them (`close_regions`) once it has let go, since closing waits for the
        copies in progress and, for locked pages, for the device."""
        with self._lock:
            keys = [k for k in self._regions if k[0] == session]
            return [self._regions.pop(k).region for k in keys]

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)


def close_regions(regions: list[Region]) -> None:
    """Close regions taken from the store (`SharedRegions.take_session`): every one of them, a
    failure logged rather than raised (the session has ended; a broken CUDA context can fail the
    wait before a locked region's pages are unlocked)."""
    for region in regions:
        try:
            region.close()
        except Exception:
            log.exception("a shared memory region of an ended session could not be closed cleanly")
