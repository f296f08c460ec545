"""Caps on what the server holds: live handles and tensor bytes per device (0 bytes means the device's size)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=None)
def device_capacity(device: str) -> int:
    """Bytes of memory a device has: a CUDA device's total memory, or the host's physical memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class Limits:
    """What the registry refuses to exceed.

    Args:
        max_handles: most live handles at once; 0 means no cap.
        max_device_bytes: most tensor bytes held on any one device; 0 means the device's own memory
            size, so a request that could never fit is refused before it allocates anything.
        max_sessions: most sessions open at once; 0 means no cap.
    """

    max_handles: int = 0
    max_device_bytes: int = 0
    max_sessions: int = 0

    def bytes_cap(self, device: str) -> int:
        """The byte cap for one device ("cpu", "cuda:0")."""
        return self.max_device_bytes if self.max_device_bytes > 0 else device_capacity(device)
