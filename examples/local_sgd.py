"""Local SGD on a weightavg cluster: every rank trains its own shard, then the ranks average weights.

A replicated model (one handle, a copy on every rank, all starting from rank 0's initial values) is
trained for k local epochs per round, each rank on its contiguous shard of the training rows; then
`allreduce` replaces every rank's weights by their mean, weighted by the ranks' example counts.
The test accuracy is printed after every round; at the end each rank's weights are read back to show
the ranks agree. The data are MNIST's idx files when given (the first 8,000 digits train, the last
2,000 test), else a small deterministic synthetic set of 10 classes.

With --hierarchy PERIOD:SIZE,... the ranks average after every epoch as torch's
HierarchicalModelAverager decides (weightavg.HierarchicalAverager): within groups of SIZE consecutive
ranks every PERIOD epochs, the largest period dividing the epoch winning, the last SIZE every rank;
a round then ends with an average over every rank only where its last epoch did not make one.

    python examples/local_sgd.py                            # starts a 2-rank CPU cluster (torchrun, gloo)
    python examples/local_sgd.py --mnist ../shared/data/mnist --rounds 5 --epochs 2
    python examples/local_sgd.py --ranks 4 --epochs 4 --hierarchy 1:2,4:4   # pairs every epoch, all every 4
    torchrun --standalone --nproc-per-node 4 -m weightavg_server serve --port 50051 --device cpu &
    python examples/local_sgd.py --address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightavg import Client, HierarchicalAverager
from weightavg_server.ops.launch import cluster_serving

Split = tuple[np.ndarray, np.ndarray]


def mnist(directory: Path) -> tuple[Split, Split]:
    """The MNIST test set's idx files (t10k-*-idx*-ubyte.gz): the first 8,000 digits to train, the last 2,000 to test."""
    with gzip.open(directory / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)  # header: magic, count, rows, cols
    with gzip.open(directory / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)  # header: magic, count
    x, y = (images.reshape(len(labels), 784) / 255.0).astype(np.float32), labels.astype(np.int64)
    return (x[:8000], y[:8000]), (x[8000:], y[8000:])


def synthetic(seed: int, rows: int = 3000, features: int = 32, classes: int = 10) -> tuple[Split, Split]:
    """Gaussian clusters around one random centre per class, wide enough to overlap (no classifier gets
    them all right; chance is 10%): the first 80% of the rows to train, the rest to test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, features))
    y = rng.integers(0, classes, rows)
    x = (centres[y] + 2.0 * rng.normal(size=(rows, features))).astype(np.float32)
    cut = rows * 4 // 5
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def hierarchy(text: str) -> dict[int, int]:
    """'1:2,4:4' -> {1: 2, 4: 4}: averaging periods (in epochs) and the group sizes they average over."""
    try:
        return {int(period): int(size) for period, size in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"give PERIOD:SIZE pairs separated by commas, e.g. 1:2,4:4; got {text!r}") from None


@dataclass
class Result:
    accuracy: list[float]
    """Test accuracy (percent) after each round's allreduce."""
    shards: list[int]
    """Training rows per rank."""
    parameters: dict[str, list[np.ndarray]]
    """Every parameter as each rank holds it at the end, by rank."""


def main(argv: Sequence[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running cluster (default: start a local one with --ranks CPU ranks)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the local cluster (without --address)")
    p.add_argument("--mnist", type=Path, help="a folder with MNIST's t10k idx files (default: synthetic data)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hierarchy", type=hierarchy, help="PERIOD:SIZE,...: average after every epoch as torch's "
                   "HierarchicalModelAverager decides (e.g. 1:2,4:4 on 4 ranks), instead of once a round")
    args = p.parse_args(argv)

    (x, y), (xt, yt) = mnist(args.mnist) if args.mnist else synthetic(args.seed)
    spec = ["sequential", ["linear", "a", x.shape[1], 128], ["relu", "r"], ["linear", "b", 128, 10]]
    with cluster_serving(args.address, args.ranks) as address, Client(address, timeout=600) as c:
        world = int(c.info()["world_size"])
        shards = [len(part) for part in np.array_split(y, world)]  # the rows train(shard=True) gives each rank
        m = c.module(spec, replicate=True)
        model = c.model(m, c.loss("ce"), c.opt("sgd", m, args.lr, 0.9))  # the model takes over m, loss, optimizer
        c.train(model, x, y, shard=True)
        c.train(model, batchsize=50, shuffle=True, seed=args.seed)
        c.test(model, xt, yt)
        c.test(model, metrics="accuracy")
        print(f"{world} ranks, shards of {shards} rows; {args.epochs} local epoch(s) per round")
        averager = HierarchicalAverager(c, model, args.hierarchy, weights=shards) if args.hierarchy else None
        print("round  train loss per rank  test accuracy")
        accuracy = []
        for number in range(1, args.rounds + 1):
            last = 0
            for _ in range(args.epochs):
                losses = [float(v) for v in c.run(model)]  # every rank one epoch over its own shard, at once
                if averager is not None:
                    last = averager.average_parameters()  # the group size it averaged over; 0: none
            if last != world:  # (without --hierarchy, once a round)
                c.allreduce(model, op="mean", weights=shards)
            accuracy.append(float(c.testrun(model)[0]))  # every rank tests the same weights on the same data
            print(f"{number:5d}  {' '.join(f'{v:.4f}' for v in losses):>19}  {accuracy[-1]:12.2f}%")
        parameters = {name: [np.asarray(c.parm(model, name, rank=r)) for r in range(world)]
                      for name in c.parmnames(model)}
        spread = max(float(np.abs(v - vs[0]).max()) for vs in parameters.values() for v in vs)
        print(f"largest difference between two ranks' weights after the last allreduce: {spread}")
        c.free(model)
    return Result(accuracy, shards, parameters)


if __name__ == "__main__":
    main()
