"""Pinned host memory for the copies between a CUDA device and the host: fetch replies and uploads.

A copy between a CUDA tensor and newly allocated pageable memory runs far below the link: the driver
stages it through a pinned buffer of its own, and every new page faults in first. On an H200 machine
(docs/perf.md, "GPU"), 16 tensors of 4 MB from the device: 1.43 GB/s into new pageable tensors, 12
into reused pageable ones, 50 into pinned blocks from torch's caching host allocator. So the server
takes its staging buffers from that allocator, which keeps freed blocks (each rounded up to a power
of two) for the next copy of that size.

The allocator never gives memory back on its own, so a bound (`CACHE_BYTES`, or the server's
--pinned-cache-bytes) limits what it holds: a buffer that would grow it past the bound takes
pageable memory instead, after an idle cache (no block in use) is emptied, as does one the host
refuses to pin. Small buffers
(`MIN_BYTES`) and servers without CUDA take pageable memory always.

Memory the server does not allocate can be page-locked in place too (`lock`): a client's shared
memory region on a CUDA server, so that an upload's bytes go from the region to the device, and a
fetch's from the device to the region, as the link's DMA, with no staging copy on the CPU.
"""

from __future__ import annotations

import ctypes
import functools
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
    _cache_bytes = _bound(nbytes, "--pinned-cache-bytes", "no pinned staging")


def _bound(nbytes: int, flag: str, zero: str) -> int:
    """nbytes as a bound set by `flag`, whose 0 means `zero`; ValueError naming the flag when negative."""
    if nbytes < 0:
        raise ValueError(f"{flag} must be 0 ({zero}) or more; got {nbytes}")
    return nbytes


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
            try:
                if _room(nbytes):
                    return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError:
                # Page-locked memory the host will not give (cudaHostAlloc failing, say) failed the
                # fetch or upload that staged through it, INTERNAL, where pageable memory gives the
                # same bytes, staged slower (found by review; `tests/test_domain_pinned.py`).
                pass
    return torch.empty(shape, dtype=dtype)



LOCKED_BYTES = 32 << 30
"""By default, the most bytes of memory this process page-locks in place at once (`lock`): locked
pages cannot be swapped or moved, so a bound keeps a client that registers many large regions from
locking the host's memory. A region past it stays pageable: the same results, staged as before."""

_locked_bound = LOCKED_BYTES


def set_locked_bytes(nbytes: int) -> None:
    """This process's bound on memory locked in place (the server's --max-locked-bytes); 0 locks
    nothing, so every region stays pageable. Regions locked already stay locked until they close.

    Raises:
        ValueError: a negative bound.
    """
    global _locked_bound
    _locked_bound = _bound(nbytes, "--max-locked-bytes", "lock no shared memory region")

_PORTABLE = 0x01
"""CU_MEMHOSTREGISTER_PORTABLE: locked for every CUDA context, not only the current one."""

_locked_bytes = 0


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """The CUDA driver's library, for cuMemHostRegister and cuMemHostUnregister: the driver API, whose
    errors (unlike the runtime's cudaHostRegister) leave no stale error for torch's next launch check
    to report. None where it cannot be loaded."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        register, unregister = driver.cuMemHostRegister_v2, driver.cuMemHostUnregister
    except (OSError, AttributeError):
        return None
    register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    register.restype = ctypes.c_int
    unregister.argtypes = [ctypes.c_void_p]
    unregister.restype = ctypes.c_int
    return driver


def locked_bytes() -> int:
    """Bytes page-locked in place by `lock` now."""
    with _lock:
        return _locked_bytes


def lock(address: int, nbytes: int, device: torch.device) -> bool:
    """Page-lock host memory [address, address + nbytes) in place (cuMemHostRegister, portable), so
    that torch sees it as pinned: copies between it and `device` run as DMA, without blocking and
    with no staging copy. Whether it did: False, with nothing locked, where `device` is not CUDA, the
    bytes would take the process past its bound (`set_locked_bytes`), or the driver or the device refuses (a sandbox,
    a limit, a broken context): the region then works as before, staged, and registering it never
    fails for this.

    The memory must stay mapped until `unlock`."""
    global _locked_bytes
    if device.type != "cuda" or nbytes <= 0:
        return False
    driver = _driver()
    if driver is None:
        return False
    with _lock:
        if _locked_bytes + nbytes > _locked_bound:
            return False
        _locked_bytes += nbytes  # counted first, so two registrations at once cannot both pass the bound
    done = False
    try:
        with torch.cuda.device(device):
            torch.cuda.current_stream(device).query()  # the device's context, current in this thread
            done = int(driver.cuMemHostRegister_v2(address, nbytes, _PORTABLE)) == 0
    except RuntimeError:  # torch's CUDA errors: the device cannot take it; left pageable
        done = False
    finally:
        if not done:
            with _lock:
                _locked_bytes -= nbytes
    return done


def unlock(address: int, nbytes: int, device: torch.device) -> None:
    """Undo `lock(address, nbytes, device)`, after every copy queued on `device` has finished (an
    unlocked page may move, and a DMA still reading it would read whatever lands there)."""
    global _locked_bytes
    driver = _driver()
    try:
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)
            if driver is not None:
                driver.cuMemHostUnregister(address)
    finally:  # a failed wait (a broken context) leaves nothing to copy to or from these pages either
        with _lock:
            _locked_bytes -= nbytes
