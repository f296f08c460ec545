"""Copying parameters to and from dictionaries, and the running average of parameters (SWA)."""

from __future__ import annotations

import torch

from .dictionaries import COUNT_KEY, TensorDict, check_copyable, does_not_fit
from .errors import InvalidArgument


MAX_COUNT = 2.0**53
"""Above this a float64 count no longer goes up by one."""


def copy_parameters(module: torch.nn.Module) -> TensorDict:
    """Detached clones of every parameter (not buffers), keyed by dotted name, same dtype and device."""
    return TensorDict({name: p.detach().clone() for name, p in module.named_parameters()})


def load_parameters(module: torch.nn.Module, d: TensorDict) -> dict[str, bool]:
    """Copy the dictionary's values into the module's parameters, all or nothing.

    Returns {parameter name: True if copied, False if the dictionary had no such key}, in module
    order; extra keys are ignored. Values broadcast and convert dtype as `Tensor.copy_` does. Every
    value is checked before any is copied, so a bad one leaves the module untouched.

    Example: a dictionary {"weight": 1} loaded into a linear layer gives {"weight": True, "bias": False}.
    """
    params = list(module.named_parameters())
    for name, p in params:
        if name in d.entries:
            try:
                check_copyable(p, d.entries[name])
            except InvalidArgument as exc:
                raise does_not_fit(str(exc), f"parameter '{name}'", p, d.entries[name], f"the dictionary's '{name}'") from None
    with torch.no_grad():
        for name, p in params:
            if name in d.entries:
                p.copy_(d.entries[name])
    return {name: name in d.entries for name, _ in params}


def _count(d: TensorDict) -> float:
    """The dictionary's current sample count; a dictionary without '.n' holds one sample."""
    n = d.entries.get(COUNT_KEY)
    if n is None:
        return 1.0
    if n.dim() != 0 or n.dtype != torch.float64 or n.device.type != "cpu":
        raise InvalidArgument(
            f"'{COUNT_KEY}' must be a 0-dim float64 count, found {n.dtype} of shape {list(n.shape)}; "
            f"set it with a float or delete it"
        )
    count = float(n.item())
    if not 0 <= count < MAX_COUNT:  # also refuses NaN
        raise InvalidArgument(
            f"'{COUNT_KEY}' must be a count between 0 and {MAX_COUNT:.0f}, found {count}; set it or delete it"
        )
    return count


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of two shapes; InvalidArgument with PyTorch's own wording when they do not broadcast."""
    ndim = max(len(a), len(b))
    out = []
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        size_a = a[len(a) - 1 - offset] if len(a) - 1 - offset >= 0 else 1
        size_b = b[len(b) - 1 - offset] if len(b) - 1 - offset >= 0 else 1
        if size_a != size_b and size_a != 1 and size_b != 1:
            raise InvalidArgument(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
        out.append(size_a if size_b == 1 else size_b)
    return tuple(reversed(out))


def _check_averageable(name: str, avg: torch.Tensor, p: torch.Tensor) -> None:
    """avg must hold p's running mean in place: its own memory per element, same device, a floating
    dtype, p broadcasting into it."""
    if any(stride == 0 and size > 1 for stride, size in zip(avg.stride(), avg.shape)):
        raise InvalidArgument(
            f"'{name}' shares memory between its elements (an expanded tensor); set it to a full tensor"
        )
    if avg.shape == p.shape and avg.dtype == p.dtype and avg.device == p.device and avg.is_floating_point():
        return  # the usual case, decided without the meta-tensor trial below (about 0.1 ms a tensor)
    if avg.device != p.device:
        raise InvalidArgument(
            f"'{name}' is on {avg.device} but the parameter is on {p.device}; move the dictionary"
        )
    if not (avg.is_floating_point() or avg.is_complex()):
        raise InvalidArgument(f"'{name}' holds {avg.dtype}; an average needs a floating-point entry")
    if not torch.can_cast(torch.promote_types(p.dtype, avg.dtype), avg.dtype):
        raise InvalidArgument(f"'{name}' holds {avg.dtype}, which cannot hold an average of {p.dtype}")
    try:
        shape = broadcast_shape(tuple(p.shape), tuple(avg.shape))
    except InvalidArgument as exc:
        raise does_not_fit(str(exc), f"parameter '{name}'", p, avg, f"the dictionary's '{name}'") from None
    if shape != tuple(avg.shape):
        reason = f"output with shape {list(avg.shape)} doesn't match the broadcast shape {list(shape)}"
        raise does_not_fit(reason, f"parameter '{name}'", p, avg, f"the dictionary's '{name}'")


def _lerp_all(avgs: list[torch.Tensor], params: list[torch.Tensor], weight: float) -> None:
    """avg += (p - avg) * weight for every pair, in place.

    On the CPU a Python loop of `lerp_`: torch's CPU foreach kernels loop over the tensors
    themselves and measured no faster (from 0.8x to 1.5x the loop's time on 160 x 640 KB; the
    "kernels" row of `python -m bench`). On CUDA one `_foreach_lerp_` launch replaces one launch
    per tensor. Pairs whose shapes or dtypes differ take the general broadcasting path.
    """
    fused: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for a, p in zip(avgs, params):
        if a.shape != p.shape or a.dtype != p.dtype:
            a.add_((p - a) * weight)
        elif a.is_cuda:
            fused[0].append(a)
            fused[1].append(p)
        else:
            a.lerp_(p, weight)
    if fused[0]:
        torch._foreach_lerp_(fused[0], fused[1], weight)


def average_parameters(module: torch.nn.Module, d: TensorDict) -> int:
    """Fold the module's parameters into the running average held by the dictionary; return the count.

    With n samples so far (the '.n' entry, 1 when absent), every parameter's entry becomes
    avg + (p - avg) / (n + 1) and '.n' becomes n + 1. Every entry is checked first, so a missing
    or ill-shaped one leaves the dictionary untouched. The count lives on the CPU, so no call
    waits on the GPU.

    Example: after copy_parameters and one change of the module, the first call returns 2 and
    leaves the mean of the copy and the current weights.
    """
    n = _count(d)
    params = [(name, p.detach()) for name, p in module.named_parameters()]
    for name, p in params:
        if name not in d.entries:
            raise InvalidArgument(
                f"parameter '{name}' not found in the dictionary, unable to compute average; nothing changed"
            )
        _check_averageable(name, d.entries[name], p)
    with torch.no_grad():
        _lerp_all([d.entries[name] for name, _ in params], [p for _, p in params], 1.0 / (n + 1.0))
    d.entries[COUNT_KEY] = torch.tensor(n + 1.0, dtype=torch.float64)
    return int(n + 1.0)
