"""The session interceptor: the caller's session, applied before any servicer code (the token check
and the caller's tenant are in tenancy.py)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc

from ..domain.errors import WeightavgError
from ..store.registry import CALLER_SESSION, Registry
from .status import status_for

SESSION_METADATA = "weightavg-session"
"""Metadata key naming the caller's session (lower case, as gRPC metadata keys must be)."""

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # a string: grpc's class is generic only in its stubs
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"


def metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    """The value of a call's metadata key, as text; None when the call does not carry it."""
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


class SessionInterceptor(grpc.ServerInterceptor):
    """Serve each call carrying `weightavg-session` inside that session: the session is renewed and
    kept alive while the call runs, and handles the call creates belong to it. Every call also
    ends sessions whose lease has run out, so an idle server without a reaper still frees them."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(details)
        self._registry.expire()
        session = metadata_value(details, SESSION_METADATA)
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
