"""The allreduce case's baseline: a bare torch.distributed script, two ranks under torchrun.

Every rank holds COUNT float32 tensors of WIDTH x WIDTH (the layout the server's replicated module has)
and one flat tensor of the same bytes. Rank 0 reads a way to average them from stdin, one line per
call, tells rank 1 with a one-element broadcast, both run it, and rank 0 answers "done"; EOF stops it.

    torchrun --standalone --nproc-per-node 2 -m bench._allreduce COUNT WIDTH DEVICE

DEVICE cpu: gloo. DEVICE cuda: as the server chooses, NCCL when every rank has a GPU of its own, else
gloo on the GPU the ranks share (NCCL refuses two ranks on one device).

Ways, each a mean over the ranks (gloo has no AVG: scale, then SUM):
  flat      all_reduce of the flat tensor, then div_ (no copies, one collective: the floor for these bytes)
  tensors   each tensor scaled and all_reduced in place, all issued before waiting (what the server
            does with tensors of 256 KiB or more, without the server)
  buckets   the tensors in DDP's 25 MB buckets: flatten each (torch.cat), scale, all_reduce, copy back
  average_parameters   torch.distributed.algorithms.model_averaging.utils.average_parameters on the
            tensors (one flat copy of them all, divide, one all_reduce; it rebinds each tensor's .data
            to a view of that copy instead of copying back)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.utils import average_parameters

BUCKET_BYTES = 25 << 20


def main(count: int, width: int, device: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "gloo"
    if device.startswith("cuda"):  # the server's rule: NCCL with a GPU per rank, else gloo on a shared GPU
        gpus = torch.cuda.device_count()
        device = f"cuda:{int(os.environ['LOCAL_RANK']) % gpus}"
        torch.cuda.set_device(device)
        backend = "nccl" if gpus >= int(os.environ["LOCAL_WORLD_SIZE"]) else "gloo"
    dist.init_process_group(backend)
    g = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(width, width, generator=g).to(device) for _ in range(count)]
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    per_bucket = max(1, BUCKET_BYTES // (width * width * 4))
    buckets = [tensors[i:i + per_bucket] for i in range(0, count, per_bucket)]

    @torch.no_grad()
    def bucketed() -> None:
        for bucket in buckets:
            b = torch.cat([t.reshape(-1) for t in bucket])
            b.mul_(1.0 / world)
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            offset = 0
            for t in bucket:
                t.copy_(b[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    @torch.no_grad()
    def each() -> None:
        works = []
        for t in tensors:
            t.mul_(1.0 / world)
            works.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True))
        for work in works:
            work.wait()

    world_group = dist.group.WORLD
    assert world_group is not None  # the default group exists once init_process_group has run

    @torch.no_grad()
    def flat_mean() -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)

    ways: list[Callable[[], None]] = [flat_mean, each, bucketed, lambda: average_parameters(iter(params), world_group)]
    names = ["flat", "tensors", "buckets", "average_parameters"]
    code = torch.zeros(1, dtype=torch.int64, device=device if backend == "nccl" else "cpu")
    if rank == 0:
        print("ready", flush=True)
    while True:
        if rank == 0:
            line = sys.stdin.readline().strip()
            code[0] = names.index(line) if line else -1
        dist.broadcast(code, src=0)
        if int(code[0]) < 0:
            break
        ways[int(code[0])]()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if rank == 0:
            print("done", flush=True)
    dist.barrier()  # both ranks reach the end before either tears gloo down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
