"""Host memory kept for reuse: the blocks under the large CPU tensors the server allocates (uploads,
flat copies, a fetch's copies), taken back into a bounded cache when the last tensor over them is
freed.

Why: a first touch of new memory faults every page in and zeroes it. On the project's VM, 256 MB
copied into 16 new tensors took 135-155 ms, into tensors over kept memory 16-20 ms (docs/perf.md,
"Kept host memory"; for replies, "Reply buffers"). The C allocator gives large blocks back to the
system when they are freed (each from an mmap of its own, or a heap trimmed at its top), so every
upload of the same tensors, every copy of the same module and every fetch faulted its memory in
anew.

How: a block is a uint8 CPU tensor. A caller gets a tensor over a numpy view of it
(`torch.from_numpy`), whose storage holds that view; when the storage goes (the last tensor over
it freed, by whatever path), a finalizer on the view hands the block back. Idle blocks are kept by
size, the newest reused first, within a bound in bytes (`--host-cache-bytes`: the oldest go first;
the bound also counts the bytes of lent blocks that their tensors do not use, see `lending`)
and in time (`trim`, every second from the server, and under torchrun from each other rank between
its commands: a block idle for `IDLE_SECONDS`, --host-cache-idle-seconds, goes), so a quiet server
gives its memory back. Tensors that objects keep take a block of their exact size; a
fetch's copies, which live only while the reply streams, may take one up to twice their size
(`lending`).

What it does not change: values (a new tensor's bytes are uninitialised either way, as
torch.empty's) and accounting (the store counts a tensor's storage, exactly the bytes asked,
reserved by the caller before `empty`). An idle block belongs to no tenant, as the pinned cache's
blocks do (pinned.py); the bound is what it may add to the server's memory beside its caps.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
import numpy.typing as npt
import torch

from . import native

log = logging.getLogger("weightavg.server")

MIN_BYTES: Final = 1 << 20
"""Smaller blocks take torch.empty as they are: the C allocator keeps small blocks itself."""

CACHE_BYTES: Final = 1 << 30
"""By default, the most bytes of idle blocks kept (the server's --host-cache-bytes)."""

IDLE_SECONDS: Final = 30.0
"""A block idle this long goes back to the system at the next `trim`."""

Block = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and has done since the server started."""

    idle_bytes: int
    idle_blocks: int
    reused: int
    """Tensors made over a kept block."""
    allocated: int
    """Tensors (from MIN_BYTES) made over a new block."""


class HostCache:
    """Blocks of CPU memory kept for reuse (see the module docstring). Thread-safe: finalizers hand
    blocks back from whichever thread frees the last tensor, through a deque (no lock, so a
    finalizer that runs inside a locked section, at a garbage collection, cannot deadlock)."""

    def __init__(
        self, capacity: int = CACHE_BYTES, idle_seconds: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._returned: collections.deque[tuple[Block, int]] = collections.deque()
        """Blocks handed back, each with the bytes its tensor had asked."""
        self._idle: dict[int, list[tuple[float, Block]]] = {}
        """Idle blocks by size, each list oldest first."""
        self._idle_bytes = 0
        self._spare = 0
        """Bytes of lent blocks beyond what their tensors asked (a reply's copies in a kept block of up to
        twice their size: `up_to`). No cap counts them, so they count within the bound with the idle
        blocks: an 8 MiB block lent to a 5 MiB reply held 3 MiB past a bound of 8 MiB, idle blocks
        filling it beside (found by review)."""
        self._reused = 0
        self._allocated = 0

    def configure(self, capacity: int, idle_seconds: float = IDLE_SECONDS) -> None:
        """Set the bounds (0 bytes: keep nothing; blocks lent now are dropped when they come back).

        Raises:
            ValueError: a negative capacity or a non-positive idle time.
        """
        if capacity < 0:
            raise ValueError(f"--host-cache-bytes must be 0 (keep no freed host memory) or more; got {capacity}")
        if not idle_seconds > 0:
            raise ValueError(f"the host cache's idle time must be positive; got {idle_seconds}")
        with self._lock:
            self._capacity, self._idle_seconds = capacity, idle_seconds
            dropped = self._settle()
        del dropped

    def empty(self, nbytes: int, up_to: int = 0, *, huge: bool = True) -> torch.Tensor:
        """An uninitialised 1-D uint8 CPU tensor of nbytes: over a kept block of that size (or, with
        `up_to`, the smallest kept one of at most up_to bytes) where the cache has one, else over a
        new block (on huge pages where large and `huge`: `native.advise_huge_pages`)."""
        if nbytes < MIN_BYTES:
            return _new_block(nbytes, huge)
        if nbytes > self._capacity:  # never kept (a bound of 0 keeps none), but a new large block all the same
            with self._lock:
                self._allocated += 1
            return self._new_block(nbytes, huge)
        with self._lock:
            dropped = self._settle()
            sizes = [size for size in self._idle if nbytes <= size <= max(up_to, nbytes)]
            block = None
            if sizes:
                size = min(sizes)
                kept = self._idle[size]
                block = kept.pop()[1]
                if not kept:
                    del self._idle[size]
                self._idle_bytes -= size
                self._spare += size - nbytes  # idle + spare falls by nbytes: still within the bound
                self._reused += 1
            else:
                self._allocated += 1
        del dropped
        if block is None:
            block = self._new_block(nbytes, huge).numpy()
        return self._lend(block, nbytes)

    def _new_block(self, nbytes: int, huge: bool = True) -> torch.Tensor:
        """A new block of nbytes; where the host has no memory for it, the idle blocks are given back
        (and the C allocator's freed memory with them) and it is tried once more. Memory this cache
        keeps for reuse must never be why a call runs out: such a call was answered "server out of
        memory" with up to --host-cache-bytes idle here (found by review).

        Raises:
            RuntimeError: torch's "can't allocate memory" still (the server answers RESOURCE_EXHAUSTED).
        """
        try:
            return _new_block(nbytes, huge)
        except RuntimeError as exc:
            if "can't allocate memory" not in str(exc):
                raise
        self.clear()
        release_freed_memory()
        return _new_block(nbytes, huge)

    def trim(self) -> int:
        """Drop the blocks idle for `IDLE_SECONDS` or more; the bytes dropped."""
        with self._lock:
            dropped = self._settle()
            horizon = self._clock() - self._idle_seconds
            for size in list(self._idle):
                kept = self._idle[size]
                while kept and kept[0][0] <= horizon:
                    dropped.append(kept.pop(0)[1])
                    self._idle_bytes -= size
                if not kept:
                    del self._idle[size]
        return sum(block.nbytes for block in dropped)

    def clear(self) -> None:
        """Drop every idle block (blocks lent now come back later, and are kept again)."""
        with self._lock:
            dropped = self._settle()
            dropped += [block for kept in self._idle.values() for _, block in kept]
            self._idle.clear()
            self._idle_bytes = 0
        del dropped

    def stats(self) -> CacheStats:
        with self._lock:
            dropped = self._settle()
            stats = CacheStats(
                self._idle_bytes, sum(map(len, self._idle.values())), self._reused, self._allocated
            )
        del dropped
        return stats

    def _lend(self, block: Block, nbytes: int) -> torch.Tensor:
        """A tensor over the block's first nbytes whose storage, when freed, hands the block back."""
        view = block[:nbytes]
        finalizer = weakref.finalize(view, self._returned.append, (block, nbytes))
        finalizer.atexit = False
        return torch.from_numpy(view)

    def _settle(self) -> list[Block]:
        """Under the lock: take the blocks handed back into the idle lists, then drop the oldest idle
        blocks past the bound (idle bytes and lent blocks' spare bytes together). Returns the dropped
        blocks, for the caller to let go of after the lock."""
        now = self._clock()
        dropped: list[Block] = []
        while self._returned:
            block, asked = self._returned.popleft()
            self._idle.setdefault(block.nbytes, []).append((now, block))
            self._idle_bytes += block.nbytes
            self._spare -= block.nbytes - asked
        while self._idle and self._idle_bytes + self._spare > self._capacity:
            size = min(self._idle, key=lambda s: self._idle[s][0][0])
            kept = self._idle[size]
            dropped.append(kept.pop(0)[1])
            self._idle_bytes -= size
            if not kept:
                del self._idle[size]
        return dropped


def _new_block(nbytes: int, huge: bool = True) -> torch.Tensor:
    block = torch.empty(nbytes, dtype=torch.uint8)
    if huge:
        native.advise_huge_pages(block)
    return block


_cache = HostCache()


def cache() -> HostCache:
    """This process's cache (one, as the server is one per process; configured by the server)."""
    return _cache


def empty(nbytes: int, *, huge: bool = True) -> torch.Tensor:
    """`HostCache.empty` of this process's cache."""
    return _cache.empty(nbytes, huge=huge)


def empty_as(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor of numel elements of dtype, from this process's cache."""
    return _cache.empty(numel * dtype.itemsize).view(dtype)


@contextlib.contextmanager
def lending() -> Iterator[Callable[[int], torch.Tensor]]:
    """For copies that live only as long as a reply streams: blocks of at least the bytes asked, a
    kept one of up to twice that where there is one (fetches of about the same size reuse one
    another's memory). Each comes back when the last tensor over it goes, in the block or after;
    while lent, its bytes beyond those asked count within the cache's bound."""
    yield lambda nbytes: _cache.empty(nbytes, up_to=2 * nbytes)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], trim)


_TRIM = _malloc_trim()


def release_freed_memory() -> bool:
    """Give the memory the C allocator holds freed back to the system (glibc's malloc_trim(0));
    False where it cannot (another C library) or had nothing to give.

    Why: glibc keeps what its heaps and per-thread arenas free for reuse. After a burst of calls
    (uploads, copies, epochs, fetches) a server holding nothing kept 1.4 GB resident, 1.0 GB of it
    freed memory: malloc_trim took it to 0.41 GB, below its 0.53 GB at start (docs/perf.md, "Freed
    memory given back")."""
    return _TRIM is not None and _TRIM(0) == 1


class IdleRelease:
    """Calls `release` once each time the server has been idle (no call started, none running) for
    `idle_seconds`, and again in that idle spell whenever the cache drops idle blocks (which, up to
    glibc's mmap threshold of 32 MiB, go back to its heaps, not to the system): `tick` runs once a
    second from the server's reaper (under torchrun, each other rank's `FollowerReaper`, whose calls
    are the commands it executed). Not on every tick, since a trim walks every arena (milliseconds
    for gigabytes) and an idle server frees nothing else.

    `calls` counts the calls started, `running` the calls not yet finished (none, by default: a
    `FollowerReaper` ticks between commands only). A spell starts only once none runs: counting
    starts alone, a server busy with one long call (an epoch of minutes, a reply streaming to a slow
    reader) counted as idle 30 s after it began, and was trimmed under it (found by review)."""

    def __init__(
        self, calls: Callable[[], int], idle_seconds: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic, release: Callable[[], bool] = release_freed_memory,
        running: Callable[[], int] = lambda: 0,
    ) -> None:
        self._calls = calls
        self._running = running
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._release = release
        self._seen = calls()
        self._since = clock()
        self._released = False

    def tick(self, dropped: int = 0) -> bool:
        """Release if the idle spell has lasted long enough and nothing was released in it since the
        cache last dropped blocks (`dropped`: the bytes its `trim` gave up this tick); whether it
        released."""
        now, calls = self._clock(), self._calls()
        if calls != self._seen or self._running():
            self._seen, self._since, self._released = calls, now, False
            return False
        if dropped:
            self._released = False
        if self._released or now - self._since < self._idle_seconds:
            return False
        self._released = True
        before = _resident_bytes()
        released = self._release()
        if released:
            log.debug("idle: gave %d MB of freed memory back to the system", (before - _resident_bytes()) >> 20)
        return released


def _resident_bytes() -> int:
    """This process's resident set (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = 4096
