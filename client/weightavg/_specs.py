"""Layer specs written as nested Python lists, in the reference's order, turned into LayerSpec messages.

    ["linear", 64, 10]                       type, then positional options
    ["linear", "a", 784, 800]                a string second element names the child
    ["batchnorm1d", "b", 800, {"eps": 1e-7}] a trailing dict holds keyword options
    ["sequential", ["linear", 4, 2], "relu"] lists (or bare type strings) after a container are children
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from .v1 import weightavg_pb2 as pb

CONTAINERS = frozenset({"sequential"})


def option_message(value: Any) -> pb.OptionValue:
    """An OptionValue for None, bool, int, float, str or a sequence of ints."""
    if value is None:
        return pb.OptionValue(null_value=struct_pb2.NULL_VALUE)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a numpy scalar, 0-d array or torch scalar: int() of a 0-d float array truncated 0.05 to 0
    elif getattr(value, "ndim", 0) and hasattr(value, "tolist"):
        value = value.tolist()  # an array of ints: the list form below
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return pb.OptionValue(bool_value=bool(value))
    if isinstance(value, int) or hasattr(value, "__index__"):
        return pb.OptionValue(int_value=int(value))
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return pb.OptionValue(float_value=float(value))
    if isinstance(value, str):
        return pb.OptionValue(string_value=value)
    if isinstance(value, Sequence) and all(_is_integer(v) for v in value):
        return pb.OptionValue(int_list=pb.IntList(values=[int(v) for v in value]))
    if isinstance(value, Sequence) and value and all(_is_real(v) for v in value):
        # a merge option's gradient, e.g. t=[0, 0.5, 1]
        return pb.OptionValue(float_list=pb.FloatList(values=[float(v) for v in value]))
    raise TypeError(f"option value {value!r} is not None, a bool, a number, a string or a list of numbers")


def _is_real(value: Any) -> bool:
    """An int or float (numpy and torch scalars too), but no bool."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    """An int, or a numpy or torch integer scalar, but no bool: a size list such as
    ``list(np.array([3, 3]))`` holds numpy ints, which an array of them already passed as."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # numpy bools and torch bool scalars give bools here, refused below
    return isinstance(value, int) and not isinstance(value, bool)


def option_value(message: pb.OptionValue) -> Any:
    """The Python value of an OptionValue (None, bool, int, float, str or tuple of ints)."""
    which = message.WhichOneof("kind")
    if which == "int_list":
        return tuple(message.int_list.values)
    if which == "float_list":
        return tuple(message.float_list.values)
    if which in (None, "null_value"):
        return None
    return getattr(message, which)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def _number(text: str) -> int | float:
    return int(text) if text.strip().lstrip("+-").isdigit() else float(text)


def _is_spec(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and bool(item) and isinstance(item[0], str)


def layer_spec(spec: Any) -> pb.LayerSpec:
    """A LayerSpec message from a nested-list spec (see the module docstring)."""
    if isinstance(spec, str):
        return pb.LayerSpec(type=spec)
    if not _is_spec(spec):
        raise TypeError(f"a layer spec is a type name or a list starting with one, not {spec!r}")
    message = pb.LayerSpec(type=spec[0])
    rest = list(spec[1:])
    if rest and isinstance(rest[0], str):
        if _is_number(rest[0]) and spec[0] not in CONTAINERS:
            raise ValueError(
                f"layer spec {list(spec)!r}: {rest[0]!r} is a string, so it would name the layer; sizes and other "
                f"options are numbers: write {[spec[0], _number(rest[0]), *rest[1:]]!r} (to name the layer, use a "
                f"name that is not a number: {[spec[0], 'a', _number(rest[0]), *rest[1:]]!r})"
            )
        message.name = rest.pop(0)
    if rest and isinstance(rest[-1], Mapping):
        for key, value in rest.pop().items():
            message.options.append(pb.Option(name=str(key), value=option_message(value)))
    for item in rest:
        if spec[0] in CONTAINERS and (_is_spec(item) or isinstance(item, str)):
            message.children.append(layer_spec(item))
        elif isinstance(item, Mapping):
            raise TypeError("keyword options must be the last element of a layer spec")
        else:
            message.args.append(option_message(item))
    return message
