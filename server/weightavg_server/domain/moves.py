"""Moving objects between devices and dtypes in place, with everything that must move with them.

A tensor or a dictionary moves on its own. A module does not: the optimizers built over it keep
state shaped like its parameters (momentum, moment estimates), and the models over it hold data in
its parameters' dtype on its device. Moving only the module left an optimizer whose next step
failed (`expected dtype float for end but got double`) and data the next run refused. So a module
moves as a group: its tensors, the state of every optimizer over it, and the data of every model
over it, whichever of their handles was named. As torch's `Optimizer.load_state_dict` does,
floating state follows its parameter's dtype and device, and a step count stays as it is.

Every new tensor is made before any old one is replaced, so a move that runs out of memory changes
nothing; `move_bytes` says beforehand what it will allocate, for the caps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import batching, dictionaries, dtypes, flat
from .errors import InvalidArgument
from .optimizers import Optimizer
from .tensors import Bytes, TensorHolder, module_tensors
from .training import Data, Model

Place = tuple[torch.device, torch.dtype]
"""Where a tensor goes: its device and dtype after the move."""

STEP_KEY = "step"
"""The optimizer state entry that counts steps: torch keeps it as it is when state is loaded onto
parameters of another dtype or device (pytorch/pytorch#74424), and so does a move."""


@dataclass(frozen=True)
class Group:
    """A module and what moves with it: the optimizers over it and the data of the models over it."""

    module: nn.Module
    optimizers: tuple[Optimizer, ...]
    data: tuple[Data, ...]


def group(obj: object, companions: Iterable[object]) -> Group | None:
    """The group of a module, or of the module of a model or an optimizer, given the objects that
    share its lock (its other handles, optimizers, models, views); None for an object that moves
    on its own (a tensor, a dictionary).

    Raises:
        InvalidArgument: obj is a tensor handle on a model's data (GetModelInput): moved alone, it
            became a copy, and batching it no longer batched the model's data (found by review).
    """
    if isinstance(obj, (Model, Optimizer)):
        module = obj.module
    elif isinstance(obj, nn.Module):
        module = obj
    else:
        if isinstance(obj, TensorHolder) and any(_holds_data(other, obj.tensor) for other in companions):
            raise InvalidArgument(
                "this tensor handle is a model's training inputs and moves with them: move the model "
                "(its data follow its parameters' device and dtype), or fetch the tensor and upload a copy"
            )
        return None
    optimizers: dict[int, Optimizer] = {}
    data: dict[int, Data] = {}
    for other in (obj, *companions):
        if isinstance(other, Model) and other.module is module:
            optimizers[id(other.optimizer)] = other.optimizer
            for held in (other.train_data, other.test_data):
                if held is not None:
                    data[id(held)] = held
        elif isinstance(other, Optimizer) and other.module is module:
            optimizers[id(other)] = other
    return Group(module, tuple(optimizers.values()), tuple(data.values()))


def _holds_data(obj: object, t: torch.Tensor) -> bool:
    """Whether obj is a model whose data include the tensor object t."""
    if not isinstance(obj, Model):
        return False
    return any(held is not None and (held.x is t or held.y is t) for held in (obj.train_data, obj.test_data))


def _check_target(dtype: torch.dtype | None) -> None:
    """InvalidArgument for a target dtype that is not floating or complex: the move converts
    floating tensors (a module's, a dictionary's) and a cast to bool or an integer would destroy
    them (a dictionary moved to bool held only True; found by review)."""
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise InvalidArgument(
            f"a move converts floating-point tensors, so its dtype must be floating or complex, not {dtypes.name(dtype)}; "
            "leave dtype unset to move only the device"
        )


def _check_kept(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None, what: str) -> None:
    """InvalidArgument unless converting each of these tensors to `dtype` keeps every value: a
    complex tensor into a real dtype (its imaginary part dropped, with only a warning in the server's
    log), or an integer or bool tensor with values the floating dtype cannot hold (70000 into float16
    became inf), as uploads of a model's data are refused (`training.input_dtype`; found by review)."""
    if dtype is None:
        return
    for t in tensors:
        if t.is_complex() and not dtype.is_complex:
            raise InvalidArgument(
                f"{what} holds complex values ({dtypes.name(t.dtype)}) and {dtypes.name(dtype)} "
                "would drop their imaginary parts: move it to complex64 or complex128, or leave dtype unset; nothing moved"
            )
        if not (t.is_floating_point() or t.is_complex()) and not dtypes.holds_exactly(t, dtype):
            raise InvalidArgument(
                f"{what} holds {dtypes.name(t.dtype)} values that {dtypes.name(dtype)} cannot hold "
                "exactly: move it to a wider dtype (float64 holds integers up to 2**53), or leave dtype unset; nothing moved"
            )


def _converts(t: torch.Tensor) -> bool:
    """Which tensors a move with a dtype converts, as Module.to does: floating and complex ones."""
    return t.is_floating_point() or t.is_complex()


def _place(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> Place:
    """Where t goes when its owner moves to `device` and/or `dtype`."""
    return (device or t.device, dtype if dtype is not None and _converts(t) else t.dtype)


def _size(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


# -- what moves, and where ---------------------------------------------------------------------------


def _state_places(g: Group, device: torch.device | None, dtype: torch.dtype | None) -> Iterator[tuple[dict[str, object], str, Place]]:
    """Each optimizer state tensor as (its state dict, its key, where it goes): with its parameter's
    new device and, when floating, its parameter's new dtype; step counts stay."""
    for opt in g.optimizers:
        for param, state in opt.optim.state.items():
            if not isinstance(param, torch.Tensor):
                continue
            param_device, param_dtype = _place(param, device, dtype)
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or key == STEP_KEY:
                    continue
                new_dtype = param_dtype if _converts(value) and _converts(param) else value.dtype
                yield state, key, (param_device, new_dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    """Held data at full size (a batch narrows them in place, `batching`): a view of the whole storage."""
    shape = (batching.full_size(t), *t.shape[1:])
    return t.new_empty(0).set_(t.untyped_storage(), 0, shape, torch.empty(shape, device="meta").stride())


def _data_place(g: Group, t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> Place:
    """Where held data go: to the module's new device; floating data into the dtype of the module's
    new floating parameters, the dtype uploads are held in (`training.input_dtype`)."""
    floating = any(p.is_floating_point() for p in g.module.parameters())
    return (device or t.device, dtype if dtype is not None and floating and t.is_floating_point() else t.dtype)


def _check_group(g: Group, dtype: torch.dtype | None) -> None:
    """InvalidArgument for a complex dtype when a model holds floating data: models train on real values."""
    if dtype is not None and dtype.is_complex and any(d.x.is_floating_point() or d.y.is_floating_point() for d in g.data):
        raise InvalidArgument(
            "a model holds real-valued data and trains on real values: move it to a real floating dtype, not "
            f"{dtypes.name(dtype)}"
        )


def _movable(obj: object) -> list[torch.Tensor]:
    """The tensors of an object that moves on its own; InvalidArgument for those that move with their module."""
    if isinstance(obj, TensorHolder):
        return [obj.tensor]
    if isinstance(obj, dictionaries.TensorDict):
        if obj.live:
            raise InvalidArgument("a live view moves with its module: move the module (or its model) instead")
        return [t for name, t in obj.entries.items() if name != dictionaries.COUNT_KEY]
    raise InvalidArgument(f"cannot move a {type(obj).__name__.lower()}: move a tensor, dictionary, module, optimizer or model")


def move_bytes(obj: object, device: torch.device | None, dtype: torch.dtype | None, g: Group | None = None) -> Bytes:
    """New bytes a move would allocate, by target device: every tensor is copied before the old go.

    `g` is the group of a module, optimizer or model (`group`; by default the object's alone);
    other objects move on their own. Tensors that already have the target device and dtype are not
    copied and cost nothing.
    """
    _check_target(dtype)
    g = g if g is not None else group(obj, ())
    totals: Bytes = {}

    def add(numel: int, to: Place, now: Place) -> None:
        if to != now:
            totals[str(to[0])] = totals.get(str(to[0]), 0) + _size(numel, to[1])

    if g is None:
        converts = dictionaries.converts if isinstance(obj, dictionaries.TensorDict) else (lambda t: True)
        _check_kept([t for t in _movable(obj) if converts(t)], dtype, _what(obj))
        for t in _movable(obj):
            add(t.numel(), (device or t.device, dtype if dtype is not None and converts(t) else t.dtype), (t.device, t.dtype))
        return totals
    _check_group(g, dtype)
    _check_kept(_converted(g.module), dtype, "the module")
    for t in _unique(module_tensors(g.module)):
        add(t.numel(), _place(t, device, dtype), (t.device, t.dtype))
    for state, key, to in _state_places(g, device, dtype):
        value = state[key]
        assert isinstance(value, torch.Tensor)
        add(value.numel(), to, (value.device, value.dtype))
    for d in g.data:
        for t in (d.x, d.y):
            add(_full(t).numel(), _data_place(g, t, device, dtype), (t.device, t.dtype))
    return totals


def _what(obj: object) -> str:
    """How a refusal names an object that moves on its own."""
    return "the tensor" if isinstance(obj, TensorHolder) else "the dictionary"


def _converted(module: nn.Module) -> list[torch.Tensor]:
    """The module's tensors that a move with a dtype converts (floating and complex ones, as
    Module.to does); the state of its optimizers follows them, so checking these checks that too."""
    return [t for t in _unique(module_tensors(module)) if _converts(t)]


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


# -- moving ----------------------------------------------------------------------------------------


def move(obj: object, device: torch.device | None, dtype: torch.dtype | None, g: Group | None = None) -> None:
    """Move a tensor, a dictionary, or a module's group (`g`, by default the object's alone) in
    place, so every handle sees the move.

    All new tensors are made before any old one is replaced, so a move that runs out of memory
    changes nothing. A group's data keep where a batch stands (`batching` narrows them in place).
    """
    _check_target(dtype)
    g = g if g is not None else group(obj, ())
    if g is None:
        _movable(obj)
        if isinstance(obj, TensorHolder):
            _check_kept([obj.tensor], dtype, _what(obj))
            obj.tensor = obj.tensor.to(device=device or obj.tensor.device, dtype=dtype or obj.tensor.dtype)
        else:
            assert isinstance(obj, dictionaries.TensorDict)
            dictionaries.move(obj, device, dtype)
        return
    _check_group(g, dtype)
    _check_kept(_converted(g.module), dtype, "the module")
    with torch.no_grad():
        states = [
            (state, key, _copied(state[key], to)) for state, key, to in _state_places(g, device, dtype)
            if not _stays(state[key], to)
        ]
        data = [
            (t, _full(t).to(*_data_place(g, t, device, dtype), copy=True)) for d in g.data for t in (d.x, d.y)
            if not _stays(t, _data_place(g, t, device, dtype))
        ]
        _swap_module(g.module, device, dtype)  # the last allocation: nothing is replaced before it succeeds
        for state, key, new in states:
            state[key] = new
        for t, full in data:
            t.data = full.as_strided(t.shape, t.stride(), t.storage_offset())


def _stays(value: object, to: Place) -> bool:
    """True when a tensor already has its target place: it is neither copied nor counted."""
    assert isinstance(value, torch.Tensor)
    return (value.device, value.dtype) == to


def _copied(value: object, to: Place) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value.to(*to, copy=True)


def _swap_module(module: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Module.to in two phases: convert every tensor, then swap each one's data in place.

    Swapping `.data` keeps every Parameter and buffer object, so live views of the module's
    parameters and buffers, and the optimizers' parameter groups, keep the moved tensors
    (Module.to replaces buffer objects). The parameters that change are copied back to back into
    one new buffer per device and dtype (`flat.flat_copies`: the same bytes as separate copies), so
    a moved module averages in one kernel per group; gradients and buffers are copied one by one.
    """
    tensors = _unique(module_tensors(module))

    def target(t: torch.Tensor) -> Place:
        return _place(t, device, dtype)

    params = {id(p) for p in module.parameters()}
    changing = [t for t in tensors if id(t) in params and target(t) != (t.device, t.dtype)]
    new_params = dict(zip(map(id, changing), flat.flat_copies(changing, target)))
    moved = [new_params[id(t)] if id(t) in new_params else t.to(*target(t)) for t in tensors]
    swapped = [(t, new) for t, new in zip(tensors, moved) if new is not t]
    for t, new in swapped:
        t.data = new
    if swapped:  # a move to where the module is (every create_module's, on a CPU server) swaps nothing:
        flat.forget(module)  # it ended every cached averaging plan on the server all the same

