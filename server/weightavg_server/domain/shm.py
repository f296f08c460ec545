"""Shared memory regions: files in /dev/shm that a client on the same host creates and the server
maps, so that tensor bytes move by one memory copy a side instead of through gRPC.

A region is named by the client's key (the file's name in /dev/shm). The key is a secret of sorts
(whoever knows it and runs as the server's user can read the bytes), so no error here names it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import re
import stat
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import native, pinned
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from .shapes import checked_shape

SHM_DIRECTORY = "/dev/shm"
"""Where POSIX shared memory objects live on Linux (shm_open names are files here)."""
KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
"""A key is one file name: no '/', no leading '.', so it cannot leave the directory."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A region's name within its session: short and safe to echo."""
ALIGN = 64
PROOF_PREFIX = b"weightavg-region:"
"""What a region must start with, then the registering session's id, when it is registered (the
client's copy: weightavg._shm.PROOF_PREFIX). The server runs as one user and opens the file with
that user's rights, so the owner check alone let a caller of any Unix user read and write any
/dev/shm file of the server's user by naming it (names in /dev/shm are visible to every local
user). Writing the session's id into the file proves the caller could write it; nothing that was
there before names the caller's session."""
"""Tensors written into a region start on 64-byte boundaries (a cache line; every dtype's alignment)."""


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Guard:
    """A mapping's SIGBUS guard (`native.guard`): a page the client's truncation took, touched in a
    copy, reads as zeros instead of killing the server, and the copy's caller refuses the call
    (`Region.copying`). Unguarded where the native module was not built (or for nbytes 0)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.slot = native.guard(address, nbytes) if nbytes else None

    def broken(self) -> bool:
        return native.guard_broken(self.slot)

    def release(self) -> None:
        """Stop guarding, once (a later call, from the region's finalizer, must not free a slot that
        another region has taken since)."""
        slot, self.slot = self.slot, None
        native.unguard(slot)


class Region:
    """One mapped region: the first `byte_size` bytes of /dev/shm/<key>, read and written in place.

    The mapping is released when the last reference goes (an unregister while a copy is running
    leaves that copy's mapping alive until it ends). On a CUDA server the mapping is page-locked
    (`lock_pages`), and every copy into or out of the region runs inside `copying()`, so that
    `close` unlocks the pages only once no copy can still read them.
    """

    device = torch.device("cpu")
    """Where the region's bytes lie (a CUDA region's device: domain/cuda_ipc.py)."""
    locked_for: torch.device | None = None
    """The CUDA device the region's pages are locked for (`lock_pages`), or None: pageable."""

    def __init__(self, key: str, byte_size: int, directory: str = SHM_DIRECTORY, proof: bytes = b"") -> None:
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise InvalidArgument(
                "the shared memory key is not a file name in /dev/shm: use 1 to 255 letters, digits, '_', '.' "
                "or '-', not starting with '.' (the name multiprocessing.shared_memory gives, without a '/')"
            )
        if byte_size <= 0:
            raise InvalidArgument(f"a shared memory region needs byte_size > 0; got {byte_size}")
        path = os.path.join(directory, key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            _refuse_if_out_of_descriptors(exc)
            # Which of "absent", "a link" or "not ours" it was would tell a prober what exists.
            raise FailedPrecondition(
                "the shared memory region could not be opened: create it on this host, as the server's user, "
                "before registering it"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise FailedPrecondition(
                    "the shared memory region must be a regular file in /dev/shm owned by the server's user"
                )
            if info.st_size < byte_size:
                raise InvalidArgument(
                    f"the shared memory region holds {info.st_size} bytes, fewer than the {byte_size} to register; "
                    "register at most its size"
                )
            if proof:
                _require_proof(fd, byte_size, proof)
            _allocate(fd, byte_size)
            self._blocks = os.fstat(fd).st_blocks
            """Blocks the file held once its mapped bytes were allocated: fewer later means memory was
            released (a hole punched), which a copy must not touch (`check_size`)."""
            try:
                self.buffer = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                _refuse_if_out_of_descriptors(exc)
                raise
            self._fd = fd
        except BaseException:
            os.close(fd)
            raise
        self.byte_size = byte_size
        self.identity: tuple[object, ...] = (info.st_dev, info.st_ino)
        self._init_copies()
        self.address = self._address()
        """Where the mapping starts in the server's memory (it stays mapped while this object lives)."""
        self._guard = Guard(self.address, byte_size)
        weakref.finalize(self, self._guard.release)  # at the latest when the region goes

    def _init_copies(self) -> None:
        """The count of copies in progress (`copying`), and its guard: for every kind of region."""
        self._copies_done = threading.Condition()
        self._copies = 0
        self._guard = Guard(0, 0)
        self.broken = False
        """A copy touched memory the file had lost (`native.guard_broken`): the mapping no longer
        follows the file, so the region takes no more copies, whatever the file holds later."""

    def lock_pages(self, device: torch.device) -> bool:
        """Page-lock the mapping for CUDA (`pinned.lock`), so that a tensor held on `device` is
        copied straight between the device and the region as DMA: an upload is received on the
        device with no host buffer between, a fetch is written without the driver's staging.
        Whether it did; a region left pageable works as before."""
        if self.locked_for is None and pinned.lock(self._address(), self.byte_size, device):
            self.locked_for = device
        return self.locked_for is not None

    def _address(self) -> int:
        return int(torch.frombuffer(self.buffer, dtype=torch.uint8, count=self.byte_size).data_ptr())

    def reaches(self, device: torch.device | None) -> bool:
        """Whether a tensor held on `device` is copied straight between the device and the region:
        the region's own CUDA device, or the device its pages are locked for."""
        if device is None:
            return False
        return device == (self.device if self.device.type == "cuda" else self.locked_for)

    @contextmanager
    def copying(self) -> Iterator[None]:
        """Around each copy into or out of the region: FailedPrecondition once it is closed (or its
        file truncated), and `close` waits for the copies inside before unlocking its pages. A copy
        queued without blocking may run on after the block; `close` waits for the device as well."""
        with self._copies_done:
            self.check_size()
            self._copies += 1
        try:
            yield
        finally:
            with self._copies_done:
                self._copies -= 1
                self._copies_done.notify_all()
        if self._guard.broken():
            self.broken = True
            raise FailedPrecondition(
                "the shared memory region's file lost memory while the server copied (truncated, or a hole "
                "punched): the call changed nothing and the region takes no more copies; register it again"
            )

    def close(self) -> None:
        """Forget the file, and unlock the pages once the copies in progress are done; the mapping
        goes with the last reference to this object."""
        with self._copies_done:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._copies_done.wait_for(lambda: self._copies == 0)
            self._guard.release()
            device, self.locked_for = self.locked_for, None
        if device is not None:
            pinned.unlock(self._address(), self.byte_size, device)

    def check_size(self) -> None:
        """Refuse a region whose file has shrunk since it was mapped (touching the lost pages would
        kill the server with SIGBUS)."""
        if self._fd < 0:
            raise FailedPrecondition("the shared memory region was unregistered; register it again")
        if self.broken:
            raise FailedPrecondition(
                "the shared memory region's file lost memory during an earlier copy; register it again"
            )
        info = os.fstat(self._fd)
        if info.st_size < self.byte_size:
            raise FailedPrecondition(
                "the shared memory region's file was truncated after it was registered; register it again"
            )
        if info.st_blocks < self._blocks:
            raise FailedPrecondition(
                "the shared memory region's file lost memory after it was registered (a hole punched or a "
                "truncation); register it again"
            )

    def usable(self) -> bool:
        """Whether a copy would start now (`check_size` passes): not closed, not broken, its file whole."""
        try:
            self.check_size()
        except FailedPrecondition:
            return False
        return True

    def check_bounds(self, offset: int, nbytes: int, what: str) -> None:
        """InvalidArgument unless bytes [offset, offset + nbytes) lie inside the region."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.byte_size:
            raise InvalidArgument(
                f"{what}: bytes [{offset}, {offset + nbytes}) lie outside the region's {self.byte_size} bytes"
            )

    def bytes_at(self, offset: int, nbytes: int, what: str) -> torch.Tensor:
        """A uint8 tensor over bytes [offset, offset + nbytes) of the region, sharing its memory."""
        self.check_bounds(offset, nbytes, what)
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=nbytes, offset=offset)

    def settle(self) -> None:
        """Wait for copies into or out of the region to finish: CPU copies are done when they return;
        those queued between locked pages and their device are waited for here (this thread's
        stream), and a CUDA region's in domain/cuda_ipc.py."""
        device = self.locked_for
        if device is not None:
            torch.cuda.current_stream(device).synchronize()


def proof(session: str) -> bytes:
    """What a region registered by `session` starts with (`PROOF_PREFIX` and the session's id)."""
    return PROOF_PREFIX + session.encode()


def _require_proof(fd: int, byte_size: int, expected: bytes) -> None:
    """FailedPrecondition unless the file's first bytes are `expected`. Read with pread, not
    through a mapping: reading a hole of a mapped tmpfs file allocates a page (SIGBUS when full)."""
    if byte_size < len(expected) or os.pread(fd, len(expected), 0) != expected:
        raise FailedPrecondition(
            "the shared memory region must start with b'weightavg-region:' and your session's id when you "
            "register it, the proof that you can write the file (docs/security.md); write them there, then "
            "register (the tensors placed later may overwrite them)"
        )


def _allocate(fd: int, byte_size: int) -> None:
    """Allocate the file's first `byte_size` bytes (kept as they are where they already are).

    A page of a sparse file is allocated when first touched; with /dev/shm full (a container's is
    often 64 MB) that touch, inside a copy, would kill the server with SIGBUS. The file's block
    count cannot tell which pages are allocated (blocks past the mapped bytes count too), and
    SEEK_HOLE reports allocated but unwritten tmpfs pages as holes, so the server allocates them.
    """
    try:
        os.posix_fallocate(fd, 0, byte_size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ResourceExhausted(
                f"/dev/shm has no room for the shared memory region's {byte_size} bytes; free shared memory "
                "on this host, or register a smaller region"
            ) from None
        raise FailedPrecondition(
            "the shared memory region's memory could not be allocated; create it in /dev/shm"
        ) from None


def _refuse_if_out_of_descriptors(exc: OSError) -> None:
    """ResourceExhausted for the errors that say the server cannot open or map one more region."""
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        raise ResourceExhausted(
            "the server cannot open or map another shared memory region (out of file descriptors or "
            "mappings); unregister regions or close sessions first"
        ) from None


@dataclass(frozen=True)
class Placement:
    """Where one tensor lies in a region."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element: torch's own figure (making a tensor to ask it took 15 us, twice per tensor
    placed in a region)."""
    return dtype.itemsize


def layout(named: Sequence[tuple[str, torch.Tensor]], offset: int) -> tuple[list[Placement], int]:
    """Where `named` go from `offset`, each on a 64-byte boundary, and the bytes they take from it."""
    if offset < 0 or offset % ALIGN:
        raise InvalidArgument(f"the offset in the region must be a non-negative multiple of {ALIGN}; got {offset}")
    placements, at = [], offset
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        placements.append(Placement(name, t.dtype, tuple(t.shape), at, nbytes))
        at = aligned(at + nbytes)
    return placements, at - offset


def copy_bytes(target: torch.Tensor, source: torch.Tensor, *, threads: bool = False, queue: bool = False) -> None:
    """target (contiguous; on the CPU, or a CUDA region's bytes) := source, of the same dtype and shape.

    Between contiguous CPU tensors as one memcpy of their bytes: on one thread (with streaming
    stores from 1 MiB, `native.stream_copy`, else numpy's), or with `threads` torch's uint8 copy_,
    split over the server's threads. Copies of a call's many tensors go together, streamed on the
    server's threads (`native.stream_copies`), where nothing else runs beside them: a fetch's into
    the client's region (`write`), an upload's out of it once its stream has ended (`copy_out`);
    torch's copy gave 5.1-5.2 GB/s on one thread and 8.1-8.9 on two for 256 MB on the project's VM,
    the streamed copies on two threads 14-15.
    Otherwise (other devices, strides, conjugate or negative views) torch's copy_, queued without
    blocking with `queue` (between a device and pinned or locked memory; the caller settles).
    """
    source = source.detach()
    if native.plain_cpu(source) and target.is_cpu and target.is_contiguous():
        if threads:
            target.reshape(-1).view(torch.uint8).copy_(source.reshape(-1).view(torch.uint8))
        elif not native.stream_copy(target, source):
            np.copyto(target.reshape(-1).view(torch.uint8).numpy(), source.reshape(-1).view(torch.uint8).numpy())
    else:
        target.copy_(source, non_blocking=queue)


def copy_out(copies: Sequence[tuple[Region, int, torch.Tensor]]) -> None:
    """Each (region, offset, target): target (a contiguous CPU uint8 tensor) := the region's bytes
    from offset, in one call on the server's threads with streaming stores (`native.stream_copies`:
    those of 1 MiB or more), the rest one by one. FailedPrecondition when a region was closed or lost memory meanwhile.

    An upload's copies out of host regions are made so, together, once its stream has ended
    (`TensorAssembler`): the client has then written every byte and copies nothing more, so the
    copies may take every core. Made one at a time as each header arrived, they took one core
    beside the client's copies in: 256 MB of arrays the client had no need to copy (views of a
    fetch, sent back) went up in 43-51 ms that way, against 22-24 ms together (docs/perf.md,
    "Shared-memory uploads copied together").
    """
    with contextlib.ExitStack() as stack:
        for region in {id(region): region for region, _, _ in copies}.values():
            stack.enter_context(region.copying())
        for region, offset, target in copies:
            region.check_bounds(offset, target.numel(), "a tensor")
        # One native call for every copy, small ones included, by address: a dictionary of 2,000
        # small tensors spent more making a tensor over each source than copying it.
        host = all(region.device.type == "cpu" and native.plain_cpu(target) for region, _, target in copies)
        if host and native.copy_addresses(
            [(target.data_ptr(), region.address + offset, target.numel()) for region, offset, target in copies],
            torch.get_num_threads(),
        ):
            return
        for region, offset, target in copies:
            copy_bytes(target, region.bytes_at(offset, target.numel(), "a tensor"))


def write(region: Region, placements: Sequence[Placement], named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Copy each tensor (any device, any strides) into its place: one copy a byte (queued from a
    device the region reaches, and waited for once). Contiguous CPU tensors go in one call with
    streaming stores on the server's threads (`native.stream_copies`), the rest one by one."""
    with region.copying():
        targets = [
            (region.bytes_at(p.offset, p.nbytes, f"tensor '{p.name}'").view(p.dtype).view(p.shape), t.detach())
            for p, (_, t) in zip(placements, named) if p.nbytes
        ]
        for i in native.stream_copies(targets, torch.get_num_threads()):
            target, t = targets[i]
            copy_bytes(target, t, threads=True, queue=region.reaches(t.device))
        region.settle()  # the client reads the region once the call answers


def check(region: Region, p: Placement) -> None:
    """InvalidArgument unless `p` describes a tensor that lies inside the region, aligned."""
    checked_shape(p.name, p.shape, element_size(p.dtype))
    check_placed(region, p)


def check_placed(region: Region, p: Placement) -> None:
    """`check` for a placement whose shape was checked already (`checked_shape`)."""
    size = element_size(p.dtype)
    if math.prod(p.shape) * size != p.nbytes:
        raise InvalidArgument(
            f"tensor '{p.name}' of shape {list(p.shape)} and {size}-byte elements has "
            f"{math.prod(p.shape) * size} bytes, not the {p.nbytes} given"
        )
    if p.offset % size:
        raise InvalidArgument(f"tensor '{p.name}' starts at offset {p.offset}, not a multiple of its element size {size}")
    region.check_bounds(p.offset, p.nbytes, f"tensor '{p.name}'")


def read(
    region: Region, placements: Sequence[Placement],
    on_header: Callable[[str, int], torch.device | None] | None = None,
    allocate: Callable[[int], torch.Tensor] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """New tensors holding copies of the placed bytes (the client may reuse its region at once).

    Every placement is checked before anything is allocated; `on_header(name, nbytes)` runs before
    each tensor's allocation (the store reserves there), as for a streamed upload, and names the
    device the tensor will be held on: one the region reaches gets it straight (queued, and waited
    for once); the rest are new CPU tensors, from `allocate(nbytes)` when given (a uint8 CPU
    buffer: the server's `staging_buffer`, which reserves on the host a copy bound for a GPU, as for a
    streamed upload). `on_header` runs outside `region.copying()`: it may wait for the store, whose
    session end waits for the region's copies.
    """
    region.check_size()
    for p in placements:
        check(region, p)
    out = []
    for p in placements:
        held_on = on_header(p.name, p.nbytes) if on_header is not None else None
        direct = region.reaches(held_on)
        if direct and held_on is not None:
            t = torch.empty(p.shape, dtype=p.dtype, device=held_on)
        elif allocate is not None:
            t = allocate(p.nbytes).view(p.dtype).reshape(p.shape)
        else:
            t = torch.empty(p.shape, dtype=p.dtype)
        if p.nbytes:
            with region.copying():
                copy_bytes(t.view(-1).view(torch.uint8), region.bytes_at(p.offset, p.nbytes, f"tensor '{p.name}'"),
                           queue=direct)
            if p.dtype is torch.bool and bool((t.view(torch.uint8) > 1).any()):
                raise InvalidArgument(f"tensor '{p.name}' is bool but holds bytes other than 0 and 1")
        out.append((p.name, t))
    region.settle()
    return out
