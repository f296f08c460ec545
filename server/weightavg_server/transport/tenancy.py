"""Who may call what: the bearer token names a tenant and a role, each RPC needs a role, and every
call that changes something leaves one JSON audit line.

`TenantInterceptor` runs before any servicer code: it looks the call's token up in the current
`TokenTable` (swapped whole on SIGHUP, so a removed token stops working with the next call), refuses
an unknown token (UNAUTHENTICATED) or a role the method does not allow (PERMISSION_DENIED) before
the request is read, and otherwise serves the call with `store.tenants.CALLER` set, so the store
files new handles under the tenant, hides other tenants' handles and counts its quota. It counts
calls and failures per tenant and writes the audit line (logger `weightavg.audit`) when the call ends.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import json
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import Message

from weightavg.v1 import weightavg_pb2 as pb

from ..store.tenants import ANONYMOUS, CALLER, DEFAULT_TENANT, Caller, Quota, Role
from .interceptors import SESSION_METADATA, Metadata, metadata_value, same_kind
from .observe import status_name
from .stats import RpcStats

log = logging.getLogger("weightavg.security")
audit_log = logging.getLogger("weightavg.audit")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # a string: grpc's class is generic only in its stubs
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"

AUTHORIZATION_METADATA = "authorization"
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without the token: health checks, so orchestrators can probe without the secret
(they learn only SERVING or NOT_SERVING)."""
SERVICE_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name + "/"


class Access(enum.Enum):
    """What an RPC needs of the caller's role, and whether it is audited."""

    READ = "read"
    """Fetch, list, describe: any role. Not audited."""
    USE = "use"
    """Runs work on the tenant's objects without changing them (evaluate, test, keep a session
    alive): user or admin. Not audited."""
    CHANGE = "change"
    """Creates, changes or frees objects or sessions: user or admin. Audited."""
    ADMIN = "admin"
    """Spans every tenant (server-wide snapshots): admin only. Audited."""

    @property
    def audited(self) -> bool:
        return self in (Access.CHANGE, Access.ADMIN)

    def allows(self, role: Role) -> bool:
        if self is Access.READ:
            return True
        if self is Access.ADMIN:
            return role is Role.ADMIN
        return role is not Role.READER


_READ = (
    "Ping", "GetServerInfo", "DescribeModule", "ListParameterNames", "ListBufferNames", "FetchTensors", "GetSize",
    "ListHandles", "GetLearningRate", "DescribeModel", "GetModelOptions", "GetServerStats",
    "FetchTensorsToSharedMemory", "ListSharedMemory",
)
_USE = ("RunTest", "EvaluateModel", "KeepAliveSession")
_CHANGE = (
    "CreateModule", "SetParameter", "ViewParameters", "ViewBuffers", "CopyParameters", "LoadParameters",
    "AverageParameters", "ResetBatchNorm", "RestoreMomentum", "CreateDictionary", "UpdateDictionary", "DeleteEntries",
    "CreateTensor", "FreeHandles", "AddReference", "MoveHandle", "CreateLoss", "CreateOptimizer", "SetLearningRate",
    "CreateModel", "UpdateModel", "SetModelOptions", "SetModelData", "RunEpoch", "RunForward", "GetModelInput",
    "RestoreModelData", "NextBatch", "RecalculateBatchNorm", "CreateSession", "CloseSession", "UpdateMovingAverage",
    "AverageDictionaries", "MergeDictionaries", "ApplyOuterStep", "BuildGreedySoup",
    "RegisterSharedMemory", "UnregisterSharedMemory", "CreateDictionaryFromSharedMemory",
    "AllReduce", "Broadcast",
)
_ADMIN = ("Snapshot",)
ACCESS: dict[str, Access] = {
    **{name: Access.READ for name in _READ}, **{name: Access.USE for name in _USE},
    **{name: Access.CHANGE for name in _CHANGE}, **{name: Access.ADMIN for name in _ADMIN},
}
"""Every weightavg RPC by name (tests/test_tenants.py checks that each one is here). Note that
ListHandles(all_tenants) and FreeHandles(tenant) are admin-only as well: the store checks those,
since they depend on the request."""


def access_of(method: str) -> Access:
    """What a full method name needs: its row in ACCESS; other services' methods (reflection) READ; a
    weightavg method missing from the table CHANGE, so a new RPC is never open to readers by mistake."""
    if not method.startswith(SERVICE_PREFIX):
        return Access.READ
    return ACCESS.get(method[len(SERVICE_PREFIX):], Access.CHANGE)


def token_digest(token: str) -> bytes:
    """The table's key for a token: its SHA-256. Looking the digest up in a dict takes no longer for a
    nearly right token than for a wrong one, and the table holds no token in the clear."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenTable:
    """Tokens (by digest) to the tenant and role they stand for, and each tenant's quota.

    `open` (no token configured at all) serves every call as the default tenant's admin, as a
    server without --token always has.
    """

    callers: Mapping[bytes, Caller] = field(default_factory=dict)
    quotas: Mapping[str, Quota] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not self.callers

    @functools.cached_property
    def tenants(self) -> frozenset[str]:
        """The tenants this table names (by a token or a quota; an open table: the default tenant,
        whose admin every caller is): those whose calls are counted (`RpcStats.keep_tenants`)."""
        if self.open:
            return frozenset({DEFAULT_TENANT})
        return frozenset(c.tenant for c in self.callers.values()) | frozenset(self.quotas)

    @classmethod
    def single(cls, token: str) -> TokenTable:
        """The table of `--token`: one admin token of the default tenant."""
        return cls({token_digest(token): Caller(DEFAULT_TENANT, Role.ADMIN)}) if token else cls()

    def caller(self, token: str) -> Caller | None:
        return self.callers.get(token_digest(token))


class Tokens:
    """The token table in force; `replace` swaps it whole (SIGHUP), so each call sees one table."""

    def __init__(self, table: TokenTable) -> None:
        self._table = table
        self._lock = threading.Lock()

    @property
    def table(self) -> TokenTable:
        return self._table

    def replace(self, table: TokenTable) -> None:
        with self._lock:
            self._table = table


def refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler that answers `code` without reading the request, streaming replies as `handler`.

    It takes the request as a stream whatever the method's kind (the same bytes on the wire): for a
    single request grpc waits on the worker thread for the message before it calls the behaviour,
    so a caller without a token that sent a call's headers and never its message held a worker for
    as long as it liked, and as many such calls as workers stopped every tenant's calls (found by
    review). A stream's messages are read only when asked for, and this handler never asks."""

    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def refuse_stream(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_unary_rpc_method_handler(refuse)


# -- the audit line -----------------------------------------------------------------------------------

HANDLE_FIELDS = (
    "handle", "dictionary", "dictionaries", "module", "loss", "optimizer", "model", "input", "handles", "parts", "into",
    "base", "average", "ingredients",
)
"""Names of the request fields that hold handle ids (strings, or repeated strings), in the order an audit
line lists them. Every field the proto documents as a "handle id" is here, and no other field has one
of these names (tests/test_tenants.py reads the .proto to check): five were missing once, so calls
that probed other tenants' ids through them were audited naming no handle (found by review)."""
SESSION_FIELD = "session"
"""The request field naming the session a call acts on (CloseSession), and the reply field naming the
session a call opened (CreateSession): the audit line records it rather than the call's metadata."""
MAX_AUDITED_HANDLES = 64
"""An audit line names at most this many handles (a FreeHandles of thousands says how many it left out)."""
MAX_AUDITED_CHARS = 256
"""An id, request ID or session in an audit line keeps at most this many characters, then says how many
it left out: the caller chooses these strings, and an 8 MiB id once made an 8 MB audit line (found by
review). Real ids are far shorter (a handle id is 36 characters)."""


def bounded(text: str) -> str:
    """`text`, cut to MAX_AUDITED_CHARS characters with a marker saying how many were left out."""
    if len(text) <= MAX_AUDITED_CHARS:
        return text
    return f"{text[:MAX_AUDITED_CHARS]}...[{len(text) - MAX_AUDITED_CHARS} more characters]"


def request_handles(request: Any) -> list[str]:
    """The handle ids a request names, in HANDLE_FIELDS order (the first message of a stream). Upload
    streams decode to plain objects with the message's string fields, so fields are read by name."""
    found: list[str] = []
    for name in HANDLE_FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str):
            if value:
                found.append(value)
        elif value is not None and not isinstance(value, (bytes, Message)):
            try:
                found.extend(v for v in value if isinstance(v, str) and v)
            except TypeError:
                pass
    return found


def named_session(message: Any) -> str:
    """The session a request or reply names in its `session` field, else ""."""
    value = getattr(message, SESSION_FIELD, "")
    return value if isinstance(value, str) else ""


def response_handles(response: Any) -> list[str]:
    """The ids of the handles a reply hands out (new handles, or the same handle)."""
    if not isinstance(response, Message):
        return []
    return [value.id for fd, value in response.ListFields() if fd.message_type is pb.Handle.DESCRIPTOR]


def request_id(request: Any) -> str:
    """The request's `request_id` field where its message has one, else ""."""
    value = getattr(request, "request_id", "")
    return value if isinstance(value, str) else ""


def audit(
    method: str, caller: Caller | None, outcome: str, handles: list[str], rid: str, session: str | None,
    seconds: float,
) -> None:
    """Write one audit line: JSON with the time (UTC, ISO 8601), tenant, role, method, handles,
    request ID, session, outcome and duration. Never a token, never request data; every string the
    caller chose is `bounded`, and at most MAX_AUDITED_HANDLES handles are listed, so a line stays
    a few kilobytes whatever the request."""
    if not audit_log.isEnabledFor(logging.INFO):
        return
    unique = list(dict.fromkeys(handles))
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "tenant": caller.tenant if caller is not None else None,
        "role": caller.role.value if caller is not None else None,
        "method": method.rsplit("/", 1)[-1],
        "handles": [bounded(h) for h in unique[:MAX_AUDITED_HANDLES]],
        "request_id": bounded(rid),
        "session": bounded(session) if session is not None else None,
        "outcome": outcome,
        "duration_ms": round(seconds * 1e3, 3),
    }
    if len(unique) > MAX_AUDITED_HANDLES:
        record["handles_omitted"] = len(unique) - MAX_AUDITED_HANDLES
    audit_log.info("%s", json.dumps(record, separators=(",", ":"), ensure_ascii=True))


class _Call:
    """What one served call records for the audit line: the handles it named, the request ID and the
    session it named (closed or opened)."""

    __slots__ = ("audited", "handles", "rid", "session")

    def __init__(self, audited: bool) -> None:
        self.audited = audited
        """Whether an audit line will be written (a change, with the audit logger on at INFO)."""
        self.handles: list[str] = []
        self.rid = ""
        self.session = ""
        """The session the request names (CloseSession) or the reply opened (CreateSession); "" for
        most calls, whose line records the session of their metadata instead."""

    def saw(self, request: Any) -> None:
        self.handles.extend(request_handles(request))
        self.rid = self.rid or request_id(request)
        self.session = self.session or named_session(request)

    def answered(self, response: Any) -> None:
        """Record what a unary reply hands out: new handles, or a new session."""
        self.handles.extend(response_handles(response))
        self.session = self.session or named_session(response)

    def first_of(self, requests: Iterator[Any]) -> Iterator[Any]:
        """The request stream, passing through; its first message is read for handles and ID."""
        first = True
        for request in requests:
            if first:
                self.saw(request)
                first = False
            yield request


_UNAUDITED = _Call(False)
"""The record of every call that writes no audit line: nothing is collected into it (`begin` and
`unary` look at `audited` first), so one serves them all."""



def bearer_token(value: str | None) -> str | None:
    """The token of an `authorization` value of the Bearer scheme, whose name is case-insensitive
    (RFC 7235: `bearer x` and `BEARER x` are `Bearer x`); None for no value or another scheme."""
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.lstrip(" ")
    return token if scheme.lower() == "bearer" and token else None


class TenantInterceptor(grpc.ServerInterceptor):
    """Authenticates each call's token to a tenant and role, authorizes the method, and serves the
    call as that caller: per-tenant statistics in `stats`, an audit line for calls that change
    something (every call of a server with tokens or not)."""

    def __init__(self, tokens: Tokens, stats: RpcStats) -> None:
        self.tokens = tokens
        self.stats = stats

    def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        return self.gate(details.method, details, handler) or self.wrap(details.method, handler)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler again, its calls authenticated and authorized again on the worker thread and
        run as their caller (open methods: as they are)."""
        if method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        return self._as(handler, method, access_of(method))

    def gate(self, method: str, details: grpc.HandlerCallDetails, handler: Handler) -> Handler | None:
        """Per call, on gRPC's polling thread (InterceptorChain): for a call whose token or role does
        not allow the method, a handler that refuses it before its request message is read; None
        for the rest (on a server without tokens, one attribute read)."""
        if self.tokens.table.open or method.startswith(OPEN_SERVICE_PREFIXES):
            return None
        metadata = details.invocation_metadata
        verdict = self._authorize(method, access_of(method), metadata, metadata_value(metadata, SESSION_METADATA))
        return refusal(handler, *verdict) if isinstance(verdict, tuple) else None

    def caller_of(self, metadata: Metadata) -> Caller | None:
        """The caller a call's token names (an open server's: its one admin), or None for no valid
        token; nothing logged or audited. For layers after this one that act where a call arrives,
        on gRPC's polling thread, once this layer's gate has let the call through."""
        table = self.tokens.table
        if table.open:
            return ANONYMOUS
        token = bearer_token(metadata_value(metadata, AUTHORIZATION_METADATA))
        return table.caller(token) if token is not None else None

    def _authorize(
        self, method: str, access: Access, metadata: Metadata, session: str | None
    ) -> Caller | tuple[grpc.StatusCode, str]:
        """The caller a call's token names, or the status that refuses the call (logged and audited
        here): no valid token, or a role that may not call the method."""
        table = self.tokens.table
        if table.open:
            caller = ANONYMOUS
        else:
            given = metadata_value(metadata, AUTHORIZATION_METADATA)
            token = bearer_token(given)
            found = table.caller(token) if token is not None else None
            if found is None:
                reason = (
                    "no bearer token" if given is None
                    else "wrong bearer token" if token is not None
                    else "the authorization metadata is not a bearer token"
                )
                log.info("%s -> UNAUTHENTICATED: %s", method, reason)
                if access.audited:
                    audit(method, None, "UNAUTHENTICATED", [], "", session, 0.0)
                return (
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{reason}: this server requires 'authorization: Bearer <token>' metadata (the Python "
                    "client: Client(token=...); the weightavg commands: --token or WEIGHTAVG_TOKEN)",
                )
            caller = found
        if not access.allows(caller.role):
            self.stats.tenant_finish(caller.tenant, "PERMISSION_DENIED")
            if access.audited:
                audit(method, caller, "PERMISSION_DENIED", [], "", session, 0.0)
            name = method.rsplit("/", 1)[-1]
            needed = "an admin token" if access is Access.ADMIN else "a user or admin token"
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs {needed}; this call's token is tenant '{caller.tenant}', role {caller.role.value}",
            )
        return caller

    def _caller(
        self, method: str, access: Access, metadata: Metadata, session: str | None, context: grpc.ServicerContext
    ) -> Caller:
        """The caller of a call the gate let through, looked up again on the worker thread that serves
        it (a context variable set on the polling thread would not be this call's for certain); the
        tokens may have been swapped in between, so a refusal is still possible, then with the
        request decoded."""
        verdict = self._authorize(method, access, metadata, session)
        if isinstance(verdict, tuple):
            context.abort(*verdict)
        return verdict

    def _as(self, handler: Handler, method: str, access: Access) -> Handler:
        """The handler again, run with CALLER set to the call's caller on the worker thread that
        serves the call (the interceptor itself runs on gRPC's polling thread), recording the
        outcome when it ends."""
        stats = self.stats
        caller_of = self._caller
        tokens = self.tokens

        def finish(
            context: grpc.ServicerContext, caller: Caller, session: str | None, call: _Call, start: float,
            exc: BaseException | None,
        ) -> None:
            stats.tenant_finish(caller.tenant, status_name(context, exc))
            if call.audited:
                acted_on = call.session or session  # CloseSession(session=X) closes X, whatever the metadata says
                # A call that ended after its client stopped waiting still made its change: OK here.
                outcome = status_name(context, exc, as_client=False)
                audit(method, caller, outcome, call.handles, call.rid, acted_on, time.perf_counter() - start)

        def enter(context: grpc.ServicerContext) -> tuple[Caller, str | None, _Call, float, contextvars.Token[Caller]]:
            """Who calls (refused here if no longer allowed), in which session, and CALLER set for the call.

            On a server without tokens (the caller is the one admin, allowed every method) a call
            that writes no audit line reads no metadata and makes no record: every small call
            passes here, and each step it skips is one its caches need not hold."""
            audited = access.audited and audit_log.isEnabledFor(logging.INFO)
            if not audited and tokens.table.open:
                return ANONYMOUS, None, _UNAUDITED, 0.0, CALLER.set(ANONYMOUS)
            metadata = context.invocation_metadata()
            session = metadata_value(metadata, SESSION_METADATA)
            caller = caller_of(method, access, metadata, session, context)
            return caller, session, _Call(True) if audited else _UNAUDITED, time.perf_counter(), CALLER.set(caller)

        def begin(request: Any, call: _Call) -> Any:
            if not call.audited:  # nothing reads the handles or the ID: skip collecting them
                return request
            if handler.request_streaming:
                return call.first_of(request)
            call.saw(request)
            return request

        if handler.response_streaming:
            inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream
            assert inner_stream is not None  # grpc sets the behaviour that matches the flags

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                caller, session, call, start, token = enter(context)
                try:
                    yield from inner_stream(begin(request, call), context)
                except BaseException as exc:
                    finish(context, caller, session, call, start, exc)
                    raise
                finally:
                    CALLER.reset(token)
                finish(context, caller, session, call, start, None)

            return same_kind(handler, stream)

        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
        assert inner is not None  # grpc sets the behaviour that matches the flags

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            caller, session, call, start, token = enter(context)
            try:
                response = inner(begin(request, call), context)
            except BaseException as exc:
                finish(context, caller, session, call, start, exc)
                raise
            finally:
                CALLER.reset(token)
            if call.audited:
                call.answered(response)
            finish(context, caller, session, call, start, None)
            return response

        return same_kind(handler, unary)
