"""A real 2-rank CPU cluster: torchrun, gloo on loopback, rank 0 serving gRPC (docs/cluster.md).

Each test starts its own cluster (about 5-10 s on a small machine) and stops it; every wait is
bounded and fails with a message; child processes are killed at the end whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from weightavg import Client, FailedPreconditionError, UnavailableError
from weightavg._retry import RetryPolicy
from weightavg_server import cluster as fabric
from weightavg_server.ops.launch import START_SECONDS
from weightavg_server.store.snapshot import SnapshotError

from conftest import Cluster  # the `cluster` fixture is conftest's too

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0


def cluster_generations(directory: Path) -> list[int]:
    return fabric.generations(str(directory))


def client(address: str) -> Client:
    return Client(address, timeout=WAIT, retry=RetryPolicy(max_attempts=1))


def test_info_reports_every_rank(cluster: Cluster) -> None:
    with client(cluster.address) as c:
        info = c.info()
    assert info["world_size"] == 2
    assert [(r["rank"], r["device"]) for r in info["ranks"]] == [(0, "cpu"), (1, "cpu")]


def test_a_replicated_module_averages_across_ranks(cluster: Cluster) -> None:
    """Weight r+1 on rank r: the mean over two ranks is 1.5 on both (exact in float32)."""
    with client(cluster.address) as c:
        m = c.module(["linear", 3, 2], replicate=True)
        assert np.array_equal(c.parm(m, "weight", rank=0), c.parm(m, "weight", rank=1))  # rank 0's init on all
        for r in range(2):
            c.parm(m, "weight", np.full((2, 3), r + 1.0, np.float32), rank=r)
        assert c.allreduce(m) == 2
        for r in range(2):
            assert np.array_equal(c.parm(m, "weight", rank=r), np.full((2, 3), 1.5, np.float32))
        d = c.dict({"a": np.array([1.0, 3.0], np.float32)}, replicate=True)
        c.dict(d, "a", np.array([3.0, 7.0], np.float32))  # every rank
        assert c.allreduce(d, weights=[1, 3]) == 1
        assert c.dict(d, "a", rank=1).tolist() == [3.0, 7.0]
        local = c.module(["linear", 3, 2])
        with pytest.raises(FailedPreconditionError, match="replicate=True"):
            c.allreduce(local)


def test_a_placed_dictionary_lives_on_its_rank(cluster: Cluster) -> None:
    with client(cluster.address) as c:
        before = [r["handles"] for r in c.info()["ranks"]]
        d = c.dict({"w": np.arange(4, dtype=np.float32)}, rank=1)
        after = [r["handles"] for r in c.info()["ranks"]]
        assert after == [before[0], before[1] + 1]  # on rank 1, not on rank 0
        assert c.dict(d, "w").tolist() == [0.0, 1.0, 2.0, 3.0]
        c.dict(d, "w", np.ones(4, np.float32))
        assert c.size(d) == {"w": (4,)}
        with pytest.raises(FailedPreconditionError, match="rank 1"):
            c.dict(d, "w", rank=0)
        assert c.free(d) == 1
        assert [r["handles"] for r in c.info()["ranks"]] == before


def test_sharded_local_sgd_equals_a_torch_distributed_script(cluster: Cluster, tmp_path: Path) -> None:
    """Two rounds of (one epoch per rank on its shard, allreduce) against tests/localsgd_oracle.py under
    torchrun on the same data and start. Tolerance 1e-6: the same float32 operations in the same order
    on the same CPU kernels; only the SUM's order inside gloo could differ, by an ulp."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randn(64, 1, generator=gen)
    weight, bias = torch.randn(1, 5, generator=gen), torch.randn(1, generator=gen)
    lr, batch, rounds = 0.05, 8, 2
    with client(cluster.address) as c:
        m = c.module(["linear", 5, 1], replicate=True)
        c.parm(m, "weight", weight.numpy())
        c.parm(m, "bias", bias.numpy())
        model = c.model(m, c.loss("mse"), c.opt("sgd", m, lr))
        c.train(model, batchsize=batch)
        assert c.train(model, x.numpy(), y.numpy(), shard=True) == 32 // batch
        for _ in range(rounds):
            c.run(model)
            c.allreduce(model)
        ours = {name: np.asarray(c.parm(model, name, rank=r)) for name in ("weight", "bias") for r in (0,)}
        assert np.array_equal(c.parm(model, "weight", rank=1), ours["weight"])
    data = tmp_path / "in.pt"
    torch.save({"x": x, "y": y, "weight": weight, "bias": bias, "lr": lr, "batch": batch, "rounds": rounds,
                "epochs": 1}, data)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "localsgd_oracle.py"), str(data), str(tmp_path / "out.pt")],
        timeout=START_SECONDS, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert done.returncode == 0, f"the oracle failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    oracle = torch.load(tmp_path / "out.pt")
    for name in ("weight", "bias"):
        assert np.abs(ours[name] - oracle[name].numpy()).max() <= 1e-6, name


def test_a_killed_rank_gives_unavailable_within_a_minute(cluster: Cluster) -> None:
    with client(cluster.address) as c:
        m = c.module(["linear", 2, 2], replicate=True)
        os.kill(cluster.rank_pid(1), signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < deadline, "no UNAVAILABLE within 60 s of killing rank 1"
            try:
                c.allreduce(m)
            except UnavailableError:
                break
            time.sleep(0.5)


def test_a_restarted_cluster_serves_the_snapshot(tmp_path: Path) -> None:
    """--max-restarts 1 and periodic snapshots: after rank 1 is killed, torchrun restarts both ranks,
    every rank restores the same generation, and the same handles hold the same values on both ranks."""
    state = tmp_path / "state"
    cluster = Cluster(tmp_path, "--max-restarts=1", "--state-dir", str(state), "--snapshot-every", "0.5")
    try:
        with client(cluster.address) as c:
            m = c.module(["linear", 3, 2], replicate=True)
            for r in range(2):
                c.parm(m, "weight", np.full((2, 3), 2.0 * r, np.float32), rank=r)
            d = c.dict({"w": np.arange(3, dtype=np.float32)}, rank=1)
        # A generation begun after the last change: two past the newest one seen now.
        wanted = max(cluster_generations(state / "rank-0"), default=0) + 2
        deadline = time.monotonic() + WAIT
        while not all(max(cluster_generations(state / f"rank-{r}"), default=0) >= wanted for r in range(2)):
            assert time.monotonic() < deadline, f"no snapshot generation {wanted} within {WAIT} s"
            time.sleep(0.2)
        os.kill(cluster.rank_pid(1), signal.SIGKILL)
        address = cluster.wait_serving(1)
        with client(address) as c:
            assert c.parm(m, "weight", rank=1).tolist() == [[2.0] * 3] * 2
            assert c.parm(m, "weight", rank=0).tolist() == [[0.0] * 3] * 2
            assert c.dict(d, "w").tolist() == [0.0, 1.0, 2.0]
            c.allreduce(m)
            assert c.parm(m, "weight", rank=1).tolist() == [[1.0] * 3] * 2
    finally:
        cluster.stop()
    log = cluster.out.read_text()
    restored = re.findall(r"rank (\d) restores snapshot generation (\d+)", log)
    assert {r for r, _ in restored} == {"0", "1"} and len({g for _, g in restored}) == 1, restored


def test_ranks_restore_the_newest_generation_all_of_them_hold(tmp_path: Path) -> None:
    """A snapshot counts only once every rank wrote it: rank 0 finished generation 3, rank 1 died
    writing it (no manifest), so both restore 2, and 3 is removed."""
    for rank, gens in ((0, (2, 3)), (1, (2,))):
        for g in gens:
            (tmp_path / f"rank-{rank}" / f"gen-{g}").mkdir(parents=True)
            (tmp_path / f"rank-{rank}" / f"gen-{g}" / "manifest.json").write_text("{}")
    (tmp_path / "rank-1" / "gen-3").mkdir()  # torn: its manifest is written last
    held = [fabric.generations(str(tmp_path / f"rank-{r}")) for r in range(2)]
    assert held == [[2, 3], [2]]
    assert fabric.common_generation(held) == 2
    assert fabric.common_generation([[], []]) == 0
    with pytest.raises(SnapshotError, match="no common generation"):
        fabric.common_generation([[4], []])
    for r in range(2):
        fabric.prune(str(tmp_path / f"rank-{r}"), 2)
        assert sorted(p.name for p in (tmp_path / f"rank-{r}").iterdir()) == ["gen-2"]
        assert fabric.restore_dir(str(tmp_path / f"rank-{r}")).endswith("gen-2")
