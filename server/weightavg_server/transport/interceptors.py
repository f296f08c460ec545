"""Server interceptors: the bearer-token check and the caller's session, applied before any servicer code."""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc

from ..domain.errors import WeightavgError
from ..store.registry import CALLER_SESSION, Registry
from .status import status_for

log = logging.getLogger("weightavg.security")

SESSION_METADATA = "weightavg-session"
"""Metadata key naming the caller's session (lower case, as gRPC metadata keys must be)."""
AUTHORIZATION_METADATA = "authorization"
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without the token: health checks, so orchestrators can probe without the secret
(they learn only SERVING or NOT_SERVING)."""

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # a string: grpc's class is generic only in its stubs
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same shape as `handler` that answers `code` without running anything."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every call except health checks: UNAUTHENTICATED
    otherwise, decided from the metadata alone before any request is read or any work is done."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        given = _metadata(details, AUTHORIZATION_METADATA)
        # compare_digest: the time taken must not reveal how much of a guessed token was right.
        if given is not None and hmac.compare_digest(given.encode(), self._expected):
            return handler
        reason = "no bearer token" if given is None else "wrong bearer token"
        log.info("%s -> UNAUTHENTICATED: %s", details.method, reason)
        return _refusal(
            handler, grpc.StatusCode.UNAUTHENTICATED,
            f"{reason}: this server requires 'authorization: Bearer <token>' metadata "
            "(Client(token=...) or WEIGHTAVG_TOKEN)",
        )


class SessionInterceptor(grpc.ServerInterceptor):
    """Serve each call carrying `weightavg-session` inside that session: the session is renewed and
    kept alive while the call runs, and handles the call creates belong to it. Every call also
    ends sessions whose lease has run out, so an idle server without a reaper still frees them."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(details)
        self._registry.expire()
        session = _metadata(details, SESSION_METADATA)
        if handler is None or session is None:
            return handler
        return _in_session(handler, self._registry, session)


def _enter(registry: Registry, session: str, context: grpc.ServicerContext) -> contextvars.Token[str | None]:
    """Start a call in a session (unknown or ended session: abort before any work)."""
    try:
        registry.begin_call(session)
    except WeightavgError as exc:
        code, message = status_for(exc)
        context.abort(code, message)
    return CALLER_SESSION.set(session)


def _in_session(handler: Handler, registry: Registry, session: str) -> Handler:
    """Wrap a handler's behaviour so it runs inside the session and ends the call afterwards.

    This runs on the worker thread that serves the call (the interceptor itself runs on gRPC's
    polling thread, and a call refused for capacity never reaches a worker), so the in-flight count
    is raised only for calls that really run. Streamed replies stay in the session until they end.
    """
    if handler.response_streaming:
        inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream
        assert inner_stream is not None  # grpc sets the behaviour that matches the flags

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _enter(registry, session, context)
            try:
                yield from inner_stream(request, context)
            finally:
                CALLER_SESSION.reset(token)
                registry.end_call(session)

        factory = (
            grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        )
        return factory(stream, handler.request_deserializer, handler.response_serializer)

    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
    assert inner is not None  # grpc sets the behaviour that matches the flags

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        token = _enter(registry, session, context)
        try:
            return inner(request, context)
        finally:
            CALLER_SESSION.reset(token)
            registry.end_call(session)

    factory = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return factory(unary, handler.request_deserializer, handler.response_serializer)
