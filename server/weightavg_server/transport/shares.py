"""A tenant's share of the server's workers: on a server with tokens, one tenant's calls in flight
take at most half of the threads that serve calls, so another tenant is still served, and all
tenants' calls together never take the workers kept for health checks and keep-alives.

Every call holds a worker thread for as long as it runs, a client stream until its last message
arrives. A review found one tenant holding every worker with uploads that sent their first message
and nothing more: no other tenant's call (not even a Ping) was served until it let go; another found
two tenants, each within its half, holding every worker together, so that a liveness probe's health
Check waited for a worker until its deadline. Admins are not counted (they may need to act on a
server the tenants have filled). Only a server with a tokens file has this layer (ops/app.py):
without one there is one tenant, and no share.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from ..store.tenants import CALLER
from .interceptors import Handler, same_kind
from .tenancy import OPEN_SERVICE_PREFIXES, SERVICE_PREFIX, Tokens

UNSHARED = frozenset({SERVICE_PREFIX + "KeepAliveSession"})
"""Methods not counted against a share: a keep-alive holds a worker for an instant, and it is how a
live client says so. A review found a tenant's long epochs filling its share and its idle clients'
keep-alives refused, so that their sessions expired and their handles were freed. (Keep-alives now
also renew their session as they arrive, interceptors.SessionInterceptor.gate; this layer answers
them too, so that `Client.keepalive()` does not fail while the tenant's other calls run.)"""


def unshared(method: str) -> bool:
    """Whether no share counts a method's calls: open methods (health) and keep-alives."""
    return method.startswith(OPEN_SERVICE_PREFIXES) or method in UNSHARED


def tenant_share(max_workers: int) -> int:
    """Calls one tenant may have in flight: half the workers, at least one."""
    return max(1, max_workers // 2)


def kept_for_unshared(max_workers: int) -> int:
    """Workers kept for single-request calls no share counts (health Checks, keep-alives) while they
    wait for their request message: a quarter of the workers, at least one."""
    return max(1, max_workers // 4)


def open_streams(max_workers: int) -> int:
    """Health Watch streams open at once (each holds a worker until its client cancels): an eighth of
    the workers, at least one; a bound of their own, so that they never take a Check's place."""
    return max(1, max_workers // 8)


def tenants_total(max_workers: int) -> int:
    """Calls all tenants together (and open Watch streams) may have in flight: every worker but those
    `kept_for_unshared`, at least one (a server of one worker has none to keep)."""
    return max(1, max_workers - kept_for_unshared(max_workers))


class TenantShares:
    """Counts each tenant's calls in flight, on the worker threads that serve them (inside the
    tenancy layer, which names the caller), and refuses a call past the tenant's share, or past the
    `tenants_total` of all tenants' calls together, with RESOURCE_EXHAUSTED before it does anything.

    Open health Watch streams are counted in that total too, against no tenant (`take`, `give`, by
    `interceptors.SingleRequests` once a stream has its own slot): each holds a worker for as long
    as it is open, so the workers kept for Checks stay free of them. Counting a Watch only after its
    own slot keeps a flood of Watch streams, all refused there, from taking the total's last place
    for an instant each and so refusing a tenant's call."""

    def __init__(self, tokens: Tokens, max_workers: int) -> None:
        self._tokens = tokens
        self.share = tenant_share(max_workers)
        self.total = tenants_total(max_workers)
        self.workers = max_workers
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._total_held = 0

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler again, its calls counted against their tenant's share and the tenants' total
        (open methods and keep-alives: as they are)."""
        if unshared(method):
            return handler
        if handler.response_streaming:
            inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream
            assert inner_stream is not None  # grpc sets the behaviour that matches the flags

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                tenant = self._enter(context)
                try:
                    yield from inner_stream(request, context)
                finally:
                    self._leave(tenant)

            return same_kind(handler, stream)

        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
        assert inner is not None  # grpc sets the behaviour that matches the flags

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            tenant = self._enter(context)
            try:
                return inner(request, context)
            finally:
                self._leave(tenant)

        return same_kind(handler, unary)

    def _enter(self, context: grpc.ServicerContext) -> str | None:
        """Count the call against its tenant (None: not counted), or refuse it past the share."""
        if self._tokens.table.open:  # one tenant: no share (one attribute read per call)
            return None
        caller = CALLER.get()
        if caller.is_admin:
            return None
        with self._lock:
            held = self._in_flight.get(caller.tenant, 0)
            if held < self.share and self._total_held < self.total:
                self._in_flight[caller.tenant] = held + 1
                self._total_held += 1
                return caller.tenant
        if held >= self.share:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant '{caller.tenant}' has {held} calls in flight, its share of this server's workers (half of "
                "them, so other tenants are served); wait for some to finish, or end uploads it has stopped sending",
            )
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.refusal())
        return None  # not reached: abort raises

    def _leave(self, tenant: str | None) -> None:
        if tenant is None:
            return
        with self._lock:
            self._total_held -= 1
            left = self._in_flight[tenant] - 1
            if left:
                self._in_flight[tenant] = left
            else:
                del self._in_flight[tenant]

    def take(self) -> bool:
        """Count a call in the tenants' total against no tenant (an open Watch stream); False, and
        nothing counted, when the total is taken."""
        with self._lock:
            if self._total_held >= self.total:
                return False
            self._total_held += 1
            return True

    def give(self) -> None:
        """Give back a place `take` counted."""
        with self._lock:
            self._total_held -= 1

    def refusal(self) -> str:
        """Why a call finds the tenants' total taken, and what to do."""
        return (
            f"tenants' calls (and health Watch streams) have {self.total} of this server's {self.workers} workers "
            "in flight, all they may take together (the rest are kept for health checks and keep-alives); wait "
            "for some to finish, or end uploads that have stopped sending"
        )

    def in_flight(self) -> dict[str, int]:
        """Calls in flight by tenant, of the tenants that have some (tests, metrics)."""
        with self._lock:
            return dict(self._in_flight)
