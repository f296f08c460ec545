"""safetensors checkpoints read and written with numpy alone: the thin client's way to take a model's
files to the server and bring a merge back, without torch or the safetensors package.

Why here: a safetensors file is an 8-byte little-endian header length, that many bytes of JSON
(each tensor's dtype, shape and [start, end) byte offsets into the data that follows; an optional
"__metadata__" of strings), then the data. Nothing in it runs: the JSON is read as data and every
offset is checked against the file before an array is made over it. Arrays are read-only views of
the mapped file (np.memmap), so a checkpoint of many GB is never copied whole into memory; bfloat16
is ml_dtypes' (numpy has none), as everywhere in this client.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
"""safetensors' dtype codes and the numpy dtypes of their little-endian elements."""
_CODES: dict[np.dtype[Any], str] = {dtype: code for code, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100 << 20
"""The largest JSON header read (the safetensors package's own limit): a bigger length is a damaged
or foreign file, not a header to allocate for."""

WEIGHT_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A file that is not a well-formed safetensors checkpoint, or a directory without one."""


def files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or every *.safetensors file in a
    directory (a model saved whole or in shards), in name order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a .safetensors file nor a directory")
    found = sorted(f for f in p.iterdir() if f.name.endswith(WEIGHT_SUFFIX) and f.is_file())
    if not found:
        raise CheckpointError(f"{p} holds no *{WEIGHT_SUFFIX} file (only safetensors checkpoints are read; "
                              "convert a pickled .bin or .pt checkpoint with the safetensors package first)")
    return found


def read(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a checkpoint (a file, or a directory of shards) by name, as read-only arrays over
    the mapped files. A name in two shards is refused rather than one silently kept."""
    tensors: dict[str, npt.NDArray[Any]] = {}
    for f in files(path):
        for name, array in read_file(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in two shards of {path} (again in {f.name})")
            tensors[name] = array
    return tensors


def read_file(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """The tensors of one safetensors file, in the order their data lies, each checked: a known dtype,
    a shape of non-negative integers, offsets within the data that match the shape's bytes and do
    not overlap another tensor's."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: a header of {length} bytes does not fit in the file's {size} bytes "
                                  "(not a safetensors file, or cut short)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    start = 8 + length
    data_bytes = size - start
    entries = sorted(((name, _entry(path, name, spec, data_bytes)) for name, spec in header.items()
                      if name != "__metadata__"), key=lambda item: item[1][2])
    end = 0
    for name, (_, _, begin, stop) in entries:
        if begin < end:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps the tensor before it")
        end = stop
    if not entries:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_bytes,)) if data_bytes else None
    out: dict[str, npt.NDArray[Any]] = {}
    for name, (dtype, shape, begin, stop) in entries:
        raw = mapped[begin:stop] if mapped is not None else np.empty(0, np.uint8)
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _entry(path: str | os.PathLike[str], name: str, spec: Any, data_bytes: int) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """One header entry checked: (dtype, shape, start, end) within the data."""
    what = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(f"{what} lacks dtype, shape or data_offsets")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{what} has dtype {spec['dtype']!r}; readable: {', '.join(DTYPES)}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{what} has shape {shape!r}; give a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise CheckpointError(f"{what} has data_offsets {offsets!r} outside the file's {data_bytes} data bytes")
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{what}: {offsets[1] - offsets[0]} bytes for shape {shape} of {spec['dtype']} "
                              f"({math.prod(shape) * dtype.itemsize} expected)")
    return dtype, tuple(shape), offsets[0], offsets[1]


def write(path: str | os.PathLike[str], tensors: Mapping[str, npt.ArrayLike],
          metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to one safetensors file, in the given order (any file the safetensors package or
    `read` loads): each array's little-endian, row-major bytes after a header padded with spaces to
    a multiple of 8 bytes, as the format asks. Written beside `path` first and renamed over it, so a
    reader never sees half a file."""
    arrays = {name: _little_endian(np.asarray(value)) for name, value in tensors.items()}
    codes = _CODES
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in arrays.items():
        code = codes.get(array.dtype)
        if code is None:
            raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    temporary = Path(f"{path}.partial")
    with open(temporary, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for array in arrays.values():
            f.write(array.reshape(-1).view(np.uint8).data)
    os.replace(temporary, path)


def _little_endian(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The array contiguous, its elements little-endian (safetensors' byte order); a 0-dim array stays
    0-dim (np.ascontiguousarray makes it 1-dim)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else array.copy(order="C")


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_BYTES = 5 * 1000**3
"""mergekit's and Hugging Face's default largest shard (5 GB)."""


DEFAULT_HEADER_ROOM = 64 << 10
"""Bytes left for a shard's header before its first tensor, where the caller gives no bound
(`header_room`); a header that outgrows it makes the shard be copied once behind a larger one."""


class ShardWriter:
    """Writes a checkpoint directory the way mergekit and Hugging Face lay one out, a tensor at a time:
    shards of at most `max_shard_bytes` (a tensor larger than that alone in its own; a shard is
    closed when the next tensor would overflow it, mergekit's rule), named model.safetensors when one
    suffices, else model-00001-of-0000N.safetensors with model.safetensors.index.json (each tensor's
    shard, and the total size) for `from_pretrained` to find them.

    Why this shape: a merged model of many GB is never in memory, not even a shard: each tensor's
    bytes go to its shard's file when added, after room left for the header (`header_room`, e.g.
    `header_room(shapes)`), which is written into that room, padded with spaces as the format allows,
    when the shard closes. Shards go to a hidden folder inside the directory first and are moved into
    place by `finish`, the index last, after the weight files an earlier run left there (other shard
    counts would be loaded instead of, or beside, the new ones) are removed; on failure, or `abort`,
    nothing written is left, and the directory keeps what it held.

    Example:
        with ShardWriter(out, 2 * 1000**3) as writer:
            for name, array in tensors: writer.add(name, array)
            written = writer.finish()
    """

    def __init__(self, directory: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None, header_room: int = DEFAULT_HEADER_ROOM) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"the largest shard is {max_shard_bytes} bytes; give a positive size")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {})
        self.header_room = header_room + (-header_room % 8)  # the data starts 8-byte aligned
        self._staging = Path(tempfile.mkdtemp(prefix=".weightavg-", dir=self.directory))
        self._open: _OpenShard | None = None
        self._shards: list[list[str]] = []  # the names in each closed shard, in order
        self._added: set[str] = set()
        self._total_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def add(self, name: str, value: npt.ArrayLike) -> None:
        """Write one tensor to the shard being filled (closing it first where the tensor would overflow it)."""
        array = _little_endian(np.asarray(value))
        if name in self._added:
            raise CheckpointError(f"tensor {name!r} was already added")
        if self._open is not None and self._open.data_bytes + array.nbytes > self.max_shard_bytes:
            self._close()
        if self._open is None:
            self._open = _OpenShard(self._staging / f"{len(self._shards)}.safetensors", self.header_room, self.metadata)
        self._open.add(name, array)
        self._added.add(name)

    def finish(self) -> Path:
        """Move the shards into the directory (and the index where there are several); returns the file
        a loader opens first: model.safetensors, or the index."""
        self._close()
        if not self._shards:
            raise CheckpointError("no tensor was added: nothing to write")
        count = len(self._shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for old in self.directory.iterdir():
            if old.name not in names and (old.name in (SINGLE_FILE, INDEX_FILE) or SHARD_PATTERN.fullmatch(old.name)):
                old.unlink()
        for i, name in enumerate(names):
            os.replace(self._staging / f"{i}.safetensors", self.directory / name)
        written = self.directory / names[0]
        if count > 1:
            index = {"metadata": {"total_size": self._total_bytes},
                     "weight_map": {tensor: names[i] for i, shard in enumerate(self._shards) for tensor in shard}}
            write_text(self.directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
            written = self.directory / INDEX_FILE
        self.abort()
        return written

    def abort(self) -> None:
        """Remove what was staged (after `finish`: the empty staging folder)."""
        if self._open is not None:
            self._open.file.close()
            self._open = None
        shutil.rmtree(self._staging, ignore_errors=True)

    def _close(self) -> None:
        if self._open is None:
            return
        self._open.close()
        self._shards.append(self._open.names)
        self._total_bytes += self._open.data_bytes
        self._open = None


class _OpenShard:
    """One shard being written: each tensor's bytes written when added, after `room` bytes kept for the
    header, which `close` writes there (padded with spaces) with the 8-byte length before it."""

    def __init__(self, path: Path, room: int, metadata: Mapping[str, str]) -> None:
        self.path = path
        self.room = room
        self.header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self.names: list[str] = []
        self.data_bytes = 0
        self.file = open(path, "wb")  # closed by close(), or by the writer's abort()
        self.file.seek(8 + room)

    def add(self, name: str, array: npt.NDArray[Any]) -> None:
        code = _CODES.get(array.dtype)
        if code is None:
            raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        self.header[name] = {"dtype": code, "shape": list(array.shape),
                             "data_offsets": [self.data_bytes, self.data_bytes + array.nbytes]}
        self.file.write(array.reshape(-1).view(np.uint8).data)
        self.file.flush()  # the bytes with the system now, none held here
        self.data_bytes += array.nbytes
        self.names.append(name)

    def close(self) -> None:
        text = json.dumps(self.header, separators=(",", ":")).encode()
        if len(text) <= self.room:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.room) + text + b" " * (self.room - len(text)))
            self.file.close()
            return
        # The header outgrew its room: the shard once more, its data behind a header of the right size.
        self.file.close()
        text += b" " * (-len(text) % 8)
        grown = self.path.with_name(self.path.name + ".grown")
        with open(self.path, "rb") as source, open(grown, "wb") as target:
            target.write(struct.pack("<Q", len(text)) + text)
            source.seek(8 + self.room)
            shutil.copyfileobj(source, target, 16 << 20)
        os.replace(grown, self.path)


def header_room(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None) -> int:
    """Bytes that hold the header of any shard of these tensors (name -> shape), whatever their dtypes
    and offsets: each entry at its longest (a 4-letter dtype code, offsets of 20 digits), all of them
    together, and the metadata."""
    entry = len('{"dtype":"BF16","shape":,"data_offsets":[,]},') + 2 * 20
    room = 2 + len(json.dumps({"__metadata__": dict(metadata)}, separators=(",", ":"))) if metadata else 2
    for name, shape in shapes.items():
        room += len(json.dumps(name)) + 1 + len(json.dumps(list(shape), separators=(",", ":"))) + entry
    return room + (-room % 8)


def write_text(path: Path, text: str) -> None:
    """A small file written beside `path` and renamed over it (a reader sees the old or the new)."""
    temporary = Path(f"{path}.partial")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
