"""torch's own model averagers under torchrun, the oracle of tests/test_cluster_groups.py: every rank
trains a linear model on its contiguous shard of the rows (one full-shard SGD step per training
step), and after each step torch's PeriodicModelAverager or HierarchicalModelAverager averages the
parameters as it decides. Each rank writes its parameters and the group size of each step's average
(0: none; read from the group torch's averager handed its averaging function) to OUT-<rank>.pt.

Usage: torchrun --standalone --nproc-per-node 4 tests/averager_oracle.py IN.pt OUT
"""

import sys
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import averagers, hierarchical_model_averager
from torch.distributed.algorithms.model_averaging import utils

from torchrun_scripts import leave  # tests/torchrun_scripts.py, beside this file


def main(source: str, target: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(source)
    sizes: list[int] = []
    average = utils.average_parameters_or_parameter_groups

    def recording(params, group):  # torch's own average, its group's size noted first
        sizes[-1] = dist.get_world_size(group)
        average(params, group)

    utils.average_parameters_or_parameter_groups = recording
    if data["kind"] == "periodic":
        averager = averagers.PeriodicModelAverager(data["period"], data["warmup"])
    else:
        averager = hierarchical_model_averager.HierarchicalModelAverager(OrderedDict(data["periods"]), data["warmup"])
    model = torch.nn.Linear(data["weight"].shape[1], data["weight"].shape[0])
    with torch.no_grad():
        model.weight.copy_(data["weight"])
        model.bias.copy_(data["bias"])
    x, y = torch.tensor_split(data["x"], world)[rank], torch.tensor_split(data["y"], world)[rank]
    optim = torch.optim.SGD(model.parameters(), lr=data["lr"])
    for _ in range(int(data["steps"])):
        optim.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optim.step()
        sizes.append(0)
        averager.average_parameters(model.parameters())
    torch.save({"weight": model.weight.detach(), "bias": model.bias.detach(), "sizes": sizes}, f"{target}-{rank}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
