"""Averaging within groups of consecutive ranks (`allreduce(group_size=k)`) and torch's model averaging
schedules (weightavg.PeriodicAverager, HierarchicalAverager) through a real 4-rank CPU cluster
(torchrun, gloo on loopback), the schedules against torch's own averagers run under torchrun on the
same data (tests/averager_oracle.py). The cluster is started once for the module (about 5-10 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from weightavg import Client, HierarchicalAverager, InvalidArgumentError, PeriodicAverager
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain.collectives import INPLACE_BYTES
from weightavg_server.ops.launch import START_SECONDS

from conftest import Cluster

ROOT = Path(__file__).resolve().parent.parent
RANKS = 4


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("four"), ranks=RANKS)
    try:
        yield c
    finally:
        c.stop()


def per_rank(c: Client, h: Any, names: list[str]) -> list[dict[str, np.ndarray]]:
    return [{n: np.asarray(c.parm(h, n, rank=r)) for n in names} for r in range(RANKS)]


def test_groups_of_two_average_among_themselves_for_large_and_small_tensors(four: Cluster) -> None:
    """Rank r holds (r + 1) * base. Groups of 2: ranks 0 and 1 reach 1.5 * base, ranks 2 and 3 3.5 * base
    (equal weights); weighted 1, 3 | 2, 2: 1.75 and 3.5; groups of 4 (every rank) 2.5. A weight large
    enough to be reduced in place and a bias small enough for a bucket; base is small integers times
    powers of two, so every result is exact in float32."""
    assert 400 * 300 * 4 >= INPLACE_BYTES > 300 * 4
    base = {"weight": (np.arange(300 * 400) % 64).reshape(300, 400).astype(np.float32) / 4,
            "bias": (np.arange(300) % 16).astype(np.float32)}
    with Client(four.address, timeout=60) as c:
        m = c.module(["linear", 400, 300], replicate=True)
        for weights, expected in ((None, [1.5, 1.5, 3.5, 3.5]), ([1, 3, 2, 2], [1.75, 1.75, 3.5, 3.5])):
            for r in range(RANKS):
                for name, value in base.items():
                    c.parm(m, name, value * (r + 1), rank=r)
            assert c.allreduce(m, weights=weights, group_size=2) == 2
            for r, values in enumerate(per_rank(c, m, ["weight", "bias"])):
                for name, value in values.items():
                    assert np.array_equal(value, base[name] * expected[r]), (weights, r, name)
        d = c.copyparms(m)  # a replicated dictionary: each rank's copy of its own values
        assert c.allreduce(d, group_size=4) == 2  # the world: the same as group_size=0
        for r in range(RANKS):
            assert np.array_equal(c.dict(d, "bias", rank=r), base["bias"] * 2.625), r  # mean of 1.75, 1.75, 3.5, 3.5
        c.free(m, d)


def test_sizes_alternate_and_groups_of_one_keep_every_ranks_values(four: Cluster) -> None:
    """Each size's subgroups are made once, by every rank, inside the first allreduce that asks for it;
    later calls of any size find them. Groups of one send nothing (no collective) and change nothing."""
    with Client(four.address, timeout=60) as c:
        d = c.dict({"w": np.zeros(5, np.float32)}, replicate=True)
        for r in range(RANKS):
            c.dict(d, "w", np.full(5, 4.0 * r, np.float32), rank=r)
        assert c.allreduce(d, group_size=1) == 1
        assert [float(c.dict(d, "w", rank=r)[0]) for r in range(RANKS)] == [0.0, 4.0, 8.0, 12.0]
        with grpc.insecure_channel(four.address) as channel:
            stub = pb_grpc.WeightAveragingServiceStub(channel)
            assert stub.AllReduce(pb.AllReduceRequest(handle=d.id, group_size=1), timeout=60).buckets == 0
        for size, expected in ((2, [2.0, 2.0, 10.0, 10.0]), (0, [6.0] * 4), (2, [6.0] * 4)):
            c.allreduce(d, group_size=size)
            assert [float(c.dict(d, "w", rank=r)[0]) for r in range(RANKS)] == expected, size
        for r in range(RANKS):
            c.dict(d, "w", np.full(5, 4.0 * r, np.float32), rank=r)
        c.allreduce(d, group_size=2)
        assert [float(c.dict(d, "w", rank=r)[0]) for r in range(RANKS)] == [2.0, 2.0, 10.0, 10.0]
        c.free(d)


def test_group_sizes_and_weights_no_group_can_take_are_refused_with_every_rank_unchanged(four: Cluster) -> None:
    with Client(four.address, timeout=60) as c, grpc.insecure_channel(four.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        d = c.dict({"w": np.zeros(3, np.float32)}, replicate=True)
        for r in range(RANKS):
            c.dict(d, "w", np.full(3, float(r), np.float32), rank=r)
        refused = [
            (pb.AllReduceRequest(handle=d.id, group_size=3), "give one of 1, 2, 4, or 0 for one group of every rank"),
            (pb.AllReduceRequest(handle=d.id, group_size=8), "give one of 1, 2, 4"),
            (pb.AllReduceRequest(handle=d.id, group_size=-2), "give one of 1, 2, 4"),
            (pb.AllReduceRequest(handle=d.id, group_size=2, weights=[1, 1, 0, 0]), "in every group of 2 consecutive ranks"),
            (pb.AllReduceRequest(handle=d.id, group_size=2, weights=[1, 1]), "one weight per rank: 2 weight(s) for 4"),
            (pb.AllReduceRequest(handle=d.id, group_size=2, op=pb.REDUCE_OP_SUM, weights=[1, 1, 1, 1]), "weights go with op='mean'"),
        ]
        for request, fix in refused:
            with pytest.raises(grpc.RpcError) as err:
                stub.AllReduce(request, timeout=60)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert fix in err.value.details(), err.value.details()
        with pytest.raises(TypeError, match="group_size is a whole number of ranks"):
            c.allreduce(d, group_size=2.0)  # type: ignore[arg-type]
        assert [float(c.dict(d, "w", rank=r)[0]) for r in range(RANKS)] == [0.0, 1.0, 2.0, 3.0]
        c.free(d)


def test_a_retried_group_sum_runs_once(four: Cluster) -> None:
    """The same request ID twice (a retry after a lost answer): one sum within the groups, not two."""
    with Client(four.address, timeout=60) as c, grpc.insecure_channel(four.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        d = c.dict({"w": np.zeros(2, np.float32)}, replicate=True)
        for r in range(RANKS):
            c.dict(d, "w", np.full(2, 1.0 + r, np.float32), rank=r)
        request = pb.AllReduceRequest(
            handle=d.id, op=pb.REDUCE_OP_SUM, group_size=2, request_id="1b4e28ba-2fa1-41d2-883f-0016d3cca427"
        )
        assert stub.AllReduce(request, timeout=60).tensors == stub.AllReduce(request, timeout=60).tensors == 1
        assert [float(c.dict(d, "w", rank=r)[0]) for r in range(RANKS)] == [3.0, 3.0, 7.0, 7.0]
        c.free(d)


@pytest.mark.parametrize("schedule", [
    {"kind": "hierarchical", "periods": [(2, 2), (3, 4)], "warmup": 1},
    {"kind": "hierarchical", "periods": [(1, 2), (4, 4)], "warmup": 0},
    {"kind": "periodic", "period": 3, "warmup": 2},
], ids=["hierarchical-2x2-3x4", "hierarchical-1x2-4x4", "periodic-3-warmup-2"])
def test_schedules_equal_torchs_model_averagers_under_torchrun(
    four: Cluster, tmp_path: Path, schedule: dict[str, Any]
) -> None:
    """Eight training steps (one SGD step on each rank's whole shard), each followed by the averager:
    every rank's weight and bias, and the group averaged over at each step, equal those of torch's
    PeriodicModelAverager / HierarchicalModelAverager driving the same model under torchrun
    (tests/averager_oracle.py). Groups of 2 and 4 scale by 1/2 and 1/4, exact in float32 as torch's
    division is; tolerance 1e-6 for gloo's order of the SUM."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=gen), torch.randn(48, 1, generator=gen)
    weight, bias = torch.randn(1, 5, generator=gen), torch.randn(1, generator=gen)
    lr, steps = 0.1, 8
    with Client(four.address, timeout=60) as c:
        m = c.module(["linear", 5, 1], replicate=True)
        c.parm(m, "weight", weight.numpy())
        c.parm(m, "bias", bias.numpy())
        model = c.model(m, c.loss("mse"), c.opt("sgd", m, lr))
        c.train(model, batchsize=len(x) // RANKS)
        assert c.train(model, x.numpy(), y.numpy(), shard=True) == 1
        averager: PeriodicAverager | HierarchicalAverager
        if schedule["kind"] == "periodic":
            averager = PeriodicAverager(c, model, schedule["period"], schedule["warmup"])
        else:
            averager = HierarchicalAverager(c, model, dict(schedule["periods"]), schedule["warmup"])
        sizes = []
        for _ in range(steps):
            c.run(model)
            done = averager.average_parameters()
            sizes.append(RANKS if done is True else int(done))
        ours = per_rank(c, model, ["weight", "bias"])
        c.free(model)
    data = tmp_path / "in.pt"
    torch.save({"x": x, "y": y, "weight": weight, "bias": bias, "lr": lr, "steps": steps, **schedule}, data)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
         str(ROOT / "tests" / "averager_oracle.py"), str(data), str(tmp_path / "out")],
        timeout=START_SECONDS, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert done.returncode == 0, f"the oracle failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for r in range(RANKS):
        oracle = torch.load(tmp_path / f"out-{r}.pt")
        assert sizes == oracle["sizes"], r
        for name in ("weight", "bias"):
            assert np.abs(ours[r][name] - oracle[name].numpy()).max() <= 1e-6, (r, name)
    # The schedule did average within groups and over the world, and the ranks do differ in between.
    assert {s for s in sizes} >= ({2, 4} if schedule["kind"] == "hierarchical" else {0, 4})
    if sizes[-1] != RANKS:
        assert not np.array_equal(ours[0]["weight"], ours[RANKS - 1]["weight"])
