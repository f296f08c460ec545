"""Layer specs: build torch modules from an allowlist of ktorch layer types, and describe them back.

A client names each layer by its ktorch type (``linear``, ``batchnorm1d``, ...) and gives options
by position or by name. Nothing the client sends is imported or evaluated: every type maps to one
standard ``torch.nn`` class through the table at the bottom of this module, so parameter and
buffer names are exactly PyTorch's (``a.weight``, ``b.running_mean``).

Each type's options are declared once, in ktorch order and with ktorch names. Every option also
names the torch keyword argument that receives it, which is also the attribute where torch keeps
it; that one name drives both the build (``cls(**kwargs)``) and the options table, which reads the
current values back from the live module.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from .errors import InvalidArgument, ResourceExhausted

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
    "estimate_elements",
    "layer_type",
]

OptionValue: TypeAlias = None | bool | int | float | str | tuple[int, ...]
Values: TypeAlias = Mapping[str, OptionValue]

MAX_SPEC_DEPTH = 32
"""Default cap on nesting: the root is depth 0, its children depth 1, and so on."""

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


class Kind(enum.Enum):
    """The value an option takes; the enum value is the phrase used in error messages."""

    INT = "an integer"
    FLOAT = "a number"
    BOOL = "a boolean"
    STR = "a string"
    SIZE = "an integer or a tuple of integers"


@dataclass(frozen=True)
class Check:
    """A range rule on a coerced value; `phrase` is filled with the option's label."""

    test: Callable[[OptionValue], bool]
    phrase: str


def _numbers(value: OptionValue) -> tuple[float, ...]:
    """The numbers in a coerced value, so one rule covers scalars and size tuples alike."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, (int, float)):
        return (value,)
    return ()


def _reshape_ok(value: OptionValue) -> bool:
    sizes = _numbers(value)
    return all(x > 0 or x == -1 for x in sizes) and sizes.count(-1) <= 1


POSITIVE = Check(lambda v: all(x > 0 for x in _numbers(v)), "positive {}")
NON_NEGATIVE = Check(lambda v: all(x >= 0 for x in _numbers(v)), "non-negative {}")
UNIT_INTERVAL = Check(lambda v: all(0 <= x <= 1 for x in _numbers(v)), "{} between 0 and 1")
RESHAPE = Check(_reshape_ok, "{} of positive sizes with at most one -1")


@dataclass(frozen=True)
class Option:
    """One option of a layer type.

    `attr` is both the torch keyword argument and the module attribute holding the value.
    `dims` (SIZE only) is how many times a single integer is repeated; 0 means any length.
    `presence` marks options such as ``bias`` where torch keeps a tensor or None and the option
    says which. `label` is the wording used in messages (ktorch's, where it has one).
    """

    name: str
    attr: str
    kind: Kind
    default: OptionValue = None
    required: bool = False
    nullable: bool = False
    dims: int = 0
    check: Check | None = None
    choices: tuple[str, ...] = ()
    presence: bool = False
    label: str = ""

    @property
    def what(self) -> str:
        """How messages refer to this option."""
        return self.label or f"'{self.name}'"


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
    options: tuple[Option, ...] = ()
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


def estimate_elements(spec: LayerSpec, *, max_depth: int = MAX_SPEC_DEPTH) -> int:
    """Parameter and buffer elements that building spec would allocate, summed over every layer.

    Computed from the validated options alone, so a caller can refuse a module that would not fit
    before anything is allocated.

    Raises:
        InvalidArgument: as build_module does for unknown types, bad options or deep nesting.

    Example:
        >>> estimate_elements(LayerSpec("linear", args=(784, 800)))
        628000
    """
    return _estimate(spec, 0, max_depth)


def _estimate(spec: LayerSpec, depth: int, max_depth: int) -> int:
    if depth > max_depth:
        raise InvalidArgument(f"{spec.type}: nesting deeper than {max_depth} levels")
    layer = _lookup(spec.type)
    values = _resolve(layer, spec)
    if layer.container:
        return sum(_estimate(child, depth + 1, max_depth) for child in spec.children)
    if spec.children:
        raise InvalidArgument(f"{layer.name}: only container types take child modules")
    return layer.elements(values)
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
    options = tuple((option.name, _read(option, module)) for option in layer.options)
    rows.append(OptionRow(depth, layer.name, name, options))
    for child_name, child in module.named_children():
        _describe(child, depth + 1, child_name, rows)


def _read(option: Option, module: nn.Module) -> OptionValue:
    """An option's current value, in the form a spec would give it."""
    raw: Any = getattr(module, option.attr)
    if option.presence:
        return raw is not None
    if raw is None or isinstance(raw, str):
        return raw
    if option.kind is Kind.SIZE:
        if isinstance(raw, int):
            return (raw,) * max(option.dims, 1)
        return tuple(int(x) for x in raw)
    if option.kind is Kind.BOOL:
        return bool(raw)
    if option.kind is Kind.INT:
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
    setattr(module, _TYPE_ATTR, layer.name)
    return module


def _lookup(type_name: str) -> LayerType:
    layer = _LAYERS.get(_ALIASES.get(type_name, type_name))
    if layer is None:
        raise InvalidArgument(f"unrecognized module type: '{type_name}'")
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
    t = layer.name
    if len(spec.args) > len(layer.options):
        names = ", ".join(o.name for o in layer.options) or "none"
        raise InvalidArgument(
            f"{t}: too many positional options ({len(spec.args)} given; options: {names})"
        )
    given: dict[str, OptionValue] = {o.name: v for o, v in zip(layer.options, spec.args)}
    positional = set(given)
    known = {o.name for o in layer.options}
    for name, value in spec.options:
        if name not in known:
            raise InvalidArgument(f"{t}: unknown option '{name}'")
        if name in given:
            how = "by position and by name" if name in positional else "twice"
            raise InvalidArgument(f"{t}: option '{name}' given {how}")
        given[name] = value
    values: dict[str, OptionValue] = {}
    for option in layer.options:
        if option.name in given:
            values[option.name] = _coerce(t, option, given[option.name])
        elif option.required:
            raise InvalidArgument(f"{t}: {_missing(option)}")
        else:
            values[option.name] = _coerce(t, option, option.default)
    if layer.validate is not None:
        layer.validate(t, values)
    return values


def _coerce(t: str, option: Option, value: OptionValue) -> OptionValue:
    """Check a value's type and range; ints become floats where a number is expected."""
    if value is None:
        if option.nullable:
            return None
        raise _wrong_type(t, option, value)
    result: OptionValue
    if option.kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise _wrong_type(t, option, value)
        result = value
    elif option.kind is Kind.INT:
        if not _is_int(value):
            raise _wrong_type(t, option, value)
        result = value
    elif option.kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(t, option, value)
        result = float(value)
        if not math.isfinite(result):
            raise InvalidArgument(f"{t}: option '{option.name}' must be finite, given {value!r}")
    elif option.kind is Kind.STR:
        if not isinstance(value, str):
            raise _wrong_type(t, option, value)
        if option.choices and value not in option.choices:
            allowed = ", ".join(option.choices)
            raise InvalidArgument(
                f"{t}: option '{option.name}' must be one of {allowed}, given {value!r}"
            )
        result = value
    else:
        result = _coerce_size(t, option, value)
    if option.check is not None and not option.check.test(result):
        rule = option.check.phrase.format(option.what)
        raise InvalidArgument(f"{t}: {rule} required, given {option.name}={result!r}")
    return result


def _coerce_size(t: str, option: Option, value: OptionValue) -> tuple[int, ...]:
    """A size tuple; a single integer is repeated for every dimension, as torch does."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * max(option.dims, 1)
    if not isinstance(value, tuple) or not all(_is_int(x) for x in value):
        raise _wrong_type(t, option, value)
    if option.dims and len(value) != option.dims:
        raise InvalidArgument(
            f"{t}: option '{option.name}' expects {option.dims} sizes, given {len(value)}"
        )
    if not value:
        raise InvalidArgument(f"{t}: option '{option.name}' expects at least one size")
    return value


def _missing(option: Option) -> str:
    """ktorch's wording where it has one, e.g. 'number of input features not defined'."""
    if option.label:
        return f"{option.label} not defined (option '{option.name}')"
    return f"option '{option.name}' not defined"


def _is_int(value: object) -> bool:
    """True for ints but not bools, which Python counts as ints."""
    return isinstance(value, int) and not isinstance(value, bool)


def _wrong_type(t: str, option: Option, value: object) -> InvalidArgument:
    return InvalidArgument(
        f"{t}: option '{option.name}' expects {option.kind.value}, "
        f"given {type(value).__name__} {value!r}"
    )


def _check_elements(layer: LayerType, values: Values, max_elements: int) -> None:
    count = layer.elements(values)
    if count > max_elements:
        raise ResourceExhausted(
            f"{layer.name}: layer would allocate {count} elements, over the cap of {max_elements}"
        )


def _construct(layer: LayerType, values: Values) -> nn.Module:
    """Call the torch class with the validated options; torch's own refusals become ours."""
    kwargs = {option.attr: values[option.name] for option in layer.options}
    try:
        return layer.module_class(**kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ResourceExhausted(f"{layer.name}: out of memory building the layer") from exc
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise InvalidArgument(f"{layer.name}: {exc}") from exc


def _int(values: Values, name: str) -> int:
    value = values[name]
    assert isinstance(value, int)
    return value


def _sizes(values: Values, name: str) -> tuple[int, ...]:
    value = values[name]
    assert isinstance(value, tuple)
    return value


def _flag(values: Values, name: str) -> int:
    """1 if a boolean option is on, so element counts can multiply by it."""
    return 1 if values[name] else 0


def _linear_elements(v: Values) -> int:
    return _int(v, "in") * _int(v, "out") + _int(v, "out") * _flag(v, "bias")


def _bilinear_elements(v: Values) -> int:
    out = _int(v, "out")
    return out * _int(v, "in1") * _int(v, "in2") + out * _flag(v, "bias")


def _norm_elements(v: Values) -> int:
    """Weight and bias when affine; running mean, variance and batch count when tracking."""
    n = _int(v, "in")
    return 2 * n * _flag(v, "affine") + (2 * n + 1) * _flag(v, "track")


def _groupnorm_elements(v: Values) -> int:
    return 2 * _int(v, "channels") * _flag(v, "affine")


def _layernorm_elements(v: Values) -> int:
    return 2 * math.prod(_sizes(v, "shape")) * _flag(v, "affine")


def _conv_elements(v: Values) -> int:
    per_group = -(-_int(v, "in") // _int(v, "groups"))
    out = _int(v, "out")
    return out * per_group * math.prod(_sizes(v, "size")) + out * _flag(v, "bias")


def _convtranspose_elements(v: Values) -> int:
    per_group = -(-_int(v, "out") // _int(v, "groups"))
    kernel = _int(v, "in") * per_group * math.prod(_sizes(v, "size"))
    return kernel + _int(v, "out") * _flag(v, "bias")


def _embed_elements(v: Values) -> int:
    return _int(v, "rows") * _int(v, "cols")


def _embed_validate(t: str, v: Values) -> None:
    """torch only asserts this, so check it here for a proper message."""
    index, rows = v["padindex"], _int(v, "rows")
    if isinstance(index, int) and not -rows <= index < rows:
        raise InvalidArgument(
            f"{t}: option 'padindex' must lie in [{-rows}, {rows}), given {index}"
        )


def _divisible(*names: str) -> Callable[[str, Values], None]:
    """A rule that each named channel count splits evenly into `groups`."""

    def validate(t: str, v: Values) -> None:
        groups = _int(v, "groups")
        for name in names:
            if _int(v, name) % groups:
                raise InvalidArgument(
                    f"{t}: option '{name}' ({_int(v, name)}) must be divisible by "
                    f"option 'groups' ({groups})"
                )

    return validate


def _int_option(name: str, attr: str, label: str = "", **extra: Any) -> Option:
    """A required positive integer, the usual shape of a size option."""
    return Option(name, attr, Kind.INT, required=True, check=POSITIVE, label=label, **extra)


def _bool_option(name: str, attr: str, default: bool) -> Option:
    return Option(name, attr, Kind.BOOL, default)


def _eps() -> Option:
    return Option("eps", "eps", Kind.FLOAT, 1e-5, check=POSITIVE)


def _momentum() -> Option:
    """None asks torch for a cumulative average instead of an exponential one."""
    return Option("momentum", "momentum", Kind.FLOAT, 0.1, nullable=True)


def _bias() -> Option:
    return Option("bias", "bias", Kind.BOOL, True, presence=True)


def _size_option(name: str, attr: str, dims: int, default: OptionValue, **extra: Any) -> Option:
    extra.setdefault("check", POSITIVE)
    return Option(name, attr, Kind.SIZE, default, dims=dims, **extra)


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
        _size_option("size", "kernel_size", dims, None, required=True, label="kernel size"),
        _size_option("stride", "stride", dims, 1),
        _size_option("pad", "padding", dims, 0, check=NON_NEGATIVE),
        _size_option("dilate", "dilation", dims, 1),
        Option("groups", "groups", Kind.INT, 1, check=POSITIVE),
        _bias(),
        Option("padmode", "padding_mode", Kind.STR, "zeros", choices=_PAD_MODES),
    )
    return LayerType(
        f"conv{dims}d", classes[dims - 1], options, _conv_elements, _divisible("in", "out")
    )


def _convtranspose(dims: int) -> LayerType:
    classes = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    options = (
        _int_option("in", "in_channels", "number of input channels"),
        _int_option("out", "out_channels", "number of output channels"),
        _size_option("size", "kernel_size", dims, None, required=True, label="kernel size"),
        _size_option("stride", "stride", dims, 1),
        _size_option("pad", "padding", dims, 0, check=NON_NEGATIVE),
        _size_option("outpad", "output_padding", dims, 0, check=NON_NEGATIVE),
        Option("groups", "groups", Kind.INT, 1, check=POSITIVE),
        _bias(),
        _size_option("dilate", "dilation", dims, 1),
        Option("padmode", "padding_mode", Kind.STR, "zeros", choices=("zeros",)),
    )
    return LayerType(
        f"convtranspose{dims}d",
        classes[dims - 1],
        options,
        _convtranspose_elements,
        _divisible("in", "out"),
    )


def _maxpool(dims: int) -> LayerType:
    classes = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    options = (
        _size_option("size", "kernel_size", dims, None, required=True, label="kernel size"),
        _size_option("stride", "stride", dims, None, nullable=True),
        _size_option("pad", "padding", dims, 0, check=NON_NEGATIVE),
        _size_option("dilate", "dilation", dims, 1),
        _bool_option("indices", "return_indices", False),
        _bool_option("ceiling", "ceil_mode", False),
    )
    return LayerType(f"maxpool{dims}d", classes[dims - 1], options)


def _avgpool(dims: int) -> LayerType:
    """AvgPool1d has no divisor override in torch, so avgpool1d has no divisor option."""
    classes = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    options: tuple[Option, ...] = (
        _size_option("size", "kernel_size", dims, None, required=True, label="kernel size"),
        _size_option("stride", "stride", dims, None, nullable=True),
        _size_option("pad", "padding", dims, 0, check=NON_NEGATIVE),
        _bool_option("ceiling", "ceil_mode", False),
        _bool_option("countpad", "count_include_pad", True),
    )
    if dims > 1:
        options += (
            Option("divisor", "divisor_override", Kind.INT, None, nullable=True, check=POSITIVE),
        )
    return LayerType(f"avgpool{dims}d", classes[dims - 1], options)


def _adaptavg(dims: int) -> LayerType:
    classes = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    size = _size_option("size", "output_size", dims, None, required=True, label="output size")
    return LayerType(f"adaptavg{dims}d", classes[dims - 1], (size,))


def _activation(name: str, cls: type[nn.Module], *options: Option) -> LayerType:
    return LayerType(name, cls, options)


_INPLACE = _bool_option("inplace", "inplace", False)
_DIM = Option("dim", "dim", Kind.INT, required=True)

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
            Option("padindex", "padding_idx", Kind.INT, None, nullable=True),
            Option("maxnorm", "max_norm", Kind.FLOAT, None, nullable=True, check=POSITIVE),
            Option("p", "norm_type", Kind.FLOAT, 2.0, check=POSITIVE),
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
            _size_option("shape", "normalized_shape", 0, None, required=True, label="shape"),
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
        "leakyrelu", nn.LeakyReLU, Option("slope", "negative_slope", Kind.FLOAT, 0.01), _INPLACE
    ),
    _activation(
        "gelu",
        nn.GELU,
        Option("approximate", "approximate", Kind.STR, "none", choices=("none", "tanh")),
    ),
    _activation("silu", nn.SiLU),
    _activation("tanh", nn.Tanh),
    _activation("sigmoid", nn.Sigmoid),
    _activation("identity", nn.Identity),
    _activation("softmax", nn.Softmax, _DIM),
    _activation("logsoftmax", nn.LogSoftmax, _DIM),
    _activation(
        "drop", nn.Dropout, Option("p", "p", Kind.FLOAT, 0.5, check=UNIT_INTERVAL), _INPLACE
    ),
    LayerType(
        "flatten",
        nn.Flatten,
        (Option("start", "start_dim", Kind.INT, 1), Option("end", "end_dim", Kind.INT, -1)),
    ),
    LayerType(
        "reshape",
        Reshape,
        (_size_option("size", "size", 0, None, required=True, check=RESHAPE, label="size"),),
    ),
)

_LAYERS: dict[str, LayerType] = {layer.name: layer for layer in _TYPES}
_BY_CLASS: dict[type[nn.Module], str] = {layer.module_class: layer.name for layer in _TYPES}
_ALIASES: dict[str, str] = {"embedding": "embed"}

LAYER_TYPES: tuple[str, ...] = tuple(sorted(_LAYERS))
"""Every allowlisted type name, sorted; aliases (``embedding`` for ``embed``) are not listed."""
