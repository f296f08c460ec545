"""Looking into modules: children by path, parameter and buffer names, live views, setting parameters."""

from __future__ import annotations

import torch

from .dictionaries import TensorDict, check_copyable, does_not_fit
from .errors import InvalidArgument, NotFound, did_you_mean


def child(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted path ("" is the module itself)."""
    if not path:
        return module
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in module.named_modules() if name]
        raise NotFound(f"module has no child '{path}'{did_you_mean(path, children)}") from None


def parameter_names(module: torch.nn.Module, path: str = "") -> list[str]:
    """Dotted parameter names relative to the child at path, in module order."""
    return [name for name, _ in child(module, path).named_parameters()]


def buffer_names(module: torch.nn.Module, path: str = "") -> list[str]:
    """Dotted buffer names relative to the child at path, in module order."""
    return [name for name, _ in child(module, path).named_buffers()]


def view_parameters(module: torch.nn.Module, path: str = "") -> TensorDict:
    """A live dictionary over the child's own parameter tensors."""
    return TensorDict(dict(child(module, path).named_parameters()), live=True)


def view_buffers(module: torch.nn.Module, path: str = "") -> TensorDict:
    """A live dictionary over the child's own buffer tensors."""
    return TensorDict(dict(child(module, path).named_buffers()), live=True)


def parameter(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter with a dotted name.

    Raises:
        NotFound: no such parameter; the message names the closest parameters, or says the name is a
            buffer's and how to read it (a bare "parameter 'b.running_mean' not found" left a user
            who had just read it in buffernames(m) without a way on).
    """
    params = dict(module.named_parameters())
    if name not in params:
        if name in dict(module.named_buffers()):
            raise NotFound(
                f"parameter '{name}' not found: it is a buffer; read buffers through a view, dict(buffers(m), "
                f"'{name}') (ViewBuffers), or a copy, copyparms(m, buffers=True) (CopyParameters with buffers)"
            )
        raise NotFound(f"parameter '{name}' not found{did_you_mean(name, params)}")
    return params[name]


def set_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> bool:
    """Copy value into an existing parameter in place, or register a new one on the root.

    Copying broadcasts and converts dtype like `Tensor.copy_`, without gradient history. A new
    parameter takes the value's dtype on the module's device; it requires grad when floating.
    Returns True when a parameter was registered.
    """
    params = dict(module.named_parameters())
    if name in params:
        target = params[name]
        try:
            check_copyable(target, value)
        except InvalidArgument as exc:
            raise does_not_fit(str(exc), f"parameter '{name}'", target, value, "the value sent") from None
        with torch.no_grad():
            target.copy_(value)
        return False
    if not name or "." in name:
        raise InvalidArgument(
            f"parameter '{name}' not found, and a new parameter needs a non-empty name without '.'"
        )
    if hasattr(module, name):
        raise InvalidArgument(f"cannot register parameter '{name}': the module already has an attribute of that name")
    device = next((p.device for p in module.parameters()), value.device)
    grad = value.is_floating_point() or value.is_complex()
    module.register_parameter(name, torch.nn.Parameter(_own_copy(value, device), requires_grad=grad))
    return True


def _own_copy(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of value on `device` that nothing else holds: one copy, the one the caller reserved.
    `value.to(device).clone()` made two on a CUDA server (the move, then its clone), so registering
    a parameter held twice its reserved bytes on the device for a moment (found by review)."""
    moved = value.to(device)
    return moved if moved is not value else value.clone()


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameter tensors (what the reference's size gives for a module)."""
    return sum(1 for _ in module.parameters())


def skeleton(parameters: list[tuple[str, torch.Tensor]], buffers: list[tuple[str, torch.Tensor]]) -> torch.nn.Module:
    """A module with no layers that holds these tensors as its parameters and buffers, under their
    dotted names and in their order: what stands in for a module on a rank it does not live on, once
    its values were sent there (the verbs read only named_parameters and named_buffers)."""
    root = torch.nn.Module()
    for named, is_parameter in ((parameters, True), (buffers, False)):
        for name, t in named:
            *path, leaf = name.split(".")
            owner = root
            for part in path:
                found = owner._modules.get(part)
                if found is None:
                    found = torch.nn.Module()
                    owner.add_module(part, found)
                owner = found
            if is_parameter:
                owner.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
            else:
                owner.register_buffer(leaf, t)
    return root
