"""The client's side of shared memory: one POSIX shared memory region, grown as needed, through
which tensor bytes move to and from a server on the same host (Client(..., shm=True))."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import numpy.typing as npt

from . import wire
from .v1 import weightavg_pb2 as pb

REGION_NAME = "client"
"""The name this client registers its reused region under (regions are per session): uploads, and
fetches that fit it, which are copied out."""
LARGE_FETCH_NAME = "fetch"
"""The name of the region a large fetch gets to itself: the arrays returned are views of it, with
no copy on this side; the next large fetch registers a new one under this name."""
SMALL_FETCH_BYTES = 4 << 20
"""Fetches up to this size go through the reused region and are copied out: one round trip."""
ALIGN = 64
"""Tensors start on 64-byte boundaries, as the server places them."""
MIN_BYTES = 1 << 20


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SharedRegion:
    """A region registered with the server; replaced by a larger one when a call needs more.

    The file's name is unlinked as soon as the server has mapped it (or refused it): from then on
    only this process and the server hold the memory, nothing is left in /dev/shm if either dies,
    and a leaked name opens nothing.
    """

    def __init__(self) -> None:
        self._memory: shared_memory.SharedMemory | None = None
        self.size = 0

    def ensure(self, nbytes: int, register: Callable[[str, int], None]) -> memoryview:
        """The region's bytes, at least `nbytes` of them (registering a larger region if needed)."""
        if self._memory is None or self.size < nbytes:
            size = max(_aligned(nbytes), 2 * self.size, MIN_BYTES)
            memory = shared_memory.SharedMemory(create=True, size=size)
            try:
                register(memory.name.lstrip("/"), size)
            except BaseException:
                memory.close()
                raise
            finally:
                memory.unlink()
            self.close()
            self._memory, self.size = memory, size
        buf = self._memory.buf
        assert buf is not None
        return buf

    def fresh(self, nbytes: int, register: Callable[[str, int], None]) -> memoryview:
        """A new region of `nbytes` for one fetch, replacing the current one here; its memory lives
        as long as the arrays that view it (closing the last view unmaps it)."""
        memory = shared_memory.SharedMemory(create=True, size=max(_aligned(nbytes), ALIGN))
        try:
            register(memory.name.lstrip("/"), memory.size)
        finally:
            memory.unlink()
        buf = memory.buf
        assert buf is not None
        # Forget the SharedMemory object without closing its mapping: the arrays keep `buf` and with
        # it the mapping alive (SharedMemory.close would refuse while they exist).
        memory._buf = None  # type: ignore[attr-defined]
        memory._mmap = None  # type: ignore[attr-defined]
        return buf

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory, self.size = None, 0


def layout(items: Sequence[tuple[str, Any]]) -> tuple[list[tuple[str, npt.NDArray[Any], pb.SharedTensor]], int]:
    """Arrays to upload and where each goes (64-byte aligned); the bytes they take."""
    placed, at = [], 0
    for name, value in items:
        array = wire.to_array(value)
        message = pb.SharedTensor(
            name=name, dtype=wire._CODES[array.dtype], shape=array.shape, offset=at, byte_size=array.nbytes
        )
        placed.append((name, array, message))
        at = _aligned(at + array.nbytes)
    return placed, at


def write(buf: memoryview, placed: Sequence[tuple[str, npt.NDArray[Any], pb.SharedTensor]]) -> None:
    """Copy each array into its place (one copy a byte)."""
    for _, array, message in placed:
        if array.nbytes:
            target = np.frombuffer(buf, np.uint8, count=array.nbytes, offset=message.offset)
            target[:] = array.reshape(-1).view(np.uint8)
            del target


def read(
    buf: memoryview, tensors: Sequence[pb.SharedTensor], copy: bool = True
) -> list[tuple[str, npt.NDArray[Any]]]:
    """Arrays of the tensors the server wrote: new arrays holding copies (the region is reused next
    call), or with copy=False views of the region (one the caller does not reuse)."""
    out = []
    for t in tensors:
        dtype = wire._DTYPES[t.dtype]
        shape = tuple(t.shape)
        if t.byte_size != math.prod(shape) * dtype.itemsize or t.offset < 0 or t.offset + t.byte_size > len(buf):
            raise ValueError(f"the server placed tensor '{t.name}' outside the shared memory region")
        if not copy:
            out.append((t.name, np.frombuffer(buf, dtype, count=math.prod(shape), offset=t.offset).reshape(shape)))
            continue
        array = np.empty(shape, dtype)
        if t.byte_size:
            source = np.frombuffer(buf, np.uint8, count=t.byte_size, offset=t.offset)
            array.reshape(-1).view(np.uint8)[:] = source
            del source
        out.append((t.name, array))
    return out
