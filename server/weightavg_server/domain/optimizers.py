"""Optimizers by the reference's names (sgd, adam, adamw, rmsprop, adagrad), options and defaults, and
the adaptive server optimizers of federated learning (fedadam, fedyogi, fedadagrad: domain/fedopt.py)
with Flower's defaults.

Options are given by position (in the order listed) or by name, e.g. sgd takes lr, momentum,
dampening, decay, nesterov, so `opt("sgd", q, .05, .9, nesterov=True)` is SGD(lr=.05, momentum=.9,
nesterov=True). Every optimizer updates all of its module's parameters, in one group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import fedopt
from .errors import InvalidArgument, did_you_mean
from .options import (
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Opt,
    Value,
    Values,
    ValueType,
    Wording,
    bool_value,
    float_value,
    resolve,
)
from .tensors import module_tensors


def _non_negative(name: str, default: float) -> Opt:
    """A non-negative number, the shape of most optimizer settings."""
    return Opt(name, ValueType.FLOAT, default, NON_NEGATIVE)


def _switch(name: str) -> Opt:
    """A flag that is off unless asked for."""
    return Opt(name, ValueType.BOOL, False)


_LR = _non_negative("lr", 0.01)
_DECAY = _non_negative("decay", 0.0)


def _eps(default: float) -> Opt:
    """The term added to a denominator of square roots: 0 made every parameter whose gradient has an
    exact zero NaN at its first step (0/0; a dead ReLU unit's weights), without a word, where torch
    takes 0 (found by review)."""
    return Opt("eps", ValueType.FLOAT, default, POSITIVE)


_EPS = _eps(1e-8)
_ADAM = (
    _non_negative("lr", 0.001),
    Opt("beta1", ValueType.FLOAT, 0.9, BELOW_ONE),
    Opt("beta2", ValueType.FLOAT, 0.999, BELOW_ONE),
    _EPS,
)


Params = list[nn.Parameter]


def _floats(o: Values, *names: str) -> tuple[float, ...]:
    """Several resolved FLOAT options at once, in the order named."""
    return tuple(float_value(o, name) for name in names)


def _sgd(p: Params, o: Values) -> torch.optim.Optimizer:
    lr, momentum, dampening, decay = _floats(o, "lr", "momentum", "dampening", "decay")
    nesterov = bool_value(o, "nesterov")
    return torch.optim.SGD(
        p, lr=lr, momentum=momentum, dampening=dampening, weight_decay=decay, nesterov=nesterov
    )


def _adam(cls: type[torch.optim.Adam]) -> Callable[[Params, Values], torch.optim.Optimizer]:
    """Adam and AdamW take the same settings; only their defaults for decay differ."""

    def build(p: Params, o: Values) -> torch.optim.Optimizer:
        lr, beta1, beta2, eps, decay = _floats(o, "lr", "beta1", "beta2", "eps", "decay")
        amsgrad = bool_value(o, "amsgrad")
        return cls(p, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay, amsgrad=amsgrad)

    return build


def _rmsprop(p: Params, o: Values) -> torch.optim.Optimizer:
    lr, alpha, eps, decay, momentum = _floats(o, "lr", "alpha", "eps", "decay", "momentum")
    centered = bool_value(o, "centered")
    return torch.optim.RMSprop(
        p, lr=lr, alpha=alpha, eps=eps, weight_decay=decay, momentum=momentum, centered=centered
    )


def _adagrad(p: Params, o: Values) -> torch.optim.Optimizer:
    lr, lrdecay, decay, init, eps = _floats(o, "lr", "lrdecay", "decay", "init", "eps")
    return torch.optim.Adagrad(
        p, lr=lr, lr_decay=lrdecay, weight_decay=decay, initial_accumulator_value=init, eps=eps
    )


def _fedopt(cls: type[fedopt.FedAdam] | type[fedopt.FedYogi]) -> Callable[[Params, Values], torch.optim.Optimizer]:
    """FedAdam and FedYogi take the same settings; only their defaults differ."""

    def build(p: Params, o: Values) -> torch.optim.Optimizer:
        return cls(p, *_floats(o, "lr", "beta1", "beta2", "tau"))

    return build


def _fedadagrad(p: Params, o: Values) -> torch.optim.Optimizer:
    return fedopt.FedAdagrad(p, *_floats(o, "lr", "tau"))


def _fedopt_options(lr: float, beta1: float, beta2: float, tau: float) -> tuple[Opt, ...]:
    """A FedOpt strategy's server-side settings in Flower's order, with its defaults: eta (here lr),
    beta_1, beta_2, tau (the term added to the root of the second moment, > 0 as eps is)."""
    return (
        _non_negative("lr", lr),
        Opt("beta1", ValueType.FLOAT, beta1, BELOW_ONE),
        Opt("beta2", ValueType.FLOAT, beta2, BELOW_ONE),
        Opt("tau", ValueType.FLOAT, tau, POSITIVE),
    )


def _largest(dtype: torch.dtype) -> float:
    """The largest value a tensor of this dtype holds (bool: 1)."""
    if dtype is torch.bool:
        return 1.0
    if dtype.is_floating_point or dtype.is_complex:
        return torch.finfo(dtype).max
    return float(torch.iinfo(dtype).max)


def _check_fill(what: str, p: Params, name: str, value: float) -> None:
    """InvalidArgument unless every parameter's dtype holds `value`: Adagrad fills a state tensor
    like each parameter with its `init` as it is built, and torch's overflow there was a RuntimeError
    (INTERNAL) for `init=1e39` over float32, or 70000 over float16."""
    for dtype in dict.fromkeys(t.dtype for t in p):
        if value > _largest(dtype):
            raise InvalidArgument(
                f"{what}: option '{name}' must fit the parameters' dtype ({str(dtype).removeprefix('torch.')} holds at "
                f"most {_largest(dtype):g}), given {value!r}: give a smaller value"
            )


def _check_eps(what: str, p: Params, eps: float, name: str = "eps") -> None:
    """InvalidArgument when eps (or FedOpt's tau, `name`) rounds to 0 in a floating parameter's dtype: added to a denominator in
    that dtype, it then adds nothing, and every weight whose gradient is exactly 0 became NaN (0/0) at
    its first step, as with eps 0: 1e-300 over float32, or Adam's default 1e-8 over float16."""
    for dtype in dict.fromkeys(t.dtype for t in p if t.is_floating_point()):
        if eps > 0 and torch.tensor(eps, dtype=dtype).item() == 0:
            smallest = torch.finfo(dtype).smallest_normal
            raise InvalidArgument(
                f"{what}: option '{name}' is 0 in the parameters' dtype {str(dtype).removeprefix('torch.')}, given "
                f"{eps!r}: give at least {smallest:g} (1e-4 is usual for float16)"
            )


def _check_dtypes(type_name: str, p: Params, options: Values) -> None:
    """What the resolved options must be in the parameters' dtypes (the rules in `OPTIMIZER_TYPES` are
    dtype-blind). Checked when an optimizer is made, not when a snapshot rebuilds one it held."""
    if type_name == "adagrad":
        init = float_value(options, "init")
        _check_fill(type_name, p, "init", init)
        if init > 0:
            return  # its sums start above 0, so an eps that rounds to 0 never divides 0 by 0
    for name in ("eps", "tau"):
        if name in options:
            _check_eps(type_name, p, float_value(options, name), name)


@dataclass(frozen=True)
class OptimizerType:
    """An optimizer type: its options in order and how to build the torch optimizer from them."""

    name: str
    options: tuple[Opt, ...]
    build: Callable[[Params, Values], torch.optim.Optimizer]


OPTIMIZER_TYPES: dict[str, OptimizerType] = {
    t.name: t
    for t in (
        OptimizerType(
            "sgd",
            (
                _LR,
                _non_negative("momentum", 0.0),
                Opt("dampening", ValueType.FLOAT, 0.0),
                _DECAY,
                _switch("nesterov"),
            ),
            _sgd,
        ),
        OptimizerType("adam", (*_ADAM, _DECAY, _switch("amsgrad")), _adam(torch.optim.Adam)),
        OptimizerType(
            "adamw", (*_ADAM, _non_negative("decay", 0.01), _switch("amsgrad")), _adam(torch.optim.AdamW)
        ),
        OptimizerType(
            "rmsprop",
            # alpha weighs the old average of squared gradients against the new one: over 1 the new
            # one counts negatively, and the first step's square root made every parameter NaN,
            # silently (torch checks only alpha >= 0; found by review).
            (_LR, Opt("alpha", ValueType.FLOAT, 0.99, UNIT_INTERVAL), _EPS, _DECAY, _non_negative("momentum", 0.0),
             _switch("centered")),
            _rmsprop,
        ),
        OptimizerType(
            "adagrad",
            (_LR, _non_negative("lrdecay", 0.0), _DECAY, _non_negative("init", 0.0), _eps(1e-10)),
            _adagrad,
        ),
        # Flower's message-API strategies' defaults (flwr.serverapp.strategy); its older
        # flwr.server.strategy classes took tau 1e-9 for FedAdam and FedAdagrad.
        OptimizerType("fedadam", _fedopt_options(0.1, 0.9, 0.99, 1e-3), _fedopt(fedopt.FedAdam)),
        OptimizerType("fedyogi", _fedopt_options(0.01, 0.9, 0.99, 1e-3), _fedopt(fedopt.FedYogi)),
        OptimizerType("fedadagrad", (_non_negative("lr", 0.1), Opt("tau", ValueType.FLOAT, 1e-3, POSITIVE)), _fedadagrad),
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
        """Everything the optimizer keeps alive: its module's tensors, then its own state.

        Its parameter groups hold the module's parameters, so the module lives as long as the
        optimizer does, whether or not a module or model handle still reaches it. Listed here, the
        module stays charged to the caps after those handles are freed (counted once while they
        share it, as allocations are): leaving it out let `opt(q)`, `free(q)` keep the whole module
        alive uncharged, as did an optimizer left over a model whose module `model(m, q2, o2)`
        replaced (found by review).
        """
        yield from module_tensors(self.module)
        yield from self.state_tensors()

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """The optimizer's own state (momentum buffers, moment estimates), without the module."""
        for state in self.optim.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    def describe(self) -> dict[str, Value]:
        """Options with the current learning rate."""
        return {**self.options, "lr": get_lr(self)}


def prepare() -> None:
    """Load what torch's optimizers load on first use (torch._dynamo, about a second), so that a
    client's first `opt` is as fast as its second. Called once when a server starts."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))])


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
        raise InvalidArgument(
            f"unrecognized optimizer: '{type_name}'{did_you_mean(type_name, OPTIMIZER_TYPES)} "
            f"(one of {', '.join(OPTIMIZER_TYPES)})"
        )
    options = resolve(type_name, opt_type.options, args, kwargs, Wording.SETTING)
    params = list(module.parameters())
    if not params:
        raise InvalidArgument(f"{type_name}: the module has no parameters to optimize")
    _check_dtypes(type_name, params, options)
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
