"""Pinned host memory for the copies between a CUDA device and the host: fetch replies and uploads.

A copy between a CUDA tensor and newly allocated pageable memory runs far below the link: the driver
stages it through a pinned buffer of its own, and every new page faults in first. On an H200 machine
(docs/perf.md, "GPU"), 16 tensors of 4 MB from the device: 1.43 GB/s into new pageable tensors, 12
into reused pageable ones, 50 into pinned blocks from torch's caching host allocator. So the server
takes its staging buffers from that allocator, which keeps freed blocks (each rounded up to a power
of two) for the next copy of that size.

The allocator never gives memory back on its own, so a bound (`CACHE_BYTES`, or the server's
--pinned-cache-bytes) limits what it holds: a buffer that would grow it past the bound takes
pageable memory instead, after an idle cache (no block in use) is emptied. Small buffers
(`MIN_BYTES`) and servers without CUDA take pageable memory always.
"""

from __future__ import annotations

import threading

import torch

MIN_BYTES = 64 << 10
"""Below this a buffer is pageable: its copy is latency-bound, and a pinned block would be rounded up
and kept for little gain."""

CACHE_BYTES = 1 << 30
"""By default, the most pinned memory the caching host allocator may hold for the staging buffers."""

_lock = threading.Lock()
_cache_bytes = CACHE_BYTES


def set_cache_bytes(nbytes: int) -> None:
    """This process's bound (the server's --pinned-cache-bytes): one, as the allocator is one per
    process; 0 stages every copy through pageable memory.

    Raises:
        ValueError: a negative bound.
    """
    global _cache_bytes
    if nbytes < 0:
        raise ValueError(f"--pinned-cache-bytes must be 0 (no pinned staging) or more; got {nbytes}")
    _cache_bytes = nbytes


def block_bytes(nbytes: int) -> int:
    """The pinned block torch's caching host allocator takes for nbytes: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def _empty_idle_cache() -> bool:
    """Return the allocator's cached blocks to CUDA; False where this torch has no call for it."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is None:
        return False
    empty()
    return True


def _room(nbytes: int) -> bool:
    """Whether a pinned block for nbytes keeps the allocator within the bound (emptying an idle cache
    to make room). False where this torch reports no host memory statistics: no bound could be kept."""
    need = block_bytes(nbytes)
    if need > _cache_bytes:
        return False
    stats = torch.cuda.host_memory_stats()
    held, active = stats.get("allocated_bytes.current"), stats.get("active_bytes.current")
    if held is None or active is None:
        return False
    if int(held) + need <= _cache_bytes:
        return True
    return int(active) == 0 and _empty_idle_cache()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, near: torch.device) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor to copy to or from a tensor on `near`: pinned where `near`
    is a CUDA device, the tensor is at least MIN_BYTES and the cache has room; pageable otherwise.

    Example: host = empty(t.shape, t.dtype, t.device); host.copy_(t, non_blocking=host.is_pinned())
    """
    if near.type != "cuda":
        return torch.empty(shape, dtype=dtype)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes >= MIN_BYTES:
        with _lock:
            if _room(nbytes):
                return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.empty(shape, dtype=dtype)

