"""Torch tensors on the wire: the server's side of the shared codec `weightavg.wire`.

Dtype codes for torch, tensors split into chunks and pre-encoded stream messages, upload streams
decoded without copying, and chunks joined back into tensors with every size checked first.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message

from weightavg.wire import CHUNK_BYTES, chunk_field, decode_chunk_message, encode_tensor, string_fields
from weightavg.v1 import weightavg_pb2 as pb

from ..domain import dtypes
from ..domain.errors import InvalidArgument, ResourceExhausted

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("weightavg's wire format is little-endian; this host is not")

DTYPES: dict[pb.Dtype.ValueType, torch.dtype] = {
    pb.Dtype.Value(f"DTYPE_{name.upper()}"): dtype for name, dtype in dtypes.DTYPES.items()
}
"""Wire codes of the domain's dtypes: each enum value is named after the dtype (DTYPE_FLOAT32...)."""
CODES: dict[torch.dtype, pb.Dtype.ValueType] = {dtype: code for code, dtype in DTYPES.items()}
MAX_DIMS = 32


def torch_dtype(code: pb.Dtype.ValueType) -> torch.dtype:
    """The torch dtype for a wire code; InvalidArgument for unset or unknown codes."""
    try:
        return DTYPES[code]
    except KeyError:
        raise InvalidArgument(f"unsupported dtype code {code}; expected one of {sorted(DTYPES)}") from None


def dtype_code(dtype: torch.dtype) -> pb.Dtype.ValueType:
    """The wire code for a torch dtype; InvalidArgument for dtypes the wire cannot carry."""
    try:
        return CODES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot be sent over the wire") from None


def _raw(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes, row-major, on the CPU: a view where the tensor is already contiguous there."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.contiguous().view(torch.uint8).numpy().data


def encoded_chunks(
    named: Iterable[tuple[str, torch.Tensor]],
    chunk_bytes: int,
    message_type: type[Message] = pb.FetchTensorsResponse,
) -> Iterator[bytes]:
    """Pre-encoded `message_type` stream messages, each holding one TensorChunk of the named tensors."""
    field = chunk_field(message_type)
    for name, tensor in named:
        yield from encode_tensor(field, name, dtype_code(tensor.dtype), tensor.shape, _raw(tensor), chunk_bytes)


def serialize(message: Message | bytes) -> bytes:
    """A response serializer that passes pre-encoded messages through and serializes the rest."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def request_decoder(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer for an upload stream that leaves tensor data in the received bytes.

    The decoded request has the message's attributes (`chunk`, and its string fields such as
    `dictionary`), the chunk's data a memoryview, so TensorAssembler copies each byte once. Field
    numbers come from `message_type`'s descriptor. Requests it does not expect are parsed by
    protobuf as before.
    """
    chunk = chunk_field(message_type)
    strings = string_fields(message_type)

    def decode(message: bytes) -> Any:
        try:
            return SimpleNamespace(**decode_chunk_message(message, chunk, strings))
        except (ValueError, IndexError, UnicodeDecodeError):
            return message_type.FromString(message)

    return decode


def tensor_chunks(name: str, tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Split a tensor into chunks: a header chunk (name, dtype, shape, first bytes) then data chunks."""
    code = dtype_code(tensor.dtype)
    raw = _raw(tensor)
    yield pb.TensorChunk(name=name, dtype=code, shape=list(tensor.shape), data=raw[:chunk_bytes].tobytes())
    for start in range(chunk_bytes, len(raw), chunk_bytes):
        yield pb.TensorChunk(data=raw[start:start + chunk_bytes].tobytes())


def tensors_chunks(
    named: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Chunks for several named tensors, one after another."""
    for name, tensor in named:
        yield from tensor_chunks(name, tensor, chunk_bytes)


@dataclass
class _Pending:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: torch.Tensor
    """Flat uint8 storage from torch.empty: pages are only touched as data arrives, so a header
    that declares a big tensor and sends nothing costs address space, not memory."""
    filled: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())


class TensorAssembler:
    """Join streamed chunks into CPU tensors, checking sizes so bad streams fail before allocating much."""

    def __init__(self, max_bytes: int, on_header: Callable[[str, int], None] | None = None) -> None:
        """`on_header(name, nbytes)` runs for each tensor once its header is checked and before its
        buffer is allocated; it may raise (e.g. ResourceExhausted over a cap) to refuse the tensor."""
        self._max_bytes = max_bytes
        self._on_header = on_header
        self._total = 0
        self._pending: _Pending | None = None
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def feed(self, chunk: pb.TensorChunk) -> None:
        """Take one chunk; a chunk with a dtype starts a new tensor."""
        if chunk.dtype != pb.DTYPE_UNSPECIFIED:
            self._start(chunk)
        elif self._pending is None:
            if chunk.data:
                raise InvalidArgument("tensor data arrived before a header chunk (a chunk with name, dtype and shape)")
            return
        self._append(chunk.data)

    def finish(self) -> list[tuple[str, torch.Tensor]]:
        """All tensors received; InvalidArgument when the stream ended inside a tensor."""
        if self._pending is not None:
            p = self._pending
            raise InvalidArgument(
                f"stream ended inside tensor '{p.name}': got {p.filled} of {p.nbytes} bytes"
            )
        return self.tensors

    def _start(self, chunk: pb.TensorChunk) -> None:
        if self._pending is not None:
            p = self._pending
            raise InvalidArgument(f"tensor '{p.name}' ended early: got {p.filled} of {p.nbytes} bytes")
        dtype = torch_dtype(chunk.dtype)
        shape = tuple(int(d) for d in chunk.shape)
        if len(shape) > MAX_DIMS:
            raise InvalidArgument(f"tensor '{chunk.name}' has {len(shape)} dimensions; at most {MAX_DIMS}")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"tensor '{chunk.name}' has a negative dimension in shape {list(shape)}")
        if math.prod(max(d, 1) for d in shape) >= 2**63:
            # Even with no elements (a zero dimension), torch's strides must fit in int64.
            raise InvalidArgument(f"tensor '{chunk.name}' has a shape {list(shape)} whose strides overflow int64")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._total + nbytes > self._max_bytes:
            raise ResourceExhausted(
                f"tensor '{chunk.name}' of shape {list(shape)} needs {nbytes} bytes; "
                f"a request may carry at most {self._max_bytes} bytes of tensors"
            )
        if self._on_header is not None:
            self._on_header(chunk.name, nbytes)
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        except RuntimeError as exc:  # the CPU allocator's out-of-memory
            raise ResourceExhausted(f"tensor '{chunk.name}' of {nbytes} bytes: server out of memory") from exc
        self._total += nbytes
        self._pending = _Pending(chunk.name, dtype, shape, buffer)
        if nbytes == 0:
            self._complete()

    def _append(self, data: bytes | memoryview) -> None:
        p = self._pending
        if p is None or not data:
            return
        end = p.filled + len(data)
        if end > p.nbytes:
            raise InvalidArgument(
                f"tensor '{p.name}' of shape {list(p.shape)} and dtype {p.dtype} holds {p.nbytes} bytes; "
                f"received at least {end}"
            )
        p.buffer.numpy()[p.filled:end] = np.frombuffer(data, dtype=np.uint8)
        p.filled = end
        if end == p.nbytes:
            self._complete()

    def _complete(self) -> None:
        p = self._pending
        assert p is not None
        flat = p.buffer
        tensor = flat.view(p.dtype).reshape(p.shape)
        if p.dtype is torch.bool and bool((flat > 1).any()):
            raise InvalidArgument(f"tensor '{p.name}' is bool but holds bytes other than 0 and 1")
        self.tensors.append((p.name, tensor))
        self._pending = None


def assemble(
    chunks: Iterable[pb.TensorChunk], max_bytes: int, on_header: Callable[[str, int], None] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Join a whole stream of chunks into named CPU tensors (see TensorAssembler for `on_header`)."""
    assembler = TensorAssembler(max_bytes, on_header)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.finish()
