"""Averaging tensors across the ranks of a torch.distributed process group, in place.

A tensor of INPLACE_BYTES or more is reduced in place, one collective of its own; smaller ones are
grouped by device and dtype and flattened into buckets (DDP's 25 MB by default) with one all_reduce
each, since a collective's fixed cost outweighs the copy for them. Gloo has no AVG reduction, so a
mean is a SUM of pre-scaled values: each rank scales its values by its weight over the weights' sum
(1/world for equal weights) before the SUM, which costs no extra pass after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .errors import InvalidArgument
from .tensors import Bytes, device_name

BUCKET_BYTES = 25 << 20
"""DDP's default bucket size: large enough to amortize a collective's latency, small enough to keep
the flat copy's extra memory modest."""

INPLACE_BYTES = 256 << 10
"""From this size a tensor is reduced in place, one collective of its own, rather than copied into a
bucket and back. Two gloo ranks on loopback on a busy 2-vCPU VM (docs/perf.md), time per tensor of
tensors all of one size, bucketed against alone: 4 bytes 8.5 us against 259; 64 KiB 304 against
1277; 256 KiB 1338 against 954; 1 MiB 3802 against 1000. A collective costs about 0.3-1 ms whatever
its size; the copies cost per byte."""

OPS = ("mean", "sum")


def subgroup(rank: int, world: int, group_size: int) -> range:
    """The ranks that reduce together with `rank`: with group_size k, ranks 0 to k-1 form one group,
    k to 2k-1 the next, and so on (torch's `dist.new_subgroups(group_size)`, which
    HierarchicalModelAverager's lower levels use); 0 means one group of every rank.

    Raises:
        InvalidArgument: a group size that is negative, larger than the world, or does not divide it.
    """
    k = group_size or world
    if not 0 < k <= world or world % k:
        sizes = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise InvalidArgument(
            f"group_size {group_size} does not split the cluster's {world} rank(s) into equal groups of "
            f"consecutive ranks: give one of {sizes}, or 0 for one group of every rank"
        )
    start = rank - rank % k
    return range(start, start + k)


def rank_scale(op: str, weights: Sequence[float], rank: int, world: int, group_size: int = 0) -> float:
    """What this rank multiplies its values by before a SUM over its group (`subgroup`), so that the
    SUM is the op's result within the group. Weights are one per rank of the world; each group's mean
    is weighted by its own members' weights, which must have a positive sum.

    Raises:
        InvalidArgument: an unknown op or group size, weights with a sum, length, sign or value (NaN,
            infinite) that cannot weigh ranks.
    """
    if op not in OPS:
        raise InvalidArgument(f"unknown reduce op '{op}'; use one of {', '.join(OPS)}")
    group = subgroup(rank, world, group_size)
    if op == "sum":
        if weights:
            raise InvalidArgument("weights go with op='mean'; a sum takes none")
        return 1.0
    if not weights:
        return 1.0 / len(group)
    if len(weights) != world:
        raise InvalidArgument(f"give one weight per rank: {len(weights)} weight(s) for {world} rank(s)")
    totals = [float(sum(weights[r] for r in subgroup(first, world, group_size))) for first in range(0, world, len(group))]
    # NaN compares false with everything, and an infinite weight or sum turns the scales into NaN or 0:
    # either would overwrite every rank's values with NaN or zeros.
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not all(math.isfinite(t) and t > 0 for t in totals):
        per = "" if len(group) == world else f" in every group of {len(group)} consecutive ranks"
        raise InvalidArgument(
            f"weights must be finite and non-negative with a positive, finite sum{per} (e.g. example counts "
            f"per rank), given {list(weights)}"
        )
    return float(weights[rank]) / totals[rank // len(group)]


def buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one device and dtype, each at most bucket_bytes (or one tensor)."""
    out: list[list[torch.Tensor]] = []
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for group in by_kind.values():
        current: list[torch.Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > bucket_bytes:
                out.append(current)
                current, size = [], 0
            current.append(t)
            size += nbytes
        if current:
            out.append(current)
    return out


def adjacent_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by what lies back to back in memory: each group's tensors, in
    memory order, tile one contiguous range of one storage (one device and dtype), so the group can be
    reduced as one 1-D span (`joined`); a tensor with no neighbour is a group of one. Groups come in
    the order of their first index.

    A module built flat (`flat.build_flat`) or a flat copy gives one group per dtype, whatever the
    name order its tensors were listed in. Ranks must agree on the groups before reducing by them
    (they depend on each rank's memory layout), which cluster.py checks with the tensors' shapes.

    Example: the weight and bias of a flat linear layer listed as [bias, weight] give [[1, 0]].
    """
    order = sorted(
        (i for i, t in enumerate(tensors) if t.is_contiguous() and t.numel() > 0),
        key=lambda i: (tensors[i].untyped_storage().data_ptr(), tensors[i].data_ptr()),
    )
    groups: list[list[int]] = []
    end = -1
    kind: tuple[int, torch.device, torch.dtype] | None = None
    for i in order:
        t = tensors[i]
        this = (t.untyped_storage().data_ptr(), t.device, t.dtype)
        if groups and this == kind and t.data_ptr() == end:
            groups[-1].append(i)
        else:
            groups.append([i])
            kind = this
        end = t.data_ptr() + t.numel() * t.element_size()
    grouped = {i for g in groups for i in g}
    groups += [[i] for i in range(len(tensors)) if i not in grouped]
    return sorted(groups, key=min)


def joined(tensors: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """One tensor per group: the tensor itself for a group of one, else the 1-D span over the group's
    memory (a view: reducing it reduces every tensor of the group in place)."""
    out = []
    for group in groups:
        first = tensors[group[0]]
        if len(group) == 1:
            out.append(first)
            continue
        numel = sum(tensors[i].numel() for i in group)
        out.append(torch.as_strided(first.detach(), (numel,), (1,), first.storage_offset()))
    return out


def reduce_bytes(
    tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES, inplace_bytes: int = INPLACE_BYTES,
) -> Bytes:
    """The most memory `all_reduce_(tensors)` allocates at once, by device: the contiguous copies of
    the large non-contiguous tensors (all held until their collectives end) and the largest bucket's
    flat copy (one bucket at a time). Reserved on every rank before the ranks agree to reduce: a
    replicated dictionary of 8 MB of small entries under a 12 MB cap took an unreserved 8 MB bucket on
    each rank (found by review)."""
    peak: Bytes = {}
    largest: Bytes = {}
    filling: dict[tuple[torch.device, torch.dtype], int] = {}  # the bytes of each kind's bucket being filled
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes >= inplace_bytes:
            if not t.is_contiguous():
                peak[device_name(t)] = peak.get(device_name(t), 0) + nbytes
            continue
        kind = (t.device, t.dtype)  # as `buckets` fills them, without building the lists
        size = filling.get(kind, 0)
        size = nbytes if size and size + nbytes > bucket_bytes else size + nbytes
        filling[kind] = size
        largest[device_name(t)] = max(largest.get(device_name(t), 0), size)
    for device, nbytes in largest.items():
        peak[device] = peak.get(device, 0) + nbytes
    return {device: nbytes for device, nbytes in peak.items() if nbytes}


@torch.no_grad()
def all_reduce_(
    tensors: Sequence[torch.Tensor], scale: float, group: dist.ProcessGroup | None = None,
    bucket_bytes: int = BUCKET_BYTES, inplace_bytes: int = INPLACE_BYTES,
) -> int:
    """Replace every tensor by the SUM over ranks of scale * tensor, in place (identity, device and
    dtype survive); every rank must pass tensors of the same shapes and dtypes in the same order (which
    tensors go alone depends on nothing else). Returns the number of collectives issued.

    The large tensors' collectives are issued first without waiting (gloo's threads run them while this
    one scales the next tensor and fills the buckets), then the buckets', then all are waited for. A
    failed collective leaves the large tensors scaled or half reduced: the cluster is then broken for
    good and every rank restores its snapshot (cluster.py), so nothing reads them."""
    works = []
    alone: list[tuple[torch.Tensor, torch.Tensor]] = []
    small: list[torch.Tensor] = []
    for t in tensors:
        if t.numel() * t.element_size() < inplace_bytes:
            small.append(t)
            continue
        # detach(): the same storage without autograd, so a parameter is reduced where it lies.
        flat = t.detach() if t.is_contiguous() else t.contiguous()
        if scale != 1.0:
            flat.mul_(scale)
        works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True))
        alone.append((t, flat))
    issued = len(works)
    for bucket in buckets(small, bucket_bytes):
        # One flat copy per bucket (torch._utils._flatten_dense_tensors does the same).
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        del flat  # before the next bucket's copy: one bucket at a time, as `reduce_bytes` reserves
        issued += 1
    for work in works:
        work.wait()
    for t, flat in alone:
        if flat.data_ptr() != t.data_ptr():  # a non-contiguous tensor was reduced in a contiguous copy
            t.copy_(flat)
    return issued


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int) -> None:
    """Every rank's `tensor` takes rank src's values, in place (a non-contiguous tensor through a
    contiguous copy, as collectives need)."""
    flat = tensor if tensor.is_contiguous() else tensor.contiguous()
    dist.broadcast(flat, src=src)
    if flat is not tensor:
        tensor.copy_(flat)


@torch.no_grad()
def transfer_(tensor: torch.Tensor, src: int, dst: int | None, rank: int, host_only: bool) -> None:
    """Rank src's `tensor` into the same-shaped, contiguous `tensor` of rank dst (None: of every rank).

    Point to point between two ranks; a broadcast for every rank. `host_only` says the data backend
    sends point to point only from host memory (gloo: its send/recv take CPU tensors, where NCCL's
    take CUDA ones), so a CUDA tensor then travels through a host copy. Ranks other than src and dst
    do nothing.
    """
    if dst is None:
        if rank == src:
            dist.broadcast(tensor.contiguous(), src=src)  # the source is only read: no copy back
        else:
            broadcast_(tensor, src)
        return
    if rank not in (src, dst):
        return
    # gloo sends dense memory only; .cpu() keeps a permuted tensor's strides, so contiguous() after it
    staged = (tensor.cpu() if host_only and tensor.is_cuda else tensor).contiguous()
    if rank == src:
        dist.send(staged, dst=dst)
        return
    dist.recv(staged, src=src)
    if staged is not tensor:
        tensor.copy_(staged)
