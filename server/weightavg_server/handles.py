"""What a handle holds: its tensors (for listings and byte counts) and moving it between devices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import dictionaries
from .errors import InvalidArgument
from .registry import Entry, Kind, TensorHolder


@dataclass(frozen=True)
class HandleSummary:
    """Device, common dtype, byte count and tensor count of one handle's tensors."""

    device: str
    dtype: torch.dtype | None
    nbytes: int
    tensor_count: int


def tensors_of(entry: Entry) -> Iterator[torch.Tensor]:
    """Every tensor an entry holds (a module's parameters and buffers, a dictionary's entries...)."""
    obj = entry.obj
    if entry.kind is Kind.TENSOR:
        yield obj.tensor
    elif entry.kind is Kind.DICTIONARY:
        yield from obj.entries.values()
    elif entry.kind is Kind.MODULE:
        yield from obj.parameters()
        yield from obj.buffers()
    elif hasattr(obj, "tensors"):
        yield from obj.tensors()


def summarize(entry: Entry) -> HandleSummary:
    """Summarize an entry's tensors; storage shared by several tensors is counted once."""
    tensors = list(tensors_of(entry))
    devices = {str(t.device) for t in tensors}
    dtypes = {t.dtype for t in tensors}
    seen: set[tuple[str, int]] = set()
    nbytes = 0
    for t in tensors:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            nbytes += t.untyped_storage().nbytes()
    return HandleSummary(
        device=",".join(sorted(devices)),
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
        nbytes=nbytes,
        tensor_count=len(tensors),
    )


def move(entry: Entry, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Move a tensor, dictionary or module in place, so every handle to it sees the move."""
    if entry.kind is Kind.TENSOR:
        holder: TensorHolder = entry.obj
        holder.tensor = holder.tensor.to(device=device or holder.tensor.device, dtype=dtype or holder.tensor.dtype)
    elif entry.kind is Kind.DICTIONARY:
        dictionaries.move(entry.obj, device, dtype)
    elif entry.kind is Kind.MODULE:
        module: torch.nn.Module = entry.obj
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise InvalidArgument(f"a module's parameters can only be converted to a floating dtype, not {dtype}")
        module.to(device=device, dtype=dtype)
    else:
        raise InvalidArgument(f"cannot move a {entry.kind.value}: move its module instead")
