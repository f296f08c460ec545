"""allreduce through a real 2-rank cluster on tensors of both paths of domain/collectives.py (a weight
large enough to be reduced in place and a bias small enough for a bucket), and the outer step that
follows an average in DiLoCo; tests/test_cluster.py has the rest of the cluster's tests."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from weightavg import Client, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain.collectives import INPLACE_BYTES

from conftest import Cluster


def test_a_weighted_mean_reaches_every_rank_for_large_and_small_tensors(cluster: Cluster) -> None:
    """Rank r holds (r+1) * base; weights 1 and 3 give 1.75 * base on both ranks. base is small integers
    times powers of two, so the float32 result is exact."""
    assert 400 * 300 * 4 >= INPLACE_BYTES > 300 * 4
    base = {"weight": (np.arange(300 * 400) % 64).reshape(300, 400).astype(np.float32) / 4,
            "bias": (np.arange(300) % 16).astype(np.float32)}
    with Client(cluster.address, timeout=60) as c:
        m = c.module(["linear", 400, 300], replicate=True)
        for r in range(2):
            for name, value in base.items():
                c.parm(m, name, value * (r + 1), rank=r)
        assert c.allreduce(m, op="mean", weights=[1, 3]) == 2
        for r in range(2):
            for name, value in base.items():
                assert np.array_equal(c.parm(m, name, rank=r), value * 1.75), (r, name)
        c.free(m)


def test_flat_and_differently_laid_out_objects_reduce_alike(cluster: Cluster) -> None:
    """A replicated module is built flat on every rank (one collective per buffer), and a replicated
    copy whose entry was replaced on rank 1 only is laid out differently there (the ranks then go
    tensor by tensor): both reach the weighted mean, exactly, on both ranks."""
    spec = ["sequential", ["linear", "a", 200, 300], ["linear", "b", 300, 100]]
    with Client(cluster.address, timeout=60) as c:
        m = c.module(spec, replicate=True)
        names = c.parmnames(m)
        for r in range(2):
            for i, name in enumerate(names):
                shape = c.parm(m, name, rank=r).shape
                c.parm(m, name, np.full(shape, 4.0 * (r + 1) + i, np.float32), rank=r)
        d = c.copyparms(m)
        c.dict(d, "a.weight", np.full((300, 200), -8.0, np.float32), rank=1)  # a new tensor on rank 1 only
        before = {r: {n: c.parm(m, n, rank=r) for n in names} for r in range(2)}
        entries = {r: {n: c.dict(d, n, rank=r) for n in names} for r in range(2)}
        assert c.allreduce(m, op="mean", weights=[1, 3]) == len(names)
        assert c.allreduce(d, op="mean", weights=[1, 3]) == len(names)
        for r in range(2):
            for n in names:
                assert np.array_equal(c.parm(m, n, rank=r), before[0][n] * 0.25 + before[1][n] * 0.75), (r, n)
                assert np.array_equal(c.dict(d, n, rank=r), entries[0][n] * 0.25 + entries[1][n] * 0.75), (r, n)
        c.free(m, d)


def test_ranks_holding_different_shapes_refuse_and_keep_serving(cluster: Cluster) -> None:
    """An entry reshaped on rank 1 only: FAILED_PRECONDITION before any data moves, every value as it
    was on both ranks, and the cluster still reduces once the shapes agree again."""
    with Client(cluster.address, timeout=60) as c:
        d = c.dict({"w": np.ones((4, 3), np.float32), "b": np.full(3, 2.0, np.float32)}, replicate=True)
        c.dict(d, "w", np.full(12, 5.0, np.float32), rank=1)
        with pytest.raises(FailedPreconditionError, match="same tensor names, shapes and dtypes"):
            c.allreduce(d)
        assert np.array_equal(c.dict(d, "w", rank=0), np.ones((4, 3), np.float32))
        assert np.array_equal(c.dict(d, "w", rank=1), np.full(12, 5.0, np.float32))
        c.dict(d, "w", np.full((4, 3), 3.0, np.float32), rank=1)
        assert c.allreduce(d) == 2
        for r in range(2):
            assert np.array_equal(c.dict(d, "w", rank=r), np.full((4, 3), 2.0, np.float32))
            assert np.array_equal(c.dict(d, "b", rank=r), np.full(3, 2.0, np.float32))
        c.free(d)


def test_refused_allreduces_leave_every_rank_as_it_was(cluster: Cluster) -> None:
    """Two inputs that were accepted and overwrote every rank's values (found by review):
    entries of other names but the same shapes on each rank (rank 0 'x', rank 1 'y') were summed
    together, and a NaN or infinite weight made every value NaN. Both are now refused before any
    data moves, and the values on both ranks stay as they were."""
    with Client(cluster.address, timeout=60) as c:
        d = c.dict({"a": np.ones(3, np.float32)}, replicate=True)
        c.dict(d, "x", np.full(3, 10.0, np.float32), rank=0)
        c.dict(d, "y", np.full(3, 20.0, np.float32), rank=1)
        with pytest.raises(FailedPreconditionError, match="same tensor names, shapes and dtypes"):
            c.allreduce(d)
        assert np.array_equal(c.dict(d, "x", rank=0), np.full(3, 10.0, np.float32))
        assert np.array_equal(c.dict(d, "y", rank=1), np.full(3, 20.0, np.float32))
        e = c.dict({"w": np.arange(4, dtype=np.float32)}, replicate=True)
        for weights in ([float("nan"), 1.0], [float("inf"), 1.0], [1e308, 1e308]):
            with pytest.raises(InvalidArgumentError, match="finite"):
                c.allreduce(e, weights=weights)
        for r in range(2):
            assert np.array_equal(c.dict(e, "w", rank=r), np.arange(4, dtype=np.float32)), r
        assert c.allreduce(e, weights=[1, 3]) == 1
        c.free(d, e)


def test_weights_that_are_not_finite_and_unknown_ops_are_refused_and_change_nothing(cluster: Cluster) -> None:
    """Raw requests, as a client generated from the .proto sends them (no Python client checks): a NaN
    or infinite weight, weights whose sum overflows, and an op the contract does not define are each
    INVALID_ARGUMENT naming the fix, and every rank's values stay as they were (a NaN weight used to
    turn both ranks' parameters into NaN; an unknown op was INTERNAL)."""
    with Client(cluster.address, timeout=60) as c, grpc.insecure_channel(cluster.address) as channel:
        d = c.dict({"w": np.ones(3, np.float32)}, replicate=True)
        c.dict(d, "w", np.full(3, 3.0, np.float32), rank=1)
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        refused = [
            (pb.AllReduceRequest(handle=d.id, weights=[float("nan"), 1.0]), "finite"),
            (pb.AllReduceRequest(handle=d.id, weights=[float("inf"), 1.0]), "finite"),
            (pb.AllReduceRequest(handle=d.id, weights=[1e308, 1e308]), "finite"),
            (pb.AllReduceRequest(handle=d.id, op=7), "REDUCE_OP_MEAN"),
        ]
        for request, fix in refused:
            with pytest.raises(grpc.RpcError) as err:
                stub.AllReduce(request, timeout=60)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert fix in err.value.details()
        assert np.array_equal(c.dict(d, "w", rank=0), np.ones(3, np.float32))
        assert np.array_equal(c.dict(d, "w", rank=1), np.full(3, 3.0, np.float32))
        c.free(d)


def test_the_buckets_copies_are_reserved_under_the_cap_on_every_rank_before_any_data_moves(tmp_path: Path) -> None:
    """Small entries are reduced through a flat copy per bucket, as many bytes again as they hold.
    Under a 12 MB cap, 8 MB of small entries on each rank took an unreserved 8 MB bucket there and
    went through (found by review): now RESOURCE_EXHAUSTED, saying which cap, with every rank as it
    was; 4 MB of them (4 + 4 MB at the peak) still reduce, and the cluster serves on. Where only rank 1
    lacks the room, the client hears rank 1's RESOURCE_EXHAUSTED (it heard rank 0's 'same tensor names,
    shapes and dtypes', which were the same)."""
    entries = 10_000 * 4
    assert entries < INPLACE_BYTES  # each entry goes through a bucket
    cluster = Cluster(tmp_path, "--max-device-bytes", str(12_000_000))
    try:
        with Client(cluster.address, timeout=120) as c:
            big = c.dict({f"e{i:03d}": np.full(10_000, float(i), np.float32) for i in range(200)}, replicate=True)
            c.dict(big, "e000", np.full(10_000, 2.0, np.float32), rank=1)
            with pytest.raises(ResourceExhaustedError, match="--max-device-bytes"):
                c.allreduce(big)
            assert np.array_equal(c.dict(big, "e000", rank=0), np.zeros(10_000, np.float32))
            assert np.array_equal(c.dict(big, "e000", rank=1), np.full(10_000, 2.0, np.float32))
            assert np.array_equal(c.dict(big, "e199", rank=1), np.full(10_000, 199.0, np.float32))
            c.free(big)
            small = c.dict({f"e{i:03d}": np.full(10_000, float(i), np.float32) for i in range(100)}, replicate=True)
            c.dict(small, "e000", np.full(10_000, 2.0, np.float32), rank=1)
            assert c.allreduce(small) == 100
            for r in range(2):
                assert np.array_equal(c.dict(small, "e000", rank=r), np.ones(10_000, np.float32)), r
                assert np.array_equal(c.dict(small, "e099", rank=r), np.full(10_000, 99.0, np.float32)), r
            # Rank 1 alone has no room (5 MB more there): its refusal, not another rank's, reaches the client.
            placed = c.dict({"p": np.zeros(1_250_000, np.float32)}, rank=1)
            with pytest.raises(ResourceExhaustedError, match="^RESOURCE_EXHAUSTED: rank 1: .*--max-device-bytes"):
                c.allreduce(small)
            for r in range(2):
                assert np.array_equal(c.dict(small, "e000", rank=r), np.ones(10_000, np.float32)), r
            c.free(small, placed)
    finally:
        cluster.stop()


def test_an_outer_step_refused_by_one_ranks_cap_steps_no_rank(tmp_path: Path) -> None:
    """DiLoCo's outer step on a replicated optimizer: rank 1, fuller than rank 0, has no room for the
    step's momentum, pseudo-gradients and Nesterov's gradient plus momentum (12 MB). Rank 0 used to
    step anyway while rank 1 answered RESOURCE_EXHAUSTED, and the copies of the replicated model
    differed from then on (found by review). Now no rank steps; with the room back, both step alike,
    as torch's SGD does."""
    cluster = Cluster(tmp_path, "--max-device-bytes", str(24_000_000))
    try:
        with Client(cluster.address, timeout=120) as c:
            m = c.module(["linear", 1000, 1000], replicate=True)
            opt = c.opt("sgd", m, 0.7, 0.9, nesterov=True)
            average = c.copyparms(m)
            c.dict(average, "bias", np.full(1000, 5.0, np.float32))
            placed = c.dict({"p": np.zeros(1_250_000, np.float32)}, rank=1)  # rank 1: 13 MB held, 12 more needed
            start = {name: c.parm(m, name, rank=0) for name in ("weight", "bias")}
            with pytest.raises(ResourceExhaustedError, match="^RESOURCE_EXHAUSTED: rank 1: .*--max-device-bytes"):
                c.outer_step(opt, average)
            for r in range(2):
                for name, value in start.items():
                    assert np.array_equal(c.parm(m, name, rank=r), value), (r, name)
            c.free(placed)
            c.outer_step(opt, average)
            p = torch.nn.Parameter(torch.from_numpy(start["bias"].copy()))
            p.grad = p.detach() - 5.0
            torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True).step()
            for r in range(2):
                assert np.array_equal(c.parm(m, "bias", rank=r), p.detach().numpy()), r
            c.free(m, opt, average)
    finally:
        cluster.stop()


def test_a_local_sgd_epoch_refused_by_one_ranks_cap_trains_no_rank(tmp_path: Path) -> None:
    """`run` on a replicated model, each rank on its shard: rank 1, fuller than rank 0, has no room
    for the epoch's gradients and the copies that put the model back (8 MB). Rank 0 used to train
    anyway while rank 1 answered RESOURCE_EXHAUSTED, leaving the copies one epoch apart (found by
    review). Now no rank trains; with the room back, both do, and an allreduce joins them."""
    cluster = Cluster(tmp_path, "--max-device-bytes", str(20_000_000))
    try:
        with Client(cluster.address, timeout=120) as c:
            m = c.module(["linear", 1000, 1000], replicate=True)
            model = c.model(m, c.loss("mse"), c.opt("sgd", m, 0.01))
            c.train(model, np.ones((8, 1000), np.float32), np.ones((8, 1000), np.float32), shard=True)
            placed = c.dict({"p": np.zeros(2_250_000, np.float32)}, rank=1)  # rank 1: 13 MB held, 8 more needed
            start = c.parm(model, "bias", rank=0)
            with pytest.raises(ResourceExhaustedError, match="^RESOURCE_EXHAUSTED: rank 1: .*--max-device-bytes"):
                c.run(model)
            for r in range(2):
                assert np.array_equal(c.parm(model, "bias", rank=r), start), r
            c.free(placed)
            assert len(c.run(model)) == 2
            for r in range(2):
                assert not np.array_equal(c.parm(model, "bias", rank=r), start), r
            c.allreduce(model)
            assert np.array_equal(c.parm(model, "bias", rank=0), c.parm(model, "bias", rank=1))
            c.free(model)
    finally:
        cluster.stop()


def test_an_outer_step_of_a_replicated_optimizer_with_an_average_of_one_rank_steps_every_rank(cluster: Cluster) -> None:
    """The average of a round often lives on one rank (c.average of models placed there). Routed to
    that rank, the step changed its copy of the replicated model alone and answered as if it had
    stepped every copy (found by review). The average now goes to every rank first, as avgparms sends a
    source to a replicated target, and every copy steps alike, as torch's SGD with Nesterov momentum."""
    with Client(cluster.address, timeout=60) as c:
        m = c.module(["linear", 3, 2], replicate=True)
        opt = c.opt("sgd", m, 0.7, 0.9, nesterov=True)
        p = torch.nn.Parameter(torch.from_numpy(c.parm(m, "bias", rank=0).copy()))
        sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
        for rank, value in ((1, 7.0), (0, -3.0)):
            average = c.dict({"weight": np.full((2, 3), value, np.float32), "bias": np.full(2, value, np.float32)},
                             rank=rank)
            c.outer_step(opt, average)
            p.grad = p.detach() - value
            sgd.step()
            for r in range(2):
                assert np.array_equal(c.parm(m, "bias", rank=r), p.detach().numpy()), (rank, r)
            c.free(average)
        c.free(m, opt)


def test_a_flat_module_near_the_cap_reduces_in_place_without_room_for_buckets(tmp_path: Path) -> None:
    """A module of small layers is built flat: its 4 MB of parameters are reduced as one span, in place,
    allocating nothing. Reserving the buckets a tensor-by-tensor reduction would take (4 MB more, needed
    only where the ranks' layouts differ) outright refused it at 17 of 20 MB held. A flat copy
    whose entry was replaced on rank 1 alone does need them: refused, unchanged, until there is room."""
    layers = [["linear", f"l{i}", 100, 100] for i in range(100)]  # 40 KB weights: each alone would go in a bucket
    cluster = Cluster(tmp_path, "--max-device-bytes", str(20_000_000))
    try:
        with Client(cluster.address, timeout=120) as c:
            m = c.module(["sequential", *layers], replicate=True)
            d = c.copyparms(m)  # flat too
            filler = c.dict({"f": np.zeros(2_250_000, np.float32)}, replicate=True)  # 4 + 4 + 9 MB held per rank
            c.parm(m, "l0.bias", np.full(100, 4.0, np.float32), rank=1)
            before = c.parm(m, "l0.bias", rank=0)
            assert c.allreduce(m, weights=[1, 3]) == 200
            for r in range(2):
                assert np.array_equal(c.parm(m, "l0.bias", rank=r), before * 0.25 + 3.0), r
            c.dict(d, "l0.bias", np.full(100, 8.0, np.float32), rank=1)  # a new tensor: rank 1 laid out otherwise
            entries = [c.dict(d, "l0.bias", rank=r) for r in range(2)]
            with pytest.raises(ResourceExhaustedError, match="--max-device-bytes"):
                c.allreduce(d)
            assert all(np.array_equal(c.dict(d, "l0.bias", rank=r), entries[r]) for r in range(2))
            c.free(filler)
            assert c.allreduce(d) == 200
            for r in range(2):
                assert np.array_equal(c.dict(d, "l0.bias", rank=r), (entries[0] + entries[1]) / 2), r
            c.free(m, d)
    finally:
        cluster.stop()
