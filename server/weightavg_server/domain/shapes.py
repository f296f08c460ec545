"""The shape a client declares for a tensor it sends (in a stream's header or a shared memory
placement), checked once for both ways in: torch would otherwise fail later, with an error that is
not the client's to read (a stride overflow is a RuntimeError, answered INTERNAL)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import InvalidArgument

MAX_DIMS = 32
"""Most dimensions a sent tensor may have (torch's own kernels take at most 25)."""


def checked_shape(name: str, dims: Iterable[int], itemsize: int = 1) -> tuple[int, ...]:
    """The shape as a tuple; InvalidArgument for too many dimensions, a negative one, or strides
    that overflow int64 (which torch refuses even for a tensor with no elements): in elements, and
    for a tensor of no elements also in bytes of `itemsize` each. numpy refuses those ('array is too
    big'), so a shape such as [0, 2**61] float64, which torch holds, could be sent but never fetched
    by numpy; a tensor with elements and that many bytes is over every byte cap, and refused there."""
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor '{name}' has {len(shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor '{name}' has a negative dimension in shape {list(shape)}")
    strides = math.prod(max(d, 1) for d in shape)
    if strides >= 2**63 or (0 in shape and strides * max(itemsize, 1) >= 2**63):
        raise InvalidArgument(f"tensor '{name}' has a shape {list(shape)} whose strides overflow int64")
    return shape
