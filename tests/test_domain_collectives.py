"""domain/collectives.py with two real gloo ranks (processes), against means computed by hand.

Large tensors are reduced in place and small ones through buckets; both paths, a non-contiguous large
tensor, several buckets and two dtypes are covered in one group of two processes (a few seconds).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from weightavg_server.domain import collectives
from weightavg_server.domain.errors import InvalidArgument

WEIGHTS = [1.0, 3.0]


def values(rank: int) -> list[torch.Tensor]:
    """Each rank's tensors: two large float32 (one a transposed view), a large bfloat16, small ones of
    two dtypes. Integers times powers of two, so every scaled value and sum is exact."""
    base = torch.arange(300 * 300, dtype=torch.float32).remainder(97) + rank * 8
    return [
        base.reshape(300, 300).clone(),  # 360 KB >= INPLACE_BYTES: in place
        base[:90_000].reshape(300, 300).clone().t(),  # large and non-contiguous
        (torch.arange(140_000).remainder(16) + rank * 8).to(torch.bfloat16).reshape(1, -1),  # 280 KB: in place
        torch.full((3,), 2.0 + rank),  # small: bucketed
        torch.full((10, 10), -4.0 * (rank + 1), dtype=torch.float64),
        torch.full((5,), 16.0 * rank),
    ]


def _worker(rank: int, store_path: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        tensors = values(rank)
        where = [(t.data_ptr(), t.stride(), t.dtype) for t in tensors]
        scale = collectives.rank_scale("mean", WEIGHTS, rank, 2)
        # Buckets of 400 bytes: the float32 smalls (12 and 20 bytes) share one, the float64 one (800 bytes) goes alone.
        issued = collectives.all_reduce_(tensors, scale, bucket_bytes=400)
        assert issued == 3 + 2, issued
        assert [(t.data_ptr(), t.stride(), t.dtype) for t in tensors] == where  # reduced where they lie
        expected = [a * 0.25 + b * 0.75 for a, b in zip(values(0), values(1))]
        for i, (got, want) in enumerate(zip(tensors, expected)):
            assert torch.equal(got, want.to(got.dtype)), (i, (got - want).abs().max())
    finally:
        dist.barrier()  # both ranks finish before either tears gloo down
        dist.destroy_process_group()


def test_a_weighted_mean_over_two_ranks_in_place_and_through_buckets(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_which_tensors_share_a_bucket() -> None:
    a, b = torch.zeros(10), torch.zeros(10)
    c, d = torch.zeros(10, dtype=torch.float64), torch.zeros(30)
    groups = collectives.buckets([a, b, c, d], bucket_bytes=80)
    assert [[id(t) for t in g] for g in groups] == [[id(a), id(b)], [id(d)], [id(c)]]


def test_rank_scales() -> None:
    assert collectives.rank_scale("mean", [], 1, 4) == 0.25
    assert collectives.rank_scale("mean", [1, 3], 1, 2) == 0.75
    assert collectives.rank_scale("sum", [], 1, 2) == 1.0
    with pytest.raises(InvalidArgument, match="one weight per rank"):
        collectives.rank_scale("mean", [1, 2, 3], 0, 2)
    with pytest.raises(InvalidArgument, match="unknown reduce op"):
        collectives.rank_scale("max", [], 0, 2)
    for weights in ([math.nan, 1.0], [math.inf, 1.0], [-math.inf, math.inf], [1e308, 1e308]):
        with pytest.raises(InvalidArgument, match="finite"):  # were NaN (every rank's values NaN) or 0.0
            collectives.rank_scale("mean", weights, 0, 2)


@pytest.mark.parametrize("weights", [[math.nan, 1.0], [math.inf, 1.0], [-math.inf, 1.0], [1e308, 1e308]])
def test_rank_scales_refuse_weights_that_would_turn_every_rank_into_nan_or_zeros(weights: list[float]) -> None:
    """NaN passed the sign and sum checks, and an infinite weight or sum gave NaN or 0 scales: every
    rank's values were overwritten with NaN (found by review, through a real 2-rank cluster)."""
    with pytest.raises(InvalidArgument, match="finite and non-negative"):
        collectives.rank_scale("mean", weights, 0, 2)


def test_adjacent_groups_find_a_flat_modules_tensors_in_any_listed_order() -> None:
    from weightavg_server.domain import flat

    module = flat.build_flat(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    named = sorted(module.named_parameters())  # name order (how allreduce lists them): biases first
    tensors = [p.data for _, p in named]
    assert collectives.adjacent_groups(tensors) == [[1, 0, 3, 2]]  # memory order, one group
    (span,) = collectives.joined(tensors, [[1, 0, 3, 2]])
    assert span.numel() == sum(t.numel() for t in tensors)
    span.mul_(2.0)  # a view: every tensor of the group changes in place
    for (_, p), t in zip(named, tensors):
        assert p.data_ptr() == t.data_ptr()
    assert all(torch.equal(p.data, t) for (_, p), t in zip(named, tensors))


def test_adjacent_groups_keep_separate_and_odd_tensors_alone() -> None:
    buffer = torch.zeros(10)
    a, b = buffer[:4], buffer[4:10]
    gap = torch.zeros(10)[5:8]
    other = torch.zeros(6, dtype=torch.float64)
    strided = torch.zeros(4, 4).t()
    empty = torch.zeros(0)
    tensors = [b, other, a, gap, strided, empty]
    assert collectives.adjacent_groups(tensors) == [[2, 0], [1], [3], [4], [5]]  # a then b in memory
    tensors = [a, b, gap, strided, empty, other]
    groups = collectives.adjacent_groups(tensors)
    assert groups == [[0, 1], [2], [3], [4], [5]]
    joined = collectives.joined(tensors, groups)
    assert joined[0].shape == (10,) and joined[0].data_ptr() == buffer.data_ptr()
    assert joined[1:] == tensors[2:]


def test_reduce_bytes_is_the_largest_bucket_plus_the_large_non_contiguous_copies() -> None:
    """What a cluster reserves before an all-reduce: buckets go one at a time (the largest counts),
    a large contiguous tensor is reduced where it lies (nothing), a large non-contiguous one through a
    copy held until the end (all of them count)."""
    small = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64)]
    large = [torch.zeros(100), torch.zeros(10, 10).t(), torch.zeros(20, 10).t()]
    assert collectives.reduce_bytes(small + large, bucket_bytes=120, inplace_bytes=400) == {
        "cpu": 120 + 400 + 800  # buckets of 80, 120 and 40 bytes; copies of 400 and 800 bytes
    }
    assert collectives.reduce_bytes([torch.zeros(100)], inplace_bytes=400) == {}
    assert collectives.reduce_bytes([]) == {}


def test_subgroups_are_blocks_of_consecutive_ranks_as_torchs_new_subgroups() -> None:
    assert [collectives.subgroup(r, 4, 2) for r in range(4)] == [range(0, 2)] * 2 + [range(2, 4)] * 2
    assert [collectives.subgroup(r, 6, 3) for r in range(6)] == [range(0, 3)] * 3 + [range(3, 6)] * 3
    assert collectives.subgroup(3, 4, 0) == collectives.subgroup(3, 4, 4) == range(0, 4)
    assert collectives.subgroup(2, 4, 1) == range(2, 3)
    for size in (-1, 3, 5, 8):
        with pytest.raises(InvalidArgument, match=r"give one of 1, 2, 4, or 0 for one group of every rank"):
            collectives.subgroup(0, 4, size)


def test_rank_scales_within_groups_weigh_each_group_by_its_own_members() -> None:
    assert [collectives.rank_scale("mean", [], r, 4, 2) for r in range(4)] == [0.5] * 4
    weights = [1, 3, 2, 2]
    assert [collectives.rank_scale("mean", weights, r, 4, 2) for r in range(4)] == [0.25, 0.75, 0.5, 0.5]
    assert [collectives.rank_scale("mean", weights, r, 4, 0) for r in range(4)] == [0.125, 0.375, 0.25, 0.25]
    assert collectives.rank_scale("sum", [], 3, 4, 2) == 1.0
    assert collectives.rank_scale("mean", [], 0, 1, 1) == 1.0  # a one-rank server takes groups of one
    # A group whose weights sum to 0 would turn its ranks' values into zeros: refused, whichever rank asks.
    for rank in range(4):
        with pytest.raises(InvalidArgument, match="positive, finite sum in every group of 2 consecutive ranks"):
            collectives.rank_scale("mean", [1, 1, 0, 0], rank, 4, 2)
    assert collectives.rank_scale("mean", [1, 1, 0, 0], 0, 4, 0) == 0.5  # over every rank the sum is 2
    with pytest.raises(InvalidArgument, match="give one of 1, 2, 4"):
        collectives.rank_scale("sum", [], 0, 4, 3)
