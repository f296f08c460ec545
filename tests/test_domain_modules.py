"""domain.modules in process: children by path, parameter and buffer names, live views and
set_parameter, on modules built from layer specs as the server builds them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from weightavg_server.domain import modules, specs
from weightavg_server.domain.errors import InvalidArgument, NotFound
from weightavg_server.domain.specs import LayerSpec

NET = LayerSpec("sequential", "root", children=(
    LayerSpec("linear", "a", (4, 6)),
    LayerSpec("sequential", "blk", children=(
        LayerSpec("batchnorm1d", "bn", (6,)),
        LayerSpec("relu", "r"),
    )),
    LayerSpec("linear", "d", (6, 2), (("bias", False),)),
))


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return specs.build_module(NET)


@pytest.mark.parametrize(
    "path, parameters, buffers",
    [
        ("", ["a.weight", "a.bias", "blk.bn.weight", "blk.bn.bias", "d.weight"],
         ["blk.bn.running_mean", "blk.bn.running_var", "blk.bn.num_batches_tracked"]),
        ("blk", ["bn.weight", "bn.bias"], ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]),
        ("blk.bn", ["weight", "bias"], ["running_mean", "running_var", "num_batches_tracked"]),
        ("blk.r", [], []),
        ("d", ["weight"], []),
    ],
    ids=["root", "container", "nested", "no-tensors", "no-bias"],
)
def test_names_are_torch_dotted_names_relative_to_the_child(path: str, parameters: list[str], buffers: list[str]) -> None:
    module = build()
    assert modules.parameter_names(module, path) == parameters
    assert modules.buffer_names(module, path) == buffers
    child = module.get_submodule(path) if path else module
    assert parameters == [name for name, _ in child.named_parameters()]  # the root's name never prefixes


@pytest.mark.parametrize("path", ["x", "blk.x", "a.weight.x", "blk..bn"])
def test_unknown_child_is_not_found(path: str) -> None:
    module = build()
    for call in (modules.parameter_names, modules.buffer_names, modules.view_parameters, modules.view_buffers):
        with pytest.raises(NotFound, match="no child"):
            call(module, path)


def test_parameter_view_is_live_both_ways() -> None:
    module = build()
    view = modules.view_parameters(module, "a")
    assert view.live and list(view.entries) == ["weight", "bias"]
    assert view.entries["weight"] is module.a.weight
    with torch.no_grad():
        view.entries["bias"].fill_(3.0)  # a change through the view is the module's change
    assert torch.equal(module.a.bias, torch.full((6,), 3.0))
    with torch.no_grad():
        module.a.weight.zero_()  # and the module's change shows in the view
    assert torch.equal(view.entries["weight"], torch.zeros(6, 4))


def test_buffer_view_sees_a_training_forward_pass() -> None:
    module = build()
    view = modules.view_buffers(module)
    assert view.live
    module.train()
    module(torch.randn(8, 4))
    assert int(view.entries["blk.bn.num_batches_tracked"]) == 1
    assert not torch.equal(view.entries["blk.bn.running_mean"], torch.zeros(6))
    assert view.entries["blk.bn.running_var"] is module.blk.bn.running_var


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("a.bias", torch.tensor(2), torch.full((6,), 2.0)),
        ("d.weight", torch.arange(6.0), torch.arange(6.0).expand(2, 6)),
        ("blk.bn.weight", torch.full((6,), 0.5, dtype=torch.float64), torch.full((6,), 0.5)),
    ],
    ids=["scalar-long", "broadcast-row", "float64"],
)
def test_set_parameter_copies_in_place_with_copy_rules(name: str, value: torch.Tensor, expected: torch.Tensor) -> None:
    module = build()
    target = modules.parameter(module, name)
    assert modules.set_parameter(module, name, value) is False
    assert modules.parameter(module, name) is target
    assert torch.equal(target, expected) and target.dtype == torch.float32
    assert target.is_leaf and target.requires_grad and target.grad_fn is None


def test_set_parameter_with_a_shape_that_does_not_fit_changes_nothing() -> None:
    module = build()
    before = module.a.weight.detach().clone()
    with pytest.raises(InvalidArgument, match=r"^The size of tensor a \(4\) .* \(a: parameter 'a.weight', shape \[6, 4\]; "
                                              r"b: the value sent, shape \[6, 3\]\); nothing changed$"):
        modules.set_parameter(module, "a.weight", torch.ones(6, 3))
    assert torch.equal(module.a.weight, before)


@pytest.mark.parametrize(
    "value, requires_grad",
    [(torch.tensor([1.0, 2.0]), True), (torch.tensor([1, 2]), False), (torch.tensor([1.0], dtype=torch.float64), True)],
    ids=["float32", "int64", "float64"],
)
def test_set_parameter_registers_a_new_root_parameter(value: torch.Tensor, requires_grad: bool) -> None:
    module = build()
    assert modules.set_parameter(module, "scale", value) is True
    p = modules.parameter(module, "scale")
    assert modules.parameter_names(module)[0] == "scale"  # the root's own parameters come first
    assert p.dtype == value.dtype and p.requires_grad is requires_grad and torch.equal(p, value)
    value.add_(1)  # the new parameter is a copy, not the caller's tensor
    assert not torch.equal(p, value)


class _Allocations(TorchDispatchMode):
    """The aten operations that make a new tensor's memory, as they run."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.empty_like):
            self.made.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_new_parameter_on_another_device_is_copied_there_once() -> None:
    """The service reserves one copy of the value on the module's device. Registering moved the value
    there and then cloned the moved tensor: two copies on a CUDA server's device for a moment. The
    meta device stands in for the other device (no memory, the same operations)."""
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    with _Allocations() as seen:
        modules.set_parameter(module, "scale", torch.ones(3))
    assert seen.made == ["_to_copy"]
    assert module.scale.device.type == "meta"


@pytest.mark.parametrize(
    "name, message",
    [("", "non-empty name without '.'"), ("a.scale", "non-empty name without '.'"),
     ("blk", "already has an attribute"), ("forward", "already has an attribute"), ("training", "already has an attribute")],
    ids=["empty", "dotted", "child-name", "method", "attribute"],
)
def test_set_parameter_refuses_names_it_cannot_register(name: str, message: str) -> None:
    module = build()
    names = modules.parameter_names(module)
    with pytest.raises(InvalidArgument, match=message):
        modules.set_parameter(module, name, torch.zeros(1))
    assert modules.parameter_names(module) == names


def test_parameter_lookup_and_count() -> None:
    module = build()
    assert modules.parameter(module, "blk.bn.bias") is module.blk.bn.bias
    with pytest.raises(NotFound, match="parameter 'blk.bn.running_mean' not found"):
        modules.parameter(module, "blk.bn.running_mean")  # a buffer is not a parameter
    assert modules.parameter_count(module) == 5
    assert modules.child(module, "") is module and modules.child(module, "blk.bn") is module.blk.bn


def test_a_skeleton_holds_the_tensors_under_their_names_in_their_order() -> None:
    """What stands in for a module on another rank: the same named parameters and buffers, the same
    tensors (no copies), so averages read from it exactly what they read from the module."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    params = [(n, p.detach()) for n, p in net.named_parameters()]
    buffers = list(net.named_buffers())
    stand_in = modules.skeleton(params, buffers)
    assert [n for n, _ in stand_in.named_parameters()] == [n for n, _ in params]
    assert [n for n, _ in stand_in.named_buffers()] == [n for n, _ in buffers]
    assert all(p.data_ptr() == t.data_ptr() for (_, p), (_, t) in zip(stand_in.named_parameters(), params))
    assert list(modules.view_parameters(stand_in).entries) == ["0.weight", "0.bias", "1.weight", "1.bias"]
