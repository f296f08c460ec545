"""An EMA of a sharded (FSDP2) model, each rank keeping the average of its own shards on a weightavg server.

A small network is sharded over `--ranks` CPU processes with torch's `fully_shard` (gloo) and trained
on scikit-learn's digits, each rank on its own part of the training rows. After every optimizer step
each rank folds its shards into its average (`weightavg.sharded.ShardedAverage`, EMA with warm-up,
kept in float32); at the end the model is tested with its last weights and with the EMA swapped in,
and the ranks' full EMA tensors are checked to be one model (gathered from the shards).

    python examples/sharded_ema.py                         # an embedded server and 2 ranks under torchrun
    python examples/sharded_ema.py --address HOST:PORT --ranks 4 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from weightavg import Client
from weightavg.sharded import ShardedAverage
from weightavg_server.ops.app import serving

from digits import accuracy, torch_split  # examples/digits.py, beside this file


def network() -> nn.Module:
    torch.manual_seed(0)  # every rank starts from the same weights, as FSDP expects
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


@dataclass
class Result:
    last: float
    ema: float
    """Test accuracies in percent: the last weights, and the EMA swapped into the model."""
    ranks: int
    steps: int
    """Updates folded into each rank's EMA."""


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: train the sharded model, keep the EMA of its shards, test both."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (x, y), (xt, yt) = torch_split(args.seed)
    x, y = x[rank::world], y[rank::world]  # this rank's rows
    model = network()
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    with Client(args.address, session=True) as c:  # the session frees the average
        ema = ShardedAverage(c, model, "ema", decay=0.99, warmup=True, dtype="float32")
        for _ in range(args.epochs):
            model.train()
            for i in range(0, len(y), 32):
                opt.zero_grad()
                torch.autograd.backward(nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]))
                opt.step()
                ema.update_parameters(model)
        last = accuracy(model, xt, yt)  # a forward gathers the shards: every rank runs it
        with ema.swapped(model):
            averaged = accuracy(model, xt, yt)
            whole = [v.full_tensor() for v in model.state_dict().values()]  # gathered from every rank's shards
        steps = ema.n_averaged
    # The same full EMA on every rank: the elementwise largest and smallest over the ranks agree.
    alike = True
    for t in whole:
        low, high = t.clone(), t.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        alike = alike and torch.equal(low, high)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"last": last, "ema": averaged, "steps": steps, "alike": alike}))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # without gloo's destructors, which now and then abort a rank at exit


def main(argv: Sequence[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server (default: an embedded one)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help=argparse.SUPPRESS)  # set for the ranks this program starts
    args = p.parse_args(argv)
    if args.out:
        worker(args)
    with serving(args.address) as address, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                   __file__, "--address", address, "--epochs", str(args.epochs), "--lr", str(args.lr),
                   "--seed", str(args.seed), "--out", str(out)]
        here = str(Path(__file__).resolve().parent)
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [here, *sys.path[1:], os.environ.get("PYTHONPATH")]))}
        subprocess.run(command, check=True, env=env, timeout=600)
        found = json.loads(out.read_text())
    if not found["alike"]:
        raise RuntimeError("the ranks' EMA tensors differ")
    result = Result(found["last"], found["ema"], args.ranks, found["steps"])
    print(f"{result.ranks} ranks, FSDP2 on the CPU (gloo), {args.epochs} epochs of digits; EMA of every step "
          f"(decay 0.99, warm-up) kept per rank on the server: {result.steps} updates")
    print(f"test accuracy: last weights {result.last:.2f}%, EMA {result.ema:.2f}% (the same full EMA on every rank)")
    return result


if __name__ == "__main__":
    main()
