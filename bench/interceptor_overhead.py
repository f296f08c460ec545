"""What the observing interceptor costs: Ping latency and 256 MiB stream throughput, with and without it.

Run by hand: .venv/bin/python bench/interceptor_overhead.py
"""

from __future__ import annotations

import statistics
import time
from concurrent import futures

import grpc
import numpy as np
import torch

from weightavg import Client
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.app import server_options
from weightavg_server.ops.config import ServerConfig
from weightavg_server.transport.observe import ObservingInterceptor
from weightavg_server.store.registry import Registry
from weightavg_server.transport.servicer import WeightAveragingServicer
from weightavg_server.transport.stats import RpcStats


def start(observed: bool) -> tuple[grpc.Server, int]:
    config = ServerConfig(port=0, device="cpu")
    stats = RpcStats()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), options=server_options(config),
        interceptors=[ObservingInterceptor(stats)] if observed else [],
    )
    pb_grpc.add_WeightAveragingServiceServicer_to_server(
        WeightAveragingServicer(config, Registry(), torch.device("cpu"), stats), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def ping_p50(client: Client, calls: int = 2000) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def throughput(client: Client) -> tuple[float, float]:
    data = np.ones(64 << 20, np.float32)  # 256 MiB
    t0 = time.perf_counter()
    d = client.dict({"w": data})
    up = data.nbytes / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    client.dict(d, "w")
    down = data.nbytes / (time.perf_counter() - t0)
    client.purge()
    return up / 1e9, down / 1e9


if __name__ == "__main__":
    # Both servers run side by side and rounds alternate, so machine noise hits both alike.
    servers = {observed: start(observed) for observed in (False, True)}
    clients = {observed: Client(f"127.0.0.1:{port}") for observed, (_, port) in servers.items()}
    pings: dict[bool, list[float]] = {False: [], True: []}
    moves: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for client in clients.values():
        ping_p50(client, 200)  # warm up
    for _ in range(8):
        for observed, client in clients.items():
            pings[observed].append(ping_p50(client))
    for _ in range(3):
        for observed, client in clients.items():
            moves[observed].append(throughput(client))
    for observed in (False, True):
        up = statistics.median(u for u, _ in moves[observed])
        down = statistics.median(d for _, d in moves[observed])
        print(f"interceptor {'on ' if observed else 'off'}: ping p50 {statistics.median(pings[observed]):6.1f} us "
              f"(median of 8 rounds), 256 MiB upload {up:4.2f} GB/s, download {down:4.2f} GB/s (median of 3)")
    for client in clients.values():
        client.close()
    for server, _ in servers.values():
        server.stop(None)
