"""`weightavg serve`: flags (each also a WEIGHTAVG_* variable), logging, signals and the serve loop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import torch

from . import __version__
from .app import create_server, set_serving
from .config import ENV_PREFIX, ServerConfig
from .convert import resolve_server_device
from .registry import Registry
from .stats import RpcStats

log = logging.getLogger("weightavg.server")


# (flag, config field, type, help); each option's help gains its WEIGHTAVG_* variable and default.
OPTIONS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "address to bind; 0.0.0.0 for every interface"),
    ("--port", "port", int, "gRPC port to bind; 0 picks a free one (printed on start)"),
    ("--device", "device", str, "where objects live: auto (CUDA when available, else cpu), cpu, cuda or cuda:N"),
    ("--max-workers", "max_workers", int,
     "threads serving calls; 4x this many calls may be in flight before new ones get RESOURCE_EXHAUSTED"),
    ("--max-message-bytes", "max_message_bytes", int,
     "largest single gRPC message in either direction; tensors stream in --chunk-bytes pieces below it"),
    ("--chunk-bytes", "chunk_bytes", int, "size of the pieces the server streams tensors in"),
    ("--max-upload-bytes", "max_upload_bytes", int, "most tensor bytes one request may upload"),
    ("--max-spec-depth", "max_spec_depth", int, "deepest layer spec accepted"),
    ("--grace-seconds", "grace_seconds", float,
     "on SIGTERM/SIGINT: report NOT_SERVING, refuse new calls, let in-flight calls run this long"),
    ("--keepalive-time-seconds", "keepalive_time_seconds", float,
     "ping a client after this long without activity, to notice peers that vanished"),
    ("--keepalive-timeout-seconds", "keepalive_timeout_seconds", float,
     "close a connection whose keepalive ping is unanswered this long"),
    ("--metrics-port", "metrics_port", int,
     "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics on --host; -1 turns it off, 0 picks a free port"),
    ("--log-level", "log_level", str, "DEBUG (adds one line per call), INFO (one line per failed call), WARNING or ERROR"),
]


def build_parser() -> argparse.ArgumentParser:
    """The serve command's options; defaults come from WEIGHTAVG_* variables, then built-in values."""
    defaults = ServerConfig()
    p = argparse.ArgumentParser(
        prog="weightavg serve",
        description="Serve the weightavg gRPC API (with grpc.health.v1 and server reflection). Every option "
        f"can also be set with the environment variable shown, e.g. {ENV_PREFIX}PORT=50051; a flag wins "
        "over the variable, the variable over the default.",
    )
    for flag, name, kind, text in OPTIONS:
        p.add_argument(
            flag, dest=name, type=kind, metavar=name.upper(),
            help=f"{text} [env {ENV_PREFIX}{name.upper()}; default {getattr(defaults, name)}]",
        )
    p.add_argument("--version", action="version", version=f"weightavg {__version__}")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Merge flags over environment variables over defaults."""
    return ServerConfig.from_env(**{name: getattr(args, name) for _, name, _, _ in OPTIONS})


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain: NOT_SERVING, refuse new calls, let in-flight ones finish."""
    registry, stats = Registry(), RpcStats()
    server, port, health_servicer = create_server(config, registry, stats)
    device = resolve_server_device(config.device)
    torch.zeros(1, device=device)  # the device must really work before health says SERVING
    metrics = None
    if config.metrics_port >= 0:
        from .metrics import start_metrics_server  # prometheus-client is only needed with metrics on

        try:
            metrics = start_metrics_server(config.host, config.metrics_port, stats, registry, device)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc}") from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    set_serving(health_servicer, True)
    print(f"weightavg serving on {config.host}:{port}", flush=True)
    if metrics is not None:
        print(f"weightavg metrics on http://{config.host}:{metrics.port}/metrics", flush=True)
    stop.wait()
    log.info("stopping: draining for up to %.1f s", config.grace_seconds)
    set_serving(health_servicer, False)
    server.stop(config.grace_seconds).wait()
    if metrics is not None:
        metrics.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `weightavg serve` and `python -m weightavg_server`."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        logging.basicConfig(
            level=config.log_level.upper(), stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
    except ValueError as exc:  # a WEIGHTAVG_* variable that is not a number, an unknown log level
        sys.exit(f"weightavg serve: {exc}")
    try:
        serve(config)
    except OSError as exc:  # a port in use or an address not on this machine: say so without a traceback
        sys.exit(f"weightavg serve: {exc}")
