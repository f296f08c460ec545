"""Loss functions by the reference's names (ce, mse, nll, bce, bcelogits, smoothl1) and options.

Each type maps to one standard torch.nn loss class. Options are given by position (in the order
listed) or by name. The reference's tensor-valued options (class weights) are not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidArgument, did_you_mean
from .options import (
    NON_NEGATIVE,
    UNIT_INTERVAL,
    Opt,
    Value,
    Values,
    ValueType,
    Wording,
    float_value,
    int_value,
    resolve,
    str_value,
)

REDUCTIONS = ("mean", "sum")
_REDUCE = Opt("reduce", ValueType.STR, "mean", choices=REDUCTIONS)
_IGNORE = Opt("ignore", ValueType.INT, -100)


@dataclass(frozen=True)
class LossType:
    """A loss type: its options in order and how to build the torch module from them."""

    name: str
    options: tuple[Opt, ...]
    build: Callable[[Values], nn.Module]


LOSS_TYPES: dict[str, LossType] = {
    t.name: t
    for t in (
        LossType(
            "ce",
            (_IGNORE, Opt("smoothing", ValueType.FLOAT, 0.0, UNIT_INTERVAL), _REDUCE),
            lambda o: nn.CrossEntropyLoss(
                ignore_index=int_value(o, "ignore"),
                label_smoothing=float_value(o, "smoothing"),
                reduction=str_value(o, "reduce"),
            ),
        ),
        LossType(
            "nll",
            (_IGNORE, _REDUCE),
            lambda o: nn.NLLLoss(ignore_index=int_value(o, "ignore"), reduction=str_value(o, "reduce")),
        ),
        LossType("mse", (_REDUCE,), lambda o: nn.MSELoss(reduction=str_value(o, "reduce"))),
        LossType("bce", (_REDUCE,), lambda o: nn.BCELoss(reduction=str_value(o, "reduce"))),
        LossType("bcelogits", (_REDUCE,), lambda o: nn.BCEWithLogitsLoss(reduction=str_value(o, "reduce"))),
        LossType(
            "smoothl1",
            (_REDUCE, Opt("beta", ValueType.FLOAT, 1.0, NON_NEGATIVE)),
            lambda o: nn.SmoothL1Loss(reduction=str_value(o, "reduce"), beta=float_value(o, "beta")),
        ),
    )
}


@dataclass
class Loss:
    """A loss handle's object: its type, resolved options and the torch module computing it."""

    type: str
    options: dict[str, Value]
    fn: nn.Module

    def tensors(self) -> Iterator[torch.Tensor]:
        """The loss holds no tensors of its own (no class weights)."""
        yield from self.fn.buffers()

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.fn(output, target)
        return result


def create_loss(type_name: str, args: tuple[Value, ...] = (), kwargs: tuple[tuple[str, Value], ...] = ()) -> Loss:
    """Build a loss from its reference name and options.

    Raises:
        InvalidArgument: unknown type or option, wrong value type or range.

    Example: create_loss("ce", kwargs=(("smoothing", 0.1),)) is CrossEntropyLoss(label_smoothing=0.1).
    """
    loss_type = LOSS_TYPES.get(type_name)
    if loss_type is None:
        raise InvalidArgument(
            f"unrecognized loss: '{type_name}'{did_you_mean(type_name, LOSS_TYPES)} (one of {', '.join(LOSS_TYPES)})"
        )
    options = resolve(type_name, loss_type.options, args, kwargs, Wording.SETTING)
    return Loss(type_name, options, loss_type.build(options))
