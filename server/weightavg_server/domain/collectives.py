"""Averaging tensors across the ranks of a torch.distributed process group, in place.

Tensors are grouped by device and dtype and flattened into buckets (DDP's 25 MB by default) with
one all_reduce each. Gloo has no AVG reduction, so a mean is a SUM of pre-scaled values: each rank
scales its bucket by its weight over the weights' sum (1/world for equal weights) before the SUM,
which costs no extra pass after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .errors import InvalidArgument

BUCKET_BYTES = 25 << 20
"""DDP's default bucket size: large enough to amortize a collective's latency, small enough to keep
the flat copy's extra memory modest."""

OPS = ("mean", "sum")


def rank_scale(op: str, weights: Sequence[float], rank: int, world: int) -> float:
    """What this rank multiplies its values by before a SUM, so that the SUM is the op's result.

    Raises:
        InvalidArgument: an unknown op, weights with a sum, length or sign that cannot weigh ranks.
    """
    if op not in OPS:
        raise InvalidArgument(f"unknown reduce op '{op}'; use one of {', '.join(OPS)}")
    if op == "sum":
        if weights:
            raise InvalidArgument("weights go with op='mean'; a sum takes none")
        return 1.0
    if not weights:
        return 1.0 / world
    if len(weights) != world:
        raise InvalidArgument(f"give one weight per rank: {len(weights)} weight(s) for {world} rank(s)")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidArgument("weights must be non-negative with a positive sum (e.g. example counts per rank)")
    return float(weights[rank]) / float(sum(weights))


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


@torch.no_grad()
def all_reduce_(
    tensors: Sequence[torch.Tensor], scale: float, group: dist.ProcessGroup | None = None,
    bucket_bytes: int = BUCKET_BYTES,
) -> int:
    """Replace every tensor by the SUM over ranks of scale * tensor, in place (`copy_`, so identity,
    device and dtype survive); every rank must pass tensors of the same names, shapes and dtypes in
    the same order. Returns the number of collectives issued."""
    issued = 0
    for bucket in buckets(tensors, bucket_bytes):
        # One flat copy per bucket (torch._utils._flatten_dense_tensors does the same): the tensors keep
        # their values if the collective fails.
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        issued += 1
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
    staged = tensor.cpu() if host_only and tensor.is_cuda else tensor.contiguous()
    if rank == src:
        dist.send(staged, dst=dst)
        return
    dist.recv(staged, src=src)
    if staged is not tensor:
        tensor.copy_(staged)
