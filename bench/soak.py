"""Soak run: mixed load against a real server subprocess for minutes, watching its resident memory.

    python -m bench.soak [--minutes 10] [--clients 8]

The server runs as `python -m weightavg_server --port 0 --device cpu` so that its resident set
(VmRSS in /proc/PID/status, Linux only) counts the server alone, not this load generator; it
remembers request IDs for 30 s (`--request-id-window`), not its default hour, so that the
exactly-once table is full before the baseline and its designed growth is not taken for a leak. Several
client threads then loop over scenarios that between them make every kind of call: modules (the
reference's batchnorm net among them), copyparms and avgparms loops, dictionary updates and
fetches, batchnorm reset/restore, models trained on small synthetic data, addref/free, sessions
that are closed and sessions left to expire, and calls that must fail with a given code. Every
scenario frees what it creates; at the end no handle may be left.

Reported: RSS at start, after warm-up (the first --warmup fraction of the run), at the end of the
load and once everything is freed; growth after warm-up in percent; calls made per kind; expected
errors per kind; unexpected errors. A JSON report goes to bench/results/soak-<timestamp>.json.
Exit status 1 when growth after warm-up is 5% or more, or on any unexpected error.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import queue
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from weightavg import Client, Handle, NotFoundError, WeightavgError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GROWTH_LIMIT_PERCENT = 5.0
SERVING_LINE = re.compile(r"weightavg serving on (\S+):(\d+)")

BN_NET = [
    "sequential",
    ["linear", "a", 784, 800],
    ["batchnorm1d", "b", 800, 1e-7, 0.1],
    ["relu", "c"],
    ["linear", "d", 800, 10],
]
"""The reference's batchnorm network (784-800, batchnorm, relu, 800-10)."""

SMALL_NETS = [
    ["linear", 64, 10],
    ["sequential", ["linear", "a", 32, 64], ["relu", "r"], ["linear", "b", 64, 8]],
    ["sequential", ["linear", "a", 16, 32], ["batchnorm1d", "b", 32], ["relu", "c"], ["linear", "d", 32, 4]],
]


# -- the server ---------------------------------------------------------------------------------

TRACED_SERVER = """
import ctypes, signal, sys, tracemalloc
from pathlib import Path
out = Path(sys.argv[1])
tracemalloc.start(int(sys.argv[2]))
def dump(*_):
    # Python allocations (numpy's included, torch's tensor storage not), then glibc's arenas on stderr.
    n = len(list(out.glob("trace-*.tracemalloc")))
    tracemalloc.take_snapshot().dump(str(out / f"trace-{n}.tmp"))
    (out / f"trace-{n}.tmp").rename(out / f"trace-{n}.tracemalloc")
    ctypes.CDLL("libc.so.6").malloc_stats()
signal.signal(signal.SIGUSR1, dump)
from weightavg_server.ops.cli import main
main(sys.argv[3:])
"""
"""`python -c` program that serves under tracemalloc and dumps a snapshot on each SIGUSR1."""


class Server:
    """`python -m weightavg_server` as a subprocess: its address, pid and log file."""

    def __init__(
        self, log_path: Path, extra_args: list[str], lease: float, trace_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.trace_dir = trace_dir
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        launch = ["-m", "weightavg_server"] if trace_dir is None else ["-c", TRACED_SERVER, str(trace_dir), "5"]
        command = [
            sys.executable, *launch, "--port", "0", "--device", "cpu",
            "--session-lease-seconds", str(lease), *extra_args,
        ]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, **(env or {})}
        )
        self.pid = self.proc.pid
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01)).decode(errors="replace")
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"server did not start within 120 s; see {log_path}") from None
            if not line:
                self.stop()
                raise RuntimeError(f"server exited (status {self.proc.poll()}) before serving; see {log_path}")
            match = SERVING_LINE.search(line)
            if match:
                self.address = f"{match.group(1)}:{match.group(2)}"
                return

    def _pump(self, lines: queue.Queue[bytes]) -> None:
        # Keep reading stdout so the server can never block on a full pipe.
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            lines.put(line)
        lines.put(b"")

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (kB) and thread count from /proc/PID/status."""
        values: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
                elif key == "Threads":
                    values[key] = int(rest)
        return values

    def trace(self) -> Path:
        """Have a traced server dump a tracemalloc snapshot; returns its file."""
        assert self.trace_dir is not None
        n = len(list(self.trace_dir.glob("trace-*.tracemalloc")))
        path = self.trace_dir / f"trace-{n}.tracemalloc"
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not path.exists():
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError("the traced server wrote no tracemalloc snapshot")
            time.sleep(0.2)
        return path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (the server drains), then SIGKILL after 30 s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def error_lines(self) -> list[str]:
        """Log lines at ERROR or above, and tracebacks: the server logs every unexpected exception."""
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]


# -- load ---------------------------------------------------------------------------------------


class UnexpectedResult(Exception):
    """A call succeeded, or failed with another code, where the scenario expected something else."""


@dataclass
class Tally:
    """What one client thread did."""

    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    scenarios: collections.Counter[str] = field(default_factory=collections.Counter)
    expected_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: list[dict[str, Any]] = field(default_factory=list)


class Counted:
    """A Client whose method calls are counted by name (train(m, x, y) and train(m, **opts) are both 'train')."""

    def __init__(self, client: Client, calls: collections.Counter[str]) -> None:
        self._client = client
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls[name] += 1
            return attr(*args, **kwargs)

        return call


class Scope:
    """Handles a scenario created and has not freed yet, so a scenario that fails midway frees them."""

    def __init__(self, c: Counted) -> None:
        self.c = c
        self.live: list[Handle] = []

    def __call__(self, handle: Any) -> Any:
        self.live.append(handle)
        return handle

    def free(self, *handles: Handle) -> None:
        self.c.free(*handles)
        self.gone(*handles)

    def gone(self, *handles: Handle) -> None:
        """Handles freed by the server as part of a call (model(q, loss, opt) frees its three)."""
        for h in handles:
            self.live.remove(h)

    def cleanup(self) -> None:
        for h in self.live:
            try:
                self.c.free(h)
            except NotFoundError:
                pass
        self.live.clear()


@dataclass
class Shared:
    """State shared by every client thread."""

    address: str
    lease: float
    timeout: float
    expiring: list[tuple[float, str]] = field(default_factory=list)
    """(when it must have expired, session id) of sessions left to run out."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def due_sessions(self, now: float) -> list[str]:
        with self.lock:
            due = [sid for when, sid in self.expiring if when <= now]
            self.expiring = [(when, sid) for when, sid in self.expiring if when > now]
        return due


class Worker:
    """One client thread: a Client of its own and a loop over weighted scenarios until the deadline."""

    def __init__(self, index: int, shared: Shared, seed: int) -> None:
        self.shared = shared
        self.rng = random.Random(seed * 1000 + index)
        self.np = np.random.default_rng(seed * 1000 + index)
        self.tally = Tally()
        self.client = Client(shared.address, timeout=shared.timeout)
        self.c = Counted(self.client, self.tally.calls)
        self.scenarios: list[tuple[Callable[[Scope], None], int]] = [
            (self.copy_and_average, 3),
            (self.dictionaries, 3),
            (self.batchnorm_reset_restore, 2),
            (self.training, 2),
            (self.addref_free, 2),
            (self.closed_session, 1),
            (self.expiring_session, 1),
            (self.expected_errors, 2),
        ]

    def run(self, deadline: float) -> None:
        functions = [f for f, _ in self.scenarios]
        weights = [w for _, w in self.scenarios]
        try:
            while time.monotonic() < deadline:
                for sid in self.shared.due_sessions(time.monotonic()):
                    self.attempt("expired_session_check", functools.partial(self.check_expired, sid))
                scenario = self.rng.choices(functions, weights)[0]
                self.attempt(scenario.__name__, scenario)
        finally:
            self.client.close()

    def attempt(self, name: str, scenario: Callable[[Scope], None]) -> None:
        scope = Scope(self.c)
        self.tally.scenarios[name] += 1
        try:
            scenario(scope)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none stops the run
            self.tally.unexpected.append({
                "scenario": name,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=6),
                "time": time.time(),
            })
            try:
                scope.cleanup()
            except Exception:  # noqa: BLE001 - already reported; the end-of-run handle check will show leftovers
                pass
        if scope.live:
            self.tally.unexpected.append({"scenario": name, "error": f"scenario left {len(scope.live)} handle(s)"})
            scope.cleanup()

    def expect(self, code: str, label: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run a call that must fail with `code`; count it as an expected error of that kind."""
        try:
            result = call(*args, **kwargs)
        except WeightavgError as exc:
            if exc.code != code:
                raise UnexpectedResult(f"{label}: expected {code}, got {exc.code}: {exc.message}") from exc
            self.tally.expected_errors[f"{code} {label}"] += 1
            return
        if isinstance(result, Client):
            result.close()
        raise UnexpectedResult(f"{label}: expected {code}, the call succeeded")

    # -- data -------------------------------------------------------------------------------------

    def data(self, n: int, d: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels from a random linear teacher, so training has something to learn."""
        x = self.np.standard_normal((n, d), dtype=np.float32)
        teacher = self.np.standard_normal((d, classes), dtype=np.float32)
        return x, (x @ teacher).argmax(1).astype(np.int64)

    # -- scenarios --------------------------------------------------------------------------------

    def copy_and_average(self, new: Scope) -> None:
        """The weight-averaging loop: copyparms, change the weights, avgparms n times, copy back."""
        c = self.c
        spec = BN_NET if self.rng.random() < 0.3 else self.rng.choice(SMALL_NETS)
        m = new(c.module(spec))
        names = c.parmnames(m)
        p = new(c.copyparms(m))
        rounds = self.rng.randint(3, 12)
        for i in range(rounds):
            name = self.rng.choice(names)
            shape = c.size(p)[name]
            c.parm(m, name, self.np.standard_normal(shape, dtype=np.float32))
            if c.avgparms(m, p) != i + 2:
                raise UnexpectedResult("avgparms count is off")
        c.copyparms(m, p)
        values = c.dict(p)
        if values[".n"] != rounds + 1:
            raise UnexpectedResult(f"'.n' is {values['.n']}, expected {rounds + 1}")
        if self.rng.random() < 0.5:
            view = new(c.parms(m))
            c.dict(view, names[0])
            new.free(view)
        new.free(m, p)

    def dictionaries(self, new: Scope) -> None:
        """Create, update, fetch and delete entries of dictionaries and tensors of several dtypes."""
        c, g = self.c, self.np
        size = self.rng.choice([16, 256, 4096, 65536])
        items = {
            "f32": g.standard_normal(size, dtype=np.float32),
            "f64": g.standard_normal((4, size // 4)),
            "i64": g.integers(0, 1000, size),
            "mask": g.random(size) < 0.5,
        }
        p = new(c.dict(items))
        for _ in range(self.rng.randint(2, 8)):
            key = self.rng.choice(list(items))
            value = g.standard_normal(size, dtype=np.float32)
            c.dict(p, key, value)
            if not np.array_equal(c.dict(p, key), value):
                raise UnexpectedResult(f"entry {key} came back different")
        c.dict(p, {"extra": g.standard_normal((8, 8)), "scalar": 3.5})
        c.size(p)
        c.dict(p)
        c.delete(p, "extra", "scalar")
        t = new(c.tensor(g.standard_normal((size // 4, 4), dtype=np.float32)))
        c.tensor(t)
        c.size(t)
        for _ in range(3):
            if not c.batch(t, max(1, size // 12)):
                break
        moved = new(c.to(p, dtype="float64"))
        c.dict(moved, "f32")
        new.free(p, t, moved)

    def batchnorm_reset_restore(self, new: Scope) -> None:
        """The reference's batchnorm net: set statistics, reset (momentum None), restore momenta."""
        c = self.c
        q = new(c.module(BN_NET))
        b = new(c.buffers(q, "b"))
        c.dict(b, {"running_mean": 0.5, "running_var": 2.0, "num_batches_tracked": 12000})
        momenta = c.batchnorm(q)
        if momenta != {"b": 0.1}:
            raise UnexpectedResult(f"batchnorm(q) returned {momenta}")
        if c.dict(b, "num_batches_tracked") != 0:
            raise UnexpectedResult("batchnorm(q) did not reset the statistics")
        c.batchnorm(q, momenta)
        c.module(q)
        c.buffernames(q)
        new.free(b, q)

    def training(self, new: Scope) -> None:
        """A model over small synthetic data: train, average over epochs, copy back, recalculate batchnorm."""
        c = self.c
        big = self.rng.random() < 0.4
        spec = BN_NET if big else SMALL_NETS[2]
        d, classes = (784, 10) if big else (16, 4)
        n = self.rng.choice([200, 256, 300])
        q = new(c.module(spec))
        kind = self.rng.choice(["sgd", "adam", "adamw", "rmsprop", "adagrad"])
        opt = new(c.opt("sgd", q, 0.05, 0.9, nesterov=True) if kind == "sgd" else c.opt(kind, q))
        loss = new(c.loss("ce"))
        ref = new(c.addref(q))
        m = new(c.model(ref, loss, opt))
        new.gone(ref, loss, opt)  # model(q, loss, opt) frees the three handles it was given
        x, y = self.data(n, d, classes)
        xt, yt = self.data(100, d, classes)
        c.train(m, batchsize=self.rng.choice([32, 50, 64]), shuffle=True, seed=self.rng.randint(0, 99))
        c.train(m, x, y)
        c.test(m, xt, yt)
        c.test(m, metrics=["loss", "accuracy"])
        c.train(m)
        c.run(m)
        p = new(c.copyparms(m))
        for _ in range(self.rng.randint(1, 3)):
            c.run(m)
            c.avgparms(m, p)
        c.copyparms(m, p)
        c.batchnorm(m)
        c.testrun(m)
        c.evaluate(m, xt[:10])
        c.model(m)
        c.lr(m, c.lr(m) / 2)
        out = new(c.eforward(m))
        c.tensor(out)
        inputs = new(c.input(m))
        while c.batch(m):
            new.free(new(c.nforward(q, inputs)))
        c.restore(m)
        new.free(out, inputs, p, m, q)

    def addref_free(self, new: Scope) -> None:
        """Several handles to one object, freed in random order; the object dies with the last."""
        c = self.c
        m = new(c.module(self.rng.choice(SMALL_NETS)))
        refs = [new(c.addref(m)) for _ in range(self.rng.randint(1, 5))]
        handles = [m, *refs]
        self.rng.shuffle(handles)
        for h in handles[:-1]:
            new.free(h)
        c.size(handles[-1])
        new.free(handles[-1])
        self.expect("NOT_FOUND", "freed handle", c.size, handles[0])

    def closed_session(self, new: Scope) -> None:
        """A session whose handles go away in one CloseSession call."""
        with Client(self.shared.address, timeout=self.shared.timeout, session=True, lease=30) as s:
            self.tally.calls["create_session"] += 1
            c = Counted(s, self.tally.calls)
            m = c.module(self.rng.choice(SMALL_NETS))
            c.copyparms(m)
            c.dict({"w": self.np.standard_normal(1000, dtype=np.float32)})
            c.addref(m)
            c.keepalive()
            if len(c.handles()) != 4:
                raise UnexpectedResult("a session lists other than its own 4 handles")
            if self.rng.random() < 0.5:
                freed = c.close_session()
                if freed != 4:
                    raise UnexpectedResult(f"close_session freed {freed} handles, expected 4")
            # else: leaving the block closes it

    def expiring_session(self, new: Scope) -> None:
        """A session nobody closes: its client goes away and the lease runs out (checked later)."""
        with grpc.insecure_channel(self.shared.address) as channel:
            stub = pb_grpc.WeightAveragingServiceStub(channel)
            sid = stub.CreateSession(
                pb.CreateSessionRequest(lease_seconds=self.shared.lease), timeout=self.shared.timeout
            ).session
        self.tally.calls["create_session"] += 1
        # Joining a session by id: close() then leaves it open, as a client that died would.
        with Client(self.shared.address, timeout=self.shared.timeout, session=sid) as s:
            c = Counted(s, self.tally.calls)
            m = c.module(BN_NET if self.rng.random() < 0.3 else self.rng.choice(SMALL_NETS))
            c.copyparms(m)
            c.tensor(self.np.standard_normal((64, 64), dtype=np.float32))
        with self.shared.lock:
            # One second past the lease: the reaper sweeps once a second.
            self.shared.expiring.append((time.monotonic() + self.shared.lease + 1.5, sid))

    def check_expired(self, sid: str, _scope: Scope | None = None) -> None:
        """A session left to expire must be gone: joining it answers NOT_FOUND."""
        self.expect("NOT_FOUND", "expired session", Client, self.shared.address, timeout=self.shared.timeout,
                    session=sid)

    def expected_errors(self, new: Scope) -> None:
        """Calls that must fail with a given code, and change nothing."""
        c, g = self.c, self.np
        unknown = f"mod_{secrets.token_hex(16)}"
        self.expect("NOT_FOUND", "unknown handle", c.copyparms, unknown)
        self.expect("NOT_FOUND", "unknown handle", c.free, unknown)
        self.expect("NOT_FOUND", "unknown session", Client, self.shared.address, timeout=self.shared.timeout,
                    session=f"ses_{secrets.token_hex(16)}")
        self.expect("INVALID_ARGUMENT", "unknown layer", c.module, ["nosuchlayer", 3])
        self.expect("INVALID_ARGUMENT", "bad spec", c.module, ["linear", -1, 2])
        m = new(c.module(["linear", 8, 4]))
        p = new(c.dict({"weight": g.standard_normal((4, 3), dtype=np.float32)}))
        self.expect("INVALID_ARGUMENT", "bad shape copy", c.copyparms, m, p)
        self.expect("INVALID_ARGUMENT", "wrong handle kind", c.avgparms, p, m)  # a module cannot hold an average
        self.expect("NOT_FOUND", "unknown key", c.dict, p, "nosuchkey")
        self.expect("INVALID_ARGUMENT", "bad input shape forward", c.eforward, m, g.standard_normal((5, 7), dtype=np.float32))
        q = new(c.module(["linear", 8, 4]))
        loss, opt = new(c.loss("ce")), new(c.opt("sgd", q))
        model = new(c.model(q, loss, opt))
        new.gone(q, loss, opt)
        self.expect("FAILED_PRECONDITION", "no data", c.run, model)
        self.expect("FAILED_PRECONDITION", "no data", c.batchnorm, model)
        self.expect("INVALID_ARGUMENT", "unknown option", c.train, model, nosuchoption=1)
        x, y = self.data(100, 8, 4)
        self.expect("INVALID_ARGUMENT", "size mismatch", c.train, model, x, y[:10])
        c.train(model, x[:, :5], y)  # accepted: the module checks the width when it runs
        self.expect("INVALID_ARGUMENT", "bad input shape run", c.run, model)
        new.free(m, p, model)
        self.expect("NOT_FOUND", "freed handle", c.avgparms, m, p)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    """Seconds since the load started (0: the idle server just before)."""
    rss_kb: int
    threads: int


def _mb(kb: float) -> float:
    return round(kb / 1024, 1)


def _median_kb(samples: list[Sample]) -> float:
    return float(np.median([s.rss_kb for s in samples]))


def _slope_mb_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    t = np.array([s.t for s in samples])
    rss = np.array([s.rss_kb / 1024 for s in samples])
    return float(np.polyfit(t / 60, rss, 1)[0])


def _trace_diff(first: Path, last: Path, top: int = 15) -> list[str]:
    """The Python allocation sites that grew most between two tracemalloc snapshots."""
    import tracemalloc

    before, after = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(last))
    total = sum(s.size for s in after.statistics("filename")) - sum(s.size for s in before.statistics("filename"))
    lines = [f"traced Python memory grew by {total / 1024:.1f} KiB"]
    lines += [str(stat) for stat in after.compare_to(before, "lineno")[:top]]
    return lines


REQUEST_ID_WINDOW_SECONDS = 30.0
"""How long the soak's server remembers request IDs. With the server's default (an hour, up to
100,000 IDs) the exactly-once table fills for the whole run, by design and within its caps, and
its growth (+12-15% in 5- and 10-minute runs on 2026-11-27) hides whatever else might grow; with a
window shorter than the warm-up the table is full before the baseline is taken (+0.86%)."""


def run_soak(
    seconds: float, clients: int, *, warmup: float = 0.2, window: float = 0.1, interval: float = 5.0,
    lease: float = 2.0, seed: int = 0, results_dir: Path = RESULTS_DIR, server_args: list[str] | None = None,
    timeout: float = 120.0, trace: bool = False, server_env: dict[str, str] | None = None,
    echo: Callable[[str], None] = print, request_id_window: float | None = REQUEST_ID_WINDOW_SECONDS,
) -> dict[str, Any]:
    """Start a server, run `clients` threads of mixed load for `seconds`, sampling the server's RSS
    every `interval` seconds; return the report (also written as JSON under results_dir).

    Growth after warm-up compares medians of the samples in two windows of `window` x the run:
    the one that starts when warm-up (`warmup` x the run) ends, and the last one. RSS under this
    load swings by tens of MB from one sample to the next (whole networks are built, trained and
    freed by several clients at once), so two single samples would measure that swing, not a trend.

    The server remembers request IDs for `request_id_window` seconds (`--request-id-window-seconds`,
    unless `server_args` sets it; None leaves the server's default of an hour): see
    `REQUEST_ID_WINDOW_SECONDS`.
    """
    server_args = list(server_args or [])
    if request_id_window is not None and "--request-id-window-seconds" not in server_args:
        server_args = ["--request-id-window-seconds", str(request_id_window), *server_args]
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    trace_dir = results_dir / f"soak-{stamp}-traces" if trace else None
    if trace_dir is not None:
        trace_dir.mkdir()
    server = Server(results_dir / f"soak-{stamp}-server.log", server_args, lease, trace_dir, server_env)
    samples: list[Sample] = []
    unexpected: list[dict[str, Any]] = []
    tallies: list[Tally] = []
    traces: list[Path] = []
    try:
        echo(f"server pid {server.pid} on {server.address}; {clients} clients for {seconds:.0f} s")
        with Client(server.address, timeout=timeout) as probe:
            probe.ping()
        idle = server.status()
        samples.append(Sample(0.0, idle["VmRSS"], idle["Threads"]))
        start = time.monotonic()
        deadline = start + seconds
        shared = Shared(server.address, lease, timeout)
        workers = [Worker(i, shared, seed) for i in range(clients)]
        threads = [threading.Thread(target=w.run, args=(deadline,), name=f"soak-{i}") for i, w in enumerate(workers)]
        for thread in threads:
            thread.start()
        next_sample = start + interval
        while any(t.is_alive() for t in threads):
            time.sleep(0.1)
            if not server.alive():
                unexpected.append({"scenario": "server", "error": f"server exited with status {server.proc.poll()}"})
                break
            now = time.monotonic()
            if next_sample <= now <= deadline:  # samples under load only
                status = server.status()
                samples.append(Sample(now - start, status["VmRSS"], status["Threads"]))
                next_sample += interval
                if len(samples) % max(1, round(60 / interval)) == 0:
                    echo(f"  {now - start:6.0f} s  RSS {status['VmRSS'] / 1024:7.1f} MB  threads {status['Threads']}")
                if trace and len(traces) == 0 and now - start >= seconds * warmup:
                    traces.append(server.trace())
                if trace and len(traces) == 1 and now + interval > deadline:
                    traces.append(server.trace())
        for thread in threads:
            thread.join()
        after_load = server.status()
        tallies = [w.tally for w in workers]
        # Sessions left to expire: wait out the last leases and check each one is gone.
        checker = Worker(clients, shared, seed)
        while shared.expiring:
            time.sleep(max(0.0, min(when for when, _ in shared.expiring) - time.monotonic()))
            for sid in shared.due_sessions(time.monotonic()):
                checker.attempt("expired_session_check", functools.partial(checker.check_expired, sid))
        checker.client.close()
        tallies.append(checker.tally)
        with Client(server.address, timeout=timeout) as probe:
            left = probe.handles()
        if left:
            unexpected.append({"scenario": "end", "error": f"{len(left)} handle(s) left after the run: {left[:5]}"})
        time.sleep(min(interval, 2.0))
        freed = server.status()
    finally:
        exit_status = server.stop()
    for tally in tallies:
        unexpected.extend(tally.unexpected)
    log_errors = server.error_lines()
    for line in log_errors[:20]:
        unexpected.append({"scenario": "server log", "error": line})
    if len(log_errors) > 20:
        unexpected.append({"scenario": "server log", "error": f"... and {len(log_errors) - 20} more error lines"})

    loaded = samples[1:] or samples
    warm_t = seconds * warmup
    span = max(seconds * window, interval)
    warm_window = [s for s in loaded if warm_t <= s.t < warm_t + span] or [min(loaded, key=lambda s: abs(s.t - warm_t))]
    end_window = [s for s in loaded if s.t > seconds - span] or loaded[-1:]
    after_warmup = [s for s in loaded if s.t >= warm_t] or loaded[-1:]
    warm_kb, end_kb = _median_kb(warm_window), _median_kb(end_window)
    growth = (end_kb - warm_kb) / warm_kb * 100.0
    calls = sum((t.calls for t in tallies), collections.Counter())
    expected = sum((t.expected_errors for t in tallies), collections.Counter())
    scenarios = sum((t.scenarios for t in tallies), collections.Counter())
    report: dict[str, Any] = {
        "started": stamp,
        "command": f"python -m bench.soak --minutes {seconds / 60:g} --clients {clients}",
        "server_args": server_args or [],
        "server_env": server_env or {},
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "seconds": seconds,
        "clients": clients,
        "interval_seconds": interval,
        "warmup_seconds": warm_t,
        "window_seconds": span,
        "server_log": str(server.log_path),
        "server_exit_status": exit_status,
        "rss_mb": {
            "start": _mb(samples[0].rss_kb),
            "after_warmup": _mb(warm_window[0].rss_kb),
            "end": _mb(loaded[-1].rss_kb),
            "after_warmup_window_median": _mb(warm_kb),
            "end_window_median": _mb(end_kb),
            "after_load": _mb(after_load["VmRSS"]),
            "after_everything_freed": _mb(freed["VmRSS"]),
            "min_after_warmup": _mb(min(s.rss_kb for s in after_warmup)),
            "max_after_warmup": _mb(max(s.rss_kb for s in after_warmup)),
            "high_water_mark": _mb(freed["VmHWM"]),
        },
        "growth_after_warmup_percent": round(growth, 2),
        "slope_after_warmup_mb_per_min": round(_slope_mb_per_min(after_warmup), 2),
        "threads": {"start": samples[0].threads, "end": loaded[-1].threads, "max": max(s.threads for s in samples)},
        "calls": dict(sorted(calls.items())),
        "calls_total": sum(calls.values()),
        "scenarios": dict(sorted(scenarios.items())),
        "expected_errors": dict(sorted(expected.items())),
        "expected_errors_total": sum(expected.values()),
        "unexpected_errors": len(unexpected),
        "unexpected": unexpected[:50],
        "samples": [[round(s.t, 1), s.rss_kb, s.threads] for s in samples],
        "passed": growth < GROWTH_LIMIT_PERCENT and not unexpected,
    }
    if len(traces) == 2:
        report["tracemalloc_growth"] = _trace_diff(traces[0], traces[1])
    path = results_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    report["report_path"] = str(path)
    return report


def summary(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    rss = report["rss_mb"]
    window = f"{report['window_seconds']:.0f} s"
    lines = [
        f"soak: {report['clients']} clients, {report['seconds']:.0f} s, warm-up {report['warmup_seconds']:.0f} s, "
        f"RSS every {report['interval_seconds']:g} s",
        f"RSS MB: start (idle) {rss['start']}, after warm-up {rss['after_warmup']}, end {rss['end']}; "
        f"range after warm-up {rss['min_after_warmup']}-{rss['max_after_warmup']}",
        f"RSS MB medians over {window}: after warm-up {rss['after_warmup_window_median']}, "
        f"at the end {rss['end_window_median']}",
        f"RSS MB idle: after the load {rss['after_load']}, after every session expired {rss['after_everything_freed']}",
        f"growth after warm-up: {report['growth_after_warmup_percent']:+.2f}% (limit {GROWTH_LIMIT_PERCENT:g}%), "
        f"trend {report['slope_after_warmup_mb_per_min']:+.2f} MB/min",
        f"server threads: start {report['threads']['start']}, end {report['threads']['end']}, "
        f"max {report['threads']['max']}",
        f"calls: {report['calls_total']} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(report["calls"].items(), key=lambda kv: -kv[1])) + ")",
        f"expected errors: {report['expected_errors_total']} ("
        + ", ".join(f"{k} {v}" for k, v in report["expected_errors"].items()) + ")",
        f"unexpected errors: {report['unexpected_errors']}",
    ]
    lines += [f"  {u['scenario']}: {u['error']}" for u in report["unexpected"][:10]]
    lines += report.get("tracemalloc_growth", [])
    lines.append(f"{'PASS' if report['passed'] else 'FAIL'}; report {report['report_path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    p.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before the baseline (default 0.2)")
    p.add_argument("--window", type=float, default=0.1,
                   help="fraction of the run whose RSS median is compared, after warm-up and at the end (default 0.1)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--lease", type=float, default=2.0, help="lease of sessions left to expire, seconds (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracemalloc", action="store_true",
                   help="serve under tracemalloc; report the Python allocation sites that grew after warm-up")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the server only, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--request-id-window", type=float, default=REQUEST_ID_WINDOW_SECONDS,
                   help="seconds the server remembers request IDs (default 30: shorter than the warm-up, so "
                        "the exactly-once table is full before the baseline); 0 or less: the server's default")
    p.add_argument("server_args", nargs="*", help="after --: extra `weightavg serve` flags")
    args = p.parse_args(argv)
    if not Path("/proc/self/status").exists():
        p.error("needs Linux /proc to read the server's resident memory")
    report = run_soak(
        args.minutes * 60, args.clients, warmup=args.warmup, window=args.window, interval=args.interval,
        lease=args.lease, seed=args.seed, results_dir=args.results_dir, server_args=args.server_args,
        request_id_window=args.request_id_window if args.request_id_window > 0 else None,
        trace=args.tracemalloc, server_env=dict(pair.split("=", 1) for pair in args.server_env),
    )
    print(summary(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
