"""Torch tensors on the wire: the server's side of the shared codec `weightavg.wire`.

Dtype codes for torch, tensors split into chunks and pre-encoded stream messages, upload streams
decoded without copying, and chunks joined back into tensors with every size checked first. Every
stream sent is declared (count, bytes, a CRC32C per tensor; see TensorChunk in the .proto), and an
upload that declares itself is refused unless it arrives whole and intact.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from google.protobuf.message import Message

from weightavg.wire import (
    CHUNK_BYTES, PACK_BYTES, ChunkView, StreamCheck, chunk_field, chunk_messages, crc32c, declared, decode_chunk_message,
    encode_chunk, encode_tensor_sized, packed_sized, string_fields, tensor_crc,
)
from weightavg.v1 import weightavg_pb2 as pb

from ..domain import dtypes, hostcache, native, shm
from ..domain.errors import DataLoss, InvalidArgument, ResourceExhausted
from ..domain.shapes import checked_shape

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("weightavg's wire format is little-endian; this host is not")

DTYPES: dict[pb.Dtype.ValueType, torch.dtype] = {
    pb.Dtype.Value(f"DTYPE_{name.upper()}"): dtype for name, dtype in dtypes.DTYPES.items()
}
"""Wire codes of the domain's dtypes: each enum value is named after the dtype (DTYPE_FLOAT32...)."""
CODES: dict[torch.dtype, pb.Dtype.ValueType] = {dtype: code for code, dtype in DTYPES.items()}


def torch_dtype(code: pb.Dtype.ValueType) -> torch.dtype:
    """The torch dtype for a wire code; InvalidArgument for unset or unknown codes."""
    try:
        return DTYPES[code]
    except KeyError:
        known = ", ".join(f"{pb.Dtype.Name(c)} ({c})" for c in sorted(DTYPES))
        raise InvalidArgument(f"unsupported dtype code {code}: set dtype to one of {known}") from None


def dtype_code(dtype: torch.dtype) -> pb.Dtype.ValueType:
    """The wire code for a torch dtype; InvalidArgument for dtypes the wire cannot carry."""
    try:
        return CODES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtypes.name(dtype)} cannot be sent over the wire") from None


def _raw(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes, row-major, on the CPU: a view where the tensor is already contiguous there."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.contiguous().view(torch.uint8).numpy().data


class Encoded(NamedTuple):
    """A pre-encoded reply message and the tensor bytes it carries (what the statistics count as
    sent, known here without parsing the message again)."""

    message: bytes
    data_bytes: int


def encoded_chunks(
    named: Sequence[tuple[str, torch.Tensor]],
    chunk_bytes: int,
    message_type: type[Message] = pb.FetchTensorsResponse,
    *,
    pack: bool = False,
    lead: bytes = b"",
) -> Iterator[Encoded]:
    """Pre-encoded `message_type` stream messages, each holding one TensorChunk of the named tensors,
    as one declared stream (its first chunk says how many tensors and bytes; each tensor's last
    chunk carries its CRC32C). With `pack`, small chunks share messages (TensorChunk.packed), at
    most `PACK_BYTES` and `chunk_bytes` of messages together. `lead`, other fields of the message
    type encoded (a fetch's etag), goes before the first message's chunk: a protobuf parser merges
    them into that message."""
    messages = _encoded(named, chunk_bytes, chunk_field(message_type))
    if pack:
        triples = ((message, len(message), n) for message, n in messages)
        messages = packed_sized(triples, min(PACK_BYTES, chunk_bytes))
    if lead:
        messages = _led(lead, messages)
    yield from (Encoded(message, n) for message, n in messages)


def _led(lead: bytes, messages: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """`messages` with `lead` before the first (a copy of that message: one chunk at most), once they
    are packed (packing reads each message's chunk field first)."""
    first = next(messages, None)
    if first is not None:
        yield lead + first[0], first[1]
    yield from messages


def _encoded(named: Sequence[tuple[str, torch.Tensor]], chunk_bytes: int, field: int) -> Iterator[tuple[bytes, int]]:
    raws = [_raw(tensor) for _, tensor in named]
    declare: tuple[int, int] | None = (len(raws), sum(len(raw) for raw in raws))
    if not raws:
        yield encode_chunk(field, "", 0, (), memoryview(b""), tensor_count=0, total_bytes=0), 0
    for (name, tensor), raw in zip(named, raws):
        yield from encode_tensor_sized(
            field, name, dtype_code(tensor.dtype), tensor.shape, raw, chunk_bytes, declare=declare
        )
        declare = None


def serialize(message: Message | Encoded | bytes) -> bytes:
    """A response serializer that passes pre-encoded messages through and serializes the rest."""
    if isinstance(message, Encoded):
        return message.message
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


def tensors_chunks(
    named: Sequence[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Chunks for several named tensors, one after another, as one declared stream."""
    raws = [_raw(tensor) for _, tensor in named]
    declare: tuple[int, int] | None = (len(raws), sum(len(raw) for raw in raws))
    if not raws:
        yield pb.TensorChunk(tensor_count=0, total_bytes=0)
    for (name, tensor), raw in zip(named, raws):
        yield from chunk_messages(name, dtype_code(tensor.dtype), tensor.shape, raw, chunk_bytes, declare=declare)
        declare = None


@dataclass
class _Pending:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: torch.Tensor
    """Flat uint8 storage (`hostcache.empty`: a kept block, or a new one whose pages are only
    touched as data arrives, so a header that declares a big tensor and sends nothing costs
    address space, not memory)."""
    filled: int = 0
    code: int = 0
    """The dtype's wire code, which the tensor's CRC32C covers."""

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())


def _new_buffer(nbytes: int) -> torch.Tensor:
    return hostcache.empty(nbytes)


class _Arena:
    """One buffer of exactly the bytes a declared stream declared, for its tensors back to back (a
    dictionary's entries on a CPU server: `Service.upload_arena`).

    Each tensor starts at an offset its element size divides (torch views a dtype only there). They
    go in from the front in order, so tensors of one dtype lie back to back and averages and merges
    over them run over spans; one-byte tensors (bool masks, int8) go in from the back, where they fit
    at any offset and leave the front's offsets as its wider tensors keep them (a bool mask of odd
    length first no longer leaves every float32 after it unaligned). A tensor that fits neither way
    unpadded is padded out of the room the tensors that went apart left, never out of the room of
    those still to come (`spot`); one that fits no way gets a buffer of its own.

    The tensors in it are views of the whole buffer, which the store charges whole: the stream
    reserved exactly that (the declared bytes with its first tensor, each tensor apart with its own),
    and the buffer is held whole while any of them lives. Where every tensor went in unpadded (any
    dictionary of one element size, one-byte tensors beside any other) it is exactly their bytes, as
    separate tensors or a restored snapshot are charged; where some went apart, its tail unused is
    charged too (a restored snapshot holds less).

    Why: tensors received one by one were each an allocation of their own, under 1 MiB on 4 KiB
    pages: a merge of 8 uploaded dictionaries of 160 entries took 30 ms where the same values in
    flat copies took 22 (the weighted sum's nine streams over 4 KiB pages; docs/perf.md). Rebased
    onto a storage of the bytes in use, the entries left the buffer's unused tail held uncharged (a
    bool mask then float32 weights: about twice the charge), and with nothing padded one odd-sized
    float16 first sent every float32 after it apart (both found by review)."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.front = 0
        """Where the next tensor from the front may start."""
        self.back = int(buffer.numel())
        """Where the last tensor from the back ends."""

    def spot(self, nbytes: int, size: int, to_come: int) -> tuple[int, bool] | None:
        """Where a tensor of nbytes and element size `size` goes, leaving room for the `to_come`
        declared bytes of the tensors after it: (start, whether from the back), or None where it
        does not fit. Unpadded before padded, then the side its size prefers, then the smaller pad."""
        front = _aligned(self.front, size)
        back = (self.back - nbytes) // size * size
        spots = []
        if front + nbytes + to_come <= self.back:
            spots.append((front - self.front, size == 1, front, False))
        if back >= self.front + to_come:
            spots.append((self.back - nbytes - back, size != 1, back, True))
        if not spots:
            return None
        _, _, start, at_back = min(spots)
        return start, at_back

    def take(self, start: int, nbytes: int, at_back: bool) -> torch.Tensor:
        """The bytes of a tensor at a `spot`."""
        if at_back:
            self.back = start
        else:
            self.front = start + nbytes
        return self.buffer[start:start + nbytes]


def _aligned(offset: int, size: int) -> int:
    """The first offset from `offset` on that `size` divides."""
    return -(-offset // size) * size


class TensorAssembler:
    """Join streamed chunks into tensors (CPU ones, or on the device when their bytes lie in a region
    that reaches it: a CUDA region's own device, or a locked host region's), checking sizes so bad
    streams fail before allocating much.

    A declared stream (TensorChunk in the .proto) must carry exactly the tensors and bytes it
    declared, each with a matching CRC32C: InvalidArgument for a stream short, long or without its
    checksums, DataLoss for a checksum that does not match. Undeclared streams (older clients) are
    taken as before, a checksum they carry still checked.
    """

    def __init__(
        self, max_bytes: int, on_header: Callable[[str, int], torch.device | None] | None = None,
        regions: Callable[[str], shm.Region] | None = None,
        allocate: Callable[[int], torch.Tensor] | None = None,
        arena: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        """`on_header(name, nbytes)` runs for each tensor once its header is checked and before its
        buffer is allocated; it may raise (e.g. ResourceExhausted over a cap) to refuse the tensor,
        and returns the device the tensor will be held on (or None). `regions(name)` finds the
        caller's shared memory region for a header chunk whose bytes lie in one
        (TensorChunk.shared); without it such a chunk is refused. `allocate(nbytes)` gives each
        tensor's CPU uint8 buffer (a CUDA server's pinned staging); by default a new one. A tensor
        whose bytes lie in a region that reaches the device on_header names (shm.Region.reaches) is
        received on that device, its copy queued and waited for once, in `finish`.

        `arena(nbytes)`, where given (a CPU server), gives one CPU uint8 buffer for the tensors of a
        declared stream of two or more, reserved whole (the declared bytes) with the first tensor's
        header: they lie in it back to back (`_Arena`), so averages and merges over an uploaded
        dictionary run over spans, as over `copyparms`' flat copies."""
        self._max_bytes = max_bytes
        self._on_header = on_header
        self._regions = _remembered(regions) if regions is not None else None
        self._allocate = allocate if allocate is not None else _new_buffer
        self._new_arena = arena
        self._arena: _Arena | None = None
        self._unsettled: dict[int, shm.Region] = {}
        self._copies: list[tuple[shm.Region, int, torch.Tensor]] = []
        """Copies out of host regions, made together when the stream ends (`shm.copy_out`)."""
        self._bools: list[tuple[str, torch.Tensor]] = []
        """Bool tensors among them, checked once copied."""
        self._total = 0
        self._pending: _Pending | None = None
        self._check = StreamCheck(InvalidArgument, DataLoss)
        self.tensors: list[tuple[str, torch.Tensor]] = []

    @property
    def declared(self) -> bool:
        """Whether the stream declared what it carries (so `finish` knows whether it arrived whole)."""
        return self._check.is_declared

    def feed(self, chunk: pb.TensorChunk | ChunkView) -> None:
        """Take one chunk; a chunk with a dtype starts a new tensor."""
        d = declared(chunk)
        self._check.chunk(d)
        if d.total_bytes is not None and d.total_bytes > self._max_bytes:
            raise ResourceExhausted(
                f"the stream declares {d.total_bytes} bytes of tensors; a request may carry at most {self._max_bytes} bytes "
                "of tensors (--max-upload-bytes)"
            )
        if isinstance(chunk, pb.TensorChunk) and chunk.HasField("shared"):  # ChunkView: protobuf parses these
            self._shared(chunk, d.crc32c)
            return
        if chunk.dtype != pb.DTYPE_UNSPECIFIED:
            self._start(chunk)
        elif self._pending is None:
            if chunk.data:
                raise InvalidArgument("tensor data arrived before a header chunk (a chunk with name, dtype and shape)")
            if d.crc32c is not None:
                self._check.stray_crc()
            return
        self._append(chunk.data, d.crc32c)

    def finish(self) -> list[tuple[str, torch.Tensor]]:
        """All tensors received; InvalidArgument when the stream ended inside a tensor, or short of
        what it declared."""
        if self._pending is not None:
            p = self._pending
            raise InvalidArgument(
                f"stream ended inside tensor '{p.name}': got {p.filled} of {p.nbytes} bytes"
            )
        self._check.finish()
        self._copy_out()
        for region in self._unsettled.values():
            region.settle()  # copies queued out of the region to the device: done before the call answers
        self._arena = None
        return self.tensors

    def _start(self, chunk: pb.TensorChunk | ChunkView, region: shm.Region | None = None) -> None:
        if self._pending is not None:
            p = self._pending
            raise InvalidArgument(f"tensor '{p.name}' ended early: got {p.filled} of {p.nbytes} bytes")
        dtype = torch_dtype(chunk.dtype)
        size = dtype.itemsize
        shape = checked_shape(chunk.name, chunk.shape, size)
        nbytes = math.prod(shape) * size
        if self._total + nbytes > self._max_bytes:
            raise ResourceExhausted(
                f"tensor '{chunk.name}' of shape {list(shape)} needs {nbytes} bytes; "
                f"a request may carry at most {self._max_bytes} bytes of tensors"
            )
        self._check.header(chunk.name, chunk.dtype, shape, nbytes)
        opens_arena = self._arena is None and not self.tensors and self._arena_fits()
        to_come = (self._check.total or 0) - self._total - nbytes  # declared bytes of the tensors after it
        spot = self._arena.spot(nbytes, size, to_come) if self._arena is not None else None
        # An arena is reserved whole with its first tensor (the declared bytes); a tensor apart on its own.
        reserved = (self._check.total or 0) if opens_arena else 0 if spot is not None else nbytes
        held_on = self._on_header(chunk.name, reserved) if self._on_header is not None else None
        try:
            if region is not None and held_on is not None and region.reaches(held_on):  # indexed devices both
                buffer = torch.empty(nbytes, dtype=torch.uint8, device=held_on)
            elif opens_arena or spot is not None:
                if opens_arena:
                    assert self._new_arena is not None and self._check.total is not None
                    self._arena = _Arena(self._new_arena(self._check.total))
                    spot = self._arena.spot(nbytes, size, to_come)  # the first: it always fits
                assert self._arena is not None and spot is not None
                buffer = self._arena.take(spot[0], nbytes, spot[1])
            else:
                buffer = self._allocate(nbytes)
        except RuntimeError as exc:  # the CPU allocator's out-of-memory
            raise ResourceExhausted(f"tensor '{chunk.name}' of {nbytes} bytes: server out of memory") from exc
        self._total += nbytes
        self._pending = _Pending(chunk.name, dtype, shape, buffer, code=chunk.dtype)

    def _arena_fits(self) -> bool:
        """Whether this stream's tensors go in one arena: a declared stream of two or more tensors,
        with an arena to take (a CPU server). Decided at the first header."""
        count, total = self._check.count, self._check.total
        return self._new_arena is not None and count is not None and count >= 2 and total is not None

    def _shared(self, chunk: pb.TensorChunk, crc: int | None) -> None:
        """A header chunk whose tensor's bytes lie in the caller's region: checked (region, bounds,
        alignment; no data or checksum beside them), allocated as any tensor, and copied out: from a
        host region into a host buffer once the stream has ended, with the others (`_copy_out`),
        else now (a copy to or from a device, queued)."""
        if chunk.dtype == pb.DTYPE_UNSPECIFIED or chunk.data or crc is not None:
            raise InvalidArgument(
                f"tensor '{chunk.name}': a chunk whose bytes lie in shared memory is a header (name, dtype, shape) "
                "with no data and no crc32c"
            )
        if self._regions is None:
            raise InvalidArgument(f"tensor '{chunk.name}': this call takes no shared memory")
        region, _ = shared_placement(chunk, self._regions)
        self._start(chunk, region)
        p = self._pending
        assert p is not None
        if p.buffer.is_cpu and region.device.type == "cpu":
            # Copied with the rest at the end (`_copy_out`): the bytes stay where the client wrote them
            # until the call answers, since a region's placements lie apart and it is reused only by a
            # later call.
            if p.nbytes:
                self._copies.append((region, chunk.shared.offset, p.buffer))
            if p.dtype is torch.bool:
                self._bools.append((p.name, p.buffer))
            p.filled = p.nbytes
            self._check.completed(p.name, p.nbytes, None, shared=True)
            self.tensors.append((p.name, p.buffer.view(p.dtype).reshape(p.shape)))
            self._pending = None
            return
        with region.copying():
            if p.nbytes:
                shm.copy_bytes(p.buffer, region.bytes_at(chunk.shared.offset, p.nbytes, f"tensor '{p.name}'"),
                               queue=p.buffer.is_cuda)
                if p.buffer.is_cuda:
                    self._unsettled[id(region)] = region
        p.filled = p.nbytes
        self._complete(None, shared=True)

    def _copy_out(self) -> None:
        """Make the copies out of host regions that `_shared` left for the end, then check their
        bool tensors' bytes."""
        copies, self._copies = self._copies, []
        if copies:
            shm.copy_out(copies)
        for name, flat in self._bools:
            if bool((flat > 1).any()):
                raise InvalidArgument(f"tensor '{name}' is bool but holds bytes other than 0 and 1")

    def _append(self, data: bytes | memoryview, crc: int | None) -> None:
        p = self._pending
        if p is None:
            return
        if data:
            end = p.filled + len(data)
            if end > p.nbytes:
                # The dtype as the header sent it (DTYPE_FLOAT32), not as torch prints it (torch.float32).
                raise InvalidArgument(
                    f"tensor '{p.name}' of shape {list(p.shape)} and dtype {pb.Dtype.Name(pb.Dtype.ValueType(p.code))} holds {p.nbytes} "
                    f"bytes; received at least {end}"
                )
            source = np.frombuffer(data, dtype=np.uint8)  # a 4 MiB chunk streams (see native.stream_copy)
            if len(data) < native.STREAM_MIN_BYTES or not native.stream_bytes(
                p.buffer.data_ptr() + p.filled, source.ctypes.data, len(data)
            ):
                p.buffer.numpy()[p.filled:end] = source
            self._check.data(data)
            p.filled = end
        if p.filled == p.nbytes:
            self._complete(crc)
        elif crc is not None:
            self._check.stray_crc()

    def _complete(self, crc: int | None, *, shared: bool = False) -> None:
        p = self._pending
        assert p is not None
        flat = p.buffer
        self._check.completed(
            p.name, p.nbytes, crc, lambda: crc32c(flat.numpy().data, tensor_crc(p.name, p.code, p.shape)), shared=shared
        )
        tensor = flat.view(p.dtype).reshape(p.shape)
        if p.dtype is torch.bool and bool((flat > 1).any()):
            raise InvalidArgument(f"tensor '{p.name}' is bool but holds bytes other than 0 and 1")
        self.tensors.append((p.name, tensor))
        self._pending = None


def _remembered(regions: Callable[[str], shm.Region]) -> Callable[[str], shm.Region]:
    """`regions`, each name looked up once (one call's headers mostly name one region; a region
    unregistered meanwhile is refused by its copy, `Region.copying`)."""
    found: dict[str, shm.Region] = {}

    def region(name: str) -> shm.Region:
        if name not in found:
            found[name] = regions(name)
        return found[name]

    return region


def shared_placement(chunk: pb.TensorChunk, regions: Callable[[str], shm.Region]) -> tuple[shm.Region, shm.Placement]:
    """The caller's region that a header chunk's bytes lie in (TensorChunk.shared) and where they
    lie, checked: a known dtype, a valid shape, inside the region and aligned (InvalidArgument), in
    a region of the caller's session (NotFound)."""
    region = regions(chunk.shared.region)
    dtype = torch_dtype(chunk.dtype)
    size = shm.element_size(dtype)
    shape = checked_shape(chunk.name, chunk.shape, size)
    placement = shm.Placement(chunk.name, dtype, shape, chunk.shared.offset, math.prod(shape) * size)
    shm.check_placed(region, placement)
    return region, placement


def assemble(
    chunks: Iterable[pb.TensorChunk | ChunkView], max_bytes: int,
    on_header: Callable[[str, int], torch.device | None] | None = None,
    regions: Callable[[str], shm.Region] | None = None, allocate: Callable[[int], torch.Tensor] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Join a whole stream of chunks into named tensors (see TensorAssembler for `on_header`,
    `regions` and `allocate`)."""
    assembler = TensorAssembler(max_bytes, on_header, regions, allocate)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.finish()
