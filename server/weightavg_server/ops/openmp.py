"""How long the server's idle OpenMP threads spin before they sleep: bounded, set before torch loads.

torch's CPU kernels run on an OpenMP team (libgomp in the pip builds). After each parallel kernel
libgomp's workers busy-wait for the next one: with neither `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT`
set, 300,000 spins, which measured about 4 ms of a core after every large call on this project's
2-vCPU machines (docs/perf.md, "Idle spinning"). A server shares its cores with the training job
beside it, so that time is taken from the job it serves (and from the next call, when the job's own
workers spin back). `GOMP_SPINCOUNT` below bounds it to tens of microseconds; the server's own
training and averaging measured no slower with it.

libgomp reads its environment once, when torch first loads it, so this runs at import of the
`weightavg_server` package, before any of its modules imports torch. A process that loaded torch
first (an in-process server in a test) keeps whatever it had. An operator's own setting of either
variable wins: `OMP_WAIT_POLICY=ACTIVE` or `GOMP_SPINCOUNT=...` in the server's environment.

Second, every thread of the server that runs torch gives its OpenMP team back when its work is done
(`release_team`, `TeamReturningExecutor`). libgomp gives each thread that starts a parallel region a
team of its own and keeps it until that thread exits; gRPC's workers never exit, and any of them may
run a call's torch work. Once the teams kept hold more threads than the machine has CPUs, libgomp
spins only 100 times (its "throttled" count) before a worker sleeps, and every parallel region of a
running epoch wakes its team through the kernel: on 2 vCPUs a server's epoch took 1.26-1.40x the same
loop in a fresh process (docs/perf.md, "Teams kept by idle threads").
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, MutableMapping
from concurrent import futures
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

SPIN_COUNT = "10000"
"""libgomp's spins before an idle worker sleeps (its default is 300000): about 0.1 ms on this
project's machines (0.25 ms of server CPU after a large call, against 4.25 ms by default)."""

OPERATOR_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
"""Variables through which an operator chooses the policy; with either set, the server sets nothing."""


def bound_idle_spin(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT unless the operator chose a wait policy; whether it was set."""
    if any(name in environ for name in OPERATOR_SETTINGS):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


OMP_PAUSE_SOFT = 1
"""`omp_pause_soft` of OpenMP 5.0's `omp_pause_resource_t`: give back the threads, keep the settings."""


@functools.cache
def _libgomps() -> tuple[ctypes.CDLL, ...]:
    """Every libgomp this process has loaded (torch's wheels bring their own copy), as found in
    /proc/self/maps: none before torch loads, on a system without /proc, or where torch uses another
    OpenMP (LLVM's libomp keeps one pool for the process, which has no such per-thread teams). Looked
    up once, at the first release, which comes after the first torch work, so torch has loaded it."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "/libgomp" in line}
    except OSError:
        return ()
    found = []
    for path in sorted(paths):
        try:  # RTLD_NOLOAD: the copy already mapped, never a second one
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            release = lib.omp_pause_resource_all
        except (OSError, AttributeError):  # gone, or a libgomp older than OpenMP 5.0 (GCC 9)
            continue
        release.argtypes, release.restype = [ctypes.c_int], ctypes.c_int
        found.append(lib)
    return tuple(found)


def release_team() -> None:
    """Give back the calling thread's OpenMP team, if it has one: its threads exit, and its next
    parallel region starts a new team (tens of microseconds). A thread without a team pays one call
    into libgomp. libgomp frees only the caller's own team (`gomp_pause_host`), so every thread that
    runs torch work calls this when that work is done."""
    for lib in _libgomps():
        lib.omp_pause_resource_all(OMP_PAUSE_SOFT)


def returning_team(work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)`, then the thread's OpenMP team given back, whether or not it raised."""
    try:
        return work(*args, **kwargs)
    finally:
        release_team()


class TeamReturningExecutor(futures.ThreadPoolExecutor):
    """The server's RPC workers: a thread pool whose threads give back their OpenMP team after each
    call (see the module's docstring), so that at most the calls running at one moment hold teams."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> futures.Future[T]:
        return super().submit(returning_team, fn, *args, **kwargs)
