"""A client that truncates its shared memory region's file while the server copies into or out of
it: the server's SIGBUS guard (`native.guard`, domain/shm.py) keeps the server alive, refuses the
call (FAILED_PRECONDITION, nothing changed) and the region from then on. In a process of its own for
each copy path (tests/shm_truncation_scenario.py: a failed guard would kill the test run), and
through a real server racing real truncations against uploads."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import pytest

from weightavg import Client
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain import native, shm

pytestmark = [
    pytest.mark.skipif(not os.path.isdir(shm.SHM_DIRECTORY), reason="needs POSIX shared memory in /dev/shm"),
    pytest.mark.skipif(native._GUARDS is None, reason="the native module was not built: regions are unguarded"),
]
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0
LOST = "lost memory while the server copied"
SCENARIO_BYTES = 8 << 20
"""The region of tests/shm_truncation_scenario.py (its SIZE)."""


def scenario(mode: str) -> subprocess.CompletedProcess[str]:
    memory = shared_memory.SharedMemory(create=True, size=SCENARIO_BYTES)
    try:
        return subprocess.run(
            [sys.executable, str(ROOT / "tests" / "shm_truncation_scenario.py"), memory.name, mode],
            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
    finally:
        memory.close()
        memory.unlink()


@pytest.mark.parametrize("mode", ["numpy", "threads", "stream", "crc"])
def test_a_copy_that_touches_truncated_pages_is_refused_and_the_process_lives(mode: str) -> None:
    done = scenario(mode)
    assert done.returncode == 0, f"exit status {done.returncode} (-{int(signal.SIGBUS)}: SIGBUS)\n{done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: ") and LOST in lines[0], lines
    assert lines[1].startswith("after: ") and "during an earlier copy; register it again" in lines[1], lines


def test_without_the_guard_the_same_copy_kills_the_process() -> None:
    """The control: the scenario does reach lost pages."""
    done = scenario("unguarded")
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr[-2000:])


def test_a_guard_is_released_once_and_never_frees_a_slot_taken_since() -> None:
    first = shm.Guard(4096, 4096)
    slot = first.slot
    first.release()
    second = shm.Guard(8192, 4096)
    assert second.slot == slot  # the freed slot, taken again
    first.release()  # (the region's finalizer, after close) must leave it to the second guard
    assert second.slot is not None and not second.broken()
    assert native._GUARDS is not None
    second.release()


def test_truncations_racing_uploads_through_a_real_server_never_kill_it(start_server: Any) -> None:
    """Each round: a 64 MB region registered, an upload from it (CreateDictionaryFromSharedMemory)
    and, from another thread after a random delay, the client truncating the file. Every answer is OK
    (the truncation came after the copy) or FAILED_PRECONDITION (before the check, or during the copy:
    then the guard caught it), no dictionary is created by a refused call, the server answers after
    every round, and the rounds go on until one truncation lands inside the copy (bounded)."""
    server = start_server(allow_shm=True)
    size = 64 << 20
    hits = answers = 0
    with grpc.insecure_channel(server.address) as channel, Client(server.address, session=True, timeout=WAIT) as c:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        meta = [("weightavg-session", c.session)]
        for attempt in range(60):
            memory = shared_memory.SharedMemory(create=True, size=size)
            path = os.path.join(shm.SHM_DIRECTORY, memory.name)
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
                os.pwrite(fd, shm.proof(c.session), 0)
                stub.RegisterSharedMemory(
                    pb.RegisterSharedMemoryRequest(name=f"r{attempt}", key=memory.name, byte_size=size),
                    metadata=meta, timeout=WAIT,
                )
                before = len(c.handles())
                request = pb.CreateDictionaryFromSharedMemoryRequest(region=f"r{attempt}", tensors=[
                    pb.SharedTensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[(size - 4096) // 4], offset=4096,
                                    byte_size=size - 4096)])
                cut = threading.Timer(random.uniform(0.0, 0.03), os.ftruncate, (fd, 0))
                cut.start()
                try:
                    answer = stub.CreateDictionaryFromSharedMemory(request, metadata=meta, timeout=WAIT)
                    answers += 1
                    c.free(answer.dictionary.id)
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
                    hits += LOST in (err.details() or "")
                    assert len(c.handles()) == before
                cut.join()
                c.ping()  # the server lives
                stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=f"r{attempt}"), metadata=meta, timeout=WAIT)
            finally:
                os.close(fd)
                memory.close()
                memory.unlink()
            if hits:
                break
    assert hits, f"no truncation landed inside a copy in 60 rounds ({answers} uploads finished first)"
