"""FSDP2 training under torchrun with weightavg.sharded.ShardedAverage on every rank, checked on each
rank against torch's own AveragedModel of an unsharded copy of the model (the oracle of
tests/test_sharded.py): after every optimizer step the sharded model's full tensors are loaded into
the copy and the AveragedModel updated from it, while each rank's ShardedAverage folds in its shards
through a real server. Rank 0 writes the largest differences found to OUT (a torch.save'd dict).

Usage: torchrun --standalone --nproc-per-node 2 tests/sharded_script.py ADDRESS OUT
"""

import sys
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weightavg import Client
from weightavg.sharded import ShardedAverage
from weightavg.torch import RemoteAveragedModel

from torchrun_scripts import leave  # tests/torchrun_scripts.py, beside this file

STEPS = 6


def net() -> torch.nn.Module:
    torch.manual_seed(0)  # the same start on every rank, as FSDP expects
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(8, 6), b=torch.nn.BatchNorm1d(6), r=torch.nn.ReLU(), c=torch.nn.Linear(6, 3),
    ))


def full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of the model whole (a collective for each sharded one: every rank calls it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def main(address: str, target: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, plain = net(), net()
    fully_shard(model.a)
    fully_shard(model.c)  # 3 rows over 2 ranks: shards of 2 and 1
    fully_shard(model)
    oracles = {
        "ema": AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(0.9)),
        "swa": AveragedModel(plain),
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    found: dict[str, float] = {}
    with Client(address, timeout=120) as c:
        try:  # the whole-model average refuses a sharded model, naming the one to use
            RemoteAveragedModel(c, model, "ema")
            raise AssertionError("RemoteAveragedModel took a sharded model")
        except TypeError as exc:
            assert "use weightavg.sharded.ShardedAverage" in str(exc), exc
        averages = {
            "ema": ShardedAverage(c, model, "ema", decay=0.9), "swa": ShardedAverage(c, model, "swa"),
            "ema-async": ShardedAverage(c, model, "ema", decay=0.9, asynchronous=True),  # sent from copies
        }
        for _ in range(STEPS):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            model.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            for average in averages.values():
                average.update_parameters(model)
            plain.load_state_dict(full(model))
            for oracle in oracles.values():
                oracle.update_parameters(plain)
        trained = full(model)
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
        for mode, average in averages.items():
            average.wait()
            oracle = oracles[mode.removesuffix("-async")].module
            model.eval()
            oracle.eval()
            with average.swapped(model):
                found[f"{mode} state"] = largest_difference(full(model), oracle.state_dict())
                with torch.no_grad():
                    found[f"{mode} output"] = (model(x) - oracle(x)).abs().max().item()
            found[f"{mode} restored"] = largest_difference(full(model), trained)
            found[f"{mode} count"] = float(average.n_averaged - oracles[mode.removesuffix("-async")].n_averaged.item())
            average.free()
    if rank == 0:
        torch.save(found, target)
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
