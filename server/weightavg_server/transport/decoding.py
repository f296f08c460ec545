"""Requests that do not parse are answered INVALID_ARGUMENT (grpc itself answers INTERNAL), and
requests over the message size cap RESOURCE_EXHAUSTED inside the call.

Why the size cap is checked here rather than only by grpc: when grpc refuses a message of a client
stream for its size, the server's request iterator just ends, as if the client had finished, so a
call could commit the part of a stream that came before. grpc's own limit is therefore set to a
ceiling above the cap (see app.server_options) and the cap is enforced here, where the call fails
as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc

from ..domain.errors import InvalidArgument, ResourceExhausted
from .interceptors import same_kind
from .status import status_for

# A string: grpc's RpcMethodHandler is generic only in its type stubs, not at run time.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Undecodable:
    """Stands in for a request message that is over the size cap or whose bytes did not parse.

    It carries the domain error to answer with, so status.status_for picks the code, as for any
    other error.
    """

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument | ResourceExhausted) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any], max_bytes: int) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Undecodable(ResourceExhausted(
                f"request message of {len(data)} bytes is over the cap of {max_bytes} (--max-message-bytes); "
                "send tensors in smaller chunks"
            ))
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError...: all mean bad bytes
            return Undecodable(InvalidArgument(f"request message does not parse: {str(exc) or type(exc).__name__}"))

    return decode


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    """A client stream that raises at the first message that is over the cap or did not parse.

    The servicer's error translation turns the error into its status, like any other bad input.
    """
    for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


def _guarded_stream(handler: Handler, safe: Callable[[bytes], Any]) -> Handler:
    """The client-streaming handler again, its requests decoded by `safe` and checked as they come."""
    behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
    if behavior is None:  # not a handler grpc would call; nothing to guard
        return handler

    def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(_checked(requests), context)

    return same_kind(handler, streamed, safe)


def _guarded_unary(handler: Handler, safe: Callable[[bytes], Any]) -> Handler:
    """The single-request handler again, answering a request `safe` could not decode with its status.

    Here no servicer method runs, so the status comes from status_for directly.
    """
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if behavior is None:  # not a handler grpc would call; nothing to guard
        return handler

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            context.abort(*status_for(request.error))
        return behavior(request, context)

    return same_kind(handler, unary, safe)


class DecodeGuard(grpc.ServerInterceptor):
    """Catches oversized and undecodable requests to one service (whose methods translate domain errors)."""

    def __init__(self, service: str, max_message_bytes: int) -> None:
        self._prefix = f"/{service}/"
        self._max_bytes = max_message_bytes
        # method -> (handler, guarded handler): the guard is built once per method, not per call
        # (the servicer's handlers are fixed objects; a different one is guarded afresh).
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else self.wrap(handler_call_details.method, handler)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler again, its requests decoded safely (other services' handlers: as they are)."""
        if handler.request_deserializer is None or not method.startswith(self._prefix):
            return handler
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        safe = _safe(handler.request_deserializer, self._max_bytes)
        guarded = _guarded_stream(handler, safe) if handler.request_streaming else _guarded_unary(handler, safe)
        self._guarded[method] = (handler, guarded)
        return guarded
