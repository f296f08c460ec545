"""Fixtures: a real server on a free loopback port, a client to it, a snapshot of every handle, and a
real 2-rank CPU cluster under torchrun."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import settings as hypothesis_settings

from weightavg import Client
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.app import Runtime, create_runtime, create_server, set_serving
from weightavg_server.ops.config import ServerConfig
from weightavg_server.ops.launch import START_SECONDS, LocalCluster
from weightavg_server.domain.tensors import tensors_of
from weightavg_server.store.registry import Kind, Registry


# Hypothesis draws the same examples on every run: the suite blocks on any failure, so a failure must
# come from a change, not from the draw. No example is timed (hypothesis's default 200 ms deadline is
# a timed assertion that a loaded machine fails). WEIGHTAVG_HYPOTHESIS=explore draws fresh examples on
# each run, for a search by hand (docs/robust.md).
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None, deadline=None)
hypothesis_settings.register_profile("explore", derandomize=False, database=None, deadline=None)
hypothesis_settings.load_profile(os.environ.get("WEIGHTAVG_HYPOTHESIS", "repeatable"))


@pytest.fixture(autouse=True)
def _seeded_torch(request: pytest.FixtureRequest) -> None:
    """Each test starts torch's generator from a seed of its own id. Unseeded draws (random data, a
    module's initial weights, also those the in-process servers make) came from one generator that
    every earlier test in the process had drawn from: a test's data changed with the tests run
    before it, so a tolerance on them could fail after an unrelated test was added or left out."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the block: bound, never listening. (A port bound,
    closed and then used was free for anything on the machine to take before the test connected.)"""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@dataclass
class LiveServer:
    """A started server: its address and, for assertions only, its in-process registry."""

    address: str
    registry: Registry


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    registry = Registry()
    server, port, health_servicer = create_server(
        ServerConfig(host="127.0.0.1", port=0, device="cpu"), registry=registry
    )
    server.start()
    set_serving(health_servicer, True)
    yield LiveServer(f"127.0.0.1:{port}", registry)
    server.stop(grace=None)


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[Client]:
    """A client whose handles are all freed after the test, so tests do not see each other's objects."""
    with Client(live_server.address, timeout=120) as c:
        yield c
        c.purge()


def module_of(registry: Registry, handle: str) -> torch.nn.Module:
    """The module a module, model or optimizer handle stands for (for assertions only)."""
    obj = registry.get(handle).obj
    return obj if isinstance(obj, torch.nn.Module) else obj.module


def snapshot(registry: Registry) -> dict[str, Any]:
    """Everything a failed call must not change: each handle's tensors (values, dtypes, shapes, keys)
    and each module's batchnorm momenta and train flags."""
    state: dict[str, Any] = {}
    for handle_id, entry in registry.items():
        tensors = [t.detach().clone() for t in tensors_of(entry.obj)]
        keys = list(entry.obj.entries) if entry.kind is Kind.DICTIONARY else None
        module = entry.obj if entry.kind is Kind.MODULE else getattr(entry.obj, "module", None)
        flags = (
            [(n, getattr(m, "momentum", None), m.training) for n, m in module.named_modules()]
            if module is not None else None
        )
        state[handle_id] = (tensors, keys, flags)
    return state


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Same handles, same keys, same flags, bit-identical tensors."""
    assert before.keys() == after.keys()
    for handle_id, (tensors, keys, flags) in before.items():
        tensors2, keys2, flags2 = after[handle_id]
        assert keys == keys2, handle_id
        assert flags == flags2, handle_id
        assert len(tensors) == len(tensors2), handle_id
        for a, b in zip(tensors, tensors2):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), handle_id


@pytest.fixture
def unchanged(live_server: LiveServer) -> Iterator[Any]:
    """Use as `with unchanged(): <failing call>` to assert the call changed no handle."""
    import contextlib

    @contextlib.contextmanager
    def check() -> Iterator[None]:
        before = snapshot(live_server.registry)
        yield
        assert_unchanged(before, snapshot(live_server.registry))

    return check


@pytest.fixture
def start_server() -> Iterator[Callable[..., LiveServer]]:
    """Start extra servers on free ports with ServerConfig fields as keyword arguments (CPU, loopback);
    each stops after the test. Use it for caps and limits the shared server does not have."""
    started = []

    def start(**config: Any) -> LiveServer:
        registry = Registry()
        server, port, health_servicer = create_server(
            ServerConfig(**{"host": "127.0.0.1", "port": 0, "device": "cpu", **config}), registry=registry
        )
        server.start()
        set_serving(health_servicer, True)
        started.append(server)
        return LiveServer(f"127.0.0.1:{port}", registry)

    yield start
    for server in started:
        server.stop(grace=None)


@pytest.fixture
def state_server(tmp_path: Path) -> Iterator[Runtime]:
    """A started server (with its session reaper) that snapshots to a fresh state directory."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "d")))
    runtime.start()
    yield runtime
    runtime.server.stop(None)
    runtime.reaper.stop()


_METRICS_LINE = re.compile(r"weightavg metrics on (http://[\d.]+:\d+/metrics)")


class Cluster(LocalCluster):
    """Two CPU ranks (or `ranks`; gloo on loopback) with short timeouts, their output in tmp; `flags` are serve flags,
    and torchrun's --max-restarts=K. Tests of the cluster (tests/test_cluster.py) and of the examples
    that need one (Local SGD) use it; each start takes about 5-10 s on a small machine."""

    def __init__(self, tmp: Path, *flags: str, device: str = "cpu", ranks: int = 2) -> None:
        super().__init__(
            ranks, log=tmp / f"torchrun-{time.monotonic_ns()}.log", device=device,
            torchrun=[f for f in flags if f.startswith("--max-restarts")],
            serve=["--log-level", "INFO", "--cluster-timeout-seconds", "20", "--grace-seconds", "2",
                   *[f for f in flags if not f.startswith("--max-restarts")]],
        )

    @property
    def out(self) -> Path:
        return self.log

    def metrics_url(self) -> str:
        """Rank 0's metrics URL, for a cluster started with `--metrics-port 0`: rank 0 binds a free port
        itself and prints it after its serving line. (A port picked here, closed and passed on was
        free only until rank 0 bound it seconds later: anything on the machine could take it first.)"""
        deadline = time.monotonic() + START_SECONDS
        while (found := _METRICS_LINE.search(self.log.read_text())) is None:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-4000:]
            time.sleep(0.1)
        return found.group(1)

    def rank_pid(self, rank: int) -> int:
        """The pid of a worker by its RANK, among the children of torchrun."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                return int(entry.name)
        raise AssertionError(f"no process of rank {rank} under torchrun {self.proc.pid}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A started 2-rank cluster, stopped (its processes killed if need be) after the test."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def streamed_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the copies the server makes with streaming stores (`native.stream_bytes`), in
    order; the test is skipped where the native module was not built (copies then use numpy)."""
    from weightavg_server.domain import native

    if native._COPY is None:
        pytest.skip("the native module was not built: copies use numpy")
    sizes: list[int] = []
    copy = native._COPY

    def counted(targets: tuple[int, ...], sources: tuple[int, ...], nbytes: tuple[int, ...], threads: int) -> None:
        sizes.extend(nbytes)
        copy(targets, sources, nbytes, threads)

    monkeypatch.setattr(native, "_COPY", counted)
    return sizes


class StalledUploads:
    """`count` CreateDictionary uploads that send their first message and then wait, each holding one
    of the server's worker threads, until `release()` (also at the end of a `with` block, whatever
    happened): how tests fill a server's workers or a tenant's share of them."""

    def __init__(
        self, stub: pb_grpc.WeightAveragingServiceStub, count: int, metadata: Sequence[tuple[str, str]] = (),
        timeout: float = 60.0,
    ) -> None:
        self._held: list[queue.Queue[None]] = [queue.Queue() for _ in range(count)]
        self.futures = [
            stub.CreateDictionary.future(self._stalled(q), metadata=list(metadata), timeout=timeout) for q in self._held
        ]

    @staticmethod
    def _stalled(release: queue.Queue[None]) -> Iterator[pb.CreateDictionaryRequest]:
        yield pb.CreateDictionaryRequest()
        release.get()

    def release(self) -> None:
        for q in self._held:
            q.put(None)

    def __enter__(self) -> StalledUploads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class HalfOpenCalls:
    """Calls that send their headers and never their request message (each method called as a
    stream whose requests never come), on one channel, with `metadata` (say, a token) or none. They
    end by the server's answer, their 30 s deadline, or `close()`."""

    def __init__(self, address: str, metadata: list[tuple[str, str]] | None = None) -> None:
        self._channel = grpc.insecure_channel(address)
        self._metadata = metadata
        self._release = threading.Event()
        self.calls: list[Any] = []

    def _never(self) -> Iterator[Any]:
        self._release.wait()
        return
        yield  # pragma: no cover - a generator that sends nothing

    def open(self, method: str, n: int) -> list[Any]:
        opened = [
            self._channel.stream_stream(method)(self._never(), metadata=self._metadata, timeout=30) for _ in range(n)
        ]
        self.calls.extend(opened)
        return opened

    def close(self) -> None:
        self._release.set()
        for call in self.calls:
            call.cancel()
        self._channel.close()


_WITH_LIMITS = """
import os, resource, signal, sys
nofile, hard, fsize = int(sys.argv[1]), sys.argv[2] == "hard", int(sys.argv[3])
if nofile >= 0:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile if hard else resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
if fsize >= 0:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an ignored signal stays ignored across exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
os.execv(sys.argv[4], sys.argv[4:])
"""


def with_limits(
    argv: Sequence[str], *, open_files: int | None = None, hard: bool = False, file_bytes: int | None = None
) -> list[str]:
    """`argv` run under a lower soft limit of open files (`hard`: the hard limit too, so the program
    cannot raise it) and/or of a file's size (a write past it fails with EFBIG, as a full disk's with
    ENOSPC, instead of killing the process): a small Python process sets them and execs `argv[0]` (an
    absolute path), so the pid is the program's.

    Why not Popen's preexec_fn: Python runs it between fork and exec, which is unsafe in a process
    with threads (gRPC's, in this suite); under load a server so started now and then never came up
    (its stdout closed at once)."""
    import sys

    return [sys.executable, "-c", _WITH_LIMITS, str(-1 if open_files is None else open_files), "hard" if hard else "soft",
            str(-1 if file_bytes is None else file_bytes), *argv]
