"""The client's side of shared memory, through which tensor bytes move to and from a server on the
same host (Client(..., shm=True)): one reused region for uploads and small fetches, and a pool of
regions that large fetches are written into and returned as views of.

Why a pool: a copy into memory that was never touched runs at a fraction of a copy into memory
that was (every 4 KiB page of a /dev/shm file is faulted in and zeroed on first touch: 1.2-1.4 GB/s
on the project's VM, against 7-12 GB/s into faulted pages). A large fetch therefore goes into a
region this client registered before and whose pages are faulted, and the arrays it returns are
views of that region: no copy on this side. The region is lent to those arrays; when the last of
them is gone (garbage collected) it goes back to the pool for the next fetch. The server writes
only into the region a call names, and a call names only a region that is not lent, so arrays a
caller keeps are never written behind its back.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import re
import secrets
import time
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from . import wire
from .v1 import weightavg_pb2 as pb

REGION_NAME = "client"
"""The name this client registers its reused region under (regions are per session), with the
client's tag (`RegionNames`): uploads, and fetches that fit SMALL_FETCH_BYTES, which are copied out."""
POOL_NAMES = ("pool0", "pool1", "pool2", "pool3")
"""The names the pool's regions are registered under, with the client's tag. Four: a caller that
keeps the results of more large fetches than that alive makes the pool replace a lent region's
registration (the server forgets it; its arrays keep their memory) with a new region, faulted afresh."""
SMALL_FETCH_BYTES = 4 << 20
"""Fetches up to this size go through the reused region and are copied out: one round trip."""
ALIGN = 64
"""Tensors start on 64-byte boundaries, as the server places them."""
MIN_BYTES = 1 << 20
POOL_GRAIN = 2 << 20
"""Pool regions are sized in 2 MiB steps, so a fetch a little larger than the last reuses nothing
only when it outgrows the step."""
SHM_DIRECTORY = "/dev/shm"
MIN_UPLOAD_BYTES = 16 << 10
PROOF_PREFIX = b"weightavg-region:"
"""A region starts with this and the session's id when it is registered: the server reads them
from the file to know that the caller could write it (docs/security.md). The server's copy of the
prefix is weightavg_server.domain.shm.PROOF_PREFIX."""
"""Uploads of fewer bytes than this go in the stream's messages as they would without shared
memory: one message either way, and no lock or region for a small call."""


@dataclass(frozen=True)
class RegionNames:
    """The names one client registers its regions under: REGION_NAME, POOL_NAMES and the CUDA
    buffer's name, each with a tag of this client's own.

    Why a tag: region names are per session, and several clients may share a session
    (Client(session=id) joins one). Under shared names each client's registration replaced the
    other's, so the server read one client's uploads from, and wrote its fetches into, another
    client's memory (wrong values, no error), and a joined client's close unregistered them all.
    """

    region: str
    pool: tuple[str, ...]
    cuda: str

    @classmethod
    def new(cls, cuda: str) -> RegionNames:
        """Names with a new random tag (`cuda`: the CUDA buffer's base name, _cuda.REGION_NAME)."""
        tag = secrets.token_hex(6)
        return cls(f"{REGION_NAME}.{tag}", tuple(f"{name}.{tag}" for name in POOL_NAMES), f"{cuda}.{tag}")


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def proof(session: str) -> bytes:
    """What a region of this session starts with when it is registered."""
    return PROOF_PREFIX + session.encode()


ORPHAN_SECONDS = 600.0
"""How long a region file must have gone unchanged before `sweep_orphans` may unlink it, beside its
creator being gone: a file is named for the few calls between its creation and its registration,
so an older one is no live client's, even one whose process this one cannot see (another PID
namespace sharing /dev/shm)."""
_KEY = re.compile(r"wa_([0-9]+)_[0-9a-f]{24}")
"""A region file's name: `wa_<creator's pid>_<random>`, the pid telling `sweep_orphans` whose it is."""


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts: it is not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(directory: str = SHM_DIRECTORY) -> int:
    """Unlink the region files that clients of this user killed while naming them left behind; how many.

    A region's file has a name only between its creation and its registration (`_registered`
    unlinks it then). A client killed in that window (SIGKILL during an upload or fetch: a review
    left one 80 MB file in /dev/shm in 16 kills) leaves the file for good: its memory stays taken
    until the machine restarts, and nothing else knows the name. Every new region therefore first
    sweeps files named for a process that is gone, owned by this user and unchanged for
    `ORPHAN_SECONDS`. Errors (a file another sweep took first, an unreadable directory) are skipped.
    """
    swept = 0
    uid = os.getuid()
    stale = time.time() - ORPHAN_SECONDS
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        found = _KEY.fullmatch(entry.name)
        if found is None or int(found.group(1)) == os.getpid():
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if info.st_uid != uid or info.st_mtime > stale or _alive(int(found.group(1))):
                continue
            os.unlink(entry.path)
            swept += 1
        except OSError:
            continue
    return swept


def _create(size: int, session: str) -> tuple[str, mmap.mmap]:
    """A new file of `size` bytes in /dev/shm, mapped here, starting with the session's `proof`:
    its name (the key the server opens) and the mapping. Only this user may open it; the caller
    unlinks it once the server has mapped it. Files that killed clients left first go
    (`sweep_orphans`); the name carries this process's id for a later sweep to judge."""
    sweep_orphans()
    key = f"wa_{os.getpid()}_{secrets.token_hex(12)}"
    path = os.path.join(SHM_DIRECTORY, key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        # Allocated now, so a full /dev/shm fails here (OSError: the stream is used) rather than
        # in a copy into the mapping (SIGBUS); the server refuses sparse regions.
        os.posix_fallocate(fd, 0, size)
        memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        signed = proof(session)
        memory[: len(signed)] = signed  # overwritten by the first tensor placed: checked at registration only
        return key, memory
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _registered(size: int, register: Callable[[str, int], None], session: str) -> mmap.mmap:
    """A new region of `size` bytes registered with the server (`register(key, size)`) by `session`.

    The file's name is unlinked as soon as the server has mapped it (or refused it): from then on
    only this process and the server hold the memory, nothing is left in /dev/shm if either dies,
    and a leaked name opens nothing.
    """
    key, memory = _create(size, session)
    try:
        register(key, size)
    except BaseException:
        memory.close()
        raise
    finally:
        os.unlink(os.path.join(SHM_DIRECTORY, key))
    return memory


_FULL = frozenset({errno.ENOSPC, errno.ENOMEM})
"""The errors of a region /dev/shm has no room for now (a smaller one, or a later one, may fit)."""


def full(exc: OSError) -> bool:
    """Whether `exc` says /dev/shm has no room for a region now, rather than that there is none."""
    return exc.errno in _FULL


class SharedRegion:
    """A region registered with the server; replaced by a larger one when a call needs more."""

    def __init__(self) -> None:
        self._memory: mmap.mmap | None = None
        self.size = 0

    def ensure(self, nbytes: int, register: Callable[[str, int], None], session: str) -> memoryview:
        """The region's bytes, at least `nbytes` of them (registering a larger region if needed: twice
        the old size, or just `nbytes` where /dev/shm has no room for that). OSError where it has
        no room for `nbytes` either (the region stays as it was)."""
        if self._memory is None or self.size < nbytes:
            size = max(aligned(nbytes), 2 * self.size, MIN_BYTES)
            try:
                memory = _registered(size, register, session)
            except OSError as exc:
                if not full(exc) or size == max(aligned(nbytes), MIN_BYTES):
                    raise
                size = max(aligned(nbytes), MIN_BYTES)
                memory = _registered(size, register, session)
            self.close()
            self._memory, self.size = memory, size
        return memoryview(self._memory)

    def close(self) -> None:
        if self._memory is not None:
            try:
                self._memory.close()
            except BufferError:  # a view is still alive: the mapping goes with it
                pass
            self._memory, self.size = None, 0


class _Slot:
    """One of the pool's names and the region registered under it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.memory: mmap.mmap | None = None
        self.size = 0
        self.address = 0
        """Where `memory` is mapped in this process."""
        self.lent = False
        self.generation = 0
        """Counts the regions registered under this name; a returned region that is not the
        current one (its registration was replaced while lent) is not taken back."""


class FetchPool:
    """Regions for large fetches, each either free (the next fetch may be written into it) or lent
    to the arrays of a fetch (until they are garbage collected)."""

    def __init__(self, names: Sequence[str] = POOL_NAMES) -> None:
        # Reentrant: a garbage collection inside a locked section may finalize a lent region's
        # arrays in this very thread, and _give_back then takes the lock again.
        self._lock = threading.RLock()
        self._names = tuple(names)
        self._slots = [_Slot(name) for name in self._names]

    def largest_free(self) -> tuple[str, int] | None:
        """The name and size of the largest free region, if any."""
        with self._lock:
            free = [s for s in self._slots if s.memory is not None and not s.lent]
            if not free:
                return None
            best = max(free, key=lambda s: s.size)
            return best.name, best.size

    def region_for(self, nbytes: int, register: Callable[[str, str, int], None], session: str) -> str:
        """The name of a free region of at least `nbytes`, registering one if none is: in place of
        a free region that is too small, under an unused name, or else in place of the oldest lent
        one (`register(name, key, size)`)."""
        with self._lock:
            free = [s for s in self._slots if s.memory is not None and not s.lent]
            fits = [s for s in free if s.size >= nbytes]
            if fits:
                return min(fits, key=lambda s: s.size).name
            unused = [s for s in self._slots if s.memory is None]
            slot = (free or unused or sorted(self._slots, key=lambda s: s.generation))[0]
            slot.lent = True  # nobody else takes it while it is being registered
        size = max(math.ceil(nbytes / POOL_GRAIN) * POOL_GRAIN, POOL_GRAIN)
        try:
            memory = _registered(size, lambda key, n: register(slot.name, key, n), session)
        except BaseException:
            with self._lock:
                slot.lent = False
            raise
        with self._lock:
            old = slot.memory
            slot.memory, slot.size, slot.lent = memory, size, False
            slot.address = _address(memory)
            slot.generation += 1
        if old is not None:
            try:
                old.close()
            except BufferError:  # lent: its arrays keep the mapping; it is unmapped with the last
                pass
        return slot.name

    def lend(self, name: str, tensors: Sequence[pb.SharedTensor]) -> list[tuple[str, npt.NDArray[Any]]] | None:
        """Arrays of the tensors the server wrote into region `name`, as views of it; the region is
        lent to them until the last is garbage collected. None where the pool no longer has that
        region free (`unused` emptied it: the client was closed from another thread meanwhile)."""
        with self._lock:
            slot = next((s for s in self._slots if s.name == name), None)
            if slot is None or slot.memory is None or slot.lent:
                return None
            whole = np.frombuffer(slot.memory, np.uint8)
            out = _views(whole, tensors)
            slot.lent = True
            weakref.finalize(whole, self._give_back, slot, slot.generation)
        return out

    def locate(self, array: npt.NDArray[Any]) -> tuple[str, int] | None:
        """The pool region and offset a contiguous array's bytes lie at, when they lie in a region
        that is lent (to a fetch's arrays, or `empty`'s) and registered under its name now: an upload
        of it copies nothing here. Told by address, so arrays made over the same memory (a torch
        tensor from such an array, and the array torch gives back for it) are found too; two live
        mappings never overlap, so bytes inside the region's mapping are the region's."""
        if not array.flags.c_contiguous or not array.nbytes:
            return None
        start = array.__array_interface__["data"][0]
        with self._lock:
            for slot in self._slots:
                if slot.memory is None or not slot.lent:
                    continue
                offset = start - slot.address
                if 0 <= offset and offset + array.nbytes <= slot.size:
                    return (slot.name, offset) if offset % array.itemsize == 0 else None
        return None

    def _give_back(self, slot: _Slot, generation: int) -> None:
        with self._lock:
            if slot.generation == generation:
                slot.lent = False

    def unused(self) -> list[str]:
        """Forget every region (the client is closing): free ones are unmapped now, lent ones with
        their last array. The names that had a region registered."""
        with self._lock:
            slots, self._slots = self._slots, [_Slot(name) for name in self._names]
        registered = [slot.name for slot in slots if slot.memory is not None]
        for slot in slots:
            slot.generation += 1
            if slot.memory is not None:
                try:
                    slot.memory.close()
                except BufferError:
                    pass
                slot.memory = None
        return registered


def _address(memory: mmap.mmap) -> int:
    """Where a mapping starts in this process (the array that tells it is gone at return, so the
    mapping can still be closed)."""
    return int(np.frombuffer(memory, np.uint8, count=1).ctypes.data)


def _views(whole: npt.NDArray[np.uint8], tensors: Sequence[pb.SharedTensor]) -> list[tuple[str, npt.NDArray[Any]]]:
    """Arrays over `whole` (views, whose base is `whole`) where the server placed each tensor."""
    out = []
    for t in tensors:
        dtype, shape = _checked(t, len(whole))
        out.append((t.name, whole[t.offset:t.offset + t.byte_size].view(dtype).reshape(shape)))
    return out


def _checked(t: pb.SharedTensor, size: int) -> tuple[np.dtype[Any], tuple[int, ...]]:
    dtype = wire._DTYPES[t.dtype]
    shape = tuple(t.shape)
    if t.byte_size != math.prod(shape) * dtype.itemsize or t.offset < 0 or t.offset + t.byte_size > size:
        raise ValueError(f"the server placed tensor '{t.name}' outside the shared memory region")
    return dtype, shape


@dataclass
class Placed:
    """One array of an upload and where the server finds it: `region` "" for the reused region
    (write() copies it there), else a lent pool region the array already lies in; `inline`, in the
    stream's own messages (an array under SHARED_MIN_TENSOR_BYTES)."""

    name: str
    array: npt.NDArray[Any]
    message: pb.SharedTensor
    region: str = ""
    inline: bool = False

    @property
    def copied(self) -> bool:
        """Whether write() copies this array into the reused region."""
        return not self.inline and not self.region and self.array.nbytes > 0


SHARED_MIN_TENSOR_BYTES = 16 << 10
"""Arrays under this size go in the stream's own messages (packed) even in a call that moves the
others through shared memory: the server's work for a header that points into a region (the
region's checks, a placement's, a sample of its bytes for the request's digest) cost more than the
bytes of a small tensor, so 2,000 tensors of 256 bytes went up in 1.4-1.6x the stream's time
through shared memory (docs/perf.md, "Small tensors in the stream beside shared memory")."""


def layout(
    items: Sequence[tuple[str, Any]], locate: Callable[[npt.NDArray[Any]], tuple[str, int] | None] | None = None,
    inline_below: int = 0,
) -> tuple[list[Placed], int]:
    """Arrays to upload, in order, and where each goes (64-byte aligned); the bytes they take in the
    reused region. An array that `locate` finds in a pool region (a fetched view sent back) stays
    there; one of fewer than `inline_below` bytes goes in the stream's messages."""
    placed, at = [], 0
    for name, value in items:
        array = wire.to_array(value)
        inline = array.nbytes < inline_below
        found = None if inline or locate is None else locate(array)
        message = pb.SharedTensor(
            name=name, dtype=wire._CODES[array.dtype], shape=array.shape, offset=found[1] if found else at,
            byte_size=array.nbytes,
        )
        placed.append(Placed(name, array, message, found[0] if found else "", inline))
        if not found and not inline:
            at = aligned(at + array.nbytes)
    return placed, at


def shared_chunks(
    placed: Sequence[tuple[pb.SharedTensor, str]], message_type: type[Message], region: str
) -> Iterator[bytes]:
    """Serialized `message_type` stream messages, one header chunk a tensor whose bytes lie where
    its SharedTensor says, in the region named beside it ("": `region`; TensorChunk.shared), as
    one declared stream."""
    field = wire.chunk_field(message_type)
    declare: tuple[int, int] | None = (len(placed), sum(m.byte_size for m, _ in placed))
    if not placed:
        yield _empty_stream(field)
    for m, where in placed:
        yield _shared_header(field, m, where or region, declare)
        declare = None


def mixed_chunks(
    placed: Sequence[Placed], message_type: type[Message], region: str, chunk_bytes: int
) -> Iterator[tuple[bytes, int]]:
    """The stream of an upload whose arrays lie in shared memory but for the `inline` ones, in the
    arrays' order (the dictionary's entries come in it): a header chunk for each array in a region
    (TensorChunk.shared; "" stands for `region`), the chunks of `wire.encode_tensor` for each inline
    one, the first declaring the whole stream. Each message with the bytes it stands for: its data,
    or its own size for a header."""
    field = wire.chunk_field(message_type)
    declare: tuple[int, int] | None = (len(placed), sum(p.message.byte_size for p in placed))
    if not placed:
        yield _empty_stream(field), 0
    for p in placed:
        m = p.message
        if p.inline:
            raw = p.array.reshape(-1).view(np.uint8).data
            yield from wire.encode_tensor_sized(field, m.name, m.dtype, m.shape, raw, chunk_bytes, declare=declare)
        else:
            message = _shared_header(field, m, p.region or region, declare)
            yield message, len(message)
        declare = None


def _shared_header(field: int, m: pb.SharedTensor, region: str, declare: tuple[int, int] | None) -> bytes:
    """The stream message of a header chunk whose tensor's bytes lie at `m`'s offset in `region`;
    `declare` (tensor count, total bytes) on a stream's first chunk."""
    chunk = pb.TensorChunk(name=m.name, dtype=m.dtype, shape=m.shape, shared=pb.SharedBytes(region=region, offset=m.offset))
    if declare is not None:
        chunk.tensor_count, chunk.total_bytes = declare
    body = chunk.SerializeToString()
    return wire._varint(field << 3 | 2) + wire._varint(len(body)) + body


def _empty_stream(field: int) -> bytes:
    """The one message of a stream of no tensor: a chunk that declares so."""
    return wire.encode_chunk(field, "", 0, (), memoryview(b""), tensor_count=0, total_bytes=0)


class Writing:
    """One upload's copies into the reused region, all made before the stream's first message is
    given (`write`, on the client's cores), then its headers packed, with the small arrays' chunks
    among them (`mixed_chunks`): the server copies the bytes out
    together once the stream has ended, on its cores, so the two sides' copies no longer share the
    machine. `close()` ends it when the call is over: a copy under way finishes, and none starts
    after, since gRPC may still be drawing on the stream from its own thread while the region passes
    to the next call.

    Copied a tensor at a time just before each header, while the server copied the one before out,
    each side had a core: 256 MB went up in 57-60 ms on the project's VM, against 44-51 ms this way
    (docs/perf.md, "Shared-memory uploads copied together"); with streaming stores in the client's
    copies (`weightavg._copy`), 35-37 ms ("Streaming stores in the client"). A retry sends the stream
    again from the start, copying the same bytes to the same places.
    """

    def __init__(self, buf: memoryview, placed: Sequence[Placed]) -> None:
        self._buf: memoryview | None = buf
        self._placed = list(placed)
        self._lock = threading.Lock()

    def chunks(
        self, message_type: type[Message], region: str, pack_bytes: int = 0, chunk_bytes: int = wire.CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The stream's messages (see mixed_chunks: inline arrays in chunks of at most `chunk_bytes`),
        once every array bound for the region is copied in; with `pack_bytes`, small chunks packed
        into messages of at most that many bytes (`wire.packed`)."""
        messages = self._written(mixed_chunks(self._placed, message_type, region, chunk_bytes))
        return wire.packed(messages, pack_bytes) if pack_bytes else (message for message, _ in messages)

    def _written(self, messages: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
        """The messages, after every array bound for the region is copied in."""
        with self._lock:
            if self._buf is None:
                return
            write(self._buf, self._placed)
        yield from messages

    def close(self) -> None:
        with self._lock:
            self._buf = None


COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads an upload's copies into the region run on (the copies release the GIL): with numpy two
copied 256 MB in 21-25 ms on the project's 2-vCPU VM, one in 39-44 ms; with streaming stores
(`_copy.c`) two took 13-16 ms; memory bandwidth, not cores, bounds more than a few."""
COPY_SPLIT_BYTES = 8 << 20
"""Uploads smaller than twice this are copied on the calling thread alone."""
_copy_pool: tuple[int, ThreadPoolExecutor] | None = None
"""The threads that share large copies with the caller, and the process that started them."""
_copy_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The threads that share large copies with the caller, started on first use in this process:
    a child forked after a parent's upload inherits the executor without its threads, and work
    handed to it would never run."""
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None or _copy_pool[0] != os.getpid():
            _copy_pool = (os.getpid(), ThreadPoolExecutor(COPY_THREADS - 1, thread_name_prefix="weightavg-shm-copy"))
        return _copy_pool[1]


def write(buf: memoryview, placed: Sequence[Placed]) -> None:
    """Copy each array bound for the reused region into its place (one copy a byte), split into
    about equal runs of bytes over `COPY_THREADS` threads when there is enough to copy."""
    spans = [(p.message.offset, p.array.reshape(-1).view(np.uint8)) for p in placed if p.copied]
    total = sum(len(source) for _, source in spans)
    target = np.frombuffer(buf, np.uint8)
    try:
        if COPY_THREADS == 1 or total < 2 * COPY_SPLIT_BYTES:
            _copy_runs(target, _runs(spans, 0, total))
            return
        share = -(-total // COPY_THREADS)
        parts = [_runs(spans, k * share, min(total, (k + 1) * share)) for k in range(COPY_THREADS)]
        futures = [_pool().submit(_copy_runs, target, part) for part in parts[1:]]
        try:
            _copy_runs(target, parts[0])
        finally:
            for future in futures:
                future.result()
    finally:
        del target


def _runs(
    spans: Sequence[tuple[int, npt.NDArray[np.uint8]]], start: int, stop: int
) -> list[tuple[int, npt.NDArray[np.uint8]]]:
    """The pieces of `spans` (offset in the region, bytes) that bytes [start, stop) of their
    concatenation cover, as (offset in the region, bytes) pairs."""
    out, at = [], 0
    for offset, source in spans:
        lo, hi = max(start, at), min(stop, at + len(source))
        if lo < hi:
            out.append((offset + lo - at, source[lo - at:hi - at]))
        at += len(source)
    return out


def _copy_runs(target: npt.NDArray[np.uint8], runs: Sequence[tuple[int, npt.NDArray[np.uint8]]]) -> None:
    """Copy each run (offset in the region, bytes) into `target`: in one call of the compiled helper
    (streaming stores, `_copy.c`) where the install built it, else with numpy: the same bytes."""
    if _STREAM_COPY is None:
        for offset, source in runs:
            np.copyto(target[offset:offset + len(source)], source)
        return
    base = _address_of(target)
    for offset, source in runs:
        if offset < 0 or offset + len(source) > len(target):  # layout() places every run inside; never trusted blind
            raise ValueError(f"a copy of {len(source)} bytes at offset {offset} lies outside the region's {len(target)}")
    _STREAM_COPY(
        tuple(base + offset for offset, _ in runs), tuple(_address_of(source) for _, source in runs),
        tuple(len(source) for _, source in runs),
    )


def _address_of(array: npt.NDArray[Any]) -> int:
    return int(array.__array_interface__["data"][0])


def _load_stream_copy() -> Callable[[tuple[int, ...], tuple[int, ...], tuple[int, ...]], None] | None:
    try:
        from ._copy import copy
    except ImportError:  # not built: no C compiler or Python headers at install (setup.py)
        return None
    return copy


_STREAM_COPY = _load_stream_copy()
"""The compiled copy with streaming stores (`_copy.c`), or None: numpy copies the same bytes, with
cached stores (glibc's memcpy streams only above its threshold, ~100 MB on the project's VM), 1.5x
slower on a 256 MB upload of 16 MB tensors (docs/perf.md, "Streaming stores in the client")."""


def read(buf: memoryview, tensors: Sequence[pb.SharedTensor]) -> list[tuple[str, npt.NDArray[Any]]]:
    """New arrays holding copies of the tensors the server wrote (the region is reused next call)."""
    out = []
    for t in tensors:
        dtype, shape = _checked(t, len(buf))
        array = np.empty(shape, dtype)
        if t.byte_size:
            source = np.frombuffer(buf, np.uint8, count=t.byte_size, offset=t.offset)
            array.reshape(-1).view(np.uint8)[:] = source
            del source
        out.append((t.name, array))
    return out
