"""A plain torch.distributed Local SGD run, the oracle of tests/test_cluster.py: each rank trains its
contiguous shard of the rows with SGD (batches in order), then the ranks average parameters with
all_reduce (SUM, then divide: gloo has no AVG). Run with torchrun; rank 0 writes the result.

Usage: torchrun --standalone --nproc-per-node 2 tests/localsgd_oracle.py IN.pt OUT.pt
"""

import sys

import torch
import torch.distributed as dist

from torchrun_scripts import leave  # tests/torchrun_scripts.py, beside this file


def main(source: str, target: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(source)
    model = torch.nn.Linear(data["weight"].shape[1], data["weight"].shape[0])
    with torch.no_grad():
        model.weight.copy_(data["weight"])
        model.bias.copy_(data["bias"])
    x, y = torch.tensor_split(data["x"], world)[rank], torch.tensor_split(data["y"], world)[rank]
    optim = torch.optim.SGD(model.parameters(), lr=data["lr"])
    batch = int(data["batch"])
    for _ in range(int(data["rounds"])):
        for _ in range(int(data["epochs"])):
            for i in range(0, len(x), batch):
                optim.zero_grad()
                torch.nn.functional.mse_loss(model(x[i:i + batch]), y[i:i + batch]).backward()
                optim.step()
        with torch.no_grad():
            for p in model.parameters():
                dist.all_reduce(p.data, op=dist.ReduceOp.SUM)
                p.data.div_(world)
    if rank == 0:
        torch.save({"weight": model.weight.detach(), "bias": model.bias.detach()}, target)
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
