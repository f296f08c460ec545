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
from typing import Any

import grpc

from ..domain.errors import InvalidArgument, ResourceExhausted


class Undecodable:
    """Stands in for a request message that is over the size cap or whose bytes did not parse."""

    __slots__ = ("message", "oversized")

    def __init__(self, message: str, oversized: bool = False) -> None:
        self.message = message
        self.oversized = oversized

    def error(self) -> InvalidArgument | ResourceExhausted:
        return ResourceExhausted(self.message) if self.oversized else InvalidArgument(self.message)


def _safe(deserializer: Callable[[bytes], Any], max_bytes: int) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Undecodable(
                f"request message of {len(data)} bytes is over the cap of {max_bytes} (--max-message-bytes); "
                "send tensors in smaller chunks",
                oversized=True,
            )
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError...: all mean bad bytes
            return Undecodable(f"request message does not parse: {str(exc) or type(exc).__name__}")

    return decode


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    """A client stream that raises at the first message that is over the cap or did not parse.

    The servicer's error translation turns the error into its status, like any other bad input.
    """
    for request in requests:
        if isinstance(request, Undecodable):
            raise request.error()
        yield request


class DecodeGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Catches oversized and undecodable requests to one service (whose methods translate domain errors)."""

    def __init__(self, service: str, max_message_bytes: int) -> None:
        self._prefix = f"/{service}/"
        self._max_bytes = max_message_bytes

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        safe = _safe(handler.request_deserializer, self._max_bytes)
        if handler.request_streaming:
            name = "stream_unary" if not handler.response_streaming else "stream_stream"
            behavior = getattr(handler, name)

            def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return behavior(_checked(requests), context)

            return handler._replace(request_deserializer=safe, **{name: streamed})
        name = "unary_unary" if not handler.response_streaming else "unary_stream"
        behavior = getattr(handler, name)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if request.oversized else grpc.StatusCode.INVALID_ARGUMENT
                context.abort(code, request.message)
            return behavior(request, context)

        return handler._replace(request_deserializer=safe, **{name: unary})
