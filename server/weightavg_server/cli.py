"""`weightavg serve`: flags (each also a WEIGHTAVG_* variable), logging, signals and the serve loop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__
from .app import create_runtime
from .config import ENV_PREFIX, ServerConfig
from .snapshot import SnapshotError

log = logging.getLogger("weightavg.server")


def build_parser() -> argparse.ArgumentParser:
    """The serve command's options; defaults come from WEIGHTAVG_* variables, then built-in values."""
    defaults = ServerConfig()
    p = argparse.ArgumentParser(
        prog="weightavg serve",
        description="Serve the weightavg gRPC API. Every option can also be set with the environment "
        f"variable {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}PORT=50051); a flag wins over the variable.",
    )
    p.add_argument("--host", help=f"address to bind (default {defaults.host}; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help=f"port to bind, 0 for a free one (default {defaults.port})")
    p.add_argument("--device", help="where objects live: auto (CUDA when available, else cpu), cpu, cuda, cuda:N "
                   f"(default {defaults.device})")
    p.add_argument("--max-workers", type=int, help=f"threads serving calls (default {defaults.max_workers})")
    p.add_argument("--max-message-bytes", type=int,
                   help=f"largest single gRPC message, both directions (default {defaults.max_message_bytes})")
    p.add_argument("--chunk-bytes", type=int, help=f"tensor stream chunk size (default {defaults.chunk_bytes})")
    p.add_argument("--max-upload-bytes", type=int,
                   help=f"most tensor bytes one request may upload (default {defaults.max_upload_bytes})")
    p.add_argument("--max-spec-depth", type=int, help=f"deepest layer spec (default {defaults.max_spec_depth})")
    p.add_argument("--grace-seconds", type=float,
                   help=f"on SIGTERM/SIGINT, how long in-flight calls may finish (default {defaults.grace_seconds})")
    p.add_argument("--max-device-bytes", type=int,
                   help="most tensor bytes held on any one device; calls that would exceed it get "
                   "RESOURCE_EXHAUSTED before allocating (default 0: the device's memory size)")
    p.add_argument("--max-handles", type=int,
                   help=f"most live handles; 0 for no cap (default {defaults.max_handles})")
    p.add_argument("--token", help=f"bearer token every call must carry (prefer {ENV_PREFIX}TOKEN: flags show in ps); "
                   "health checks stay open")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS instead of plaintext (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--state-dir", help="directory for snapshots: restored on start (refusing torn or modified ones), "
                   "written on SIGTERM/SIGINT and by `weightavg snapshot`")
    p.add_argument("--session-lease-seconds", type=float,
                   help=f"default session lease (default {defaults.session_lease_seconds})")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--version", action="version", version=f"weightavg {__version__}")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Merge flags over environment variables over defaults."""
    return ServerConfig.from_env(
        host=args.host, port=args.port, device=args.device, max_workers=args.max_workers,
        max_message_bytes=args.max_message_bytes, chunk_bytes=args.chunk_bytes,
        max_upload_bytes=args.max_upload_bytes, max_spec_depth=args.max_spec_depth,
        grace_seconds=args.grace_seconds,
        max_device_bytes=args.max_device_bytes, max_handles=args.max_handles,
        token=args.token, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, state_dir=args.state_dir, session_lease_seconds=args.session_lease_seconds,
    )


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain: NOT_SERVING, refuse new calls, let in-flight ones
    finish, and with a state directory write a snapshot of every live handle."""
    runtime = create_runtime(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    runtime.start()
    print(f"weightavg serving on {config.host}:{runtime.port}", flush=True)
    stop.wait()
    log.info("stopping: draining for up to %.1f s", config.grace_seconds)
    try:
        runtime.stop(config.grace_seconds)
    except SnapshotError as exc:
        log.error("shutdown snapshot failed, live handles are lost: %s", exc)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `weightavg serve` and `python -m weightavg_server`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        serve(config_from_args(args))
    except SnapshotError as exc:
        # Refuse to start: serving an empty or partial state over a damaged snapshot would let the
        # next shutdown overwrite the only copy of the weights.
        log.error("refusing to start: %s", exc)
        raise SystemExit(2) from None
    except (OSError, ValueError) as exc:
        print(f"weightavg: cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
