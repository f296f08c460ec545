"""The server's interceptors as one pass (`InterceptorChain`), and the session interceptor: the
caller's session, applied before any servicer code (the token check and the caller's tenant are in
tenancy.py)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeAlias

import grpc

from ..domain.errors import NotFound, WeightavgError
from ..store.registry import CALLER_SESSION, Registry
from ..store.tenants import ANONYMOUS, Caller
from .status import status_for

SESSION_METADATA = "weightavg-session"
"""Metadata key naming the caller's session (lower case, as gRPC metadata keys must be)."""

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # a string: grpc's class is generic only in its stubs
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"


Metadata: TypeAlias = "Sequence[tuple[str, str | bytes]] | None"


def same_kind(
    handler: Handler, behaviour: Callable[..., Any], request_deserializer: Callable[[bytes], Any] | None = None
) -> Handler:
    """A handler of `handler`'s kind (its request and response streaming) that runs `behaviour`,
    with its (de)serializers (or `request_deserializer` in its place): what every layer that wraps a
    behaviour builds."""
    if handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    deserializer = request_deserializer or handler.request_deserializer
    return factory(behaviour, deserializer, handler.response_serializer)


def metadata_value(metadata: Metadata, key: str) -> str | None:
    """The value of a metadata key (a call's `context.invocation_metadata()`), as text; None when
    the call does not carry it."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


class Layer(Protocol):
    """One interceptor of the chain: wraps a method's handler once; what it does per call runs in
    the wrapped behaviour, on the worker thread that serves the call."""

    def wrap(self, method: str, handler: Handler) -> Handler: ...


class Gate(Protocol):
    """A layer's check of a call on gRPC's polling thread, before its request is read: a handler
    that refuses the call, or None to let it through."""

    def __call__(self, method: str, details: grpc.HandlerCallDetails, handler: Handler) -> Handler | None: ...


class Total(Protocol):
    """A count of workers that several layers' calls share (the tenants' total, shares.TenantShares)."""

    def take(self) -> bool:
        """Count one call; False, counting nothing, when the count is full."""
        ...

    def give(self) -> None:
        """Give back a place `take` counted."""
        ...

    def refusal(self) -> str:
        """The message of a call refused for a full count."""
        ...


class SingleRequests:
    """Reads a single-request method's request inside the layers, where a call is already counted
    against its caller's share, instead of letting grpc wait for it before any layer runs.

    grpc reads a single request on the worker thread, before any behaviour runs, for as long as the
    client takes to send it: a review held every worker with calls that sent their headers and never
    their message, Check calls without a token and, on a server with tenants, Pings with one
    tenant's token, which no share counted (a share counts a call once its behaviour runs), and no
    other tenant's call was served. As a layer of the chain inside the shares, it makes such a
    method's handler take its request as a stream (the same bytes on the wire), read as this layer's
    behaviour runs: after the share has counted the call (the layers inside it, the session's and
    the decoding's, see the single request as before), and, for the methods no share counts
    (`unshared`: health, open to callers without a token; keep-alives), within a bound of `limit`
    calls at once, past which a call is RESOURCE_EXHAUSTED at once (a keep-alive has renewed its
    session as it arrived, `SessionInterceptor.gate`). A sent request is read at once, so honest
    callers hold a slot for an instant. A streamed reply of such a method (health's Watch, open until
    its client cancels, on a worker all along) takes a slot of a bound of its own, `streams`, and
    keeps it to its end: a review held every worker with Watch streams sent without a token, and
    once they were bounded, the same streams took every place of the bound that Checks shared, so a
    liveness probe's Check was RESOURCE_EXHAUSTED. (grpc_health's non-blocking Watch would hold no
    worker, but it waits for a message to go out while holding the lock that the end of another
    Watch takes on grpc's polling thread: a test of it hung once in review, which that deadlock would
    explain.)

    Args:
        unshared: whether a method's calls are outside every share (health, keep-alives).
        limit: most single-reply calls of those methods waiting for their request at once.
        streams: most streamed-reply calls of those methods (health Watch streams) open at once.
        every: read every single request this way (a server with tenants' shares), not only the
            unshared methods' (a server whose callers all share one tenant has no share to keep).
        total: where streamed replies of those methods are counted too, once they have their own
            slot (the tenants' total, on a server with tenants' shares), or None.
    """

    def __init__(
        self, unshared: Callable[[str], bool], limit: int, streams: int = 1, every: bool = False,
        total: Total | None = None,
    ) -> None:
        self.unshared = unshared
        self.limit = limit
        self.streams = streams
        self.every = every
        self.total = total
        self._slots = threading.BoundedSemaphore(limit)
        self._stream_slots = threading.BoundedSemaphore(streams)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """A single-request handler again, as one that reads its request in its behaviour (for an
        unshared method, within a slot of the bound); other handlers as they are."""
        if handler.request_streaming or not (self.every or self.unshared(method)):
            return handler
        behaviour: Callable[..., Any] | None = handler.unary_stream or handler.unary_unary
        assert behaviour is not None  # grpc sets the behaviour that matches the flags
        unshared = self.unshared(method)
        slots = (self._stream_slots if handler.response_streaming else self._slots) if unshared else None
        name = method.rsplit("/", 1)[-1]
        if handler.response_streaming:
            full = (
                f"{name}: {self.streams} calls that no tenant's share counts (health Watch streams) are open, "
                "this server's cap; close Watch streams you no longer read, or probe with Check"
            )
        else:
            full = (
                f"{name}: {self.limit} calls that no tenant's share counts (health checks, keep-alives) are "
                "waiting for their request message, this server's cap; send the request with the call"
            )

        def take_slot(context: grpc.ServicerContext) -> None:
            if slots is not None and not slots.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full)

        def one(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            request = next(iter(requests), None)  # undecodable bytes: the inner DecodeGuard's stand-in
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} takes one request message; none was sent")
            return request

        def read(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            take_slot(context)
            try:
                request = one(requests, context)
            finally:
                if slots is not None:
                    slots.release()
            return behaviour(request, context)

        total = self.total if unshared else None

        def read_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            """A streamed reply keeps its slot (and its place in the `total`) to its end: a health
            Watch stays open until its client cancels, holding its worker all along."""
            take_slot(context)
            counted: Total | None = None  # the total this stream holds a place in, to give it back
            try:
                if total is not None:
                    if not total.take():
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, total.refusal())
                    counted = total
                yield from behaviour(one(requests, context), context)
            finally:
                if counted is not None:
                    counted.give()
                if slots is not None:
                    slots.release()

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                read_stream, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(read, handler.request_deserializer, handler.response_serializer)


class InterceptorChain(grpc.ServerInterceptor):
    """Several interceptors as one pass: each method's handler is wrapped by every layer once, on
    its first call, and every later call costs gRPC's interceptor pipeline one dictionary lookup
    and the layers' gates (a layer's `gate` method: the token check, which refuses a call before
    its request is read; a refusal is wrapped by the layers before that one, so it is counted).

    Four interceptors of their own cost four trips through the pipeline per call (gRPC calls each
    `intercept_service` through a closure of its own) and, where they read the call's metadata there,
    a handler built per call: about 20 us of a small call on the development machine (docs/perf.md).
    The first layer is outermost. A method's handler is fixed once the server has started, so the
    cache never goes stale.
    """

    def __init__(self, *layers: Layer) -> None:
        self._layers = layers
        self._gates: list[tuple[int, Gate]] = [
            (i, gate) for i, layer in enumerate(layers) if (gate := getattr(layer, "gate", None)) is not None
        ]
        self._handlers: dict[str, Handler] = {}

    def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        method = details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = continuation(details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
                return None
            for layer in reversed(self._layers):
                handler = layer.wrap(method, handler)
            self._handlers[method] = handler  # two first calls at once wrap twice, alike
        for i, gate in self._gates:
            refused = gate(method, details, handler)
            if refused is not None:
                for layer in reversed(self._layers[:i]):
                    refused = layer.wrap(method, refused)
                return refused
        return handler


class SessionInterceptor(grpc.ServerInterceptor):
    """Serve each call carrying `weightavg-session` inside that session: the session is renewed and
    kept alive while the call runs, and handles the call creates belong to it. Every call also
    ends sessions whose lease has run out, so an idle server without a reaper still frees them.

    A keep-alive renews its session as it arrives (`gate`, on gRPC's polling thread), not only once
    a worker serves it: with every worker busy, a live client's keep-alives wait in gRPC's queue.

    Args:
        caller_of: the caller a call's metadata names (the tenant layer's `caller_of`), so that a
            keep-alive renews only a session its caller may see; None: every caller is the one
            admin of a server without tokens.
    """

    def __init__(self, registry: Registry, caller_of: Callable[[Metadata], Caller | None] | None = None) -> None:
        self._registry = registry
        self._caller_of = caller_of

    def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        self.gate(details.method, details, handler)
        return self.wrap(details.method, handler)

    def gate(self, method: str, details: grpc.HandlerCallDetails, handler: Handler) -> Handler | None:
        """Renew the session a keep-alive carries, as it arrives; never refuses a call (None)."""
        if not method.endswith(_KEEP_ALIVE):
            return None
        metadata = details.invocation_metadata
        session = metadata_value(metadata, SESSION_METADATA)
        if session is not None:
            caller = self._caller_of(metadata) if self._caller_of is not None else ANONYMOUS
            if caller is not None:
                self._registry.touch(session, caller)
        return None

    def wrap(self, method: str, handler: Handler) -> Handler:
        return _in_session(handler, self._registry, ends_session=method.endswith(_CLOSE_SESSION))


_CLOSE_SESSION = "/CloseSession"
"""The method that ends the session it carries: a retry of it finds that session gone."""
_KEEP_ALIVE = "/KeepAliveSession"
"""The method that renews the session it carries as it arrives (`SessionInterceptor.gate`)."""


def _enter(
    registry: Registry, session: str, context: grpc.ServicerContext, ends_session: bool
) -> tuple[contextvars.Token[str | None], bool]:
    """Start a call in a session, and whether it counts as one of the session's calls in flight
    (then `end_call` must follow).

    An unknown or ended session aborts the call before any work, except for CloseSession: its
    retry, whose first attempt closed the session and lost the answer, must reach the request
    table to get that answer (store/requests.py). It runs as the session's without counting; with
    no remembered answer, closing the ended session answers NOT_FOUND as the abort would have.
    """
    try:
        registry.begin_call(session)
    except WeightavgError as exc:
        if not (ends_session and isinstance(exc, NotFound)):
            code, message = status_for(exc)
            context.abort(code, message)
        return CALLER_SESSION.set(session), False
    return CALLER_SESSION.set(session), True


def _in_session(handler: Handler, registry: Registry, ends_session: bool = False) -> Handler:
    """Wrap a handler's behaviour so that a call carrying a session runs inside it and ends the call
    afterwards, and every call first ends the sessions whose lease has run out.

    This runs on the worker thread that serves the call (the interceptor itself runs on gRPC's
    polling thread, and a call refused for capacity never reaches a worker), so the in-flight count
    is raised only for calls that really run. Streamed replies stay in the session until they end.
    `ends_session`: the method is CloseSession (see `_enter`).
    """
    if handler.response_streaming:
        inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream
        assert inner_stream is not None  # grpc sets the behaviour that matches the flags

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            registry.expire()
            session = metadata_value(context.invocation_metadata(), SESSION_METADATA)
            if session is None:
                yield from inner_stream(request, context)
                return
            token, counted = _enter(registry, session, context, ends_session)
            try:
                yield from inner_stream(request, context)
            finally:
                CALLER_SESSION.reset(token)
                if counted:
                    registry.end_call(session)

        return same_kind(handler, stream)

    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
    assert inner is not None  # grpc sets the behaviour that matches the flags

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        registry.expire()
        session = metadata_value(context.invocation_metadata(), SESSION_METADATA)
        if session is None:
            return inner(request, context)
        token, counted = _enter(registry, session, context, ends_session)
        try:
            return inner(request, context)
        finally:
            CALLER_SESSION.reset(token)
            if counted:
                registry.end_call(session)

    return same_kind(handler, unary)
