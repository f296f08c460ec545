"""The server bounds OpenMP's idle spinning before torch loads, unless the operator chose a policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weightavg_server.ops.openmp import SPIN_COUNT, bound_idle_spin

SERVER = Path(__file__).resolve().parent.parent / "server"


@pytest.mark.parametrize(
    ("environ", "expected", "changed"),
    [
        ({}, SPIN_COUNT, True),
        ({"PATH": "/bin"}, SPIN_COUNT, True),
        ({"GOMP_SPINCOUNT": "5"}, "5", False),  # the operator's count stays
        ({"OMP_WAIT_POLICY": "ACTIVE"}, None, False),  # so does a policy: libgomp derives the count from it
        ({"OMP_WAIT_POLICY": "PASSIVE"}, None, False),
    ],
)
def test_the_spin_is_bounded_unless_the_operator_chose(environ: dict[str, str], expected: str | None, changed: bool) -> None:
    assert bound_idle_spin(environ) is changed
    assert environ.get("GOMP_SPINCOUNT") == expected


# Records the environment at the moment torch is first imported, then imports the module named in argv[1].
_PROBE = """
import importlib, json, os, sys
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update(GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT"), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Probe())
importlib.import_module(sys.argv[1])
print(json.dumps(seen))
"""


def _environment_when_torch_loads(module: str, **extra: str) -> dict[str, str | None]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra, PYTHONPATH=os.pathsep.join([str(SERVER), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _PROBE, module], env=env, capture_output=True, text=True, timeout=300, check=True)
    seen: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.parametrize("module", ["weightavg_server.ops.cli", "weightavg_server.ops.app", "weightavg_server.service"])
def test_every_server_entry_sets_it_before_torch_loads(module: str) -> None:
    """`weightavg serve` and `python -m weightavg_server` import ops.cli; the bench and embedders import app or service."""
    assert _environment_when_torch_loads(module) == {"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_WAIT_POLICY": None}


def test_an_operator_policy_reaches_libgomp_unchanged() -> None:
    seen = _environment_when_torch_loads("weightavg_server.ops.cli", OMP_WAIT_POLICY="ACTIVE")
    assert seen == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "ACTIVE"}


# -- teams ----------------------------------------------------------------------------------------

# Counts the process's threads that are neither Python's nor gRPC's (gRPC names its own): OpenMP
# team threads, which take the name of the thread that starts them. numpy's OpenBLAS threads would
# count too, and are turned off. argv[1] is what to do: "release" (one thread, its team given back),
# "server" (a real server's workers, each running a parallel region through real calls) or "stalled"
# (three streamed replies whose readers stall after the first message).
_TEAMS = """
import json, os, sys, threading
os.environ["OPENBLAS_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(2)  # a team of two even on a one-CPU runner: one thread beside the caller

def team_threads():
    python = {t.native_id for t in threading.enumerate()}
    own = open("/proc/self/comm").read()
    tasks = os.listdir("/proc/self/task")
    return sum(1 for t in tasks if int(t) not in python and _comm(t) == own)

def _comm(task):
    try:
        return open(f"/proc/self/task/{task}/comm").read()
    except OSError:  # it exited since the listing
        return None

def settled(expected):  # a released team's threads exit just after the release returns
    import time
    deadline = time.monotonic() + 10
    while team_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return team_threads()

def parallel():  # relu over 4M elements: an ATen parallel_for, so a team for the calling thread
    torch.relu(torch.ones(1 << 22))

from weightavg_server.ops import openmp
seen = {"before": team_threads()}
if sys.argv[1] == "release":
    done, go = threading.Event(), threading.Event()
    def work():
        parallel()
        seen["kept"] = team_threads()
        openmp.release_team()
        seen["released"] = settled(seen["before"])
        parallel()
        seen["again"] = team_threads()
        try:
            openmp.returning_team(lambda: (parallel(), 1 / 0))
        except ZeroDivisionError:
            seen["after_raise"] = settled(seen["before"])
    thread = threading.Thread(target=work)
    thread.start(); thread.join()
elif sys.argv[1] == "stalled":
    import grpc, numpy as np
    from weightavg import Client, wire
    from weightavg.v1 import weightavg_pb2 as pb, weightavg_pb2_grpc as pb_grpc
    from weightavg_server.ops.app import create_server
    from weightavg_server.ops.config import ServerConfig
    server, port, _ = create_server(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=4))
    server.start()
    with Client(f"127.0.0.1:{port}") as c:
        q = c.module(["linear", 8, 4096])
        model = c.model(q, c.loss("mse"), c.opt("sgd", q, 0.1)).id
    x = np.ones((4096, 8), np.float32)  # a 64 MiB output, far past the transport's windows
    def requests():
        yield pb.EvaluateModelRequest(model=model)
        for chunk in wire.array_chunks("", x, 1 << 20):
            yield pb.EvaluateModelRequest(chunk=chunk)
    channels, replies = [], []
    for _ in range(3):  # three readers that take the first message of the reply, then stall
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20),
                                                                    ("grpc.http2.bdp_probe", 0)])  # windows stay 64 KiB (faults.stalling_channel)
        reply = pb_grpc.WeightAveragingServiceStub(channel).EvaluateModel(requests(), timeout=120)
        next(reply)  # the model has run (a parallel region on the worker); the rest waits on the reader
        channels.append(channel); replies.append(reply)
    seen["stalled"] = settled(seen["before"])
    for reply in replies: reply.cancel()
    server.stop(grace=None)
else:
    import numpy as np
    from weightavg import Client
    from weightavg_server.ops.app import create_server
    from weightavg_server.ops.config import ServerConfig
    server, port, _ = create_server(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=4))
    server.start()
    seen["started"] = team_threads()
    barrier = threading.Barrier(3)
    def client():
        with Client(f"127.0.0.1:{port}") as c:
            relu = c.module(["relu"])
            barrier.wait()  # three calls at once: three workers, each running relu over 4M elements
            c.forward(relu, np.ones(1 << 22, np.float32))
    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients: t.start()
    for t in clients: t.join()
    seen["served"] = settled(seen["before"])  # the workers give their teams back after answering
    server.stop(grace=None)
print(json.dumps(seen))
"""


def _team_threads(what: str) -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SERVER), str(SERVER.parent / "client"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _TEAMS, what], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


libgomp_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="libgomp's per-thread teams: torch's Linux builds"
)


@libgomp_only
def test_a_thread_gives_its_team_back() -> None:
    seen = _team_threads("release")
    assert seen["kept"] == seen["before"] + 1  # the thread's team: itself and one more
    assert seen["released"] == seen["before"]
    assert seen["again"] == seen["before"] + 1  # a parallel region after the release starts a new team
    assert seen["after_raise"] == seen["before"]  # returning_team gives it back when the work raises


@libgomp_only
def test_a_server_keeps_no_team_between_calls() -> None:
    """Three workers each ran a parallel region; none keeps its team once its call is answered, nor
    does the thread that started the server (which ran the kernels' checks). Kept teams made every
    epoch beside them 27-41% slower (docs/perf.md, "Teams kept by idle threads")."""
    seen = _team_threads("server")
    assert seen["started"] == seen["before"]
    assert seen["served"] == seen["before"]


@libgomp_only
def test_a_reply_stalled_by_its_reader_keeps_no_team() -> None:
    """A streamed reply runs at its reader's pace, its worker blocked between messages: the team of
    the evaluation it streams is given back before the first message goes out, not when the call
    ends (three stalled readers kept three idle teams; found by review)."""
    seen = _team_threads("stalled")
    assert seen["stalled"] == seen["before"]
