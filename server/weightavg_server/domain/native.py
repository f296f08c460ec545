"""The server's compiled helpers (`_native.c`), when the install could build them: the fused CPU
lerp (used through lerp.py, which checks it against torch) and huge-page advice for large CPU
buffers. Without a C compiler at install neither exists, and the server does the same work with
torch alone: the same numbers, slower on large CPU averages (setup.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch

Lerp = Callable[[int, int, int, int, float, int], None]
"""lerp(kind, avg address, value address, count, weight, threads): see `_native.c`."""

Advise = Callable[[int, int], int]


def _load() -> tuple[Lerp | None, Advise | None]:
    try:
        from ._native import advise_huge_pages, lerp
    except ImportError:  # not built: no C compiler or Python headers at install (setup.py)
        return None, None
    return lerp, advise_huge_pages


LERP, _ADVISE = _load()

HUGE_PAGE_MIN_BYTES: Final = 32 << 20
"""Buffers from this size are advised: glibc serves them from an mmap of their own (its mmap
threshold grows to 32 MiB at most), so the advice covers only their pages and ends with them."""


def advise_huge_pages(buffer: torch.Tensor) -> int:
    """Ask for transparent huge pages under a new CPU buffer of at least `HUGE_PAGE_MIN_BYTES`, before
    anything is written to it (a page touched first stays small); the bytes advised, 0 if none.

    Streaming 100 MB through the fused lerp took 8.3-8.5 ms on huge pages against 9.3-9.5 ms on 4 KiB
    pages (docs/perf.md, "Native lerp"). The values and the accounting are unchanged: the buffer is
    the same allocation, only how the kernel maps it differs.
    """
    nbytes = buffer.numel() * buffer.element_size()
    if _ADVISE is None or not buffer.is_cpu or nbytes < HUGE_PAGE_MIN_BYTES:
        return 0
    return _ADVISE(buffer.data_ptr(), nbytes)
