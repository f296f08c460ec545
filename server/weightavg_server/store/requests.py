"""Request IDs: a call that carries one changes state once, however often it is sent.

A client gives each state-changing call a UUID and sends a retry with the same one (AIP-155). The
table remembers, for a window of time and up to a cap, each ID whose call succeeded: which
operation it was, a digest of its arguments, the caller's session and the answer. A repeat gets that
answer without running again; a repeat that arrives while the first call still runs waits for it; a
repeat with other arguments, another operation or from another session is refused. A call that
failed is not remembered, so its retry runs. Oldest IDs go first, when their window ends or when
the count or byte cap is reached; the table's accounting (`stats`) says how many are remembered,
how many duplicates were answered and how many were dropped at the cap.

Answers are kept as the service returned them (domain values), so a repeat is encoded into the same
response message by the same code as the first; `export`/`restore` write them as JSON values for
snapshots (store/snapshot.py).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import contextvars
import dataclasses
import enum
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import torch

from ..domain.dtypes import DTYPES, NAMES
from ..domain.errors import Cancelled, FailedPrecondition, InvalidArgument
from .tenants import DEFAULT_TENANT

log = logging.getLogger("weightavg.requests")

T = TypeVar("T")

DEFAULT_WINDOW_SECONDS = 3600.0
"""How long an answer is remembered: an hour, as Google's APIs keep request IDs (AIP-155)."""
DEFAULT_MAX_IDS = 100_000
"""An hour of 28 calls a second; past it the oldest IDs go first (retries come within seconds)."""
DEFAULT_MAX_BYTES = 256 << 20
"""What remembered answers may hold: most are a count or a handle, but a training epoch's metrics
can be tensors."""

CALL_ACTIVE: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "weightavg_call_active", default=None
)
"""Whether the call being served still has its client (not cancelled, disconnected or past its
deadline); set by the transport for each call. A repeat waiting for its first call gives up once
it is false: a review saw five retries cut off by their deadlines hold five worker threads until
the first call (a long epoch) ended."""
WAIT_CHECK_SECONDS = 1.0
"""How often a waiting repeat looks whether its client is still there."""

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NIL = "00000000-0000-0000-0000-000000000000"
_RECORD_BYTES = 512
"""About what one record costs beside its answer: the ID and digest strings, the record, the dict slot."""


class RequestKey(NamedTuple):
    """A call's request ID and the digest of its arguments, as the transport hands them to the service.

    A named tuple rather than a frozen dataclass: every state-changing call makes one, and a frozen
    dataclass's __init__ sets each field through object.__setattr__.
    """

    id: str
    """The ID as sent; `canonical_id` checks it."""
    digest: Callable[[], str]
    """The digest of the call's arguments (operation, fields, tensor bytes). For an upload it first
    reads whatever of the stream the call has not read, hashing it without keeping it: it is called
    after the first call has received its upload, and instead of receiving it for a repeat."""
    kept_bytes: int | None = None
    """None: `digest` must be called while the call runs (an upload's reads its stream). Otherwise
    `digest` may be called later, from any thread, keeping about this many bytes alive until then
    (a unary call's arguments): the table calls it only when a repeat or a snapshot needs the
    digest, which most IDs never do, so a call does not pay for hashing its arguments."""


@dataclass
class _TenantShare:
    """One tenant's remembered IDs, oldest first (a dict used as an ordered set), and their bytes."""

    ids: dict[str, None] = dataclasses.field(default_factory=dict)
    nbytes: int = 0


@dataclass(frozen=True)
class RequestStats:
    """The table's accounting."""

    remembered: int
    duplicates_answered: int
    dropped: int


@dataclass(slots=True)
class _Record:
    method: str
    arguments: str | Callable[[], str]
    """The digest of the call's arguments, or (a unary call's) the function that computes it: see
    `digest`."""
    session: str | None
    answer: object
    at: float
    """Clock time it was remembered."""
    nbytes: int
    tenant: str = DEFAULT_TENANT
    """The tenant whose token sent it: a request ID answers only the tenant that first used it."""

    @property
    def digest(self) -> str:
        """The digest of the call's arguments, computed on first use (a race computes it twice, alike)."""
        arguments = self.arguments
        if isinstance(arguments, str):
            return arguments
        self.arguments = digest = arguments()
        return digest


def canonical_id(text: str) -> str:
    """The ID in lower case; InvalidArgument unless it is a UUID in its 36-character form, not all zero."""
    if not _UUID.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidArgument(
            f"request_id {shown!r} is not a UUID: send 36 characters, 8-4-4-4-12 hex digits "
            "(a new uuid4 for each call), or no request_id"
        )
    canonical = text.lower()
    if canonical == _NIL:
        raise InvalidArgument("request_id is the all-zero UUID, which never identifies a call: send a new uuid4 for each call")
    return canonical


class RequestTable:
    """Remembered answers by request ID, oldest first; safe to use from many threads.

    Args:
        window_seconds: how long an answer is remembered; 0 remembers none.
        max_ids: most IDs remembered; 0 remembers none.
        max_bytes: most bytes remembered answers may hold (an estimate, see `answer_bytes`).
        clock: seconds, monotonic (tests pass their own).
        on_remember: called for each answer remembered (the registry counts it as a change).
    """

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_ids: int = DEFAULT_MAX_IDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
        on_remember: Callable[[], None] = lambda: None,
    ) -> None:
        self._lock = threading.Lock()  # never taken twice by one thread
        self._on_remember = on_remember
        """Called (lock held) for each answer remembered: a snapshot holds the answers (`Registry.changes`)."""
        """Taken directly (`with self._lock`, a C call) by every call; `_cond` waits and wakes on it."""
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        """Threads waiting on `_cond`: a call that ends wakes them only when there are some."""
        self._clock = clock
        self._records: collections.OrderedDict[str, _Record] = collections.OrderedDict()
        self._by_tenant: dict[str, _TenantShare] = {}
        """Each tenant's IDs, oldest first, and the bytes they hold: at a cap the tenant holding the
        most gives up its oldest, so that one tenant's calls cannot push another's IDs out."""
        self._running: set[str] = set()
        """IDs whose first call is running; a repeat waits for it."""
        self._paused = 0
        """Snapshots under way: new first calls wait until they are done."""
        self._bytes = 0
        self._duplicates = 0
        self._dropped = 0
        self.window_seconds = window_seconds
        self.max_ids = max_ids
        self.max_bytes = max_bytes
        self._enabled = False
        """Whether anything is remembered: set with the window and the caps (`configure`)."""
        self.configure(window_seconds, max_ids, max_bytes)

    def configure(self, window_seconds: float, max_ids: int, max_bytes: int) -> None:
        """Change the window and the caps; what no longer fits is forgotten, oldest first.

        Raises:
            ValueError: a negative or non-finite value.
        """
        if not (math.isfinite(window_seconds) and window_seconds >= 0) or max_ids < 0 or max_bytes < 0:
            raise ValueError(
                f"request ID window {window_seconds} s, cap {max_ids} IDs, {max_bytes} bytes: "
                "each must be a finite number, 0 or more (0 remembers none)"
            )
        with self._lock:
            self.window_seconds, self.max_ids, self.max_bytes = window_seconds, max_ids, max_bytes
            self._enabled = window_seconds > 0 and max_ids > 0 and max_bytes > 0
            self._expire()
            self._evict()


    def answer(
        self, key: RequestKey | None, method: str, session: str | None, run: Callable[[], T],
        tenant: str = DEFAULT_TENANT,
    ) -> T:
        """Run `run` once for this request ID and remember its answer; a repeat gets that answer.

        A repeat waits while the first call runs; if that call fails, the repeat runs in its place.
        Without a key the call just runs.

        Raises:
            InvalidArgument: the ID is not a UUID or is all zero; or it was first used for another
                operation, other arguments, in another session or by another tenant.
        """
        if key is None:
            return run()
        rid = canonical_id(key.id)
        active = CALL_ACTIVE.get()
        with self._lock:
            enabled = self._enabled
            record = None
            while enabled:
                self._expire()
                record = self._records.get(rid)
                if record is not None:
                    break
                if rid not in self._running and not self._paused:
                    self._running.add(rid)
                    break
                self._wait(active)
        if not enabled:
            return run()
        if record is not None:
            self._check(rid, record, method, session, tenant, key.digest())  # outside the lock: may read an upload
            with self._lock:
                self._duplicates += 1
            if isinstance(record.answer, AnswerNotKept):
                raise record.answer.refusal(rid, method, self.max_bytes)
            return cast(T, record.answer)  # remembered by this method, so of the type it returns
        try:
            answer = run()
            arguments = key.digest if key.kept_bytes is not None else key.digest()
        except BaseException:
            with self._lock:
                self._running.discard(rid)
                self._wake()
            raise
        nbytes = _RECORD_BYTES + answer_bytes(answer) + (key.kept_bytes or 0)
        with self._lock:  # remembered and released in one step, so a repeat never runs it again
            kept = self._kept(rid, method, answer, nbytes, _RECORD_BYTES + (key.kept_bytes or 0))
            if kept is not None:
                self._remember(rid, _Record(method, arguments, session, kept[0], self._clock(), kept[1], tenant))
                self._evict()
            self._running.discard(rid)
            self._wake()
        return answer

    def _kept(self, rid: str, method: str, answer: object, nbytes: int, bare: int) -> tuple[object, int] | None:
        """What to remember of an answer holding `nbytes` (`bare`: its record without the answer),
        and the bytes that holds (lock held). An answer larger than the whole byte cap is dropped
        (counted and logged), and only that the call ran is kept (`AnswerNotKept`); None when even
        that does not fit.

        Remembered whole, such an answer made `_evict` forget every other ID of its tenant (with one
        tenant, every ID) before itself: a review found one large epoch's metrics making a retried
        avgparms count twice. Forgotten whole, its own retry ran again: an epoch whose answer was
        lost trained twice (review, 2026-11-28)."""
        if nbytes <= self.max_bytes:
            return answer, nbytes
        self._dropped += 1
        log.warning(
            "request ID %s of %s: its answer, about %d bytes, is over the cap of %d (--max-request-id-bytes) and "
            "is not remembered; a retry of it gets FAILED_PRECONDITION and is not run again",
            rid, method, nbytes, self.max_bytes,
        )
        return (AnswerNotKept(nbytes), bare) if bare <= self.max_bytes else None

    def _wait(self, active: Callable[[], bool] | None = None) -> None:
        """Wait for a call to end or a snapshot to finish (lock held).

        Raises:
            Cancelled: `active` (the waiting call's client is still there) turned false; nothing ran.
        """
        self._waiting += 1
        try:
            if active is None:
                self._cond.wait()
            elif not self._cond.wait(WAIT_CHECK_SECONDS) and not active():
                raise Cancelled(
                    "the call ended (cancelled, or past its deadline) while it waited for the first call with "
                    "its request ID; nothing ran: retry with the same ID to get that call's answer"
                )
        finally:
            self._waiting -= 1

    def _wake(self) -> None:
        """Wake every waiting thread, if any (lock held)."""
        if self._waiting:
            self._cond.notify_all()

    @staticmethod
    def _check(rid: str, record: _Record, method: str, session: str | None, tenant: str, digest: str) -> None:
        """InvalidArgument unless a repeat is the same call as the one remembered (and by the same
        tenant: another tenant learns nothing of the first call, not even its operation)."""
        again = "a retry must repeat its call exactly, and each new call needs a new request ID"
        if record.tenant != tenant:
            raise InvalidArgument(f"request_id {rid} was already used: {again}")
        if record.method != method:
            raise InvalidArgument(f"request_id {rid} was first used for {record.method}, not {method}: {again}")
        if record.session != session:
            raise InvalidArgument(f"request_id {rid} was first used in another session (or outside one): {again}")
        if record.digest != digest and comparable(record.digest, digest):
            raise InvalidArgument(f"request_id {rid} was first used for {method} with other arguments: {again}")

    def _expire(self) -> None:
        """Forget answers older than the window (lock held)."""
        horizon = self._clock() - self.window_seconds
        while self._records:
            rid, record = next(iter(self._records.items()))
            if record.at > horizon:
                return
            self._forget(rid)

    def _evict(self) -> None:
        """Forget answers until the caps hold (lock held), each counted as dropped: the oldest of the
        tenant holding the most IDs (or, over the byte cap, the most bytes). With one tenant, the
        oldest first. A review found one tenant's burst of calls evicting another's IDs, so that the
        other's retried avgparms ran twice."""
        while self._records and (len(self._records) > self.max_ids or self._bytes > self.max_bytes):
            over_ids = len(self._records) > self.max_ids
            largest = max(self._by_tenant.values(), key=lambda t: len(t.ids) if over_ids else t.nbytes)
            self._forget(next(iter(largest.ids)))
            self._dropped += 1

    def _remember(self, rid: str, record: _Record) -> None:
        """Add a record (lock held; `rid` not remembered yet)."""
        self._records[rid] = record
        self._bytes += record.nbytes
        share = self._by_tenant.get(record.tenant)
        if share is None:
            share = self._by_tenant[record.tenant] = _TenantShare()
        share.ids[rid] = None
        share.nbytes += record.nbytes
        self._on_remember()

    def _forget(self, rid: str) -> None:
        record = self._records.pop(rid)
        self._bytes -= record.nbytes
        share = self._by_tenant[record.tenant]
        del share.ids[rid]
        share.nbytes -= record.nbytes
        if not share.ids:
            del self._by_tenant[record.tenant]

    def stats(self) -> RequestStats:
        """IDs remembered now, duplicates answered and IDs dropped at the caps since the start."""
        with self._lock:
            self._expire()
            return RequestStats(len(self._records), self._duplicates, self._dropped)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold new first calls back and wait for the running ones to finish.

        A snapshot collects inside this, so that it holds the ID of every call whose change it holds
        and no ID of a call whose change it lacks. Take it before any object lock: running calls may
        be waiting for those.
        """
        with self._lock:
            self._paused += 1
            while self._running:
                self._wait()
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._wake()

    def export(self) -> list[dict[str, Any]]:
        """Every remembered answer as JSON values, oldest first, with its age in seconds.

        An answer of a type that `encode` does not know is left out with an error in the log rather
        than failing the snapshot that asks for it.
        """
        with self._lock:
            self._expire()
            now = self._clock()
            records = list(self._records.items())
        out = []
        for rid, r in records:
            try:
                answer = encode(r.answer)
            except TypeError as exc:
                log.error("request ID %s of %s is not saved in the snapshot: %s", rid, r.method, exc)
                continue
            out.append({"id": rid, "method": r.method, "digest": r.digest, "session": r.session, "tenant": r.tenant,
                        "age": now - r.at, "answer": answer})
        return out

    def restore(self, saved: list[SavedAnswer], elapsed: float = 0.0) -> int:
        """Remember answers read back with `parse_saved`, each `elapsed` seconds older (the time the
        server was down); those past the window are left out. Returns the number remembered."""
        with self._lock:
            if not self._enabled:
                return 0
            now = self._clock()
            for r in sorted(saved, key=lambda r: -r.age):
                if r.id in self._records:
                    self._forget(r.id)
                kept = self._kept(r.id, r.method, r.answer, _RECORD_BYTES + answer_bytes(r.answer), _RECORD_BYTES)
                if kept is None:
                    continue
                self._remember(r.id, _Record(
                    r.method, r.digest, r.session, kept[0], now - r.age - max(elapsed, 0.0), kept[1], r.tenant
                ))
            self._expire()
            self._evict()
            return len(self._records)


def comparable(remembered: str, digest: str) -> bool:
    """Whether two digests of one call come from the same scheme (`scheme`). An upload's digest
    changed scheme (transport/requests.py); a repeat whose first call a server before the change
    remembered, restored from its snapshot, cannot be checked and is taken as the same call, as
    every honest retry is."""
    return scheme(remembered) == scheme(digest)


def scheme(digest: str) -> str:
    """A digest's scheme: what comes before its ':', or "" for a digest without one (a SHA-256 hex)."""
    name, tagged, _ = digest.partition(":")
    return name if tagged else ""


class SavedAnswer(NamedTuple):
    """One remembered answer as a snapshot holds it."""

    id: str
    method: str
    digest: str
    session: str | None
    age: float
    answer: object
    tenant: str = DEFAULT_TENANT


def parse_saved(saved: list[dict[str, Any]]) -> list[SavedAnswer]:
    """The answers `RequestTable.export` wrote, decoded.

    Raises:
        ValueError, KeyError, TypeError, InvalidArgument: a record that is not understood.
    """
    return [
        SavedAnswer(canonical_id(str(r["id"])), str(r["method"]), str(r["digest"]),
                    None if r["session"] is None else str(r["session"]), float(r["age"]), decode(r["answer"]),
                    str(r.get("tenant", DEFAULT_TENANT)))
        for r in saved
    ]


# -- answers as JSON values -------------------------------------------------------------------------------

_TYPES: dict[str, type] = {}


def register_answer_type(cls: type[T]) -> type[T]:
    """Let answers hold instances of a dataclass or an enum (the service's Ref, the store's Kind), so
    that they survive a snapshot. Types are known by their class name."""
    _TYPES[cls.__name__] = cls
    return cls


@register_answer_type
@dataclass(frozen=True)
class AnswerNotKept:
    """What is remembered of a call whose answer was larger than the whole byte cap: that it ran.

    A repeat is refused rather than run again (an epoch would train twice) or answered (there is
    no answer to give); it is counted as dropped, and snapshots keep it as any answer.
    """

    nbytes: int
    """About what the answer held."""

    def refusal(self, rid: str, method: str, max_bytes: int) -> FailedPrecondition:
        """The error a repeat gets."""
        return FailedPrecondition(
            f"request_id {rid}: the first call of {method} with this ID ran and succeeded, but its answer (about "
            f"{self.nbytes} bytes) was over the {max_bytes} bytes the server keeps for repeats "
            "(--max-request-id-bytes), so it is neither sent again nor run again: read what the call changed "
            "instead (fetch the model or dictionary), or ask for a smaller answer (fewer metrics)"
        )


def answer_bytes(value: object) -> int:
    """About the bytes an answer holds: tensor data and strings, plus a little per item."""
    if value is None or type(value) in (int, float, bool):  # most answers: a count
        return 32
    if isinstance(value, torch.Tensor):
        return 128 + value.numel() * value.element_size()
    if isinstance(value, str):
        return 64 + len(value)
    if isinstance(value, (list, tuple)):
        return 64 + sum(answer_bytes(v) for v in value)
    if isinstance(value, dict):
        return 64 + sum(answer_bytes(k) + answer_bytes(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return 64 + sum(answer_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 32


def encode(value: object) -> Any:
    """An answer as JSON values: scalars as they are, everything else tagged with what it was.

    Raises:
        TypeError: a value of a type answers cannot hold (see `register_answer_type`).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": NAMES[value.dtype], "shape": list(value.shape), "data": base64.b64encode(data).decode()}
    if isinstance(value, enum.Enum) and _TYPES.get(type(value).__name__) is type(value):
        return {"enum": type(value).__name__, "value": encode(value.value)}
    if dataclasses.is_dataclass(value) and _TYPES.get(type(value).__name__) is type(value):
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"dataclass": type(value).__name__, "fields": fields}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return {"list": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"an answer of type {type(value).__name__} cannot be saved; register it with register_answer_type")


def decode(data: Any) -> Any:
    """The answer `encode` wrote.

    Raises:
        ValueError, KeyError, TypeError: data that `encode` did not write.
    """
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"not an encoded answer: {str(data)[:80]}")
    if "tensor" in data:
        raw = bytearray(base64.b64decode(data["data"], validate=True))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(DTYPES[data["tensor"]]).reshape([int(d) for d in data["shape"]])
    if "enum" in data:
        return _TYPES[data["enum"]](decode(data["value"]))
    if "dataclass" in data:
        return _TYPES[data["dataclass"]](**{str(k): decode(v) for k, v in data["fields"].items()})
    if "tuple" in data:
        return tuple(decode(v) for v in data["tuple"])
    if "list" in data:
        return [decode(v) for v in data["list"]]
    if "dict" in data:
        return {decode(k): decode(v) for k, v in data["dict"]}
    raise ValueError(f"not an encoded answer: {str(data)[:80]}")
