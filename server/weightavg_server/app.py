"""Building the gRPC server: servicer, health, reflection, message limits, and the port it bound."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

from .config import ServerConfig
from .convert import resolve_server_device
from .observe import ObservingInterceptor
from .registry import Registry
from .servicer import WeightAveragingServicer
from .stats import RpcStats

log = logging.getLogger("weightavg.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel options for the server, each with the reason it is set."""
    return [
        # Unary requests (specs, names) are small, tensors stream in chunks far below this; the cap
        # turns a runaway message into RESOURCE_EXHAUSTED instead of an allocation.
        ("grpc.max_receive_message_length", config.max_message_bytes),
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
    or by the caller; NOT_SERVING while draining). Every call, health and reflection included, is
    recorded in `stats` (pass one to read it from outside, e.g. for the metrics endpoint).
    """
    device = resolve_server_device(config.device)
    stats = stats if stats is not None else RpcStats()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="weightavg-rpc"),
        options=server_options(config),
        # Beyond this many calls in flight, new ones get RESOURCE_EXHAUSTED rather than queueing forever.
        maximum_concurrent_rpcs=config.max_workers * 4,
        # One place times, counts and logs every call (per-RPC statistics, metrics, the RPC log).
        interceptors=[ObservingInterceptor(stats)],
    )
    pb_grpc.add_WeightAveragingServiceServicer_to_server(
        WeightAveragingServicer(config, registry if registry is not None else Registry(), device, stats), server
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as exc:  # grpcio raises RuntimeError when the port is taken
        raise OSError(f"could not bind {config.host}:{config.port} (in use?)") from exc
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    log.info("weightavg server on %s:%d, device %s", config.host, port, device)
    return server, port, health_servicer


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    """Report SERVING or NOT_SERVING for the whole server and for the weightavg service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)
