"""Request IDs and retries: a call that fails UNAVAILABLE is sent again, with the same request ID.

Every request message with a `request_id` field (the calls that change state) gets a new UUID unless
it has one; the server answers a repeat of that ID with the first answer instead of running the call
again (docs/robust.md), so a retry after a lost answer cannot count a sample twice. Only UNAVAILABLE
is retried (AIP-194): the server was unreachable, restarting, or the connection dropped. Any other
status is the call's answer.

gRPC's own retries (a `retryPolicy` in the service config) are not used: they stop once a call has
sent more than a small buffer (256 KiB by default), so a lost answer to an upload would not be
retried, and they cannot give each call its request ID. This interceptor sends an upload again from
its source (`Replayable`) instead of buffering it.
"""

from __future__ import annotations

import collections
import logging
import random
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

log = logging.getLogger("weightavg.client")

T = TypeVar("T")


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
"""A random hex digit's variant digit (RFC 4122: its top two bits 10), keeping its two random bits."""


def new_request_id() -> str:
    """A fresh request ID: a random (version 4) UUID in its 36-character form.

    What `str(uuid.uuid4())` gives (122 bits from os.urandom, the version and variant digits set),
    in a third of its time: every state-changing call makes one.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries calls that fail with UNAVAILABLE.

    Args:
        max_attempts: attempts in all, the first included; 1 turns retries off.
        initial_backoff: seconds; retry n waits a random time between 0 and
            min(max_backoff, initial_backoff * multiplier ** (n - 1)) ("full jitter", as in gRPC's
            retry design A6), so clients that lost the server together do not return together.
        max_backoff: the longest wait between two attempts, in seconds.
        multiplier: how much the longest wait grows from one retry to the next.

    Retries stay within the call's deadline (the client's `timeout`): no attempt starts after it.

    Example:
        >>> Client("127.0.0.1:50051", retry=RetryPolicy(max_attempts=10, max_backoff=30.0))
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (no retries), given {self.max_attempts}")
        if not (0 <= self.initial_backoff <= self.max_backoff) or self.multiplier < 1:
            raise ValueError("need 0 <= initial_backoff <= max_backoff and multiplier >= 1")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        return rng.uniform(0.0, min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1)))


class Replayable(Iterator[T]):
    """A request stream that can be made again from its source, so that a retry re-sends it whole.

    It iterates like the stream `messages()` makes; `again()` makes a new one for the next attempt.
    """

    def __init__(self, messages: Callable[[], Iterator[T]]) -> None:
        self._messages = messages
        self._first = messages()

    def __next__(self) -> T:
        return next(self._first)

    def again(self) -> Iterator[T]:
        return self._messages()


class _Outcome(Protocol):
    def exception(self, timeout: float | None = None) -> BaseException | None: ...


O = TypeVar("O", bound=_Outcome)


class _Read(Generic[T]):
    """A response stream read to its end (or to its error), to hand over once no retry is needed."""

    def __init__(self, call: Iterator[T]) -> None:
        self._messages: list[T] = []
        self._error: grpc.RpcError | None = None
        try:
            self._messages.extend(call)
        except grpc.RpcError as exc:
            self._error = exc

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._error

    def __iter__(self) -> Iterator[T]:
        if self._error is not None:
            raise self._error
        return iter(self._messages)


_KEYED: dict[type, bool] = {}
"""Request message types by whether they have a request_id field (looked up once per type)."""


def _changes_state(request: Any) -> bool:
    """Whether a request message is of a call that changes state: it has a request_id field."""
    keyed = _KEYED.get(type(request))
    if keyed is None:
        keyed = _KEYED[type(request)] = isinstance(request, Message) and "request_id" in request.DESCRIPTOR.fields_by_name
    return keyed


def with_request_id(request: Any) -> Any:
    """The request with a new request ID when its message has the field and it is empty (a copy)."""
    if _changes_state(request) and not request.request_id:
        copy = type(request)()
        copy.CopyFrom(request)
        copy.request_id = new_request_id()
        return copy
    return request


def _unavailable(error: BaseException | None) -> bool:
    return isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE


def _details(error: BaseException | None) -> str:
    return str(error.details()) if isinstance(error, grpc.Call) else str(error)


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """Call details (grpc.ClientCallDetails is abstract; this is the usual recipe)."""


def _with_timeout(details: Any, timeout: float | None) -> _Details:
    """The call's details with the time left of its deadline."""
    return _Details(details.method, timeout, details.metadata, details.credentials, details.wait_for_ready,
                    details.compression)


class RetryInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Gives state-changing calls their request IDs and retries UNAVAILABLE calls (see the module docstring).

    Unary calls are retried whole. A streamed answer to a state-changing call (an epoch's metrics)
    is read to its end before it is handed over, so it too can be retried whole; a streamed answer
    to a read is retried only until its first message arrives. An upload is retried when it is
    `Replayable`; a read that uploads and streams its answer (EvaluateModel) as a read, sent again
    from its source.
    """

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()

    def _attempts(
        self, details: Any, attempt: Callable[[Any, int], O], first: O | None = None, start: float | None = None
    ) -> O:
        """Run attempt(details, n) until it does not fail UNAVAILABLE, attempts run out, or the
        deadline would pass; the last outcome. `first`: the first attempt's outcome, made at
        `start` (time.monotonic()) by the caller."""
        deadline = None if details.timeout is None else (time.monotonic() if start is None else start) + details.timeout
        n = 1
        outcome = first
        while True:
            if outcome is None:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                outcome = attempt(_with_timeout(details, remaining), n)
            error = outcome.exception()
            if n >= self.policy.max_attempts or not _unavailable(error):
                return outcome
            delay = self.policy.backoff(n, self._rng)
            if deadline is not None and time.monotonic() + delay >= deadline:
                return outcome
            log.info("%s: UNAVAILABLE (%s); retry %d in %.2f s", details.method, _details(error), n, delay)
            time.sleep(delay)
            n += 1
            outcome = None

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        request = with_request_id(request)
        return self._attempts(details, lambda d, _: continuation(d, request))

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        if not isinstance(request_iterator, Replayable):
            return continuation(details, request_iterator)
        stream = request_iterator
        return self._attempts(details, lambda d, n: continuation(d, stream if n == 1 else stream.again()))

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        if _changes_state(request):
            request = with_request_id(request)
            return self._attempts(details, lambda d, _: _Read(continuation(d, request)))
        return self._read(continuation, details, lambda n: request)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        if not isinstance(request_iterator, Replayable):
            return continuation(details, request_iterator)
        stream = request_iterator
        return self._read(continuation, details, lambda n: stream if n == 1 else stream.again())

    def _read(self, continuation: Any, details: Any, request: Callable[[int], Any]) -> Iterator[Any]:
        """A read's response stream, retried while none of it has arrived (`request(n)`: the n-th
        attempt's request, or request stream)."""
        deadline = None if details.timeout is None else time.monotonic() + details.timeout
        n = 1
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            started = False
            try:
                for message in continuation(_with_timeout(details, remaining), request(n)):
                    started = True
                    yield message
                return
            except grpc.RpcError as exc:
                if started or n >= self.policy.max_attempts or not _unavailable(exc):
                    raise
                delay = self.policy.backoff(n, self._rng)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise
                log.info("%s: UNAVAILABLE (%s); retry %d in %.2f s", details.method, _details(exc), n, delay)
            time.sleep(delay)
            n += 1


class _Unary(Generic[T]):
    """One attempt of a unary call made directly on the channel: its response, or the RpcError it failed with."""

    __slots__ = ("error", "response")

    def __init__(self, call: Callable[[], T] | None = None, error: grpc.RpcError | None = None) -> None:
        self.response: T | None = None
        self.error = error
        if call is None:
            return
        try:
            self.response = call()
        except grpc.RpcError as exc:
            self.error = exc

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self.error


if TYPE_CHECKING:
    _UnaryCallable = grpc.UnaryUnaryMultiCallable[Any, Any]
else:
    _UnaryCallable = grpc.UnaryUnaryMultiCallable


class _DirectUnary(_UnaryCallable):
    """A unary method that adds the metadata, the request ID and the retries itself, on the bare channel.

    What the interceptors would do (`RetryInterceptor.intercept_unary_unary`, then the metadata),
    without gRPC's interceptor pipeline, which cost about 90 us a call on the 2-vCPU development
    machine (a Ping through the interceptors against one on the bare channel, docs/perf.md).
    `with_call` and `future` go through the interceptors as before.
    """

    def __init__(
        self, direct: grpc.UnaryUnaryMultiCallable[Any, Any], intercepted: grpc.UnaryUnaryMultiCallable[Any, Any],
        method: str, retry: RetryInterceptor, pairs: dict[str, str],
    ) -> None:
        self._direct = direct
        self._intercepted = intercepted
        self._method = method
        self._retry = retry
        self._pairs = pairs

    def __call__(
        self, request: Any, timeout: float | None = None, metadata: Any = None, credentials: Any = None,
        wait_for_ready: bool | None = None, compression: Any = None,
    ) -> Any:
        request = with_request_id(request)
        pairs = (*(metadata or ()), *self._pairs.items())
        start = time.monotonic()
        try:  # the first attempt directly: most calls need no other
            return self._direct(request, timeout=timeout, metadata=pairs, credentials=credentials,
                                wait_for_ready=wait_for_ready, compression=compression)
        except grpc.RpcError as exc:
            if not _unavailable(exc):
                raise
            first: _Unary[Any] = _Unary(error=exc)
        details = _Details(self._method, timeout, pairs, credentials, wait_for_ready, compression)

        def attempt(d: _Details, _: int) -> _Unary[Any]:
            return _Unary(lambda: self._direct(
                request, timeout=d.timeout, metadata=d.metadata, credentials=d.credentials,
                wait_for_ready=d.wait_for_ready, compression=d.compression,
            ))

        outcome = self._retry._attempts(details, attempt, first, start)
        if outcome.error is not None:
            raise outcome.error
        return outcome.response

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._intercepted.with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._intercepted.future(*args, **kwargs)


class DirectUnaryChannel(grpc.Channel):
    """A channel for generated stubs: unary calls as `_DirectUnary`, everything else through `intercepted`
    (the same channel with the retry and metadata interceptors)."""

    def __init__(self, raw: grpc.Channel, intercepted: grpc.Channel, retry: RetryInterceptor, pairs: dict[str, str]) -> None:
        self._raw = raw
        self._intercepted = intercepted
        self._retry = retry
        self._pairs = pairs

    def unary_unary(  # grpcio's generated stubs also pass _registered_method (kwargs)
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kwargs: Any
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return _DirectUnary(
            self._raw.unary_unary(method, request_serializer, response_deserializer, **kwargs),
            self._intercepted.unary_unary(method, request_serializer, response_deserializer, **kwargs),
            method, self._retry, self._pairs,
        )

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._intercepted.unary_stream(*args, **kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return self._intercepted.stream_unary(*args, **kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._intercepted.stream_stream(*args, **kwargs)

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        self._intercepted.subscribe(*args, **kwargs)

    def unsubscribe(self, *args: Any, **kwargs: Any) -> None:
        self._intercepted.unsubscribe(*args, **kwargs)

    def close(self) -> None:
        self._intercepted.close()
