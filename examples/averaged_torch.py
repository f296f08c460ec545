"""SWA and EMA of a model that trains in this process with PyTorch, the averages kept on a weightavg server.

A small network trains on scikit-learn's digits in this process (its own loop, its own optimizer).
`weightavg.torch.RemoteAveragedModel` keeps two averages of it on the server: an SWA, one sample per
epoch from `--swa-start` on (the rate held at `--swa-lr`, as the SWA recipe does), and an EMA with
warm-up, updated every step. Batchnorm statistics are recomputed for the SWA with torch's `update_bn`,
then the last weights and both averages are tested, the SWA beside torch's own `AveragedModel` fed
the same models (they agree to float32 rounding), and the averages' state dicts load into plain
copies of the network, as a checkpoint would.

    python examples/averaged_torch.py                      # an embedded server (pip install 'weightavg[server,demo]')
    python examples/averaged_torch.py --address HOST:PORT --epochs 20
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from weightavg import Client
from weightavg.torch import RemoteAveragedModel
from weightavg_server.ops.app import serving

from digits import accuracy, torch_split  # examples/digits.py, beside this file


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


@dataclass
class Result:
    last: float
    swa: float
    ema: float
    """Test accuracies in percent: the last weights, the SWA (batchnorm recomputed), the EMA."""
    swa_vs_torch: float
    """The largest difference between the server's SWA and torch's AveragedModel of the same models."""
    samples: int
    """Models in the SWA (its n_averaged)."""


def main(argv: Sequence[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server (default: an embedded one)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--swa-start", type=int, default=6, help="the first epoch whose weights the SWA takes")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--swa-lr", type=float, default=0.2, help="the rate held while the SWA samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    (x, y), (xt, yt) = torch_split(args.seed)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(y), 32)]
    model = network()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    with serving(args.address) as address, Client(address, session=True) as c:  # the session frees both averages
        swa = RemoteAveragedModel(c, model, "swa")
        ema = RemoteAveragedModel(c, model, "ema", decay=0.999, warmup=True, dtype="float32")
        oracle = AveragedModel(model)
        for epoch in range(args.epochs):
            if epoch == args.swa_start:
                for group in opt.param_groups:
                    group["lr"] = args.swa_lr
            model.train()
            for xb, yb in batches:
                opt.zero_grad()
                torch.autograd.backward(nn.functional.cross_entropy(model(xb), yb))  # loss.backward(), typed
                opt.step()
                ema.update_parameters(model)
            if epoch >= args.swa_start:
                swa.update_parameters(model)
                oracle.update_parameters(model)
        update_bn(batches, swa)  # the averaged weights' own batchnorm statistics
        update_bn(batches, oracle)
        ours, theirs = swa.state_dict(), oracle.state_dict()
        gap = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)
        # The averages as plain networks: what torch.save(swa.module.state_dict(), path) would hold.
        swa_net, ema_net = network(), network()
        swa_net.load_state_dict(swa.module.state_dict())
        ema_net.load_state_dict(ema.module.state_dict())
        result = Result(accuracy(model, xt, yt), accuracy(swa_net, xt, yt), accuracy(ema_net, xt, yt), gap,
                        int(swa.n_averaged))

    print(f"{args.epochs} epochs at lr {args.lr}, from epoch {args.swa_start} at {args.swa_lr}; "
          f"SWA of {result.samples} epochs, EMA of every step (decay 0.999, warm-up)")
    print(f"test accuracy: last weights {result.last:.2f}%, SWA {result.swa:.2f}%, EMA {result.ema:.2f}%")
    print(f"SWA against torch's AveragedModel of the same models: largest difference {result.swa_vs_torch:.1e}")
    return result


if __name__ == "__main__":
    main()
