"""What an epoch changes, kept so that an epoch that fails midway can be put back exactly.

An epoch writes in place into the optimizer's parameters, the module's buffers (batchnorm
statistics), the optimizer's state and the gradients backward adds into; it replaces the gradients
zero_grad sets to None, adds state for parameters stepped for the first time, and draws from the
model's shuffle generator. `kept` copies what is written, holds on to what is replaced, and on
failure puts all of it back in place, so every tensor keeps its identity (live views, the
optimizer's references). `written` and `replaced` say which tensors, so the store can reserve
their bytes (footprint.rollback_bytes) before anything is copied.

The copies are kept in host memory whatever the model's device: on a GPU they would double what an
epoch of an Adam model holds there (parameters, two moments and gradients), where memory is
scarcest; a CUDA model pays one transfer out each epoch (and one back if it fails) instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import Cancelled


def _distinct(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once, in order (a parameter tied in two places is one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _stepped(optim: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer steps: those of its groups that take gradients."""
    return _distinct(p for group in optim.param_groups for p in group["params"] if p.requires_grad)


def _outside(module: nn.Module, optim: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Trainable parameters the optimizer does not hold (registered after it was built): zero_grad
    never clears their gradients, so backward adds into them in place."""
    inside = {id(p) for p in _stepped(optim)}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in inside]


def written(module: nn.Module, optim: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Tensors an epoch writes in place, each copied before it starts: the stepped parameters, the
    module's buffers, the optimizer's state, and the gradients of trainable parameters outside it."""
    state = (v for s in optim.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    grads = (p.grad for p in _outside(module, optim) if p.grad is not None)
    return _distinct([*_stepped(optim), *module.buffers(), *state, *grads])


def replaced(optim: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Gradients an epoch drops (zero_grad sets them to None) and backward makes anew: held until the
    epoch ends, so that a failed one can put them back; their replacements are new memory."""
    return [p.grad for p in _stepped(optim) if p.grad is not None]


class Kept:
    """Copies of what an epoch writes, the objects it replaces, and its generator's state."""

    def __init__(self, module: nn.Module, optim: torch.optim.Optimizer, generator: torch.Generator) -> None:
        self._optim = optim
        self._generator = generator
        self._generator_state = generator.get_state()
        self._gradients = [(p, p.grad) for p in _distinct([*module.parameters(), *_stepped(optim)])]
        self._state: dict[torch.Tensor, dict[str, Any]] = {p: dict(s) for p, s in optim.state.items()}
        self._copies = [(t, t.detach().to("cpu", copy=True)) for t in written(module, optim)]

    def put_back(self) -> None:
        """Every value and object as it was when kept; state made since (a first step's) is dropped."""
        with torch.no_grad():
            for t, copy in self._copies:
                t.copy_(copy)
        for p, grad in self._gradients:
            p.grad = grad
        self._optim.state.clear()
        self._optim.state.update((p, dict(s)) for p, s in self._state.items())
        self._generator.set_state(self._generator_state)


@contextlib.contextmanager
def kept(module: nn.Module, optim: torch.optim.Optimizer, generator: torch.Generator) -> Iterator[None]:
    """Run the block; if it fails, put back the module, optimizer and generator as they were.

    A block stopped with Cancelled keeps what it did: a cancelled epoch keeps the batches it trained.
    """
    saved = Kept(module, optim, generator)
    try:
        yield
    except Cancelled:
        raise
    except BaseException:
        saved.put_back()
        raise
