"""A tenant's share of the server's workers: on a server with tokens, one tenant's calls in flight
take at most half of the threads that serve calls, so another tenant is still served.

Every call holds a worker thread for as long as it runs, a client stream until its last message
arrives. A review found one tenant holding every worker with uploads that sent their first message
and nothing more: no other tenant's call (not even a Ping) was served until it let go. Admins are
not counted against a share (they may need to act on a server a tenant has filled). Only a server
with a tokens file has this layer (ops/app.py): without one there is one tenant, and no share.
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


class TenantShares:
    """Counts each tenant's calls in flight, on the worker threads that serve them (inside the
    tenancy layer, which names the caller), and refuses a call past the tenant's share with
    RESOURCE_EXHAUSTED before it does anything."""

    def __init__(self, tokens: Tokens, max_workers: int) -> None:
        self._tokens = tokens
        self.share = tenant_share(max_workers)
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler again, its calls counted against their tenant's share (open methods and
        keep-alives: as they are)."""
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
            if held < self.share:
                self._in_flight[caller.tenant] = held + 1
                return caller.tenant
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"tenant '{caller.tenant}' has {held} calls in flight, its share of this server's workers (half of "
            "them, so other tenants are served); wait for some to finish, or end uploads it has stopped sending",
        )
        return None  # not reached: abort raises

    def _leave(self, tenant: str | None) -> None:
        if tenant is None:
            return
        with self._lock:
            left = self._in_flight[tenant] - 1
            if left:
                self._in_flight[tenant] = left
            else:
                del self._in_flight[tenant]

    def in_flight(self) -> dict[str, int]:
        """Calls in flight by tenant, of the tenants that have some (tests, metrics)."""
        with self._lock:
            return dict(self._in_flight)
