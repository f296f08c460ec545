"""Requests that do not parse are answered INVALID_ARGUMENT; left to itself grpc answers INTERNAL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from .errors import InvalidArgument


class Undecodable:
    """Stands in for a request message whose bytes did not parse (garbage, or nested too deeply)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @property
    def message(self) -> str:
        return f"request message does not parse: {self.reason}"


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError...: all mean bad bytes
            return Undecodable(str(exc) or type(exc).__name__)

    return decode


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    """A client stream that raises InvalidArgument at the first message that did not parse.

    The servicer's error translation turns it into INVALID_ARGUMENT, like any other bad input.
    """
    for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.message)
        yield request


class DecodeGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Catches undecodable requests to one service (whose methods translate domain errors)."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"

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
        safe = _safe(handler.request_deserializer)
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
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return behavior(request, context)

        return handler._replace(request_deserializer=safe, **{name: unary})
