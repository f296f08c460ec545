"""Named options given by position and by name, as the reference takes them for losses and optimizers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

Value = None | bool | int | float | str | tuple[int, ...]


@dataclass(frozen=True)
class Opt:
    """One option: its reference name, the value type, the default and an optional range rule.

    `kind` is bool, int, float or str; an int is accepted where a float is expected. `rule` returns
    True for valid values and `rule_text` says what is required ("non-negative", ...).
    """

    name: str
    kind: type
    default: Value
    rule: Callable[[Any], bool] | None = None
    rule_text: str = ""
    choices: tuple[str, ...] = ()


def non_negative(x: Any) -> bool:
    return bool(x >= 0)


def positive(x: Any) -> bool:
    return bool(x > 0)


def unit(x: Any) -> bool:
    return bool(0 <= x <= 1)


def below_one(x: Any) -> bool:
    return bool(0 <= x < 1)


def coerce(what: str, opt: Opt, value: Value) -> Value:
    """Check one value's type and range; ints become floats where a number is expected."""
    wrong = InvalidArgument(f"{what}: option '{opt.name}' expects {opt.kind.__name__}, given {value!r}")
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise wrong
        result: Value = value
    elif opt.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        result = value
    elif opt.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        result = float(value)
        if not math.isfinite(result):
            raise InvalidArgument(f"{what}: option '{opt.name}' must be finite, given {value!r}")
    else:
        if not isinstance(value, str):
            raise wrong
        if opt.choices and value not in opt.choices:
            raise InvalidArgument(
                f"{what}: option '{opt.name}' must be one of {', '.join(opt.choices)}, given {value!r}"
            )
        result = value
    if opt.rule is not None and not opt.rule(result):
        raise InvalidArgument(f"{what}: option '{opt.name}' must be {opt.rule_text}, given {value!r}")
    return result


def resolve(
    what: str, opts: Sequence[Opt], args: Sequence[Value], kwargs: Sequence[tuple[str, Value]]
) -> dict[str, Value]:
    """Match positional then keyword values to options, fill defaults, check every value.

    Example: resolve("sgd", SGD, (0.05, 0.9), [("nesterov", True)]) gives lr .05, momentum .9,
    dampening 0, decay 0 and nesterov True.
    """
    if len(args) > len(opts):
        names = ", ".join(o.name for o in opts) or "none"
        raise InvalidArgument(f"{what}: too many positional options ({len(args)} given; options: {names})")
    given: dict[str, Value] = {o.name: v for o, v in zip(opts, args)}
    positional = set(given)
    known = {o.name for o in opts}
    for name, value in kwargs:
        if name not in known:
            raise InvalidArgument(f"{what}: unknown option '{name}' (options: {', '.join(o.name for o in opts)})")
        if name in given:
            how = "by position and by name" if name in positional else "twice"
            raise InvalidArgument(f"{what}: option '{name}' given {how}")
        given[name] = value
    return {o.name: coerce(what, o, given.get(o.name, o.default)) for o in opts}
