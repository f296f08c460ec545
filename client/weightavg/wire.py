"""The tensor wire codec that the weightavg client and server share.

A tensor travels as a stream of TensorChunk messages (docs/clients.md): a header chunk with name,
dtype, shape and the first bytes, then data chunks. This module maps numpy dtypes to the wire's
Dtype codes, splits arrays into chunks and joins chunks back into arrays, and encodes and decodes
the stream messages that carry a chunk by hand, so tensor data is copied once a side (docs/perf.md).
The server's `weightavg_server.transport.codec` builds its torch side on these functions.

Field numbers are read from the generated descriptors (`chunk_field`, `string_fields`), never
written as literals, so the codec always agrees with the stubs it ships with.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from .v1 import weightavg_pb2 as pb

__all__ = [
    "CHUNK_BYTES",
    "ChunkView",
    "array_chunks",
    "chunk_field",
    "decode_chunk_message",
    "decode_fetch_response",
    "encode_chunk",
    "encode_tensor",
    "encoded_chunks",
    "join_chunks",
    "plain",
    "string_fields",
    "to_array",
]

CHUNK_BYTES = 4 << 20
"""The default chunk size of client and server, 4 MiB: measured fastest on loopback, and far below
any message cap."""

_DTYPES: dict[pb.Dtype.ValueType, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_FLOAT64: np.dtype(np.float64),
    pb.DTYPE_FLOAT16: np.dtype(np.float16),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_INT8: np.dtype(np.int8),
    pb.DTYPE_UINT8: np.dtype(np.uint8),
    pb.DTYPE_INT16: np.dtype(np.int16),
    pb.DTYPE_INT32: np.dtype(np.int32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_BOOL: np.dtype(np.bool_),
    pb.DTYPE_COMPLEX64: np.dtype(np.complex64),
    pb.DTYPE_COMPLEX128: np.dtype(np.complex128),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

_VARINT, _LEN = 0, 2
"""Protobuf wire types: varint (dtype, unpacked shape) and length-delimited (strings, bytes, messages)."""
_NAME, _DTYPE, _SHAPE, _DATA = (
    pb.TensorChunk.DESCRIPTOR.fields_by_name[name].number for name in ("name", "dtype", "shape", "data")
)


def chunk_field(message_type: type[Message]) -> int:
    """The field number of a stream message's TensorChunk field `chunk`, from its descriptor.

    TypeError for a message without one, so a wrong message type fails where the stream is built.
    """
    descriptor = message_type.DESCRIPTOR
    field = descriptor.fields_by_name.get("chunk")
    if field is None or field.message_type is not pb.TensorChunk.DESCRIPTOR:
        raise TypeError(f"{descriptor.full_name} has no TensorChunk field named 'chunk'")
    return field.number


def string_fields(message_type: type[Message]) -> dict[int, str]:
    """A stream message's single string fields (handle ids such as `dictionary`), number to name.

    With `chunk_field` this is what `decode_chunk_message` needs to read the message by hand.
    """
    return {
        field.number: field.name
        for field in message_type.DESCRIPTOR.fields
        if field.type == field.TYPE_STRING and not field.is_repeated
    }


def to_array(value: Any) -> npt.NDArray[Any]:
    """A contiguous little-endian array for a value: arrays as they are, Python ints int64, floats float64."""
    array = np.asarray(value)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _CODES:
        raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(str(d) for d in _CODES)}")
    return array if array.flags.c_contiguous else array.copy(order="C")


def array_chunks(name: str, value: Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Chunks for one array: a header chunk with name, dtype, shape and the first bytes, then data."""
    array = to_array(value)
    raw = array.reshape(-1).view(np.uint8).data  # a memoryview: slicing copies nothing
    yield pb.TensorChunk(
        name=name, dtype=_CODES[array.dtype], shape=list(array.shape), data=raw[:chunk_bytes].tobytes()
    )
    for start in range(chunk_bytes, len(raw), chunk_bytes):
        yield pb.TensorChunk(data=raw[start:start + chunk_bytes].tobytes())


@dataclass(frozen=True)
class ChunkView:
    """A TensorChunk decoded without copying its data: `data` is a view into the received message."""

    name: str
    dtype: pb.Dtype.ValueType
    shape: tuple[int, ...]
    data: memoryview


def _read_varint(raw: memoryview, i: int) -> tuple[int, int]:
    """The varint at raw[i] and the index after it."""
    value = shift = 0
    while True:
        byte = raw[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _read_bytes(raw: memoryview, i: int) -> tuple[memoryview, int]:
    """A length-delimited field's body at i (a view, no copy) and the position after it."""
    size, i = _read_varint(raw, i)
    if i + size > len(raw):
        raise ValueError("truncated field")
    return raw[i:i + size], i + size


def _signed(value: int) -> int:
    """An int64 read as an unsigned varint, back to its sign (protobuf writes negatives in 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_chunk(raw: memoryview) -> ChunkView:
    """A serialized TensorChunk's four fields; ValueError on anything else, so the caller can fall back to protobuf."""
    name, dtype, shape, data = "", pb.Dtype.ValueType(0), [], memoryview(b"")
    i, end = 0, len(raw)
    while i < end:
        key, i = _read_varint(raw, i)
        field, kind = key >> 3, key & 7
        if kind == _VARINT and field in (_DTYPE, _SHAPE):
            value, i = _read_varint(raw, i)
            if field == _DTYPE:
                dtype = pb.Dtype.ValueType(value)
            else:
                shape.append(_signed(value))
        elif kind == _LEN and field in (_NAME, _SHAPE, _DATA):
            body, i = _read_bytes(raw, i)
            size = len(body)
            if field == _NAME:
                name = bytes(body).decode("utf-8")
            elif field == _DATA:
                data = body
            else:
                j = 0
                while j < size:
                    value, j = _read_varint(body, j)
                    shape.append(_signed(value))
        else:
            raise ValueError(f"unexpected field {field} of wire type {kind}")
    return ChunkView(name, dtype, tuple(shape), data)


def decode_chunk_message(message: bytes, chunk_field: int, string_fields: Mapping[int, str]) -> dict[str, Any]:
    """Read a stream message made of a TensorChunk field and string fields, without copying tensor data.

    `chunk_field` and `string_fields` come from the message's descriptor (the functions of those
    names). Returns {"chunk": ChunkView, <string field name>: value}; ValueError on anything else
    (unknown or repeated fields), so callers fall back to protobuf, which copies the data twice.
    """
    raw = memoryview(message)
    out: dict[str, Any] = {name: "" for name in string_fields.values()}
    out["chunk"] = ChunkView("", pb.Dtype.ValueType(0), (), memoryview(b""))
    seen: set[int] = set()
    i, end = 0, len(raw)
    while i < end:
        key, i = _read_varint(raw, i)
        field, kind = key >> 3, key & 7
        if kind != _LEN or field in seen or (field != chunk_field and field not in string_fields):
            raise ValueError(f"unexpected field {field} of wire type {kind}")
        seen.add(field)
        body, i = _read_bytes(raw, i)
        if field == chunk_field:
            out["chunk"] = _decode_chunk(body)
        else:
            out[string_fields[field]] = bytes(body).decode("utf-8")
    return out


_FETCH_CHUNK_FIELD = chunk_field(pb.FetchTensorsResponse)


def decode_fetch_response(message: bytes) -> ChunkView | pb.TensorChunk:
    """The chunk of a serialized FetchTensorsResponse, its data a view into `message` (no copy).

    Parsing with protobuf copies the data twice (into the message, then out as bytes); this reads
    the one field by hand. Anything it does not expect goes through protobuf instead.
    """
    try:
        chunk: ChunkView = decode_chunk_message(message, _FETCH_CHUNK_FIELD, {})["chunk"]
        return chunk
    except (ValueError, IndexError, UnicodeDecodeError):
        return pb.FetchTensorsResponse.FromString(message).chunk


def _varint(n: int) -> bytes:
    """The varint encoding of a non-negative int."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def encode_chunk(field: int, name: str, code: int, shape: Iterable[int], data: memoryview) -> bytes:
    """The protobuf encoding of a message whose field `field` is this TensorChunk, built with one copy.

    The result is byte for byte what SerializeToString gives for the same message (fields in number
    order, proto3 defaults left out), so peers decode it as usual. Going through protobuf instead
    copies the data three times (tobytes, the field set, the serialization); on a 2-core machine
    those copies, not the transport, bounded a 256 MB transfer (docs/perf.md).
    """
    header = pb.TensorChunk(name=name, dtype=code, shape=list(shape)).SerializeToString()  # type: ignore[arg-type]
    size = len(data)
    data_prefix = _varint(_DATA << 3 | _LEN) + _varint(size) if size else b""
    inner = len(header) + len(data_prefix) + size
    return b"".join((_varint(field << 3 | _LEN), _varint(inner), header, data_prefix, data))


def encoded_chunks(values: Iterable[tuple[str, Any]], chunk_bytes: int, message_type: type[Message]) -> Iterator[bytes]:
    """Serialized `message_type` stream messages, each holding one TensorChunk of the named arrays.

    Only the chunk field is set; a stream whose first message names a handle sends that first.
    """
    field = chunk_field(message_type)
    for name, value in values:
        array = to_array(value)
        yield from encode_tensor(field, name, _CODES[array.dtype], array.shape, array.reshape(-1).view(np.uint8).data,
                                 chunk_bytes)


def encode_tensor(
    field: int, name: str, code: int, shape: Sequence[int], raw: memoryview, chunk_bytes: int
) -> Iterator[bytes]:
    """One tensor's stream messages (its chunk in `field`): a header chunk with the first bytes, then
    data chunks, each at most `chunk_bytes` of `raw` (its row-major little-endian bytes)."""
    for start in range(0, max(len(raw), 1), chunk_bytes):
        piece = raw[start:start + chunk_bytes]
        if start == 0:
            yield encode_chunk(field, name, code, shape, piece)
        else:
            yield encode_chunk(field, "", 0, (), piece)


def join_chunks(chunks: Iterable[pb.TensorChunk | ChunkView]) -> list[tuple[str, npt.NDArray[Any]]]:
    """Named arrays from a stream of chunks, each filled into one preallocated buffer."""
    result: list[tuple[str, npt.NDArray[Any]]] = []
    name = ""
    dtype: np.dtype[Any] | None = None
    shape: tuple[int, ...] = ()
    buffer = np.empty(0, np.uint8)
    filled = 0
    for chunk in chunks:
        if chunk.dtype != pb.DTYPE_UNSPECIFIED:
            if dtype is not None:
                raise ValueError(f"server stream broke off inside tensor '{name}'")
            name, dtype, shape = chunk.name, _DTYPES[chunk.dtype], tuple(chunk.shape)
            buffer = np.empty(math.prod(shape) * dtype.itemsize, np.uint8)
            filled = 0
        data = chunk.data
        if data:
            buffer[filled:filled + len(data)] = np.frombuffer(data, np.uint8)
            filled += len(data)
        if dtype is not None and filled == buffer.size:
            result.append((name, buffer.view(dtype).reshape(shape)))
            dtype = None
    if dtype is not None:
        raise ValueError(f"server stream ended inside tensor '{name}'")
    return result


_PYTHON_SCALARS = frozenset(np.dtype(t) for t in (np.float64, np.int64, np.bool_, np.complex128))
"""0-dim dtypes that Python's own float, int, bool and complex hold exactly."""


def plain(array: npt.NDArray[Any]) -> Any:
    """0-dim arrays as Python scalars where those hold them exactly (a float64 count prints as 2.0, not
    np.float64(2.0)), else as numpy scalars, which keep their dtype (float32, float16, int8, ...);
    other arrays as they are."""
    if array.ndim != 0:
        return array
    return array.item() if array.dtype in _PYTHON_SCALARS else array[()]
