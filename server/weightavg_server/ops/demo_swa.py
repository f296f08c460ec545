"""The default demo: does weight averaging help? Stochastic weight averaging (SWA) against the same
run's last weights and against a run with a decayed learning rate, over several seeds, through the
thin client.

The recipe is the SWA paper's (Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and
Better Generalization"): train normally, then hold the learning rate high and constant and average
the weights after every epoch; recompute batchnorm statistics for the average. A high rate keeps the
weights moving around a wide region of low loss; any one of them is noisy, their mean sits nearer
its centre. At a low rate the weights barely move and averaging changes little, so the demo says in
words whether it helped on the data given, rather than assuming so.

`run` drives a server; `render` turns what it measured into the lines printed, and is also what the
README's sample output is checked against (tests/test_demo.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightavg import Client

LAST, AVERAGED, DECAYED = "last weights", "averaged weights", "decayed lr"
ROWS = (LAST, AVERAGED, DECAYED)


@dataclass(frozen=True)
class Recipe:
    """What each seed trains: the network, then the two phases."""

    hidden: int = 128
    batch: int = 32
    momentum: float = 0.9
    lr: float = 0.05
    """The learning rate of the first phase, and where the decayed run's rate starts."""
    epochs: int = 10
    """Epochs of the first phase, the same for every row."""
    swa_lr: float = 0.3
    """The high constant rate of the averaging phase."""
    swa_epochs: int = 20
    """Epochs after the first phase: averaged after each (SWA), or trained with a decaying rate."""

    def describe(self, features: int) -> list[str]:
        """The recipe in words, as the report's heading."""
        return [
            f"model: {features}-{self.hidden} linear, batchnorm, relu, {self.hidden}-10 linear; cross entropy; "
            f"SGD momentum {self.momentum:g}, batch {self.batch}",
            f"each seed: {self.epochs} epochs at lr {self.lr:g}, then {self.swa_epochs} more epochs three ways:",
            f"  {LAST:<18}lr {self.swa_lr:g} held high and constant (the SWA recipe); the weights after the last epoch",
            f"  {AVERAGED:<18}the same run's weights averaged after each epoch (avgparms), batchnorm recalculated",
            f"  {DECAYED:<18}a second run from the same start, lr {self.lr:g} decayed linearly to 0, no averaging",
        ]


@dataclass
class Result:
    """Test accuracy in percent, per row and seed (in the order of `seeds`)."""

    dataset: str
    train: int
    test: int
    features: int
    recipe: Recipe
    seeds: list[int]
    accuracy: dict[str, list[float]] = field(default_factory=lambda: {row: [] for row in ROWS})


def spread(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation, two decimals."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def verdict(averaged: Sequence[float], other: Sequence[float], against: str) -> str:
    """Whether averaging helped against one other row, in words: helped (better on average and in
    most seeds), no clear difference (better on average, not in most seeds), or did not help."""
    gains = [a - b for a, b in zip(averaged, other)]
    mean, wins, n = statistics.fmean(gains), sum(g > 0 for g in gains), len(gains)
    if mean > 0 and wins * 2 > n:
        return f"averaging helped: {mean:+.2f} points over the {against} on average, better in {wins} of {n} seeds"
    if mean > 0:
        return (f"averaging made no clear difference: {mean:+.2f} points over the {against} on average, but "
                f"better in only {wins} of {n} seeds")
    return (f"averaging did not help on this data: {mean:+.2f} points against the {against} on average, "
            f"better in {wins} of {n} seeds")


def render(result: Result) -> list[str]:
    """The report: recipe, one row of accuracies per way of finishing, mean ± sd, and the verdicts."""
    r = result
    width = max(len(row) for row in ROWS) + 2
    head = f"{'test accuracy %':<{width}}" + "".join(f"{f'seed {s}':>9}" for s in r.seeds) + f"{'mean ± sd':>16}"
    lines = [*r.recipe.describe(r.features), "", head]
    for row in ROWS:
        values = r.accuracy[row]
        lines.append(f"{row:<{width}}" + "".join(f"{v:>9.2f}" for v in values) + f"{spread(values):>16}")
    lines += [
        "",
        verdict(r.accuracy[AVERAGED], r.accuracy[LAST], "last weights of the same run"),
        verdict(r.accuracy[AVERAGED], r.accuracy[DECAYED], "decayed-lr run"),
    ]
    return lines


def _epochs(
    c: Client, m: Any, count: int,
    before: Callable[[int], object] = lambda k: None, after: Callable[[int], object] = lambda k: None,
) -> None:
    """`count` epochs, calling before(k) and after(k) around epoch k."""
    for k in range(count):
        before(k)
        c.run(m)
        after(k)


def _model(c: Client, features: int, recipe: Recipe, seed: int, x: np.ndarray, y: np.ndarray, X: np.ndarray,
           Y: np.ndarray, init: Callable[[int], None]) -> Any:
    init(seed)
    q = c.module(["sequential", ["linear", "a", features, recipe.hidden], ["batchnorm1d", "b", recipe.hidden],
                  ["relu", "c"], ["linear", "d", recipe.hidden, 10]])
    m = c.model(q, c.loss("ce"), c.opt("sgd", q, recipe.lr, recipe.momentum))
    c.train(m, batchsize=recipe.batch, shuffle=True, seed=seed)
    c.train(m, x, y)
    c.test(m, batchsize=1000, metrics="accuracy")
    c.test(m, X, Y)
    return m


def run(c: Client, dataset: Any, recipe: Recipe, seeds: Sequence[int], init: Callable[[int], None]) -> Result:
    """Train every seed the three ways and measure test accuracy. `init(seed)` seeds weight
    initialisation (the embedded server's generator; a remote server's cannot be seeded from here).
    Every handle made is freed before the next seed."""
    features = dataset.x.shape[1]
    result = Result(dataset.name, len(dataset.x), len(dataset.X), features, recipe, list(seeds))
    data = (dataset.x, dataset.y, dataset.X, dataset.Y)
    started = time.monotonic()
    for seed in seeds:
        m = _model(c, features, recipe, seed, *data, init)
        _epochs(c, m, recipe.epochs)
        c.lr(m, recipe.swa_lr)
        average = c.copyparms(m)
        _epochs(c, m, recipe.swa_epochs, after=lambda k: c.avgparms(m, average))
        result.accuracy[LAST].append(float(c.testrun(m)))
        c.copyparms(m, average)
        c.batchnorm(m)  # statistics for the averaged weights, over the training data
        result.accuracy[AVERAGED].append(float(c.testrun(m)))
        c.free(m, average)

        m = _model(c, features, recipe, seed, *data, init)
        _epochs(c, m, recipe.epochs)
        _epochs(c, m, recipe.swa_epochs,
                before=lambda k: c.lr(m, recipe.lr * (1 - (k + 1) / (recipe.swa_epochs + 1))))
        result.accuracy[DECAYED].append(float(c.testrun(m)))
        c.free(m)
        sys.stderr.write(f"  seed {seed}: {', '.join(f'{result.accuracy[r][-1]:.2f}%' for r in ROWS)} "
                         f"({time.monotonic() - started:.1f} s)\n")
    return result
