"""The Prometheus endpoint: a collector that reads RpcStats and the Registry at scrape time."""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
import torch
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..domain import hostcache
from ..service import Service
from ..transport.stats import LATENCY_BUCKETS, RpcStats

log = logging.getLogger("weightavg.metrics")

SCRAPES_AT_ONCE = 8
"""Connections the endpoint serves at once; one more is answered 503 and closed. prometheus_client's
own server starts a thread per connection with no limit and no timeout: a review held 300 idle
connections open and the server process had 300 threads more, for as long as they stayed open."""
SCRAPE_TIMEOUT_SECONDS = 10.0
"""How long a scrape's connection may stay silent (sending its request, reading the reply) before it
is closed, so that a client that connects and sends nothing does not hold a slot for ever."""


def _split(method: str) -> tuple[str, str]:
    """"/weightavg.v1.WeightAveragingService/Ping" -> ("weightavg.v1.WeightAveragingService", "Ping")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class WeightavgCollector(Collector):
    """Turns a snapshot of the server's statistics into Prometheus metric families on each scrape.

    Nothing is counted twice: the interceptor's RpcStats stay the one record, and GetServerStats
    reads the same snapshot.
    """

    def __init__(self, stats: RpcStats, service: Service) -> None:
        self.stats = stats
        self.service = service
        self.device = service.device

    def collect(self) -> Iterator[Metric]:
        rpc = ["service", "method"]
        started = CounterMetricFamily("weightavg_rpc_started", "RPCs started, by method.", labels=rpc)
        handled = CounterMetricFamily(
            "weightavg_rpc_handled", "RPCs finished, by method and gRPC status code (OK included).", labels=rpc + ["code"]
        )
        failed = CounterMetricFamily(
            "weightavg_rpc_failures", "RPCs that finished with a status other than OK, by code.", labels=rpc + ["code"]
        )
        latency = HistogramMetricFamily(
            "weightavg_rpc_duration_seconds", "Time from the start of an RPC to its status, by method.", labels=rpc
        )
        received = CounterMetricFamily(
            "weightavg_tensor_received_bytes", "Tensor data bytes received in request chunks.", labels=rpc
        )
        sent = CounterMetricFamily("weightavg_tensor_sent_bytes", "Tensor data bytes sent in response chunks.", labels=rpc)
        for method, s in self.stats.snapshot().items():
            labels = list(_split(method))
            started.add_metric(labels, s.started)
            for code, count in sorted(s.codes.items()):
                handled.add_metric(labels + [code], count)
                if code != "OK":
                    failed.add_metric(labels + [code], count)
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, s.buckets):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", s.finished))
            latency.add_metric(labels, buckets, sum_value=s.seconds_total)
            received.add_metric(labels, s.bytes_received)
            sent.add_metric(labels, s.bytes_sent)
        yield from (started, handled, failed, latency, received, sent)

        handles = GaugeMetricFamily(
            "weightavg_live_handles", "Live handles, by the device of their tensors (\"none\" when they hold none).",
            labels=["device"],
        )
        nbytes = GaugeMetricFamily(
            "weightavg_live_tensor_bytes", "Bytes of distinct tensor storage held by live handles, by device.",
            labels=["device"],
        )
        for device, usage in self.service.device_usage().items():
            handles.add_metric([device or "none"], usage.handles)
            if device:
                nbytes.add_metric([device], usage.bytes)
        yield from (handles, nbytes)

        ranks = GaugeMetricFamily(
            "weightavg_rank_tensor_bytes",
            "Bytes of tensor storage each rank holds (one rank: 0; a torchrun cluster: every rank, whose objects "
            "the per-device figures above, rank 0's, leave out).",
            labels=["rank"],
        )
        for rank, held_by_rank in enumerate(self.service.rank_bytes()):
            ranks.add_metric([str(rank)], held_by_rank)
        yield ranks

        ids = self.service.request_id_stats()
        remembered = GaugeMetricFamily(
            "weightavg_request_ids_remembered", "Request IDs whose first answer is remembered (exactly-once calls)."
        )
        remembered.add_metric([], ids.remembered)
        duplicates = CounterMetricFamily(
            "weightavg_duplicate_requests_answered", "Calls that repeated a remembered request ID and got its first answer."
        )
        duplicates.add_metric([], ids.duplicates_answered)
        dropped = CounterMetricFamily(
            "weightavg_request_ids_dropped", "Request IDs forgotten before their window ended, at the caps."
        )
        dropped.add_metric([], ids.dropped)
        yield from (remembered, duplicates, dropped)

        calls = CounterMetricFamily("weightavg_tenant_calls", "Calls made with a tenant's tokens, finished.", labels=["tenant"])
        failures = CounterMetricFamily(
            "weightavg_tenant_failures", "Calls made with a tenant's tokens that finished with a status other than OK.",
            labels=["tenant"],
        )
        owned = GaugeMetricFamily("weightavg_tenant_handles", "Live handles a tenant owns.", labels=["tenant"])
        sessions = GaugeMetricFamily("weightavg_tenant_sessions", "Sessions a tenant holds open.", labels=["tenant"])
        held = GaugeMetricFamily(
            "weightavg_tenant_tensor_bytes", "Bytes of distinct tensor storage a tenant's handles reach, by device.",
            labels=["tenant", "device"],
        )
        by_tenant = self.service.store.tenant_usage()  # every tenant: the endpoint is the operator's
        tenant_calls = self.stats.tenants()
        for tenant in sorted(set(by_tenant) | set(tenant_calls)):
            c = tenant_calls.get(tenant)
            if c is not None or self.stats.counts(tenant):  # not a removed tenant that still holds objects
                calls.add_metric([tenant], c.calls if c else 0)
                failures.add_metric([tenant], c.failures if c else 0)
            u = by_tenant.get(tenant)
            owned.add_metric([tenant], u.handles if u else 0)
            sessions.add_metric([tenant], u.sessions if u else 0)
            for device, n in sorted(u.nbytes.items()) if u else []:
                held.add_metric([tenant, device], n)
        yield from (calls, failures, owned, sessions, held)

        kept = hostcache.cache().stats()
        idle = GaugeMetricFamily(
            "weightavg_host_cache_idle_bytes",
            "Bytes of freed host memory kept for the next tensor of their size (--host-cache-bytes), held by no object.",
        )
        idle.add_metric([], kept.idle_bytes)
        taken = CounterMetricFamily(
            "weightavg_host_cache_blocks", "Large host tensors made, by whether over a kept block or a new one.",
            labels=["block"],
        )
        taken.add_metric(["kept"], kept.reused)
        taken.add_metric(["new"], kept.allocated)
        by_rank = GaugeMetricFamily(
            "weightavg_rank_host_cache_idle_bytes",
            "Freed host memory each rank's host cache keeps idle (one rank: 0; a torchrun cluster: every rank, "
            "the others' as of their last answer to rank 0).",
            labels=["rank"],
        )
        for rank, kept_by_rank in enumerate(self.service.rank_kept_bytes()):
            by_rank.add_metric([str(rank)], kept_by_rank)
        yield from (idle, taken, by_rank)

        info = GaugeMetricFamily(
            "weightavg_build_info", "Versions and device of this server (value always 1).",
            labels=["version", "torch_version", "grpc_version", "device"],
        )
        info.add_metric([__version__, torch.__version__, grpc.__version__, str(self.device)], 1)
        yield info
        if self.device.type == "cuda":
            cuda = GaugeMetricFamily(
                "weightavg_cuda_memory_allocated_bytes", "torch.cuda.memory_allocated on the server's device.",
                labels=["device"],
            )
            cuda.add_metric([str(self.device)], torch.cuda.memory_allocated(self.device))
            yield cuda


class _ScrapeHandler(WSGIRequestHandler):
    """One scrape: silent (no access log), its socket timing out after `SCRAPE_TIMEOUT_SECONDS`."""

    timeout = SCRAPE_TIMEOUT_SECONDS  # socketserver.StreamRequestHandler sets it on the socket

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scrape every few seconds would fill the log."""


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `SCRAPES_AT_ONCE` at once: a connection past them is
    answered 503 and closed on the accepting thread, without starting one."""

    daemon_threads = True  # a scrape in progress does not hold the process up at exit

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler], scrapes: int) -> None:
        self._slots = threading.BoundedSemaphore(scrapes)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics scrape from %s refused: %d scrapes already served", client_address, SCRAPES_AT_ONCE)
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: it will never give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that failed (timed out, went away) is the scraper's problem: one debug line,
        not socketserver's traceback on stderr."""
        log.debug("metrics scrape from %s ended early", client_address, exc_info=True)


_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"too many metrics scrapes at once; scrape again later\n"
)


def _refuse(request: socket.socket) -> None:
    """Say 503 on a connection past the limit, without waiting: the accepting thread sends it."""
    try:
        request.setblocking(False)
        request.send(_BUSY)
    except OSError:  # its buffer full or the client gone: closing says enough
        pass


class MetricsServer:
    """The HTTP endpoint serving /metrics (any path answers) on its own thread."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_address[1]

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def start_metrics_server(
    host: str, port: int, stats: RpcStats, service: Service
) -> MetricsServer:
    """Serve the metrics over HTTP on host:port (0 picks a free port; see MetricsServer.port).

    A private CollectorRegistry keeps several servers in one process (tests) from sharing metrics.
    prometheus_client's WSGI app serves it, from a server of our own rather than its
    `start_http_server`, whose threads have no limit and connections no timeout (`SCRAPES_AT_ONCE`).
    """
    collectors = CollectorRegistry()
    collectors.register(WeightavgCollector(stats, service))
    ProcessCollector(registry=collectors)
    family, _, _, _, bound = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_BoundedServer):
        address_family = family  # an IPv6 host binds an IPv6 socket

    httpd = Server((str(bound[0]), port), _ScrapeHandler, SCRAPES_AT_ONCE)
    httpd.set_app(make_wsgi_app(collectors))
    thread = threading.Thread(target=httpd.serve_forever, name="weightavg-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)
