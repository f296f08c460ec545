"""`weightavg serve`: flags (each also a WEIGHTAVG_* variable), logging, signals and the serve loop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__
from .app import create_server, set_serving
from .config import ENV_PREFIX, ServerConfig

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
    )


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain: NOT_SERVING, refuse new calls, let in-flight ones finish."""
    server, port, health_servicer = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    set_serving(health_servicer, True)
    print(f"weightavg serving on {config.host}:{port}", flush=True)
    stop.wait()
    log.info("stopping: draining for up to %.1f s", config.grace_seconds)
    set_serving(health_servicer, False)
    server.stop(config.grace_seconds).wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `weightavg serve` and `python -m weightavg_server`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    serve(config_from_args(args))
