"""A server interceptor that times every RPC, records it in RpcStats and logs one line per call."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from weightavg.wire import chunk_data_bytes
from weightavg.v1 import weightavg_pb2 as pb

from .codec import Encoded
from .stats import RpcStats

log = logging.getLogger("weightavg.rpc")

# Messages whose `chunk` field carries tensor data; their bytes are what "bytes in/out" counts.
_CHUNKED = tuple(
    getattr(pb, message.name)
    for message in pb.DESCRIPTOR.message_types_by_name.values()
    if "chunk" in message.fields_by_name and message.fields_by_name["chunk"].message_type is pb.TensorChunk.DESCRIPTOR
)


def _chunk_bytes(message: object) -> int:
    """Tensor bytes in one message (0 for messages that carry none), its packed chunks' included.

    The tensor streams' hand codecs (servicer.add_to_server) pass FetchTensors replies encoded, with
    their tensor bytes beside them, and upload requests as objects whose `chunk.data` is a
    memoryview; both count the same.
    """
    if isinstance(message, _CHUNKED):
        return chunk_data_bytes(message.chunk)
    if isinstance(message, Encoded):  # a pre-encoded reply says itself: no parsing it again
        return message.data_bytes
    chunk = getattr(message, "chunk", None)
    return chunk_data_bytes(chunk) if chunk is not None else 0


def _no_bytes(message: object) -> int:
    return 0


_WEIGHTAVG_METHODS = {
    f"/{service.full_name}/{m.name}": m for service in pb.DESCRIPTOR.services_by_name.values() for m in service.methods
}


def _counters(method: str) -> tuple[Callable[[object], int], Callable[[object], int]]:
    """How to count one method's request and response tensor bytes, decided once per method: a
    weightavg message without a chunk field counts 0 without looking (most calls); the rest
    (chunked messages, other services' methods) go through `_chunk_bytes`."""
    described = _WEIGHTAVG_METHODS.get(method)
    if described is None:
        return _chunk_bytes, _chunk_bytes

    def counter(message_type: Any) -> Callable[[object], int]:
        return _chunk_bytes if "chunk" in message_type.fields_by_name else _no_bytes

    return counter(described.input_type), counter(described.output_type)


class _Call:
    """One call in progress: when it started and the tensor bytes it moved so far."""

    __slots__ = ("method", "context", "start", "received", "sent", "count")

    def __init__(
        self, stats: RpcStats, method: str, context: grpc.ServicerContext, count: Callable[[object], int]
    ) -> None:
        stats.start(method)
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        self.received = 0
        self.sent = 0
        self.count = count
        """Tensor bytes in one request message."""

    def counted(self, request: Any, streaming: bool) -> Any:
        """The request (or request stream, counted as it is read), its tensor bytes recorded."""
        if streaming:
            return self.count_requests(request)
        self.received = self.count(request)
        return request

    def count_requests(self, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            self.received += self.count(request)
            yield request

    def finish(self, stats: RpcStats, exc: BaseException | None) -> None:
        seconds = time.perf_counter() - self.start
        code = status_name(self.context, exc)
        stats.finish(self.method, code, seconds, self.received, self.sent)
        if code == "OK":
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "rpc method=%s code=OK duration_ms=%.3f peer=%s bytes_in=%d bytes_out=%d",
                    self.method, seconds * 1e3, self.context.peer(), self.received, self.sent,
                )
        else:
            log.info(
                "rpc method=%s code=%s duration_ms=%.3f peer=%s bytes_in=%d bytes_out=%d details=%s",
                self.method, code, seconds * 1e3, self.context.peer(), self.received, self.sent,
                json.dumps(_text(self.context.details())),  # type: ignore[attr-defined]  # see status_name
            )


def _text(details: str | bytes | None) -> str:
    """The status message as text (grpc keeps the one given to abort() as UTF-8 bytes)."""
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""


def status_name(context: grpc.ServicerContext, exc: BaseException | None, *, as_client: bool = True) -> str:
    """The status code name the client receives; with `as_client=False`, "OK" for a handler that
    returned, though its client had stopped waiting (the audit trail's outcome: the change was made)."""
    # ServicerContext.code()/details() exist since grpcio 1.38 (marked experimental) but are missing
    # from types-grpcio's stubs.
    code = context.code()  # type: ignore[attr-defined]
    if code is not None:  # set by abort() (translate_errors) or set_code() (the health service)
        return str(code.name)
    if exc is None:
        # A handler that returned after its deadline passed (or after the client cancelled) did its
        # work, but the client got DEADLINE_EXCEEDED or CANCELLED, not the answer: counted as OK, a
        # review's 25 calls past their deadline showed as 24 OK and no failure. The deadline is read
        # too: grpc may learn that the call was cut off only after the handler has returned.
        return "OK" if not as_client or (context.is_active() and not _past_deadline(context)) else _gone(context)
    if isinstance(exc, GeneratorExit):  # the client went away in the middle of a response stream
        return _gone(context)
    return "UNKNOWN"  # grpc answers UNKNOWN for an exception nobody translated


def _past_deadline(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _gone(context: grpc.ServicerContext) -> str:
    """The status of a call whose client stopped waiting: its deadline passed, or it cancelled."""
    return "DEADLINE_EXCEEDED" if _past_deadline(context) else "CANCELLED"


class ObservingInterceptor(grpc.ServerInterceptor):
    """Wraps every method handler (the service's, health's, reflection's) to feed `stats` and the log."""

    def __init__(self, stats: RpcStats) -> None:
        self.stats = stats
        # method -> (handler, observed handler): wrapping once per method, not per call, keeps a
        # bare call's overhead to the timing and counting themselves.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        observed_handler = self.wrap(method, handler)
        self._wrapped[method] = (handler, observed_handler)
        return observed_handler

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        wrap: Callable[..., grpc.RpcMethodHandler[Any, Any]]
        behavior: Callable[..., Any] | None
        if handler.unary_unary:
            wrap, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        elif handler.unary_stream:
            wrap, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        elif handler.stream_unary:
            wrap, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        else:
            wrap, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        assert behavior is not None  # exactly one of the four is set
        observed = (
            self._streaming(method, behavior, handler.request_streaming)
            if handler.response_streaming
            else self._unary(method, behavior, handler.request_streaming)
        )
        return wrap(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method: str, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        stats = self.stats
        count_in, count_out = _counters(method)

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(stats, method, context, count_in)
            request = call.counted(request, request_streaming)
            try:
                response = behavior(request, context)
            except BaseException as exc:
                call.finish(stats, exc)
                raise
            call.sent = count_out(response)
            call.finish(stats, None)
            return response

        return observed

    def _streaming(self, method: str, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        stats = self.stats
        count_in, count_out = _counters(method)

        def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(stats, method, context, count_in)
            request = call.counted(request, request_streaming)
            try:
                for response in behavior(request, context):
                    call.sent += count_out(response)
                    yield response
            except BaseException as exc:
                call.finish(stats, exc)
                raise
            call.finish(stats, None)

        return observed
