"""Layer specs: build torch modules from an allowlist of ktorch layer types, and describe them back.

A client names each layer by its ktorch type (``linear``, ``batchnorm1d``, ...) and gives options
by position or by name. Nothing the client sends is imported or evaluated: every type maps to one
standard ``torch.nn`` class through the table at the bottom of this module, so parameter and
buffer names are exactly PyTorch's (``a.weight``, ``b.running_mean``).

Each type's options are declared once, in ktorch order and with ktorch names, and are matched and
checked by the options engine (options.py) in ktorch's wording. Every option also names the torch
keyword argument that receives it, which is also the attribute where torch keeps it; that one name
drives both the build (``cls(**kwargs)``) and the options table, which reads the current values
back from the live module.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from .errors import InvalidArgument, ResourceExhausted, did_you_mean
from .options import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Check,
    Opt,
    Value,
    Values,
    ValueType,
    Wording,
    int_value,
    numbers,
    resolve,
    size_value,
)

__all__ = [
    "LAYER_TYPES",
    "LayerSpec",
    "MAX_LAYER_ELEMENTS",
    "MAX_SPEC_DEPTH",
    "OptionRow",
    "OptionValue",
    "Reshape",
    "build_module",
    "describe_module",
    "layer_type",
]

OptionValue: TypeAlias = Value
"""An option's value as a spec gives it and the options table shows it."""

MAX_SPEC_DEPTH = 32
"""Default cap on nesting: the root is depth 0, its children depth 1, and so on."""

MAX_SPEC_LAYERS = 10_000
"""Default cap on the layers of one spec (the root and every child, at any depth). Each layer costs
the server about 0.4 ms and 2.5 KB of Python objects to build (twice: once on the meta device for
its footprint), none of it tensor memory the caps see; a 64 MiB request of bare `relu` children
held eight million of them, hours of work and more memory than a host has."""

MAX_LAYER_ELEMENTS = 2**31
"""Default cap on the parameter and buffer elements one layer may allocate, checked first."""

_TYPE_ATTR = "_weightavg_type"
_NAME_ATTR = "_weightavg_name"
_SPEC_ATTR = "_weightavg_spec"


@dataclass(frozen=True)
class LayerSpec:
    """One layer as the client asked for it; containers hold their children.

    Example: ``LayerSpec("linear", "a", args=(784, 800), options=(("bias", False),))``.
    """

    type: str
    name: str | None = None
    args: tuple[OptionValue, ...] = ()
    options: tuple[tuple[str, OptionValue], ...] = ()
    children: tuple[LayerSpec, ...] = ()


@dataclass(frozen=True)
class OptionRow:
    """One row of the ktorch options table: a module, where it sits, and its current options."""

    depth: int
    type: str
    name: str
    options: tuple[tuple[str, OptionValue], ...]


def _reshape_ok(value: OptionValue) -> bool:
    sizes = numbers(value)
    return all(x > 0 or x == -1 for x in sizes) and sizes.count(-1) <= 1


RESHAPE = Check(_reshape_ok, "of positive sizes with at most one -1", trailing=True)

POOL_MAX = 2**31 - 1
"""The largest pooling kernel size, stride, padding or dilation: torch's 2-d and 3-d pools and its
average pools convert them to 32-bit ints ("value cannot be converted to type int without
overflow"), and its CPU max_pool1d with a larger kernel spins without end instead, holding a server
thread and the module's lock for good (found by review)."""
POOL_POSITIVE = Check(lambda v: all(0 < x <= POOL_MAX for x in numbers(v)), f"positive (at most {POOL_MAX})")
POOL_NON_NEGATIVE = Check(lambda v: all(0 <= x <= POOL_MAX for x in numbers(v)), f"non-negative (at most {POOL_MAX})")


CONV_MAX_SIZE = 2**31 - 1
"""The largest spatial size a convolution here takes or makes. torch's CPU convolution computes its
output sizes in 32 bits while the meta pass that sizes them does not: a conv1d of kernel 2 with
padding 2**32 and dilation 2 answered an empty [1, 1, 0] output for a 2-wide input, where the true
one is 2**33 wide, and dilation 2**32+1 a [1, 1, 1] one (found by review)."""


def _check_conv_sizes(conv: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of every convolution built here: refuse an input or output spatial size over
    CONV_MAX_SIZE before torch computes it wrongly. A ValueError, which a pass answers
    INVALID_ARGUMENT (and the meta pass that sizes the output leaves to the real one)."""
    x = args[0] if args else None
    if not isinstance(conv, nn.modules.conv._ConvNd) or not isinstance(x, torch.Tensor):
        return
    dims = len(conv.kernel_size)
    sizes = [int(n) for n in x.shape[-dims:]]
    for i, n in enumerate(list(sizes)):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        p = conv.padding[i] if isinstance(conv.padding, tuple) else 0
        if conv.transposed:
            sizes.append((n - 1) * s - 2 * p + d * (k - 1) + conv.output_padding[i] + 1)
        else:
            sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    if max(sizes) > CONV_MAX_SIZE:
        name = getattr(conv, _TYPE_ATTR, type(conv).__name__.lower())
        raise ValueError(
            f"{name}: an input of spatial size {sizes[:dims]} makes an output of spatial size {sizes[dims:]}; "
            f"torch's convolutions take and make at most {CONV_MAX_SIZE} per dimension: use less padding "
            "or dilation, or a smaller input"
        )


@dataclass(frozen=True)
class LayerOption:
    """One option of a layer type: its declaration, and where torch takes and keeps it.

    `attr` is both the torch keyword argument and the module attribute holding the value.
    `presence` marks options such as ``bias`` where torch keeps a tensor or None and the option
    says which.
    """

    opt: Opt
    attr: str
    presence: bool = False


def _nothing(values: Values) -> int:
    return 0


@dataclass(frozen=True)
class LayerType:
    """An allowlisted layer type: its torch class, options in ktorch order, and size estimate.

    `elements` counts the parameter and buffer elements a build would allocate, from the
    validated options alone, so oversized layers are refused before any memory is touched.
    `validate` holds cross-option rules that torch would otherwise enforce with a bare assert.
    """

    name: str
    module_class: type[nn.Module]
    options: tuple[LayerOption, ...] = ()
    elements: Callable[[Values], int] = _nothing
    validate: Callable[[str, Values], None] | None = None
    container: bool = False


class Reshape(nn.Module):
    """Reshapes the whole input, batch dimension included, as ktorch's ``reshape`` does.

    Example: ``Reshape((-1, 1, 28, 28))`` turns a (64, 784) batch into (64, 1, 28, 28).
    """

    size: tuple[int, ...]

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_module(
    spec: LayerSpec,
    *,
    max_depth: int = MAX_SPEC_DEPTH,
    max_elements: int = MAX_LAYER_ELEMENTS,
) -> nn.Module:
    """Build a torch module from a layer spec, using only allowlisted layer types.

    Args:
        spec: the root layer; a ``sequential`` root holds the rest as children.
        max_depth: deepest nesting allowed (the root is depth 0).
        max_elements: most parameter and buffer elements any single layer may allocate.

    Returns:
        A standard ``torch.nn`` module (``Reshape`` aside). Each module built carries its spec
        type; the root also carries its spec name, which never prefixes parameter names.

    Raises:
        InvalidArgument: unknown type or option, wrong value type or range, missing option,
            bad child name, children on a non-container, or nesting deeper than `max_depth`.
        ResourceExhausted: a layer would allocate more than `max_elements` elements, or memory
            ran out while allocating it.

    Example:
        >>> m = build_module(LayerSpec("sequential", children=(
        ...     LayerSpec("linear", "a", (784, 800)), LayerSpec("relu", "c"))))
        >>> [n for n, _ in m.named_parameters()]
        ['a.weight', 'a.bias']
    """
    module = _build(spec, 0, max_depth, max_elements)
    if spec.name is not None:
        setattr(module, _NAME_ATTR, spec.name)
    # Kept so a snapshot can rebuild the same module (see snapshot.py); a plain attribute, not state.
    setattr(module, _SPEC_ATTR, spec)
    return module


def check_layer_count(spec: LayerSpec, max_layers: int = MAX_SPEC_LAYERS) -> None:
    """Refuse a spec of more than `max_layers` layers (the root and its children, at any depth)
    before anything is built. The walk stops at the first layer over the cap, and needs no recursion.

    Raises:
        InvalidArgument: the spec has more than `max_layers` layers.
    """
    count, pending = 1, [spec]
    while pending:
        children = pending.pop().children
        count += len(children)
        if count > max_layers:
            raise too_many_layers(max_layers)
        pending.extend(children)


def too_many_layers(max_layers: int) -> InvalidArgument:
    """The refusal of a spec over the layer cap (the transport counts a spec message's layers too)."""
    return InvalidArgument(
        f"the spec has more than {max_layers} layers (--max-spec-layers); build fewer, larger layers"
    )


def spec_of(module: nn.Module) -> LayerSpec | None:
    """The spec a root module was built from by `build_module`, or None for other modules."""
    spec = getattr(module, _SPEC_ATTR, None)
    return spec if isinstance(spec, LayerSpec) else None


def layer_type(module: nn.Module) -> str:
    """The spec type name of a module: the one it was built as, else the one its class maps to.

    Raises:
        InvalidArgument: the module's class is not an allowlisted layer.
    """
    stored = getattr(module, _TYPE_ATTR, None)
    if isinstance(stored, str) and stored in _LAYERS:
        return stored
    for cls in type(module).__mro__:
        found = _BY_CLASS.get(cls)
        if found is not None:
            return found
    raise InvalidArgument(f"unrecognized module class: {type(module).__qualname__}")


def describe_module(module: nn.Module) -> list[OptionRow]:
    """The ktorch options table of a module: one row per module, pre-order, current values.

    Values are read from the live module, so a batch-norm momentum set to None shows as None.

    Raises:
        InvalidArgument: some module in the tree is not an allowlisted layer.

    Example:
        >>> describe_module(build_module(LayerSpec("relu", "c")))
        [OptionRow(depth=0, type='relu', name='c', options=(('inplace', False),))]
    """
    rows: list[OptionRow] = []
    root_name = getattr(module, _NAME_ATTR, None)
    _describe(module, 0, root_name if isinstance(root_name, str) else "", rows)
    return rows


def _describe(module: nn.Module, depth: int, name: str, rows: list[OptionRow]) -> None:
    layer = _LAYERS[layer_type(module)]
    options = tuple((option.opt.name, _read(option, module)) for option in layer.options)
    rows.append(OptionRow(depth, layer.name, name, options))
    for child_name, child in module.named_children():
        _describe(child, depth + 1, child_name, rows)


def _read(option: LayerOption, module: nn.Module) -> OptionValue:
    """An option's current value, in the form a spec would give it."""
    raw: Any = getattr(module, option.attr)
    if option.presence:
        return raw is not None
    if raw is None or isinstance(raw, str):
        return raw
    value_type = option.opt.type
    if value_type is ValueType.SIZE:
        if isinstance(raw, int):
            return (raw,) * max(option.opt.dims, 1)
        return tuple(int(x) for x in raw)
    if value_type is ValueType.BOOL:
        return bool(raw)
    if value_type is ValueType.INT:
        return int(raw)
    return float(raw)


def _build(spec: LayerSpec, depth: int, max_depth: int, max_elements: int) -> nn.Module:
    if depth > max_depth:
        raise InvalidArgument(f"{spec.type}: nesting deeper than {max_depth} levels")
    layer = _lookup(spec.type)
    values = _resolve(layer, spec)
    if layer.container:
        module = _build_container(layer, spec, depth, max_depth, max_elements)
    elif spec.children:
        raise InvalidArgument(f"{layer.name}: only container types take child modules")
    else:
        _check_elements(layer, values, max_elements)
        module = _construct(layer, values)
        if isinstance(module, nn.modules.conv._ConvNd):
            module.register_forward_pre_hook(_check_conv_sizes)
    setattr(module, _TYPE_ATTR, layer.name)
    return module


def _lookup(type_name: str) -> LayerType:
    layer = _LAYERS.get(_ALIASES.get(type_name, type_name))
    if layer is None:
        close = did_you_mean(type_name, [*_LAYERS, *_ALIASES])
        listed = "every type: weightavg info ADDRESS, or GetServerInfo's layer_types" if close else ", ".join(LAYER_TYPES)
        raise InvalidArgument(f"unrecognized module type: '{type_name}'{close} ({listed})")
    return layer


def _build_container(
    layer: LayerType, spec: LayerSpec, depth: int, max_depth: int, max_elements: int
) -> nn.Module:
    """Children keyed by their names; an unnamed child takes its position, as in ktorch."""
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for index, child in enumerate(spec.children):
        name = str(index) if child.name is None else child.name
        _check_child_name(layer.name, name, children)
        children[name] = _build(child, depth + 1, max_depth, max_elements)
    try:
        return nn.Sequential(children)
    except KeyError as exc:
        raise InvalidArgument(f"{layer.name}: invalid child name: {exc.args[0]}") from exc


def _check_child_name(container: str, name: str, taken: Mapping[str, nn.Module]) -> None:
    if not name:
        raise InvalidArgument(f"{container}: child name must not be empty")
    if "." in name:
        raise InvalidArgument(f"{container}: child name '{name}' must not contain '.'")
    if name in taken:
        raise InvalidArgument(f"{container}: duplicate child name '{name}'")


def _resolve(layer: LayerType, spec: LayerSpec) -> dict[str, OptionValue]:
    """Match positional and keyword options to the type's options, fill defaults, validate."""
    opts = [option.opt for option in layer.options]
    values = resolve(layer.name, opts, spec.args, spec.options, Wording.LAYER)
    if layer.validate is not None:
        layer.validate(layer.name, values)
    return values


def _check_elements(layer: LayerType, values: Values, max_elements: int) -> None:
    count = layer.elements(values)
    if count > max_elements:
        raise ResourceExhausted(
            f"{layer.name}: layer would allocate {count} elements, over the cap of {max_elements}"
        )


def _construct(layer: LayerType, values: Values) -> nn.Module:
    """Call the torch class with the validated options; torch's own refusals become ours."""
    kwargs = {option.attr: values[option.opt.name] for option in layer.options}
    try:
        return layer.module_class(**kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ResourceExhausted(f"{layer.name}: out of memory building the layer") from exc
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise InvalidArgument(f"{layer.name}: {exc}") from exc


def _flag(values: Values, name: str) -> int:
    """1 if a boolean option is on, so element counts can multiply by it."""
    return 1 if values[name] else 0


def _linear_elements(v: Values) -> int:
    return int_value(v, "in") * int_value(v, "out") + int_value(v, "out") * _flag(v, "bias")


def _bilinear_elements(v: Values) -> int:
    out = int_value(v, "out")
    return out * int_value(v, "in1") * int_value(v, "in2") + out * _flag(v, "bias")


def _norm_elements(v: Values) -> int:
    """Weight and bias when affine; running mean, variance and batch count when tracking."""
    n = int_value(v, "in")
    return 2 * n * _flag(v, "affine") + (2 * n + 1) * _flag(v, "track")


def _groupnorm_elements(v: Values) -> int:
    return 2 * int_value(v, "channels") * _flag(v, "affine")


def _layernorm_elements(v: Values) -> int:
    return 2 * math.prod(size_value(v, "shape")) * _flag(v, "affine")


def _conv_elements(v: Values) -> int:
    per_group = -(-int_value(v, "in") // int_value(v, "groups"))
    out = int_value(v, "out")
    return out * per_group * math.prod(size_value(v, "size")) + out * _flag(v, "bias")


def _convtranspose_elements(v: Values) -> int:
    per_group = -(-int_value(v, "out") // int_value(v, "groups"))
    kernel = int_value(v, "in") * per_group * math.prod(size_value(v, "size"))
    return kernel + int_value(v, "out") * _flag(v, "bias")


def _embed_elements(v: Values) -> int:
    return int_value(v, "rows") * int_value(v, "cols")


def _embed_validate(t: str, v: Values) -> None:
    """torch only asserts the pad index, so check it here for a proper message; and refuse sparse
    gradients, which the server's optimizers, accounting (tensors by storage) and snapshots do not
    hold: a sparse embedding's epoch trained, then failed INTERNAL, and every listing after it
    failed too (found by review)."""
    index, rows = v["padindex"], int_value(v, "rows")
    if isinstance(index, int) and not -rows <= index < rows:
        raise InvalidArgument(
            f"{t}: option 'padindex' must lie in [{-rows}, {rows}), given {index}"
        )
    if v["sparse"] is True:
        raise InvalidArgument(f"{t}: sparse gradients are not supported here; leave option 'sparse' false")


def _maxpool_validate(t: str, v: Values) -> None:
    """With indices the layer returns a pair, which no layer, loss or reply here takes (a forward
    answered INTERNAL; found by review)."""
    if v["indices"] is True:
        raise InvalidArgument(f"{t}: indices=true returns (values, indices), which nothing here takes; leave it false")


def _divisible(*names: str) -> Callable[[str, Values], None]:
    """A rule that each named channel count splits evenly into `groups`."""

    def validate(t: str, v: Values) -> None:
        groups = int_value(v, "groups")
        for name in names:
            if int_value(v, name) % groups:
                raise InvalidArgument(
                    f"{t}: option '{name}' ({int_value(v, name)}) must be divisible by "
                    f"option 'groups' ({groups})"
                )

    return validate


def _convtranspose_validate(t: str, v: Values) -> None:
    """Channels divisible by groups, and each output padding below its stride or its dilation, as
    torch's kernel requires: it checks only at the first forward pass, so a module that could never
    run was built, and each forward refused (found by review)."""
    _divisible("in", "out")(t, v)
    for pad, stride, dilate in zip(size_value(v, "outpad"), size_value(v, "stride"), size_value(v, "dilate")):
        if pad >= stride and pad >= dilate:
            raise InvalidArgument(
                f"{t}: option 'outpad' ({pad}) must be smaller than option 'stride' ({stride}) or "
                f"option 'dilate' ({dilate}) in each dimension"
            )


def _int_option(name: str, attr: str, label: str) -> LayerOption:
    """A required positive integer, the usual shape of a size option."""
    return LayerOption(Opt(name, ValueType.INT, check=POSITIVE, required=True, label=label), attr)


def _bool_option(name: str, attr: str, default: bool) -> LayerOption:
    return LayerOption(Opt(name, ValueType.BOOL, default), attr)


def _eps() -> LayerOption:
    return LayerOption(Opt("eps", ValueType.FLOAT, 1e-5, POSITIVE), "eps")


def _momentum() -> LayerOption:
    """None asks torch for a cumulative average instead of an exponential one."""
    return LayerOption(Opt("momentum", ValueType.FLOAT, 0.1, nullable=True), "momentum")


def _bias() -> LayerOption:
    return LayerOption(Opt("bias", ValueType.BOOL, True), "bias", presence=True)


def _size_option(
    name: str, attr: str, dims: int, default: OptionValue, check: Check = POSITIVE
) -> LayerOption:
    """Sizes with a default, each positive unless `check` says otherwise."""
    return LayerOption(Opt(name, ValueType.SIZE, default, check, dims=dims), attr)


def _required_size(
    name: str, attr: str, dims: int, label: str, check: Check = POSITIVE
) -> LayerOption:
    """Sizes that must be given, such as a kernel size."""
    opt = Opt(name, ValueType.SIZE, check=check, required=True, dims=dims, label=label)
    return LayerOption(opt, attr)


def _nullable_size(name: str, attr: str, dims: int, check: Check = POSITIVE) -> LayerOption:
    """Positive sizes or None, such as a pooling stride that defaults to the kernel size."""
    return LayerOption(Opt(name, ValueType.SIZE, None, check, nullable=True, dims=dims), attr)


_PAD_MODES = ("zeros", "reflect", "replicate", "circular")


def _batchnorm(dims: int) -> LayerType:
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return _norm_type(f"batchnorm{dims}d", classes[dims - 1], stateful=True)


def _instancenorm(dims: int) -> LayerType:
    classes = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    return _norm_type(f"instancenorm{dims}d", classes[dims - 1], stateful=False)


def _norm_type(name: str, cls: type[nn.Module], stateful: bool) -> LayerType:
    """Batch and instance norm share options; affine and track default on for batch norm only."""
    options = (
        _int_option("in", "num_features", "number of input features"),
        _eps(),
        _momentum(),
        _bool_option("affine", "affine", stateful),
        _bool_option("track", "track_running_stats", stateful),
    )
    return LayerType(name, cls, options, _norm_elements)


def _conv(dims: int) -> LayerType:
    classes = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    options = (
        _int_option("in", "in_channels", "number of input channels"),
        _int_option("out", "out_channels", "number of output channels"),
        _required_size("size", "kernel_size", dims, "kernel size"),
        _size_option("stride", "stride", dims, 1),
        _size_option("pad", "padding", dims, 0, NON_NEGATIVE),
        _size_option("dilate", "dilation", dims, 1),
        LayerOption(Opt("groups", ValueType.INT, 1, POSITIVE), "groups"),
        _bias(),
        LayerOption(Opt("padmode", ValueType.STR, "zeros", choices=_PAD_MODES), "padding_mode"),
    )
    return LayerType(
        f"conv{dims}d", classes[dims - 1], options, _conv_elements, _divisible("in", "out")
    )


def _convtranspose(dims: int) -> LayerType:
    classes = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    options = (
        _int_option("in", "in_channels", "number of input channels"),
        _int_option("out", "out_channels", "number of output channels"),
        _required_size("size", "kernel_size", dims, "kernel size"),
        _size_option("stride", "stride", dims, 1),
        _size_option("pad", "padding", dims, 0, NON_NEGATIVE),
        _size_option("outpad", "output_padding", dims, 0, NON_NEGATIVE),
        LayerOption(Opt("groups", ValueType.INT, 1, POSITIVE), "groups"),
        _bias(),
        _size_option("dilate", "dilation", dims, 1),
        LayerOption(Opt("padmode", ValueType.STR, "zeros", choices=("zeros",)), "padding_mode"),
    )
    return LayerType(
        f"convtranspose{dims}d",
        classes[dims - 1],
        options,
        _convtranspose_elements,
        _convtranspose_validate,
    )


def _maxpool(dims: int) -> LayerType:
    classes = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    options = (
        _required_size("size", "kernel_size", dims, "kernel size", POOL_POSITIVE),
        _nullable_size("stride", "stride", dims, POOL_POSITIVE),
        _size_option("pad", "padding", dims, 0, POOL_NON_NEGATIVE),
        _size_option("dilate", "dilation", dims, 1, POOL_POSITIVE),
        _bool_option("indices", "return_indices", False),
        _bool_option("ceiling", "ceil_mode", False),
    )
    return LayerType(f"maxpool{dims}d", classes[dims - 1], options, validate=_maxpool_validate)


def _avgpool(dims: int) -> LayerType:
    """AvgPool1d has no divisor override in torch, so avgpool1d has no divisor option."""
    classes = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    options: tuple[LayerOption, ...] = (
        _required_size("size", "kernel_size", dims, "kernel size", POOL_POSITIVE),
        _nullable_size("stride", "stride", dims, POOL_POSITIVE),
        _size_option("pad", "padding", dims, 0, POOL_NON_NEGATIVE),
        _bool_option("ceiling", "ceil_mode", False),
        _bool_option("countpad", "count_include_pad", True),
    )
    if dims > 1:
        divisor = Opt("divisor", ValueType.INT, None, POSITIVE, nullable=True)
        options += (LayerOption(divisor, "divisor_override"),)
    return LayerType(f"avgpool{dims}d", classes[dims - 1], options)


def _adaptavg(dims: int) -> LayerType:
    classes = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    size = _required_size("size", "output_size", dims, "output size")
    return LayerType(f"adaptavg{dims}d", classes[dims - 1], (size,))


def _activation(name: str, cls: type[nn.Module], *options: LayerOption) -> LayerType:
    return LayerType(name, cls, options)


_INPLACE = _bool_option("inplace", "inplace", False)
_DIM = LayerOption(Opt("dim", ValueType.INT, required=True), "dim")

_TYPES: tuple[LayerType, ...] = (
    LayerType("sequential", nn.Sequential, container=True),
    LayerType(
        "linear",
        nn.Linear,
        (
            _int_option("in", "in_features", "input size"),
            _int_option("out", "out_features", "output size"),
            _bias(),
        ),
        _linear_elements,
    ),
    LayerType(
        "bilinear",
        nn.Bilinear,
        (
            _int_option("in1", "in1_features", "first input size"),
            _int_option("in2", "in2_features", "second input size"),
            _int_option("out", "out_features", "output size"),
            _bias(),
        ),
        _bilinear_elements,
    ),
    LayerType(
        "embed",
        nn.Embedding,
        (
            _int_option("rows", "num_embeddings", "number of rows"),
            _int_option("cols", "embedding_dim", "number of columns"),
            LayerOption(Opt("padindex", ValueType.INT, None, nullable=True), "padding_idx"),
            LayerOption(Opt("maxnorm", ValueType.FLOAT, None, POSITIVE, nullable=True), "max_norm"),
            LayerOption(Opt("p", ValueType.FLOAT, 2.0, POSITIVE), "norm_type"),
            _bool_option("scale", "scale_grad_by_freq", False),
            _bool_option("sparse", "sparse", False),
        ),
        _embed_elements,
        _embed_validate,
    ),
    *(_batchnorm(d) for d in (1, 2, 3)),
    *(_instancenorm(d) for d in (1, 2, 3)),
    LayerType(
        "layernorm",
        nn.LayerNorm,
        (
            _required_size("shape", "normalized_shape", 0, "shape"),
            _eps(),
            _bool_option("affine", "elementwise_affine", True),
        ),
        _layernorm_elements,
    ),
    LayerType(
        "groupnorm",
        nn.GroupNorm,
        (
            _int_option("groups", "num_groups", "number of groups"),
            _int_option("channels", "num_channels", "number of channels"),
            _eps(),
            _bool_option("affine", "affine", True),
        ),
        _groupnorm_elements,
        _divisible("channels"),
    ),
    *(_conv(d) for d in (1, 2, 3)),
    *(_convtranspose(d) for d in (1, 2, 3)),
    *(_maxpool(d) for d in (1, 2, 3)),
    *(_avgpool(d) for d in (1, 2, 3)),
    *(_adaptavg(d) for d in (1, 2, 3)),
    _activation("relu", nn.ReLU, _INPLACE),
    _activation(
        "leakyrelu",
        nn.LeakyReLU,
        LayerOption(Opt("slope", ValueType.FLOAT, 0.01), "negative_slope"),
        _INPLACE,
    ),
    _activation(
        "gelu",
        nn.GELU,
        LayerOption(
            Opt("approximate", ValueType.STR, "none", choices=("none", "tanh")), "approximate"
        ),
    ),
    _activation("silu", nn.SiLU),
    _activation("tanh", nn.Tanh),
    _activation("sigmoid", nn.Sigmoid),
    _activation("identity", nn.Identity),
    _activation("softmax", nn.Softmax, _DIM),
    _activation("logsoftmax", nn.LogSoftmax, _DIM),
    _activation(
        "drop",
        nn.Dropout,
        LayerOption(Opt("p", ValueType.FLOAT, 0.5, UNIT_INTERVAL), "p"),
        _INPLACE,
    ),
    LayerType(
        "flatten",
        nn.Flatten,
        (
            LayerOption(Opt("start", ValueType.INT, 1), "start_dim"),
            LayerOption(Opt("end", ValueType.INT, -1), "end_dim"),
        ),
    ),
    LayerType(
        "reshape",
        Reshape,
        (_required_size("size", "size", 0, "size", RESHAPE),),
    ),
)

_LAYERS: dict[str, LayerType] = {layer.name: layer for layer in _TYPES}
_BY_CLASS: dict[type[nn.Module], str] = {layer.module_class: layer.name for layer in _TYPES}
_ALIASES: dict[str, str] = {"embedding": "embed"}

LAYER_TYPES: tuple[str, ...] = tuple(sorted(_LAYERS))
"""Every allowlisted type name, sorted; aliases (``embedding`` for ``embed``) are not listed."""
