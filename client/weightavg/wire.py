"""The tensor wire codec that the weightavg client and server share.

A tensor travels as a stream of TensorChunk messages (docs/clients.md): a header chunk with name,
dtype, shape and the first bytes, then data chunks. This module maps numpy dtypes to the wire's
Dtype codes, splits arrays into chunks and joins chunks back into arrays, and encodes and decodes
the stream messages that carry a chunk by hand, so tensor data is copied once a side (docs/perf.md).
The server's `weightavg_server.transport.codec` builds its torch side on these functions.

Every stream it writes is declared (TensorChunk in the .proto): the first chunk says how many
tensors and bytes follow, and the chunk that completes each tensor carries its CRC32C, so a reader
can tell a stream cut short or corrupted from a whole one; `join_chunks` checks both.

Field numbers are read from the generated descriptors (`chunk_field`, `string_fields`), never
written as literals, so the codec always agrees with the stubs it ships with.

CRC32C comes from the `crc32c` package (hardware CRC instructions, about 11 GB/s on this project's
2-vCPU machines, and it releases the GIL for large buffers), so checking costs a few percent of a
transfer.
"""

from __future__ import annotations

import math
import operator
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import crc32c as _crc32c
import ml_dtypes
import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from ._errors import DataLossError
from .v1 import weightavg_pb2 as pb

__all__ = [
    "CHUNK_BYTES",
    "ChunkView",
    "Declared",
    "StreamCheck",
    "array_chunks",
    "checked_chunk_bytes",
    "chunk_field",
    "chunk_messages",
    "chunk_data_bytes",
    "crc32c",
    "declared",
    "decode_chunk_message",
    "decode_fetch_response",
    "encode_chunk",
    "encode_tensor",
    "encode_tensor_sized",
    "encoded_chunks",
    "join_chunks",
    "packed",
    "packed_sized",
    "packed_stream",
    "plain",
    "string_fields",
    "tensor_crc",
    "to_array",
    "torch_host_array",
    "unpacked",
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
_I32 = 5
"""Protobuf wire type of fixed32 fields (crc32c)."""
_NAME, _DTYPE, _SHAPE, _DATA, _COUNT, _TOTAL, _CRC, _PACKED = (
    pb.TensorChunk.DESCRIPTOR.fields_by_name[name].number
    for name in ("name", "dtype", "shape", "data", "tensor_count", "total_bytes", "crc32c", "packed")
)

PACK_BYTES = 1 << 20
"""At most this many bytes of messages (for chunks whose bytes lie in shared memory, the bytes they
stand for too) go into one message of chunks packed together (`packed`); a message as large goes
alone, as before. Each message of a gRPC stream costs a round of the transport (about 0.1-0.2 ms in Python
on this project's machines), so a model's many small tensors cost more in messages than in bytes;
1 MiB amortises that and stays far below any message cap."""

PACK_COUNT = 4096
"""At most this many chunks in one packed message, so a message of empty tensors stays small."""


def crc32c(data: bytes | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `value` (the CRC of the bytes before it)."""
    return int(_crc32c.crc32c(data, value))


def tensor_crc(name: str, code: int, shape: Sequence[int]) -> int:
    """The CRC32C of a tensor's header, to be continued over its data with `crc32c(data, value)`.

    The header is covered as the .proto says: the name's UTF-8 length (4 bytes little-endian), the
    name, the dtype code (4 bytes), the number of dimensions (4 bytes), each dimension (8 bytes,
    signed), so a checksum also catches a name, dtype or shape changed on the way.
    """
    raw = name.encode("utf-8")
    dims = [int(d) for d in shape]
    head = struct.pack(f"<I{len(raw)}sII{len(dims)}q", len(raw), raw, code & 0xFFFFFFFF, len(dims), *dims)
    return crc32c(head)


class Declared(NamedTuple):
    """What a chunk declares: a stream's tensor count and bytes (first chunk), a tensor's CRC32C
    (the chunk that completes it); None where the chunk does not say."""

    tensor_count: int | None
    total_bytes: int | None
    crc32c: int | None


def declared(chunk: pb.TensorChunk | ChunkView) -> Declared:
    """The declaration fields of a chunk, whether protobuf parsed it or `decode_chunk_message` did."""
    if isinstance(chunk, ChunkView):
        return Declared(chunk.tensor_count, chunk.total_bytes, chunk.crc32c)
    return Declared(
        chunk.tensor_count if chunk.HasField("tensor_count") else None,
        chunk.total_bytes if chunk.HasField("total_bytes") else None,
        chunk.crc32c if chunk.HasField("crc32c") else None,
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
    """A stream message's single string fields (handle ids such as `dictionary`, `request_id`), number to name.

    With `chunk_field` this is what `decode_chunk_message` needs to read the message by hand.
    """
    return {
        field.number: field.name
        for field in message_type.DESCRIPTOR.fields
        if field.type == field.TYPE_STRING and not field.is_repeated
    }


def entry_name(name: Any) -> str:
    """A tensor's name in a stream, checked: a string (a dictionary with other keys cannot be sent)
    with a UTF-8 form, as protobuf strings need (a lone surrogate has none)."""
    if not isinstance(name, str):
        raise TypeError(f"dictionary keys must be strings, not {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"name {name!r} is not valid UTF-8 (it holds a lone surrogate); use a name of text") from None
    return name


def torch_host_array(value: Any) -> npt.NDArray[Any]:
    """A torch tensor's values (any device) as a host array, bit for bit: detached, conjugate and
    negative views resolved, bfloat16 as ml_dtypes.bfloat16 (numpy has none, and np.asarray of a
    bfloat16 tensor fails, as it does for a tensor that requires grad such as an nn.Parameter).
    Uses the torch its caller loaded: the client never imports torch."""
    torch = sys.modules["torch"]
    if value.layout != torch.strided:  # .contiguous() failed: "unsupported memory format option Contiguous"
        raise TypeError(f"a tensor of layout {value.layout} cannot be sent; send t.to_dense()")
    host = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    if host.dtype == torch.bfloat16:
        bits: npt.NDArray[Any] = host.view(torch.int16).numpy()
        return bits.view(np.dtype(ml_dtypes.bfloat16))
    try:
        array: npt.NDArray[Any] = host.numpy()
    except TypeError:  # a dtype numpy lacks (float8, complex32...): named as to_array names the rest
        raise TypeError(f"dtype {value.dtype} cannot be sent; use one of {sorted(str(d) for d in _CODES)}") from None
    return array


def _is_torch_tensor(value: Any) -> bool:
    """Whether `value` is a torch tensor (an nn.Parameter too), told without importing torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_array(value: Any) -> npt.NDArray[Any]:
    """A contiguous little-endian array for a value: arrays as they are, Python ints int64, floats
    float64, torch tensors (on any device) bit for bit (`torch_host_array`). A masked array with
    masked entries is a TypeError: the wire carries no mask."""
    if isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value):
        # np.asarray drops the mask: the values under it went as if they were data (found by review).
        raise TypeError(
            "a masked array with masked entries cannot be sent (the wire has no mask); send "
            "value.filled(fill_value) with the value that stands for a missing entry"
        )
    array = torch_host_array(value) if _is_torch_tensor(value) else np.asarray(value)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _CODES:
        hint = (
            " (numpy made an object array: a Python int past int64, values of mixed types, or rows of different "
            "lengths; give an array of one numeric dtype)" if array.dtype == np.dtype(object) else ""
        )
        raise TypeError(f"dtype {array.dtype} cannot be sent{hint}; use one of {sorted(str(d) for d in _CODES)}")
    return array if array.flags.c_contiguous else array.copy(order="C")


def array_chunks(name: str, value: Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Chunks for one array, a declared stream of one tensor: a header chunk with name, dtype, shape,
    the declaration and the first bytes, then data; the last chunk carries the CRC32C."""
    array = to_array(value)
    raw = array.reshape(-1).view(np.uint8).data  # a memoryview: slicing copies nothing
    yield from chunk_messages(name, _CODES[array.dtype], array.shape, raw, chunk_bytes, declare=(1, len(raw)))


def chunk_messages(
    name: str, code: int, shape: Sequence[int], raw: memoryview, chunk_bytes: int, *,
    declare: tuple[int, int] | None = None,
) -> Iterator[pb.TensorChunk]:
    """One tensor's chunks as TensorChunk messages, as `encode_tensor` encodes them: the header
    (with `declare`, the stream's tensor count and bytes, on a stream's first tensor) and the first
    bytes, then data; the last carries the CRC32C."""
    for piece in _pieces(name, code, shape, raw, chunk_bytes, declare):
        chunk = pb.TensorChunk(name=piece.name, dtype=piece.code, shape=list(piece.shape), data=piece.data.tobytes())  # type: ignore[arg-type]
        if piece.declare is not None:
            chunk.tensor_count, chunk.total_bytes = piece.declare
        if piece.crc is not None:
            chunk.crc32c = piece.crc
        yield chunk


@dataclass(frozen=True)
class ChunkView:
    """A TensorChunk decoded without copying its data: `data` is a view into the received message."""

    name: str
    dtype: pb.Dtype.ValueType
    shape: tuple[int, ...]
    data: memoryview
    tensor_count: int | None = None
    total_bytes: int | None = None
    crc32c: int | None = None
    packed: tuple[ChunkView, ...] = ()
    """The further chunks this message carries (TensorChunk.packed), in order."""


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


def _signed(value: int, bits: int = 64) -> int:
    """An int64 (or, with bits=32, an int32 or enum) read as an unsigned varint, back to its sign,
    as protobuf reads it: protobuf writes negatives in 10 bytes, and keeps the low `bits` bits of a
    varint (so a dtype of 2**32 + 1 is 1, and one of -1 is -1, as every other RPC's decoder reads it)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _decode_chunk(raw: memoryview, nested: bool = False) -> ChunkView:
    """A serialized TensorChunk's fields; ValueError on anything else, so the caller can fall back to
    protobuf. Packed chunks are read one level deep (`nested`): deeper ones, which the .proto
    forbids, go to protobuf, whose depth limit bounds the recursion a crafted message could ask."""
    name, dtype, shape, data = "", pb.Dtype.ValueType(0), [], memoryview(b"")
    count: int | None = None
    total: int | None = None
    crc: int | None = None
    packed: list[ChunkView] = []
    i, end = 0, len(raw)
    while i < end:
        key, i = _read_varint(raw, i)
        field, kind = key >> 3, key & 7
        if kind == _LEN and field == _PACKED and not nested:
            body, i = _read_bytes(raw, i)
            packed.append(_decode_chunk(body, nested=True))
        elif kind == _VARINT and field in (_DTYPE, _SHAPE, _COUNT, _TOTAL):
            value, i = _read_varint(raw, i)
            if field == _DTYPE:
                dtype = pb.Dtype.ValueType(_signed(value, 32))
            elif field == _SHAPE:
                shape.append(_signed(value))
            elif field == _COUNT:
                count = _signed(value)
            else:
                total = _signed(value)
        elif kind == _I32 and field == _CRC:
            if i + 4 > end:
                raise ValueError("truncated field")
            crc = int.from_bytes(raw[i:i + 4], "little")
            i += 4
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
    return ChunkView(name, dtype, tuple(shape), data, count, total, crc, tuple(packed))


def unpacked(
    chunks: Iterable[pb.TensorChunk | ChunkView], error: type[Exception]
) -> Iterator[pb.TensorChunk | ChunkView]:
    """Every chunk of a stream in order: each message's chunk, then the chunks packed after it
    (TensorChunk.packed), as if each had come in a message of its own. `error(message)` for a
    packed chunk that packs chunks of its own (the .proto forbids it)."""
    for chunk in chunks:
        yield chunk
        for inner in chunk.packed:
            if inner.packed:
                raise error(
                    "a packed chunk (TensorChunk.packed) carries packed chunks of its own: put every chunk of a "
                    "message in its first chunk's packed list"
                )
            yield inner


def chunk_data_bytes(chunk: pb.TensorChunk | ChunkView) -> int:
    """Tensor bytes one message's chunk carries, its packed chunks' included."""
    return len(chunk.data) + sum(len(inner.data) for inner in chunk.packed)


def packed(messages: Iterable[tuple[bytes, int]], budget: int = PACK_BYTES) -> Iterator[bytes]:
    """Stream messages with small chunks packed together (TensorChunk.packed), in order.

    `messages` are (encoded message, bytes it stands for) pairs, each message holding one chunk in
    the same field and nothing else (as `encode_chunk` and the shared-memory headers make them); the
    bytes are its data, or the message's own size for a header whose bytes lie in shared memory
    (they are all in the region before the first message goes: `_shm.Writing`). Consecutive
    messages go into one while they stand for at most `budget` bytes together and number at most
    `PACK_COUNT`; a message alone is passed on unchanged (a large chunk is not copied again).
    """
    for message, _ in packed_sized(((message, nbytes, 0) for message, nbytes in messages), budget):
        yield message


def packed_sized(messages: Iterable[tuple[bytes, int, int]], budget: int = PACK_BYTES) -> Iterator[tuple[bytes, int]]:
    """`packed` for (message, bytes it stands for, a size to add up) triples: each packed message
    with the sum of its messages' sizes (a server counts the tensor bytes it sends so, without
    parsing its own messages again)."""
    group: list[bytes] = []
    weight = size = 0
    for message, nbytes, n in messages:
        if group and (weight + nbytes > budget or len(group) >= PACK_COUNT):
            yield _joined(group), size
            group, weight, size = [], 0, 0
        group.append(message)
        weight += nbytes
        size += n
    if group:
        yield _joined(group), size


def packed_stream(messages: Iterable[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Encoded stream messages (`encode_tensor`'s) packed as `packed` does, each message standing
    for its own size, in messages of at most `PACK_BYTES` and `chunk_bytes` (the sender's own
    bound on a message, which the receiver's cap allows)."""
    return packed(((message, len(message)) for message in messages), min(PACK_BYTES, chunk_bytes))


def _joined(group: list[bytes]) -> bytes:
    """One message whose chunk is the first message's, the others' chunks packed after it."""
    if len(group) == 1:
        return group[0]
    raw = memoryview(group[0])
    key, i = _read_varint(raw, 0)
    first, _ = _read_bytes(raw, i)
    tag = _varint(_PACKED << 3 | _LEN)
    parts: list[bytes | memoryview] = [first]
    for message in group[1:]:
        view = memoryview(message)
        _, j = _read_varint(view, 0)
        inner, _ = _read_bytes(view, j)
        parts += (tag, _varint(len(inner)), inner)
    body = b"".join(parts)
    return b"".join((_varint(key), _varint(len(body)), body))


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


_FETCH_ETAG_FIELD = pb.FetchTensorsResponse.DESCRIPTOR.fields_by_name["etag"].number


def decode_fetch_response_with_etag(message: bytes) -> tuple[ChunkView | pb.TensorChunk, str]:
    """`decode_fetch_response`, with the etag the first message carries when the fetch asked for it
    (FetchTensorsRequest.with_etag; "" on the other messages)."""
    try:
        fields = decode_chunk_message(message, _FETCH_CHUNK_FIELD, {_FETCH_ETAG_FIELD: "etag"})
        return fields["chunk"], str(fields.get("etag", ""))
    except (ValueError, IndexError, UnicodeDecodeError, KeyError):
        parsed = pb.FetchTensorsResponse.FromString(message)
        return parsed.chunk, parsed.etag


def _varint(n: int) -> bytes:
    """The varint encoding of a non-negative int."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def encode_chunk(
    field: int, name: str, code: int, shape: Iterable[int], data: memoryview, *,
    tensor_count: int | None = None, total_bytes: int | None = None, crc: int | None = None,
) -> bytes:
    """The protobuf encoding of a message whose field `field` is this TensorChunk, built with one copy.

    The result is byte for byte what SerializeToString gives for the same message (fields in number
    order, proto3 defaults left out, the declaration fields after the data), so peers decode it as
    usual. Going through protobuf instead copies the data three times (tobytes, the field set, the
    serialization); on a 2-core machine those copies, not the transport, bounded a 256 MB transfer
    (docs/perf.md).
    """
    header = pb.TensorChunk(name=name, dtype=code, shape=list(shape)).SerializeToString()  # type: ignore[arg-type]
    trailer = pb.TensorChunk(tensor_count=tensor_count, total_bytes=total_bytes, crc32c=crc).SerializeToString()
    size = len(data)
    data_prefix = _varint(_DATA << 3 | _LEN) + _varint(size) if size else b""
    inner = len(header) + len(data_prefix) + size + len(trailer)
    return b"".join((_varint(field << 3 | _LEN), _varint(inner), header, data_prefix, data, trailer))


def encoded_chunks(values: Iterable[tuple[str, Any]], chunk_bytes: int, message_type: type[Message]) -> Iterator[bytes]:
    """Serialized `message_type` stream messages, each holding one TensorChunk of the named arrays,
    as one declared stream (a stream of no array is one chunk that declares so).

    Only the chunk field is set; a stream whose first message names a handle sends that first.
    """
    field = chunk_field(message_type)
    arrays = [(name, to_array(value)) for name, value in values]
    raws = [array.reshape(-1).view(np.uint8).data for _, array in arrays]
    declare: tuple[int, int] | None = (len(arrays), sum(len(raw) for raw in raws))
    if not arrays:
        yield encode_chunk(field, "", 0, (), memoryview(b""), tensor_count=0, total_bytes=0)
    for (name, array), raw in zip(arrays, raws):
        yield from encode_tensor(field, name, _CODES[array.dtype], array.shape, raw, chunk_bytes, declare=declare)
        declare = None


def encode_tensor(
    field: int, name: str, code: int, shape: Sequence[int], raw: memoryview, chunk_bytes: int, *,
    declare: tuple[int, int] | None = None,
) -> Iterator[bytes]:
    """One tensor's stream messages (its chunk in `field`): a header chunk with the first bytes, then
    data chunks, each at most `chunk_bytes` of `raw` (its row-major little-endian bytes); the last
    carries the tensor's CRC32C. `declare` (tensor count, total bytes) goes on the header of a
    stream's first tensor."""
    for message, _ in encode_tensor_sized(field, name, code, shape, raw, chunk_bytes, declare=declare):
        yield message


def encode_tensor_sized(
    field: int, name: str, code: int, shape: Sequence[int], raw: memoryview, chunk_bytes: int, *,
    declare: tuple[int, int] | None = None,
) -> Iterator[tuple[bytes, int]]:
    """`encode_tensor`'s messages, each with the tensor bytes it carries."""
    for p in _pieces(name, code, shape, raw, chunk_bytes, declare):
        count, total = p.declare if p.declare is not None else (None, None)
        yield encode_chunk(field, p.name, p.code, p.shape, p.data, tensor_count=count, total_bytes=total, crc=p.crc), len(p.data)


class _Piece(NamedTuple):
    name: str
    code: int
    shape: Sequence[int]
    data: memoryview
    declare: tuple[int, int] | None
    crc: int | None


def checked_chunk_bytes(chunk_bytes: int) -> int:
    """`chunk_bytes` if it is a whole number of bytes above 0; ValueError otherwise. A size of 0 or
    less failed inside gRPC's request thread (UNKNOWN "Exception iterating requests!"), or, below 0,
    sent no chunk of a tensor at all: a dictionary was created without it, and no error."""
    try:
        n = operator.index(chunk_bytes)  # an int, or a numpy integer; not a float or a bool
    except TypeError:
        n = 0
    if isinstance(chunk_bytes, bool) or n <= 0:
        raise ValueError(f"chunk_bytes must be a whole number of bytes above 0, e.g. {CHUNK_BYTES}; got {chunk_bytes!r}")
    return n


_HEADER_ROOM = 512
"""Bytes of name and shape a header chunk may add to a full chunk of data. A header longer than this
(a long entry name) goes alone, its data in the chunks after it, so that no message of a stream is
more than chunk_bytes plus _HEADER_ROOM (plus a few bytes of framing) or its header alone: a peer
whose message cap fits its chunks also takes a tensor of a long name (before, its header and first
chunk together went over the cap: uploaded, RESOURCE_EXHAUSTED; stored, never fetched). It and the
framing stay within the 1024 bytes of room that client and server keep in their message caps
(CHUNK_HEADER_ROOM): at 4 KiB, a name of 3,000 bytes with a full chunk still went over a cap that
kept exactly that room (RESOURCE_EXHAUSTED "Sent message larger than max", on either side)."""


def _header_bytes(name: str, shape: Sequence[int]) -> int:
    """At most how many bytes a header's name and shape take in a TensorChunk (varints of 10 bytes)."""
    return len(name.encode("utf-8")) + 10 * len(shape)


def _pieces(
    name: str, code: int, shape: Sequence[int], raw: memoryview, chunk_bytes: int, declare: tuple[int, int] | None
) -> Iterator[_Piece]:
    """A tensor's chunks as fields: the header (with `declare`) first, with the first bytes unless
    it is over _HEADER_ROOM; the CRC32C, worked out piece by piece while each is hot in cache, on the
    last."""
    checked_chunk_bytes(chunk_bytes)
    crc = tensor_crc(name, code, shape)
    size = len(raw)
    if size and _header_bytes(name, shape) > _HEADER_ROOM:
        yield _Piece(name, code, shape, raw[:0], declare, None)
        name, code, shape, declare = "", 0, (), None
    for start in range(0, max(size, 1), chunk_bytes):
        piece = raw[start:start + chunk_bytes]
        crc = crc32c(piece, crc)
        last = start + chunk_bytes >= size
        yield _Piece(name, code, shape, piece, declare, crc if last else None)
        name, code, shape, declare = "", 0, (), None


class StreamCheck:
    """Checks a stream of chunks against its declaration as it is read: the count and bytes its
    first chunk declared, and each tensor's CRC32C. Streams without a declaration (older peers)
    pass, their checksums checked where present.

    The caller feeds each chunk's `Declared` fields: `first` before the stream's first tensor,
    `header` at each tensor's header, `data` with each piece of data, `completed` when a tensor's
    bytes are all in, and `finish` at the end. Failures raise `error(message)` for a stream that
    is short, long or inconsistent, and `mismatch(message)` for a checksum that does not match.
    """

    def __init__(self, error: type[Exception], mismatch: type[Exception]) -> None:
        self._error = error
        self._mismatch = mismatch
        self.count: int | None = None
        self.total: int | None = None
        self.tensors = 0
        self.nbytes = 0
        self.started = False
        self._crc: int | None = None

    def chunk(self, d: Declared) -> None:
        """Every chunk passes here first: a declaration is allowed only before anything else (chunks
        that carry nothing at all, such as the first message of a stream that names its target, do
        not count)."""
        if d.tensor_count is not None or d.total_bytes is not None:
            if self.started:
                raise self._error("a stream declares its tensor count and bytes on its first chunk only")
            if d.tensor_count is None or d.total_bytes is None or d.tensor_count < 0 or d.total_bytes < 0:
                raise self._error(
                    f"a stream's declaration needs both tensor_count and total_bytes, not negative "
                    f"(got {d.tensor_count} and {d.total_bytes})"
                )
            self.count, self.total = d.tensor_count, d.total_bytes
            self.started = True

    @property
    def is_declared(self) -> bool:
        return self.count is not None

    def header(self, name: str, code: int, shape: Sequence[int], nbytes: int) -> None:
        """A tensor starts: it must fit the declaration."""
        if self.count is not None and self.total is not None:
            if self.tensors + 1 > self.count:
                raise self._error(f"the stream declared {self.count} tensor(s) but carries more (tensor '{name}')")
            if self.nbytes + nbytes > self.total:
                raise self._error(
                    f"the stream declared {self.total} bytes but tensor '{name}' brings it to {self.nbytes + nbytes}"
                )
        self._crc = tensor_crc(name, code, shape) if self.count is not None else None
        self.started = True

    def data(self, data: bytes | memoryview) -> None:
        self.started = True
        if self._crc is not None:
            self._crc = crc32c(data, self._crc)

    def completed(
        self, name: str, nbytes: int, crc: int | None, whole: Callable[[], int] | None = None, *, shared: bool = False
    ) -> None:
        """A tensor's bytes are all in; `whole()` works out its CRC32C afterwards for an undeclared
        stream that carries one anyway. A tensor whose bytes came through shared memory (`shared`)
        carries no CRC32C: no network moved them."""
        self.tensors += 1
        self.nbytes += nbytes
        if shared:
            return
        if crc is None:
            if self.count is not None:
                raise self._error(f"tensor '{name}' of a declared stream carries no crc32c on its last chunk")
            return
        computed = self._crc if self._crc is not None else (whole() if whole is not None else None)
        if computed is not None and computed != crc:
            raise self._mismatch(
                f"tensor '{name}' arrived corrupted: its CRC32C is {computed:#010x}, the sender's {crc:#010x}"
            )

    def stray_crc(self) -> None:
        raise self._error("crc32c belongs on the chunk that completes a tensor")

    def finish(self) -> None:
        """The stream ended: it must have carried what it declared."""
        if self.count is not None and (self.tensors, self.nbytes) != (self.count, self.total):
            raise self._error(
                f"the stream ended after {self.tensors} of {self.count} declared tensor(s) "
                f"({self.nbytes} of {self.total} bytes): it was cut short"
            )


def join_chunks(chunks: Iterable[pb.TensorChunk | ChunkView]) -> list[tuple[str, npt.NDArray[Any]]]:
    """Named arrays from a stream of chunks, each filled into one preallocated buffer.

    A declared stream (every weightavg server's) is checked as it is read: DataLossError when a
    tensor's CRC32C does not match or the stream carries other than it declared, and for a stream
    cut or garbled in ways that stop it being read (it ends or a header comes inside a tensor, a
    header names a dtype code or shape no tensor has), as docs/clients.md promises.
    """
    check = StreamCheck(DataLossError, DataLossError)
    result: list[tuple[str, npt.NDArray[Any]]] = []
    name = ""
    code = 0
    dtype: np.dtype[Any] | None = None
    shape: tuple[int, ...] = ()
    buffer = np.empty(0, np.uint8)
    filled = 0
    for chunk in unpacked(chunks, DataLossError):
        d = declared(chunk)
        check.chunk(d)
        if chunk.dtype != pb.DTYPE_UNSPECIFIED:
            if dtype is not None:
                raise DataLossError(
                    f"the server's stream broke off inside tensor '{name}' ({filled} of {buffer.size} bytes): "
                    "it was cut or corrupted on the way"
                )
            if chunk.dtype not in _DTYPES or any(n < 0 for n in chunk.shape):
                raise DataLossError(
                    f"the server's stream has tensor '{chunk.name}' of dtype code {chunk.dtype} and shape "
                    f"{list(chunk.shape)}, which no tensor of this client has: corrupted on the way, or from a "
                    "server newer than this client"
                )
            name, code, dtype, shape = chunk.name, chunk.dtype, _DTYPES[chunk.dtype], tuple(chunk.shape)
            nbytes = math.prod(shape) * dtype.itemsize
            check.header(name, chunk.dtype, shape, nbytes)  # before allocating what a garbled shape may ask
            buffer = np.empty(nbytes, np.uint8)
            filled = 0
        data = chunk.data
        if data:
            if dtype is None or filled + len(data) > buffer.size:
                raise DataLossError(f"server stream carries more bytes than tensor '{name}' holds")
            buffer[filled:filled + len(data)] = np.frombuffer(data, np.uint8)
            check.data(data)
            filled += len(data)
        if dtype is not None and filled == buffer.size:
            done, header = buffer, tensor_crc(name, code, shape)
            check.completed(name, done.size, d.crc32c, lambda: crc32c(done.data, header))
            result.append((name, buffer.view(dtype).reshape(shape)))
            dtype = None
        elif d.crc32c is not None:
            check.stray_crc()
    if dtype is not None:
        raise DataLossError(
            f"the server's stream ended inside tensor '{name}' ({filled} of {buffer.size} bytes): it was cut on the way"
        )
    check.finish()
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
