"""How the cluster's ranks encode what they send one another: no pickle.

Commands, results and layouts travel between a torchrun cluster's ranks through torch.distributed's
object collectives, which pickle on one rank and unpickle on the others. torch's own unpickler builds
whatever a stream names, so a stream sent to a rank's gloo port by anyone who could reach it ran code
there, and every tensor among a command's results was rebuilt by torch's own loader with arbitrary
code allowed (found by review). A restricted unpickler came next; this module replaces pickling
altogether.

`install` makes those collectives use `ControlWriter` and `ControlReader`, which speak one tagged
binary format (`MAGIC`, then a tree of tagged values):

- plain values: None, bools, ints, floats, str, bytes, and lists, tuples, dicts, sets and frozensets
  of them;
- tensors as their dtype's name, shape, device and raw bytes, as the gRPC transport sends them;
  torch's dtypes, `torch.Size` and `torch.device` by value;
- the package's own data classes the ranks send (`SENT`): a dataclass by its fields, an enum by its
  value, an error by its arguments, and the one function a command carries (the stop check).

The reader builds nothing else: a name outside `SENT` is refused, a name in it only indexes a table
of the classes this module imports itself (`_table`: nothing a stream names is imported), a
dataclass gets only its own fields (no constructor runs), and bytes that are not the format (a
pickle, a truncated stream, a tensor whose bytes are not its dtype times its shape) are
`ControlDecodeError`. The writer refuses what it cannot encode (`ControlEncodeError`, a TypeError)
on the sending rank, so a class missing from `SENT` fails where it is sent, with its name. Both
sides apply the same bounds (nesting, an integer's digits, a tensor's sizes, each data class's field
types), so whatever the writer writes, the reader reads: a value past them fails where it is sent,
not on every other rank.

Every count and length is checked against the bytes actually there before anything is built, so a
stream claiming 2**60 items or bytes costs nothing; a data class's fields are checked against its
annotations, so a forged Command whose `op` is a number or whose `caller` is a string is refused here
instead of failing later, deep in a rank, as something other than a clear error.

The server's ranks still trust one another with what they send (docs/cluster.md, "Security"); this
bounds what a stream that is not theirs can do to a rank: nothing but fail the collective.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import io
import math
import re
import struct
import sys
import types
import typing
from collections.abc import Callable
from typing import IO, Any, Final

import torch
import torch.distributed.distributed_c10d as c10d

SENT: Final = frozenset({
    # the commands and what travels inside them (cluster.py)
    ("weightavg_server.cluster", "Command"), ("weightavg_server.cluster", "Failure"),
    ("weightavg_server.cluster", "Sink"), ("weightavg_server.cluster", "Relayed"),
    ("weightavg_server.cluster", "RemoteStop"), ("weightavg_server.cluster", "Move"),
    ("weightavg_server.cluster", "Layout"), ("weightavg_server.cluster", "never"),
    ("weightavg_server.store.tenants", "Caller"), ("weightavg_server.store.tenants", "Role"),
    ("weightavg_server.store.tenants", "Quota"),
    # the Service verbs' arguments and answers
    ("weightavg_server.domain.specs", "LayerSpec"), ("weightavg_server.domain.specs", "OptionRow"),
    ("weightavg_server.domain.averaging", "BufferMode"), ("weightavg_server.domain.ema", "ScheduleChange"),
    ("weightavg_server.domain.ema", "EmaState"), ("weightavg_server.domain.ema", "EmaSchedule"),
    ("weightavg_server.domain.tensors", "HandleSummary"), ("weightavg_server.store.registry", "Kind"),
    ("weightavg_server.store.snapshot", "SnapshotResult"), ("weightavg_server.service", "Ref"),
    ("weightavg_server.service", "RankInfo"), ("weightavg_server.service", "RankMetrics"),
    ("weightavg_server.service", "Reduced"), ("weightavg_server.service", "Size"),
    ("weightavg_server.service", "EmaResult"), ("weightavg_server.service", "ModelDescription"),
    # the errors a Failure carries (every WeightavgError: tests/test_control_wire.py checks)
    ("weightavg_server.domain.errors", "WeightavgError"), ("weightavg_server.domain.errors", "InvalidArgument"),
    ("weightavg_server.domain.errors", "NotFound"), ("weightavg_server.domain.errors", "FailedPrecondition"),
    ("weightavg_server.domain.errors", "ResourceExhausted"), ("weightavg_server.domain.errors", "Cancelled"),
    ("weightavg_server.domain.errors", "DeadlineExceeded"), ("weightavg_server.domain.errors", "PermissionDenied"),
    ("weightavg_server.domain.errors", "DataLoss"), ("weightavg_server.domain.errors", "Unavailable"),
    ("weightavg_server.domain.errors", "Aborted"),
    ("weightavg_server.store.snapshot", "SnapshotError"),
})
"""The (module, qualified name) of every class and function of this package the ranks send one
another: all a stream may name. Logged from the cluster tests' every object sent, then completed from
the Service verbs' signatures; a class added to what the ranks send must be added here."""

QUANTIZED: Final = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
"""Quantized dtypes: their bytes alone are not the tensor (its scale and zero point live beside them),
and a uint8 buffer viewed as one is a tensor torch cannot even print. The ranks never send them."""

DTYPES: Final = {
    name: v
    for name, v in ((str(v).removeprefix("torch."), v) for v in vars(torch).values() if isinstance(v, torch.dtype))
    if name not in QUANTIZED
}
"""torch's dtypes by name, read from the module's own attributes (`getattr(torch, name)` imports
torch's lazy submodules for some names), less the quantized ones."""

MAGIC: Final = b"WACTL1"
"""The first bytes of every encoded object: a stream without them (a pickle) is refused at once."""

MAX_DEPTH: Final = 200
"""Nesting the reader follows and the writer writes (LayerSpec trees are the deepest the ranks send:
a command carries one nested 64 layers deep, three levels each): a stream nested deeper is refused
instead of exhausting the stack, and a value nested deeper is refused on the rank that sends it."""

MAX_INT_DIGITS: Final = 4300
"""Decimal digits of an integer past 64 bits (Python's own default `int_max_str_digits`): int() of a
longer digit string takes quadratic time, and past Python's limit raises a ValueError."""

MAX_SHARED_HASH: Final = 16
"""Keys of one dict (members of one set) that may share a hash: a stream of keys built to collide would
otherwise take quadratic time to build (`_hashed`)."""

_INT_TEXT: Final = re.compile(rf"-?[0-9]{{1,{MAX_INT_DIGITS}}}")
_MAX_INT_BITS: Final = math.ceil(MAX_INT_DIGITS * math.log2(10))
_INT64_END: Final = 2**63
"""A tensor's sizes, and the product of its non-zero sizes (its strides), stay below this (torch's int64)."""


class ControlDecodeError(ValueError):
    """Bytes that are not an object the ranks send one another."""


class ControlEncodeError(TypeError):
    """A value the control plane cannot send (raised on the sending rank, before any byte moves)."""


# -- tags: one byte before each value -----------------------------------------------------------------

NONE, TRUE, FALSE, INT, BIGINT, FLOAT, STR, BYTES = b"N", b"T", b"F", b"i", b"I", b"f", b"s", b"b"
LIST, TUPLE, DICT, SET, FROZENSET = b"l", b"t", b"d", b"S", b"Z"
TENSOR, DTYPE, SIZE, DEVICE = b"X", b"D", b"Q", b"V"
ENUM, DATA, ERROR, FUNCTION = b"E", b"C", b"R", b"P"

_SEQUENCES: Final[dict[type, bytes]] = {list: LIST, tuple: TUPLE, set: SET, frozenset: FROZENSET}
_BUILD: Final[dict[bytes, Callable[[list[Any]], Any]]] = {LIST: list, TUPLE: tuple, SET: set, FROZENSET: frozenset}


def _key(obj: Any) -> tuple[str, str]:
    return str(getattr(obj, "__module__", "")), str(getattr(obj, "__qualname__", ""))


@functools.cache
def _table() -> dict[tuple[str, str], Any]:
    """`SENT`'s classes and functions by (module, qualified name), looked up once, from modules this
    function imports by name in its own code: a stream's names only index this table, so nothing a
    stream says is ever imported. (Imported here, not at the top, since those modules import this one.)"""
    from . import cluster, service
    from .domain import averaging, ema, errors, specs, tensors
    from .store import registry, snapshot, tenants

    modules = {m.__name__: m for m in (cluster, service, averaging, ema, errors, specs, tensors, registry, snapshot,
                                       tenants)}
    table: dict[tuple[str, str], Any] = {}
    for module, name in SENT:
        found: Any = modules[module]
        for part in name.split("."):
            found = getattr(found, part)
        table[(module, name)] = found
    return table


def _sent(module: str, name: str) -> Any:
    """The class or function `SENT` names; a name outside it is refused."""
    found = _table().get((module, name)) if (module, name) in SENT else None
    if found is None:
        raise ControlDecodeError(
            f"the cluster's control plane does not build {module}.{name}: only what the server's ranks send "
            "one another (control_wire.SENT)"
        )
    return found


# -- what a data class's fields may hold ---------------------------------------------------------------


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A `SENT` dataclass's fields and their annotations (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def conforms(value: object, hint: Any) -> bool:  # noqa: C901 - one branch per kind of annotation
    """Whether `value` is what the annotation `hint` says (the annotations `SENT`'s dataclasses use:
    Any, None, unions, tuples, lists, sets, dicts, callables and classes). A float field takes an int,
    as Python's typing does; a data class inside is checked where it was itself built, not again."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(conforms(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(conforms(item, arg) for item, arg in zip(value, args))
    if origin in (list, set, frozenset):
        return isinstance(value, origin) and all(conforms(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if origin is not None:
        return isinstance(value, origin)  # Callable[..., bool] and the like: the class alone
    if hint is float:
        return isinstance(value, (float, int))
    return isinstance(hint, type) and isinstance(value, hint)


def _misfit(cls: type, state: dict[str, Any]) -> str | None:
    """What is wrong with `state` as the fields of the dataclass `cls`, or None: it must name every
    field, no other, each holding what its annotation says."""
    fields = field_types(cls)
    unknown, missing = sorted(state.keys() - fields.keys()), sorted(fields.keys() - state.keys())
    if unknown:
        return f"{cls.__qualname__} with fields {unknown} it does not know"
    if missing:
        return f"{cls.__qualname__} without its fields {missing}"
    for name, hint in fields.items():
        if not conforms(state[name], hint):
            return f"{cls.__qualname__}.{name} holding a {type(state[name]).__qualname__}, not {hint}"
    return None


def _shadowed(cls: type, state: dict[str, Any]) -> list[str]:
    """The names in an error's state that would hide its class's own attributes (its `code`)."""
    return sorted(name for name in state if hasattr(cls, name))


# -- writing ------------------------------------------------------------------------------------------


class ControlWriter:
    """Encodes one object into a binary file (torch.distributed's `_pickler` interface: `dump`)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._out = file

    def dump(self, obj: Any) -> None:
        self._out.write(MAGIC)
        self._value(obj, 0)

    def _raw(self, data: bytes) -> None:
        self._out.write(struct.pack("<Q", len(data)))
        self._out.write(data)

    def _text(self, text: str) -> None:
        self._raw(text.encode())

    def _value(self, obj: Any, depth: int) -> None:  # noqa: C901 - one branch per tag, in the order subclasses need
        if depth > MAX_DEPTH:
            raise ControlEncodeError(
                f"the cluster's control plane does not send objects nested over {MAX_DEPTH} deep (the other ranks "
                "would refuse them)"
            )
        kind = type(obj)
        w = self._out.write
        if obj is None:
            w(NONE)
        elif kind is bool:
            w(TRUE if obj else FALSE)
        elif isinstance(obj, enum.Enum):
            w(ENUM)
            self._name(kind)
            self._value(obj.value, depth + 1)
        elif kind is int:
            if -_INT64_END <= obj < _INT64_END:
                w(INT + struct.pack("<q", obj))
            else:
                w(BIGINT)
                self._text(_int_text(obj))
        elif kind is float:
            w(FLOAT + struct.pack("<d", obj))
        elif kind is str:
            w(STR)
            self._text(obj)
        elif kind is bytes:
            w(BYTES)
            self._raw(obj)
        elif isinstance(obj, torch.Tensor):
            self._tensor(obj, depth)
        elif kind is torch.dtype:
            w(DTYPE)
            self._text(_dtype_name(obj))
        elif kind is torch.Size:
            w(SIZE)
            self._value(tuple(int(n) for n in obj), depth + 1)
        elif kind is torch.device:
            w(DEVICE)
            self._text(str(obj))
        elif kind in _SEQUENCES:
            w(_SEQUENCES[kind] + struct.pack("<Q", len(obj)))
            for item in obj:
                self._value(item, depth + 1)
        elif kind is dict:
            w(DICT + struct.pack("<Q", len(obj)))
            for k, v in obj.items():
                self._value(k, depth + 1)
                self._value(v, depth + 1)
        elif isinstance(obj, BaseException):
            state = dict(vars(obj))
            if _shadowed(kind, state):
                raise ControlEncodeError(f"the cluster's control plane does not send a {kind.__qualname__} whose "
                                         f"attributes {_shadowed(kind, state)} hide its class's")
            w(ERROR)
            self._name(kind)
            self._value(tuple(obj.args), depth + 1)
            self._value(state, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            w(DATA)
            self._name(kind)
            custom = getattr(kind, "__getstate__", None) is not object.__getstate__
            given: Any = obj.__getstate__() if custom else vars(obj)
            fields = dict(given)
            misfit = _misfit(kind, fields)
            if misfit is not None:
                raise ControlEncodeError(f"the cluster's control plane does not send a {misfit}")
            self._value(fields, depth + 1)
        elif callable(obj) and not isinstance(obj, type) and _key(obj) in SENT:
            w(FUNCTION)
            self._name(obj)
        else:
            raise ControlEncodeError(
                f"the cluster's control plane does not send a {kind.__module__}.{kind.__qualname__}: "
                "add it to control_wire.SENT if it is plain data"
            )

    def _name(self, obj: Any) -> None:
        module, name = _key(obj)
        if (module, name) not in SENT:
            raise ControlEncodeError(
                f"the cluster's control plane does not send {module}.{name}: add it to control_wire.SENT"
            )
        self._text(module)
        self._text(name)

    def _tensor(self, t: torch.Tensor, depth: int) -> None:
        if t.layout != torch.strided or t.is_nested or t.is_quantized or t.device.type == "meta":
            raise ControlEncodeError(
                f"the cluster's control plane sends dense tensors with their data, not a {t.dtype} tensor of "
                f"layout {t.layout} on {t.device}{' (nested)' if t.is_nested else ''}"
            )
        t = t.detach()
        self._out.write(TENSOR)
        self._text(_dtype_name(t.dtype))
        self._value(tuple(t.shape), depth + 1)
        self._text(str(t.device))
        # a conjugate or negative view holds its values unresolved: its bytes alone are not them
        flat = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        if flat.numel() and flat.stride(0) != 1:  # one element of any stride counts as contiguous (x[:, 0])
            flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
        self._raw(flat.view(torch.uint8).numpy().tobytes())


def _int_text(value: int) -> str:
    """An integer past 64 bits as its decimal digits, refused past `MAX_INT_DIGITS` (its bits are
    checked first: str() of a huge integer takes quadratic time, or raises past Python's limit)."""
    text = ""
    if value.bit_length() <= _MAX_INT_BITS:
        with contextlib.suppress(ValueError):
            text = str(value)
    if not _INT_TEXT.fullmatch(text):
        raise ControlEncodeError(
            f"the cluster's control plane does not send an integer of over {MAX_INT_DIGITS} digits"
        )
    return text


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ControlEncodeError(f"the cluster's control plane does not send a tensor or dtype {name}")
    return name


# -- reading ------------------------------------------------------------------------------------------


class ControlReader:
    """Decodes one object written by `ControlWriter` (torch.distributed's `_unpickler` interface:
    `load`); anything else is `ControlDecodeError`."""

    def __init__(self, file: IO[bytes]) -> None:
        self._in = file

    def load(self) -> Any:
        if self._in.read(len(MAGIC)) != MAGIC:
            raise ControlDecodeError("the cluster's control plane got bytes that are not weightavg's control format")
        obj = self._value(0)
        if self._in.read(1):
            raise ControlDecodeError("the cluster's control plane got bytes after the object")
        return obj

    def _exactly(self, n: int) -> bytes:
        # a length past what the platform can index (2**64 - 1) is past the bytes there as surely
        data = self._in.read(n) if n <= sys.maxsize else b""
        if len(data) != n:
            raise ControlDecodeError("the cluster's control plane got a truncated object")
        return data

    def _count(self) -> int:
        return int(struct.unpack("<Q", self._exactly(8))[0])

    def _raw(self) -> bytes:
        return self._exactly(self._count())

    def _text(self) -> str:
        try:
            return self._raw().decode()
        except UnicodeDecodeError as exc:
            raise ControlDecodeError("the cluster's control plane got text that is not UTF-8") from exc

    def _value(self, depth: int) -> Any:  # noqa: C901 - one branch per tag
        if depth > MAX_DEPTH:
            raise ControlDecodeError(f"the cluster's control plane got an object nested over {MAX_DEPTH} deep")
        tag = self._exactly(1)
        if tag == NONE:
            return None
        if tag in (TRUE, FALSE):
            return tag == TRUE
        if tag == INT:
            return struct.unpack("<q", self._exactly(8))[0]
        if tag == BIGINT:
            return _int(self._text())
        if tag == FLOAT:
            return struct.unpack("<d", self._exactly(8))[0]
        if tag == STR:
            return self._text()
        if tag == BYTES:
            return self._raw()
        if tag in _BUILD:
            count = self._count()  # each item takes a byte at least: a false count runs out of bytes
            items = [self._value(depth + 1) for _ in range(count)]
            if tag in (LIST, TUPLE):
                return _BUILD[tag](items)
            return _hashed(items, lambda: _BUILD[tag](items), "members")
        if tag == DICT:
            count = self._count()
            pairs = [(self._value(depth + 1), self._value(depth + 1)) for _ in range(count)]
            return _hashed([k for k, _ in pairs], lambda: dict(pairs), "keys")
        if tag == TENSOR:
            return _tensor(self._text(), self._value(depth + 1), self._text(), self._raw())
        if tag == DTYPE:
            return _dtype(self._text())
        if tag == SIZE:
            return torch.Size(_shape(self._value(depth + 1)))
        if tag == DEVICE:
            return _device(self._text())
        if tag in (ENUM, DATA, ERROR, FUNCTION):
            return self._sent(tag, depth)
        raise ControlDecodeError(f"the cluster's control plane got an unknown tag {tag!r}")

    def _sent(self, tag: bytes, depth: int) -> Any:
        """An enum, dataclass, error or function of `SENT`, checked to be of the kind its tag says."""
        found = _sent(self._text(), self._text())
        if tag == FUNCTION and not isinstance(found, type):
            return found
        if tag == ENUM and isinstance(found, type) and issubclass(found, enum.Enum):
            try:
                return found(self._value(depth + 1))
            except ValueError as exc:
                raise ControlDecodeError(f"the cluster's control plane got no {found.__qualname__}: {exc}") from exc
        if tag == ERROR and isinstance(found, type) and issubclass(found, Exception):
            args, state = self._value(depth + 1), _named_values(self._value(depth + 1))
            if not isinstance(args, tuple):
                raise ControlDecodeError("the cluster's control plane got an error without arguments")
            hidden = _shadowed(found, state)
            if hidden:
                raise ControlDecodeError(
                    f"the cluster's control plane got a {found.__qualname__} whose attributes {hidden} would hide "
                    "its class's"
                )
            error = found(*args)
            vars(error).update(state)
            return error
        if tag == DATA and dataclasses.is_dataclass(found) and isinstance(found, type):
            state = _named_values(self._value(depth + 1))
            misfit = _misfit(found, state)
            if misfit is not None:
                raise ControlDecodeError(f"the cluster's control plane got a {misfit}")
            obj = object.__new__(found)  # a dataclass gets its fields; no constructor runs
            vars(obj).update(state)
            return obj
        raise ControlDecodeError(f"the cluster's control plane got {found.__qualname__} for a tag {tag!r}")


def _int(text: str) -> int:
    """An integer past 64 bits from its decimal digits: ASCII digits only (str.isdigit takes '²', which
    int() refuses), at most `MAX_INT_DIGITS` of them."""
    if not _INT_TEXT.fullmatch(text):
        raise ControlDecodeError(
            f"the cluster's control plane got {text[:40]!r} for an integer (at most {MAX_INT_DIGITS} ASCII digits)"
        )
    return int(text)


def _hashed(keys: list[Any], build: Callable[[], Any], what: str) -> Any:
    """A dict or set built from decoded `keys`: each must be hashable (a list or a mutable data class as
    a key is a TypeError), given once (a writer never writes one twice), and few may share a hash.
    Integers equal modulo 2**61 - 1 share theirs, so 160,000 such keys (6 MB) held a rank inside one
    dict's construction for two minutes, quadratic in their number; distinct values the ranks send share
    a hash by chance alone (-1 and -2 do)."""
    try:
        shared = max(collections.Counter(hash(k) for k in keys).values(), default=0)
        built = build() if shared <= MAX_SHARED_HASH else None
    except (TypeError, ValueError, RuntimeError) as exc:  # unhashable; a tensor's == has no single truth
        raise ControlDecodeError(f"the cluster's control plane got {what} that cannot be {what}: {exc}") from exc
    if built is None:
        raise ControlDecodeError(
            f"the cluster's control plane got {shared} {what} of one hash (built in quadratic time)"
        )
    if len(built) != len(keys):
        raise ControlDecodeError(f"the cluster's control plane got {what} given twice")
    return built


def _named_values(state: object) -> dict[str, Any]:
    if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
        raise ControlDecodeError("the cluster's control plane got an object's state that is not named values")
    return state


def _dtype(name: str) -> torch.dtype:
    kind = DTYPES.get(name)
    if kind is None:
        raise ControlDecodeError(f"the cluster's control plane does not build a tensor of dtype {name!r}")
    return kind


def shape_fits(shape: object) -> bool:
    """Whether `shape` is sizes torch can allocate: a tuple of whole numbers of at least 0 whose non-zero
    ones multiply to below 2**63 (past it, its stride calculation overflows, and 2**64 fails as a
    ValueError). The ranks check the shapes they exchange as plain tuples with it too (`cluster`)."""
    return (
        isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
        and math.prod(n for n in shape if n) < _INT64_END
    )


def _shape(shape: object) -> tuple[int, ...]:
    """Sizes of a tensor, as torch allows them (`shape_fits`)."""
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise ControlDecodeError(f"the cluster's control plane got a tensor of shape {shape!r}: not sizes")
    if not shape_fits(shape):
        raise ControlDecodeError(f"the cluster's control plane got a tensor of shape {list(shape)}: past torch's sizes")
    return shape


def _tensor(dtype: str, shape: object, device: str, data: bytes) -> torch.Tensor:
    """A tensor rebuilt from what `ControlWriter` wrote, its bytes copied.

    Raises:
        ControlDecodeError: an unknown dtype, a shape that is not whole numbers of at least 0, bytes
            that are not the shape's elements, or a device that is not a CPU or an existing CUDA device.
    """
    kind, sizes = _dtype(dtype), _shape(shape)
    expected = math.prod(sizes) * kind.itemsize
    if len(data) != expected:
        raise ControlDecodeError(
            f"the cluster's control plane got a {dtype} tensor of shape {list(sizes)} with {len(data)} bytes, "
            f"not its {expected}"
        )
    where = _device(device)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(kind) if data else torch.empty(0, dtype=kind)
    return flat.reshape(sizes).to(where)


def _device(name: str) -> torch.device:
    """The device a tensor travelled from: the CPU or a CUDA device this process has (any other name
    would start a backend, or fail deep inside torch)."""
    try:
        device: torch.device | None = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or not (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
    ):
        raise ControlDecodeError(f"the cluster's control plane does not build a tensor on device {name!r}")
    return device


def encode(obj: Any) -> bytes:
    """`obj` in the control format (what a collective sends)."""
    out = io.BytesIO()
    ControlWriter(out).dump(obj)
    return out.getvalue()


def decode(data: bytes) -> Any:
    """The object `data` encodes (what a collective receives)."""
    return ControlReader(io.BytesIO(data)).load()


def install() -> None:
    """Make torch.distributed's object collectives in this process use `ControlWriter` and
    `ControlReader` (every rank, before the first collective: `cluster.join`).

    Raises:
        RuntimeError: this torch has no such hooks (the pinned version has them; a torch that moved
            them must not run a cluster whose ranks unpickle freely).
    """
    if not (hasattr(c10d, "_pickler") and hasattr(c10d, "_unpickler")):
        raise RuntimeError(
            "this torch's torch.distributed has no _pickler/_unpickler to replace; run the cluster on the "
            "torch version pyproject.toml pins"
        )
    c10d._pickler = ControlWriter  # type: ignore[assignment]  # torch calls only dump(obj) and load()
    c10d._unpickler = ControlReader  # type: ignore[assignment]
