"""A local cluster: torchrun --standalone running `weightavg serve` with N ranks on this machine.

Rank 0's API binds a free loopback port; torchrun's rendezvous and gloo pick free ports of their own.
The examples, the benchmark and the tests start their clusters with it (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import weightavg_server

START_SECONDS = 120.0
"""Bound on a start: every rank imports torch and meets the others over gloo, slowly on a busy machine."""

_SERVING = re.compile(r"weightavg serving on ([\d.]+:\d+)")


def _import_path() -> str:
    """PYTHONPATH for the ranks: where this weightavg_server (and a weightavg beside it) was imported
    from, ahead of the inherited path, so a source checkout runs its own code."""
    here = Path(weightavg_server.__file__).resolve().parent.parent
    paths = [str(here), str(here.parent / "client")]
    return os.pathsep.join([p for p in paths if Path(p).is_dir()] + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


class LocalCluster:
    """torchrun with `ranks` workers of `-m weightavg_server serve --port 0`; `address` is rank 0's API
    once it serves. Its output (every rank's) goes to `log`. Stop it with `stop()` or a `with` block.

    Args:
        ranks: workers (torchrun's --nproc-per-node).
        serve: more `weightavg serve` flags.
        torchrun: more torchrun flags (before `-m`, e.g. "--max-restarts=1").
        device: every rank's --device; "cpu" gives gloo on loopback.
        log: where the output goes (default: a temporary file, removed at stop).
        threads: OMP_NUM_THREADS of every rank (ranks on one machine share its cores).

    Raises:
        RuntimeError: the cluster did not serve within START_SECONDS (the log's tail says why).
    """

    def __init__(
        self, ranks: int = 2, *, serve: Sequence[str] = (), torchrun: Sequence[str] = (), device: str = "cpu",
        log: Path | None = None, threads: int = 1,
    ) -> None:
        self._temporary = log is None
        if log is None:
            fd, name = tempfile.mkstemp(prefix="weightavg-cluster-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = log
        self._out = log.open("w")
        env = {**os.environ, "PYTHONPATH": _import_path(), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
             "--monitor-interval", "1", *torchrun,
             "-m", "weightavg_server", "serve", "--host", "127.0.0.1", "--port", "0", "--device", device, *serve],
            stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            self.address = self.wait_serving(0)
        except BaseException:
            self.stop()
            raise

    def wait_serving(self, seen: int) -> str:
        """The address of the (seen+1)-th `weightavg serving on` line (a restarted cluster prints another)."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            found = _SERVING.findall(self.log.read_text())
            if len(found) > seen:
                return str(found[seen])
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the cluster did not serve within {START_SECONDS:.0f} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM to the whole process group (rank 0 drains, the others follow it), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()
        if self._temporary:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def cluster_serving(address: str | None = None, ranks: int = 2, device: str = "cpu") -> Iterator[str]:
    """A cluster's address for the block: `address` when given, else a LocalCluster's of `ranks` ranks,
    stopped after the block (as `ops.app.serving` is for one server)."""
    if address:
        yield address
        return
    with LocalCluster(ranks, device=device) as cluster:
        yield cluster.address
