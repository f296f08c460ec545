"""Declared options given by position and by name: the one engine behind layer specs, losses,
optimizers and model settings.

Each option is declared once (`Opt`): its name, the type of value it takes, its default and the
rules on it. `resolve` matches positional then keyword values to a type's options, fills in the
defaults and checks every value with `coerce`, which also turns ints into floats where a number is
expected. The rules are the same everywhere; only the wording of a refusal differs (`Wording`),
because layer specs speak ktorch's words and the rest the reference's.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeGuard, TypeVar

from .errors import InvalidArgument, did_you_mean
from .shapes import MAX_DIMS

Value: TypeAlias = None | bool | int | float | str | tuple[int, ...] | tuple[float, ...]
Values: TypeAlias = Mapping[str, Value]

_T = TypeVar("_T", bool, int, float, str)


class ValueType(enum.Enum):
    """The type of value an option takes, named as Python does and in words, for messages."""

    BOOL = ("bool", "a boolean")
    INT = ("int", "an integer")
    FLOAT = ("float", "a number")
    STR = ("str", "a string")
    SIZE = ("size", "an integer or a tuple of integers")

    def __init__(self, python_name: str, in_words: str) -> None:
        self.python_name = python_name
        self.in_words = in_words


@dataclass(frozen=True)
class Check:
    """A range rule on a coerced value: `test` says whether it holds, `text` what it requires.

    In ktorch's wording `text` stands before the option's label ("positive input size"), or after
    it when `trailing` ("'p' between 0 and 1"). Every number of a size tuple must pass.
    """

    test: Callable[[Value], bool]
    text: str
    trailing: bool = False

    def phrase(self, label: str) -> str:
        """The rule applied to an option, in ktorch's word order."""
        return f"{label} {self.text}" if self.trailing else f"{self.text} {label}"


def numbers(value: Value) -> tuple[float, ...]:
    """The numbers in a coerced value, so one rule covers scalars and size tuples alike."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, (int, float)):
        return (value,)
    return ()


POSITIVE = Check(lambda v: all(x > 0 for x in numbers(v)), "positive")
NON_NEGATIVE = Check(lambda v: all(x >= 0 for x in numbers(v)), "non-negative")
UNIT_INTERVAL = Check(lambda v: all(0 <= x <= 1 for x in numbers(v)), "between 0 and 1", trailing=True)
BELOW_ONE = Check(lambda v: all(0 <= x < 1 for x in numbers(v)), "in [0, 1)", trailing=True)


@dataclass(frozen=True)
class Opt:
    """One option: its name, the type of value it takes, the default and the rules on it.

    A `required` option has no default and may not be left out; a `nullable` one also takes None.
    `dims` (SIZE only) is how many sizes it takes, a single integer standing for that many copies;
    0 means any number. `label` is how ktorch's wording names the option ("input size") in place
    of its quoted name.

    Example: ``Opt("lr", ValueType.FLOAT, 0.01, NON_NEGATIVE)``.
    """

    name: str
    type: ValueType
    default: Value = None
    check: Check | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    nullable: bool = False
    dims: int = 0
    label: str = ""
    gradient: bool = False
    """A FLOAT option that also takes a list of numbers: mergekit's gradient, a value per layer
    interpolated from them (`domain/merging.py`, `at_fraction`)."""

    @property
    def what(self) -> str:
        """How ktorch's wording refers to this option."""
        return self.label or f"'{self.name}'"


class Wording(enum.Enum):
    """How refusals read; the rules behind them are the same.

    LAYER is ktorch's, for layer specs: types in words ("expects an integer, given bool True") and
    the rule next to the option's label ("positive input size required, given in=0").
    SETTING is the reference's, for losses, optimizers and model settings: Python's type names
    ("expects bool, given 1"), "must be" ("option 'lr' must be non-negative, given -1"), and an
    unknown option lists the known ones.
    """

    LAYER = enum.auto()
    SETTING = enum.auto()

    def wrong_type(self, what: str, opt: Opt, value: Value) -> InvalidArgument:
        """A value of the wrong type for the option."""
        if self is Wording.LAYER:
            expected, given = opt.type.in_words, f"{type(value).__name__} {value!r}"
        else:
            expected, given = opt.type.python_name, repr(value)
        return InvalidArgument(f"{what}: option '{opt.name}' expects {expected}, given {given}")

    def out_of_range(
        self, what: str, opt: Opt, check: Check, value: Value, result: Value
    ) -> InvalidArgument:
        """A value, as given and as coerced, that fails the option's check."""
        if self is Wording.LAYER:
            rule = check.phrase(opt.what)
            return InvalidArgument(f"{what}: {rule} required, given {opt.name}={result!r}")
        return InvalidArgument(f"{what}: option '{opt.name}' must be {check.text}, given {value!r}")

    def unknown(self, what: str, name: str, opts: Sequence[Opt]) -> InvalidArgument:
        """A keyword that names none of the options, with the closest ones and the full list."""
        names = ", ".join(o.name for o in opts) or "none"
        return InvalidArgument(f"{what}: unknown option '{name}'{did_you_mean(name, (o.name for o in opts))} (options: {names})")


def resolve(
    what: str,
    opts: Sequence[Opt],
    args: Sequence[Value],
    kwargs: Sequence[tuple[str, Value]],
    wording: Wording,
) -> dict[str, Value]:
    """Match positional then keyword values to options, fill defaults, check every value.

    `what` prefixes every message (the layer, loss or optimizer type).

    Raises:
        InvalidArgument: too many positional values, an unknown option, one given twice, a
            required one missing, or a value of the wrong type or out of range.

    Example: resolve("sgd", SGD, (0.05, 0.9), [("nesterov", True)], Wording.SETTING) gives lr
    .05, momentum .9, dampening 0, decay 0 and nesterov True.
    """
    if len(args) > len(opts):
        names = ", ".join(o.name for o in opts) or "none"
        count = len(args)
        raise InvalidArgument(f"{what}: too many positional options ({count} given; options: {names})")
    given: dict[str, Value] = {o.name: v for o, v in zip(opts, args)}
    positional = set(given)
    known = {o.name for o in opts}
    for name, value in kwargs:
        if name not in known:
            raise wording.unknown(what, name, opts)
        if name in given:
            how = "by position and by name" if name in positional else "twice"
            raise InvalidArgument(f"{what}: option '{name}' given {how}")
        given[name] = value
    return {o.name: _given_or_default(what, o, given, wording) for o in opts}


def _given_or_default(what: str, opt: Opt, given: Mapping[str, Value], wording: Wording) -> Value:
    """The checked value given for an option, else its checked default; a required one has none."""
    if opt.name in given:
        return coerce(what, opt, given[opt.name], wording)
    if opt.required:
        raise InvalidArgument(f"{what}: {_missing(opt)}")
    return coerce(what, opt, opt.default, wording)


def _missing(opt: Opt) -> str:
    """ktorch's wording where it has one, e.g. 'number of input features not defined'; else that the
    option is required. "ties: option 'density' not defined" read as if ties had no such option,
    the opposite of the fix (found by a new user's walk-through)."""
    if opt.label:
        return f"{opt.label} not defined (option '{opt.name}')"
    return f"option '{opt.name}' is required and was not given"


def coerce(what: str, opt: Opt, value: Value, wording: Wording) -> Value:
    """Check one value's type and range; ints become floats where a number is expected.

    Raises:
        InvalidArgument: the value has the wrong type, is not finite, is not one of the choices,
            has the wrong number of sizes, or fails the option's check.
    """
    if value is None and opt.nullable:
        return None
    result = _typed(what, opt, value, wording)
    if opt.check is not None and not opt.check.test(result):
        raise wording.out_of_range(what, opt, opt.check, value, result)
    return result


def _typed(what: str, opt: Opt, value: Value, wording: Wording) -> Value:
    """The value as the option's type, or the refusal that says why it is not one."""
    if opt.type is ValueType.BOOL:
        if isinstance(value, bool):
            return value
    elif opt.type is ValueType.INT:
        if _is_int(value):
            return value
    elif opt.type is ValueType.FLOAT:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(what, opt, value)
        if opt.gradient and isinstance(value, tuple) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return tuple(_finite(what, opt, v) for v in value)
    elif opt.type is ValueType.STR:
        if isinstance(value, str):
            return _choice(what, opt, value)
    elif isinstance(value, tuple) or _is_int(value):  # ValueType.SIZE, the one type left: each size checked there
        return _sizes(what, opt, value, wording)  # type: ignore[arg-type]
    raise wording.wrong_type(what, opt, value)


def _is_int(value: object) -> TypeGuard[int]:
    """True for ints but not bools, which Python counts as ints."""
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(what: str, opt: Opt, value: int | float) -> float:
    """The value as a float, refused if it is infinite or NaN."""
    result = float(value)
    if not math.isfinite(result):
        # ktorch writes a missing value as a NaN (batchnorm's momentum 0n); here it is None.
        none = " (for none, give None: a null value)" if opt.nullable else ""
        raise InvalidArgument(f"{what}: option '{opt.name}' must be finite, given {value!r}{none}")
    return result


def _choice(what: str, opt: Opt, value: str) -> str:
    """The value, refused if the option has choices and it is not one of them."""
    if opt.choices and value not in opt.choices:
        allowed = ", ".join(opt.choices)
        raise InvalidArgument(f"{what}: option '{opt.name}' must be one of {allowed}, given {value!r}")
    return value


def _sizes(
    what: str, opt: Opt, value: int | tuple[int, ...], wording: Wording
) -> tuple[int, ...]:
    """A size tuple; a single integer is repeated for every dimension, as torch does."""
    if isinstance(value, int):
        return (value,) * max(opt.dims, 1)
    if not all(_is_int(x) for x in value):
        raise wording.wrong_type(what, opt, value)
    if opt.dims and len(value) != opt.dims:
        count = len(value)
        raise InvalidArgument(f"{what}: option '{opt.name}' expects {opt.dims} sizes, given {count}")
    if not value:
        raise InvalidArgument(f"{what}: option '{opt.name}' expects at least one size")
    if len(value) > MAX_DIMS:
        # A shape, not per-dimension sizes: layernorm's shape of 33 ones built a 33-dimension weight no
        # input could reach (inputs have at most MAX_DIMS) that a client could not send back (found by review).
        count = len(value)
        raise InvalidArgument(
            f"{what}: option '{opt.name}' takes at most {MAX_DIMS} sizes (a tensor here has at most "
            f"{MAX_DIMS} dimensions), given {count}"
        )
    return value


def _read(values: Values, name: str, cls: type[_T]) -> _T:
    """A resolved value as the type its option declares; anything else is a programming error."""
    value = values[name]
    if not isinstance(value, cls):
        raise TypeError(f"option '{name}' holds {value!r}, not {cls.__name__}")
    return value


def int_value(values: Values, name: str) -> int:
    """A resolved INT option."""
    return _read(values, name, int)


def float_value(values: Values, name: str) -> float:
    """A resolved FLOAT option."""
    return _read(values, name, float)


def bool_value(values: Values, name: str) -> bool:
    """A resolved BOOL option."""
    return _read(values, name, bool)


def str_value(values: Values, name: str) -> str:
    """A resolved STR option."""
    return _read(values, name, str)


def size_value(values: Values, name: str) -> tuple[int, ...]:
    """A resolved SIZE option."""
    value = values[name]
    if not isinstance(value, tuple) or not all(_is_int(v) for v in value):
        raise TypeError(f"option '{name}' holds {value!r}, not a size tuple")
    return value  # type: ignore[return-value]
