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

The reader builds nothing else: a name outside `SENT` is refused before anything is imported or
looked up, a dataclass gets only its own fields (no constructor runs), and bytes that are not the
format (a pickle, a truncated stream, a tensor whose bytes are not its dtype times its shape) are
`ControlDecodeError`. The writer refuses what it cannot encode (TypeError) on the sending rank, so
a class missing from `SENT` fails where it is sent, with its name.

The server's ranks still trust one another with what they send (docs/cluster.md, "Security"); this
bounds what a stream that is not theirs can do to a rank: nothing but fail the collective.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import math
import struct
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
    ("weightavg_server.store.snapshot", "SnapshotError"),
})
"""The (module, qualified name) of every class and function of this package the ranks send one
another: all a stream may name. Logged from the cluster tests' every object sent, then completed from
the Service verbs' signatures; a class added to what the ranks send must be added here."""

DTYPES: Final = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
"""torch's dtypes by name, read from the module's own attributes (`getattr(torch, name)` imports
torch's lazy submodules for some names)."""

MAGIC: Final = b"WACTL1"
"""The first bytes of every encoded object: a stream without them (a pickle) is refused at once."""

MAX_DEPTH: Final = 200
"""Nesting the reader follows (LayerSpec trees are the deepest the ranks send): a stream nested deeper
is refused instead of exhausting the stack."""


class ControlDecodeError(ValueError):
    """Bytes that are not an object the ranks send one another."""


# -- tags: one byte before each value -----------------------------------------------------------------

NONE, TRUE, FALSE, INT, BIGINT, FLOAT, STR, BYTES = b"N", b"T", b"F", b"i", b"I", b"f", b"s", b"b"
LIST, TUPLE, DICT, SET, FROZENSET = b"l", b"t", b"d", b"S", b"Z"
TENSOR, DTYPE, SIZE, DEVICE = b"X", b"D", b"Q", b"V"
ENUM, DATA, ERROR, FUNCTION = b"E", b"C", b"R", b"P"

_SEQUENCES: Final[dict[type, bytes]] = {list: LIST, tuple: TUPLE, set: SET, frozenset: FROZENSET}
_BUILD: Final[dict[bytes, Callable[[list[Any]], Any]]] = {LIST: list, TUPLE: tuple, SET: set, FROZENSET: frozenset}


def _key(obj: Any) -> tuple[str, str]:
    return str(getattr(obj, "__module__", "")), str(getattr(obj, "__qualname__", ""))


def _sent(module: str, name: str) -> Any:
    """The class or function `SENT` names, imported only once the name is found there."""
    if (module, name) not in SENT:
        raise ControlDecodeError(
            f"the cluster's control plane does not build {module}.{name}: only what the server's ranks send "
            "one another (control_wire.SENT)"
        )
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


# -- writing ------------------------------------------------------------------------------------------


class ControlWriter:
    """Encodes one object into a binary file (torch.distributed's `_pickler` interface: `dump`)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._out = file

    def dump(self, obj: Any) -> None:
        self._out.write(MAGIC)
        self._value(obj)

    def _raw(self, data: bytes) -> None:
        self._out.write(struct.pack("<Q", len(data)))
        self._out.write(data)

    def _text(self, text: str) -> None:
        self._raw(text.encode())

    def _value(self, obj: Any) -> None:  # noqa: C901 - one branch per tag, in the order subclasses need
        kind = type(obj)
        w = self._out.write
        if obj is None:
            w(NONE)
        elif kind is bool:
            w(TRUE if obj else FALSE)
        elif isinstance(obj, enum.Enum):
            w(ENUM)
            self._name(kind)
            self._value(obj.value)
        elif kind is int:
            if -(2**63) <= obj < 2**63:
                w(INT + struct.pack("<q", obj))
            else:
                w(BIGINT)
                self._text(str(obj))
        elif kind is float:
            w(FLOAT + struct.pack("<d", obj))
        elif kind is str:
            w(STR)
            self._text(obj)
        elif kind is bytes:
            w(BYTES)
            self._raw(obj)
        elif isinstance(obj, torch.Tensor):
            self._tensor(obj)
        elif kind is torch.dtype:
            w(DTYPE)
            self._text(str(obj).removeprefix("torch."))
        elif kind is torch.Size:
            w(SIZE)
            self._value(tuple(int(n) for n in obj))
        elif kind is torch.device:
            w(DEVICE)
            self._text(str(obj))
        elif kind in _SEQUENCES:
            w(_SEQUENCES[kind] + struct.pack("<Q", len(obj)))
            for item in obj:
                self._value(item)
        elif kind is dict:
            w(DICT + struct.pack("<Q", len(obj)))
            for k, v in obj.items():
                self._value(k)
                self._value(v)
        elif isinstance(obj, BaseException):
            w(ERROR)
            self._name(kind)
            self._value(tuple(obj.args))
            self._value(dict(vars(obj)))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            w(DATA)
            self._name(kind)
            custom = getattr(kind, "__getstate__", None) is not object.__getstate__
            state: Any = obj.__getstate__() if custom else vars(obj)
            self._value(dict(state))
        elif callable(obj) and not isinstance(obj, type) and _key(obj) in SENT:
            w(FUNCTION)
            self._name(obj)
        else:
            raise TypeError(
                f"the cluster's control plane does not send a {kind.__module__}.{kind.__qualname__}: "
                "add it to control_wire.SENT if it is plain data"
            )

    def _name(self, obj: Any) -> None:
        module, name = _key(obj)
        if (module, name) not in SENT:
            raise TypeError(f"the cluster's control plane does not send {module}.{name}: add it to control_wire.SENT")
        self._text(module)
        self._text(name)

    def _tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        self._out.write(TENSOR)
        self._text(str(t.dtype).removeprefix("torch."))
        self._value(tuple(t.shape))
        self._text(str(t.device))
        self._raw(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


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
        data = self._in.read(n)
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
            return self._int(self._text())
        if tag == FLOAT:
            return struct.unpack("<d", self._exactly(8))[0]
        if tag == STR:
            return self._text()
        if tag == BYTES:
            return self._raw()
        if tag in _BUILD:
            return _BUILD[tag]([self._value(depth + 1) for _ in range(self._count())])
        if tag == DICT:
            return {self._value(depth + 1): self._value(depth + 1) for _ in range(self._count())}
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

    def _int(self, text: str) -> int:
        if not text.lstrip("-").isdigit():
            raise ControlDecodeError(f"the cluster's control plane got {text[:40]!r} for an integer")
        return int(text)

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
            args, state = self._value(depth + 1), self._value(depth + 1)
            if not (isinstance(args, tuple) and isinstance(state, dict)):
                raise ControlDecodeError("the cluster's control plane got an error without arguments")
            error = found(*args)
            _restore(error, state, None)
            return error
        if tag == DATA and dataclasses.is_dataclass(found) and isinstance(found, type):
            state = self._value(depth + 1)
            obj = object.__new__(found)  # a dataclass gets its fields; no constructor runs
            _restore(obj, state, {f.name for f in dataclasses.fields(found)})
            return obj
        raise ControlDecodeError(f"the cluster's control plane got {found.__qualname__} for a tag {tag!r}")


def _restore(obj: object, state: object, fields: set[str] | None) -> None:
    """Set `obj`'s attributes from `state`: names only (of `fields` where given)."""
    if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
        raise ControlDecodeError("the cluster's control plane got an object's state that is not named values")
    if fields is not None and not state.keys() <= fields:
        raise ControlDecodeError(f"the cluster's control plane got fields {sorted(state.keys() - fields)} it does not know")
    vars(obj).update(state)


def _dtype(name: str) -> torch.dtype:
    kind = DTYPES.get(name)
    if kind is None:
        raise ControlDecodeError(f"the cluster's control plane does not build a tensor of dtype {name!r}")
    return kind


def _shape(shape: object) -> tuple[int, ...]:
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise ControlDecodeError(f"the cluster's control plane got a tensor of shape {shape!r}: not sizes")
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
