"""Stepping a tensor through batches in place, as the reference's batch does.

A batch is the same tensor object narrowed along dimension 0 with `set_` on its own storage, so
every handle to the tensor (a model's inputs and `input(m)` alike) sees the same batch. Where the
tensor stands is read back from its storage offset, so no state is kept anywhere else. This needs
a contiguous tensor that spans its whole storage at full size, which every tensor the server
builds from uploaded data does.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidArgument


def _row(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


def full_size(t: torch.Tensor) -> int:
    """The first dimension of the tensor at full size, read from its storage.

    Raises:
        InvalidArgument: a 0-dim tensor, or one that does not span its own storage in row order.
    """
    if t.dim() == 0:
        raise InvalidArgument("batch: a 0-dim tensor has no first dimension to batch")
    row = _row(t)
    if not t.is_contiguous() or row == 0:
        raise InvalidArgument(f"batch: needs a contiguous, non-empty tensor, given shape {list(t.shape)}")
    elements = t.untyped_storage().nbytes() // t.element_size()
    if elements % row or t.storage_offset() % row:
        raise InvalidArgument("batch: the tensor is a view into larger storage; make a tensor of its own first")
    return elements // row


def restore(t: torch.Tensor) -> int:
    """Put the tensor back to full size in place; returns the full first dimension."""
    n = full_size(t)
    if t.storage_offset() != 0 or t.shape[0] != n:
        _narrow(t, 0, n)
    return n


def _narrow(t: torch.Tensor, start: int, length: int) -> None:
    row = _row(t)
    shape = (length, *t.shape[1:])
    with torch.no_grad():
        t.set_(t.untyped_storage(), start * row, shape, torch.empty(shape, device="meta").stride())


def position(t: torch.Tensor) -> int:
    """The first row of the batch t stands at (0 at full size)."""
    return t.storage_offset() // _row(t)


def seek(t: torch.Tensor, start: int, rows: int) -> None:
    """Narrow t in place to `rows` rows from row `start` (as a snapshot saw it).

    Raises:
        InvalidArgument: the range does not fit within the tensor's full size.
    """
    n = full_size(t)
    if not (0 <= start and 0 < rows and start + rows <= n):
        raise InvalidArgument(f"batch: rows {start}-{start + rows} do not fit a tensor of {n} rows")
    _narrow(t, start, rows)


def check_size(t: torch.Tensor, w: int) -> int:
    """The full size n, after checking that 0 < w < n as the reference requires."""
    n = full_size(t)
    if not 0 < w < n:
        raise InvalidArgument(f"batch: size {w} not in the range 1-{n - 1} (tensor size is {n} for dimension 0)")
    return n


def next_batch(t: torch.Tensor, w: int) -> bool:
    """Narrow t in place to its next batch of w rows and return True; after the last batch restore
    the full size and return False.

    Example: a 250-row tensor stepped with w=100 gives batches of 100, 100 and 50 rows, then False.
    """
    n = check_size(t, w)
    start = t.storage_offset() // _row(t)
    at_full = start == 0 and t.shape[0] == n
    nxt = 0 if at_full else start + t.shape[0]
    if nxt >= n:
        _narrow(t, 0, n)
        return False
    _narrow(t, nxt, min(w, n - nxt))
    return True
