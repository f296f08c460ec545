"""Building the gRPC server: servicer, health, reflection, message limits, and the port it bound."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightavg.v1 import weightavg_pb2 as pb

from ..store import snapshot
from .openmp import TeamReturningExecutor, release_team, returning_team
from .config import LOOPBACK_HOSTS, ServerConfig, bare_host, host_port
from ..domain import devices, hostcache, lerp, optimizers, pinned, selection, weighted_sum
from ..domain.devices import server_device
from ..domain.errors import InvalidArgument, WeightavgError
from ..service import Service, Settings
from ..cluster import HOUSEKEEPING, ClusterService, Fabric
from ..cluster import restore_dir as cluster_restore_dir
from ..transport.decoding import DecodeGuard
from ..transport.interceptors import Handler, InterceptorChain, SessionInterceptor, SingleRequests, same_kind
from ..transport.shares import TenantShares, kept_for_unshared, open_streams, unshared
from ..transport.tenancy import TenantInterceptor, Tokens
from .tokens import TokensFileError, token_table
from ..transport.observe import ObservingInterceptor
from ..store.registry import Registry
from ..transport.servicer import SERVICE_NAME, WeightAveragingServicer, add_to_server
from ..transport.stats import RpcStats

log = logging.getLogger("weightavg.server")

def receive_ceiling(max_message_bytes: int) -> int:
    """grpc's receive limit: twice the cap (a misjudged chunk size still fails cleanly), within int32."""
    return min(2 * max_message_bytes, 2**31 - 1)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel options for the server, each with the reason it is set."""
    return [
        # Unary requests (specs, names) are small, tensors stream in chunks far below the cap. The
        # cap itself is enforced by DecodeGuard, which fails the whole call; grpc's own limit is a
        # ceiling above it (grpc ends a client stream quietly at an oversized message), so a runaway
        # message still costs at most twice the cap before RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", receive_ceiling(config.max_message_bytes)),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Two servers must never share a port by accident (tests bind port 0 side by side).
        ("grpc.so_reuseport", 0),
        # Let clients keep idle channels alive with pings every 10 s without being cut off.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Ping idle clients so a vanished peer (crashed trainer, dropped NAT mapping) is noticed and
        # its streams released, instead of holding a worker until the OS gives up on the socket.
        ("grpc.keepalive_time_ms", round(config.keepalive_time_seconds * 1000)),
        # A ping unanswered for this long closes the connection.
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout_seconds * 1000)),
    ]


def create_server(
    config: ServerConfig, registry: Registry | None = None, stats: RpcStats | None = None
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build (but do not start) a server bound to config.host:config.port; port 0 picks a free one.

    Returns the server, the port it bound and its health servicer (SERVING once started by `serve`
    or by the caller; NOT_SERVING while draining). Expired sessions are freed on the next call;
    `create_runtime` adds a reaper thread that frees them on an idle server too. Every call,
    health and reflection included, is recorded in `stats` (pass one to read it from outside).
    """
    runtime = create_runtime(config, registry, stats)
    return runtime.server, runtime.port, runtime.health


@dataclass
class Runtime:
    """A built server with what lives beside it: the registry and the session reaper.

    `start()` serves; `stop(grace)` drains in-flight calls, stops the reaper and, with a state
    directory configured, writes a snapshot of every live handle.
    """

    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: Registry
    config: ServerConfig
    stats: RpcStats
    device: torch.device
    service: Service
    tokens: Tokens = field(default_factory=lambda: Tokens(token_table("", "")))
    cluster: ClusterService | None = None
    """Under torchrun with several ranks: rank 0's service, which also reaches the other ranks."""
    reaper: Periodic = field(init=False)
    snapshotter: Periodic | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.reaper = reaper(self.registry, self.stats, self.config.host_cache_idle_seconds)
        if self.config.state_dir and self.config.snapshot_every > 0:
            self.snapshotter = snapshotter(self._save_if_changed, self.config.snapshot_every)

    def _save(self) -> snapshot.SnapshotResult:
        """One snapshot while serving: of every rank under torchrun, else of this server."""
        if self.cluster is not None:
            return self.cluster.save_all()
        return snapshot.save(self.registry, self.config.state_dir)

    def _save_if_changed(self) -> None:
        """A periodic snapshot: written unless this server changed nothing since the newest complete
        one (a Snapshot call's, the last periodic one's, or the one it restored at start), which
        holds the same state; a cluster's is always written (its other ranks count their own)."""
        if self.cluster is None and not self.registry.changes.unsaved():
            log.debug("periodic snapshot skipped: nothing changed since the last one")
            return
        self._save()

    def reload_tokens(self) -> bool:
        """Reread the tokens file (SIGHUP): the new table replaces the old whole, so a removed token
        is refused from the next call on, and quotas change; the objects and sessions of removed
        tenants stay (an admin may purge them), and their call counters go (docs/ops.md, "Metrics").
        A file that does not load is logged and changes nothing. True when reloaded."""
        if not self.config.tokens:
            log.warning("SIGHUP: no --tokens file to reload")
            return False
        try:
            table = token_table(self.config.tokens, self.config.token)
        except TokensFileError as exc:
            log.error("tokens file not reloaded, the tokens in force stay: %s", exc)
            return False
        # The counters first: a call of a removed tenant that ends between the two is not counted.
        self.stats.keep_tenants(table.tenants)
        self.tokens.replace(table)
        self.registry.set_quotas(table.quotas)
        if self.cluster is not None:  # the other ranks hold objects of the same tenants
            try:
                self.cluster.set_quotas(table.quotas)
            except WeightavgError as exc:  # a broken cluster: its restart takes the quotas from rank 0 again
                log.error("quotas not sent to the other ranks: %s", exc)
        log.info("tokens reloaded from %s: %d token(s), %d quota(s)", self.config.tokens,
                 len(table.callers), len(table.quotas))
        return True

    def start(self) -> None:
        if self.cluster is not None:
            self.cluster.on_broken = lambda reason: set_serving(self.health, False)
            self.cluster.start()
        self.server.start()
        self.reaper.start()
        if self.snapshotter is not None:
            self.snapshotter.start()
        set_serving(self.health, True)

    def stop(self, grace: float | None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within grace, then snapshot."""
        set_serving(self.health, False)
        self.server.stop(grace).wait()
        self.reaper.stop()
        if self.snapshotter is not None:  # before the shutdown snapshot, which it must not race
            self.snapshotter.stop()
        if self.cluster is not None:  # every rank snapshots at once, or none (a broken cluster) does
            self.cluster.shutdown(save=bool(self.config.state_dir))
        elif self.config.state_dir:
            result = snapshot.save(self.registry, self.config.state_dir, copy=False)
            log.info("saved %d handle(s) to %s", result.handles, result.directory)


class Periodic:
    """A daemon thread that runs `work` every `interval` seconds until stopped. A run that fails is
    logged and the next one goes on: the thread must outlive any one bad run."""

    def __init__(self, name: str, interval: float, work: Callable[[], object]) -> None:
        self._name = name
        self._interval = interval
        self._work = work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"weightavg-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                returning_team(self._work)  # a snapshot runs torch; the thread then sleeps a while
            except Exception:  # noqa: BLE001 - see the class docstring
                log.exception("%s failed", self._name)


REAP_INTERVAL = 1.0
"""Seconds between sweeps that end expired sessions, freeing their handles."""


class TeamReturningStreams:
    """The innermost layer of the interceptor chain: a streamed reply gives back its thread's OpenMP
    team (`release_team`) before each message goes out. The executor gives it back only when the
    call ends, and a reply streams at its reader's pace: three stalled readers of EvaluateModel kept
    three teams, idle, for as long as they stalled (tests/test_openmp.py; found by review). A thread
    without a team pays one call into libgomp per message; a reply that runs a parallel region
    between messages starts a team again (tens of microseconds)."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        behaviour = handler.unary_stream or handler.stream_stream
        if not handler.response_streaming or behaviour is None:
            return handler

        def returning(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            for response in behaviour(request, context):
                release_team()
                yield response

        return same_kind(handler, returning)


def idle_release(
    stats: RpcStats, idle_seconds: float = hostcache.IDLE_SECONDS, clock: Callable[[], float] | None = None,
    release: Callable[[], bool] | None = None,
) -> hostcache.IdleRelease:
    """The reaper's `hostcache.IdleRelease`, idle while no call starts and none runs (by `stats`);
    `clock` and `release` replace time.monotonic and malloc_trim (tests)."""
    return hostcache.IdleRelease(
        lambda: stats.calls, idle_seconds, clock or time.monotonic, release or hostcache.release_freed_memory,
        running=lambda: stats.running,
    )


def reaper(registry: Registry, stats: RpcStats, idle_seconds: float = hostcache.IDLE_SECONDS) -> Periodic:
    """Ends expired sessions once a second, freeing their handles, and gives back the host memory
    kept idle too long (`hostcache`), even on an idle server; once the server has been idle as long
    (`idle_seconds`, --host-cache-idle-seconds), the memory the C allocator holds freed too
    (`hostcache.IdleRelease`). Under torchrun the other ranks run `FollowerReaper` instead."""
    idle = idle_release(stats, idle_seconds)

    def reap() -> None:
        registry.expire()
        idle.tick(dropped=hostcache.cache().trim())

    return Periodic("reaper", REAP_INTERVAL, reap)


class FollowerReaper:
    """The reaper of a rank other than 0, which `cluster.follow` calls after each command: at most once
    every REAP_INTERVAL, it gives back the host cache's blocks idle too long and, once the rank has had
    no command for `idle_seconds`, the memory the C allocator holds freed (`hostcache.IdleRelease`), as
    rank 0's `reaper` does. Those ranks had no reaper: one that had held large objects kept their
    memory after they were freed, for good, idle blocks in its cache and freed memory in glibc's
    arenas alike (found by review).

    It runs on the rank's one command thread, between commands: never beside a command or a
    collective of this rank, so a trim cannot race one (a command that arrives meanwhile waits the
    trim's milliseconds). An idle rank still hears from rank 0, which pings it every few seconds (the
    reaper's clock: it gives memory back within one ping of the idle time) and writes periodic
    snapshots: those commands (`cluster.HOUSEKEEPING`) are not use, as rank 0's own reaper and
    snapshots count no call, or the rank would never be idle."""

    def __init__(
        self, idle_seconds: float = hostcache.IDLE_SECONDS, clock: Callable[[], float] = time.monotonic,
        release: Callable[[], bool] = hostcache.release_freed_memory, cache: hostcache.HostCache | None = None,
    ) -> None:
        self._commands = 0
        self._clock = clock
        self._cache = cache if cache is not None else hostcache.cache()
        self._idle = hostcache.IdleRelease(lambda: self._commands, idle_seconds, clock, release)
        self._due = clock()

    def __call__(self, op: str) -> bool:
        """After a command `op` (its name): whether freed memory was given back to the system now. A
        failure is logged, never raised: the rank must go on following rank 0."""
        if op not in HOUSEKEEPING:
            self._commands += 1
        now = self._clock()
        if now < self._due:
            return False
        self._due = now + REAP_INTERVAL
        try:
            return self._idle.tick(dropped=self._cache.trim())
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("reaper failed")
            return False


def snapshotter(save: Callable[[], object], interval: float) -> Periodic:
    """Writes a snapshot every `interval` seconds (--snapshot-every), so a crash or a restarted
    cluster loses at most that much; a snapshot that cannot be written (a broken cluster, a full
    disk) leaves the last complete one."""

    def save_or_warn() -> None:
        try:
            save()
        except WeightavgError as exc:
            log.warning("periodic snapshot not written: %s", exc)

    return Periodic("snapshots", interval, save_or_warn)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca for mTLS), or None for plaintext."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))
    client_ca = _read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    # With a client CA, a client must present a certificate that CA signed (mutual TLS).
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def settings(config: ServerConfig, device: torch.device) -> Settings:
    """What the service needs of the configuration."""
    return Settings(
        device=device, max_spec_depth=config.max_spec_depth, session_lease_seconds=config.session_lease_seconds,
        max_session_lease_seconds=config.max_session_lease_seconds, state_dir=config.state_dir or "",
        allow_shm=config.allow_shm, max_spec_layers=config.max_spec_layers,
    )


def check_device(name: str) -> str:
    """`name` (--device), once this machine has that device; no CUDA context is made (devices.check).
    `weightavg serve` checks it before the state directory and the ranks; create_runtime, for the
    demo and in-process servers, again.

    Raises:
        InvalidArgument: naming --device and what to give instead (its message started with torch's
            or the store's words and named no flag: 'device 'cuda' requested but this server has no
            CUDA device'; found by review).
    """
    if name == "auto":
        return name
    try:
        devices.check(name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--device {name}: {exc}, or auto (CUDA when there is one, else the CPU)") from None
    return name


def configure_host_memory(config: ServerConfig) -> None:
    """The process's bounds on host memory kept beside the caps: the pinned staging cache, the locked
    shared memory regions and the host cache (its bytes and idle time). Every rank applies its own
    (`create_runtime`, and `cli.follow_rank` for the other ranks): the other ranks kept the default
    1 GiB host cache whatever --host-cache-bytes said, 0 included (found by review)."""
    pinned.set_cache_bytes(config.pinned_cache_bytes)
    pinned.set_locked_bytes(config.max_locked_bytes)
    hostcache.cache().configure(config.host_cache_bytes, config.host_cache_idle_seconds)


def create_runtime(
    config: ServerConfig, registry: Registry | None = None, stats: RpcStats | None = None,
    fabric: Fabric | None = None,
) -> Runtime:
    """Build (but do not start) a server: its port bound, then the snapshot in config.state_dir restored
    if there is one.

    Raises:
        snapshot.SnapshotError: the snapshot on disk is torn or modified, or the state directory is
            not the server's to write (not a directory, not writable, or writable by other users);
            the server must not start.
        OSError, ValueError: the address cannot be bound, or TLS files are missing or incomplete.
    """
    config.check()
    # The TLS files are read before the restore: a missing key was refused only after every handle
    # of the snapshot had been loaded, minutes for a large one (found by review).
    credentials = server_credentials(config)
    device = fabric.device if fabric is not None else server_device(check_device(config.device))
    tokens = Tokens(token_table(config.tokens, config.token))  # a bad tokens file stops the start here
    optimizers.prepare()
    configure_host_memory(config)
    registry = registry if registry is not None else Registry()  # an empty Registry is falsy
    registry.set_limits(config.limits())
    registry.set_quotas(tokens.table.quotas)
    registry.requests.configure(config.request_id_window_seconds, config.max_request_ids, config.max_request_id_bytes)
    if config.state_dir:
        snapshot.prepare_directory(config.state_dir)  # 0700, or refused: before any call can change state
    stats = stats if stats is not None else RpcStats()
    stats.keep_tenants(tokens.table.tenants)
    # One place times, counts and logs every call (per-RPC statistics, metrics, the RPC log); it is
    # first so that refused calls are counted too.
    # Next: nothing runs for an unauthenticated or unauthorized call; every call after it runs as its
    # token's tenant (open servers: the default tenant's admin), and calls that change something are
    # audited. On a server with tokens, no tenant holds more than half the workers, and all tenants
    # together (with health's Watch streams) never the quarter kept for health Checks. Then a single
    # request message is read (`SingleRequests`), so that a call waiting for it is counted. Then the
    # caller's session. Then, requests that do not parse get INVALID_ARGUMENT rather than grpc's INTERNAL. Last,
    # a streamed reply gives back its OpenMP team before each message (`TeamReturningStreams`). They
    # run as one interceptor: one pass through gRPC's pipeline per call.
    # A tokens file names tenants; without one there is one tenant, and no share to keep.
    shares = [TenantShares(tokens, config.max_workers)] if config.tokens else []
    tenancy = TenantInterceptor(tokens, stats)
    interceptors: list[grpc.ServerInterceptor] = [InterceptorChain(
        ObservingInterceptor(stats), tenancy, *shares,
        # A call waiting for its single request message holds a worker: read inside the shares (with
        # tenants), and calls no share counts (health's Check, open without a token; keep-alives) at
        # most a quarter of the workers at once; health's Watch streams, for as long as they are open,
        # an eighth, a bound of their own so that they never take a Check's place. Only where a token
        # is required: on an open server any caller may hold every worker anyway (a Ping would do),
        # and its health Check stays the bare call the bench's small-call row measures against.
        *([SingleRequests(
            unshared, kept_for_unshared(config.max_workers), open_streams(config.max_workers), every=bool(shares),
            total=shares[0] if shares else None,
        )] if config.token or config.tokens else []),
        SessionInterceptor(registry, tenancy.caller_of),
        DecodeGuard(SERVICE_NAME, config.max_message_bytes), TeamReturningStreams(),
    )]
    server = grpc.server(
        # Its workers give back their OpenMP teams after each call (ops.openmp): idle ones kept slowed
        # every epoch run beside them.
        TeamReturningExecutor(max_workers=config.max_workers, thread_name_prefix="weightavg-rpc"),
        options=server_options(config),
        interceptors=interceptors,
        # Beyond this many calls in flight, new ones get RESOURCE_EXHAUSTED rather than queueing forever.
        maximum_concurrent_rpcs=config.max_workers * 4,
    )
    cluster = ClusterService(registry, settings(config, device), fabric) if fabric is not None else None
    service = cluster if cluster is not None else Service(registry, settings(config, device))
    servicer = WeightAveragingServicer(
        service, max_message_bytes=config.max_message_bytes, chunk_bytes=config.chunk_bytes,
        max_upload_bytes=config.max_upload_bytes, stats=stats,
    )
    add_to_server(servicer, server)
    # Blocking Watch streams (each on a worker; bounded by SingleRequests where a token is required, as
    # an open server bounds no caller): the non-blocking ones wait for a send under the servicer's
    # lock, which the end of another Watch takes on grpc's polling thread (a test of them hung once
    # in review, which that deadlock would explain).
    health_servicer = health.HealthServicer(experimental_non_blocking=False)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = host_port(config.host, config.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises RuntimeError when it cannot serve there, saying no more
        raise OSError(bind_failure(address, credentials is not None, bool(config.tls_client_ca))) from exc
    if port == 0:
        raise OSError(bind_failure(address, credentials is not None, bool(config.tls_client_ca)))
    # The restore comes once the port is bound, not before: a server started on a taken port loaded
    # its whole snapshot (minutes for a large one) only to fail. Nothing is served until `start`.
    if config.state_dir:
        # A cluster rank restores the generation every rank agreed on (cluster.agree_on_snapshot);
        # rank 0 learns where the restored handles live when it starts (ClusterService.start).
        source = cluster_restore_dir(config.state_dir) if fabric is not None else config.state_dir
        restored = snapshot.load(registry, source, device)
        if restored:
            log.info("restored %d handle(s) from %s", restored, config.state_dir)
    log.info(
        "weightavg server on %s, device %s, %s, %s, CPU averages on %s, CPU merges on %s, CPU TIES thresholds on %s",
        host_port(config.host, port),
        device,
        "TLS" + (" with client certificates" if config.tls_client_ca else "") if credentials else "plaintext",
        f"tokens from {config.tokens}" if config.tokens else "token required" if config.token else "no token",
        # each also runs its kernel's one check against torch now, not in a first call
        lerp.native_state(), weighted_sum.native_state(), selection.native_state(),
    )
    if not (config.tokens or config.token) and bare_host(config.host) not in LOOPBACK_HOSTS:
        log.warning(
            "serving on %s with no token: whoever reaches port %d can use and free every object; set "
            "WEIGHTAVG_TOKEN or --tokens (docs/security.md), or bind 127.0.0.1", config.host, port,
        )
    release_team()  # the kernels' checks and the restore ran torch here; this thread now only waits
    return Runtime(server, port, health_servicer, registry, config, stats, device, service, tokens, cluster)


def bind_failure(address: str, tls: bool, client_ca: bool = False) -> str:
    """Why the address could not be served, as far as grpc lets us know: it says only that it failed
    (a TLS key that is not PEM read "in use?"; a client CA that is not PEM blamed the certificate
    and key alone; found by review), so name every cause it may be."""
    causes = "the port is in use, or the host is not an address of this machine"
    if tls:
        causes += ", or --tls-cert/--tls-key are not a PEM certificate chain and its PEM private key"
    if client_ca:
        causes += ", or --tls-client-ca is not a PEM bundle of CA certificates"
    return f"could not bind {address}: {causes}"


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    """Report SERVING or NOT_SERVING for the whole server and for the weightavg service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)


@contextlib.contextmanager
def serving(address: str | None = None, device: str = "auto") -> Iterator[str]:
    """A server's address for the block: `address` when given, else an embedded server's, on a free
    loopback port, SERVING for the block and stopped after it (the examples' and scripts' way to run
    without a separate `weightavg serve`)."""
    if address:
        yield address
        return
    server, port, health = create_server(ServerConfig(host="127.0.0.1", port=0, device=device))
    server.start()
    set_serving(health, True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
