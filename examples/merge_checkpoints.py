"""Merge fine-tuned PyTorch checkpoints on a weightavg server: average, task arithmetic, TIES, DARE,
Model Stock, multi-SLERP, and a mergekit config as it stands.

A small network is trained briefly in this process on scikit-learn's digits (the base), then
fine-tuned from it several times with different seeds and rates, as checkpoints of one base would
be. Their state dicts go to the server once (`weightavg.torch.push`); every merge is one call there
(`Client.average`, `Client.merge`, `weightavg.mergekit.merge` for a mergekit config, the dict a
mergekit YAML loads to), and each result comes back as a state dict that loads into a
plain copy of the network (`weightavg.torch.fetch`), whose test accuracy is printed beside the
fine-tuned ones'. On a problem this small the merges land close to the fine-tuned models; the
point is the calls.

    python examples/merge_checkpoints.py                   # an embedded server (pip install 'weightavg[server,demo]')
    python examples/merge_checkpoints.py --address HOST:PORT --models 4
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from weightavg import Client, Handle, mergekit
from weightavg.torch import fetch, push
from weightavg_server.ops.app import serving

from digits import accuracy, torch_split  # examples/digits.py, beside this file

RATES = (0.05, 0.1, 0.02, 0.08)


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Plain SGD in shuffled batches of 32, the order drawn from `seed`."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        shuffled = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), 32):
            idx = shuffled[start:start + 32]
            opt.zero_grad()
            torch.autograd.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]))  # loss.backward(), typed
            opt.step()


@dataclass
class Result:
    base: float
    tuned: list[float]
    merged: dict[str, float]
    """Test accuracies in percent: the base, each fine-tuned model, each merge by name."""


def ties_config(models: int) -> dict[str, object]:
    """A mergekit TIES config as `yaml.safe_load` gives it: the first layer's weights from the first
    model more than the last's (a weight gradient over the layers), the others even, density .5."""
    return {
        "merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5, "normalize": True},
        "models": [{"model": f"tuned-{i}", "parameters": {"weight": [1.0, 0.5] if i == 0 else 1.0}}
                   for i in range(models)],
    }


def main(argv: Sequence[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server (default: an embedded one)")
    p.add_argument("--models", type=int, default=3, help="fine-tuned models to merge")
    p.add_argument("--pretrain", type=int, default=2, help="epochs of the base")
    p.add_argument("--epochs", type=int, default=2, help="epochs of fine-tuning per model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    (x, y), (xt, yt) = torch_split(args.seed)
    base = network()
    train(base, x, y, args.pretrain, 0.05, args.seed)
    tuned = []
    for i in range(args.models):
        model = copy.deepcopy(base)
        train(model, x, y, args.epochs, RATES[i % len(RATES)], args.seed + 1 + i)
        tuned.append(model)

    merges: dict[str, Callable[[Client, Handle, list[Handle]], Handle]] = {
        "average": lambda c, b, ds: c.average(ds),
        "task_arithmetic lam .5": lambda c, b, ds: c.merge("task_arithmetic", ds, base=b, lam=0.5),
        "ties density .3": lambda c, b, ds: c.merge("ties", ds, base=b, density=0.3),
        "dare density .5": lambda c, b, ds: c.merge("dare", ds, base=b, density=0.5, seed=args.seed),
        "model_stock": lambda c, b, ds: c.merge("model_stock", ds, base=b),
        "multislerp": lambda c, b, ds: c.merge("multislerp", ds),
        "karcher": lambda c, b, ds: c.merge("karcher", ds),
        "sce select .5": lambda c, b, ds: c.merge("sce", ds, base=b, select_topk=0.5),
        "mergekit ties config": lambda c, b, ds: mergekit.merge(c, ties_config(len(ds)), {
            "base": b, **{f"tuned-{i}": d for i, d in enumerate(ds)}}),
    }
    merged = {}
    with serving(args.address) as address, Client(address, session=True) as c:  # the session frees them all
        b = push(c, base.state_dict())
        ds = [push(c, m.state_dict()) for m in tuned]
        for name, merge in merges.items():
            net = network()
            net.load_state_dict(fetch(c, merge(c, b, ds)))  # the merge, as a checkpoint of the network
            merged[name] = accuracy(net, xt, yt)
    result = Result(accuracy(base, xt, yt), [accuracy(m, xt, yt) for m in tuned], merged)

    print(f"{args.models} models fine-tuned from one base ({args.pretrain} epochs) for {args.epochs} epochs each")
    print(f"test accuracy: base {result.base:.2f}%, fine-tuned {', '.join(f'{a:.2f}%' for a in result.tuned)}")
    for name, score in result.merged.items():
        print(f"  {name:24s} {score:6.2f}%")
    return result


if __name__ == "__main__":
    main()
