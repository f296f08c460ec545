"""The Python client: the reference's verbs as methods, numpy in and out, handles as small objects."""

from __future__ import annotations

import builtins
import collections
import contextlib
import difflib
import functools
import logging
import math
import os
import re
import reprlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
import numpy as np
import numpy.typing as npt

from . import _cuda, _objects, _shm, _specs, wire
from ._errors import (
    CancelledError, DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
    ResourceExhaustedError, UnavailableError, UnimplementedError, WeightavgError,
    from_rpc_error,
)
from ._records import Handle, HandleInfo, ModuleRow, SharedRegion, Soup
from ._retry import DirectUnaryChannel, Replayable, RetryInterceptor, RetryPolicy, new_request_id
from .v1 import weightavg_pb2 as pb
from .v1 import weightavg_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 300.0
"""Seconds a call may take before DEADLINE_EXCEEDED; generous because training epochs are calls."""
DEFAULT_PORT = 50051
"""The port an address without one gets: `weightavg serve`'s default (gRPC's own would be 443)."""
_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "dns:", "ipv4:", "ipv6:")
"""gRPC target schemes, passed through as they are."""
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
"""Same cap as the server's default; tensors stream in 4 MiB chunks, so only runaway messages hit it."""

CHUNK_HEADER_ROOM = 1024
"""Bytes of a stream message beside its chunk of data (name, shape, framing), as the server's
config reserves them (weightavg_server.ops.config.CHUNK_HEADER_ROOM)."""


def _checked_message_cap(chunk_bytes: int, max_message_bytes: int) -> None:
    """ValueError unless a chunk and its header fit this client's message cap (gRPC's -1: none).
    A chunk_bytes over it made every upload of a tensor larger than the cap fail RESOURCE_EXHAUSTED
    "CLIENT: Sent message larger than max", after the client was made (found by review)."""
    room = max_message_bytes - CHUNK_HEADER_ROOM
    if max_message_bytes >= 0 and chunk_bytes > room:
        fix = f"give chunk_bytes={room} or less" if room > 0 else f"raise max_message_bytes above {CHUNK_HEADER_ROOM}"
        raise ValueError(
            f"chunk_bytes ({chunk_bytes}) leaves no room in max_message_bytes ({max_message_bytes}) for a chunk's "
            f"name and shape ({CHUNK_HEADER_ROOM} bytes): uploads of larger tensors would be refused; {fix}"
        )


MIN_REPLY_CHUNK_BYTES = 1 << 10
"""The smallest FetchTensorsRequest.max_chunk_bytes a server takes (INVALID_ARGUMENT below it)."""


def _reply_chunk_bytes(chunk_bytes: int, max_message_bytes: int | None) -> int:
    """FetchTensorsRequest.max_chunk_bytes for a client: its chunk_bytes, less where its receive limit
    (None: a channel of the caller's, whose limit it does not know; gRPC's -1: none) leaves less room,
    never below the server's floor. Without it the server sent its own --chunk-bytes, and a client
    whose limit was below them fetched no tensor larger than the limit (RESOURCE_EXHAUSTED "Received
    message larger than max")."""
    if max_message_bytes is None or max_message_bytes < 0:
        return max(MIN_REPLY_CHUNK_BYTES, chunk_bytes)
    return max(MIN_REPLY_CHUNK_BYTES, min(chunk_bytes, max_message_bytes - CHUNK_HEADER_ROOM))


_KIND_NAMES = {
    pb.HANDLE_KIND_MODULE: "module",
    pb.HANDLE_KIND_MODEL: "model",
    pb.HANDLE_KIND_OPTIMIZER: "optimizer",
    pb.HANDLE_KIND_LOSS: "loss",
    pb.HANDLE_KIND_DICTIONARY: "dictionary",
    pb.HANDLE_KIND_TENSOR: "tensor",
}

T = TypeVar("T")
R = TypeVar("R", bound=Message)
"""A response message type."""
_SERVICE = pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name

EMA_KEY = ".ema"
"""Where size() shows an exponential moving average's schedule; like '.n', no parameter can have the name."""

SESSION_METADATA = "weightavg-session"
ANSWERED_METADATA = "weightavg-answered"
"""Trailing metadata the server puts on every status its handlers send (the server's
transport/status.py): such an UNAVAILABLE is the server's own answer, not a failure to reach it."""
"""Metadata key that carries the session id on every call of a session client."""

log = logging.getLogger("weightavg.client")


HandleLike = Handle | str
DtypeLike = Any
"""A dtype: its name ("float32", "bfloat16"), a numpy dtype or scalar type (np.float32,
ml_dtypes.bfloat16), or a torch dtype (torch.float32); Any, since the client does not import torch."""


def _learning_rate(value: Any) -> float:
    """A learning rate as a float. A bool or a string is a TypeError: float() made lr(m, True) 1.0 and
    lr(m, "0.3") 0.3 without a word, where opt() refuses both (found by review)."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"lr(m, value): the learning rate must be a number, given {value!r}")
    return float(value)


def _id(handle: HandleLike) -> str:
    """A handle's id. Anything but a Handle or an id string is a TypeError that says so: an int or
    None failed inside protobuf as "bad argument type for built-in operation" (found by review)."""
    if isinstance(handle, Handle):
        return handle.id
    if not isinstance(handle, str):
        raise TypeError(f"a handle is a Handle or its id string, not {_not_a_handle(handle)}")
    return handle


def _not_a_handle(value: object) -> str:
    """A value given where a handle goes, described briefly, with what to do: values themselves (a
    state dict as a merge's base, say) are uploaded first. A state dict's whole repr went into the
    error, every tensor of it, and said nothing of the upload (found by a new user's walk-through)."""
    kind = type(value).__name__
    if isinstance(value, _objects.Remote):
        return f"{kind} {value!r}; pass the object's .handle"
    if isinstance(value, Mapping):
        return (
            f"{kind} of {len(value)} entries; upload named values first: c.dict(values) "
            "(weightavg.torch.push(c, state_dict) for tensors) returns a handle"
        )
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{kind} of shape {list(shape)}; upload an array or tensor first: c.tensor(x) returns a handle"
    return f"{kind} {reprlib.repr(value)}"


def _name(name: Any) -> str:
    """An entry or parameter name, checked: a string. An int failed inside protobuf ("bad argument
    type for built-in operation"), and bytes were fetched under the decoded name and then looked up
    under the bytes (KeyError b'a'), found by review."""
    if not isinstance(name, str):
        raise TypeError(f"names are strings, not {type(name).__name__} {name!r}")
    return name


def _empty_specs(shapes: Mapping[str, tuple[Any, Any]]) -> list[tuple[str, tuple[int, ...], np.dtype[Any]]]:
    """`Client.empty`'s {name: (shape, dtype)}, checked: names as entries take them, shapes of
    non-negative ints (an int for one dimension), dtypes the wire carries."""
    if not isinstance(shapes, Mapping):
        raise TypeError("empty() takes a mapping of name -> (shape, dtype), e.g. {'w': ((4, 3), 'float32')}")
    out = []
    for name, spec in shapes.items():
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise TypeError(f"empty(): entry '{name}' must be a (shape, dtype) pair, e.g. ((4, 3), 'float32')")
        shape_given, dtype_given = spec
        shape = (shape_given,) if isinstance(shape_given, (int, np.integer)) else tuple(shape_given)
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"empty(): entry '{name}' has shape {shape_given!r}; give non-negative ints")
        dtype = np.dtype(dtype_given)
        if dtype not in wire._CODES:
            raise TypeError(f"empty(): dtype {dtype} cannot be sent; use one of {sorted(str(d) for d in wire._CODES)}")
        out.append((wire.entry_name(name), tuple(int(n) for n in shape), dtype))
    return out


def _check_etag_use(writes: bool, with_etag: bool, etag: str) -> None:
    """TypeError for with_etag on a change (a read returns the etag) or etag on a read (a change is
    made conditional on it), and for an etag that is not a string."""
    if not isinstance(etag, str):
        raise TypeError(f"etag must be the string a read gave (with_etag=True or etag(h)), not {type(etag).__name__}")
    if writes and with_etag:
        raise TypeError("with_etag=True reads the etag with the values; to make a change conditional, pass etag=...")
    if etag and not writes:
        raise TypeError("etag=... makes a change conditional; to read the etag, pass with_etag=True")


def _one_value(value: tuple[Any, ...], call: str) -> Any:
    """The one value of a setter call such as dict(p, key, value): a second one was dropped without
    a word, so dict(p, "a", x, "b", y) set 'a' alone (found by review)."""
    if len(value) > 1:
        raise TypeError(f"{call} takes one value, given {len(value)}; set several entries with a mapping")
    return value[0]


def _answered(exc: grpc.RpcError) -> bool:
    """Whether a handler of the server sent this status (`ANSWERED_METADATA`), rather than gRPC for a
    call that never reached one."""
    trailing = getattr(exc, "trailing_metadata", None)
    pairs = trailing() if callable(trailing) else None
    return any(key == ANSWERED_METADATA for key, _ in pairs or ())


def _handle(message: pb.Handle) -> Handle:
    return Handle(message.id, _KIND_NAMES.get(message.kind, "unknown"))


def _ids(handles: Iterable[HandleLike], what: str) -> list[str]:
    """The ids of a list of handles. One handle given alone is refused: a Handle is not iterable, and
    an id string iterated by character went out as handles 'd', 'i', 'c', ... (NOT_FOUND: 'd')."""
    if isinstance(handles, (str, Handle)):
        raise TypeError(f"{what} takes a list of handles, given one ({handles!r}); pass [h]")
    return [_id(h) for h in handles]


def _weights(weights: Iterable[float] | None) -> list[float]:
    """Weights as floats, none when None. Not `weights or ()`: a numpy array or torch tensor of weights
    (shard sizes, as FedAvg users hold them) has no truth value and raised ValueError before sending."""
    return [] if weights is None else [float(w) for w in weights]


def _merge_weights(weights: Iterable[Any] | None) -> tuple[list[float], list[pb.LayerValues]]:
    """A merge's weights: plain numbers as `weights`, or, where any of them is a list (mergekit's
    gradient over the layers), every one as a `LayerValues`."""
    given = [] if weights is None else list(weights)
    if not any(_is_gradient(w) for w in given):
        return [float(w) for w in given], []
    return [], _gradients(given)


def _is_gradient(weight: Any) -> bool:
    return isinstance(weight, (list, tuple)) or (isinstance(weight, np.ndarray) and weight.ndim == 1)


def _gradients(weights: Iterable[Any]) -> list[pb.LayerValues]:
    """One LayerValues per weight: a list's values, or a number alone."""
    return [pb.LayerValues(values=[float(x) for x in w] if _is_gradient(w) else [float(w)]) for w in weights]


_PER_DICTIONARY = ("weights", "densities")
"""The keys of a merge's `per_tensor` overrides that give one value per dictionary rather than an option."""


def _tensor_options(pattern: str, values: Mapping[str, Any]) -> pb.TensorOptions:
    """A merge's overrides for one pattern: its options and, under "weights" and "densities", one
    value per dictionary."""
    return pb.TensorOptions(
        pattern=pattern, options=[_option_message(k, v) for k, v in values.items() if k not in _PER_DICTIONARY],
        weights=_gradients(values["weights"]) if values.get("weights") is not None else [],
        densities=_gradients(values["densities"]) if values.get("densities") is not None else [],
    )


_BUFFER_MODES: dict[Any, pb.BufferMode.ValueType] = {
    False: pb.BUFFER_MODE_UNSPECIFIED,
    True: pb.BUFFER_MODE_AVERAGE,
    "copy": pb.BUFFER_MODE_COPY,
}


def _buffer_mode(buffers: bool | str) -> pb.BufferMode.ValueType:
    """The wire's BufferMode for an average's `buffers` argument: False, True or "copy"."""
    try:
        return _BUFFER_MODES[buffers]
    except (KeyError, TypeError):
        raise ValueError(f"buffers must be False (parameters only), True (average them) or 'copy', not {buffers!r}") from None


def _dtype_name(dtype: DtypeLike) -> str:
    """A dtype's name as the wire spells it: a name as it is, numpy's dtype name for a numpy dtype or
    scalar type (np.float32, ml_dtypes.bfloat16), "float32" for torch.float32 (torch is not imported).
    A numpy or torch dtype, what a torch user writes first, failed as "'torch.dtype' object has no
    attribute 'lower'" (found by a new user's walk-through)."""
    if isinstance(dtype, str):
        return dtype
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise TypeError(
            f"dtype must be a name such as 'float32', a numpy dtype or a torch dtype, not {type(dtype).__name__} {dtype!r}"
        ) from None


def _dtype_code(dtype: DtypeLike | None) -> pb.Dtype.ValueType:
    """The wire code of a dtype ("float32", np.float32, torch.bfloat16, ...); unset for None."""
    if dtype is None or (isinstance(dtype, str) and not dtype):
        return pb.DTYPE_UNSPECIFIED
    dtype = _dtype_name(dtype)
    names = [n.removeprefix("DTYPE_").lower() for n in pb.Dtype.keys() if n != "DTYPE_UNSPECIFIED"]
    if dtype.lower() not in names:
        raise ValueError(f"unknown dtype '{dtype}'{_did_you_mean(dtype, names)} (one of {', '.join(names)})")
    return pb.Dtype.Value("DTYPE_" + dtype.upper())


def _schedule(state: pb.MovingAverageState) -> dict[str, Any]:
    """An EMA's schedule and last step as a plain dict."""
    return {
        "decay": state.decay, "warmup": state.warmup, "warmup_gamma": state.warmup_gamma,
        "warmup_power": state.warmup_power, "min_decay": state.min_decay,
        "update_after_step": int(state.update_after_step), "step": int(state.step),
    }


def _momenta(r: pb.ResetBatchNormResponse | pb.RecalculateBatchNormResponse) -> dict[str, float | None]:
    return {name: r.momenta[name].value if r.momenta[name].HasField("value") else None for name in r.names}


def _options(options: Iterable[pb.Option]) -> dict[str, Any]:
    """Option messages as a dict; metrics (a comma-separated string on the wire) as a list."""
    values = {o.name: _specs.option_value(o.value) for o in options}
    if isinstance(values.get("metrics"), str):
        values["metrics"] = values["metrics"].split(",")
    return values


def _option_message(name: str, value: Any) -> pb.Option:
    if name == "metrics" and isinstance(value, (list, tuple)):
        value = ",".join(value)
    return pb.Option(name=name, value=_specs.option_message(value))


def _did_you_mean(given: str, valid: Iterable[str]) -> str:
    """"; did you mean 'x'?" with the closest valid names, as the server words it; "" when none is close."""
    matches = difflib.get_close_matches(given, list(valid), n=3, cutoff=0.6)
    matches.sort(key=lambda name: (-difflib.SequenceMatcher(None, name, given).ratio(), name))
    close = [f"'{name}'" for name in matches]
    if not close:
        return ""
    return "; did you mean " + (close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]) + "?"


COUNT_KEY = ".n"
"""The entry holding a running average's sample count, a 0-dim float64 (the server's COUNT_KEY)."""


def _count_value(name: str, value: Any) -> Any:
    """An integer given for the count '.n' as the float64 the server counts in, else the value as it
    is. dict(p, ".n", 5) was stored as int64 and the next avgparms refused the dictionary ("'.n' must
    be a 0-dim float64 count"), one call after the one that set it (found by a new user's walk-through)."""
    if name != COUNT_KEY or isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, (int, np.integer)) or (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu"):
        return np.float64(value)
    return value


def _single_or_list(named: list[tuple[str, Any]]) -> Any:
    values = [wire.plain(a) for _, a in named]
    return values[0] if len(values) == 1 else values


def _metrics(stream: Iterable[pb.RunEpochResponse | pb.RunTestResponse]) -> Any:
    """A metrics stream's values; chunks that name a rank (a cluster's replicated model) make one
    entry per rank, in rank order."""
    messages: list[pb.RunEpochResponse | pb.RunTestResponse] = list(stream)
    if not any(m.HasField("rank") for m in messages):
        return _single_or_list(wire.join_chunks(m.chunk for m in messages))
    ranks: builtins.dict[int, list[Any]] = {}
    for m in messages:
        ranks.setdefault(m.rank, []).append(m.chunk)
    return [_single_or_list(wire.join_chunks(ranks[r])) for r in sorted(ranks)]


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Turn grpc.RpcError into the client's own exceptions, once, at the boundary."""

    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise self._closed_error()
        try:
            return method(self, *args, **kwargs)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc
        except ValueError as exc:  # grpc's "Cannot invoke RPC on closed channel!", for a call racing close()
            if self._closed:
                raise self._closed_error() from exc
            raise

    return call


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """Call details with extra metadata (grpc.ClientCallDetails is abstract; this is the usual recipe)."""


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token and the session id to every call; `pairs` may change (the session is set later)."""

    def __init__(self, pairs: dict[str, str]) -> None:
        self.pairs = pairs

    def _details(self, d: Any) -> _CallDetails:
        metadata = [*(d.metadata or ()), *self.pairs.items()]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def target(address: str) -> str:
    """The address with DEFAULT_PORT added when it names no port ("localhost" -> "localhost:50051",
    "::1" -> "[::1]:50051"); gRPC target schemes (unix:, dns:, ...) pass through unchanged.

    Raises:
        ValueError: an empty address, a port that is not a number from 1 to 65535, or a web URL
            (http://, https://, grpc://, grpcs://), which gRPC took for a host name to look up.
    """
    address = address.strip()
    web = re.match(r"(?i)(https?|grpcs?)://", address)
    if web:
        # gRPC has no such scheme: it looked the whole URL up as a host name, UNAVAILABLE "Misformatted
        # domain name", read as a server that is down (found by a new user's walk-through).
        bare = address[web.end():].rstrip("/")
        tls = " (TLS is chosen with tls=True or tls_ca=..., not by the scheme)" if web.group(1).lower().endswith("s") else ""
        raise ValueError(f"address {address!r}: a gRPC address has no {web.group(1)}:// scheme; give host:port, e.g. {bare!r}{tls}")
    if address.startswith(_SCHEMES) or "://" in address:
        return address
    if address.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port is None:
            raise ValueError(f"address {address!r}: expected [IPv6 address]:port, e.g. '[::1]:{DEFAULT_PORT}'")
        host = f"[{host}]"
    elif address.count(":") > 1:  # a bare IPv6 address
        host, port = f"[{address}]", None
    else:
        host, sep, found = address.partition(":")
        port = found if sep else None
    if not host or host == "[]":
        raise ValueError(f"address {address!r}: give host:port, e.g. '127.0.0.1:{DEFAULT_PORT}'")
    if port is None:
        return f"{host}:{DEFAULT_PORT}"
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(
            f"address {address!r}: the port must be a number from 1 to 65535, e.g. '{host}:{DEFAULT_PORT}'"
        )
    return f"{host}:{port}"


_PEM_MARK = "-----BEGIN "
"""How every PEM block starts; no file name a user gives does."""


def _pem(value: str | bytes | os.PathLike[str] | None) -> bytes | None:
    """PEM bytes given directly, PEM text given as a str (what `open(f).read()` or an environment
    variable holds), or read from a path. PEM text was taken for a path: the call failed with
    "No such file or directory" (or "File name too long") and a message that quoted the whole
    text, a private key included, into the caller's logs (found by review)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and _PEM_MARK in value:
        return value.encode("ascii", errors="replace")
    with open(value, "rb") as f:
        return f.read()


_GRPC_DEADLINE = "Deadline Exceeded"
"""The details gRPC gives a call whose deadline passed on this side (the server's own
DEADLINE_EXCEEDED answers say more)."""

MAX_TIMEOUT = 1e9
"""Longest call deadline, in seconds (about 31 years): grpc keeps a deadline as nanoseconds since the
epoch in 64 bits, and answered DEADLINE_EXCEEDED at once for one past about 7.4e9 s from now."""


def dtype_label(number: "pb.Dtype.ValueType") -> str:
    """A listed dtype's name as the client writes dtypes ("float32"), or "unknown dtype N" for one
    this client's protocol does not know (a newer server's): a listing must not fail on it."""
    try:
        return pb.Dtype.Name(number).removeprefix("DTYPE_").lower()
    except ValueError:
        return f"unknown dtype {number}"


def checked_timeout(timeout: float) -> float:
    """`timeout` if it is a number of seconds more than 0 and at most MAX_TIMEOUT; ValueError
    otherwise. A negative, NaN, infinite or too large deadline was sent as given, and every call
    answered DEADLINE_EXCEEDED at once, which read as a server too slow to answer (found by review,
    for the commands; the library took it as well)."""
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a number of seconds, not {timeout!r}") from None
    if isinstance(timeout, bool) or not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT):
        raise ValueError(f"timeout {timeout!r}: give a number of seconds more than 0, at most {MAX_TIMEOUT:g}")
    return seconds


class Client:
    """A connection to a weightavg server.

    Args:
        address: "host:port" of the server; without a port, DEFAULT_PORT (50051, the server's
            default) is used, never gRPC's 443.
        timeout: default deadline of each call, in seconds: more than 0, at most MAX_TIMEOUT (ValueError
            otherwise, before anything is sent).
        chunk_bytes: size of the pieces tensors are streamed in, a whole number of bytes above 0
            (ValueError otherwise, before anything is sent).
        max_message_bytes: largest gRPC message this client sends or receives (64 MiB, the server's
            default --max-message-bytes); at least chunk_bytes plus CHUNK_HEADER_ROOM (ValueError
            otherwise, before anything is sent). Every fetch asks the server for chunks of at most
            chunk_bytes that fit this limit with their header (FetchTensorsRequest.max_chunk_bytes),
            so a limit below the server's --chunk-bytes still fetches tensors of any size.
        channel: a gRPC channel to use instead of one this client opens to address (the TLS
            arguments, server_name and max_message_bytes then do not apply to it); close() closes it.
        token: bearer token, sent as "authorization: Bearer <token>" on every call.
        tls: use TLS; implied by any of the next four. Without tls_ca the system's roots are trusted.
        tls_ca: CA certificate(s) that signed the server's certificate (PEM bytes or text, or a path).
        client_cert, client_key: this client's certificate and key (PEM bytes or text, or paths), for servers
            that require client certificates (mutual TLS); both or neither (ValueError otherwise).
        server_name: the name to check the server's certificate against, when it differs from the
            address's host.
        retry: how calls that fail UNAVAILABLE are retried (RetryPolicy(max_attempts=1): never).
            Calls that change state carry a request ID, the same on every attempt, so the server
            runs each once however often it is sent (docs/robust.md).
        session: True starts a session: every handle this client creates belongs to it, a background
            thread renews its lease, and close() ends it, freeing those handles. If the client dies
            (or is garbage collected without close()), the server frees them once the lease runs
            out. A session id string joins that session
            (e.g. after a server restart); close() then leaves it open.
        lease: session lease in seconds; 0 takes the server's default.
        shm: move tensor bytes of every upload (from 16 KiB; its arrays under 16 KiB go in the
            stream's messages) and every fetch through POSIX shared
            memory regions instead of the gRPC stream, for a server on this host started with
            --allow-shm; implies session=True. A fetch over 4 MiB returns views of a region the
            client keeps in a pool (no copy here; the region is reused once the arrays are garbage
            collected, and the arrays are the caller's until then). Where the server refuses the
            region (another host, no --allow-shm) the client falls back to the stream, with
            identical results; so it does for a call no region fits (/dev/shm full), and after
            close_session(). Its regions have names of its own, so clients may share a session;
            regions the server lost (a restart from its --state-dir) are registered again. GPU
            (torch CUDA) tensors, which every upload verb takes, go through
            one CUDA buffer the client registers by CUDA IPC handle: copied device to device into
            it, and the torch helpers' `fetch(..., device="cuda")` copies out of it; a server without
            CUDA refuses it and they go through the host instead, with identical results. (Without
            shm, GPU tensors are copied to the host and streamed.)

    Example:
        >>> with Client("127.0.0.1:50051") as c:
        ...     m = c.module(["linear", 2, 1])
        ...     p = c.copyparms(m)
        ...     c.avgparms(m, p)
        2
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        chunk_bytes: int = wire.CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | bytes | os.PathLike[str] | None = None,
        client_cert: str | bytes | os.PathLike[str] | None = None,
        client_key: str | bytes | os.PathLike[str] | None = None,
        server_name: str | None = None,
        session: bool | str = False,
        lease: float = 0.0,
        retry: RetryPolicy = RetryPolicy(),
        shm: bool = False,
    ) -> None:
        address = target(address)
        self.address = address
        self.timeout = timeout  # checked by the property
        self.chunk_bytes = wire.checked_chunk_bytes(chunk_bytes)
        self.tls = bool(tls or tls_ca or client_cert or client_key)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Subchannels of its own: grpc's process-wide pool would hand this channel another channel's
            # connection to the same address, still backing off after a server that was there before
            # (a restart on the same port, or a new server given a freed port) refused it.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if server_name:
            # Check the certificate against this name instead of the address's host.
            options.append(("grpc.ssl_target_name_override", server_name))
        if channel is None:
            _checked_message_cap(self.chunk_bytes, max_message_bytes)
        self._reply_chunk_bytes = _reply_chunk_bytes(self.chunk_bytes, max_message_bytes if channel is None else None)
        """What each fetch, epoch, test and evaluate asks the server to cut its reply's tensors into
        (max_chunk_bytes of FetchTensorsRequest, RunEpochRequest, RunTestRequest, EvaluateModelRequest)."""
        if channel is None and bool(client_cert) != bool(client_key):
            # gRPC's C core aborts the whole process on one without the other (a failed CHECK: the
            # training job that made this client died with SIGABRT; found by review).
            raise ValueError(
                "client_cert and client_key go together: give both (the certificate and its key) or neither"
            )
        if channel is None and self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
            )
            channel = grpc.secure_channel(address, credentials, options=options)
        elif channel is None:
            channel = grpc.insecure_channel(address, options=options)
        self._raw_channel = channel
        self._metadata = _AddMetadata({"authorization": f"Bearer {token}"} if token else {})
        self.retry = retry
        # Retries outermost, so that each attempt passes the metadata interceptor afresh.
        retrying = RetryInterceptor(retry)
        self._channel = grpc.intercept_channel(channel, retrying, self._metadata)
        # Unary calls skip gRPC's interceptor pipeline and do the same themselves (_retry.DirectUnaryChannel).
        self._stub = pb_grpc.WeightAveragingServiceStub(
            DirectUnaryChannel(channel, self._channel, retrying, self._metadata.pairs)
        )
        # Tensor streams are encoded and decoded by hand (same bytes as protobuf's) so tensor data
        # is copied once on this side; through protobuf it is copied three times (docs/perf.md).
        self._fetch_tensors: grpc.UnaryStreamMultiCallable[pb.FetchTensorsRequest, Any] = self._channel.unary_stream(
            f"/{_SERVICE}/FetchTensors",
            request_serializer=pb.FetchTensorsRequest.SerializeToString,
            response_deserializer=wire.decode_fetch_response,
        )
        self._fetch_tensors_etag: grpc.UnaryStreamMultiCallable[pb.FetchTensorsRequest, Any] = self._channel.unary_stream(
            f"/{_SERVICE}/FetchTensors",
            request_serializer=pb.FetchTensorsRequest.SerializeToString,
            response_deserializer=wire.decode_fetch_response_with_etag,
        )
        self._create_dictionary_stream = self._stream_unary("CreateDictionary", pb.CreateDictionaryResponse)
        self._update_dictionary_stream = self._stream_unary("UpdateDictionary", pb.UpdateDictionaryResponse)
        self._set_parameter_stream = self._stream_unary("SetParameter", pb.SetParameterResponse)
        self._set_model_data_stream = self._stream_unary("SetModelData", pb.SetModelDataResponse)
        self._evaluate_model_stream: grpc.StreamStreamMultiCallable[bytes, pb.EvaluateModelResponse] = self._channel.stream_stream(
            f"/{_SERVICE}/EvaluateModel", response_deserializer=pb.EvaluateModelResponse.FromString
        )
        self._create_tensor_stream = self._stream_unary("CreateTensor", pb.CreateTensorResponse)
        self.session: str | None = None
        self.lease = 0.0
        self._owns_session = False
        self._closed = False
        """Set by close(): calls after it are refused by _rpc, saying so."""
        self._freed_session = False
        """Whether close() ended a session this client started (freeing its handles)."""
        self._stop_keepalive = threading.Event()
        self._keepalive: threading.Thread | None = None
        self._shm: _shm.SharedRegion | None = _shm.SharedRegion() if shm else None
        self._cuda: _cuda.CudaRegion | None = _cuda.CudaRegion() if shm else None
        self._shm_names = _shm.RegionNames.new(_cuda.REGION_NAME)
        self._shm_pool = _shm.FetchPool(self._shm_names.pool)
        self._shm_lock = threading.Lock()
        self._server_packs: bool | None = None
        """Whether the server reads packed chunks (GetServerInfoResponse.packed_chunks); asked once."""
        session = session or shm
        if session:
            try:
                self._start_session(session, lease)
            except BaseException:
                self._raw_channel.close()
                raise

    def _stream_unary(self, method: str, response: type[R]) -> grpc.StreamUnaryMultiCallable[bytes, R]:
        """A client-streaming call whose requests are sent pre-encoded (one copy a byte)."""
        return self._channel.stream_unary(f"/{_SERVICE}/{method}", response_deserializer=response.FromString)

    @property
    def timeout(self) -> float:
        """Each call's default deadline, in seconds; set it like the constructor's `timeout`, checked
        the same way (a ValueError for 0, a negative, NaN, infinite or over MAX_TIMEOUT)."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = checked_timeout(seconds)

    @property
    def shared_memory(self) -> bool:
        """Whether host tensors of this client's uploads and fetches go through shared memory: made
        with `shm=True` and not (yet) refused by the server, which takes it only with --allow-shm (the
        first large call finds out; after a refusal the client streams for good). Such calls take the
        client's one region in turn, so threads that upload at once gain nothing there."""
        return self._shm is not None

    def empty(self, shapes: Mapping[str, tuple[Any, Any]]) -> dict[str, npt.NDArray[Any]]:
        """New arrays, by name, of the shapes and dtypes given ({name: (shape, dtype)}, as
        numpy.empty takes them; their values unset), for the caller to fill and then upload. With
        shared memory (`shared_memory`), they are views of a region of this client's that the
        server can read, so that an upload of them (`dict`, `tensor`, `parm`, training data, ...)
        copies nothing on this side: 256 MB went up in 17-24 ms on the project's 2-vCPU VM, against
        35-51 ms from arrays elsewhere and 190-270 ms over the stream (docs/perf.md). The region is
        lent to the arrays until the last of them (and of their views) is garbage collected, as a
        large fetch's is, and the server writes nothing into it meanwhile. Without shared memory, or
        for fewer than 16 KiB together (which upload in the stream anyway), they are plain numpy
        arrays. Tensors over them (`weightavg.torch.from_array`, `torch.from_numpy`) upload in
        place too; slices that are not contiguous, or arrays numpy makes from them (a + b), are
        copied as any array is.
            w = c.empty({"w": ((4096, 4096), "float32")}); np.multiply(a, 0.5, out=w["w"]); c.dict(w)
        """
        specs = _empty_specs(shapes)
        placed, total = [], 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            placed.append(pb.SharedTensor(name=name, dtype=wire._CODES[dtype], shape=shape, offset=total, byte_size=nbytes))
            total = _shm.aligned(total + nbytes)
        if total >= _shm.MIN_UPLOAD_BYTES:
            with self._shm_lock:
                lent = self._lend_region(total, placed)
            if lent is not None:
                return dict(lent)
        return {name: np.empty(shape, dtype) for name, shape, dtype in specs}

    def _lend_region(self, nbytes: int, tensors: list[pb.SharedTensor]) -> list[tuple[str, npt.NDArray[Any]]] | None:
        """Views of a pool region of at least `nbytes` (registered as needed) where `tensors` say,
        lent to them; None without shared memory. Under the shared-memory lock."""
        if self._shm_buffer(0) is None:
            return None
        name = self._pool_region(nbytes, "arrays to fill, using plain ones")
        return self._shm_pool.lend(name, tensors) if name is not None else None

    def _pool_region(self, nbytes: int, purpose: str) -> str | None:
        """The name of a free pool region of at least `nbytes`, registered as needed; None where the
        server refuses it or this host has no room (`purpose` says what the log line is about)."""

        def register(name: str, key: str, size: int) -> None:
            request = pb.RegisterSharedMemoryRequest(name=name, key=key, byte_size=size)
            self._stub.RegisterSharedMemory(request, timeout=self.timeout)

        try:
            return self._shm_pool.region_for(nbytes, register, self.session or "")
        except grpc.RpcError as exc:
            self._shm_refused(exc)
            return None
        except OSError as exc:
            log.info("no shared memory region for %s: %s", purpose, exc)
            return None

    def _closed_error(self) -> RuntimeError:
        """What a call on a closed client raises. gRPC's own "ValueError: Cannot invoke RPC on closed
        channel!" named neither the client nor the usual cause, a call after the with block (found by a
        new user's walk-through)."""
        freed = " and its session's handles were freed" if self._freed_session else ""
        return RuntimeError(
            f"this Client is closed (by close(), or the end of its with block){freed}: make the call inside "
            "the block, or make a new Client(address)"
        )

    def close(self) -> None:
        """Stop renewing the session and end it if this client started it (freeing its handles),
        then close the channel. Handles created without a session stay until freed. Closing twice
        does nothing more; any call after it raises RuntimeError."""
        if self._closed:
            return
        self._stop_keepalive.set()
        if self._keepalive is not None:
            self._keepalive.join()
        self._close_shm()
        if self._owns_session and self.session is not None:
            try:
                self._stub.CloseSession(pb.CloseSessionRequest(session=self.session), timeout=min(self.timeout, 10.0))
            except grpc.RpcError as exc:  # the server is gone or the lease already ran out: nothing to free
                log.info("could not close session %s: %s", self.session, from_rpc_error(exc))
            self._owns_session = False
            self._freed_session = True
        self._closed = True  # before the channel closes: a call racing it then says the client is closed
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- server ---------------------------------------------------------------------------------

    @_rpc
    def ping(self) -> None:
        """One empty round trip."""
        self._stub.Ping(pb.PingRequest(), timeout=self.timeout)

    @_rpc
    def info(self) -> dict[str, Any]:
        """Server version, torch version, device, layer types, dtypes and limits; `world_size` and
        `ranks`: each rank's device, handle count and bytes held (one row on a one-rank server)."""
        r = self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)
        return {
            "version": r.version,
            "torch_version": r.torch_version,
            "grpc_version": r.grpc_version,
            "device": r.device,
            "layer_types": list(r.layer_types),
            "dtypes": [dtype_label(d) for d in r.dtypes],
            "max_message_bytes": r.max_message_bytes,
            "chunk_bytes": r.chunk_bytes,
            "max_spec_depth": r.max_spec_depth,
            "max_spec_layers": r.max_spec_layers,
            "packed_chunks": r.packed_chunks,
            "cuda_memory_allocated": r.cuda_memory_allocated,
            # A server from before clusters sends neither: it is one rank.
            "world_size": r.world_size or 1,
            "ranks": [{"rank": x.rank, "device": x.device, "handles": x.handles, "bytes": x.bytes} for x in r.ranks]
            or [{"rank": 0, "device": r.device}],
        }

    @_rpc
    def stats(self) -> dict[str, Any]:
        """Per-method statistics since the server started, and live handles and bytes per device.

        Returns:
            {"uptime_seconds": float,
             "methods": {full method name: {"count", "in_flight", "failures", "codes" (name -> count),
                         "total_seconds", "max_seconds", "bytes_received", "bytes_sent"}},
             "devices": {device: {"handles", "bytes"}},
             "request_ids": {"remembered", "duplicates_answered", "dropped"},
             "tenants": {tenant: {"calls", "failures", "handles", "bytes" (device -> bytes),
                         "max_device_bytes", "max_handles", "sessions", "max_sessions"}}}
             (an admin sees every tenant, others their own)
        """
        r = self._stub.GetServerStats(pb.GetServerStatsRequest(), timeout=self.timeout)
        return {
            "uptime_seconds": r.uptime_seconds,
            "methods": {
                m.method: {
                    "count": m.count,
                    "in_flight": m.in_flight,
                    "failures": m.failures,
                    "codes": dict(sorted(m.codes.items())),  # a map field has no order: print one
                    "total_seconds": m.total_seconds,
                    "max_seconds": m.max_seconds,
                    "bytes_received": m.bytes_received,
                    "bytes_sent": m.bytes_sent,
                }
                for m in r.methods
            },
            "devices": {d.device: {"handles": d.handles, "bytes": d.bytes} for d in r.devices},
            "request_ids": {
                "remembered": r.request_ids.remembered,
                "duplicates_answered": r.request_ids.duplicates_answered,
                "dropped": r.request_ids.dropped,
            },
            "tenants": {
                t.tenant: {
                    "calls": t.calls, "failures": t.failures, "handles": t.handles, "bytes": dict(sorted(t.bytes.items())),
                    "max_device_bytes": t.max_device_bytes, "max_handles": t.max_handles,
                    "sessions": t.sessions, "max_sessions": t.max_sessions,
                }
                for t in r.tenants
            },
        }

    # -- modules ----------------------------------------------------------------------------------

    @_rpc
    def module(self, spec: Any, *, replicate: bool = False, rank: int | None = None) -> Any:
        """Build a module from a spec and return its handle; given a handle (or its id), return its
        options table.

        Specs are nested lists: ["linear", 64, 10], ["sequential", ["linear", "a", 784, 800], ...].
        On a cluster (torchrun), replicate=True builds it on every rank under one handle, rank=r on rank r.
        """
        if isinstance(spec, Handle):
            return self._describe_module(spec.id)
        request = pb.CreateModuleRequest(spec=_specs.layer_spec(spec), placement=_placement(replicate, rank))
        try:
            return _handle(self._stub.CreateModule(request, timeout=self.timeout).module)
        except grpc.RpcError as exc:
            # A string is a one-layer spec ("relu") or a bare handle id, as every other verb takes one:
            # an id went out as a layer type, "unrecognized module type: 'mod_...'" (found by a new
            # user's walk-through). Asked only once the server has refused it as a spec.
            if not isinstance(spec, str) or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            try:
                return self._describe_module(spec)
            except grpc.RpcError:
                raise exc from None

    def _describe_module(self, handle: str) -> list[ModuleRow]:
        """The options table of a module, model or optimizer: a row per layer."""
        r = self._stub.DescribeModule(pb.DescribeModuleRequest(handle=handle), timeout=self.timeout)
        return [
            ModuleRow(row.depth, row.module, row.name, {o.name: _specs.option_value(o.value) for o in row.options})
            for row in r.rows
        ]

    @_rpc
    def parmnames(self, m: HandleLike, child: str = "") -> list[str]:
        """Dotted parameter names of a module, model or optimizer (or of one child)."""
        r = self._stub.ListParameterNames(pb.ListParameterNamesRequest(handle=_id(m), child=child), timeout=self.timeout)
        return list(r.names)

    @_rpc
    def buffernames(self, m: HandleLike, child: str = "") -> list[str]:
        """Dotted buffer names of a module, model or optimizer (or of one child)."""
        r = self._stub.ListBufferNames(pb.ListBufferNamesRequest(handle=_id(m), child=child), timeout=self.timeout)
        return list(r.names)

    @_rpc
    def parm(
        self, m: HandleLike, name: str, *value: Any, rank: int | None = None, with_etag: bool = False, etag: str = "",
    ) -> Any:
        """parm(m, name) returns a parameter's values; parm(m, name, value) sets it in place
        (broadcasting a scalar), or registers a new parameter when the name is new. On a replicated
        module, rank=r reads or sets rank r's copy (unset: reads rank 0's, sets every rank's).

        with_etag=True reads (values, etag): the module's etag read with the values; etag=... sets the
        value only if the module has not changed since that etag was read (AbortedError otherwise,
        nothing changed; docs/robust.md, "Conditional changes")."""
        name = _name(name)
        _check_etag_use(bool(value), with_etag, etag)
        if not value:
            if with_etag:
                named, tag = self._fetch_with_etag(_id(m), [name], rank)
                return wire.plain(named[0][1]), tag
            return self._fetch(_id(m), [name], rank)[name]
        one = _one_value(value, "parm(m, name, value)")
        handle = _id(m)  # checked here: raised in the request stream, a TypeError reached the caller as UNKNOWN
        request_id = new_request_id()

        def send(encoded: Callable[[], Iterator[bytes]]) -> None:
            def requests() -> Iterator[bytes]:
                chunks = encoded()
                # Serialized protobuf messages concatenate into their merge: handle and name, then the chunk.
                first = pb.SetParameterRequest(
                    handle=handle, name=name, rank=rank, etag=etag, request_id=request_id
                ).SerializeToString()
                yield first + next(chunks)
                yield from chunks

            self._set_parameter_stream(Replayable(requests), timeout=self.timeout)

        self._uploading([("", one)], pb.SetParameterRequest, send)
        return None

    @_rpc
    def parms(self, m: HandleLike, child: str = "") -> Handle:
        """A dictionary handle over the module's live parameters (of a child, when named)."""
        r = self._stub.ViewParameters(pb.ViewParametersRequest(handle=_id(m), child=child), timeout=self.timeout)
        return _handle(r.dictionary)

    @_rpc
    def buffers(self, m: HandleLike, child: str = "") -> Handle:
        """A dictionary handle over the module's live buffers (of a child, when named)."""
        r = self._stub.ViewBuffers(pb.ViewBuffersRequest(handle=_id(m), child=child), timeout=self.timeout)
        return _handle(r.dictionary)

    # -- weight averaging -------------------------------------------------------------------------

    @_rpc
    def copyparms(
        self, m: HandleLike, d: HandleLike | None = None, *, dtype: DtypeLike | None = None, buffers: bool = False,
        etag: str = "",
    ) -> Any:
        """copyparms(m): a new dictionary of parameter copies. copyparms(m, d): copy d into m's
        parameters, all or nothing; returns {parameter: True if d had it}.

        A new copy takes `dtype` (any floating dtype, by name or as a numpy or torch dtype: "float32"
        or torch.float32 for the average of a bfloat16 module)
        instead of each parameter's own, and with buffers=True holds the buffers too, under their
        dotted names (integer buffers keep their dtype). On a cluster copyparms(m, d) takes a d that
        lives on another rank than m: its values are sent to m's rank(s). etag=... loads d only if m has
        not changed since that etag was read (AbortedError otherwise).
        """
        if d is None:
            if etag:
                raise TypeError("etag makes a load conditional: copyparms(m, d, etag=...); a new copy changes nothing")
            request = pb.CopyParametersRequest(handle=_id(m), dtype=_dtype_code(dtype), buffers=buffers)
            r = self._stub.CopyParameters(request, timeout=self.timeout)
            return _handle(r.dictionary)
        if dtype is not None or buffers:
            raise TypeError("dtype and buffers shape a new copy: copyparms(m, dtype=..., buffers=True)")
        loaded = self._stub.LoadParameters(
            pb.LoadParametersRequest(handle=_id(m), dictionary=_id(d), etag=etag), timeout=self.timeout
        )
        return {name: loaded.copied[name] for name in loaded.names}

    @_rpc
    def avgparms(self, m: HandleLike, d: HandleLike, buffers: bool | str = False, *, etag: str = "") -> int:
        """Fold m's parameters into the running average in d; returns the new count (d's '.n').

        Each parameter is cast to its entry's dtype first. buffers=True also averages the floating
        buffers (AveragedModel's use_buffers=True), buffers="copy" copies every buffer; integer
        buffers are always copied. m may be a dictionary: its entries (but '.n') are folded in by
        name, floating ones averaged and others copied. On a cluster m and d may live on different
        ranks: m's values are sent to d's rank(s) for the call (docs/cluster.md). etag=... folds m in
        only if d has not changed since that etag was read (AbortedError otherwise).
        """
        # The ID set here rather than on a copy of the request (_retry.with_request_id): the call
        # most clients make every step.
        request = pb.AverageParametersRequest(
            handle=_id(m), dictionary=_id(d), buffers=_buffer_mode(buffers), etag=etag, request_id=new_request_id()
        )
        return int(self._stub.AverageParameters(request, timeout=self.timeout).count)

    @_rpc
    def ema(
        self,
        m: HandleLike,
        e: HandleLike,
        decay: float = 0.9999,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        step: int | None = None,
        buffers: bool | str = False,
        *,
        etag: str = "",
    ) -> int:
        """One exponential-moving-average update of dictionary e from module or model m; returns the step used.

        Every parameter's entry becomes e + (1 - d) * (p - e), p cast to e's dtype (keep e in float32
        for a bfloat16 module: c.copyparms(m, dtype="float32")). The decay d at a step is timm
        ModelEmaV3's: 0 (a full copy) up to step update_after_step + 1, then `decay`, or with warmup
        max(min_decay, min(decay, 1 - (1 + k / warmup_gamma) ** -warmup_power)), k the steps since.
        Without `step` the k-th update of e uses step k. The schedule is kept with e (c.size(e)
        shows it under '.ema'). buffers and etag: as for avgparms. On a cluster m and e may live on
        different ranks, as for avgparms.

        Example:
            >>> e = c.copyparms(m, dtype="float32")
            >>> [c.ema(m, e, decay=0.999, warmup=True) for _ in range(3)]   # train between updates
            [1, 2, 3]
        """
        request = pb.UpdateMovingAverageRequest(
            handle=_id(m), dictionary=_id(e), decay=decay, warmup=warmup, warmup_gamma=warmup_gamma,
            warmup_power=warmup_power, min_decay=min_decay, update_after_step=update_after_step,
            buffers=_buffer_mode(buffers), etag=etag, request_id=new_request_id(),  # as avgparms: no copy to set it
        )
        if step is not None:
            request.step = step
        return int(self._stub.UpdateMovingAverage(request, timeout=self.timeout).step)

    def _is_model(self, m: HandleLike) -> bool:
        """Whether m is a model handle: its kind, or for a bare id the server's answer (one more
        call). Verbs whose meaning depends on it (batchnorm, model) used to treat a bare model id as
        a module's: batchnorm(m.id) reset the statistics instead of recalculating them."""
        if isinstance(m, Handle):
            return m.kind == "model"
        try:
            self._stub.DescribeModel(pb.DescribeModelRequest(model=m), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # a handle of another kind
                return False
            raise
        return True

    @_rpc
    def batchnorm(self, m: HandleLike, momenta: Mapping[str, float | None] | None = None) -> Any:
        """batchnorm(m): reset batchnorm statistics, momentum None; returns {layer: old momentum}.
        batchnorm(m, r): restore those momenta.

        Given a model handle alone, batchnorm(m) also recalculates the running statistics over the
        model's training data (as torch.optim.swa_utils.update_bn) and puts the momenta back.
        """
        if momenta is None and self._is_model(m):
            recalculated = self._stub.RecalculateBatchNorm(
                pb.RecalculateBatchNormRequest(model=_id(m)), timeout=self.timeout
            )
            return _momenta(recalculated)
        if momenta is not None:
            request = pb.RestoreMomentumRequest(
                handle=_id(m),
                momenta={k: pb.Momentum() if v is None else pb.Momentum(value=float(v)) for k, v in momenta.items()},
            )
            self._stub.RestoreMomentum(request, timeout=self.timeout)
            return None
        return _momenta(self._stub.ResetBatchNorm(pb.ResetBatchNormRequest(handle=_id(m)), timeout=self.timeout))

    # -- losses, optimizers and models --------------------------------------------------------------

    @_rpc
    def loss(self, kind: str, *args: Any, **options: Any) -> Handle:
        """A loss function: ce, mse, nll, bce, bcelogits or smoothl1, with options by position or name.

        Example: c.loss("ce"), c.loss("ce", smoothing=0.1), c.loss("smoothl1", beta=0.5).
        """
        request = pb.CreateLossRequest(
            type=kind, args=[_specs.option_message(a) for a in args],
            options=[_option_message(k, v) for k, v in options.items()],
        )
        return _handle(self._stub.CreateLoss(request, timeout=self.timeout).loss)

    @_rpc
    def opt(self, kind: str, module: HandleLike, *args: Any, **options: Any) -> Handle:
        """An optimizer over a module's (or model's) parameters: sgd, adam, adamw, rmsprop or adagrad,
        or one of Flower's adaptive server strategies for `outer_step`: fedadam, fedyogi, fedadagrad.

        Positional options follow the reference's order (sgd: lr .01, momentum, dampening, decay,
        nesterov; fedadam and fedyogi: lr, beta1, beta2, tau, Flower's eta, beta_1, beta_2, tau).
        Example: c.opt("sgd", q, .05, .9, nesterov=True), c.opt("fedyogi", q).
        """
        request = pb.CreateOptimizerRequest(
            type=kind, module=_id(module), args=[_specs.option_message(a) for a in args],
            options=[_option_message(k, v) for k, v in options.items()],
        )
        return _handle(self._stub.CreateOptimizer(request, timeout=self.timeout).optimizer)

    @_rpc
    def lr(self, m: HandleLike, value: float | None = None) -> float | None:
        """lr(m): the learning rate of a model's (or an optimizer's) optimizer; lr(m, value) sets it."""
        if value is None:
            return float(self._stub.GetLearningRate(pb.GetLearningRateRequest(handle=_id(m)), timeout=self.timeout).lr)
        self._stub.SetLearningRate(pb.SetLearningRateRequest(handle=_id(m), lr=_learning_rate(value)), timeout=self.timeout)
        return None

    # -- objects over the verbs ---------------------------------------------------------------------

    def Module(self, spec: Any) -> _objects.Module:  # noqa: N802 - named after the class it returns
        """A module built from a spec, as an object with methods (parameters(), copy(), average_into(d),
        ...); `with c.Module(spec) as q:` frees it at the end of the block."""
        return _objects.Module(self, self.module(spec))

    def Dictionary(self, values: Mapping[str, Any]) -> _objects.Dictionary:  # noqa: N802
        """A dictionary of named tensors, as an object (to_dict(), d[key], count, ...)."""
        return _objects.Dictionary(self, self.dict(values))

    @_rpc
    def model(self, m: HandleLike, *parts: HandleLike) -> Any:
        """model(q, loss, opt) joins a module, loss and optimizer into a model and frees those three
        handles (pass c.addref(q) to keep one); model(m) describes a model's parts.

        model(m, part, ...) with a model handle replaces parts of it, as the reference's model(m; obj...):
        a loss, an optimizer over the model's module, or a new module with an optimizer over it, in
        any order. The part handles are freed; options and data stay. Returns m.

        Example: c.model(m, c.opt("adam", m, 1e-3)) switches the model to Adam.
        """
        if parts and self._is_model(m):
            update = pb.UpdateModelRequest(model=_id(m), parts=[_id(p) for p in parts])
            return _handle(self._stub.UpdateModel(update, timeout=self.timeout).model)
        loss, opt = (parts + (None, None))[:2] if len(parts) <= 2 else (None, None)
        if len(parts) > 2:
            raise TypeError("model(q, loss, opt) takes a module, a loss and an optimizer")
        if loss is None and opt is None:
            r = self._stub.DescribeModel(pb.DescribeModelRequest(model=_id(m)), timeout=self.timeout)
            return {
                "module": [
                    ModuleRow(row.depth, row.module, row.name, {o.name: _specs.option_value(o.value) for o in row.options})
                    for row in r.module
                ],
                "loss": {"type": r.loss.type, **_options(r.loss.options)},
                "optimizer": {"type": r.optimizer.type, **_options(r.optimizer.options)},
                "train": _options(r.train),
                "test": _options(r.test),
                "train_size": int(r.train_size),
                "test_size": int(r.test_size),
            }
        if loss is None or opt is None:
            raise TypeError("model(q, loss, opt) needs a module, a loss and an optimizer")
        request = pb.CreateModelRequest(module=_id(m), loss=_id(loss), optimizer=_id(opt))
        return _handle(self._stub.CreateModel(request, timeout=self.timeout).model)

    def train(self, m: HandleLike, *args: Any, shard: bool = False, rank: int | None = None, **options: Any) -> Any:
        """Train options and data of a model.

        train(m) returns every option; train(m, "batchsize") one, train(m, ["a", "b"]) several;
        train(m, batchsize=100, shuffle=True) (or a dict) sets options, all or nothing;
        train(m, x, y) loads inputs and targets and returns the number of batches.
        Options: batchsize (32), droplast (False), shuffle (False), seed (0), metrics (["loss"]).
        On a cluster, train(m, x, y, shard=True) gives rank r of a replicated model the r-th of
        world_size contiguous parts of the rows, and train(m, x, y, rank=r) loads x and y on rank r
        only (each rank its own data).
        """
        if (shard or rank is not None) and len(args) != 2:
            raise TypeError("shard=True and rank= go with data: train(m, x, y, shard=True), train(m, x, y, rank=r)")
        if shard or rank is not None:
            return self._model_data(_id(m), pb.DATA_SPLIT_TRAIN, args[0], args[1], shard=shard, rank=rank)
        return self._setup(m, pb.DATA_SPLIT_TRAIN, args, options)

    def test(self, m: HandleLike, *args: Any, rank: int | None = None, **options: Any) -> Any:
        """Test options and data, as train(): batchsize (100), droplast (False), metrics (["loss"]);
        test(m, x, y, rank=r) loads a replicated model's test data on rank r only."""
        if rank is not None:
            if len(args) != 2:
                raise TypeError("rank= goes with data: test(m, x, y, rank=r)")
            return self._model_data(_id(m), pb.DATA_SPLIT_TEST, args[0], args[1], rank=rank)
        return self._setup(m, pb.DATA_SPLIT_TEST, args, options)

    @_rpc
    def _setup(self, m: HandleLike, split: pb.DataSplit.ValueType, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        if len(args) == 2:
            if options:
                raise TypeError("give data or options, not both")
            return self._model_data(_id(m), split, args[0], args[1])
        if len(args) > 2:
            raise TypeError("expecting (m), (m, name), (m, names), (m, x, y) or (m, name=value, ...)")
        if args and isinstance(args[0], Mapping):
            options = {**args[0], **options}
            args = ()
        if options:
            request = pb.SetModelOptionsRequest(
                model=_id(m), split=split, options=[_option_message(k, v) for k, v in options.items()]
            )
            self._stub.SetModelOptions(request, timeout=self.timeout)
            return None
        values = _options(
            self._stub.GetModelOptions(pb.GetModelOptionsRequest(model=_id(m), split=split), timeout=self.timeout).options
        )
        if not args:
            return values
        names = args[0]
        if not isinstance(names, str) and not (
            isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
        ):
            raise TypeError("expecting an option name or a list of names; data take inputs and targets: (m, x, y)")
        for name in [names] if isinstance(names, str) else names:
            if name not in values:
                raise KeyError(f"unrecognized option '{name}'{_did_you_mean(name, values)} (one of {', '.join(values)})")
        return values[names] if isinstance(names, str) else [values[n] for n in names]

    @_rpc
    def _model_data(
        self, m: str, split: pb.DataSplit.ValueType, x: Any, y: Any, shard: bool = False, rank: int | None = None
    ) -> int:
        request_id = new_request_id()

        def send(encoded: Callable[[], Iterator[bytes]]) -> int:
            def requests() -> Iterator[bytes]:
                first = pb.SetModelDataRequest(model=m, split=split, shard=shard, rank=rank, request_id=request_id)
                yield first.SerializeToString()
                yield from encoded()

            return int(self._set_model_data_stream(Replayable(requests), timeout=self.timeout).batches)

        return self._uploading([("x", x), ("y", y)], pb.SetModelDataRequest, send)

    @_rpc
    def run(self, m: HandleLike, *data: Any) -> Any:
        """Train one epoch; returns the train metrics (one value, or a list for several).
        run(m, x, y) first loads x and y as the training data, as train(m, x, y) does.

        On a cluster, a replicated model runs one epoch on every rank at once, each on its own data,
        and run(m) returns a list of each rank's metrics, indexed by rank.
        """
        if data:
            if len(data) != 2:
                raise TypeError("run(m) or run(m, x, y)")
            self._model_data(_id(m), pb.DATA_SPLIT_TRAIN, data[0], data[1])
        return _metrics(self._stub.RunEpoch(pb.RunEpochRequest(model=_id(m), max_chunk_bytes=self._reply_chunk_bytes), timeout=self.timeout))

    @_rpc
    def testrun(self, m: HandleLike) -> Any:
        """Evaluate over the test data; returns the test metrics (e.g. accuracy in percent). On a
        cluster, a replicated model tests on every rank: a list of each rank's metrics, by rank."""
        return _metrics(self._stub.RunTest(pb.RunTestRequest(model=_id(m), max_chunk_bytes=self._reply_chunk_bytes), timeout=self.timeout))

    @_rpc
    def evaluate(self, m: HandleLike, x: Any) -> npt.NDArray[Any]:
        """The model's outputs for inputs x, in eval mode without gradients, as an array."""
        model = _id(m)  # checked before the stream, as parm's handle

        def send(encoded: Callable[[], Iterator[bytes]]) -> npt.NDArray[Any]:
            def requests() -> Iterator[bytes]:
                yield pb.EvaluateModelRequest(model=model, max_chunk_bytes=self._reply_chunk_bytes).SerializeToString()
                yield from encoded()

            stream = self._evaluate_model_stream(Replayable(requests), timeout=self.timeout)  # retried as a read
            return wire.join_chunks(r.chunk for r in stream)[0][1]

        return self._uploading([("", x)], pb.EvaluateModelRequest, send)

    def forward(self, q: HandleLike, x: Any = None) -> Handle:
        """Forward pass in train mode with gradients; returns a tensor handle of the output.
        x is an array or a tensor handle (a Handle or its id); a model without x uses its training inputs."""
        return self._forward(q, x, pb.FORWARD_MODE_TRAIN)

    def nforward(self, q: HandleLike, x: Any = None) -> Handle:
        """Forward pass in train mode without gradients (batchnorm statistics update); a tensor handle."""
        return self._forward(q, x, pb.FORWARD_MODE_TRAIN_NO_GRAD)

    def eforward(self, q: HandleLike, x: Any = None) -> Handle:
        """Forward pass in eval mode without gradients; a tensor handle (a model defaults to test inputs)."""
        return self._forward(q, x, pb.FORWARD_MODE_EVAL)

    @_rpc
    def _forward(self, q: HandleLike, x: Any, mode: pb.ForwardMode.ValueType) -> Handle:
        request_id = new_request_id()
        # A bare id string is a tensor handle, as everywhere else (no string can be sent as a tensor):
        # it went to to_array and failed as "dtype <U36 cannot be sent" (found by review).
        if x is not None and not isinstance(x, (Handle, str)):
            x = wire.to_array(x)  # checked before the call, as every upload is (`_upload_chunks`)
        handle = _id(q)  # checked before the stream, as parm's handle
        given = _id(x) if isinstance(x, (Handle, str)) else None

        def requests() -> Iterator[pb.RunForwardRequest]:
            if given is not None:
                yield pb.RunForwardRequest(handle=handle, mode=mode, input=given, request_id=request_id)
                return
            yield pb.RunForwardRequest(handle=handle, mode=mode, request_id=request_id)
            if x is not None:
                for chunk in wire.array_chunks("", x, self.chunk_bytes):
                    yield pb.RunForwardRequest(chunk=chunk)

        return _handle(self._stub.RunForward(Replayable(requests), timeout=self.timeout).output)

    @_rpc
    def input(self, m: HandleLike) -> Handle:
        """A tensor handle sharing the model's training inputs (batching it batches the model's)."""
        return _handle(self._stub.GetModelInput(pb.GetModelInputRequest(model=_id(m)), timeout=self.timeout).tensor)

    @_rpc
    def restore(self, m: HandleLike) -> int:
        """Put the model's training data back to full size; returns the sample count (-1 without data)."""
        return int(self._stub.RestoreModelData(pb.RestoreModelDataRequest(model=_id(m)), timeout=self.timeout).size)

    @_rpc
    def testrestore(self, m: HandleLike) -> int:
        """Put the model's test data back to full size; returns the sample count (-1 without data)."""
        request = pb.RestoreModelDataRequest(model=_id(m), split=pb.DATA_SPLIT_TEST)
        return int(self._stub.RestoreModelData(request, timeout=self.timeout).size)

    @_rpc
    def testbatch(self, m: HandleLike) -> bool:
        """Step the model's test inputs and targets to their next batch of the test batchsize, as
        batch(m) does for the training data. True while a batch is in place; then full size and False."""
        request = pb.NextBatchRequest(handle=_id(m), split=pb.DATA_SPLIT_TEST)
        return bool(self._stub.NextBatch(request, timeout=self.timeout).more)

    @_rpc
    def batch(self, x: HandleLike, w: int | None = None) -> bool:
        """Narrow a tensor handle in place to its next batch of w rows (a model: its training data, by
        its train batchsize). True while a batch is in place; after the last, full size and False.

        Example: while c.batch(x, 100): c.free(c.nforward(q, x))
        """
        request = pb.NextBatchRequest(handle=_id(x), size=0 if w is None else int(w))
        return bool(self._stub.NextBatch(request, timeout=self.timeout).more)

    # -- dictionaries and tensors -----------------------------------------------------------------

    @_rpc
    def dict(
        self, x: Any, key: Any = None, *value: Any, replicate: bool = False, rank: int | None = None,
        with_etag: bool = False, etag: str = "", arrays: bool = False,
    ) -> Any:
        """dict({name: value}) creates a dictionary; dict(p) returns all values as {name: value},
        dict(p, key) one, dict(p, [k1, k2]) a list of them in that order; values are numpy arrays, 0-dim
        ones Python scalars (the count '.n' a float). dict(p, key, value) sets one (replacing it; a live
        view copies in place), dict(p, {k: v}) several; an integer given for '.n' is sent as the
        float64 count the server keeps.
        On a cluster, dict({...}, replicate=True) creates it on every rank, dict({...}, rank=r) on rank r;
        rank= reads or sets one rank's copy of a replicated dictionary (unset: reads rank 0's, sets every
        rank's).
        Conditional changes (docs/robust.md): a read with with_etag=True returns (values, etag), the
        dictionary's etag read with the values; a change given etag=... is made only if nothing changed
        the dictionary since (AbortedError otherwise, nothing changed):
            values, tag = c.dict(p, with_etag=True); c.dict(p, "w", values["w"] * 0.5, etag=tag)
        A read with arrays=True gives every value as a numpy array, 0-dim ones too (their dtype kept, as a
        file of tensors needs them), where the default turns those into Python scalars."""
        if not isinstance(x, (Handle, str)):
            if not isinstance(x, Mapping):
                raise TypeError("dict() takes a mapping of name -> value, or a dictionary handle")
            if with_etag or etag or arrays:
                raise TypeError("a new dictionary has no etag yet and arrays= applies to reads: read it with "
                                "dict(p, with_etag=True) or dict(p, arrays=True)")
            return self._create_dictionary(list(x.items()), replicate, rank)
        writes = bool(value) or isinstance(key, Mapping)
        _check_etag_use(writes, with_etag, etag)
        if writes and arrays:
            raise TypeError("arrays= applies to reads: dict(p, arrays=True), dict(p, key, arrays=True)")
        if arrays:
            return self._read_arrays(_id(x), key, rank, with_etag)
        if value:
            self._update_dictionary(_id(x), [(key, _one_value(value, "dict(p, key, value)"))], rank, etag)
            return None
        if isinstance(key, Mapping):
            self._update_dictionary(_id(x), list(key.items()), rank, etag)
            return None
        if with_etag:
            return self._read_with_etag(_id(x), key, rank)
        if key is None:
            return {name: wire.plain(a) for name, a in self._fetch_named(_id(x), [], rank)}
        if isinstance(key, (list, tuple)):
            if not key:  # the wire's empty list of names means every entry: nothing to fetch here
                return []
            keys = [_name(k) for k in key]
            values = self._fetch(_id(x), keys, rank)
            return [values[k] for k in keys]
        return self._fetch(_id(x), [_name(key)], rank)[key]

    def _read_arrays(self, d: str, key: Any, rank: int | None, with_etag: bool) -> Any:
        """dict(p, key, arrays=True): what dict(p, key) returns, each value a numpy array (0-dim ones
        kept as arrays); with with_etag, (values, etag)."""
        if isinstance(key, (list, tuple)) and not key:
            return ([], self.etag(d)) if with_etag else []
        keys = [] if key is None else [_name(k) for k in key] if isinstance(key, (list, tuple)) else [_name(key)]
        named, tag = self._fetch_with_etag(d, keys, rank) if with_etag else (self._fetch_named(d, keys, rank), "")
        values = builtins.dict(named)
        read = values if key is None else [values[k] for k in keys] if isinstance(key, (list, tuple)) \
            else values[keys[0]]
        return (read, tag) if with_etag else read

    def _read_with_etag(self, d: str, key: Any, rank: int | None) -> tuple[Any, str]:
        """dict(p, key, with_etag=True): what dict(p, key) returns, and the etag read with it."""
        if isinstance(key, (list, tuple)) and not key:
            return [], self.etag(d)
        keys = [] if key is None else [_name(k) for k in key] if isinstance(key, (list, tuple)) else [_name(key)]
        named, tag = self._fetch_with_etag(d, keys, rank)
        values = {name: wire.plain(a) for name, a in named}
        if key is None:
            return values, tag
        if isinstance(key, (list, tuple)):
            return [values[k] for k in keys], tag
        return values[keys[0]], tag

    @_rpc
    def etag(self, h: HandleLike) -> str:
        """The object's etag now (AIP-154): it changes whenever a call may have changed the object or
        one sharing its lock (a module's model, optimizers and views). Give it to a change (etag=...)
        to make the change only if nothing changed since; "" on a cluster for an object not held on
        rank 0 alone. To change what you read, read the values and the etag together instead
        (dict(p, with_etag=True), parm(m, name, with_etag=True)): one read after the other may see two
        states."""
        return str(self._stub.GetSize(pb.GetSizeRequest(handle=_id(h)), timeout=self.timeout).etag)

    @_rpc
    def broadcast(self, h: HandleLike, rank: int = 0) -> int:
        """Give every rank of the cluster rank `rank`'s values of a replicated module (parameters and
        buffers) or dictionary (entries), in place; returns how many tensors each rank took. Every
        rank must hold the same names, shapes and dtypes; an object on one rank is refused.

        Example: c.parm(m, "weight", w, rank=1); c.broadcast(m, rank=1)   # every rank now holds w
        """
        request = pb.BroadcastRequest(handle=_id(h), rank=rank, request_id=new_request_id())
        return int(self._stub.Broadcast(request, timeout=self.timeout).tensors)

    @_rpc
    def allreduce(
        self, h: HandleLike, op: str = "mean", weights: Iterable[float] | None = None, group_size: int = 0
    ) -> int:
        """Average (op="mean", optionally weighted per rank, e.g. by example counts) or sum (op="sum") a
        replicated module's floating parameters or dictionary's floating entries across the cluster's
        ranks, in place on every rank; returns how many tensors each rank reduced.

        group_size=k (a divisor of the world size) reduces within groups of k consecutive ranks instead
        (0 to k-1, k to 2k-1, ...), as torch's new_subgroups and the lower levels of hierarchical model
        averaging do; weights stay one per rank, each group weighted by its own members'."""
        ops = {"mean": pb.REDUCE_OP_MEAN, "sum": pb.REDUCE_OP_SUM}
        if op not in ops:
            raise ValueError(f"op must be one of {', '.join(ops)}; got {op!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size is a whole number of ranks (0: every rank); got {group_size!r}")
        request = pb.AllReduceRequest(
            handle=_id(h), op=ops[op], weights=_weights(weights), group_size=group_size,
            request_id=new_request_id(),
        )
        return int(self._stub.AllReduce(request, timeout=self.timeout).tensors)

    @_rpc
    def delete(self, d: HandleLike, *names: str, etag: str = "") -> None:
        """Remove keys from a dictionary, all or nothing; with etag=..., only if the dictionary has not
        changed since that etag was read (AbortedError otherwise)."""
        request = pb.DeleteEntriesRequest(dictionary=_id(d), names=[_name(n) for n in names], etag=etag)
        self._stub.DeleteEntries(request, timeout=self.timeout)

    @_rpc
    def tensor(self, x: Any) -> Any:
        """tensor(array) creates a tensor handle; tensor(handle) returns its values: a numpy array, or a
        Python scalar for a 0-dim tensor."""
        if isinstance(x, (Handle, str)):  # no string can be sent as a tensor: a bare id
            return wire.plain(self._fetch_named(_id(x), [])[0][1])
        request_id = new_request_id()

        def send(encoded: Callable[[], Iterator[bytes]]) -> Handle:
            def requests() -> Iterator[bytes]:
                yield pb.CreateTensorRequest(request_id=request_id).SerializeToString()
                yield from encoded()

            return _handle(self._create_tensor_stream(Replayable(requests), timeout=self.timeout).tensor)

        return self._uploading([("", x)], pb.CreateTensorRequest, send)

    @_rpc
    def size(self, h: HandleLike) -> Any:
        """A dictionary's {name: shape}, a tensor's shape, or a module's number of parameter tensors.

        A dictionary that holds an exponential moving average also shows its schedule and last step
        under '.ema' (a dict, not an entry).
        """
        r = self._stub.GetSize(pb.GetSizeRequest(handle=_id(h)), timeout=self.timeout)
        which = r.WhichOneof("size")
        if which == "dictionary":
            sizes: builtins.dict[str, Any] = {e.name: tuple(e.shape.dims) for e in r.dictionary.entries}
            if r.dictionary.HasField("moving_average"):
                sizes[EMA_KEY] = _schedule(r.dictionary.moving_average)
            return sizes
        if which == "tensor":
            return tuple(r.tensor.dims)
        return int(r.parameter_count)

    # -- handles ----------------------------------------------------------------------------------

    @_rpc
    def free(self, *handles: HandleLike) -> int:
        """Free the given handles (all must exist, else none is freed); returns how many.

        With no handles, every handle of this client's session. A client without a session is refused
        (FailedPreconditionError) rather than guess: it cannot tell its handles from other clients'.
        `purge()` is the operator's way to free everything on a server.
        """
        request = pb.FreeHandlesRequest(handles=[_id(h) for h in handles], all=not handles)
        return int(self._stub.FreeHandles(request, timeout=self.timeout).freed)

    @_rpc
    def purge(self, tenant: str | None = None) -> int:
        """Free every handle on the server, every client's and every session's (or, with `tenant`,
        every handle of that tenant, e.g. one whose tokens were removed from the tokens file); returns
        how many.

        An operator's clean-up (`weightavg purge ADDRESS`): it needs an admin token on a server with
        a tokens file or --token. Other clients' next calls on those handles get NOT_FOUND.
        """
        request = pb.FreeHandlesRequest(tenant=tenant) if tenant is not None else pb.FreeHandlesRequest(purge=True)
        return int(self._stub.FreeHandles(request, timeout=self.timeout).freed)

    @_rpc
    def addref(self, h: HandleLike) -> Handle:
        """A second handle to the same object."""
        return _handle(self._stub.AddReference(pb.AddReferenceRequest(handle=_id(h)), timeout=self.timeout).handle)

    @_rpc
    def handles(self, all_tenants: bool = False) -> list[HandleInfo]:
        """Every live handle this client may list (its tenant's: its session's, or those of no
        session), with its device, dtype, bytes and tenant. all_tenants=True (admin tokens only)
        lists every tenant's handles, in every session."""
        r = self._stub.ListHandles(pb.ListHandlesRequest(all_tenants=all_tenants), timeout=self.timeout)
        return [
            HandleInfo(
                _handle(i.handle), i.device,
                dtype_label(i.dtype) if i.dtype else None,
                i.bytes, i.tensor_count,
                _schedule(i.moving_average) if i.HasField("moving_average") else None, i.tenant, i.etag,
            )
            for i in r.handles
        ]

    @_rpc
    def shm_regions(self, name: str = "") -> list[SharedRegion]:
        """The shared memory regions this client's session has registered (or the one named), in the
        order registered: each one's name, size, device, the CUDA device its pages are locked for, and
        whether it still takes copies. Never the keys."""
        r = self._stub.ListSharedMemory(pb.ListSharedMemoryRequest(name=name), timeout=self.timeout)
        return [SharedRegion(x.name, x.byte_size, x.device, x.locked_for, x.usable) for x in r.regions]

    @_rpc
    def to(self, h: HandleLike, device: str = "", dtype: DtypeLike | None = None) -> Handle:
        """Move a tensor, dictionary, module, optimizer or model to a device ("cpu", "cuda", "cuda:1")
        and/or a floating or complex dtype (a name, or a numpy or torch dtype), in place. A model or module moves with its optimizers'
        state and its models' data, all or nothing. A tensor handle converts whatever its dtype, a
        dictionary its floating entries, a module its floating and complex tensors; a move that would
        lose values (complex to real, integers the dtype cannot hold exactly) raises
        InvalidArgumentError and moves nothing."""
        code = _dtype_code(dtype)
        r = self._stub.MoveHandle(pb.MoveHandleRequest(handle=_id(h), device=device, dtype=code), timeout=self.timeout)
        return _handle(r.handle)

    # -- averaging across models ---------------------------------------------------------------------

    @_rpc
    def average(
        self, dicts: Iterable[HandleLike], weights: Iterable[float] | None = None, into: HandleLike | None = None,
        *, etag: str = "", **options: Any,
    ) -> Handle:
        """The weighted mean of dictionaries, computed on the server one tensor at a time.

        Args:
            dicts: dictionary handles (a module, model or optimizer stands for its parameters).
            weights: one non-negative weight each, e.g. example counts (Flower's FedAvg); equal if None.
            into: write the mean into this dictionary (or module's parameters) in place; it must hold
                every entry with the mean's shape and may be one of `dicts`. None: a new dictionary.
            etag: with `into`, write the mean only if `into` has not changed since that etag was read
                (AbortedError otherwise).
            options: integers="first" (default), "max" or "mean" (Flower's FedAvg of them, truncated toward
                zero: docs/merging.md): how integer entries are combined.

        Returns the dictionary holding the mean. All or nothing: on an error nothing changes. On a
        cluster the inputs may live on different ranks: the mean is made where `into` lives (or, new,
        on the rank of the first input that lives on one rank), the other inputs' values sent there.

        Example: avg = c.average([d1, d2, d3], weights=[600, 300, 100])
        """
        request = pb.AverageDictionariesRequest(
            dictionaries=_ids(dicts, "average"), weights=_weights(weights),
            into=_id(into) if into is not None else "", options=[_option_message(k, v) for k, v in options.items()],
            etag=etag,
        )
        return _handle(self._stub.AverageDictionaries(request, timeout=self.timeout).dictionary)

    @_rpc
    def merge(
        self, method: str, dicts: Iterable[HandleLike], base: HandleLike | None = None,
        weights: Iterable[float | Sequence[float]] | None = None,
        per_tensor: Mapping[str, Mapping[str, Any]] | None = None,
        densities: Iterable[float | Sequence[float]] | None = None, **options: Any,
    ) -> Handle:
        """A new dictionary merged on the server by one of the methods below.

        Args:
            method: linear (normalize=True), slerp (two dictionaries, optional base: then their offsets;
                t required, threshold=.9995, vectors="tensor", "rows" or "columns": each its own arc),
                task_arithmetic (base; lam=1, normalize=False), ties (base; density required, lam=1,
                normalize=True, rescale=False, rescale_norm="l1"), dare (base; density required, seed=0, rescale=True, consensus=False,
                normalize=False, lam=1), della (base; density required, epsilon=.15, seed=0, rescale=True,
                rescale_norm="probability", consensus=False, normalize=False, lam=1), breadcrumbs (base; density required, gamma=.01, consensus=False,
                normalize=False, lam=1, rescale=False), multislerp (optional base; normalize=True), karcher (no
                base, non-negative weights; max_iter=10, tol=1e-5), sce (base, no weights; select_topk=1),
                ram (base, no weights; epsilon=1e-5, r=0 (RAM+ with r > 0), alpha=.2), model_stock (base and at
                least two dictionaries, no weights; filter_wise=False), nearswap (base and one dictionary, no
                weights; t required, a distance), arcee_fusion (base and one dictionary, no weights). Every
                method takes integers="first",
                "max" or "mean". t, density, lam, gamma, epsilon, select_topk, r and alpha also take mergekit's gradients: a list of values
                over the layers, e.g. t=[0, 0.5, 1].
            dicts: dictionary handles (a module, model or optimizer stands for its parameters).
            base: the model the others were fine-tuned from (every method but linear and karcher; optional
                for slerp and multislerp).
            weights: one weight per dictionary; 1 each if None. A weight may be a list, mergekit's
                gradient over the layers: weights=[[1, 0], [0, 1]] moves from the first model at the
                first layer to the second at the last.
            per_tensor: option overrides by entry-name pattern, first match wins,
                e.g. {"*.bias": {"t": 0.0}}; "weights" gives the matching entries' own weights,
                e.g. {"*.mlp.*": {"weights": [0.3, 0.7]}} (the first pattern with weights that matches),
                and "densities" their own per-dictionary densities.
            densities: ties, dare, della and breadcrumbs: one density per dictionary (each a number or a gradient, mergekit's
                per-model density) instead of the density option.

        Example: c.merge("ties", [d1, d2], base=b, density=0.2); c.merge("slerp", [a, b], t=0.3)
        """
        plain, gradients = _merge_weights(weights)
        request = pb.MergeDictionariesRequest(
            method=method, dictionaries=_ids(dicts, "merge"), base=_id(base) if base is not None else "",
            weights=plain, weight_gradients=gradients, densities=_gradients(() if densities is None else densities),
            options=[_option_message(k, v) for k, v in options.items()],
            tensor_options=[_tensor_options(pattern, values) for pattern, values in (per_tensor or {}).items()],
        )
        return _handle(self._stub.MergeDictionaries(request, timeout=self.timeout).dictionary)

    @_rpc
    def outer_step(self, opt: HandleLike, average: HandleLike) -> float:
        """Step an optimizer (or a model's) once with the gradient `parameters - average`: the outer
        step of a federated or local-SGD round, on the server. SGD(lr=1) puts the average in place
        (FedAvg); SGD with momentum is FedAvgM; with nesterov=True, DiLoCo's outer step (lr .7,
        momentum .9); fedadam, fedyogi and fedadagrad Flower's adaptive strategies, number for number.
        Returns the gradient's norm.

        Example: g = c.opt("sgd", global_module, 0.7, 0.9, nesterov=True); c.outer_step(g, c.average(ds))
        """
        request = pb.ApplyOuterStepRequest(optimizer=_id(opt), average=_id(average))
        return float(self._stub.ApplyOuterStep(request, timeout=self.timeout).gradient_norm)

    @_rpc
    def soup(self, m: HandleLike, ingredients: Iterable[HandleLike], metric: str = "accuracy") -> Soup:
        """A greedy soup of ingredient dictionaries, scored on the model's test data: ranked best first
        (tied ones last given first, as model-soups ranks them), each kept only if averaging it in
        strictly improves the metric ("accuracy", higher is better, or "loss", lower is better). The
        model's weights are put back afterwards.

        Example: s = c.soup(m, [d1, d2, d3]); c.copyparms(m, s.soup); s.kept, s.scores, s.score
        """
        request = pb.BuildGreedySoupRequest(
            model=_id(m), ingredients=_ids(ingredients, "soup"), options=[_option_message("metric", metric)]
        )
        r = self._stub.BuildGreedySoup(request, timeout=self.timeout)
        return Soup(
            _handle(r.soup), r.metric, list(r.scores), [int(i) for i in r.order], list(r.tried),
            [int(i) for i in r.kept], r.score,
        )

    # -- sessions and snapshots ---------------------------------------------------------------------

    @_rpc
    def _start_session(self, session: bool | str, lease: float) -> None:
        if isinstance(session, str):
            self.session = session
            self._metadata.pairs[SESSION_METADATA] = session
            self.lease = float(self._stub.KeepAliveSession(pb.KeepAliveSessionRequest(), timeout=self.timeout).lease_seconds)
        else:
            r = self._stub.CreateSession(pb.CreateSessionRequest(lease_seconds=lease), timeout=self.timeout)
            self.session, self.lease, self._owns_session = r.session, r.lease_seconds, True
            self._metadata.pairs[SESSION_METADATA] = r.session
        # The thread holds the client weakly, and stops once it is garbage collected: it held it
        # through a bound method, so a session client dropped without close() was never collected
        # and renewed its lease (holding its handles on the server) until the process ended.
        self._keepalive = threading.Thread(
            target=_renew, args=(weakref.ref(self), self._stub, self._stop_keepalive, self.lease, self.session),
            name="weightavg-keepalive", daemon=True,
        )
        weakref.finalize(self, self._stop_keepalive.set)
        self._keepalive.start()

    @_rpc
    def keepalive(self) -> float:
        """Renew this client's session now; returns the lease in seconds."""
        return float(self._stub.KeepAliveSession(pb.KeepAliveSessionRequest(), timeout=self.timeout).lease_seconds)

    @_rpc
    def close_session(self) -> int:
        """End this client's session now, freeing every handle it owns in one call; returns how many."""
        self._stop_keepalive.set()
        freed = int(self._stub.CloseSession(pb.CloseSessionRequest(), timeout=self.timeout).freed)
        # The session's regions ended with it, and a client without a session registers none: the
        # stream from now on (calls naming the regions were refused NOT_FOUND).
        self._close_shm(unregister=False)
        self._owns_session = False
        self._metadata.pairs.pop(SESSION_METADATA, None)
        self.session = None
        return freed

    @_rpc
    def snapshot(self) -> Mapping[str, Any]:
        """Ask the server to write every live handle to its --state-dir now; returns {"directory",
        "handles" (how many saved), "tensor_bytes", "skipped" (handles not saved, as "id (kind): why")}.
        FailedPreconditionError on a server without --state-dir."""
        r = self._stub.Snapshot(pb.SnapshotRequest(), timeout=self.timeout)
        return {"directory": r.directory, "handles": r.handles, "tensor_bytes": r.tensor_bytes,
                "skipped": list(r.skipped)}

    def _translate(self, exc: grpc.RpcError) -> WeightavgError:
        """The client's exception for a failed call; an UNAVAILABLE the server did not answer itself
        (`_answered`: a refused connection, say) gets a hint on what to check.

        gRPC's connection failures embed a second status name ("failed to connect to all addresses;
        last error: UNKNOWN: ipv4:...: Connection refused"); it is dropped so the message names
        one code, the call's.
        """
        error = from_rpc_error(exc)
        if isinstance(error, UnavailableError) and not _answered(exc):
            error.message = re.sub(r"; last error: [A-Z_]+: ", ": ", error.message) + self._unavailable_hint()
        elif isinstance(error, DeadlineExceededError) and error.message == _GRPC_DEADLINE:
            # gRPC's own words, which named neither the deadline nor where it is set (found by review).
            error.message += self._deadline_hint()
        return error

    def _deadline_hint(self) -> str:
        return f" (no answer within this client's timeout of {self.timeout:g} s; give a longer Client(..., timeout=...))"

    def _unavailable_hint(self) -> str:
        if self.tls:
            return (f" (TLS connection to {self.address} failed: check that tls_ca signed the server's certificate, "
                    "and pass client_cert/client_key if the server requires client certificates)")
        return (f" (could not reach {self.address} over plaintext: is the server running, and does it use TLS? "
                "then pass tls_ca=...)")

    # -- streaming helpers --------------------------------------------------------------------------

    def _fetch_named(
        self, handle: str, names: list[str], rank: int | None = None, etag: list[str] | None = None
    ) -> list[tuple[str, npt.NDArray[Any]]]:
        """Named arrays through shared memory where it is on, else the stream; with `etag`, the
        object's etag read with them is appended to it (FetchTensorsRequest.with_etag)."""
        if self._shm is not None and rank is None:
            try:
                fetched = self._shm_fetch(handle, names, etag)
            except grpc.RpcError as exc:
                if not self._regions_lost(exc):
                    raise
                fetched = self._shm_fetch(handle, names, etag)  # registered again
            if fetched is not None:
                return fetched
        request = pb.FetchTensorsRequest(
            handle=handle, names=names, rank=rank, packed_chunks=True, max_chunk_bytes=self._reply_chunk_bytes,
            with_etag=etag is not None,
        )
        if etag is None:
            return wire.join_chunks(self._fetch_tensors(request, timeout=self.timeout))

        def chunks() -> Iterator[Any]:
            for chunk, tag in self._fetch_tensors_etag(request, timeout=self.timeout):
                if tag:
                    etag.append(tag)
                yield chunk

        return wire.join_chunks(chunks())

    def _fetch_with_etag(
        self, handle: str, names: list[str], rank: int | None = None
    ) -> tuple[list[tuple[str, npt.NDArray[Any]]], str]:
        """What `_fetch_named` returns, and the object's etag read with it."""
        tags: list[str] = []
        named = self._fetch_named(handle, names, rank, tags)
        return named, tags[-1] if tags else ""

    def _fetch(self, handle: str, names: list[str], rank: int | None = None) -> builtins.dict[str, Any]:
        # builtins.dict: inside the class, `dict` names the Client.dict method.
        return {name: wire.plain(a) for name, a in self._fetch_named(handle, names, rank)}

    def _create_dictionary(
        self, items: list[tuple[str, Any]], replicate: bool = False, rank: int | None = None
    ) -> Handle:
        items = [(name, _count_value(name, value)) for name, value in items]
        request_id = new_request_id()
        placement = _placement(replicate, rank)

        def send(encoded: Callable[[], Iterator[bytes]]) -> Handle:
            def requests() -> Iterator[bytes]:
                yield pb.CreateDictionaryRequest(placement=placement, request_id=request_id).SerializeToString()
                yield from encoded()

            return _handle(self._create_dictionary_stream(Replayable(requests), timeout=self.timeout).dictionary)

        return self._uploading(items, pb.CreateDictionaryRequest, send)

    def _update_dictionary(self, d: str, items: list[tuple[str, Any]], rank: int | None = None, etag: str = "") -> None:
        items = [(name, _count_value(name, value)) for name, value in items]
        request_id = new_request_id()

        def send(encoded: Callable[[], Iterator[bytes]]) -> None:
            def requests() -> Iterator[bytes]:
                yield pb.UpdateDictionaryRequest(
                    dictionary=d, rank=rank, etag=etag, request_id=request_id
                ).SerializeToString()
                yield from encoded()

            self._update_dictionary_stream(Replayable(requests), timeout=self.timeout)

        self._uploading(items, pb.UpdateDictionaryRequest, send)


    # -- shared memory (Client(..., shm=True)) --------------------------------------------------------

    def _shm_refused(self, exc: grpc.RpcError) -> None:
        """After a registration refused with `exc`: raise it unless it says the server takes no
        shared memory (then the stream for good) or holds no more regions for now (its caps, e.g.
        a session shared by several clients: RESOURCE_EXHAUSTED; then the stream for this call)."""
        error = from_rpc_error(exc)
        if isinstance(error, ResourceExhaustedError):
            log.info("no more shared memory regions for now, this call uses the stream: %s", error)
            return
        if not isinstance(error, (FailedPreconditionError, UnimplementedError)):
            raise exc
        log.info("shared memory refused, using the stream: %s", error)
        self._shm = None

    def _regions_lost(self, exc: grpc.RpcError) -> bool:
        """Whether a call failed because the server has no region of this client's that it named
        (a server restarted from its --state-dir keeps the session, not its regions; another
        client's UnregisterSharedMemory of the session's regions); then this client forgets its
        regions, so that the call, made once more, registers them again."""
        if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.NOT_FOUND:
            return False
        details = exc.details() or ""
        names = (self._shm_names.region, self._shm_names.cuda, *self._shm_names.pool)
        if not any(f"shared memory region '{n}'" in details for n in names):
            return False
        log.info("the server no longer has this client's shared memory regions; registering them again: %s", details)
        with self._shm_lock:
            self._shm_pool.unused()
            if self._shm is not None:
                self._shm.close()
            if self._cuda is not None:
                self._cuda.close()
        return True

    def _uploading(
        self, items: list[tuple[str, Any]], message_type: type[Message], send: Callable[[Callable[[], Iterator[bytes]]], T]
    ) -> T:
        """`send(encoded)`, the call of one upload, with its stream's tensor messages (`_upload_chunks`);
        once more, through regions registered again, when the server had lost this client's regions
        (`_regions_lost`: the call was refused before it changed anything)."""
        try:
            with self._upload_chunks(items, message_type) as encoded:
                return send(encoded)
        except grpc.RpcError as exc:
            if not self._regions_lost(exc):
                raise
        with self._upload_chunks(items, message_type) as encoded:
            return send(encoded)

    def _shm_buffer(self, nbytes: int) -> memoryview | None:
        """The region's bytes (at least nbytes), registering a larger one as needed; None once the
        server has refused shared memory (this client then uses the stream for good)."""
        region = self._shm
        if region is None:
            return None

        def register(key: str, size: int) -> None:
            request = pb.RegisterSharedMemoryRequest(name=self._shm_names.region, key=key, byte_size=size)
            self._stub.RegisterSharedMemory(request, timeout=self.timeout)

        try:
            return region.ensure(nbytes, register, self.session or "")
        except grpc.RpcError as exc:
            self._shm_refused(exc)
            return None
        except OSError as exc:
            if _shm.full(exc):  # /dev/shm has no room now: this call streams, the region stays as it was
                log.info("no room in /dev/shm for a larger region, this call uses the stream: %s", exc)
                return None
            log.info("no shared memory region, using the stream: %s", exc)  # no /dev/shm here
            self._shm = None
            return None

    @contextlib.contextmanager
    def _upload_chunks(
        self, items: list[tuple[str, Any]], message_type: type[Message]
    ) -> Iterator[Callable[[], Iterator[bytes]]]:
        """For the duration of one upload call: a function giving its stream's tensor messages.

        With shared memory (and MIN_UPLOAD_BYTES or more) the messages only say where the arrays
        lie (TensorChunk.shared): arrays in a pool region (a fetch's, or `empty`'s) where they are,
        the rest copied into the reused region before the first message goes (`_shm.Writing`); the
        region is held until the call is over, and a retry copies the same bytes again. Arrays under
        `_shm.SHARED_MIN_TENSOR_BYTES` go in the messages among them, in order. Otherwise the
        messages carry the bytes, as without shared memory.
        """
        def streamed() -> Iterator[bytes]:
            messages = wire.encoded_chunks(items, self.chunk_bytes, message_type)
            return wire.packed_stream(messages, self.chunk_bytes) if pack else messages

        if any(_cuda.is_cuda(value) for _, value in items):
            with self._shm_lock:
                on_gpu = self._cuda_upload(items)
                if on_gpu is not None:
                    yield lambda: _shm.shared_chunks(on_gpu, message_type, self._shm_names.cuda)
                    return
            # Without CUDA IPC, GPU tensors go as host arrays, bit for bit.
            items = [(name, _cuda.host_array(value) if _cuda.is_cuda(value) else value) for name, value in items]
        # Checked and converted here, once (to_array may copy), before the call starts: a value that
        # cannot be sent, found inside gRPC's request thread, failed the call as UNKNOWN "Exception
        # iterating requests!" after its first message had gone (and a create could still succeed).
        items = [(wire.entry_name(name), wire.to_array(value)) for name, value in items]
        pack = len(items) > 1 and self._packs()
        if self._shm is None:
            yield streamed
            return
        if sum(array.nbytes for _, array in items) < _shm.MIN_UPLOAD_BYTES or all(
            array.nbytes < _shm.SHARED_MIN_TENSOR_BYTES for _, array in items
        ):  # small, or only small arrays (each in the stream's messages anyway): no lock, no region
            yield streamed
            return
        with self._shm_lock:
            # Located under the lock: a fetch may re-register a pool region's name (then the server's
            # region of that name is another one) only while it holds the lock.
            placed, nbytes = _shm.layout(items, self._shm_pool.locate, _shm.SHARED_MIN_TENSOR_BYTES)
            buf = self._shm_buffer(nbytes)
            if buf is None:
                yield streamed
                return
            writing = _shm.Writing(buf, placed)
            del buf
            try:
                pack_bytes = min(wire.PACK_BYTES, self.chunk_bytes) if pack else 0
                yield lambda: writing.chunks(message_type, self._shm_names.region, pack_bytes, self.chunk_bytes)
            finally:
                writing.close()

    def _packs(self) -> bool:
        """Whether this upload may pack small chunks into one message (TensorChunk.packed): the
        server says so in GetServerInfo, asked on the first upload of several tensors. A server
        from before packing ignores the field and would lose the packed tensors (its declared
        stream check refuses the call), so without its answer nothing is packed."""
        if self._server_packs is None:
            try:
                r = self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)
            except grpc.RpcError:  # asked again next time; this upload goes unpacked
                return False
            self._server_packs = r.packed_chunks
        return self._server_packs

    def _cuda_refused(self, exc: grpc.RpcError) -> None:
        """Raise the error unless the server refused the CUDA region; then GPU tensors go through
        the host for good (host shared memory, if the server takes that, or the stream). Refusals:
        FAILED_PRECONDITION (no CUDA, no --allow-shm, a handle it cannot open), UNIMPLEMENTED, and
        INVALID_ARGUMENT (a server older than CUDA regions reads the registration as an empty key;
        a newer one found the buffer's fields or bounds wrong)."""
        error = from_rpc_error(exc)
        if not isinstance(error, (FailedPreconditionError, UnimplementedError, InvalidArgumentError)):
            raise exc
        log.info("CUDA shared memory refused, sending GPU tensors through the host: %s", error)
        self._cuda = None

    def _cuda_buffer(self, nbytes: int, device: Any) -> Any:
        """The registered CUDA buffer (at least nbytes, on `device`), None once the server has
        refused CUDA regions. Call with the shared memory lock held."""
        region = self._cuda
        if region is None:
            return None

        def register(message: pb.CudaIpcRegion, size: int) -> None:
            request = pb.RegisterSharedMemoryRequest(name=self._shm_names.cuda, byte_size=size, cuda=message)
            self._stub.RegisterSharedMemory(request, timeout=self.timeout)

        try:
            return region.ensure(nbytes, device, register)
        except grpc.RpcError as exc:
            self._cuda_refused(exc)
            return None
        except RuntimeError as exc:  # torch's: out of GPU memory (this call), or no CUDA IPC here (for good)
            log.info("no CUDA shared memory region, sending GPU tensors through the host: %s", exc)
            if type(exc).__name__ != "OutOfMemoryError":
                self._cuda = None
            return None

    def _cuda_upload(self, items: list[tuple[str, Any]]) -> list[tuple[pb.SharedTensor, str]] | None:
        """Copy an upload with CUDA tensors into the registered CUDA buffer (device to device; host
        values beside them host to device) and say where each lies; None (nothing sent) where the
        upload is small or the server takes no CUDA regions."""
        if self._cuda is None:
            return None
        tensors = [(name, _cuda.as_tensor(value)) for name, value in items]
        placed, nbytes = _cuda.layout(tensors)
        if sum(m.byte_size for m, _ in placed) < _shm.MIN_UPLOAD_BYTES:
            return None
        device = next(t.device for _, t in tensors if _cuda.is_cuda(t))
        buffer = self._cuda_buffer(nbytes, device)
        if buffer is None:
            return None
        _cuda.write(buffer, placed)
        return [(m, self._shm_names.cuda) for m, _ in placed]

    @_rpc
    def _fetch_to_device(self, handle: str, names: list[str], device: Any) -> list[tuple[str, Any]] | None:
        """A fetch into new CUDA tensors on `device` through the registered CUDA buffer (the server
        copies device to device); None where the server takes no CUDA regions (the caller then
        fetches through the host). Its failures are the client's exceptions (`_rpc`): the torch
        helpers' `fetch(..., device="cuda")` calls it, and a raw grpc.RpcError (NOT_FOUND for a
        freed handle) escaped there, which no `except WeightavgError` caught (found by review)."""
        try:
            return self._device_fetch(handle, names, device)
        except grpc.RpcError as exc:
            if not self._regions_lost(exc):
                raise
        return self._device_fetch(handle, names, device)  # registered again

    def _device_fetch(self, handle: str, names: list[str], device: Any) -> list[tuple[str, Any]] | None:
        """`_fetch_to_device`, its CUDA buffer as this client holds it."""
        with self._shm_lock:
            buffer = self._cuda_buffer(0, device)
            if buffer is None:
                return None
            while True:  # again if the object grew between the calls
                request = pb.FetchTensorsToSharedMemoryRequest(handle=handle, names=names, region=self._shm_names.cuda)
                r = self._stub.FetchTensorsToSharedMemory(request, timeout=self.timeout)
                if r.tensors or not r.needed_bytes:
                    return _cuda.read(buffer, r.tensors)
                buffer = self._cuda_buffer(r.needed_bytes, device)
                if buffer is None:
                    return None

    def _shm_fetch(
        self, handle: str, names: list[str], etag: list[str] | None = None
    ) -> list[tuple[str, npt.NDArray[Any]]] | None:
        """A fetch through shared memory, None where the server refuses it; the object's etag, read
        with the values, is appended to `etag` when given.

        One call names the reused region (small fetches, copied out) and the largest free region of
        the pool as its overflow (large fetches, returned as views of it: no copy here, and its
        pages were faulted by an earlier fetch). A large fetch that no free region holds gets one
        (registered, or re-registered larger) and a second call.
        """
        with self._shm_lock:
            buf = self._shm_buffer(0)
            if buf is None:
                return None
            pool = self._shm_pool
            free = pool.largest_free()
            request = pb.FetchTensorsToSharedMemoryRequest(
                handle=handle, names=names, region=self._shm_names.region, max_bytes=_shm.SMALL_FETCH_BYTES,
                overflow_region=free[0] if free else "",
            )
            r = self._stub.FetchTensorsToSharedMemory(request, timeout=self.timeout)
            while True:  # again if the object grew between the calls
                if r.tensors or not r.needed_bytes:
                    if etag is not None:
                        etag.append(r.etag)
                    if r.region and r.region != self._shm_names.region:
                        lent = pool.lend(r.region, r.tensors)
                        if lent is None:  # was a bare AssertionError
                            raise CancelledError("the client was closed while this fetch ran", "CANCELLED")
                        return lent
                    return _shm.read(buf, r.tensors)
                if r.needed_bytes <= _shm.SMALL_FETCH_BYTES:
                    buf = self._shm_buffer(r.needed_bytes)
                    if buf is None:
                        return None
                    request = pb.FetchTensorsToSharedMemoryRequest(
                        handle=handle, names=names, region=self._shm_names.region, max_bytes=_shm.SMALL_FETCH_BYTES
                    )
                else:
                    name = self._pool_region(r.needed_bytes, "a fetch, using the stream")
                    if name is None:
                        return None
                    request = pb.FetchTensorsToSharedMemoryRequest(handle=handle, names=names, region=name)
                r = self._stub.FetchTensorsToSharedMemory(request, timeout=self.timeout)

    def _close_shm(self, unregister: bool = True) -> None:
        """Unmap the regions here (a lent one with its last array) and use the stream from now on;
        the server unmaps them with the session, or now, for a joined one (`unregister`: this
        client's regions only, by name, since other clients of the session keep theirs). The CUDA
        buffer may go first: torch keeps an exported buffer's memory out of reuse until the server
        has dropped its mapping."""
        region, self._shm = self._shm, None
        cuda, self._cuda = self._cuda, None
        names = self._shm_pool.unused()
        if region is not None and region.size > 0:
            names.append(self._shm_names.region)
        if cuda is not None and cuda.size > 0:
            names.append(self._shm_names.cuda)
        if unregister and not self._owns_session:
            for name in names:
                try:
                    self._stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=name), timeout=10.0)
                except grpc.RpcError as exc:
                    log.info("could not unregister shared memory region %s: %s", name, from_rpc_error(exc))
        if region is not None:
            region.close()
        if cuda is not None:
            cuda.close()


def _renew(
    client: weakref.ref[Client], stub: pb_grpc.WeightAveragingServiceStub, stop: threading.Event, lease: float,
    session: str | None,
) -> None:
    """Renew a session's lease three times per lease period until the client is closed or garbage
    collected (`stop`); stop if the session has ended. Then, as when a client dies, the server frees
    the session's handles once the lease runs out."""
    interval = max(lease / 3.0, 0.05)
    while not stop.wait(interval) and client() is not None:
        try:
            stub.KeepAliveSession(pb.KeepAliveSessionRequest(), timeout=interval)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, NotFoundError):
                log.warning("session %s has ended on the server: %s", session, error)
                return
            log.info("session keep-alive failed (will retry): %s", error)


def _placement(replicate: bool, rank: int | None) -> pb.Placement:
    """Where a new object lives on a cluster; the default (rank 0) is what a one-rank server does."""
    return pb.Placement(replicate=replicate, rank=rank)


def as_array(value: Any) -> npt.NDArray[Any]:
    """Values as numpy arrays (0-dim for scalars), for callers that want arrays throughout."""
    return np.asarray(value)
