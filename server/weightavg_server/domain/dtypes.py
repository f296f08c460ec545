"""The one table of tensor dtypes the server accepts, by the name clients, logs and snapshots use."""

from __future__ import annotations

import math

import torch

from .errors import InvalidArgument

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def name(dtype: torch.dtype) -> str:
    """The dtype as messages name it: the table's name ("int64"), which is what a client sends, not
    torch's ("torch.int64"); a dtype outside the table without torch's prefix."""
    return NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def by_name(name: str) -> torch.dtype:
    """The dtype called `name`; InvalidArgument naming the valid ones otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unsupported dtype '{name}'; expected one of {', '.join(DTYPES)}") from None


def holds_exactly(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every value of the integer (or bool) tensor t converts to the floating (or complex)
    `dtype` exactly: its magnitude fits the dtype's significand (int16 always fits float32, 70000
    does not fit float16, which holds it as inf)."""
    digits = 1 - int(math.log2(torch.finfo(dtype).eps))  # significand bits: 24 for float32
    if t.dtype == torch.bool or (torch.iinfo(t.dtype).bits <= digits and t.dtype != torch.int64):
        return True
    return t.numel() == 0 or max(abs(int(t.min())), abs(int(t.max()))) <= 2**digits
