"""Host memory for the copies a fetch streams from, reused from one reply to the next.

A fetch copies the tensors it sends under the object's lock (`tensors.host_copies`) and streams from
the copies, so a slow reader never holds up the object's writers. That copy comes before the first
byte goes out, and new memory is slow to touch: on the project's 2-vCPU VM, 256 MB copied into new
tensors took 133-145 ms, into memory touched before 38 ms (docs/perf.md, "Reply buffers"). So a
reply's CPU copies share one block (`lending`), which goes back to a small cache when the reply is
done, for the next reply of about that size. CUDA tensors go to pinned blocks instead (pinned.py),
whose allocator already keeps its blocks.

The cache keeps at most `CACHE_BYTES` of free blocks: memory the process holds while idle, charged to
no object, as the pinned cache is. A reply's own copies are reserved as before; a block reused for it
may be up to twice as large (`take`), and allocates nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from . import native

CACHE_BYTES = 1 << 30
"""The most bytes of free blocks kept for the next replies."""

MIN_BYTES = 1 << 20
"""Replies of fewer CPU bytes copy into plain tensors: malloc reuses small blocks by itself."""

_lock = threading.Lock()
_free: list[torch.Tensor] = []


def take(nbytes: int) -> torch.Tensor:
    """A uint8 CPU block of at least `nbytes`: the smallest free one of at most twice that, or a new
    one (advised for huge pages where large: `native.advise_huge_pages`)."""
    with _lock:
        fits = [i for i, b in enumerate(_free) if nbytes <= b.numel() <= 2 * nbytes]
        if fits:
            return _free.pop(min(fits, key=lambda i: _free[i].numel()))
    block = torch.empty(nbytes, dtype=torch.uint8)
    native.advise_huge_pages(block)
    return block


def give_back(block: torch.Tensor) -> None:
    """Keep a block from `take`, which nothing reads any more, for a later reply; the largest free
    blocks are let go while the cache holds more than CACHE_BYTES."""
    with _lock:
        _free.append(block)
        _free.sort(key=lambda b: b.numel())
        while _free and sum(b.numel() for b in _free) > CACHE_BYTES:
            _free.pop()


def cached_bytes() -> int:
    """Bytes of free blocks kept now."""
    with _lock:
        return sum(b.numel() for b in _free)


def clear() -> None:
    """Let every free block go."""
    with _lock:
        _free.clear()


@contextlib.contextmanager
def lending() -> Iterator[Callable[[int], torch.Tensor]]:
    """`take` for the length of the block, every block taken given back at its end: for copies that
    nothing reads after it (a reply that has been sent)."""
    taken: list[torch.Tensor] = []

    def lend(nbytes: int) -> torch.Tensor:
        block = take(nbytes)
        taken.append(block)
        return block

    try:
        yield lend
    finally:
        for block in taken:
            give_back(block)
