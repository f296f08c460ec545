"""Adaptive server optimizers of federated learning (FedAdam, FedYogi, FedAdagrad) as torch optimizers.

Reddi et al.'s adaptive federated optimization, computed as Flower's strategies compute it, so that a
federated run moved onto weightavg's outer step (`outer.outer_step`) gives Flower's numbers. Flower
works with the difference `average - global`; an outer step hands an optimizer the gradient
`g = global - average`, its negative, so the first moment here is the negative of Flower's and the
update subtracts where Flower adds (the second moment, built from squares, is the same). Per round,
for every parameter:

- first moment (FedAdam, FedYogi): `m <- beta1 m + (1 - beta1) g`; FedAdagrad has beta1 fixed at 0,
  so its m is g itself and is not kept;
- second moment: FedAdam `v <- beta2 v + (1 - beta2) g^2`; FedYogi `v <- v - (1 - beta2) g^2
  sign(v - g^2)`; FedAdagrad `v <- v + g^2`;
- the step: `w <- w - rate m / (sqrt(v) + tau)`, where `rate` is `lr` for FedYogi and FedAdagrad and,
  for FedAdam, `lr sqrt(1 - beta2^(r + 1)) / (1 - beta1^(r + 1))` with r the round counted from 1:
  Flower corrects round r's bias with r + 1 (its `server_round + 1`), one round later than torch's Adam
  would, and these optimizers do the same.

The moments start at zero and live in the parameter's dtype, beside a float32 step count, as torch's
own optimizers keep theirs; a snapshot, a move and an epoch's rollback treat them like Adam's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .errors import InvalidArgument

STEP = "step"
"""The state key of the rounds stepped (a float32 scalar on the CPU, as torch's Adam keeps it)."""
FIRST = "exp_avg"
SECOND = "exp_avg_sq"
"""The moments' state keys: torch's names for Adam's, which these are the federated forms of."""


class FedOpt(torch.optim.Optimizer):
    """What the three share: a group's `lr`, `beta1`, `beta2` and `tau`, zero moments made at a
    parameter's first step, the step count, and the update `w -= rate m / (sqrt(v) + tau)`. A subclass
    says how the second moment takes a gradient (`second_moment`) and the step's rate (`rate`)."""

    keeps_first_moment = True
    """Whether m is kept: FedAdagrad's beta1 is 0, so its m is the gradient itself."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(params, {"lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau})

    @staticmethod
    def second_moment(v: torch.Tensor, g: torch.Tensor, beta2: float) -> None:
        """v := its next value, given the gradient g (in place)."""
        raise NotImplementedError

    @staticmethod
    def rate(lr: float, beta1: float, beta2: float, step: int) -> float:
        """The step's learning rate in round `step` (counted from 1)."""
        return lr

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One round for every parameter that has a gradient; the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta1, beta2, tau = (float(group[k]) for k in ("lr", "beta1", "beta2", "tau"))
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, p.grad, lr, beta1, beta2, tau)
        return loss

    def _step_one(self, p: torch.Tensor, g: torch.Tensor, lr: float, beta1: float, beta2: float, tau: float) -> None:
        if g.is_sparse:
            raise InvalidArgument(f"{type(self).__name__} takes dense gradients only")
        state = self.state[p]
        if not state:
            state[STEP] = torch.tensor(0.0, dtype=torch.float32)
            if self.keeps_first_moment:
                state[FIRST] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[SECOND] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state[STEP] += 1
        rounds = int(state[STEP].item())
        if self.keeps_first_moment:
            m = state[FIRST]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
        else:
            m = g
        v = state[SECOND]
        self.second_moment(v, g, beta2)
        denominator = v.sqrt().add_(tau)
        p.addcdiv_(m, denominator, value=-self.rate(lr, beta1, beta2, rounds))


class FedAdam(FedOpt):
    """FedAdam: Adam's moments, and Flower's bias-corrected rate (`rate`)."""

    @staticmethod
    def second_moment(v: torch.Tensor, g: torch.Tensor, beta2: float) -> None:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    @staticmethod
    def rate(lr: float, beta1: float, beta2: float, step: int) -> float:
        return lr * math.sqrt(1 - beta2 ** (step + 1)) / (1 - beta1 ** (step + 1))


class FedYogi(FedOpt):
    """FedYogi: the second moment moves towards g^2 by at most (1 - beta2) g^2 a round (additive, where
    Adam's is multiplicative), and the rate is `lr` in every round."""

    @staticmethod
    def second_moment(v: torch.Tensor, g: torch.Tensor, beta2: float) -> None:
        square = g * g
        direction = torch.sub(v, square).sign_()
        v.addcmul_(square, direction, value=-(1 - beta2))


class FedAdagrad(FedOpt):
    """FedAdagrad: the sum of every round's g^2, and no first moment (Flower fixes beta1 and beta2 at 0)."""

    keeps_first_moment = False

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, tau: float) -> None:
        super().__init__(params, lr, 0.0, 0.0, tau)

    @staticmethod
    def second_moment(v: torch.Tensor, g: torch.Tensor, beta2: float) -> None:
        v.addcmul_(g, g)
