"""Optimizers by the reference's names (sgd, adam, adamw, rmsprop, adagrad), options and defaults.

Options are given by position (in the order listed) or by name, e.g. sgd takes lr, momentum,
dampening, decay, nesterov, so `opt("sgd", q, .05, .9, nesterov=True)` is SGD(lr=.05, momentum=.9,
nesterov=True). Every optimizer updates all of its module's parameters, in one group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgument
from .options import Opt, Value, below_one, non_negative, resolve

_LR = Opt("lr", float, 0.01, non_negative, "non-negative")
_DECAY = Opt("decay", float, 0.0, non_negative, "non-negative")
_EPS = Opt("eps", float, 1e-8, non_negative, "non-negative")
_ADAM = (
    Opt("lr", float, 0.001, non_negative, "non-negative"),
    Opt("beta1", float, 0.9, below_one, "in [0, 1)"),
    Opt("beta2", float, 0.999, below_one, "in [0, 1)"),
    _EPS,
)


@dataclass(frozen=True)
class OptimizerType:
    """An optimizer type: its options in order and how to build the torch optimizer from them."""

    name: str
    options: tuple[Opt, ...]
    build: Callable[[list[nn.Parameter], dict[str, Any]], torch.optim.Optimizer]


OPTIMIZER_TYPES: dict[str, OptimizerType] = {
    t.name: t
    for t in (
        OptimizerType(
            "sgd",
            (_LR, Opt("momentum", float, 0.0, non_negative, "non-negative"),
             Opt("dampening", float, 0.0), _DECAY, Opt("nesterov", bool, False)),
            lambda p, o: torch.optim.SGD(
                p, lr=o["lr"], momentum=o["momentum"], dampening=o["dampening"],
                weight_decay=o["decay"], nesterov=o["nesterov"],
            ),
        ),
        OptimizerType(
            "adam",
            (*_ADAM, _DECAY, Opt("amsgrad", bool, False)),
            lambda p, o: torch.optim.Adam(
                p, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], weight_decay=o["decay"],
                amsgrad=o["amsgrad"],
            ),
        ),
        OptimizerType(
            "adamw",
            (*_ADAM, Opt("decay", float, 0.01, non_negative, "non-negative"), Opt("amsgrad", bool, False)),
            lambda p, o: torch.optim.AdamW(
                p, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], weight_decay=o["decay"],
                amsgrad=o["amsgrad"],
            ),
        ),
        OptimizerType(
            "rmsprop",
            (_LR, Opt("alpha", float, 0.99, non_negative, "non-negative"), _EPS, _DECAY,
             Opt("momentum", float, 0.0, non_negative, "non-negative"), Opt("centered", bool, False)),
            lambda p, o: torch.optim.RMSprop(
                p, lr=o["lr"], alpha=o["alpha"], eps=o["eps"], weight_decay=o["decay"],
                momentum=o["momentum"], centered=o["centered"],
            ),
        ),
        OptimizerType(
            "adagrad",
            (_LR, Opt("lrdecay", float, 0.0, non_negative, "non-negative"), _DECAY,
             Opt("init", float, 0.0, non_negative, "non-negative"), Opt("eps", float, 1e-10, non_negative, "non-negative")),
            lambda p, o: torch.optim.Adagrad(
                p, lr=o["lr"], lr_decay=o["lrdecay"], weight_decay=o["decay"],
                initial_accumulator_value=o["init"], eps=o["eps"],
            ),
        ),
    )
}


@dataclass
class Optimizer:
    """An optimizer handle's object: type, options, the module it updates and the torch optimizer."""

    type: str
    options: dict[str, Value]
    module: nn.Module
    optim: torch.optim.Optimizer

    def tensors(self) -> Iterator[torch.Tensor]:
        """The optimizer's own state (momentum buffers, moment estimates); the module is its own handle."""
        for state in self.optim.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    def describe(self) -> dict[str, Value]:
        """Options with the current learning rate."""
        return {**self.options, "lr": get_lr(self)}


def create_optimizer(
    type_name: str, module: nn.Module, args: tuple[Value, ...] = (), kwargs: tuple[tuple[str, Value], ...] = ()
) -> Optimizer:
    """Build an optimizer over every parameter of a module.

    Raises:
        InvalidArgument: unknown type or option, a bad value, or a combination torch refuses
            (e.g. nesterov without momentum).

    Example: create_optimizer("sgd", q, (0.05, 0.9), (("nesterov", True),)).
    """
    opt_type = OPTIMIZER_TYPES.get(type_name)
    if opt_type is None:
        raise InvalidArgument(f"unrecognized optimizer: '{type_name}' (one of {', '.join(OPTIMIZER_TYPES)})")
    options = resolve(type_name, opt_type.options, args, kwargs)
    params = list(module.parameters())
    if not params:
        raise InvalidArgument(f"{type_name}: the module has no parameters to optimize")
    try:
        optim = opt_type.build(params, options)
    except ValueError as exc:
        raise InvalidArgument(f"{type_name}: {exc}") from None
    return Optimizer(type_name, options, module, optim)


def get_lr(optimizer: Optimizer) -> float:
    """The learning rate of the first parameter group."""
    return float(optimizer.optim.param_groups[0]["lr"])


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    if not math.isfinite(lr) or lr < 0:
        raise InvalidArgument(f"learning rate must be finite and non-negative, given {lr}")
    for group in optimizer.optim.param_groups:
        group["lr"] = lr
