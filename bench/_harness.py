"""Timing, results and the server process shared by every case."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass
class Row:
    """One line of the table: a measurement, its same-run baseline, their ratio and the target."""

    case: str
    measured: str
    baseline: str
    value: float
    base: float
    unit: str
    ratio: float
    target: str
    met: bool | None
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


@dataclass
class Skip:
    """A case that could not run here, and why."""

    case: str
    reason: str


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SETTLE_SECONDS = 0.03
"""Pause before each timed call in `interleaved`: longer than OpenMP workers spin after a kernel by
default (about 4 ms here; docs/perf.md "Idle spinning"), so no call pays for the spinning threads of
the call before it, in this process or the server's. Without it the order decided the figures: the
call after this process's 2-thread add_ ran 30% slower than alone."""


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating them every repeat so load drifts hit all alike;
    each timed call starts after `SETTLE_SECONDS` with nothing running."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_SECONDS)
            times[name].append(timed(fn))
    return times


def in_blocks(fns: dict[str, Callable[[], Any]], repeats: int, block: int = 50) -> dict[str, list[float]]:
    """Seconds per call of each function, `block` calls back to back at a time, the blocks alternated
    `repeats` times after one untimed block each: for calls short enough that a pause before each
    would measure the pause's cost (docs/perf.md, "What a call after a pause pays")."""
    for fn in fns.values():
        for _ in range(block):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].extend(timed(fn) for _ in range(block))
    return times


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda ratio: ratio <= limit


def at_least(limit: float) -> Callable[[float], bool]:
    return lambda ratio: ratio >= limit


def row(
    case: str, measured: str, baseline: str, times: dict[str, list[float]], m: str, b: str, *,
    unit: str = "ms", scale: float = 1e3, invert: bool = False, target: str = "", check: Callable[[float], bool] | None = None,
    note: str = "",
) -> Row:
    """A row from interleaved samples: medians of m and b, ratio m/b (b/m when invert, for speedups)."""
    vm, vb = median(times[m]), median(times[b])
    ratio = vb / vm if invert else vm / vb
    return Row(case, measured, baseline, vm * scale, vb * scale, unit, ratio, target,
               None if check is None else bool(check(ratio)), {m: times[m], b: times[b]}, note)


QUICK_NOTE = "--quick: too few repeats at too small a size to check the target"


def unchecked(rows: list[Row | Skip]) -> list[Row | Skip]:
    """The rows of a `--quick` run with their targets left unchecked (met None, the reason in the note).

    Quick runs move 64 MB instead of 256, hold 2,000 sessions instead of 10,000, train on 3,000 rows
    and take medians of 2-5 samples: a "yes" there said nothing about the target, yet read as one met.
    The ratio and the target stay, to show which way a change moves."""
    out: list[Row | Skip] = []
    for r in rows:
        if isinstance(r, Row) and r.met is not None:
            r = replace(r, met=None, note="; ".join(filter(None, (r.note, QUICK_NOTE))))
        out.append(r)
    return out


@contextmanager
def bench_server(device: str = "cpu") -> Iterator[str]:
    """A weightavg server (plus the raw service) in its own process, as a user would run it."""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._server", "--device", device],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("the benchmark server did not start; run `python -m bench._server` to see why")
        yield f"127.0.0.1:{int(line)}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    import grpc
    import numpy
    import torch
    from google.protobuf import __version__ as protobuf_version

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpc": grpc.__version__,
        "protobuf": protobuf_version,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


def as_json(rows: list[Row | Skip]) -> list[dict[str, Any]]:
    return [{"kind": "row" if isinstance(r, Row) else "skip", **asdict(r)} for r in rows]


def table(rows: list[Row | Skip]) -> str:
    """A Markdown table: readable in a terminal and pasteable into docs."""
    lines = [
        "| case | measured | baseline (same run) | measured | baseline | ratio | target | met |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if isinstance(r, Skip):
            lines.append(f"| {r.case} | skipped: {r.reason} | | | | | | |")
            continue
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.case} | {r.measured} | {r.baseline} | {r.value:.4g} {r.unit} | {r.base:.4g} {r.unit} | "
            f"{r.ratio:.3g} | {r.target} | {met} |"
        )
    return "\n".join(lines)
