"""Batchnorm layers after averaging: reset running statistics with momentum None, then restore momentum."""

from __future__ import annotations

import math

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import InvalidArgument, NotFound

Momenta = dict[str, "float | None"]


def batchnorm_layers(module: torch.nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm1d/2d/3d and SyncBatchNorm layers by module path (root ""), pre-order.

    Instance norms share a base class with batchnorm in some torch versions but are not batchnorm
    layers here, as in the reference.
    """
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def reset_batchnorm(module: torch.nn.Module) -> Momenta:
    """Save each batchnorm momentum, set it to None (a cumulative mean) and reset running statistics.

    Returns {module path: previous momentum or None}. The caller recalculates the statistics by
    forward passes in train mode, then hands the result to restore_momentum.

    Example: for the reference's network with a batchnorm child 'b', returns {'b': 0.1}.
    """
    momenta: Momenta = {}
    for name, bn in batchnorm_layers(module):
        momenta[name] = bn.momentum
        bn.momentum = None
        bn.reset_running_stats()
    return momenta


def restore_momentum(module: torch.nn.Module, momenta: Momenta) -> None:
    """Put back momenta by module path, all or nothing: every name must be a batchnorm layer."""
    modules = dict(module.named_modules())
    for name, value in momenta.items():
        if name not in modules:
            raise NotFound(f"unable to locate batchnorm module '{name}'; no momentum restored")
        if not isinstance(modules[name], _BatchNorm):
            kind = type(modules[name]).__name__
            raise InvalidArgument(f"module '{name}' is {kind}, not a batchnorm layer; no momentum restored")
        if value is not None and not math.isfinite(value):
            raise InvalidArgument(f"momentum for '{name}' must be finite or None, given {value}")
    for name, value in momenta.items():
        bn = modules[name]
        assert isinstance(bn, _BatchNorm)
        bn.momentum = value
