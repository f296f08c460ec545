"""Snapshots: every live handle survives a restart bit for bit, and a damaged snapshot is refused.

The SIGTERM test runs the server as a real subprocess (`python -m weightavg_server`), kills it in
the middle of a loop of averaging calls, and restarts it on the same --state-dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from conftest import with_limits  # the fixture helpers; pytest puts tests/ on sys.path
from weightavg import Client, FailedPreconditionError, WeightavgError
from weightavg_server.store import snapshot
from weightavg_server.ops.app import Runtime, create_runtime
from weightavg_server.ops.config import ServerConfig
from weightavg_server.store.registry import Registry

from inprocess import counted_walks, walked_bytes

BN_NET = ["sequential", ["linear", "a", 6, 5], ["batchnorm1d", "b", 5], ["relu", "c"], ["linear", "d", 5, 3]]
START_LIMIT = 120.0
"""Seconds a server subprocess may take to print its address (importing torch dominates)."""


# -- a server subprocess ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str

    def terminate(self) -> tuple[int, str]:
        """SIGTERM, then wait for a clean exit; returns (exit code, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=START_LIMIT)
        return self.proc.returncode, err


def _start(state_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "weightavg_server", "--port", "0", "--device", "cpu", "--state-dir", str(state_dir),
         "--log-level", "INFO", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def start_server(state_dir: Path, *extra: str) -> ServerProcess:
    """Start `python -m weightavg_server --port 0` and read the address it reports on stdout."""
    proc = _start(state_dir, *extra)
    line = proc.stdout.readline() if proc.stdout else ""  # blocks until the line or the process's exit
    if not line.startswith("weightavg serving on "):
        proc.kill()
        _, err = proc.communicate(timeout=START_LIMIT)
        raise AssertionError(f"server did not start: {line!r}\n{err}")
    return ServerProcess(proc, line.removeprefix("weightavg serving on ").strip())


def refused_start(state_dir: Path) -> tuple[int, str]:
    """Start a server that is expected to refuse; returns (exit code, stderr)."""
    proc = _start(state_dir)
    out, err = proc.communicate(timeout=START_LIMIT)
    assert "weightavg serving on" not in out
    return proc.returncode, err


# -- the oracle for the averaging loop -------------------------------------------------------------------


def weight(i: int) -> np.ndarray:
    """The module's weight before the i-th average (i = 0 is the copy the average starts from)."""
    return (np.arange(12, dtype=np.float32).reshape(3, 4) * 0.37 + i * 1.25 - 3.0).astype(np.float32)


def oracle(count: int) -> np.ndarray:
    """The running average after `count` samples, with the same float32 in-place steps as the server
    (avg.lerp_(p, 1 / (n + 1))), so that bit-exact equality is the right test."""
    avg = torch.from_numpy(weight(0).copy())
    for n in range(1, count):
        avg.lerp_(torch.from_numpy(weight(n)), 1.0 / (n + 1.0))
    return avg.numpy()


def dump(c: Client) -> dict[str, Any]:
    """Everything a client can see of its handles: ids, kinds, and every value."""
    state: dict[str, Any] = {}
    for info in c.handles():
        h = info.handle
        if h.kind == "dictionary":
            value: Any = c.dict(h)
        elif h.kind == "tensor":
            value = c.tensor(h)
        else:
            value = ({n: c.parm(h, n) for n in c.parmnames(h)}, c.module(h), c.buffernames(h))
        state[h.id] = (h.kind, info.dtype, info.bytes, value)
    return state


def assert_same(a: Any, b: Any) -> None:
    """Bit-exact equality through nested containers (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), (a, b)


@contextlib.contextmanager
def restarted(config: ServerConfig, registry: Registry | None = None, timeout: float = 120) -> Iterator[Client]:
    """A client of a new server from `config` (restoring its --state-dir, or serving `registry`),
    stopped after the block: how a test looks at what a restart brought back."""
    runtime = create_runtime(config, registry=registry)
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=timeout) as c:
            yield c
    finally:
        runtime.stop(None)


# -- SIGTERM mid-run -------------------------------------------------------------------------------------


def test_sigterm_mid_run_keeps_every_averaged_dictionary(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = start_server(state_dir)
    try:
        c = Client(server.address, timeout=60)
        m = c.module(["linear", 4, 3])
        c.parm(m, "weight", weight(0))
        c.parm(m, "bias", 0.5)
        busy = c.copyparms(m)  # averaged by the loop that SIGTERM interrupts
        # Finished averages of a batchnorm net, one of them in float64 after a move.
        bn = c.module(BN_NET)
        momenta = c.batchnorm(bn)
        done = c.copyparms(bn)
        for k in range(3):
            c.parm(bn, "a.weight", float(k))
            c.avgparms(bn, done)
        done64 = c.to(c.copyparms(bn), dtype="float64")
        c.avgparms(bn, done64)
        c.tensor(np.array([1 + 2j, -0.5j], np.complex128))
        c.dict({"flags": np.array([True, False]), "big": np.arange(5, dtype=np.int64) * 10**15})
        view = c.parms(bn, "d")
        c.addref(done)
        owned = Client(server.address, timeout=60, session=True, lease=3600)
        session_dict = owned.dict({"mine": [1.0, 2.0, 3.0]})
        before = dump(c)
        before_session = dump(owned)

        acknowledged = [1]
        stop = threading.Event()

        def average_forever() -> None:
            i = 1
            try:
                while not stop.is_set():
                    c.parm(m, "weight", weight(i))
                    acknowledged.append(c.avgparms(m, busy))
                    i += 1
            except WeightavgError:
                pass  # the server went away under us: that is the point

        loop = threading.Thread(target=average_forever)
        loop.start()
        while len(acknowledged) < 6 and loop.is_alive():  # kill it mid-run, averages behind it, calls in flight
            loop.join(0.01)
        assert loop.is_alive(), "the averaging loop stopped before the server was killed"
        code, err = server.terminate()
        stop.set()
        loop.join()
        assert code == 0, err
        assert "saved" in err and "state" in err
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()

    again = start_server(state_dir)
    try:
        with Client(again.address, timeout=60) as c2:
            after = dump(c2)
            count = int(after[busy.id][3][".n"])
            # Every acknowledged average is there; at most one more (in flight when the signal came).
            assert acknowledged[-1] <= count <= acknowledged[-1] + 1
            assert after[busy.id][3]["weight"].tobytes() == oracle(count).tobytes()
            # The module holds the weight of the last average, or of the next one if SIGTERM fell between the calls.
            last_weight = after[m.id][3][0]["weight"].tobytes()
            assert last_weight in (weight(count - 1).tobytes(), weight(count).tobytes())
            np.testing.assert_array_equal(after[busy.id][3]["bias"], np.full(3, 0.5, np.float32))
            for handle_id, value in before.items():
                if handle_id not in (busy.id, m.id):
                    assert_same(value, after[handle_id])
            assert list(after) == list(before)  # same handle ids, same order
            # The view is still live: writing through it changes the restored module.
            c2.dict(view, "bias", np.zeros(3, np.float32))
            np.testing.assert_array_equal(c2.parm(bn, "d.bias"), np.zeros(3, np.float32))
            # Momenta reset by batchnorm(bn) stay None, and restoring them still works.
            assert c2.batchnorm(bn) == {"b": None}
            c2.batchnorm(bn, momenta)
            assert c2.batchnorm(bn) == momenta
        # The session came back too: its handles are listed to it only, and it can be rejoined.
        with Client(again.address, timeout=60, session=owned.session) as rejoined:
            assert_same(dump(rejoined), before_session)
            assert rejoined.dict(session_dict, "mine").tolist() == [1.0, 2.0, 3.0]
    finally:
        code, err = again.terminate()
    assert code == 0, err


def test_snapshot_every_writes_snapshots_while_serving(tmp_path: Path) -> None:
    """--snapshot-every: a snapshot appears without SIGTERM or a request, and holds what was made."""
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "s"), snapshot_every=0.2)
    runtime = create_runtime(config)
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=60) as c:
            m = c.module(["linear", 3, 2])
        deadline = time.monotonic() + 30
        while not (tmp_path / "s" / "manifest.json").exists() or snapshot.load(Registry(), tmp_path / "s", torch.device("cpu")) < 1:
            assert time.monotonic() < deadline, "no periodic snapshot within 30 s"
            time.sleep(0.1)
    finally:
        runtime.stop(None)
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "s", torch.device("cpu")) == 1 and m.id in dict(restored.items())


def _generation(state_dir: Path) -> int:
    """The generation of the newest complete snapshot in state_dir (0: none)."""
    manifest = state_dir / "manifest.json"
    return int(json.loads(manifest.read_text())["generation"]) if manifest.exists() else 0


def _next_snapshot(state_dir: Path, after: int, holds: Callable[[Registry], bool]) -> tuple[int, Registry]:
    """Wait for a complete snapshot newer than generation `after` whose restore `holds` what is asked."""
    deadline = time.monotonic() + 30
    while True:
        generation = _generation(state_dir)
        if generation > after:
            restored = Registry()
            snapshot.load(restored, state_dir, torch.device("cpu"))
            if holds(restored):
                return generation, restored
        assert time.monotonic() < deadline, f"no snapshot after generation {after} within 30 s"
        time.sleep(0.05)


def _settled(runtime: Runtime, state_dir: Path) -> int:
    """The generation on disk once the periodic snapshots have caught up with every change made.

    A snapshot reads the change count before its cut, so a change made between the two is in the
    cut but not in the count it saves (`registry.Changes`): the next interval then writes the same
    state again, a legitimate write that a test waiting for "a snapshot holding X" could see after
    it started asserting that nothing more is written. The manifest is on disk before the count is
    saved, so once nothing is unsaved the newest generation is final until the next change."""
    deadline = time.monotonic() + 30
    while runtime.registry.changes.unsaved():
        assert time.monotonic() < deadline, "the periodic snapshots never caught up within 30 s"
        time.sleep(0.05)
    return _generation(state_dir)


def _count(registry: Registry, handle: str) -> float | None:
    """The running-average count ('.n') of a restored dictionary, None before its first average."""
    n = dict(registry.items())[handle].obj.entries.get(".n")
    return None if n is None else float(n)


def test_a_periodic_snapshot_of_a_server_that_changed_nothing_is_not_written_again(tmp_path: Path) -> None:
    """--snapshot-every rewrote every tensor at each interval, on a server no call had changed since
    the last one: an idle server with 10 GB held wrote 10 GB a minute. A periodic snapshot is now
    skipped while nothing changed since the newest complete one (or the one restored at start);
    every kind of change (in place, a free, a handle made) is in the next one; a Snapshot call is
    always written."""
    state = tmp_path / "s"
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(state), snapshot_every=0.1)
    runtime = create_runtime(config)
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=60) as c:
            m = c.module(["linear", 3, 2])
            d = c.copyparms(m)
            _next_snapshot(state, 0, lambda r: len(r) == 2)
            first = _settled(runtime, state)
            time.sleep(1.0)  # ten intervals, nothing changed
            assert _generation(state) == first
            assert c.avgparms(m, d) == 2  # in place: the copy counted as the first sample
            _next_snapshot(state, first, lambda r: _count(r, d.id) == 2.0)
            second = _settled(runtime, state)
            time.sleep(0.5)
            assert _generation(state) == second
            c.free(d)
            _, restored = _next_snapshot(state, second, lambda r: d.id not in dict(r.items()))
            assert m.id in dict(restored.items())
            third = _settled(runtime, state)
            c.snapshot()  # asked for: written though nothing changed
            assert _generation(state) == third + 1
    finally:
        runtime.stop(None)
    stopped = _generation(state)
    again = create_runtime(config)  # restores the snapshot the stop wrote
    again.start()
    try:
        time.sleep(1.0)
        assert _generation(state) == stopped
        with Client(f"127.0.0.1:{again.port}", timeout=60) as c:
            made = c.module(["linear", 2, 2])
            _next_snapshot(state, stopped, lambda r: made.id in dict(r.items()))
    finally:
        again.stop(None)


# -- damaged snapshots -----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A state directory holding one snapshot of a module and a dictionary."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "s")))
    runtime.start()
    with Client(f"127.0.0.1:{runtime.port}", timeout=60) as c:
        m = c.module(["linear", 3, 2])
        c.avgparms(m, c.copyparms(m))
    runtime.stop(None)
    return tmp_path / "s"


def test_a_server_on_a_taken_port_fails_before_it_restores_its_snapshot(saved: Path) -> None:
    """The port was bound after the restore: a second server started on a taken port loaded its whole
    snapshot (minutes for a large one) only to fail to bind. It now fails first, having restored
    nothing."""
    import socket

    registry = Registry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(host="127.0.0.1", port=taken.getsockname()[1], device="cpu", state_dir=str(saved))
        with pytest.raises(OSError, match="could not bind"):
            create_runtime(config, registry)
    assert len(registry) == 0
    runtime = create_runtime(dataclasses.replace(config, port=0), registry)  # a free port: restored
    try:
        assert len(registry) == 2
    finally:
        runtime.stop(None)


def _files(state_dir: Path) -> dict[str, Path]:
    manifest = json.loads((state_dir / "manifest.json").read_text())
    return {Path(name).suffix: state_dir / name for name in manifest["files"]}


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_a_modified_snapshot_file_is_refused(saved: Path, suffix: str) -> None:
    path = _files(saved)[suffix]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    code, err = refused_start(saved)
    assert code == 2
    assert "refusing to start" in err and "checksum mismatch" in err and path.name in err


def test_a_torn_snapshot_file_is_refused(saved: Path) -> None:
    path = _files(saved)[".safetensors"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = refused_start(saved)
    assert code == 2 and "checksum mismatch" in err and "torn" in err


def test_a_snapshot_without_its_manifest_is_refused(saved: Path) -> None:
    (saved / "manifest.json").unlink()
    code, err = refused_start(saved)
    assert code == 2 and "no manifest.json" in err


def test_a_torn_manifest_is_refused(saved: Path) -> None:
    manifest = saved / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:20])
    code, err = refused_start(saved)
    assert code == 2 and "manifest.json is unreadable" in err


def test_snapshot_files_are_readable_by_the_servers_user_alone(saved: Path) -> None:
    """The JSON files list tenant names and handle, session and request IDs: they were written 0644
    while the tensors were 0600 (found by review). A temporary file a crash left behind, 0644, does
    not lend its mode to the next generation."""
    def modes() -> dict[str, int]:
        return {p.name: stat.S_IMODE(p.stat().st_mode) for p in saved.iterdir()}

    assert modes() == {"manifest.json": 0o600, "state-1.json": 0o600, "tensors-1.safetensors": 0o600}
    for name in ("manifest.json", "state-2.json", "tensors-2.safetensors"):
        stale = saved / f".tmp-{name}"
        stale.write_bytes(b"left by a crash")
        stale.chmod(0o644)
    registry = Registry()
    snapshot.load(registry, saved, torch.device("cpu"))
    snapshot.save(registry, saved)
    assert modes() == {"manifest.json": 0o600, "state-2.json": 0o600, "tensors-2.safetensors": 0o600}


def test_tensors_stored_as_bytes_at_any_offset_restore(tmp_path: Path) -> None:
    """Dtypes safetensors lacks are stored as raw bytes, placed right after the tensor before them:
    a complex128 after an int32 starts 4 bytes off alignment, and restoring it crashed the server
    (SIGSEGV on every start, so it crash-looped; found by review). In a subprocess, so that a crash
    fails this test rather than the run."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "s")))
    runtime.start()
    values = {
        "a": np.array(1, np.int32), "b": np.array(1 + 2j, np.complex128), "c": np.arange(3, dtype=np.int8),
        "d": (np.arange(5) + 1j).astype(np.complex64), "e": np.array([True]), "f": np.arange(7) * (1 - 1j),
    }
    with Client(f"127.0.0.1:{runtime.port}", timeout=60) as c:
        d = c.dict(values)
        c.snapshot()
    runtime.stop(None)
    server = start_server(tmp_path / "s")
    try:
        with Client(server.address, timeout=60) as c:
            got = {k: np.asarray(v) for k, v in c.dict(d.id).items()}  # 0-d entries come back as numpy scalars
            assert_same(got, values)
    finally:
        code, err = server.terminate()
    assert code == 0, err


def test_a_good_snapshot_loads_and_an_empty_directory_starts_empty(saved: Path, tmp_path: Path) -> None:
    registry = Registry()
    assert snapshot.load(registry, saved, torch.device("cpu")) == 2
    assert snapshot.load(Registry(), tmp_path / "nothing-here", torch.device("cpu")) == 0


# -- on demand -------------------------------------------------------------------------------------------


def test_weightavg_snapshot_command_writes_a_snapshot_that_restores(state_server: Runtime, tmp_path: Path) -> None:
    address = f"127.0.0.1:{state_server.port}"
    with Client(address, timeout=60) as c:
        m = c.module(BN_NET)
        c.parm(m, "extra", np.array([[1, 2], [3, 4]], np.float64))  # a parameter registered after creation
        p = c.copyparms(m)
        c.avgparms(m, p)
        c.tensor(np.array(3.5, np.float16))
        before = dump(c)
        cli = subprocess.run(
            [sys.executable, "-c", "import sys; from weightavg._cli import main; sys.exit(main())", "snapshot", address],
            capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        assert "saved 3 handle(s)" in cli.stdout
        c.dict(p, "a.weight", 0.0)  # changes after the snapshot are not in it
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == 3
    with restarted(ServerConfig(host="127.0.0.1", port=0, device="cpu"), restored) as c:
        assert_same(dump(c), before)


def test_snapshot_needs_a_state_dir(client: Client) -> None:
    with pytest.raises(FailedPreconditionError, match="without --state-dir"):
        client.snapshot()


def test_an_old_generation_is_replaced_only_by_a_whole_new_one(state_server: Runtime, tmp_path: Path) -> None:
    with Client(f"127.0.0.1:{state_server.port}", timeout=60) as c:
        c.dict({"a": [1.0]})
        c.snapshot()
        first = sorted(p.name for p in (tmp_path / "d").iterdir())
        c.dict({"b": [2.0]})
        assert c.snapshot()["handles"] == 2
    second = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert first == ["manifest.json", "state-1.json", "tensors-1.safetensors"]
    assert second == ["manifest.json", "state-2.json", "tensors-2.safetensors"]


def test_kinds_without_a_snapshot_format_are_skipped_and_reported(state_server: Runtime, tmp_path: Path) -> None:
    """Handles a format refuses (here a loss object not built by CreateLoss) are reported, not silently lost."""
    from weightavg_server.store.registry import Kind

    with state_server.registry.reserve(handles=1) as reservation:
        loss = state_server.registry.add(Kind.LOSS, torch.nn.MSELoss(), reservation)
    with Client(f"127.0.0.1:{state_server.port}", timeout=60) as c:
        d = c.dict({"a": [1.0]})
        result = c.snapshot()
    assert result["handles"] == 1 and result["skipped"] == [f"{loss} (loss): not a loss built by CreateLoss (MSELoss)"]
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == 1
    assert [h for h, _ in restored.items()] == [d.id]


def test_the_snapshot_command_exits_3_naming_each_handle_it_left_out_and_why(state_server: Runtime) -> None:
    """`weightavg snapshot` exited 0 when the server left handles out, printing them as kinds with "no
    snapshot format yet" (every kind has one; the format had refused the object): a script snapshotting
    before a restart went on and lost them (found by review)."""
    from weightavg._cli import SNAPSHOT_INCOMPLETE
    from weightavg_server.store.registry import Kind

    weightavg = str(Path(sys.executable).parent / "weightavg")
    address = f"127.0.0.1:{state_server.port}"
    with Client(address, timeout=60) as c:
        c.dict({"a": [1.0]})
    whole = subprocess.run([weightavg, "snapshot", address], capture_output=True, text=True, timeout=120)
    assert (whole.returncode, whole.stderr) == (0, "")
    assert whole.stdout.startswith("saved 1 handle(s), 8 tensor bytes, to ")

    with state_server.registry.reserve(handles=1) as reservation:
        loss = state_server.registry.add(Kind.LOSS, torch.nn.MSELoss(), reservation)
    partial = subprocess.run([weightavg, "snapshot", address], capture_output=True, text=True, timeout=120)
    assert partial.returncode == SNAPSHOT_INCOMPLETE == 3
    assert partial.stdout.startswith("saved 1 handle(s), 8 tensor bytes, to ")
    assert partial.stderr == (
        "weightavg snapshot: 1 handle(s) NOT saved, missing from this snapshot and lost if the server restarts from "
        f"it:\n  {loss} (loss): not a loss built by CreateLoss (MSELoss)\n"
    )


# -- the state directory ---------------------------------------------------------------------------------


def test_the_state_directory_is_the_servers_users_alone(tmp_path: Path) -> None:
    """--state-dir was created 0755 under the usual umask, so every user of the host could list it
    (found by review): it and the parents the server makes for it are 0700, before any snapshot."""
    state_dir = tmp_path / "var" / "weightavg"
    old = os.umask(0o022)
    try:
        runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(state_dir)))
    finally:
        os.umask(old)
    runtime.start()
    try:
        for folder in (state_dir, state_dir.parent):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        with Client(f"127.0.0.1:{runtime.port}", timeout=60) as c:
            c.dict({"w": np.ones(3, np.float32)})
            assert c.snapshot()["handles"] == 1
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    finally:
        runtime.stop(None)


def test_a_state_directory_other_users_may_write_is_refused(tmp_path: Path) -> None:
    """Anyone who may write the directory could put in the snapshot the next start restores."""
    state_dir = tmp_path / "shared"
    state_dir.mkdir()
    state_dir.chmod(0o777)
    code, err = refused_start(state_dir)
    assert code == 2
    assert f"refusing to start: the state directory {state_dir} is writable by every user (mode 0777)" in err
    assert f"chmod o-w {state_dir}" in err and "Traceback" not in err


def test_a_state_directory_that_is_a_file_is_refused_at_start(tmp_path: Path) -> None:
    """It started and served, and only the shutdown snapshot failed: every handle lost."""
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    code, err = refused_start(not_a_dir)
    assert code == 2 and f"the state directory {not_a_dir} is not a directory" in err and "Traceback" not in err


def test_a_second_server_on_a_state_directory_in_use_is_refused_and_leaves_the_first_s_snapshot(
    tmp_path: Path,
) -> None:
    """Two servers on one --state-dir each restored it and wrote their own snapshots into it: the
    second one's shutdown snapshot (empty) replaced the first's, and snapshots of both at once
    failed, each removing the other's temporary files (found by review). The second is refused now
    (exit 2, naming the first's pid), touching nothing; once the first has stopped, a server starts
    there and restores its snapshot."""
    state_dir = tmp_path / "s"
    first = start_server(state_dir)
    try:
        with Client(first.address, timeout=60) as c:
            kept = c.dict({"w": np.arange(5, dtype=np.float32)})
            c.snapshot()
        before = {p.name: p.read_bytes() for p in state_dir.iterdir()}
        code, err = refused_start(state_dir)
        assert code == 2, err
        assert (f"refusing to start: the state directory {state_dir} is in use by another weightavg server "
                f"(pid {first.proc.pid})") in err
        assert "its own --state-dir" in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before
    finally:
        code, err = first.terminate()
    assert code == 0, err
    again = start_server(state_dir)  # the kernel let go of the directory with the first process
    try:
        with Client(again.address, timeout=60) as c:
            assert [h.handle.id for h in c.handles()] == [kept.id]
    finally:
        assert again.terminate()[0] == 0


def test_a_first_snapshot_cut_short_by_kill_9_starts_empty(tmp_path: Path) -> None:
    """kill -9 between the first snapshot's tensor file and its manifest left files without a
    manifest, and the server refused every start after it ("refusing to guess"; found by review),
    though there was no earlier snapshot to lose. The marker of the unfinished write says so now."""
    state_dir = tmp_path / "s"
    server = start_server(state_dir)
    c = Client(server.address, timeout=120)
    c.dict({"w": np.ones((64, 1 << 20), np.float32)})  # 256 MiB: the write takes long enough to land in it
    outcome: list[BaseException] = []

    def snapshot_now() -> None:
        try:
            c.snapshot()
        except WeightavgError as exc:  # the server is killed under it
            outcome.append(exc)

    writer = threading.Thread(target=snapshot_now, daemon=True)
    writer.start()
    deadline = time.monotonic() + START_LIMIT
    while not ((state_dir / "tensors-1.safetensors").exists() and not (state_dir / "manifest.json").exists()):
        assert time.monotonic() < deadline and not (state_dir / "manifest.json").exists(), "missed the window"
        time.sleep(0.001)
    server.proc.kill()
    server.proc.communicate(timeout=START_LIMIT)
    writer.join(timeout=START_LIMIT)
    c.close()
    assert len(outcome) == 1
    assert (state_dir / "tensors-1.safetensors").exists()
    assert not (state_dir / "manifest.json").exists()

    restarted = start_server(state_dir)
    with Client(restarted.address, timeout=60) as again:
        assert again.handles() == []
        h = again.dict({"w": np.zeros(2, np.float32)})
        again.snapshot()
    code, err = restarted.terminate()
    assert code == 0 and "a first snapshot that never finished (generation 1" in err
    assert sorted(p.name for p in state_dir.iterdir()) == ["manifest.json", "state-3.json", "tensors-3.safetensors"]
    assert h.id in json.loads((state_dir / "state-3.json").read_text())["handles"][0]["id"]


def test_files_without_a_manifest_and_no_unfinished_write_are_still_refused(saved: Path) -> None:
    """The marker only names an unfinished write: a whole snapshot whose manifest was lost is refused."""
    (saved / "manifest.json").unlink()
    (saved / ".writing-7").write_bytes(b"")  # another generation's marker does not excuse generation 1
    code, err = refused_start(saved)
    assert code == 2 and "no manifest.json" in err and "move" in err


def test_a_snapshot_over_the_caps_of_the_next_start_says_what_the_operator_can_do(saved: Path) -> None:
    """The refusal ended "free some handles first", which a server that has not started cannot do
    (found by review): it names the cap and the two ways out."""
    for flag, cap in (("--max-device-bytes", "1"), ("--max-handles", "1")):
        proc = _start(saved, flag, cap)
        out, err = proc.communicate(timeout=START_LIMIT)
        assert proc.returncode == 1 and "weightavg serving on" not in out and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"weightavg serve: the snapshot in {saved} does not fit this server's caps: ")
        assert flag in line and "free some handles" not in line
        assert line.endswith(f"Start with the cap raised, or move {saved} away to start empty")


def _peak_mib_over(run: Any) -> int:
    """How far the process's peak resident memory rose above its resident memory while `run()` ran."""
    import re

    def field(name: str) -> int:
        return int(re.search(rf"{name}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = field("VmRSS")
    run()
    return field("VmHWM") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_restore_over_the_cap_allocates_no_module_before_refusing(state_server: Runtime) -> None:
    """A module was built from its spec for real, allocated and initialised whole, before any of its
    saved bytes were reserved: a restore refused at a 1,000-byte cap first took the module's size
    (+254 MiB here for a 256 MiB module; on a GPU server, device memory; found by review)."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        c.module(["linear", 8192, 8192])  # 256 MiB
        c.snapshot()
    from weightavg_server.domain.errors import ResourceExhausted
    from weightavg_server.store.limits import Limits

    capped = Registry(Limits(max_device_bytes=1000))

    def restore() -> None:
        with pytest.raises(ResourceExhausted, match="--max-device-bytes"):
            snapshot.load(capped, state_server.config.state_dir, torch.device("cpu"))

    assert _peak_mib_over(restore) < 64
    assert len(capped) == 0


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_restore_allocates_each_module_once(state_server: Runtime) -> None:
    """A module's parameters were placed one by one, then copied into a flat buffer: the second copy
    was allocated unreserved while the first lived on until the whole restore ended, so a restore
    took three times the module's bytes (the file's pages, the placed copies, the flat ones; +389
    MiB for a 128 MiB module) where two are needed (found by review). The parameters now go
    straight into their flat buffer, reserved first, and the module comes back flat as it was."""
    from weightavg_server.domain import flat

    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        q = c.module(["linear", 4096, 8192])  # 128 MiB
        c.snapshot()
    restored = Registry()
    peak = _peak_mib_over(lambda: snapshot.load(restored, state_server.config.state_dir, torch.device("cpu")))
    assert peak < 128 * 2.5  # the file's pages and the module: 2 x 128 MiB, where it was 3 x
    module = restored.get(q.id).obj
    assert flat.is_flat(list(module.parameters()))
    for before, after in zip(state_server.registry.get(q.id).obj.parameters(), module.parameters()):
        assert torch.equal(before, after)
    assert restored.held_bytes() == {"cpu": 4096 * 8192 * 4 + 8192 * 4}


def test_flat_dictionaries_restore_flat(state_server: Runtime) -> None:
    """A copy of a module's parameters, an EMA and a moved dictionary hold their entries back to back
    in one buffer per dtype, so averages into them run as one kernel. They came back entry by entry,
    and every later average took the per-tensor path (found by review). Now they come back flat
    (with the same values, the '.n' count apart), and a dictionary that was not flat stays as it was."""
    from weightavg_server.domain import flat

    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        q = c.module(BN_NET)
        avg = c.copyparms(q)
        c.avgparms(q, avg)
        ema = c.copyparms(q)
        c.ema(q, ema, decay=0.9)
        mixed = c.dict({"a": np.ones(3, np.float32), "b": np.ones(2, np.float64), "c": np.zeros(4, np.float32)})
        c.to(mixed, dtype="float16")
        uploaded = c.dict({"x": np.ones((3, 3), np.float32), "y": np.ones(4, np.float32)})  # one buffer, too
        upload = c.dict({"x": np.ones((3, 3), np.float32)})
        c.dict(upload, "y", np.ones(4, np.float32))  # entries set one call each: each its own storage
        c.snapshot()
    restored = Registry()
    snapshot.load(restored, state_server.config.state_dir, torch.device("cpu"))

    def values(registry: Registry, handle: Any) -> list[torch.Tensor]:
        return [t for name, t in registry.get(handle.id).obj.entries.items() if name != ".n"]

    for d in (avg, ema, mixed, uploaded):
        assert flat.is_flat_by_group(values(state_server.registry, d))
        assert flat.is_flat_by_group(values(restored, d)), d
        for before, after in zip(values(state_server.registry, d), values(restored, d), strict=True):
            assert before.dtype == after.dtype and torch.equal(before, after)
    assert not flat.is_flat(values(state_server.registry, upload)) and not flat.is_flat(values(restored, upload))
    assert restored.get(avg.id).obj.entries[".n"].item() == 2.0
    assert restored.held_bytes() == walked_bytes(restored)


def _averaged(
    c: Client, steps: range, m: Any = None, d: Any = None, walks: list[set[int]] | None = None,
) -> tuple[Any, Any, int]:
    """A linear(4, 3) whose weight is weight(i) at step i, averaged into d over `steps` (made with
    copyparms at step 0 when m and d are None): the same sequence on every server. Also how many of
    the store's `walks` the averages made (`counted_walks`)."""
    made = 0
    if m is None:
        m = c.module(["linear", 4, 3])
        c.parm(m, "bias", np.linspace(-1, 1, 3, dtype=np.float32))
    for i in steps:
        c.parm(m, "weight", weight(i) / 7.0)  # sevenths: averages that round in the last bit
        if i == 0:
            d = c.copyparms(m)
        else:
            before = len(walks or ())
            c.avgparms(m, d)
            made += len(walks or ()) - before
    return m, d, made


@pytest.mark.parametrize("old_snapshot", [False, True], ids=["count-saved-as-own", "snapshot-without-count"])
def test_a_restored_running_average_continues_as_an_uninterrupted_one(
    state_server: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_snapshot: bool
) -> None:
    """Average 3 steps, stop (the shutdown snapshot), restart, average 4 more: the same bits and the
    same '.n' as a server that never stopped. The count an average made came back as a plain '.n'
    entry, so the next average replaced it with a new tensor it had not reserved and walked the
    dictionary to recharge it, where an uninterrupted server writes its count in place (found by review).
    It now comes back as the dictionary's own count. A snapshot written before the count was marked
    ("count" absent) still restores, and its '.n' is replaced by the next average, as an upload's is."""
    steps, split = 8, 4
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        m, d, _ = _averaged(c, range(split))
    state_server.stop(None)  # the shutdown snapshot
    if old_snapshot:
        _edit_state(tmp_path / "d", lambda state: [o["data"].pop("count") for o in state["objects"] if "count" in o["data"]])
    registry = Registry()
    with restarted(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "d")), registry) as c:
        restored = registry.get(d.id).obj
        count = restored.entries[".n"]
        assert count.item() == split
        walks = counted_walks(registry, monkeypatch)
        _, _, replaced = _averaged(c, range(split, steps), m, d, walks)
        assert (restored.entries[".n"] is count) is not old_snapshot  # written in place, as without the restart
        assert replaced == int(old_snapshot)  # the old snapshot's count: replaced once, then its own
        assert registry.held_bytes() == walked_bytes(registry)
        resumed = c.dict(d)
    with restarted(ServerConfig(host="127.0.0.1", port=0, device="cpu")) as c:
        _, fresh, _ = _averaged(c, range(steps))
        uninterrupted = c.dict(fresh)
    assert uninterrupted[".n"] == steps
    assert_same(resumed, uninterrupted)


def test_a_hand_edited_tensor_file_with_a_matching_manifest_is_refused_in_one_line(saved: Path) -> None:
    """The checksums pass when the manifest was edited too; a tensor file that is not safetensors then
    ended the start in a traceback (SafetensorError; found by review)."""
    import hashlib

    path = _files(saved)[".safetensors"]
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (saved / "manifest.json").write_text(json.dumps(manifest))
    code, err = refused_start(saved)
    assert code == 2 and "Traceback" not in err
    assert f"refusing to start: snapshot in {saved} cannot be restored: SafetensorError: " in err


def _edit_state(saved: Path, edit: Any) -> None:
    """Apply edit to the state file's JSON and make the manifest match, as a hand edit would."""
    import hashlib

    path = _files(saved)[".json"]
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (saved / "manifest.json").write_text(json.dumps(manifest))


def _huge_count(state: dict[str, Any]) -> None:
    """A number out of every range: JSON's 1e400 reads as infinity, and int() of it overflows."""
    for row in state["handles"]:
        row["lock"] = 1e400


def _second_handle(field: str, value: Any) -> Any:
    def edit(state: dict[str, Any]) -> None:
        state["handles"][1][field] = value if value is not None else state["handles"][0][field]
    return edit


@pytest.mark.parametrize("edit", [
    _second_handle("tenant", "not a tenant name"),
    _second_handle("id", None),  # the first handle's ID again
    _second_handle("session", "ses_0123456789abcdef0123456789abcdef"),  # a session the state does not hold
])
def test_a_refused_restore_leaves_no_session_handle_or_charge(saved: Path, edit: Any) -> None:
    """The state's sessions and handles were checked one by one as they were registered: a bad second
    handle left the first registered and charged, and every session, in a restore that was refused
    (found by review). Every record is now checked before anything is registered."""
    assert snapshot.load(Registry(), saved, torch.device("cpu")) == 2
    _edit_state(saved, lambda state: state["sessions"].append({"id": "ses_a", "lease": 60.0, "tenant": "default"}))
    _edit_state(saved, edit)
    registry = Registry()
    with pytest.raises(snapshot.SnapshotError, match="cannot be restored"):
        snapshot.load(registry, saved, torch.device("cpu"))
    assert len(registry) == 0 and registry.sessions() == [] and registry.held_bytes() == {}


def test_an_ema_step_out_of_range_in_the_state_is_refused(state_server: Runtime) -> None:
    """The EMA's schedule was checked on a restore as a request's is, its last step not: a state
    saying 2**62 + 1 restored, and the dictionary's next EMA update then failed on a step the client
    never sent (found by review). A server writes no such step; an edited state is refused whole."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=60) as c:
        q = c.module(["linear", 3, 2])
        c.ema(q, c.copyparms(q), decay=0.9)
        c.snapshot()
    saved = Path(state_server.config.state_dir)

    def step_past_the_last(state: dict[str, Any]) -> None:
        (row,) = [o for o in state["objects"] if "ema" in o["data"]]
        row["data"]["ema"]["step"] = 2**62 + 1

    _edit_state(saved, step_past_the_last)
    registry = Registry()
    with pytest.raises(snapshot.SnapshotError, match="the EMA's last step must be between 0 and"):
        snapshot.load(registry, saved, torch.device("cpu"))
    assert len(registry) == 0 and registry.held_bytes() == {}


@pytest.mark.parametrize("edit", ["files-as-a-list", "file-record-as-a-number", "number-out-of-range", "nested-deeply"])
def test_a_hand_edited_manifest_or_state_is_refused_in_one_line(saved: Path, edit: str) -> None:
    """A manifest whose 'files' is not a mapping of records, or is nested past Python's recursion
    limit, or a state number out of range, ended the start in a traceback (AttributeError,
    RecursionError, OverflowError; found by review) rather than the refusal."""
    manifest = json.loads((saved / "manifest.json").read_text())
    if edit == "files-as-a-list":
        manifest["files"] = list(manifest["files"])
    elif edit == "file-record-as-a-number":
        manifest["files"] = {name: 1 for name in manifest["files"]}
    if edit == "number-out-of-range":
        _edit_state(saved, _huge_count)
    elif edit == "nested-deeply":  # past Python's recursion limit: RecursionError, a traceback
        (saved / "manifest.json").write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        (saved / "manifest.json").write_text(json.dumps(manifest))
    code, err = refused_start(saved)
    assert code == 2 and "Traceback" not in err, err
    assert "refusing to start: " in err and ("is unreadable" in err or "OverflowError" in err), err


def test_a_snapshot_cut_later_is_never_overwritten_by_one_cut_earlier(
    state_server: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two snapshots at once (a periodic one and a Snapshot call): the one cut first stalls before its
    write. The second, cut after a change, used to be written first and then overwritten by the older
    cut, so a restart lost a change that the Snapshot call had reported saved (found by review)."""
    cut, release = threading.Event(), threading.Event()
    write = snapshot._write
    stalled = []

    def stall_first(*args: Any) -> snapshot.SnapshotResult:
        if not stalled:  # the first snapshot, its cut taken, before any file is written
            stalled.append(True)
            cut.set()
            release.wait(START_LIMIT)
        return write(*args)

    monkeypatch.setattr(snapshot, "_write", stall_first)
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        c.tensor(np.zeros(3, np.float32))
        first = threading.Thread(target=snapshot.save, args=(state_server.registry, tmp_path / "d"))
        first.start()
        assert cut.wait(START_LIMIT)
        late = c.tensor(np.ones(3, np.float32))  # acknowledged after the first cut
        second = threading.Thread(target=c.snapshot)
        second.start()
        second.join(5.0)  # unfixed, the second snapshot is written meanwhile; fixed, it waits its turn
        release.set()
        first.join()
        second.join()
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == 2
    assert late.id in dict(restored.items())


def test_a_handle_freed_while_a_snapshot_waits_does_not_fail_the_snapshot(state_server: Runtime, tmp_path: Path) -> None:
    """A snapshot waits for a busy object's lock (a long read holds it) while a client that sends no
    request ID frees another handle: the cut failed with that handle's NOT_FOUND ("freed while this
    call waited"), so periodic snapshots could fail again and again on a busy server (found by review).
    It now takes its cut anew, without the freed handle."""
    import grpc

    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        made = [c.tensor(np.full(3, i, np.float32)) for i in range(12)]
    entries = dict(state_server.registry.items())
    # Locks are taken in the order of their ids: the snapshot holds `first`, then waits on `busy`,
    # and has not reached `victim` when it is freed.
    by_lock = sorted(made, key=lambda h: id(entries[h.id].lock))
    first, busy = entries[by_lock[0].id], entries[by_lock[len(made) // 2].id]
    victim_id = by_lock[-1].id
    outcome: dict[str, Any] = {}

    def save() -> None:
        try:
            outcome["result"] = snapshot.save(state_server.registry, tmp_path / "d")
        except WeightavgError as exc:
            outcome["error"] = exc

    busy.lock.acquire()  # as a long evaluate or fetch would
    saver = threading.Thread(target=save)
    saver.start()
    deadline = time.monotonic() + START_LIMIT
    while first.lock.acquire(blocking=False):  # free until the snapshot's cut holds it
        first.lock.release()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with grpc.insecure_channel(f"127.0.0.1:{state_server.port}") as channel:
        freed = pb_grpc.WeightAveragingServiceStub(channel).FreeHandles(
            pb.FreeHandlesRequest(handles=[victim_id]), timeout=60  # no request_id: not held back
        )
    assert freed.freed == 1
    busy.lock.release()
    saver.join()
    assert "error" not in outcome, outcome
    assert outcome["result"].handles == len(made) - 1
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == len(made) - 1
    assert victim_id not in dict(restored.items())


def test_the_shutdown_snapshot_writes_flat_objects_without_copying_them(state_server: Runtime, tmp_path: Path) -> None:
    """A flat module's parameters and a copyparms dictionary's entries are views of one buffer. The
    snapshot cloned every view after the first, so the shutdown snapshot (copy=False, "copies
    nothing") held a second copy of nearly every module and dictionary, unreserved (+367 MB for a 384
    MB module; found by review). The writer now streams each tensor from its own memory
    (`write_tensors`), so views are stored as they are, even views whose bytes overlap (which
    safetensors' own writer refuses), and everything restores exactly."""
    from weightavg_server.domain import flat
    from weightavg_server.store.registry import Kind

    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        q = c.module(BN_NET)
        d = c.copyparms(q)
        c.avgparms(q, d)
        before = dump(c)
    entries = dict(state_server.registry.items())
    module, dictionary = entries[q.id].obj, entries[d.id].obj
    parameters = list(module.parameters())
    copies = [t for name, t in dictionary.entries.items() if name != ".n"]
    assert flat.is_flat(parameters) and flat.is_flat(copies)
    ctx = snapshot.SaveContext(copy=False)
    ctx.ref(module, Kind.MODULE)
    ctx.ref(dictionary, Kind.DICTIONARY)
    stored = {t.data_ptr() for t in ctx.tensors.values()}
    assert {p.data_ptr() for p in parameters} <= stored and {t.data_ptr() for t in copies} <= stored
    whole = torch.arange(10.0)
    overlapping = snapshot.SaveContext(copy=False)
    overlapping.tensor(whole)
    overlapping.tensor(whole[2:5])  # inside `whole`: stored as it is too
    assert overlapping.tensors["t1"].data_ptr() == whole[2:5].data_ptr()
    snapshot.write_tensors(tmp_path / "o.safetensors", overlapping.tensors, set(), {}, None)
    back = safetensors.torch.load_file(str(tmp_path / "o.safetensors"))
    assert back["t0"].tolist() == whole.tolist() and back["t1"].tolist() == [2.0, 3.0, 4.0]
    state_server.stop(None)  # the shutdown snapshot
    with restarted(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "d"))) as c:
        assert_same(dump(c), before)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_restored_objects_do_not_keep_the_snapshot_file_mapped(state_server: Runtime, tmp_path: Path) -> None:
    """safetensors reads a file as a private mapping, and the restored objects were tensors in it: the
    next snapshot deleted the file, but its disk blocks stayed taken while the server ran (a third
    snapshot's room, where the docs promise two), and an edit of the file in place reached live
    weights (found by review). Restored tensors are now copies of their own, with the same values."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        d = c.dict({"w": np.arange(4096, dtype=np.float32), "v": np.ones(3, np.float64)})
        t = c.tensor(np.arange(6, dtype=np.int64).reshape(2, 3))
        before = dump(c)
    state_server.stop(None)  # the shutdown snapshot
    with restarted(ServerConfig(host="127.0.0.1", port=0, device="cpu", state_dir=str(tmp_path / "d"))) as c:
        c.snapshot()  # deletes the generation the server restored from
        assert_same(dump(c), before)
        assert {d.id, t.id} <= set(before)
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path / "d") in line]
        assert mapped == []


def test_a_snapshot_the_disk_cannot_hold_is_refused_cleanly_and_leaves_the_last_one(tmp_path: Path) -> None:
    """safetensors reports a failed write (a full disk) as SafetensorError, not OSError: the Snapshot
    call answered INTERNAL, the shutdown snapshot ended the server in a traceback, and the failed
    generation's files stayed, taking the room the next try needed (found by review). Now: FAILED_
    PRECONDITION, one line and exit 1 at shutdown, nothing left of the failed generation, and the
    last complete snapshot restores."""
    state_dir = tmp_path / "d"
    proc = subprocess.Popen(
        with_limits([sys.executable, "-m", "weightavg_server", "--port", "0", "--device", "cpu", "--state-dir",
                     str(state_dir)], file_bytes=1 << 20),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.startswith("weightavg serving on "), line
    with Client(line.removeprefix("weightavg serving on ").strip(), timeout=60) as c:
        c.tensor(np.ones(1000, np.float32))
        c.snapshot()
        saved = sorted(os.listdir(state_dir))
        c.tensor(np.ones(1 << 19, np.float32))  # 2 MiB: its tensor file cannot be written
        with pytest.raises(FailedPreconditionError, match="cannot write a snapshot to .*File too large"):
            c.snapshot()
        assert sorted(os.listdir(state_dir)) == saved
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=START_LIMIT)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "shutdown snapshot failed, live handles are lost: cannot write a snapshot" in err
    assert sorted(os.listdir(state_dir)) == saved
    assert snapshot.load(Registry(), state_dir, torch.device("cpu")) == 1


# -- the streaming tensor writer -------------------------------------------------------------------------


def _awkward_tensors() -> dict[str, torch.Tensor]:
    """Tensors of every stored dtype and layout a server can hold: strided, expanded, lazily conjugated,
    0-dim, empty, and a complex128 (stored as its bytes, the key "raw")."""
    g = torch.Generator().manual_seed(0)
    return {
        "transposed": torch.randn(7, 3, generator=g).t(),
        "sliced": torch.randn(6, 5, generator=g)[:, 1:4],
        "expanded": torch.randn(3, generator=g).expand(4, 3),
        "conj": (torch.randn(4, generator=g) * 1j).to(torch.complex64).conj(),
        "scalar": torch.tensor(3.0, dtype=torch.float64),
        "ints": torch.arange(10, dtype=torch.int32),
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "bools": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "bytes": torch.arange(3, dtype=torch.int8),
        "raw": (torch.randn(5, generator=g) + 1j).to(torch.complex128),
    }


@pytest.mark.parametrize("chunk", [1, 16, 1 << 24])
def test_the_tensor_writer_streams_through_one_bounded_buffer_and_safetensors_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """safetensors' save_file takes every tensor at once and moves each GPU tensor to the host first:
    a shutdown snapshot of a GPU server held a host copy of everything, unreserved (found by review).
    `write_tensors` streams: a contiguous CPU tensor from its own memory, any other through one host
    buffer of `buffer_bytes` (at most WRITE_CHUNK, or one row of a strided tensor), the same steps on
    a GPU, where the copy into the buffer is a device-to-host one. Its file reads back with
    safetensors' own loader to the values save_file would store, whatever the chunk."""
    monkeypatch.setattr(snapshot, "WRITE_CHUNK", chunk)
    tensors = _awkward_tensors()
    need = snapshot.buffer_bytes(tensors)
    # The copied tensors: transposed (84 bytes, rows of 28), sliced (72, rows of 12), expanded (48,
    # rows of 12), conj (32, contiguous). Small chunks: the widest row; a large one: the largest tensor.
    assert need == (84 if chunk >= 84 else 28)
    buffer = torch.empty(need, dtype=torch.uint8)
    for name, t in tensors.items():
        pieces = [bytes(p.numpy()) for p in snapshot.host_pieces(t, buffer)]
        own = [p.data_ptr() for p in snapshot.host_pieces(t, buffer)]
        if t.is_contiguous() and not t.is_conj():
            assert own == ([t.data_ptr()] if t.numel() else []), name  # its own memory, nothing copied
        else:  # through the buffer alone (the GPU's path), a piece at a time
            assert own and set(own) == {buffer.data_ptr()} and max(map(len, pieces)) <= need, name
            assert len(pieces) > 1 or chunk >= 84, name
        assert b"".join(pieces) == t.resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name

    snapshot.write_tensors(tmp_path / "w.safetensors", tensors, {"raw"}, {"format": "f"}, buffer)
    back = safetensors.torch.load_file(str(tmp_path / "w.safetensors"))
    expected = {k: t.resolve_conj().contiguous() for k, t in tensors.items() if k != "raw"}
    safetensors.torch.save_file(expected, tmp_path / "ref.safetensors", {"format": "f"})
    reference = safetensors.torch.load_file(str(tmp_path / "ref.safetensors"))
    assert set(back) == {*reference, "raw"}
    for k, t in reference.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    assert back["raw"].view(torch.complex128).tolist() == tensors["raw"].tolist()
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "f"}


def test_the_shutdown_snapshot_streams_through_one_reserved_host_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown snapshot (copy=False) needs host memory only for the tensors it cannot write in
    place (on a GPU: all of them; on the CPU: strided ones), and only one piece of them at a time:
    that buffer is reserved against the host cap before it is made. It copied every such tensor
    whole, all at once and unreserved (found by review). A 512 KiB strided tensor (rows of 2 KiB)
    streams through 4 KiB: one byte less room is refused in one line and writes nothing; exactly
    that room writes a snapshot that restores bit for bit and leaves the ledger as it was."""
    from weightavg_server.domain.tensors import TensorHolder
    from weightavg_server.store.limits import Limits
    from weightavg_server.store.registry import Kind

    monkeypatch.setattr(snapshot, "WRITE_CHUNK", 4096)
    big = torch.randn(512, 256, generator=torch.Generator().manual_seed(1)).t()
    registry = Registry()
    with registry.reserve(handles=1, nbytes={"cpu": big.numel() * big.element_size()}) as reservation:
        handle = registry.add(Kind.TENSOR, TensorHolder(big), reservation)
    held = registry.held_bytes()
    assert held == {"cpu": 512 * 256 * 4}
    registry.set_limits(Limits(max_device_bytes=held["cpu"] + 4095))
    with pytest.raises(snapshot.SnapshotError, match="to the host 4096 bytes at a time, and those do not fit"):
        snapshot.save(registry, tmp_path / "d", copy=False)
    assert not (tmp_path / "d" / "manifest.json").exists() and registry.held_bytes() == held
    registry.set_limits(Limits(max_device_bytes=held["cpu"] + 4096))
    assert snapshot.save(registry, tmp_path / "d", copy=False).tensor_bytes == held["cpu"]
    assert registry.held_bytes() == held
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == 1
    assert torch.equal(restored.get(handle).obj.tensor, big)


def test_a_copy_that_fails_during_the_streamed_write_is_a_snapshot_error_leaving_the_last_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device-to-host copy that torch fails while the tensor file streams (on a GPU: a CUDA error,
    out of memory; both RuntimeError) escaped `_write`, which turned only OSError into SnapshotError:
    the shutdown ended in a traceback and the failed generation's files stayed (found by review). Here
    the CPU path's copy of a strided tensor fails the same way."""
    from weightavg_server.domain.tensors import TensorHolder
    from weightavg_server.store.registry import Kind

    registry = Registry()
    strided = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)).t()
    with registry.reserve(handles=1, nbytes={"cpu": strided.numel() * 4}) as reservation:
        handle = registry.add(Kind.TENSOR, TensorHolder(strided), reservation)
    directory = tmp_path / "d"
    snapshot.save(registry, directory, copy=False)
    saved = sorted(os.listdir(directory))
    pieces = snapshot.host_pieces

    def failing(t: torch.Tensor, buffer: torch.Tensor | None) -> Iterator[torch.Tensor]:
        if buffer is not None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from pieces(t, buffer)

    monkeypatch.setattr(snapshot, "host_pieces", failing)
    with pytest.raises(snapshot.SnapshotError, match="cannot write a snapshot to .*CUDA error"):
        snapshot.save(registry, directory, copy=False)
    assert sorted(os.listdir(directory)) == saved
    monkeypatch.setattr(snapshot, "host_pieces", pieces)
    restored = Registry()
    assert snapshot.load(restored, directory, torch.device("cpu")) == 1
    assert torch.equal(restored.get(handle).obj.tensor, strided)


def test_a_snapshot_whose_tensor_file_safetensors_save_file_wrote_still_restores(tmp_path: Path) -> None:
    """Snapshots written before `write_tensors` hold a tensor file from safetensors' save_file (its own
    layout: a raw complex128 may sit right after an odd-length bool, misaligned). Such a generation
    still restores bit for bit: the same tensors, rewritten by save_file under a re-digested manifest."""
    from weightavg_server.domain.tensors import TensorHolder
    from weightavg_server.store.registry import Kind

    g = torch.Generator().manual_seed(3)
    values = [
        torch.tensor([True, False, True]), (torch.randn(5, generator=g) + 1j).to(torch.complex128),
        torch.randn(6, 4, generator=g).t(), torch.arange(3, dtype=torch.int32),
        torch.tensor(2.5, dtype=torch.float64), torch.zeros(2, 0, 3, dtype=torch.bfloat16),
    ]
    registry = Registry()
    handles = []
    for v in values:
        with registry.reserve(handles=1, nbytes={"cpu": v.numel() * v.element_size()}) as reservation:
            handles.append(registry.add(Kind.TENSOR, TensorHolder(v), reservation))
    directory = tmp_path / "d"
    snapshot.save(registry, directory, copy=False)
    manifest = json.loads((directory / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith("tensors-"))
    stored = safetensors.torch.load_file(str(directory / name))
    safetensors.torch.save_file({k: t.contiguous() for k, t in stored.items()}, directory / name, {"format": snapshot.FORMAT})
    manifest["files"][name] = snapshot._digest(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    restored = Registry()
    assert snapshot.load(restored, directory, torch.device("cpu")) == len(values)
    for handle, v in zip(handles, values):
        back = restored.get(handle).obj.tensor
        assert back.dtype == v.dtype and back.shape == v.shape and torch.equal(back, v)
