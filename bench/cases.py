"""The benchmark cases. Each takes a Context and returns rows: a measurement and a same-run baseline."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from weightavg import Client, Handle, wire
from weightavg.v1 import weightavg_pb2 as pb
from weightavg_server.ops.launch import LocalCluster

from ._harness import Row, Skip, at_least, at_most, bench_server, in_blocks, interleaved, median, row, timed
from ._raw import RawClient, payload

GB = 1e9
CHUNK = 4 << 20


@dataclass
class Context:
    address: str
    quick: bool
    client: Client
    raw: RawClient
    sweep: dict[str, list[dict[str, float]]]
    device: str = "cpu"
    """The server's device (--device): the allreduce case puts its ranks there too."""

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def linears(count: int, width: int) -> list[Any]:
    """A spec for `count` bias-free width x width linears: count tensors of width**2 float32 each."""
    return ["sequential", *(["linear", width, width, {"bias": False}] for _ in range(count))]


def torch_linears(count: int, width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(count)))


@dataclass
class Local:
    """Where a case's in-process baseline runs (the server's device kind), and how each side waits
    for its work: on CUDA both queue kernels and return, so a timed call must end with a sync or it
    measures the launches alone."""

    device: torch.device
    marker: Handle | None = None
    """A one-element server tensor: fetching it waits for the averages queued before it."""

    def served(self, c: Client, fn: Callable[[], Any]) -> Callable[[], None]:
        """`fn` (a server call), then, on CUDA, a fetch that waits for its queued kernels."""
        def call() -> None:
            fn()
            if self.marker is not None:
                c.tensor(self.marker)
        return call

    def here(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """`fn` (in-process torch work), then, on CUDA, a device sync."""
        def call() -> None:
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return call

    def served_queue(self, c: Client, fn: Callable[[], Any], calls: int) -> Callable[[], None]:
        """`calls` server calls back to back, then one wait for them all: how a training loop issues
        its averages, never waiting on each one's kernel."""
        return self.served(c, lambda: [fn() for _ in range(calls)])

    def here_queue(self, fn: Callable[[], Any], calls: int) -> Callable[[], None]:
        """`calls` runs of in-process work back to back, then one device sync."""
        return self.here(lambda: [fn() for _ in range(calls)])


def local_device(ctx: Context, case: str) -> Local | Skip:
    """The baseline's device for a case comparing a server call with torch in this process: the
    server's kind (cuda when it runs on CUDA), else a Skip. A CPU loop against a CUDA server compares
    other work (the H200 run of 2026-11-26 read "0.38x the loop" from exactly that)."""
    if not ctx.device.startswith("cuda"):
        return Local(torch.device("cpu"))
    if not torch.cuda.is_available():
        return Skip(case, "the server runs on CUDA and this process has none: an in-process baseline would run on the CPU")
    return Local(torch.device(ctx.device), ctx.client.tensor(np.zeros(1, np.float32)))


# -- averaging ---------------------------------------------------------------------------------------


def average_large(ctx: Context) -> list[Row | Skip]:
    """avgparms on 25.6M float32 parameters in 160 tensors, against in-process PyTorch on the same shapes."""
    c, count, width = ctx.client, 160, 400
    local = local_device(ctx, "average, large")
    if isinstance(local, Skip):
        return [local]
    m = c.module(linears(count, width))
    p = c.copyparms(m)
    torch.manual_seed(0)
    model = torch_linears(count, width).to(local.device)
    params = [q.detach() for q in model.parameters()]
    avgs = [q.clone() for q in params]
    big_a, big_b = torch.cat([a.reshape(-1) for a in avgs]), torch.cat([q.reshape(-1) for q in params])
    swa = torch.optim.swa_utils.AveragedModel(model)
    swa.update_parameters(model)  # the first call only copies; later ones average

    calls = [1]

    def lerp_loop() -> None:  # the server's weights, 1/(n+1): a fixed weight would drive avg - p into denormals
        calls[0] += 1
        with torch.no_grad():
            for a, q in zip(avgs, params):
                a.lerp_(q, 1.0 / calls[0])

    times = interleaved(
        {
            "avgparms": local.served(c, lambda: c.avgparms(m, p)),
            "lerp_": local.here(lerp_loop),
            "AveragedModel": local.here(lambda: swa.update_parameters(model)),
            "add_": local.here(lambda: big_a.add_(big_b)),
        },
        ctx.reps(15, 5),
    )
    nbytes = 3 * 4 * count * width * width  # read average and parameter, write average
    gbps = {k: [nbytes / t / GB for t in v] for k, v in times.items()}
    neighbour = _neighbour(local.served(c, lambda: c.avgparms(m, p)), local.here(lerp_loop), ctx.reps(15, 5))
    queued = interleaved(
        {"avgparms": local.served_queue(c, lambda: c.avgparms(m, p), QUEUED_CALLS),
         "lerp_": local.here_queue(lerp_loop, QUEUED_CALLS)},
        ctx.reps(7, 3),
    )
    per_call = {k: [t / QUEUED_CALLS for t in v] for k, v in queued.items()}
    c.free(m, p, *([local.marker] if local.marker is not None else []))
    return [
        row("average, large", "avgparms 25.6M fp32 / 160 tensors", "lerp_ loop in-process", times, "avgparms", "lerp_",
            target="<= 1.0x", check=at_most(1.0)),
        row("average, large", "avgparms", "AveragedModel.update_parameters", times, "avgparms", "AveragedModel",
            target=">= 2x faster", check=at_least(2.0), invert=True, note="ratio = speedup"),
        row("average, floor", "avgparms GB/s", "one large add_ GB/s", gbps, "avgparms", "add_",
            unit="GB/s", scale=1.0, target=">= 0.85", check=at_least(0.85)),
        row("average, floor (info)", "lerp_ loop in-process GB/s", "one large add_ GB/s", gbps, "lerp_", "add_",
            unit="GB/s", scale=1.0, note="what 160 separate in-place kernels reach without any server"),
        row("average, queued (info)", f"{QUEUED_CALLS} avgparms, then one wait, per call",
            f"{QUEUED_CALLS} lerp_ loops, then one sync, per loop", per_call, "avgparms", "lerp_",
            note="as a training loop issues averages; on CUDA the rows above wait for each call's kernel"),
        row("average, neighbour (info)", "lerp_ loop right after an avgparms", "the loop 50 ms after one", neighbour,
            "after", "later", note="what the server's idle threads take from the job beside it (ops/openmp.py)"),
    ]


QUEUED_CALLS = 10
"""Calls per timed block in the "average, queued" row: one wait (a marker fetch on CUDA) per block.
On an H200 a served avgparms and the fetch that waits for its kernel are two round trips (2.8 ms,
4.2 ms after a pause), ten calls and one fetch 1.27 ms a call (docs/perf.md, "GPU", 2026-11-27)."""


def _neighbour(call: Callable[[], Any], job: Callable[[], Any], repeats: int) -> dict[str, list[float]]:
    """Seconds of `job` in this process started right after a server `call` returns, and started 50 ms
    after it: the server's OpenMP workers spinning on after its kernel slow the first (docs/perf.md)."""
    times: dict[str, list[float]] = {"after": [], "later": []}
    for _ in range(repeats):
        call()
        times["after"].append(timed(job))
        call()
        time.sleep(0.05)
        times["later"].append(timed(job))
    return times


EMA_DECAY = 0.999
EMA_STEP = 10**6
"""A fixed step past warm-up: every timed call lerps (the first step of an EMA is a copy)."""


def ema_large(ctx: Context) -> list[Row | Skip]:
    """ema on 25.6M parameters in 160 tensors against the same lerps in-process: float32 into float32,
    and a bfloat16 module into a float32 EMA (each parameter cast, then lerped)."""
    c, count, width = ctx.client, 160, 400
    w = 1.0 - EMA_DECAY
    local = local_device(ctx, "ema, large")
    if isinstance(local, Skip):
        return [local]
    m = c.module(linears(count, width))
    other = c.module(linears(count, width))
    e = c.copyparms(other)  # starts away from m, so every lerp has a distance to cover
    low = c.module(linears(count, width))
    c.to(low, dtype="bfloat16")
    e32 = c.copyparms(other, dtype="float32")
    c.free(other)
    torch.manual_seed(0)
    model = torch_linears(count, width).to(local.device)
    params = [q.detach() for q in model.parameters()]
    avgs = [torch.randn_like(q) for q in params]
    avgs_foreach = [a.clone() for a in avgs]
    params16 = [q.to(torch.bfloat16) for q in params]
    avgs32 = [a.clone() for a in avgs]
    big_a, big_b = torch.cat([a.reshape(-1) for a in avgs]), torch.cat([q.reshape(-1) for q in params])
    swa = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY))  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    swa.update_parameters(model)  # the first call only copies; later ones lerp

    def lerp_loop() -> None:
        with torch.no_grad():
            for a, q in zip(avgs, params):
                a.lerp_(q, w)

    def cast_loop() -> None:  # what the server does for a bfloat16 parameter: cast it, then lerp
        with torch.no_grad():
            for a, q in zip(avgs32, params16):
                a.lerp_(q.to(torch.float32), w)

    times = interleaved(
        {
            "ema": local.served(c, lambda: c.ema(m, e, decay=EMA_DECAY, step=EMA_STEP)),
            "lerp_": local.here(lerp_loop),
            "foreach": local.here(lambda: torch._foreach_lerp_(avgs_foreach, params, w)),
            "AveragedModel": local.here(lambda: swa.update_parameters(model)),
            "add_": local.here(lambda: big_a.add_(big_b)),
            "ema bf16": local.served(c, lambda: c.ema(low, e32, decay=EMA_DECAY, step=EMA_STEP)),
            "cast lerp_": local.here(cast_loop),
        },
        ctx.reps(15, 5),
    )
    nbytes = 3 * 4 * count * width * width  # read average and parameter, write average
    gbps = {k: [nbytes / t / GB for t in v] for k, v in times.items()}
    c.free(m, e, low, e32, *([local.marker] if local.marker is not None else []))
    return [
        row("ema, large", "ema 25.6M fp32 / 160 tensors", "lerp_ loop in-process, same decay", times, "ema", "lerp_",
            target="<= 1.0x", check=at_most(1.0)),
        row("ema, large (info)", "ema", "_foreach_lerp_ in-process, same decay", times, "ema", "foreach"),
        # AveragedModel's EMA is itself one _foreach_lerp_ per dtype group, so it is a baseline, not a target
        row("ema, large (info)", "ema", "AveragedModel(get_ema_multi_avg_fn).update_parameters", times, "ema",
            "AveragedModel", invert=True, note="ratio = speedup"),
        row("ema, floor", "ema GB/s", "one large add_ GB/s", gbps, "ema", "add_",
            unit="GB/s", scale=1.0, target=">= 0.85", check=at_least(0.85)),
        row("ema, bf16 into fp32", "ema of a bf16 module into fp32, 25.6M", "cast + lerp_ loop in-process",
            times, "ema bf16", "cast lerp_", target="<= 1.1x", check=at_most(1.1)),
    ]


def lerp_kernels(ctx: Context) -> list[Row | Skip]:
    """Why the CPU path loops over lerp_: the same tensors through torch._foreach_lerp_, in-process."""
    torch.manual_seed(0)
    params = [torch.randn(400, 400) for _ in range(160)]
    avgs = [torch.randn(400, 400) for _ in range(160)]
    calls = [1]

    def weight() -> float:
        calls[0] += 1
        return 1.0 / calls[0]

    def loop() -> None:
        w = weight()
        for a, q in zip(avgs, params):
            a.lerp_(q, w)

    times = interleaved(
        {"loop": loop, "foreach": lambda: torch._foreach_lerp_(avgs, params, weight())}, ctx.reps(15, 5)
    )
    return [row("kernel choice (info)", "_foreach_lerp_ 160 x 640 KB", "lerp_ loop", times, "foreach", "loop")]


def small_call(ctx: Context) -> list[Row | Skip]:
    """Latency of avgparms on the reference's 2-to-1 linear against a bare grpc.health.v1 Check (open:
    no token check, no decode guard; the statistics and the session sweep run on it, as on every
    call) and the Ping round trip (every interceptor runs on it, so it hides their cost)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    c = ctx.client
    m = c.module(["linear", 2, 1])
    p = c.copyparms(m)
    health = health_pb2_grpc.HealthStub(c._raw_channel)  # the same channel, without the client's interceptors
    check = health_pb2.HealthCheckRequest()
    calls: dict[str, Callable[[], Any]] = {
        "avgparms": lambda: c.avgparms(m, p), "Ping": c.ping, "health": lambda: health.Check(check, timeout=60),
    }
    times = in_blocks(calls, ctx.reps(40, 10))
    c.free(m, p)
    r = row("small call", "avgparms p50, linear 2->1", "Ping p50 (same server)", times, "avgparms", "Ping",
            target="<= 1.3x", check=at_most(1.3))
    r.unit, r.value, r.base = "us", median(times["avgparms"]) * 1e6, median(times["Ping"]) * 1e6
    h = row("small call", "avgparms p50, linear 2->1", "grpc.health.v1 Check p50 (same server)", times, "avgparms",
            "health", target="<= 1.3x", check=at_most(1.3))
    h.unit, h.value, h.base = "us", median(times["avgparms"]) * 1e6, median(times["health"]) * 1e6
    return [h, r]


def many_sessions(ctx: Context) -> list[Row | Skip]:
    """The health Check and a small avgparms on a server holding 10,000 idle sessions (2,000 with
    --quick), against the same calls on a server holding none: two fresh servers started for the
    case, blocks of 50 calls alternated between them. Every call starts with the session sweep,
    which must not walk the sessions (docs/perf.md, "Sessions at scale"): before that was fixed,
    10,000 sessions made both calls about twice as slow."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

    count = 2000 if ctx.quick else 10000
    check = health_pb2.HealthCheckRequest()
    with contextlib.ExitStack() as stack:
        calls: dict[str, Callable[[], Any]] = {}
        for where in ("beside", "alone"):
            c = stack.enter_context(Client(stack.enter_context(bench_server(ctx.device)), timeout=60))
            m = c.module(["linear", 2, 1])
            p = c.copyparms(m)
            health = health_pb2_grpc.HealthStub(c._raw_channel)
            if where == "beside":
                stub = pb_grpc.WeightAveragingServiceStub(c._raw_channel)
                for _ in range(count):
                    stub.CreateSession(pb.CreateSessionRequest(lease_seconds=3600), timeout=60)
            calls[f"health {where}"] = functools.partial(health.Check, check, timeout=60)
            calls[f"avgparms {where}"] = functools.partial(c.avgparms, m, p)
        times = in_blocks(calls, ctx.reps(20, 5))
    rows: list[Row | Skip] = []
    for name in ("health", "avgparms"):
        r = row("many sessions", f"{name} p50, a server holding {count} idle sessions",
                f"{name} p50, a server holding none", times, f"{name} beside", f"{name} alone",
                target="<= 1.2x", check=at_most(1.2))
        r.unit, r.value, r.base = "us", median(times[f"{name} beside"]) * 1e6, median(times[f"{name} alone"]) * 1e6
        rows.append(r)
    return rows


# -- shared memory -----------------------------------------------------------------------------------


def shared_memory(ctx: Context) -> list[Row | Skip]:
    """Fetch and upload of 256 MB (64 MB with --quick) through shared memory, against the same calls
    through the gRPC stream and against numpy copying the same arrays into new ones in this process;
    and the upload of the same values from arrays that lie in a region (`Client.empty`, filled
    once), which the client copies nothing of."""
    c, count, width = ctx.client, 4 if ctx.quick else 16, 2048
    nbytes = count * width * width * 4
    m = c.module(linears(count, width))
    kept = c.copyparms(m)
    arrays = c.dict(kept)
    with Client(ctx.address, timeout=600, shm=True) as fast:
        warm = fast.dict({"warm": np.zeros(nbytes // 4, np.float32)})  # registers a large enough region
        fast.dict(warm)
        fast.free(warm)
        if fast._shm is None:
            c.free(m, kept)  # the later cases share this server
            return [Skip("shared memory", "the server refused shared memory (start it with --allow-shm)")]

        def check(values: dict[str, Any]) -> None:
            assert sum(v.nbytes for v in values.values()) == nbytes

        filled = fast.empty({k: (v.shape, v.dtype) for k, v in arrays.items()})
        for k, v in arrays.items():
            np.copyto(filled[k], v)
        times = interleaved(
            {
                "shm fetch": lambda: check(fast.dict(kept)),
                "grpc fetch": lambda: check(c.dict(kept)),
                "numpy copy": lambda: check({k: v.copy() for k, v in arrays.items()}),
                "shm upload": lambda: fast.free(fast.dict(arrays)),
                "grpc upload": lambda: c.free(c.dict(arrays)),
                "shm upload filled": lambda: fast.free(fast.dict(filled)),
            },
            ctx.reps(7, 2),
        )
        del filled
    gbps = {k: [nbytes / t / GB for t in v] for k, v in times.items()}
    mb = nbytes >> 20
    c.purge()
    rows: list[Row | Skip] = []
    for way in ("fetch", "upload"):
        rows += [
            row("shared memory", f"{way} {mb} MB, Client(shm=True)", f"{way} through the gRPC stream", gbps,
                f"shm {way}", f"grpc {way}", unit="GB/s", scale=1.0, target=">= 5x", check=at_least(5.0)),
            row("shared memory", f"{way} {mb} MB, Client(shm=True)", "numpy copy of the same arrays, in process",
                gbps, f"shm {way}", "numpy copy", unit="GB/s", scale=1.0, target=">= 0.5x", check=at_least(0.5)),
        ]
    rows.append(row("shared memory", f"upload {mb} MB from arrays in a region (Client.empty)",
                    "upload through the gRPC stream", gbps, "shm upload filled", "grpc upload", unit="GB/s", scale=1.0,
                    note="the caller fills the arrays where the server reads them: no copy in the client"))
    return rows


# -- transfer ----------------------------------------------------------------------------------------


SMALL_TENSORS, SMALL_FLOATS = 2000, 64


def small_tensors(ctx: Context) -> list[Row | Skip]:
    """A dictionary of many small tensors (2,000 x 64 float32), uploaded and fetched by the client
    (packed chunks: TensorChunk.packed) against the same streams one chunk a message (what a client
    that does not pack sends, and what one that does not set FetchTensorsRequest.packed_chunks gets)."""
    c = ctx.client
    count = SMALL_TENSORS // 4 if ctx.quick else SMALL_TENSORS
    rng = np.random.default_rng(0)
    values = {f"block{i}.weight": rng.standard_normal(SMALL_FLOATS, dtype=np.float32) for i in range(count)}
    d = c.dict(values)
    channel = grpc.insecure_channel(ctx.address)  # the bench's server is open: no token, no session
    create: grpc.StreamUnaryMultiCallable[bytes, pb.CreateDictionaryResponse] = channel.stream_unary(
        "/weightavg.v1.WeightAveragingService/CreateDictionary", response_deserializer=pb.CreateDictionaryResponse.FromString,
    )

    def fetch_unpacked() -> None:
        assert len(unpacked_fetch(channel, d.id)) == count

    def upload_unpacked() -> None:
        def requests() -> Iterator[bytes]:
            yield pb.CreateDictionaryRequest().SerializeToString()
            yield from wire.encoded_chunks(values.items(), wire.CHUNK_BYTES, pb.CreateDictionaryRequest)

        c.free(Handle(create(requests(), timeout=600).dictionary.id, "dictionary"))

    times = interleaved(
        {
            "fetch": lambda: c.dict(d),
            "fetch unpacked": fetch_unpacked,
            "upload": lambda: c.free(c.dict(values)),
            "upload unpacked": upload_unpacked,
        },
        ctx.reps(7, 2),
    )
    per = {k: [t / count for t in v] for k, v in times.items()}
    channel.close()
    c.free(d)
    what = f"{count} tensors of {SMALL_FLOATS} float32"
    return [
        row("small tensors", f"fetch {what}, packed", "one chunk a message", per, "fetch", "fetch unpacked",
            unit="us/tensor", scale=1e6, target=">= 2x faster", check=at_least(2.0), invert=True,
            note="ratio = speedup"),
        row("small tensors", f"upload {what}, packed", "one chunk a message", per, "upload", "upload unpacked",
            unit="us/tensor", scale=1e6, target=">= 2x faster", check=at_least(2.0), invert=True,
            note="ratio = speedup"),
    ]


def unpacked_chunks(channel: grpc.Channel, handle: str) -> Iterator[wire.ChunkView | pb.TensorChunk]:
    """The chunks of a dictionary fetched one chunk a message (FetchTensorsRequest.packed_chunks unset),
    each message read as `Client.dict` reads its own: with the zero-copy `wire.decode_fetch_response`.
    Parsing each message with protobuf instead (the generated stub's way) copies every chunk twice,
    which the client never pays, and made the small-tensors row's baseline slower than packing alone."""
    stream = channel.unary_stream(
        "/weightavg.v1.WeightAveragingService/FetchTensors",
        request_serializer=pb.FetchTensorsRequest.SerializeToString,
        response_deserializer=wire.decode_fetch_response,
    )
    return iter(stream(pb.FetchTensorsRequest(handle=handle), timeout=600))


def unpacked_fetch(channel: grpc.Channel, handle: str) -> dict[str, Any]:
    """`Client.dict(handle)` one chunk a message: the same decode, `join_chunks` and `wire.plain`."""
    return {name: wire.plain(a) for name, a in wire.join_chunks(unpacked_chunks(channel, handle))}


def transfer(ctx: Context) -> list[Row | Skip]:
    """copyparms + fetch of a 256 MB dictionary to numpy (64 MB with --quick), and uploading one, against raw streams."""
    c, count, width = ctx.client, 4 if ctx.quick else 16, 2048
    nbytes = count * width * width * 4
    m = c.module(linears(count, width))
    kept = c.copyparms(m)
    arrays = c.dict(kept)
    wide = c.module(linears(count // 4, width * 2))  # the same bytes in tensors over glibc's 32 MiB mmap threshold
    kept_wide = c.copyparms(wide)
    data = payload(nbytes)

    def fetch() -> None:
        p = c.copyparms(m)
        values = c.dict(p)
        assert sum(v.nbytes for v in values.values()) == nbytes
        c.free(p)

    def upload() -> None:
        c.free(c.dict(arrays))

    times = interleaved(
        {
            "fetch": fetch,
            "fetch only": lambda: c.dict(kept),
            "fetch wide": lambda: c.dict(kept_wide),
            "raw down": lambda: ctx.raw.download(nbytes, CHUNK),
            "raw down to numpy": lambda: ctx.raw.download_into_numpy(nbytes, CHUNK),
            "upload": upload,
            "raw up": lambda: ctx.raw.upload(data, CHUNK),
        },
        ctx.reps(7, 2),
    )
    gbps = {k: [nbytes / t / GB for t in v] for k, v in times.items()}
    mb = nbytes >> 20
    c.purge()
    return [
        row("transfer", f"copyparms + fetch {mb} MB to numpy", "raw 4 MiB chunks, server to client", gbps, "fetch",
            "raw down", unit="GB/s", scale=1.0, target=">= 0.8x", check=at_least(0.8)),
        row("transfer (info)", f"fetch {mb} MB to numpy, no copyparms", "raw 4 MiB chunks, server to client", gbps,
            "fetch only", "raw down", unit="GB/s", scale=1.0, note="the fetch alone, without the server-side clone"),
        row("transfer (info)", f"fetch {mb} MB to numpy, no copyparms", "raw chunks copied into a new numpy array",
            gbps, "fetch only", "raw down to numpy", unit="GB/s", scale=1.0,
            note="what the protocol costs beyond landing the bytes in fresh memory"),
        row("transfer (info)", f"fetch {mb} MB in {count // 4} tensors of {mb * 4 // count} MB to numpy, no copyparms",
            "raw 4 MiB chunks, server to client", gbps, "fetch wide", "raw down", unit="GB/s", scale=1.0,
            note="tensors a new mmap each would hold: the copy goes into reused reply buffers"),
        row("transfer", f"upload a {mb} MB dictionary", "raw 4 MiB chunks, client to server", gbps, "upload",
            "raw up", unit="GB/s", scale=1.0, target=">= 0.8x", check=at_least(0.8)),
    ]


def sweep(ctx: Context) -> list[Row | Skip]:
    """Throughput against tensor size (for the plot): one tensor each way, and avgparms over many."""
    c = ctx.client
    exps = range(14, 25, 10) if ctx.quick else range(10, 29, 2)
    for e in exps:
        nbytes = 1 << e
        array = np.ones(nbytes // 4, np.float32)
        h = c.tensor(array)
        data = array.tobytes()
        reps = max(3, min(50, (64 << 20) // nbytes)) if not ctx.quick else 3
        times = interleaved(
            {
                "fetch": lambda: c.tensor(h),
                "raw down": lambda: ctx.raw.download(nbytes, CHUNK),
                "upload": lambda: c.free(c.tensor(array)),
                "raw up": lambda: ctx.raw.upload(data, CHUNK),
            },
            reps,
        )
        c.free(h)
        ctx.sweep.setdefault("transfer", []).append(
            {"bytes": nbytes, **{k: nbytes / median(v) / GB for k, v in times.items()}}
        )
    # avgparms over tensors of one size, about 100 MB in all (fewer tensors at the small end), against
    # the loop on the server's device kind (none drawn when the server is on CUDA and this process is not)
    local = local_device(ctx, "sweep")
    if isinstance(local, Skip):
        return []
    for width in ([256] if ctx.quick else [32, 64, 128, 256, 512, 1024, 2048, 4096]):
        count = max(1, min(400, 25_600_000 // (width * width)))
        m = c.module(linears(count, width))
        p = c.copyparms(m)
        params = [torch.randn(width, width, device=local.device) for _ in range(count)]
        avgs = [q.clone() for q in params]
        calls = [1]

        def loop() -> None:
            calls[0] += 1
            for a, q in zip(avgs, params):
                a.lerp_(q, 1.0 / calls[0])

        times = interleaved({"avgparms": local.served(c, lambda: c.avgparms(m, p)), "lerp_": local.here(loop)},
                            3 if ctx.quick else 7)
        c.free(m, p)
        moved = 3 * 4 * count * width * width
        ctx.sweep.setdefault("average", []).append(
            {"bytes": 4 * width * width, "count": count, **{k: moved / median(v) / GB for k, v in times.items()}}
        )
    if local.marker is not None:
        c.free(local.marker)
    return []


# -- training and batchnorm (need the models RPCs) ------------------------------------------------------

MNIST_NET = [
    "sequential",
    ["linear", "a", 784, 800],
    ["batchnorm1d", "b", 800],
    ["relu", "c"],
    ["linear", "d", 800, 800],
    ["relu", "e"],
    ["linear", "f", 800, 10],
]


def _torch_mnist_net() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 800), torch.nn.BatchNorm1d(800), torch.nn.ReLU(),
        torch.nn.Linear(800, 800), torch.nn.ReLU(), torch.nn.Linear(800, 10),
    )


def _mnist_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)


def _models_client(c: Client) -> str | None:
    missing = [verb for verb in ("loss", "opt", "model", "train", "run") if not hasattr(c, verb)]
    return f"client lacks {', '.join(missing)} (the models RPCs)" if missing else None


def _mnist_model(c: Client, n: int) -> tuple[np.ndarray, np.ndarray, Handle]:
    """n random MNIST-shaped rows, and a server model of MNIST_NET (SGD .01, batch 100) holding them."""
    x, y = _mnist_data(n)
    q = c.module(MNIST_NET)
    model = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.01))
    c.train(model, batchsize=100)
    c.train(model, x, y)
    return x, y, model


def training(ctx: Context) -> list[Row | Skip]:
    """`run` on one MNIST-sized epoch against the same loop in plain in-process PyTorch."""
    c = ctx.client
    why = _models_client(c)
    if why:
        return [Skip("training", why)]
    local = local_device(ctx, "training")
    if isinstance(local, Skip):
        return [local]
    n = 3000 if ctx.quick else 60000
    x, y, model = _mnist_model(c, n)
    net = _torch_mnist_net().to(local.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x).to(local.device), torch.from_numpy(y).to(local.device)

    def local_epoch() -> None:
        net.train()
        perm = torch.randperm(n, device=local.device)
        for i in range(0, n, 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            loss_fn(net(tx[idx]), ty[idx]).backward()
            opt.step()

    times = interleaved({"run": local.served(c, lambda: c.run(model)), "torch": local.here(local_epoch)}, ctx.reps(5, 2))
    c.purge()
    return [row("training", f"run: one epoch of {n} MNIST-sized rows, batch 100", "same loop in-process",
                times, "run", "torch", target="<= 1.05x", check=at_most(1.05))]


def batchnorm(ctx: Context) -> list[Row | Skip]:
    """batchnorm(model) against torch.optim.swa_utils.update_bn on the same net and data."""
    c = ctx.client
    why = _models_client(c)
    if why:
        return [Skip("batchnorm", why)]
    local = local_device(ctx, "batchnorm")
    if isinstance(local, Skip):
        return [local]
    n = 6000 if ctx.quick else 60000
    x, y, model = _mnist_model(c, n)
    net = _torch_mnist_net().to(local.device)
    loader = [torch.from_numpy(x[i:i + 100]).to(local.device) for i in range(0, n, 100)]
    times = interleaved(
        {"batchnorm": local.served(c, lambda: c.batchnorm(model)),
         "update_bn": local.here(lambda: torch.optim.swa_utils.update_bn(loader, net))},
        ctx.reps(5, 2),
    )
    c.purge()
    return [row("batchnorm", f"batchnorm(model), {n} rows", "swa_utils.update_bn in-process", times,
                "batchnorm", "update_bn", target="<= 1.05x", check=at_most(1.05))]


# -- many clients --------------------------------------------------------------------------------------


def _calls_per_second(address: str, clients: int, seconds: float) -> tuple[float, int]:
    """Aggregate avgparms calls/s of `clients` threads, each with its own channel and module; and errors."""
    start = threading.Barrier(clients + 1)
    stop = threading.Event()
    counts = [0] * clients
    errors = [0] * clients

    def work(i: int) -> None:
        with contextlib.ExitStack() as stack:
            try:
                c = stack.enter_context(Client(address, timeout=60))
                m = c.module(["linear", 2, 1])
                p = c.copyparms(m)
            except Exception:  # an error too; and the others must not wait at the barrier for this thread
                errors[i] += 1
                start.wait()
                return
            start.wait()
            while not stop.is_set():
                try:
                    c.avgparms(m, p)
                    counts[i] += 1
                except Exception:  # counted, reported: the target is zero
                    errors[i] += 1
            c.free(m, p)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    begin = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - begin
    for t in threads:
        t.join()
    return sum(counts) / elapsed, sum(errors)


def many_clients(ctx: Context) -> list[Row | Skip]:
    """16 clients averaging their own modules at once, against one client alone."""
    seconds = 2.0 if ctx.quick else 5.0
    rates: dict[str, list[float]] = {"16 clients": [], "1 client": []}
    errors = 0
    for _ in range(ctx.reps(3, 1)):
        for name, n in (("16 clients", 16), ("1 client", 1)):
            rate, err = _calls_per_second(ctx.address, n, seconds)
            rates[name].append(rate)
            errors += err
    r = row("many clients", "16 clients, own modules, avgparms calls/s", "1 client calls/s", rates,
            "16 clients", "1 client", unit="calls/s", scale=1.0, target=">= 1.5x, 0 errors")
    r.met = r.ratio >= 1.5 and errors == 0
    r.note = f"{errors} errors"
    return [r]


# -- GPU ------------------------------------------------------------------------------------------------


def gpu_average(ctx: Context) -> list[Row | Skip]:
    """avgparms on a 1B-parameter module (fp32 and bf16) as a fraction of device-to-device copy bandwidth."""
    c = ctx.client
    if not torch.cuda.is_available() or not c.info()["device"].startswith("cuda"):
        return [Skip("average, GPU", "needs CUDA on the server and in this process")]
    rows: list[Row | Skip] = []
    count, width, calls = 15, 8192, 5  # 15 x 67.1M = 1.007B parameters
    marker = c.tensor(np.zeros(1, np.float32))
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m = c.module(linears(count, width))
        if dtype != "float32":
            c.to(m, dtype=dtype)
        p = c.copyparms(m)
        elements = count * width * width
        src = torch.empty(elements, dtype=torch_dtype, device="cuda")
        dst = torch.empty_like(src)

        def copy() -> None:
            dst.copy_(src)
            torch.cuda.synchronize()

        def average() -> None:
            for _ in range(calls):  # queued without a host sync, as a training loop would issue them
                c.avgparms(m, p)
            c.tensor(marker)  # fetching a one-element device tensor waits for the queued averages

        times = interleaved({"avgparms": average, "copy_": copy}, ctx.reps(10, 3))
        size = torch.empty((), dtype=torch_dtype).element_size()
        gbps = {
            "avgparms": [calls * 3 * elements * size / t / GB for t in times["avgparms"]],
            "copy_": [2 * elements * size / t / GB for t in times["copy_"]],
        }
        c.free(m, p)
        del src, dst
        torch.cuda.empty_cache()
        rows.append(row("average, GPU", f"avgparms 1B {dtype} GB/s", "device-to-device copy_ GB/s", gbps,
                        "avgparms", "copy_", unit="GB/s", scale=1.0, target=">= 0.8", check=at_least(0.8)))
    return rows


def cuda_ipc(ctx: Context) -> list[Row | Skip]:
    """weightavg.torch push and fetch of 256 MB of CUDA tensors (64 MB with --quick) with
    Client(shm=True), where they move device to device through the client's registered CUDA buffer,
    against the same calls through the host and the gRPC stream, and against torch's device-to-device
    clone of the same tensors in this process."""
    from weightavg.torch import fetch, push

    c = ctx.client
    if not torch.cuda.is_available() or not c.info()["device"].startswith("cuda"):
        return [Skip("CUDA IPC", "needs CUDA on the server and in this process")]
    count, width = 4 if ctx.quick else 16, 2048
    nbytes = count * width * width * 4
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {f"w{i}": torch.randn(width, width, device="cuda", generator=g) for i in range(count)}
    names = list(state)

    def check(values: dict[str, torch.Tensor]) -> None:
        assert sum(v.numel() * v.element_size() for v in values.values()) == nbytes and values[names[0]].is_cuda

    def clone() -> None:
        check({k: v.clone() for k, v in state.items()})
        torch.cuda.synchronize()

    with Client(ctx.address, timeout=600, shm=True) as fast:
        warm = push(fast, state)  # registers the CUDA buffer and grows it to this size
        fetch(fast, warm, "cuda", names=names)
        if fast._cuda is None:
            return [Skip("CUDA IPC", "the server refused the CUDA buffer (start it with --allow-shm on this host)")]
        times = interleaved(
            {
                "ipc push": lambda: fast.free(push(fast, state)),
                "stream push": lambda: c.free(push(c, state)),
                "ipc fetch": lambda: check(fetch(fast, warm, "cuda")),
                "stream fetch": lambda: check(fetch(c, warm, "cuda")),
                "clone": clone,
            },
            ctx.reps(7, 2),
        )
        fast.free(warm)
    gbps = {k: [nbytes / t / GB for t in v] for k, v in times.items()}
    mb = nbytes >> 20
    rows: list[Row | Skip] = []
    for way in ("push", "fetch"):
        measured = f"{way} {mb} MB of CUDA tensors, Client(shm=True)"
        rows += [
            row("CUDA IPC (info)", measured, f"{way} through the host and the gRPC stream", gbps,
                f"ipc {way}", f"stream {way}", unit="GB/s", scale=1.0),
            row("CUDA IPC (info)", measured, "clone() of the same tensors, in process", gbps,
                f"ipc {way}", "clone", unit="GB/s", scale=1.0),
        ]
    return rows


# -- averaging across models --------------------------------------------------------------------------


def _server_dicts(c: Client, count: int, tensors: int, width: int) -> list[Handle]:
    """`count` dictionaries of `tensors` width x width float32 entries each, made on the server
    (copies of freshly initialised modules), so nothing large crosses the wire."""
    made = []
    for _ in range(count):
        m = c.module(linears(tensors, width))
        made.append(c.copyparms(m))
        c.free(m)
    return made


def _local_dicts(count: int, tensors: int, width: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [[torch.empty(width, width).uniform_(-0.05, 0.05, generator=g) for _ in range(tensors)] for _ in range(count)]


def average_many(ctx: Context) -> list[Row | Skip]:
    """average of 8 dictionaries of 25.6M float32 parameters (160 tensors) on the server, against the
    same weighted sums in process (8 x 102 MB read and 102 MB written per call)."""
    c, count, tensors, width = ctx.client, 8, 160, 400
    weights = [float(w) for w in range(1, count + 1)]
    where = local_device(ctx, "average, 8 models")
    if isinstance(where, Skip):
        return [where]
    remote = _server_dicts(c, count, tensors, width)
    into = _server_dicts(c, 1, tensors, width)[0]
    local = [[t.to(where.device) for t in d] for d in _local_dicts(count, tensors, width)]
    out = [torch.empty(width, width, device=where.device) for _ in range(tensors)]
    total = sum(weights)

    def loop_into() -> None:  # what the server's kernel does: per tensor, the first term, add the rest, divide
        for i, acc in enumerate(out):
            torch.mul(local[0][i], weights[0], out=acc)
            for d, w in zip(local[1:], weights[1:]):
                acc.add_(d[i], alpha=w)
            acc.div_(total)

    def loop_new() -> list[torch.Tensor]:
        made = []
        for i in range(tensors):
            acc = local[0][i] * weights[0]
            for d, w in zip(local[1:], weights[1:]):
                acc.add_(d[i], alpha=w)
            made.append(acc.div_(total))
        return made

    def average_new() -> None:
        c.free(c.average(remote, weights=weights))

    times = interleaved(
        {"into": where.served(c, lambda: c.average(remote, weights=weights, into=into)), "loop": where.here(loop_into),
         "new": where.served(c, average_new), "loop_new": where.here(loop_new)},
        ctx.reps(10, 3),
    )
    c.free(*remote, into, *([where.marker] if where.marker is not None else []))
    return [
        row("average, 8 models", "average(8 x 25.6M fp32, into=d)", "same sums in-process, in place", times,
            "into", "loop", target="<= 1.1x", check=at_most(1.1)),
        row("average, 8 models (info)", "average(8 x 25.6M fp32), new dictionary (and free)",
            "same sums in-process, new tensors", times, "new", "loop_new"),
    ]


def uploads(ctx: Context) -> list[Row | Skip]:
    """Averages and merges of uploaded dictionaries (a tensor per entry: not flat, unlike copyparms'
    copies), against the same calls over flat copies on the same server: what the native kernels
    taking every pair or entry in one call buys the usual flow, where workers upload their weights.
    160 x 400 x 400 float32; 8 uploads for the merge (about 820 MB over the stream first)."""
    c, count, tensors, width = ctx.client, 8, 160, 400
    m = c.module(linears(tensors, width))
    flat_copy = c.copyparms(m)
    arrays = c.dict(flat_copy)
    uploaded = c.dict(arrays)
    avg = c.copyparms(m)
    flats = _server_dicts(c, count, tensors, width)
    ups = [c.dict(arrays) for _ in range(count)]
    into_flat, into_up = _server_dicts(c, 2, tensors, width)
    times = interleaved(
        {
            "avg uploaded": lambda: c.avgparms(uploaded, avg),
            "avg flat": lambda: c.avgparms(flat_copy, avg),
            "merge uploaded": lambda: c.average(ups, into=into_up),
            "merge flat": lambda: c.average(flats, into=into_flat),
        },
        ctx.reps(10, 3),
    )
    c.free(m, flat_copy, uploaded, avg, *flats, *ups, into_flat, into_up)
    return [
        row("uploads (info)", "avgparms from an uploaded dictionary, 160 x 400 x 400", "from a flat copy (copyparms)",
            times, "avg uploaded", "avg flat"),
        row("uploads (info)", "average(8 uploaded dictionaries, into=d)", "average(8 flat copies, into=d)", times,
            "merge uploaded", "merge flat"),
    ]


def _ties_in_process(base: list[torch.Tensor], models: list[list[torch.Tensor]], density: float) -> list[torch.Tensor]:
    """TIES as its formula reads, per tensor with the deltas stacked: top-k trim (kthvalue threshold),
    elected sign of the summed deltas, mean of the agreeing ones over the weights that agree."""
    merged = []
    for i, b in enumerate(base):
        deltas = torch.stack([m[i] - b for m in models])
        n = b.numel()
        k = int(density * n)
        flat = deltas.abs().view(len(models), -1)
        threshold = flat.kthvalue(n - k + 1, dim=1).values.view(-1, 1, 1)
        deltas = torch.where(deltas.abs() >= threshold, deltas, 0.0)
        sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(deltas) == sign
        mixed = (deltas * agree).sum(0)
        divisor = agree.sum(0).float()
        merged.append(b + mixed / divisor.clamp(min=1))
    return merged


def merge_ties(ctx: Context) -> list[Row | Skip]:
    """merge("ties") of 3 models against a base, 25.6M float32 parameters each, on the server, against
    the same formula in process with stacked deltas."""
    c, count, tensors, width, density = ctx.client, 3, 160, 400, 0.2
    base, *models = _server_dicts(c, count + 1, tensors, width)
    local_base, *local_models = _local_dicts(count + 1, tensors, width)

    def ties() -> None:
        c.free(c.merge("ties", models, base=base, density=density))

    times = interleaved(
        {"ties": ties, "local": lambda: _ties_in_process(local_base, local_models, density)}, ctx.reps(5, 2)
    )
    c.free(base, *models)
    return [
        row("merge ties, 3 models", "merge('ties', 3 x 25.6M fp32, density .2)", "same formula in-process (stacked)",
            times, "ties", "local", note="no target set; memory beyond the result: 4 float32 tensors of one entry"),
    ]


def _stock_in_process(base: list[torch.Tensor], models: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Model Stock as mergekit's `model_stock` reads, per tensor with the offsets stacked: mean pairwise
    cosine of the offsets, t = N cos / (1 + (N - 1) cos), t * mean + (1 - t) * base."""
    merged = []
    for i, b in enumerate(base):
        offsets = [m[i].reshape(-1) - b.reshape(-1) for m in models]
        cosines = [torch.dot(x, y) / (x.norm() * y.norm()).clamp(min=1e-6)
                   for j, x in enumerate(offsets) for y in offsets[j + 1:]]
        cos = torch.stack(cosines).mean().clamp(-1, 1)
        n = len(models)
        t = n * cos / (1 + (n - 1) * cos)
        merged.append(t * (sum(m[i] for m in models) / n) + (1 - t) * b)
    return merged


def _breadcrumbs_in_process(
    base: list[torch.Tensor], models: list[list[torch.Tensor]], density: float, gamma: float
) -> list[torch.Tensor]:
    """Breadcrumbs as mergekit's `magnitude_outliers` reads (a sort of |delta| per model and tensor,
    the band of ranks kept), the kept deltas summed onto the base."""
    merged = []
    for i, b in enumerate(base):
        acc = b.clone()
        for m in models:
            delta = m[i] - b
            n = delta.numel()
            target, top = int(density * n), int(gamma * n)
            bottom = max(0, n - target - top)
            mask = torch.zeros(n)
            mask[torch.sort(delta.abs().reshape(-1)).indices[bottom:bottom + target]] = 1
            acc += delta * mask.view(delta.shape)
        merged.append(acc)
    return merged


def _multislerp_in_process(models: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """multislerp as mergekit's reads (equal weights): stacked unit vectors, their mean direction, the
    tangent vectors there and the exponential map back, times the mean norm."""
    merged = []
    for i in range(len(models[0])):
        flat = torch.stack([m[i].reshape(-1) for m in models])
        norms = flat.norm(dim=-1, keepdim=True)
        units = flat / (norms + 1e-8)
        mean = units.mean(0)
        mean = mean / mean.norm()
        tangent = (units - (units * mean).sum(-1, keepdim=True) * mean).mean(0)
        size = tangent.norm() + 1e-8
        merged.append(((mean * torch.cos(size) + tangent * (torch.sin(size) / size)) * norms.mean()).view(models[0][i].shape))
    return merged


def _karcher_in_process(models: list[list[torch.Tensor]], max_iter: int = 10, tol: float = 1e-5) -> list[torch.Tensor]:
    """The Karcher mean as mergekit's `karcher_merge_tensors` reads (equal weights): unit tensors,
    their normalised mean, then Riemannian steps along the weighted log maps, times the mean norm."""
    merged = []
    n = len(models)
    for i in range(len(models[0])):
        norms = [m[i].norm() for m in models]
        units = [m[i] / norm for m, norm in zip(models, norms)]
        mean = sum(units) / n
        assert isinstance(mean, torch.Tensor)
        mean = mean / mean.norm()
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            for u in units:
                dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                tangent += (theta / torch.sin(theta)) * (u - dot * mean) / n
            size = tangent.norm()
            if size.item() < tol:
                break
            mean = torch.cos(size) * mean + torch.sin(size) * (tangent / size)
            mean = mean / mean.norm()
        merged.append(sum(norms) / n * mean)
    return merged


def _sce_in_process(base: list[torch.Tensor], models: list[list[torch.Tensor]], topk: float) -> list[torch.Tensor]:
    """SCE as mergekit's `sce_merge` reads: the stacked deltas, the top-variance mask, mean-square
    weights, the sign election, the agreeing deltas' weighted mean."""
    merged = []
    for i, b in enumerate(base):
        tv = torch.stack([m[i] - b for m in models])
        var = tv.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * topk)
        mask = torch.zeros_like(var)
        mask.view(-1)[torch.topk(var.abs().view(-1), k).indices] = 1
        tv = tv * mask
        weights = tv.square().reshape(len(models), -1).mean(dim=1)
        weights = (weights / weights.sum()).view(-1, *([1] * b.dim()))
        majority = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
        agree = (tv.sign() == majority) * weights
        merged.append(b + (tv * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1e-6))
    return merged


def _ram_in_process(base: list[torch.Tensor], models: list[list[torch.Tensor]], epsilon: float) -> list[torch.Tensor]:
    """RAM as mergekit's `ram_merge` reads: stacked deltas, the counts of those above epsilon, shared
    ones averaged and unique ones kept."""
    merged = []
    for i, b in enumerate(base):
        tv = torch.stack([m[i] - b for m in models]).view(len(models), -1)
        counted = tv.abs() > epsilon
        counts = counted.sum(dim=0, keepdim=True)
        z = tv * counted
        merged.append(b + (z * (counts == 1) + z * (counts > 1) / counts.clamp(min=1)).sum(dim=0).view(b.shape))
    return merged


def _arcee_fusion_in_process(base: list[torch.Tensor], model: list[torch.Tensor]) -> list[torch.Tensor]:
    """Arcee Fusion as mergekit's reads: importance |x - b| times the rows' KL divergence of the
    softmaxes, the quartiles by a sort, the outlying changes kept."""
    merged = []
    for b, x in zip(base, model):
        p = torch.softmax(x, dim=-1) + 1e-8
        q = torch.softmax(b, dim=-1) + 1e-8
        importance = (x - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        ordered = torch.sort(importance.reshape(-1)).values
        q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
        merged.append(b + (x - b) * (importance >= median + 1.5 * (q3 - q1)))
    return merged


def merge_methods(ctx: Context) -> list[Row | Skip]:
    """model_stock, breadcrumbs, multislerp, karcher, sce, ram and arcee_fusion of 3 models (one for
    arcee_fusion; 25.6M float32 parameters each, 160 tensors) on the server, each against its formula
    in process as mergekit writes it (stacked tensors)."""
    c, count, tensors, width = ctx.client, 3, 160, 400
    base, *models = _server_dicts(c, count + 1, tensors, width)
    local_base, *local_models = _local_dicts(count + 1, tensors, width)
    calls = {
        "model_stock": lambda: c.free(c.merge("model_stock", models, base=base)),
        "model_stock local": lambda: _stock_in_process(local_base, local_models),
        "breadcrumbs": lambda: c.free(c.merge("breadcrumbs", models, base=base, density=0.5, gamma=0.05, lam=1.0)),
        "breadcrumbs local": lambda: _breadcrumbs_in_process(local_base, local_models, 0.5, 0.05),
        "multislerp": lambda: c.free(c.merge("multislerp", models)),
        "multislerp local": lambda: _multislerp_in_process(local_models),
        "karcher": lambda: c.free(c.merge("karcher", models)),
        "karcher local": lambda: _karcher_in_process(local_models),
        "sce": lambda: c.free(c.merge("sce", models, base=base, select_topk=0.5)),
        "sce local": lambda: _sce_in_process(local_base, local_models, 0.5),
        "ram": lambda: c.free(c.merge("ram", models, base=base, epsilon=0.05)),
        "ram local": lambda: _ram_in_process(local_base, local_models, 0.05),
        "arcee_fusion": lambda: c.free(c.merge("arcee_fusion", models[:1], base=base)),
        "arcee_fusion local": lambda: _arcee_fusion_in_process(local_base, local_models[0]),
    }
    times = interleaved(calls, ctx.reps(3, 1))
    c.free(base, *models)
    note = "no target set; the server holds one entry's scratch at a time, the formula stacks the models"
    formula, sorted_, topk = "mergekit's formula in-process", "mergekit's formula in-process (a sort per tensor)", \
        "mergekit's formula in-process (a topk per tensor)"
    measured = [  # (the call, what it merges, its baseline)
        ("model_stock", "3 x 25.6M fp32", formula), ("breadcrumbs", "3 x 25.6M fp32, density .5, gamma .05", sorted_),
        ("multislerp", "3 x 25.6M fp32", formula), ("karcher", "3 x 25.6M fp32", formula),
        ("sce", "3 x 25.6M fp32, select_topk .5", topk), ("ram", "3 x 25.6M fp32, epsilon .05", formula),
        ("arcee_fusion", "25.6M fp32", sorted_),
    ]
    return [row(f"merge methods, {'1 model' if method == 'arcee_fusion' else '3 models'}", f"merge('{method}', {what})",
                baseline, times, method, f"{method} local", note=note) for method, what, baseline in measured]


# -- checkpoint files: weightavg merge against mergekit-yaml ------------------------------------------


LLAMA: dict[str, object] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
         "num_hidden_layers": 4, "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 4096,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float32"}
"""A small Llama (34.6M float32 parameters, 138 MB a checkpoint) whose tensors mergekit plans by name."""


def _llama_checkpoints(root: Path, count: int, layers: int) -> list[Path]:
    """`count` Llama checkpoint directories (config.json and model.safetensors of random float32
    tensors, each model the first plus small offsets), written with weightavg.checkpoints."""
    from weightavg import checkpoints

    h, f, v = (int(str(LLAMA[k])) for k in ("hidden_size", "intermediate_size", "vocab_size"))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        for k in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{k}_proj.weight"] = (h, h)
        shapes |= {f"model.layers.{i}.mlp.gate_proj.weight": (f, h), f"model.layers.{i}.mlp.up_proj.weight": (f, h),
                   f"model.layers.{i}.mlp.down_proj.weight": (h, f), f"model.layers.{i}.input_layernorm.weight": (h,),
                   f"model.layers.{i}.post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    g = np.random.default_rng(0)
    first = {name: g.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    paths = []
    for i in range(count):
        path = root / f"m{i}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**LLAMA, "num_hidden_layers": layers}))
        tensors = first if i == 0 else {n: a + np.float32(0.05) * g.standard_normal(a.shape, dtype=np.float32)
                                        for n, a in first.items()}
        checkpoints.write(path / "model.safetensors", tensors, {"format": "pt"})
        paths.append(path)
    return paths


def _tokenizer(path: Path, added: Sequence[str]) -> None:
    """A fast BPE tokenizer over the Llama's vocabulary (`LLAMA`'s vocab_size plain tokens) with
    `added` special tokens after them, in `path`; the checkpoint's embeddings and head grown by a row
    each (random) and config.json's vocab_size with them: a fine-tune that added chat tokens."""
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from weightavg import checkpoints

    v = int(str(LLAMA["vocab_size"]))
    bpe = Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(v)}, merges=[]))
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(path))  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    if added:
        tensors = {k: np.array(a) for k, a in checkpoints.read(path / "model.safetensors").items()}
        g = np.random.default_rng(len(added))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = np.concatenate([tensors[name], g.standard_normal((len(added), tensors[name].shape[1]),
                                                                             dtype=np.float32)])
        checkpoints.write(path / "model.safetensors", tensors, {"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "vocab_size": v + len(added)}))


def checkpoint_merge(ctx: Context) -> list[Row | Skip]:
    """`weightavg merge` of three Llama checkpoints (138 MB of float32 each; 2 layers and 69 MB with
    --quick) from their files to the merged file, against mergekit's own `run_merge` (what
    mergekit-yaml runs) of the same config in this process, on the CPU: linear and TIES, over the
    stream, through shared memory, and in batches of 32 MB."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        return [Skip("checkpoint merge", "mergekit is not installed (pip install 'weightavg[dev]')")]
    from weightavg import mergekit as configs

    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        base, a, b = _llama_checkpoints(root, 3, 2 if ctx.quick else 4)
        mb = round((a / "model.safetensors").stat().st_size / 1e6)
        chat = root / "chat"
        shutil.copytree(b, chat)
        for path, added in ((base, []), (a, []), (chat, ["<|im_start|>", "<|im_end|>"])):
            _tokenizer(path, added)
        linear = {"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": str(a), "parameters": {"weight": 0.6}}, {"model": str(b), "parameters": {"weight": 0.4}}]}
        ties = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                "parameters": {"density": 0.5, "weight": 0.5}, "models": [{"model": str(a)}, {"model": str(b)}]}
        union = {**ties, "tokenizer_source": "union", "models": [{"model": str(a)}, {"model": str(chat)}]}
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False)
        out = root / "out"

        with Client(ctx.address, timeout=600, shm=True) as fast:
            calls = {
                "linear": lambda: configs.merge_checkpoints(ctx.client, linear, out),
                "linear shm": lambda: configs.merge_checkpoints(fast, linear, out),
                "linear mergekit": lambda: run_merge(MergeConfiguration.model_validate(linear), str(out), options=options),
                "ties": lambda: configs.merge_checkpoints(ctx.client, ties, out),
                "ties one batch": lambda: configs.merge_checkpoints(ctx.client, ties, out, batch_bytes=1 << 30),
                "ties shm": lambda: configs.merge_checkpoints(fast, ties, out),
                "ties batches": lambda: configs.merge_checkpoints(ctx.client, ties, out, batch_bytes=32 << 20),
                "ties mergekit": lambda: run_merge(MergeConfiguration.model_validate(ties), str(out), options=options),
                "union": lambda: configs.merge_checkpoints(ctx.client, union, out),
                "union mergekit": lambda: run_merge(MergeConfiguration.model_validate(union), str(out), options=options),
            }
            times = interleaved(calls, ctx.reps(3, 1))
            shm = fast._shm is not None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    what = f"3 x {mb} MB fp32 Llama checkpoints, files to file"
    rows: list[Row | Skip] = [
        row("checkpoint merge", f"weightavg merge linear, {what}", "mergekit run_merge (mergekit-yaml) in process, CPU",
            times, "linear", "linear mergekit", note="no target set"),
        row("checkpoint merge", f"weightavg merge ties density .5, {what}", "mergekit run_merge in process, CPU",
            times, "ties", "ties mergekit", note="no target set"),
        row("checkpoint merge (info)", "weightavg merge ties, batches of 32 MB", "one batch (batch_bytes 1 GiB)", times,
            "ties batches", "ties one batch"),
        row("checkpoint merge (info)", "weightavg merge ties, the default batches (256 MiB)", "one batch (1 GiB)", times,
            "ties", "ties one batch"),
        row("checkpoint merge (info)", "weightavg merge ties, tokenizer_source union (a model +2 added tokens)",
            "mergekit run_merge, the same config", times, "union", "union mergekit"),
        row("checkpoint merge (info)", "weightavg merge ties, tokenizer_source union", "the same models' ties, no "
            "tokenizer (one vocabulary)", times, "union", "ties"),
    ]
    if shm:
        rows += [
            row("checkpoint merge (info)", "weightavg merge linear --shm", "mergekit run_merge in process, CPU", times,
                "linear shm", "linear mergekit"),
            row("checkpoint merge (info)", "weightavg merge ties --shm", "over the gRPC stream", times,
                "ties shm", "ties"),
        ]
    return rows


# -- RemoteAveragedModel in a training loop ----------------------------------------------------------


def averaged_training(ctx: Context) -> list[Row | Skip]:
    """Training steps of a 6.3M-parameter MLP (batches of 256, SGD) with an EMA on the server updated
    every step, `RemoteAveragedModel` synchronous against asynchronous, and each against no average:
    what the update costs the loop. The loop trains on one torch thread, as a GPU job leaves the host's
    cores free (the sending thread needs one)."""
    from weightavg.torch import RemoteAveragedModel

    steps = 3 if ctx.quick else 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                  torch.nn.ReLU(), torch.nn.Linear(2048, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        loss_fn = torch.nn.CrossEntropyLoss()
        x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
        averages = {mode: RemoteAveragedModel(ctx.client, net, "ema", decay=0.99, asynchronous=mode == "async")
                    for mode in ("sync", "async")}

        def loop(average: RemoteAveragedModel | None) -> Callable[[], None]:
            def run() -> None:
                for _ in range(steps):
                    opt.zero_grad()
                    loss_fn(net(x), y).backward()
                    opt.step()
                    if average is not None:
                        average.update_parameters(net)
                if average is not None:
                    average.wait()
            return run

        times = interleaved({"none": loop(None), **{m: loop(a) for m, a in averages.items()}}, ctx.reps(5, 2))
        for a in averages.values():
            a.free()
    finally:
        torch.set_num_threads(threads)
    times = {k: [t / steps for t in v] for k, v in times.items()}
    what = "training step + EMA update, 6.3M params, 1 torch thread"
    return [
        row("averaged training (info)", f"{what}, asynchronous=True", f"{what}, synchronous", times, "async", "sync"),
        row("averaged training (info)", f"{what}, asynchronous=True", "training step, no average", times, "async", "none"),
        row("averaged training (info)", f"{what}, synchronous", "training step, no average", times, "sync", "none"),
    ]


# -- allreduce across ranks ---------------------------------------------------------------------------


class _BareScript:
    """bench/_allreduce.py under torchrun (two ranks; gloo, or NCCL with a GPU each): `run(way)` averages once."""

    def __init__(self, count: int, width: int, device: str, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": str(threads)}  # as the cluster's ranks have
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "bench._allreduce", str(count), str(width), device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        try:
            self._expect("ready")
        except BaseException:
            self.stop()
            raise

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"bench/_allreduce.py said {line!r}, not {word!r}; run it under torchrun to see why")

    def run(self, way: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(way + "\n")
        self.proc.stdin.flush()
        self._expect("done")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def allreduce(ctx: Context) -> list[Row | Skip]:
    """allreduce(op="mean") of a replicated module of 100 bias-free 500x500 linears (25M float32, 100 MB)
    on a 2-rank cluster under torchrun, against a bare torch.distributed script (two ranks, the same backend)
    averaging the same bytes: as one flat tensor (the target: one collective, no copies), and, as information, the
    same 100 tensors in place one collective each, in DDP's 25 MB buckets, and with torch's
    model_averaging.average_parameters (bench/_allreduce.py)."""
    count, width = 100, 500
    device = "cuda" if ctx.device.startswith("cuda") else "cpu"
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))  # --threads sets it; the ranks share the cores
    nbytes = count * width * width * 4
    ways = ("flat", "tensors", "buckets", "average_parameters")
    with LocalCluster(2, device=device, threads=threads) as cluster, Client(cluster.address, timeout=600) as c:
        m = c.module(linears(count, width), replicate=True)
        marker = c.tensor(np.zeros(1, np.float32)) if device == "cuda" else None

        def reduce() -> None:
            c.allreduce(m, op="mean")
            if marker is not None:  # NCCL's collectives may still run: fetching from rank 0's stream waits for them
                c.tensor(marker)

        script = _BareScript(count, width, device, threads)
        try:
            calls: dict[str, Callable[[], Any]] = {"allreduce": reduce}
            calls.update({way: functools.partial(script.run, way) for way in ways})
            times = interleaved(calls, ctx.reps(15, 3))  # cheap per repeat, and noisy on a shared machine
        finally:
            script.stop()
        c.free(m, *([marker] if marker is not None else []))
    gbps = {k: [nbytes / t / GB for t in v] for k, v in times.items()}
    # The server's rule (cluster.rank_device): NCCL when each rank has a GPU of its own, else gloo (on
    # CPUs, or on one GPU the ranks share: NCCL refuses that); the bare script follows the same rule.
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    where = "2 ranks, " + ("NCCL, a GPU each" if gpus >= 2 else "gloo, one GPU" if gpus else "gloo, CPU")
    measured = f"allreduce mean, {nbytes // 10**6} MB fp32 / {count} tensors, {where}"
    return [
        row("allreduce", measured, "bare torch.distributed script: one flat 100 MB tensor, all_reduce + div_", gbps,
            "allreduce", "flat", unit="GB/s", scale=1.0, target=">= 0.9x", check=at_least(0.9)),
        row("allreduce (info)", "allreduce mean", "bare script: the same 100 tensors in place, one all_reduce each",
            gbps, "allreduce", "tensors", unit="GB/s", scale=1.0),
        row("allreduce (info)", "allreduce mean", "bare script: the same tensors in DDP's 25 MB buckets", gbps,
            "allreduce", "buckets", unit="GB/s", scale=1.0),
        row("allreduce (info)", "allreduce mean", "bare script: torch's average_parameters (one flat copy)", gbps,
            "allreduce", "average_parameters", unit="GB/s", scale=1.0),
    ]


CASES: dict[str, Callable[[Context], list[Row | Skip]]] = {
    "average": average_large,
    "ema": ema_large,
    "kernels": lerp_kernels,
    "small": small_call,
    "sessions": many_sessions,
    "transfer": transfer,
    "smalltensors": small_tensors,
    "shm": shared_memory,
    "training": training,
    "batchnorm": batchnorm,
    "clients": many_clients,
    "gpu": gpu_average,
    "cudaipc": cuda_ipc,
    "average8": average_many,
    "uploads": uploads,
    "ties": merge_ties,
    "merges": merge_methods,
    "checkpoints": checkpoint_merge,
    "asyncema": averaged_training,
    "allreduce": allreduce,
    "sweep": sweep,
}


def raw_client(address: str) -> tuple[grpc.Channel, RawClient]:
    from weightavg._client import DEFAULT_MAX_MESSAGE_BYTES

    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ],
    )
    return channel, RawClient(channel)
