"""The one table from exceptions to gRPC status codes, applied to every RPC by a decorator."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
import torch

from ..domain.errors import WeightavgError
from ..store.requests import CALL_ACTIVE

log = logging.getLogger("weightavg.rpc")

F = TypeVar("F", bound=Callable[..., Any])


MAX_MESSAGE_CHARS = 1000
"""Longest status message sent. Messages echo what the client sent (a name, an id), and gRPC sends
the message percent-encoded in a trailer whose size it caps (16 KiB): a longer one replaced the
status with a transport error (RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit").
1,000 characters stay under the cap even if each is 4 UTF-8 bytes, each sent as 3 characters."""


def bounded(message: str) -> str:
    """The message, cut to `MAX_MESSAGE_CHARS` with a note of how much was left out."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    kept = MAX_MESSAGE_CHARS - 60  # room for the note
    return f"{message[:kept]}... ({len(message) - kept} more characters)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an exception raised while serving."""
    if isinstance(exc, WeightavgError):
        return grpc.StatusCode[exc.code], bounded(str(exc))
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "CUDA out of memory: " + str(exc).splitlines()[0]
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of memory"
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):
        # torch's CPU allocator reports running out of memory as a plain RuntimeError.
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of memory"
    if isinstance(exc, grpc.RpcError):
        # Raised by a request stream whose client cancelled (or ran out of time) mid-upload: the
        # client's doing, not a server fault, so no INTERNAL in the metrics and no traceback.
        return grpc.StatusCode.CANCELLED, "the call ended before its request stream did"
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log"


ANSWERED_METADATA = "weightavg-answered"
"""Trailing metadata on every status a handler of the server sends (value "1"): a client tells by it
a status the server answered from one gRPC made up for a call that never reached a handler (a refused
connection, a server that is not running), and gives its hint on where to connect to the second only.
A broken cluster's UNAVAILABLE, which names the flag to raise, ended with "could not reach ... is the
server running" (found by review). Clients in other languages may read it the same way."""


def _abort(context: grpc.ServicerContext, name: str, exc: Exception) -> NoReturn:
    code, message = status_for(exc)
    if not context.is_active():
        # The client cancelled or its deadline passed, so the error (an RpcError, or a stream that
        # ended short) is a consequence, not the cause; record the real reason in stats and logs.
        remaining = context.time_remaining()
        code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        message = f"the call ended by the client before it finished ({message})"
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", name)
    else:  # the interceptor (observe.py) logs every failed call at INFO with its code and message
        log.debug("%s -> %s: %s", name, code.name, message)
    context.set_trailing_metadata(((ANSWERED_METADATA, "1"),))
    context.abort(code, message)


def translate_errors(method: F) -> F:
    """Run an RPC method; turn any exception into a status (never UNKNOWN), for unary and streamed replies."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            active = CALL_ACTIVE.set(context.is_active)
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                _abort(context, name, exc)
            finally:
                with contextlib.suppress(ValueError):  # closed in another context: a dropped stream collected there
                    CALL_ACTIVE.reset(active)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        active = CALL_ACTIVE.set(context.is_active)  # a repeat waiting for its first call watches it
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, name, exc)
        finally:
            CALL_ACTIVE.reset(active)

    return unary  # type: ignore[return-value]
