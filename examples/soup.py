"""A greedy model soup on a weightavg server, against the best single ingredient.

One model is trained briefly on scikit-learn's digits; ingredients are fine-tuned from it with
different seeds (and learning rates, as the model-soups recipe varies hyperparameters). The server
ranks them on a held-out split, averages them in greedily (keeping each that strictly improves the
held-out accuracy) and returns the soup with every score; the model's own weights are put back.
The soup and the best ingredient are then compared on a test split that took no part in choosing.
On a problem as small as the digits the soup often keeps the best ingredient alone (on 400 held-out
digits an improvement is a whole sample); more ingredients of a larger model gain more.

    python examples/soup.py                          # an embedded server (pip install 'weightavg[server,demo]')
    python examples/soup.py --address HOST:PORT --ingredients 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from weightavg import Client
from weightavg_server.ops.app import serving

from digits import shuffled  # examples/digits.py, beside this file

SPEC = ["sequential", ["linear", "a", 64, 64], ["relu", "r"], ["linear", "b", 64, 10]]
RATES = (0.03, 0.02, 0.05, 0.04, 0.03, 0.02, 0.05, 0.04)


def digits(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The digits (examples/digits.py), shuffled: 1,000 to train, 400 held out to choose, the rest to test."""
    x, y = shuffled(seed)
    return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])


@dataclass
class Result:
    held_out: list[float]
    """Each ingredient's held-out accuracy."""
    kept: list[int]
    soup_held_out: float
    best_test: float
    """The test accuracy of the ingredient best on the held-out split."""
    soup_test: float


def main(argv: Sequence[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server (default: an embedded one)")
    p.add_argument("--ingredients", type=int, default=4,
                   help=f"how many fine-tuned models (their learning rates cycle through {len(RATES)} values)")
    p.add_argument("--pretrain", type=int, default=10, help="epochs of the model the ingredients start from")
    p.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning per ingredient")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    (x, y), (xv, yv), (xt, yt) = digits(args.seed)
    with serving(args.address) as address, Client(address) as c:
        q = c.module(SPEC)
        m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.05, 0.9))
        c.train(m, x, y)
        c.train(m, batchsize=50, shuffle=True, seed=args.seed)
        c.test(m, xv, yv)
        c.test(m, metrics="accuracy")
        for _ in range(args.pretrain):
            c.run(m)
        start = c.copyparms(m)
        ingredients = []
        for i in range(args.ingredients):
            c.copyparms(m, start)
            c.lr(m, RATES[i % len(RATES)])
            c.train(m, seed=args.seed + 1 + i)  # a different order of batches for each
            for _ in range(args.epochs):
                c.run(m)
            ingredients.append(c.copyparms(m))
        c.copyparms(m, start)

        soup = c.soup(m, ingredients, metric="accuracy")
        best = soup.order[0]
        c.test(m, xt, yt)  # the test split, which took no part in choosing
        c.copyparms(m, ingredients[best])
        best_test = float(c.testrun(m))
        c.copyparms(m, soup.soup)
        soup_test = float(c.testrun(m))
        c.free(m, start, soup.soup, *ingredients)

    print(f"{args.ingredients} ingredients fine-tuned from one model with seeds {args.seed + 1}..{args.seed + args.ingredients}")
    print("ingredient  lr     held-out accuracy")
    for i, score in enumerate(soup.scores):
        print(f"{i:10d}  {RATES[i % len(RATES)]:<5}  {score:16.2f}%{'   in the soup' if i in soup.kept else ''}")
    print(f"tried in order {soup.order}: held-out accuracy {', '.join(f'{s:.2f}%' for s in soup.tried)}")
    print("                         held-out    test")
    print(f"best single ingredient   {soup.scores[best]:7.2f}%  {best_test:6.2f}%")
    print(f"greedy soup of {len(soup.kept)}         {soup.score:7.2f}%  {soup_test:6.2f}%")
    return Result(soup.scores, soup.kept, soup.score, best_test, soup_test)


if __name__ == "__main__":
    main()
