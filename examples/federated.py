"""Federated rounds through a weightavg server, without moving weights home.

Several clients (threads, each with its own connection) train their own models on their own shards
of scikit-learn's digits, on the server. After each round the server averages the clients' weights,
weighted by shard size (FedAvg), and applies `global - average` as a gradient to the global model's
optimizer (the outer step: SGD with Nesterov momentum is DiLoCo's, plain SGD with lr 1 is FedAvg,
Adam an adaptive server optimizer; fedadam, fedyogi and fedadagrad Flower's strategies). The global model's test accuracy is printed per round. No tensor
crosses the wire after the data are loaded: clients start each round from a live view of the
global weights, and the average and the outer step run on the server.

    python examples/federated.py                     # an embedded server (pip install 'weightavg[server,demo]')
    python examples/federated.py --address HOST:PORT --clients 8 --rounds 10 --outer adam
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightavg import Client
from weightavg_server.ops.app import serving

from digits import shuffled  # examples/digits.py, beside this file

SPEC = ["sequential", ["linear", "a", 64, 32], ["relu", "r"], ["linear", "b", 32, 10]]
OUTER = {
    "fedavg": ("sgd", (1.0,), {}),
    "fedavgm": ("sgd", (1.0, 0.5), {}),
    "nesterov": ("sgd", (0.7, 0.9), {"nesterov": True}),
    "adam": ("adam", (0.05,), {}),
    "fedadam": ("fedadam", (0.05,), {}),
    "fedyogi": ("fedyogi", (0.05,), {}),
    "fedadagrad": ("fedadagrad", (0.1,), {}),
}
"""Outer optimizers by name: (type, positional options, keyword options) for Client.opt."""


def digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits (examples/digits.py), shuffled: 1,400 to train on, the rest to test."""
    x, y = shuffled(seed)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@dataclass
class Round:
    number: int
    accuracy: float
    gradient_norm: float


def main(argv: Sequence[str] | None = None) -> list[Round]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server (default: an embedded one)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--outer", choices=sorted(OUTER), default="nesterov")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    x, y, xt, yt = digits(args.seed)
    # Unequal shards (1 : 2 : ... : K), so the weighted average differs from the plain mean.
    cuts = np.cumsum([0, *range(1, args.clients + 1)]) * len(y) // (args.clients * (args.clients + 1) // 2)
    shards = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    rounds: list[Round] = []
    # A session: if a round fails, closing the client frees every handle made here, on any server.
    with serving(args.address) as address, Client(address, session=True) as c:
        q = c.module(SPEC)
        kind, positional, named = OUTER[args.outer]
        g = c.model(q, c.loss("ce"), c.opt(kind, q, *positional, **named))
        c.test(g, xt, yt)
        c.test(g, metrics="accuracy")
        start = c.parms(g)  # a live view: each round starts from the global weights as they are then
        models: list[Any] = []
        for shard_x, shard_y in shards:
            qk = c.module(SPEC)
            m = c.model(qk, c.loss("ce"), c.opt("sgd", qk, 0.05, 0.9))
            c.train(m, shard_x, shard_y)
            c.train(m, batchsize=32, shuffle=True, seed=args.seed + len(models))
            models.append(m)

        def local(m: Any, failures: list[BaseException]) -> None:
            try:
                with Client(address) as mine:  # each client its own connection, as separate machines would
                    mine.copyparms(m, start)
                    for _ in range(args.epochs):
                        mine.run(m)
            except BaseException as exc:  # noqa: BLE001 - reported by the round
                failures.append(exc)

        print(f"{args.clients} clients, shards of {[len(s[1]) for s in shards]} digits; outer step: {args.outer}")
        print("round  test accuracy  |global - average|")
        for number in range(1, args.rounds + 1):
            failures: list[BaseException] = []
            threads = [threading.Thread(target=local, args=(m, failures)) for m in models]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failures:
                raise failures[0]
            average = c.average(models, weights=[len(s[1]) for s in shards])
            norm = c.outer_step(g, average)
            c.free(average)
            rounds.append(Round(number, float(c.testrun(g)), norm))
            print(f"{number:5d}  {rounds[-1].accuracy:12.2f}%  {norm:18.4f}")
        c.free(start, g, *models)
    return rounds


if __name__ == "__main__":
    main()
