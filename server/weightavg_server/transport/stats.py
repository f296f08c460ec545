"""Per-RPC statistics (counts, status codes, latency buckets, tensor bytes) and live objects per device.

Plain Python: the interceptor feeds RpcStats, and GetServerStats and the Prometheus collector read
snapshots of it, so both always report the same numbers.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
"""Upper bounds (seconds) of the latency histogram: a bare call takes ~0.3 ms, an epoch minutes."""


@dataclass
class MethodStats:
    """What one RPC method has done since the server started."""

    started: int = 0
    finished: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    seconds_total: float = 0.0
    seconds_max: float = 0.0
    # buckets[i] counts calls with LATENCY_BUCKETS[i-1] < seconds <= LATENCY_BUCKETS[i]; the last
    # slot counts calls slower than every bound (Prometheus's +Inf bucket, before accumulation).
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    bytes_received: int = 0
    bytes_sent: int = 0

    @property
    def in_flight(self) -> int:
        return self.started - self.finished

    @property
    def failures(self) -> int:
        return self.finished - self.codes["OK"]

    def copy(self) -> MethodStats:
        return MethodStats(
            self.started, self.finished, Counter(self.codes), self.seconds_total, self.seconds_max,
            list(self.buckets), self.bytes_received, self.bytes_sent,
        )


@dataclass
class TenantCalls:
    """Calls made with one tenant's tokens since the server started."""

    calls: int = 0
    failures: int = 0


class RpcStats:
    """Thread-safe per-method and per-tenant records; each call costs two short critical sections
    (start, finish) and one more for its tenant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: dict[str, MethodStats] = {}
        self._tenants: dict[str, TenantCalls] = {}
        self._named: frozenset[str] | None = None
        """The tenants whose calls are counted (`keep_tenants`); None: every tenant."""
        self._started_at = time.monotonic()
        self._calls = 0
        self._running = 0

    def keep_tenants(self, named: frozenset[str]) -> None:
        """Count calls of the `named` tenants alone from now on (those the tokens in force name), and
        forget the calls of every other tenant: a SIGHUP that removed a tenant's tokens ends its
        counters, which the metrics then stop exporting, and a tenant named again starts from zero.
        Every tenant ever named was kept, so /metrics and GetServerStats listed removed tenants for
        good, a row more for each tenant ever renamed (found by review). A call of a removed
        tenant that was in flight at the reload is not counted when it ends."""
        with self._lock:
            self._named = named
            self._tenants = {name: calls for name, calls in self._tenants.items() if name in named}

    def counts(self, tenant: str) -> bool:
        """Whether calls of `tenant` are counted (the tokens in force name it)."""
        named = self._named
        return named is None or tenant in named

    def tenant_finish(self, tenant: str, code: str) -> None:
        """A call made with a token of `tenant` ended with status `code` (not counted for a tenant
        the tokens in force no longer name: `keep_tenants`)."""
        with self._lock:
            if self._named is not None and tenant not in self._named:
                return
            calls = self._tenants.get(tenant)
            if calls is None:
                calls = self._tenants[tenant] = TenantCalls()
            calls.calls += 1
            if code != "OK":
                calls.failures += 1

    def tenants(self) -> dict[str, TenantCalls]:
        """A copy of every tenant's record, sorted by tenant."""
        with self._lock:
            return {name: TenantCalls(c.calls, c.failures) for name, c in sorted(self._tenants.items())}

    def start(self, method: str) -> None:
        """A call to `method` began."""
        with self._lock:
            stats = self._methods.get(method)
            if stats is None:
                stats = self._methods[method] = MethodStats()
            stats.started += 1
            self._calls += 1
            self._running += 1

    @property
    def calls(self) -> int:
        """Calls started, every method together (the reaper's sign of activity)."""
        return self._calls

    @property
    def running(self) -> int:
        """Calls started and not yet finished, every method together: a server running one long call
        (an epoch, a reply streaming to a slow reader) is busy, though no call starts."""
        return self._running

    def finish(self, method: str, code: str, seconds: float, bytes_received: int = 0, bytes_sent: int = 0) -> None:
        """A call to `method` (already started) ended with status `code` after `seconds`."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            stats = self._methods[method]
            stats.finished += 1
            self._running -= 1
            stats.codes[code] += 1
            stats.seconds_total += seconds
            stats.seconds_max = max(stats.seconds_max, seconds)
            stats.buckets[slot] += 1
            stats.bytes_received += bytes_received
            stats.bytes_sent += bytes_sent

    def snapshot(self) -> dict[str, MethodStats]:
        """A consistent copy of every method's record, keyed by full method name, sorted."""
        with self._lock:
            return {name: self._methods[name].copy() for name in sorted(self._methods)}

    def uptime(self) -> float:
        """Seconds since these statistics started."""
        return time.monotonic() - self._started_at
