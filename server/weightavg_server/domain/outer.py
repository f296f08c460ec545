"""The server-side outer step of federated and local-SGD training: `global - average` as a gradient.

After a round, the clients' models are averaged (`merging`), and the global model's optimizer takes
one step with the pseudo-gradient g = global - average, taken in the dtype the two promote to (a
bfloat16 model steps by the float32 difference to a float32 average, cast once). Which optimizer
decides the algorithm:

- SGD with lr 1 and no momentum puts the average in place (plain FedAvg);
- SGD with momentum beta and lr eta is FedAvgM (m = g in the first round, then beta m + g; w -= eta m);
- SGD with Nesterov momentum is DiLoCo's outer step (lr 0.7, momentum 0.9 in its paper);
- Adam is an adaptive server optimizer in the manner of FedAdam (torch's bias correction and eps);
- fedadam, fedyogi and fedadagrad are Flower's FedAdam, FedYogi and FedAdagrad, as Flower computes
  them (domain/fedopt.py).
"""

from __future__ import annotations

import math

import torch

from . import dtypes
from .averaging import broadcast_shape
from .dictionaries import TensorDict
from .errors import InvalidArgument
from .optimizers import Optimizer


def trainable(optimizer: Optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an outer step moves: the optimizer's module's parameters that require grad."""
    return [(name, p) for name, p in optimizer.module.named_parameters() if p.requires_grad]


def check_average(optimizer: Optimizer, average: TensorDict) -> None:
    """Raise InvalidArgument unless the average has a floating entry for every trainable parameter, on
    the parameter's device, whose shape broadcasts to the parameter's, and whose values are finite."""
    for name, p in trainable(optimizer):
        value = average.entries.get(name)
        if value is None:
            raise InvalidArgument(
                f"outer step: the average has no entry '{name}' (a parameter of the optimizer's module); nothing changed"
            )
        if not value.is_floating_point():
            raise InvalidArgument(f"outer step: entry '{name}' holds {dtypes.name(value.dtype)}; an average needs floating values")
        if value.device != p.device:
            raise InvalidArgument(
                f"outer step: entry '{name}' is on {value.device}, the parameter on {p.device}; move the dictionary"
            )
        try:
            shape = broadcast_shape(tuple(p.shape), tuple(value.shape))
        except InvalidArgument as exc:
            raise InvalidArgument(f"outer step: {exc} (parameter '{name}'); nothing changed") from None
        if shape != tuple(p.shape):
            raise InvalidArgument(
                f"outer step: entry '{name}' of shape {list(value.shape)} does not fit parameter of shape {list(p.shape)}"
            )
        if not finite(value):
            # Stepping on it would make the global model and the optimizer's momentum NaN for good: a
            # worker that diverged is better left out of the average (found by review).
            raise InvalidArgument(
                f"outer step: entry '{name}' of the average holds NaN or infinite values (a worker that diverged?); "
                "average again without it; nothing changed"
            )


def finite(t: torch.Tensor) -> bool:
    """Whether every value of the floating tensor t is finite, from its least and greatest value
    (NaN where it holds one): two scalars allocated, where `torch.isfinite(t).all()` made a copy of
    |t| and two masks of t's size before the outer step's memory was reserved (found by review)."""
    if t.numel() == 0:
        return True
    smallest, largest = torch.aminmax(t.detach())  # a module given as the average: its parameters require grad
    return math.isfinite(float(smallest)) and math.isfinite(float(largest))


NORM_ROW = 4096
"""Elements per row whose norm torch takes in one reduction (`sum_of_squares`)."""


def sum_of_squares(t: torch.Tensor) -> float:
    """The sum of the squares of t's elements, accurate at any size and without a copy of t.

    torch's CPU float32 vector_norm accumulates long runs in float32 and is off by 2e-4 of the norm
    at 2^23 elements; its error grows with the length reduced, so t is read as rows of NORM_ROW
    elements (5e-9), each row's norm taken by torch and their squares summed in float64. The rows
    are a view of t in memory order (any dense layout: contiguous, channels_last, transposed); the
    row norms take numel / NORM_ROW floats.
    """
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    flat = t.permute(dims).reshape(-1)
    whole = flat.numel() - flat.numel() % NORM_ROW
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1)
    rest = torch.linalg.vector_norm(flat[whole:])
    return float(rows.double().square().sum() + rest.double().square())


def sum_of_squares_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes `sum_of_squares` allocates at its widest over a tensor of numel elements of dtype: the
    rows' norms (in dtype), their float64 copy and its squares, and a few scalars; freed when it returns."""
    rows = numel // NORM_ROW
    return rows * (dtype.itemsize + 16) + 48


def pseudo_gradient(p: torch.Tensor, average: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`p - average` as a gradient for p (its dtype and layout), and the sum of the difference's squares.

    The difference is taken in the dtype the two promote to and cast to p's dtype once, as torch does
    for `(p - average).to(p.dtype)`: copying a float32 average into a bfloat16 gradient first would
    round it to bfloat16, and a bfloat16 model within half an ulp of its average would get a gradient
    of exactly 0 and never move. Its norm is that of the wider difference. Where p's dtype is the
    wider one the difference is the gradient itself; otherwise it is held in the wider dtype (what
    `footprint.outer_step_bytes` reserves) until it is cast.
    """
    wide = torch.promote_types(p.dtype, average.dtype)
    diff = torch.empty_like(p, dtype=wide)
    if wide == p.dtype:
        diff.copy_(average).neg_().add_(p)  # copy_ casts and broadcasts the average without a temporary
    else:
        # copy_ casts p; the average is already wide, except float16 against bfloat16 (float32), where
        # torch subtracts a float32 copy of it on the CPU.
        diff.copy_(p).sub_(average)
    square = sum_of_squares(diff)
    if wide == p.dtype:
        return diff, square
    return diff.to(p.dtype), square


def outer_step(optimizer: Optimizer, average: TensorDict, *, checked: bool = False) -> float:
    """Step the optimizer once with the gradient `parameter - average` for every trainable parameter;
    returns that pseudo-gradient's L2 norm over all parameters.

    The gradients the parameters held before (from training, or None) are put back afterwards, so an
    outer step never disturbs an inner loop. Everything is checked before anything changes, unless
    the caller did (`checked`: `check_average` passed under the same locks).

    Raises:
        InvalidArgument: a parameter without a fitting, finite, floating entry in the average.

    Example: with SGD(lr=1) and no momentum the parameters become the average.
    """
    if not checked:  # the service checks before it reserves (`check_average` reads every value once)
        check_average(optimizer, average)
    params = trainable(optimizer)
    saved = [(p, p.grad) for _, p in params]
    squares = 0.0
    try:
        with torch.no_grad():
            for name, p in params:
                p.grad, square = pseudo_gradient(p, average.entries[name])
                squares += square
        optimizer.optim.step()
    finally:
        for p, grad in saved:
            p.grad = grad
    return math.sqrt(squares)
