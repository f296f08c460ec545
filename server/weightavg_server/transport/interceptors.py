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


def non_blocking(handler: Handler) -> bool:
    """Whether `handler` answers a response stream without a worker: its behaviour takes grpc's
    send callback and returns at once (`experimental_non_blocking`, as health's Watch does)."""
    behaviour = handler.unary_stream or handler.stream_stream
    return bool(getattr(behaviour, "experimental_non_blocking", False))


class OpenStreams:
    """Bounds the non-blocking response streams open at once (health's Watch: open to callers without
    a token, and open until the client cancels).

    Such a stream holds no worker, but it counts against the server's `maximum_concurrent_rpcs` for
    as long as it stays open, so without a bound a caller without any token could fill that limit
    with idle Watch streams and every other call would be refused. Past the bound a new one is
    RESOURCE_EXHAUSTED; a stream's slot is given back when it ends (grpc's termination callback).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler again, still non-blocking, each call taking a slot for as long as it is open."""
        # Typed (in grpc's stubs) as taking a request and a context; a non-blocking one takes the callback too.
        behaviour: Callable[..., Any] | None = handler.unary_stream or handler.stream_stream
        assert behaviour is not None  # non_blocking(handler) was checked
        slots, limit = self._slots, self.limit

        def bounded(request: Any, context: grpc.ServicerContext, send_response_callback: Callable[[Any], None]) -> Any:
            if not slots.acquire(blocking=False):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{method.rsplit('/', 1)[-1]}: this server has {limit} such streams open, its cap; close "
                    "streams you no longer read, or poll with Check instead",
                )
            if not context.add_callback(slots.release):  # the call ended already: no callback will come
                slots.release()
            return behaviour(request, context, send_response_callback)

        bounded.experimental_non_blocking = True  # type: ignore[attr-defined]  # grpc reads this attribute
        return same_kind(handler, bounded)


class OpenReads:
    """Bounds the calls of methods open to callers without a token (health's Check) that wait for
    their request message, and reads it where the bound is kept.

    grpc reads a single request on the worker thread, before any behaviour runs, for as long as the
    client takes to send it: a review held every worker with Check calls that sent their headers and
    never their message, and no tenant's call was served. Such a method's handler takes its request
    as a stream here (the same bytes on the wire), so that it is read inside a slot of this bound;
    past the bound a call is RESOURCE_EXHAUSTED at once. A sent request is read at once, so honest
    callers hold a slot for an instant.
    """

    def __init__(self, prefixes: tuple[str, ...], limit: int) -> None:
        self.prefixes = prefixes
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def applies(self, method: str, handler: Handler) -> bool:
        return method.startswith(self.prefixes) and not handler.request_streaming

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The single-request handler again, as one that reads its request within a slot."""
        behaviour: Callable[..., Any] | None = handler.unary_stream or handler.unary_unary
        assert behaviour is not None  # `applies` checked it takes a single request
        slots, limit, name = self._slots, self.limit, method.rsplit("/", 1)[-1]

        def read(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            if not slots.acquire(blocking=False):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{name}: {limit} calls open to callers without a token are waiting for their request "
                    "message, this server's cap; send the request with the call",
                )
            try:
                request = next(iter(requests), None)
            finally:
                slots.release()
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} takes one request message; none was sent")
            return behaviour(request, context)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(read, handler.request_deserializer, handler.response_serializer)
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

    A non-blocking response stream (health's Watch) is not given to the layers: each layer's
    wrapper is a plain behaviour, with which grpc serves the stream on a worker thread for as long as
    it stays open. A review held every worker of a server with tokens with as many Watch streams,
    sent without a token, and no tenant's call was served. Such streams are bounded by
    `open_streams` instead (`OpenStreams`), and left out of the per-method statistics; the gates
    still see them (a refusal is a plain handler, wrapped as any other). The single-request methods
    of `open_methods` (prefixes: health's Check) read their request within a bound of `open_reads`
    calls at once (`OpenReads`), inside the layers.
    """

    def __init__(
        self, *layers: Layer, open_streams: int = 1, open_methods: tuple[str, ...] = (), open_reads: int = 1
    ) -> None:
        self._open_streams = OpenStreams(max(1, open_streams))
        self._open_reads = OpenReads(open_methods, max(1, open_reads))
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
            if non_blocking(handler):  # holds no worker while open: bounded, not wrapped (see above)
                handler = self._open_streams.wrap(method, handler)
            else:
                if self._open_reads.applies(method, handler):
                    handler = self._open_reads.wrap(method, handler)
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
