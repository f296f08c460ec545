"""`weightavg serve`: flags (each also a WEIGHTAVG_* variable), logging, signals and the serve loop."""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import logging.handlers
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable, Sequence

import torch

from .. import __version__
from .. import cluster
from ..domain import lerp, optimizers, selection, weighted_sum
from ..service import Service
from ..store import snapshot
from ..store.registry import Registry
from . import startup
from .app import FollowerReaper, check_device, configure_host_memory, create_runtime, settings
from .config import (
    BYTE_SIZE_FORMS, BYTE_SIZES, ENV_PREFIX, LOOPBACK_HOSTS, ServerConfig, bare_host, host_port, parse_bytes, value_parser,
)
from ..domain.errors import WeightavgError
from ..store.snapshot import SnapshotError

log = logging.getLogger("weightavg.server")


# (flag, config field, help); each option's help gains its WEIGHTAVG_* variable and default. A flag
# takes what its variable takes (config.value_parser): sizes with units, numbers, strings.
OPTIONS: list[tuple[str, str, str]] = [
    ("--host", "host", "address to bind; 0.0.0.0 for every interface"),
    ("--port", "port", "gRPC port to bind; 0 picks a free one (printed on start)"),
    ("--device", "device", "where objects live: auto (CUDA when available, else cpu), cpu, cuda or cuda:N"),
    ("--max-workers", "max_workers",
     "threads serving calls; 4x this many calls may be in flight before new ones get RESOURCE_EXHAUSTED"),
    ("--max-message-bytes", "max_message_bytes",
     "largest single gRPC message in either direction; tensors stream in --chunk-bytes pieces below it"),
    ("--chunk-bytes", "chunk_bytes", "size of the pieces the server streams tensors in"),
    ("--max-upload-bytes", "max_upload_bytes", "most tensor bytes one request may upload"),
    ("--max-spec-depth", "max_spec_depth", "deepest layer spec accepted"),
    ("--max-spec-layers", "max_spec_layers", "most layers one layer spec may hold, at any depth"),
    ("--grace-seconds", "grace_seconds",
     "on SIGTERM/SIGINT: report NOT_SERVING, refuse new calls, let in-flight calls run this long"),
    ("--keepalive-time-seconds", "keepalive_time_seconds",
     "ping a client after this long without activity, to notice peers that vanished"),
    ("--keepalive-timeout-seconds", "keepalive_timeout_seconds",
     "close a connection whose keepalive ping is unanswered this long"),
    ("--metrics-port", "metrics_port",
     "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics on --metrics-host; -1 turns it off, 0 picks a "
     "free port"),
    ("--metrics-host", "metrics_host",
     "address the metrics endpoint binds (it has no token: keep it on a trusted interface); empty: --host"),
    ("--max-device-bytes", "max_device_bytes",
     "most tensor bytes held on any one device; calls that would exceed it get RESOURCE_EXHAUSTED before "
     "allocating (0: the device's memory size)"),
    ("--max-handles", "max_handles", "most live handles; 0 for no cap"),
    ("--max-sessions", "max_sessions",
     "most sessions open at once (a tenant's own cap is its quota's max_sessions); 0 for no cap"),
    ("--token", "token",
     f"bearer token every call must carry (prefer the variable {ENV_PREFIX}TOKEN: flags show in ps); "
     "health checks stay open"),
    ("--tokens", "tokens",
     "TOML or JSON file mapping tokens to tenants, roles (admin, user, reader) and quotas (docs/security.md); "
     "reloaded on SIGHUP; --token, if also given, is the default tenant's admin token"),
    ("--audit-log", "audit_log",
     "append the audit trail (one JSON line per call that changes something) to this file instead of the log"),
    ("--tls-cert", "tls_cert", "PEM certificate chain: serve TLS instead of plaintext (with --tls-key)"),
    ("--tls-key", "tls_key", "PEM private key of --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", "PEM CA bundle: require client certificates signed by it (mutual TLS)"),
    ("--state-dir", "state_dir",
     "directory for snapshots: restored on start (torn or modified ones are refused), written on "
     "SIGTERM/SIGINT and by `weightavg snapshot`"),
    ("--snapshot-every", "snapshot_every",
     "with --state-dir: also write a snapshot every this many seconds (0: only on shutdown and on request)"),
    ("--session-lease-seconds", "session_lease_seconds", "lease of a session that asks for the default (0)"),
    ("--max-session-lease-seconds", "max_session_lease_seconds", "longest lease a session may ask for"),
    ("--request-id-window-seconds", "request_id_window_seconds",
     "remember each request ID's answer this long, so a retried call runs once; 0 remembers none"),
    ("--max-request-ids", "max_request_ids", "most request IDs remembered; the oldest go first"),
    ("--max-request-id-bytes", "max_request_id_bytes",
     "most bytes remembered answers may hold (an epoch's metrics can be tensors); the oldest go first"),
    ("--pinned-cache-bytes", "pinned_cache_bytes",
     "on a CUDA device: most page-locked host memory kept for staging copies between the GPU and the host "
     "(torch's caching host allocator); 0 stages them through pageable memory"),
    ("--host-cache-bytes", "host_cache_bytes",
     "most freed host memory kept for the next upload or copy of the same size, so it is not faulted in "
     "again (given back after --host-cache-idle-seconds idle); 0 keeps none"),
    ("--host-cache-idle-seconds", "host_cache_idle_seconds",
     "a kept block of freed host memory idle this long is given back; once the server has had no call this "
     "long (under torchrun, each rank no command), so is the memory the C allocator holds freed (malloc_trim)"),
    ("--max-locked-bytes", "max_locked_bytes",
     "on a CUDA device, with --allow-shm: most host memory of clients' shared memory regions page-locked in "
     "place, so copies to and from the GPU run as DMA; regions past it stay pageable (same results, staged); "
     "0 locks none"),
    ("--cluster-timeout-seconds", "cluster_timeout_seconds",
     "under torchrun: how long a rank waits on another before the cluster is declared broken (health "
     "NOT_SERVING, calls UNAVAILABLE); also the longest a call on objects of another rank may run, and how far "
     "apart the ranks' parts of a call on replicated objects may end"),
    ("--log-level", "log_level", "DEBUG (adds one line per call), INFO (one line per failed call), WARNING or ERROR"),
]

# (flag, config field, help): switches, off unless given (or WEIGHTAVG_<FIELD>=1).
SWITCHES: list[tuple[str, str, str]] = [
    ("--allow-shm", "allow_shm",
     "let clients on this host move tensor bytes through shared memory regions they register (docs/security.md)"),
]


def _byte_size(text: str) -> int:
    """argparse's type for the *-bytes flags: config.parse_bytes, its refusal as argparse's error
    (`argument --max-device-bytes: '1.5' is 1.5 bytes, not a whole number; give ...`, exit 2)."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The serve command's options; defaults come from WEIGHTAVG_* variables, then built-in values."""
    defaults = ServerConfig()
    p = argparse.ArgumentParser(
        prog="weightavg serve",
        description="Serve the weightavg gRPC API (with grpc.health.v1 and server reflection). Every option "
        f"can also be set with the environment variable shown, e.g. {ENV_PREFIX}PORT=50051; a flag wins "
        "over the variable, the variable over the default. Sizes (the *-bytes options): "
        f"{BYTE_SIZE_FORMS}.",
    )
    for flag, name, text in OPTIONS:
        p.add_argument(
            flag, dest=name, type=_byte_size if name in BYTE_SIZES else value_parser(name), metavar=name.upper(),
            help=f"{text} [env {ENV_PREFIX}{name.upper()}; default {getattr(defaults, name)}]",
        )
    for flag, name, text in SWITCHES:
        p.add_argument(flag, dest=name, action="store_true", default=None, help=f"{text} [env {ENV_PREFIX}{name.upper()}=1]")
    p.add_argument("--version", action="version", version=f"weightavg {__version__}")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Merge flags over environment variables over defaults."""
    names = [name for _, name, _ in OPTIONS + SWITCHES]
    return ServerConfig.from_env(**{name: getattr(args, name) for name in names})


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain: NOT_SERVING, refuse new calls, let in-flight ones
    finish, and with a state directory write a snapshot of every live handle.

    Under torchrun with several ranks, every rank joins the process group first; rank 0 serves,
    the others execute its commands (docs/cluster.md), each with its own state directory."""
    if config.state_dir:  # before the ranks meet: a directory the server cannot keep stops every rank alike
        snapshot.prepare_directory(config.state_dir)
    fabric = cluster.join(config.device, config.cluster_timeout_seconds)
    if fabric is not None and config.state_dir:
        config = dataclasses.replace(config, state_dir=os.path.join(config.state_dir, f"rank-{fabric.rank}"))
    if config.state_dir:  # one server per directory (a rank: its rank-N), held until this process exits
        snapshot.hold_directory(config.state_dir)
    if fabric is not None and config.state_dir:
        cluster.agree_on_snapshot(fabric, config.state_dir)  # every rank restores the same generation
    if fabric is not None and fabric.rank != 0:
        follow_rank(config, fabric)
        return
    signals = Signals()
    # From here a SIGHUP is kept for when the server serves: its default action ended the process
    # while it restored its snapshot, without a word (found by review). SIGTERM and SIGINT still end
    # a start at once, with nothing to drain and the snapshot on disk untouched.
    signals.install_reload()
    runtime = create_runtime(config, fabric=fabric)
    torch.zeros(1, device=runtime.device)  # the device must really work before health says SERVING
    metrics = None
    metrics_host = bare_host(config.metrics_host or config.host)  # the HTTP server binds [::1] as ::1
    if config.metrics_port >= 0:
        from .metrics import start_metrics_server  # prometheus-client is only needed with metrics on

        try:
            metrics = start_metrics_server(metrics_host, config.metrics_port, runtime.stats, runtime.service)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host_port(metrics_host, config.metrics_port)}: {exc}") from exc
        if metrics_host not in LOOPBACK_HOSTS:
            # As the warning of a gRPC port open with no token: the endpoint has none, and names every
            # tenant with what it holds (a server with tokens on 0.0.0.0 showed them silently; found by review).
            log.warning(
                "metrics on %s have no token: whoever reaches that port reads every tenant's name, calls and "
                "bytes; bind them to a trusted interface (--metrics-host 127.0.0.1)",
                host_port(metrics_host, metrics.port),
            )
    stop = threading.Event()
    signals.install()
    runtime.start()
    if fabric is not None:
        cluster.watch_agent(stop.set)  # torchrun's agent gone: drain and snapshot as on SIGTERM
    # Under torchrun the pid says where SIGHUP must go: torchrun takes SIGHUP as a stop and ends every
    # rank without a snapshot (docs/cluster.md).
    ranks = f" (rank 0 of {fabric.world_size}, pid {os.getpid()})" if fabric is not None else ""
    print(f"weightavg serving on {host_port(config.host, runtime.port)}{ranks}", flush=True)
    if metrics is not None:
        print(f"weightavg metrics on http://{host_port(metrics_host, metrics.port)}/metrics", flush=True)
    signals.serve_until_stopped(stop, runtime.reload_tokens)
    log.info("stopping: draining for up to %.1f s", config.grace_seconds)
    try:
        runtime.stop(config.grace_seconds)
    except SnapshotError as exc:
        log.error("shutdown snapshot failed, live handles are lost: %s", exc)
        raise SystemExit(1) from None
    finally:
        if metrics is not None:
            metrics.stop()


SIGNAL_POLL_SECONDS = 0.2
"""How often the main thread looks at the signals that arrived: the longest a SIGTERM waits to start
the drain, or a SIGHUP to reload the tokens file."""


class Signals:
    """SIGTERM and SIGINT (stop) and SIGHUP (reread --tokens) as they arrive, acted on by the main
    thread between waits.

    The handlers only set attributes. Python runs a handler on the main thread between any two of
    its bytecodes, inside another handler too: the handlers called `Event.set()` and reloaded the
    tokens, each taking a lock, and a signal arriving while one held it made the main thread wait
    for itself forever (a burst of SIGTERMs hung the server without its shutdown snapshot; found
    by review). Nothing here runs in a handler that takes a lock."""

    def __init__(self) -> None:
        self.stop = False
        self.reloads = 0

    def install_reload(self) -> None:
        """Record SIGHUP from now on; the tokens are reread once the server serves. SIGHUPs that came
        while torch loaded (startup.keep_sighup) count too."""
        signal.signal(signal.SIGHUP, self._on_reload)
        self.reloads += startup.take_sighups()  # after the handler: one arriving between lands in either count

    def install(self) -> None:
        """Record SIGTERM and SIGINT (a drain) and SIGHUP from now on."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        self.install_reload()

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop = True

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reloads += 1

    def serve_until_stopped(self, stop: threading.Event, reload: Callable[[], object]) -> None:
        """Wait for SIGTERM, SIGINT or `stop` (set by another thread), rereading the tokens file on
        SIGHUP (a file that does not load leaves the tokens in force). Then ignore these signals:
        the drain has begun, and a later one must neither run a handler during the shutdown
        snapshot nor, once Python restores the default handlers at exit, kill the process."""
        reloaded = 0
        while not self.stop and not stop.wait(SIGNAL_POLL_SECONDS):
            if self.reloads != reloaded:
                reloaded = self.reloads
                try:
                    reload()
                except Exception:  # noqa: BLE001 - a failed reload must not skip the drain and the snapshot
                    # A tokens file nested too deeply raised RecursionError here, out of serve(): the
                    # process ended with a traceback, without its shutdown snapshot (found by review).
                    log.exception("SIGHUP: the reload failed; the tokens in force stay")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


def follow_rank(config: ServerConfig, fabric: cluster.Fabric) -> None:
    """A rank other than 0: restore its snapshot, then execute rank 0's commands until told to stop."""
    # Rank 0 decides when the cluster stops (and snapshots it first); torchrun's SIGTERM reaches every
    # rank at once, so the others wait for rank 0's stop, or fail when it is gone.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # SIGHUP rereads rank 0's tokens; this rank has none, and ends on it as before (startup.keep_sighup
    # kept one only while torch loaded).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    registry = Registry()
    registry.set_limits(config.limits())
    configure_host_memory(config)  # this rank's own host cache and pinned memory, as rank 0's
    optimizers.prepare()
    # Each kernel's one check against torch runs now, as on rank 0, not in this rank's first average:
    # it allocates about 12 MB that no call reserved, and took 0.1 s of that call.
    log.info(
        "rank %d: CPU averages on %s, CPU merges on %s, CPU TIES thresholds on %s", fabric.rank,
        lerp.native_state(), weighted_sum.native_state(), selection.native_state(),
    )
    if config.state_dir:
        restored = snapshot.load(registry, cluster.restore_dir(config.state_dir), fabric.device)
        log.info("rank %d restored %d handle(s) from %s", fabric.rank, restored, config.state_dir)
    service = Service(registry, settings(config, fabric.device))
    # Without its agent, rank 0 (orphaned too, on one node) stops this rank after its snapshot; failing
    # that (rank 0 elsewhere or gone), it exits on its own.
    cluster.watch_agent(lambda: cluster.exit_after(fabric.timeout + 30.0))
    try:
        cluster.follow(service, fabric, FollowerReaper(config.host_cache_idle_seconds))
    except RuntimeError as exc:
        # A wait past the timeout says so with the flag (rank 0 silent: hung, or busy with its part of a command).
        silent = f"; {cluster.silent_past(fabric.timeout)}" if cluster.timed_out(str(exc)) else ""
        log.error("rank %d: lost rank 0 (%s)%s; exiting so that torchrun restarts the group", fabric.rank, exc, silent)
        raise SystemExit(1) from None
    finally:
        cluster.leave()


AUDIT_LOGGER = "weightavg.audit"
AUDIT_LOG_MODE = 0o600
"""Mode of an --audit-log file the server creates."""


def configure_logging(config: ServerConfig) -> None:
    """The server's log on stderr at --log-level, and the audit trail at INFO whatever --log-level
    says: quieting the log must not stop the record of who changed what (the audit logger followed
    --log-level, so a server run with WARNING audited nothing; found by review). With --audit-log
    the trail goes to that file instead of the log."""
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
    if config.audit_log:
        audit_to_file(config.audit_log)


class AuditFileHandler(logging.handlers.WatchedFileHandler):
    """The audit file, opened again at its path when it was moved or removed (logrotate renames it
    and expects the next line in a new file: FileHandler kept writing the renamed one, whose trail
    the last rotation deleted; found by review).

    A file it creates is the server's user's alone, like the snapshots: every line names a tenant,
    its handles and the peer's address (FileHandler made it 0644; found by review). An existing
    file keeps the mode its operator gave it.

    A line that cannot be written (a full disk, the file's directory gone) is one ERROR line in the
    server's log, not a traceback per line: logging printed 40 lines of "--- Logging error ---" on
    stderr for every changing call, and a rotation while the disk was full raised out of the audit
    into the call (found by review). The calls go on (the trail is not a gate: the product's
    choice); the first line written again logs how many could not be. After a failure the file is
    opened anew for the next line, so a line left half in the stream's buffer is not written later."""

    unwritten = 0
    """Lines that could not be written since the last one that was."""

    def _open(self) -> io.TextIOWrapper:
        os.close(os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, AUDIT_LOG_MODE))
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        before = self.unwritten
        try:
            super().emit(record)  # its write errors come to handleError; reopening the file's do not
        except Exception:  # noqa: BLE001 - an audit line must never fail the call it records
            self.handleError(record)
        if before and self.unwritten == before:
            log.warning("audit log %s: written again; %d line(s) before this one could not be", self.baseFilename, before)
            self.unwritten = 0

    def handleError(self, record: logging.LogRecord) -> None:
        """Count the line, say so once, and drop the stream (with whatever it holds unwritten)."""
        self.unwritten += 1
        why = sys.exc_info()[1]
        if self.stream is not None:
            stream, self.stream = self.stream, None  # FileHandler.emit opens it again for the next line
            try:
                stream.close()
            except (OSError, ValueError):  # its unwritten buffer fails the flush once more: dropped with it
                pass
        if self.unwritten == 1:
            reason = getattr(why, "strerror", None) or why
            log.error("audit log %s: cannot write an audit line (%s); the calls go on, and their audit lines are "
                      "lost until the file can be written (free room on its disk)", self.baseFilename, reason)


def audit_to_file(path: str) -> None:
    """Send the audit trail to `path` as bare JSON lines (appended; not in the server's log too).

    Raises:
        ValueError: the file cannot be opened for appending (the message names it and why).
    """
    try:
        handler = AuditFileHandler(path, encoding="utf-8")
    except OSError as exc:  # printed a traceback (found by review)
        raise ValueError(f"cannot open the audit log {path}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit = logging.getLogger(AUDIT_LOGGER)
    audit.addHandler(handler)
    audit.propagate = False


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as Go's runtime does at
    start); the new soft limit. Every connection and shared memory region takes descriptors, and
    the usual soft limit (1024) is low for a server; a hard limit only an administrator can raise."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # a sandbox that refuses: serve with the soft limit
            log.warning("could not raise the open files limit from %s to %s", soft, hard)
    return soft


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `weightavg serve` and `python -m weightavg_server`."""
    args = build_parser().parse_args(argv)
    raise_file_limit()
    try:
        config = config_from_args(args)
        config.check()  # before a torchrun cluster meets, so every rank refuses alike
        # And before the state directory is made and the ranks meet: under torchrun a device string that
        # was not one (`cuda:x`) served on the GPUs, and `gpu` on a machine without CUDA on the CPU.
        check_device(config.device)
        configure_logging(config)
    except (ValueError, WeightavgError) as exc:  # a WEIGHTAVG_* variable that is not a number, an unknown log level
        sys.exit(f"weightavg serve: {exc}")
    try:
        serve(config)
    except SnapshotError as exc:
        # Refuse to start: serving an empty or partial state over a damaged snapshot would let the
        # next shutdown overwrite the only copy of the weights.
        log.error("refusing to start: %s", exc)
        raise SystemExit(2) from None
    except (OSError, ValueError, WeightavgError) as exc:  # a port in use, bad TLS or tokens files, no such device
        sys.exit(f"weightavg serve: {exc}")
