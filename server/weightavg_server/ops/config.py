"""Server configuration: one frozen dataclass, defaults as constants, WEIGHTAVG_* environment overrides."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields

from weightavg._sizes import BYTE_SIZE_FORMS as BYTE_SIZE_FORMS  # re-exported: the flags and tests read them here
from weightavg._sizes import MAX_BYTE_SIZE as MAX_BYTE_SIZE
from weightavg._sizes import parse_bytes as parse_bytes
from weightavg.wire import CHUNK_BYTES

from ..domain import hostcache, pinned
from ..domain.specs import MAX_SPEC_LAYERS
from ..store import requests
from ..store.limits import Limits

ENV_PREFIX = "WEIGHTAVG_"
DEFAULT_HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
"""Addresses only this host reaches: a port bound elsewhere without a token is warned about."""
DEFAULT_PORT = 50051
DEFAULT_DEVICE = "auto"
DEFAULT_MAX_WORKERS = 32
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = CHUNK_BYTES
DEFAULT_MAX_UPLOAD_BYTES = 1 << 40
DEFAULT_MAX_SPEC_DEPTH = 32
DEFAULT_MAX_SPEC_LAYERS = MAX_SPEC_LAYERS
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_MAX_DEVICE_BYTES = 0
"""0: each device's own memory size (a CUDA device's total memory, the host's RAM for the CPU)."""
DEFAULT_MAX_HANDLES = 1_000_000
"""Far above any real use; it stops a runaway client from filling memory with empty handles."""
DEFAULT_MAX_SESSIONS = 100_000
"""Far above any real use (each session costs the server a few hundred bytes until its lease runs
out); it stops a runaway client from opening sessions without end."""
DEFAULT_SESSION_LEASE_SECONDS = 60.0
DEFAULT_MAX_SESSION_LEASE_SECONDS = 24 * 3600.0
DEFAULT_KEEPALIVE_TIME_SECONDS = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 20.0
DEFAULT_METRICS_PORT = -1
"""-1: no metrics endpoint; 0 picks a free port; anything else is the port."""
DEFAULT_LOG_LEVEL = "INFO"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""What --log-level takes, in any case (logging's own spellings WARN and FATAL too)."""
DEFAULT_REQUEST_ID_WINDOW_SECONDS = requests.DEFAULT_WINDOW_SECONDS
DEFAULT_MAX_REQUEST_IDS = requests.DEFAULT_MAX_IDS
DEFAULT_MAX_REQUEST_ID_BYTES = requests.DEFAULT_MAX_BYTES
DEFAULT_PINNED_CACHE_BYTES = pinned.CACHE_BYTES
DEFAULT_HOST_CACHE_BYTES = hostcache.CACHE_BYTES
DEFAULT_HOST_CACHE_IDLE_SECONDS = hostcache.IDLE_SECONDS
DEFAULT_MAX_LOCKED_BYTES = pinned.LOCKED_BYTES
DEFAULT_CLUSTER_TIMEOUT_SECONDS = 300.0
"""Under torchrun: how long a rank waits on another (a command, a result, a collective) before the
cluster is declared broken; also the longest a call on objects of another rank may run, and how far
apart the ranks' parts of a call on replicated objects may end."""


_INT32_MAX = 2**31 - 1
_WHOLE_AT_LEAST = {
    "max_workers": 1, "max_message_bytes": 1, "chunk_bytes": 1, "max_spec_depth": 1, "max_spec_layers": 1,
}
"""Settings that must be whole numbers from this low to what grpc and the codecs take (int32).
--max-spec-layers 0 or -1 served a server that refused every spec ("more than -1 layers"), and one
past int64 made every GetServerInfo INTERNAL (found by review)."""
CHUNK_HEADER_ROOM = 1024
"""Bytes of each message the server keeps free of --chunk-bytes for a chunk's name, shape, counts,
checksum and protobuf framing (about 30 bytes with a parameter's usual name; names of several
hundred characters fit)."""
_CAPS = (
    "max_upload_bytes", "max_device_bytes", "max_handles", "max_sessions", "max_request_ids", "max_request_id_bytes",
)
"""Caps of 0 or more (0 means "none", "remember none" or "the device's size" where the flag says so)."""
_KEEPALIVE_MAX = _INT32_MAX / 1000
"""grpc takes keepalive settings as int32 milliseconds."""
_SECONDS: dict[str, tuple[bool, float]] = {
    "grace_seconds": (False, threading.TIMEOUT_MAX),
    "snapshot_every": (False, threading.TIMEOUT_MAX),
    "session_lease_seconds": (True, threading.TIMEOUT_MAX),
    "max_session_lease_seconds": (True, threading.TIMEOUT_MAX),
    "keepalive_time_seconds": (True, _KEEPALIVE_MAX),
    "keepalive_timeout_seconds": (True, _KEEPALIVE_MAX),
    "cluster_timeout_seconds": (True, threading.TIMEOUT_MAX),
    "host_cache_idle_seconds": (True, threading.TIMEOUT_MAX),
    "request_id_window_seconds": (False, threading.TIMEOUT_MAX),
}
"""Durations: finite, (more than 0 when True, else 0 or more), at most what a wait or grpc takes."""


def _flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def bare_host(host: str) -> str:
    """The host without the brackets of `[::1]`: what sockets bind and LOOPBACK_HOSTS lists."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """host:port as gRPC targets and URLs write it, an IPv6 address in brackets: gRPC read
    `--host ::1` as "::1:0", the address ::0.1.0.0 on port 443, and could not bind, while `[::1]`
    bound but was warned about as an open interface and could not serve metrics (found by review)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sendable_token(token: str) -> bool:
    """Whether a client can send `token` at all: gRPC metadata values are printable ASCII, and
    surrounding spaces do not survive the `Bearer` header. A server given another (a trailing
    newline from a secret file, a non-ASCII character) refused every call as a wrong token, while
    every client failed locally with INTERNAL: Invalid metadata (found by review)."""
    return token == token.strip() and all(" " <= c <= "~" for c in token)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _flag(raw: str) -> bool:
    """A WEIGHTAVG_* switch: 1/true/yes/on or 0/false/no/off (bool("0") would be True)."""
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a switch: use 1 or 0 (or true/false, yes/no, on/off)")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `create_server` needs; every field can be set by flag or by WEIGHTAVG_<FIELD>."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = DEFAULT_DEVICE
    max_workers: int = DEFAULT_MAX_WORKERS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_spec_depth: int = DEFAULT_MAX_SPEC_DEPTH
    max_spec_layers: int = DEFAULT_MAX_SPEC_LAYERS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES
    max_handles: int = DEFAULT_MAX_HANDLES
    max_sessions: int = DEFAULT_MAX_SESSIONS
    # Reliability and security (see docs/security.md). Empty strings mean "off".
    token: str = ""
    tokens: str = ""
    """Path of the tokens file (--tokens)."""
    audit_log: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    state_dir: str = ""
    snapshot_every: float = 0.0
    """Seconds between periodic snapshots into state_dir; 0: none."""
    session_lease_seconds: float = DEFAULT_SESSION_LEASE_SECONDS
    max_session_lease_seconds: float = DEFAULT_MAX_SESSION_LEASE_SECONDS
    keepalive_time_seconds: float = DEFAULT_KEEPALIVE_TIME_SECONDS
    keepalive_timeout_seconds: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = ""
    """Where the metrics endpoint binds; empty: --host. It has no token, so a server open to the
    network (--host 0.0.0.0) can keep it on a trusted interface (127.0.0.1, say)."""
    log_level: str = DEFAULT_LOG_LEVEL
    # Exactly-once calls (docs/robust.md): how long and how many request IDs are remembered.
    request_id_window_seconds: float = DEFAULT_REQUEST_ID_WINDOW_SECONDS
    max_request_ids: int = DEFAULT_MAX_REQUEST_IDS
    max_request_id_bytes: int = DEFAULT_MAX_REQUEST_ID_BYTES
    # Co-located clients (docs/security.md): map shared memory regions clients on this host register.
    allow_shm: bool = False
    # A CUDA server's staging of copies to and from the host (docs/ops.md): page-locked memory kept.
    pinned_cache_bytes: int = DEFAULT_PINNED_CACHE_BYTES
    # Freed blocks of host memory kept for the next tensor of their size (docs/ops.md), up to this many bytes.
    host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES
    # How long freed host memory stays idle before it is given back: a kept block, and (idle this long,
    # no call started; under torchrun on every rank) what the C allocator holds freed.
    host_cache_idle_seconds: float = DEFAULT_HOST_CACHE_IDLE_SECONDS
    # A CUDA server page-locks its clients' shared memory regions in place, up to this many bytes.
    max_locked_bytes: int = DEFAULT_MAX_LOCKED_BYTES
    # The cluster under torchrun (docs/cluster.md).
    cluster_timeout_seconds: float = DEFAULT_CLUSTER_TIMEOUT_SECONDS

    def check(self) -> None:
        """Refuse a setting no server can run with, naming the flag and what it takes.

        Before this, negative, zero, infinite or NaN values started a server that failed later:
        --chunk-bytes 0 made every fetch INTERNAL and -1 answered fetches with nothing, a negative
        --max-message-bytes refused every call, --snapshot-every inf ended the snapshot thread with
        a traceback (no snapshot until shutdown), a negative cap meant none at all (found by review).
        The request ID settings were refused later, by the store, in words that named no flag, and
        under torchrun by rank 0 alone, after the cluster had met (found by review).

        Raises:
            ValueError: the first setting out of range.
        """
        for name, low in _WHOLE_AT_LEAST.items():
            value = getattr(self, name)
            if not low <= value <= _INT32_MAX:
                raise ValueError(f"{_flag_of(name)} must be a whole number from {low} to {_INT32_MAX}; got {value}")
        room = self.max_message_bytes - CHUNK_HEADER_ROOM
        if self.chunk_bytes > room:
            # Every fetch of a tensor larger than the message cap failed RESOURCE_EXHAUSTED ("Sent message
            # larger than max"), which no client could fix: --max-message-bytes 1 MiB alone did it, with
            # the default 4 MiB chunks (found by review).
            fix = (
                f"give --chunk-bytes {room} or less" if room > 0
                else f"raise --max-message-bytes above {CHUNK_HEADER_ROOM}"
            )
            raise ValueError(
                f"--chunk-bytes ({self.chunk_bytes}) leaves no room in --max-message-bytes ({self.max_message_bytes}) "
                f"for a chunk's name and shape ({CHUNK_HEADER_ROOM} bytes): every tensor the server sends in "
                f"chunks would be refused; {fix}"
            )
        # Ports here, with the other settings: create_runtime refused them after the state directory
        # was made and its snapshot restored, and under torchrun on rank 0 alone, after the ranks met
        # (found by review).
        if not 0 <= self.port <= 65535:  # grpc bound -5 as 65531
            raise ValueError(f"the port must be 0 to 65535 (0 picks a free one), not {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"the metrics port must be -1 (off) or 0 to 65535 (0 picks a free one), not {self.metrics_port}")
        for name in _CAPS:
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag_of(name)} must be 0 or more; got {getattr(self, name)}")
        for name, (positive, high) in _SECONDS.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0) and value <= high):
                least = "more than 0" if positive else "0 or more"
                raise ValueError(f"{_flag_of(name)} must be a number of seconds, {least}, at most {high:g}; got {value}")
        if self.token and not sendable_token(self.token):  # never the token itself: it would reach the log
            raise ValueError(
                f"--token ({ENV_PREFIX}TOKEN) has surrounding spaces or a character other than printable ASCII: no "
                "client could send it, so every call would be refused; is it the whole token and only it?"
            )
        if self.log_level.upper() not in (*LOG_LEVELS, "WARN", "FATAL"):
            # logging's "Unknown level: 'VERBOSE'" named neither the flag nor a level it takes (found by review)
            raise ValueError(f"--log-level must be {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}; got {self.log_level!r}")
        if self.snapshot_every and not self.state_dir:
            raise ValueError("--snapshot-every needs --state-dir: without it no snapshot is ever written")
        if self.metrics_host and self.metrics_port < 0:
            # It served no metrics without a word: the operator who chose where they bind expects them (found by review)
            raise ValueError("--metrics-host needs --metrics-port: without it no metrics endpoint is served")
        if self.session_lease_seconds > self.max_session_lease_seconds:
            raise ValueError(
                f"--session-lease-seconds ({self.session_lease_seconds:g}) is longer than --max-session-lease-seconds "
                f"({self.max_session_lease_seconds:g}): every session asking for the default would be refused"
            )

    def limits(self) -> Limits:
        """The registry's caps: handles, sessions and bytes per device."""
        return Limits(max_handles=self.max_handles, max_device_bytes=self.max_device_bytes, max_sessions=self.max_sessions)

    def __repr__(self) -> str:
        # The token is a secret: never let it reach a log line through the config's repr.
        shown = {f.name: ("***" if f.name == "token" and self.token else getattr(self, f.name)) for f in fields(self)}
        return "ServerConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "ServerConfig":
        """Defaults, then WEIGHTAVG_* variables, then explicit overrides (None means not given)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                kind = type(getattr(cls, f.name))
                parse = value_parser(f.name)
                try:
                    values[f.name] = parse(raw)
                except ValueError as exc:
                    # A switch or a size says what it takes: "is not a valid bool" named no value that is
                    # (found by review).
                    what = f"is not a valid {kind.__name__}" if parse is kind else str(exc)
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} {what.removeprefix(repr(raw) + ' ')}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


BYTE_SIZES = frozenset(f.name for f in fields(ServerConfig) if f.name.endswith("_bytes"))
"""Settings measured in bytes (every --*-bytes flag, every WEIGHTAVG_*_BYTES variable): they take
units (parse_bytes). The name says it, so a new size setting takes them without another list."""


def value_parser(name: str) -> Callable[[str], object]:
    """How the WEIGHTAVG_* variable of setting `name` is read: a size with its units, a switch, or
    the type of its default (int, float, str). `weightavg serve`'s flags take the same forms."""
    if name in BYTE_SIZES:
        return parse_bytes
    kind: type = type(getattr(ServerConfig, name))
    return _flag if kind is bool else kind
