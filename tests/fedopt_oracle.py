"""Flower's adaptive server strategies (FedAdam, FedYogi, FedAdagrad: flwr/server/strategy) as
formulas in float64 numpy, the oracle of the project's fedadam, fedyogi and fedadagrad optimizers
(in process: tests/test_domain_fedopt.py; through a real server: tests/test_merging.py)."""

from __future__ import annotations

import math

import numpy as np

FLOWER_DEFAULTS = {
    "fedadam": {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"lr": 0.1, "beta1": 0.0, "beta2": 0.0, "tau": 1e-3},
}
"""Each strategy's server-side defaults in Flower's message API, flwr.serverapp.strategy (eta, beta_1,
beta_2, tau; FedAdagrad fixes the betas at 0). The older flwr.server.strategy classes had tau 1e-9 for
FedAdam and FedAdagrad."""


def flower_rounds(kind: str, start: dict[str, np.ndarray], rounds: list[dict[str, np.ndarray]], lr: float,
                  beta1: float, beta2: float, tau: float) -> dict[str, np.ndarray]:
    """The global weights after Flower's strategy `kind` aggregated each round's average in turn
    (server_round counted from 1), in float64: delta = average - weights; m = beta1 m + (1 - beta1)
    delta; v by the strategy's rule; weights += rate m / (sqrt(v) + tau)."""
    w = {n: a.astype(np.float64) for n, a in start.items()}
    m = {n: np.zeros_like(a) for n, a in w.items()}
    v = {n: np.zeros_like(a) for n, a in w.items()}
    for server_round, average in enumerate(rounds, start=1):
        for n in w:
            delta = average[n].astype(np.float64) - w[n]
            m[n] = beta1 * m[n] + (1 - beta1) * delta
            if kind == "fedadam":
                v[n] = beta2 * v[n] + (1 - beta2) * delta * delta
                rate = lr * math.sqrt(1 - beta2 ** (server_round + 1)) / (1 - beta1 ** (server_round + 1))
            elif kind == "fedyogi":
                v[n] = v[n] - (1 - beta2) * delta * delta * np.sign(v[n] - delta * delta)
                rate = lr
            else:
                v[n] = v[n] + delta * delta
                rate = lr
            w[n] = w[n] + rate * m[n] / (np.sqrt(v[n]) + tau)
    return w
