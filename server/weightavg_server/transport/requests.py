"""Request IDs on the wire: the key a call hands the service, its ID and a digest of its arguments.

A unary call's digest is a SHA-256 of its message type and its fields (deterministic protobuf
encoding, the ID left out). An upload's covers the fields of its first message and, as the stream
is read, each tensor's header (name, dtype, shape) and a CRC-32C of its bytes, wherever they lie:
in the stream, or in the caller's shared memory region (TensorChunk.shared), read there as if they
had been sent, so that the digest does not depend on how the bytes travelled: a check that a retry
repeats the same call, cheap enough not to slow uploads much. A tensor of `SAMPLED_FROM` bytes or
more in a region adds a sample of its bytes instead (`sample`): reading all of them took a third
of a 256 MB shared memory upload's time, which is the one copy that path makes. It is tagged
`UPLOAD_DIGEST_TAG`. (Measured
on the 2-core development machine: SHA-256 at 1.4 GB/s would take about as long as receiving the
data, 0.8-1.0 GB/s; zlib's CRC-32, which digests used before, 3.9 GB/s, a sixth of a served 256 MB
upload's time on the handler thread; the hardware CRC-32C, 21 GB/s. A CRC catches a client that
reuses an ID by mistake; it is no defence against one that forges a collision, which could only
fool itself.)
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Generic, Protocol, TypeVar

import numpy as np

from google.protobuf.message import Message

from weightavg.v1 import weightavg_pb2 as pb
from weightavg.wire import crc32c

from ..domain import shm
from ..store.requests import RequestKey
from . import codec

UPLOAD_DIGEST_TAG = "crc32c-v2:"
"""The scheme of an upload's digest, before its hex; a digest restored from a snapshot in another
scheme cannot be compared with this one (store/requests.py, `comparable`). Untagged: zlib's CRC-32
of the stream's bytes (until 2026-11-26). "crc32c:": the hardware CRC-32C of the stream's bytes,
and none of the bytes in shared memory, so that a request ID sent again with other bytes in its
region got the first call's answer: the upload applied zero times (until 2026-11-28).
"crc32c-v2:": the bytes in shared memory too, a sample of the large tensors' (`sample`)."""

SAMPLED_FROM: Final = 1 << 20
"""Tensors in shared memory of this many bytes or more add a sample of their bytes to the digest."""

SAMPLE_EVERY: Final = 64 << 10
SAMPLE_LINE: Final = 64
"""The sample: the first SAMPLE_LINE bytes of every SAMPLE_EVERY, and the last SAMPLE_LINE bytes."""


def sample(data: memoryview) -> bytes | memoryview:
    """What a digest reads of a tensor's bytes in shared memory: all of them under `SAMPLED_FROM`,
    else one 64-byte line of every 64 KiB and the last line (16 KiB of a 16 MiB tensor). Other
    arrays sent again under a request ID by mistake differ almost everywhere (a training step
    changes every weight), so the sample tells them apart; a change confined to the bytes between
    its lines (a few rows of an embedding) is not seen, and the repeat gets the first answer."""
    if len(data) < SAMPLED_FROM:
        return data  # hashed where it lies, not copied
    values = np.frombuffer(data, np.uint8)
    whole = len(values) - len(values) % SAMPLE_EVERY
    lines = values[:whole].reshape(-1, SAMPLE_EVERY)[:, :SAMPLE_LINE]
    return np.concatenate((lines.reshape(-1), values[-SAMPLE_LINE:])).tobytes()

_LEFT_OUT = ("request_id", "chunk")
"""Fields not part of the arguments: the ID itself, and an upload's chunks (hashed as they stream)."""


class Chunk(Protocol):
    """A TensorChunk, parsed by protobuf or decoded by hand (weightavg.wire.ChunkView)."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> int: ...

    @property
    def shape(self) -> Iterable[int]: ...

    @property
    def data(self) -> bytes | memoryview: ...


C = TypeVar("C", bound=Chunk)


def _fields(message: object, message_type: type[Message]) -> bytes:
    """The message's type name and its fields but the left-out ones, in protobuf's deterministic encoding."""
    if isinstance(message, Message):
        copy = message_type()
        copy.CopyFrom(message)
        for name in _LEFT_OUT:
            if name in message_type.DESCRIPTOR.fields_by_name:
                copy.ClearField(name)
    else:  # an upload message decoded by hand (codec.request_decoder): its string fields and a chunk
        copy = message_type(**{k: v for k, v in vars(message).items() if k not in _LEFT_OUT})
    type_name = message_type.DESCRIPTOR.full_name.encode()
    return struct.pack("<I", len(type_name)) + type_name + copy.SerializeToString(deterministic=True)


def key(request: Message) -> RequestKey | None:
    """The key of a unary call, or None when it carries no request ID.

    The digest is computed only if the request table asks for it (a repeat, a snapshot): the key
    keeps the request's encoding, not the decoded message (whose arena takes about 500 bytes more:
    the table remembers up to 100,000 IDs, so the difference was 50 MB on a busy server).
    """
    request_id = getattr(request, "request_id", "")
    if not request_id:
        return None
    encoded = request.SerializeToString()
    return RequestKey(str(request_id), _UnaryDigest(type(request), encoded), len(encoded))


class _UnaryDigest:
    """The digest of a unary request from its encoding, when first asked for: a slotted object holds
    less than a closure (about 56 bytes against 200, beside the encoding's 100-200)."""

    __slots__ = ("message_type", "encoded")

    def __init__(self, message_type: type[Message], encoded: bytes) -> None:
        self.message_type = message_type
        self.encoded = encoded

    def __call__(self) -> str:
        message = self.message_type.FromString(self.encoded)
        return hashlib.sha256(_fields(message, self.message_type)).hexdigest()


class StreamDigest(Generic[C]):
    """The digest of an upload, computed as its chunks pass through `chunks`.

    `digest()` first reads what the upload left unread (all of it, for a repeat whose upload is not
    received), hashing it without keeping it.
    """

    def __init__(
        self, fields: bytes, chunks: Iterable[C], regions: Callable[[str], shm.Region] | None = None
    ) -> None:
        """`regions(name)` finds the caller's shared memory region of a chunk whose bytes lie in one
        (TensorChunk.shared), so that they are hashed as if they had been sent; without it such
        chunks add their header only (the call's receiver refuses them)."""
        self._hash = hashlib.sha256(fields)
        self._crc = 0
        self._bytes = 0
        self._regions = regions
        self._draining = False
        """Set once `digest()` reads the chunks itself: until then each chunk was asked for by the
        receiver, after it had checked and copied the one before (`_shared`)."""
        self._digest: str | None = None
        self.chunks: Iterator[C] = self._hashing(chunks)

    def _hashing(self, chunks: Iterable[C]) -> Iterator[C]:
        for chunk in chunks:
            if chunk.dtype != pb.DTYPE_UNSPECIFIED:
                self._fold()
                header = pb.TensorChunk(
                    name=chunk.name, dtype=pb.Dtype.ValueType(chunk.dtype), shape=list(chunk.shape)
                ).SerializeToString(deterministic=True)
                self._hash.update(struct.pack("<I", len(header)) + header)
            if chunk.data:
                self._crc = crc32c(chunk.data, self._crc)
                self._bytes += len(chunk.data)
            yield chunk
            if isinstance(chunk, pb.TensorChunk) and chunk.HasField("shared"):  # ChunkView: protobuf parses these
                self._shared(chunk, checked=not self._draining)

    def _shared(self, chunk: pb.TensorChunk, checked: bool) -> None:
        """Hash the bytes of a tensor that lie in the caller's region as if the chunk had carried them.

        `checked`: the receiver has checked the chunk (region, dtype, shape, bounds) and copied its
        bytes out, so they are only found again (checking took 23 us a tensor, a third more time
        for an upload of 300 small tensors); otherwise (a repeat, whose upload is not received) the
        chunk is checked here. Read inside the region's `copying` (a region truncated since it was
        mapped is refused, not read: its lost pages would kill the server with SIGBUS). A large
        tensor adds a sample of its bytes (`sample`), so its digest differs from the same bytes'
        in the stream. A CUDA region's bytes are not read (a device-to-host copy of each upload):
        its tensors count by their headers only.

        Raises:
            WeightavgError: the region or the placement is wrong.
        """
        if self._regions is None:
            return
        if checked:
            region = self._regions(chunk.shared.region)
            nbytes = math.prod(chunk.shape) * codec.torch_dtype(chunk.dtype).itemsize
        else:
            region, placement = codec.shared_placement(chunk, self._regions)
            nbytes = placement.nbytes
        if region.device.type != "cpu":
            return
        start = chunk.shared.offset
        with region.copying(), memoryview(region.buffer) as mapped, mapped[start:start + nbytes] as data:
            self._crc = crc32c(sample(data), self._crc)
        self._bytes += nbytes

    def _fold(self) -> None:
        """Add the data since the last header (its length and CRC) to the hash; independent of chunking."""
        self._hash.update(struct.pack("<QI", self._bytes, self._crc))
        self._crc = self._bytes = 0

    def digest(self) -> str:
        if self._digest is None:
            self._draining = True
            for _ in self.chunks:
                pass
            self._fold()
            self._digest = UPLOAD_DIGEST_TAG + self._hash.hexdigest()
        return self._digest


def stream_key(
    first: object, message_type: type[Message], chunks: Iterable[C], regions: Callable[[str], shm.Region] | None = None,
) -> tuple[Iterable[C], RequestKey | None]:
    """The chunks to receive and the key of an upload whose first message is `first` (None without
    an ID); `regions` finds the caller's shared memory regions (see `StreamDigest`)."""
    request_id = str(getattr(first, "request_id", ""))
    if not request_id:
        return chunks, None
    stream = StreamDigest(_fields(first, message_type), chunks, regions)
    return stream.chunks, RequestKey(request_id, stream.digest)


def shared_key(
    request: pb.CreateDictionaryFromSharedMemoryRequest, regions: Callable[[str], shm.Region]
) -> RequestKey | None:
    """The key of a dictionary made from the caller's region (None without an ID): the request's
    fields and, as an upload's digest has them, the bytes each tensor has there.

    Computed before the call runs, unlike other unary calls' digests (computed from the request when
    a repeat needs them): by then the client may have written other bytes into its region. Without
    the bytes, a repeat with other bytes in the region got the first call's dictionary.

    Raises:
        WeightavgError: the region is not the caller's, or a tensor does not lie inside it.
    """
    if not request.request_id:
        return None
    chunks = (
        pb.TensorChunk(
            name=t.name, dtype=t.dtype, shape=t.shape, shared=pb.SharedBytes(region=request.region, offset=t.offset)
        )
        for t in request.tensors
    )
    digest = StreamDigest(_fields(request, type(request)), chunks, regions).digest()
    return RequestKey(request.request_id, lambda: digest, len(digest))
