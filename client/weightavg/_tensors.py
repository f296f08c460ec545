"""numpy arrays on the wire: dtype codes, and raw little-endian bytes split into and joined from chunks."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from .v1 import weightavg_pb2 as pb

CHUNK_BYTES = 4 << 20
"""4 MiB chunks: measured fastest on loopback, and far below any message cap."""

_DTYPES: dict[pb.Dtype.ValueType, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_FLOAT64: np.dtype(np.float64),
    pb.DTYPE_FLOAT16: np.dtype(np.float16),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_INT8: np.dtype(np.int8),
    pb.DTYPE_UINT8: np.dtype(np.uint8),
    pb.DTYPE_INT16: np.dtype(np.int16),
    pb.DTYPE_INT32: np.dtype(np.int32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_BOOL: np.dtype(np.bool_),
    pb.DTYPE_COMPLEX64: np.dtype(np.complex64),
    pb.DTYPE_COMPLEX128: np.dtype(np.complex128),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def to_array(value: Any) -> npt.NDArray[Any]:
    """A contiguous little-endian array for a value: arrays as they are, Python ints int64, floats float64."""
    array = np.asarray(value)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _CODES:
        raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(str(d) for d in _CODES)}")
    return array if array.flags.c_contiguous else array.copy(order="C")


def array_chunks(name: str, value: Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Chunks for one array: a header chunk with name, dtype, shape and the first bytes, then data."""
    array = to_array(value)
    raw = array.reshape(-1).view(np.uint8).data  # a memoryview: slicing copies nothing
    yield pb.TensorChunk(
        name=name, dtype=_CODES[array.dtype], shape=list(array.shape), data=raw[:chunk_bytes].tobytes()
    )
    for start in range(chunk_bytes, len(raw), chunk_bytes):
        yield pb.TensorChunk(data=raw[start:start + chunk_bytes].tobytes())


def mapping_chunks(values: Iterable[tuple[str, Any]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Chunks for several named arrays, one after another."""
    for name, value in values:
        yield from array_chunks(name, value, chunk_bytes)


def join_chunks(chunks: Iterable[pb.TensorChunk]) -> list[tuple[str, npt.NDArray[Any]]]:
    """Named arrays from a stream of chunks, each filled into one preallocated buffer."""
    result: list[tuple[str, npt.NDArray[Any]]] = []
    name = ""
    dtype: np.dtype[Any] | None = None
    shape: tuple[int, ...] = ()
    buffer = np.empty(0, np.uint8)
    filled = 0
    for chunk in chunks:
        if chunk.dtype != pb.DTYPE_UNSPECIFIED:
            if dtype is not None:
                raise ValueError(f"server stream broke off inside tensor '{name}'")
            name, dtype, shape = chunk.name, _DTYPES[chunk.dtype], tuple(chunk.shape)
            buffer = np.empty(math.prod(shape) * dtype.itemsize, np.uint8)
            filled = 0
        data = chunk.data
        if data:
            buffer[filled:filled + len(data)] = np.frombuffer(data, np.uint8)
            filled += len(data)
        if dtype is not None and filled == buffer.size:
            result.append((name, buffer.view(dtype).reshape(shape)))
            dtype = None
    if dtype is not None:
        raise ValueError(f"server stream ended inside tensor '{name}'")
    return result


def plain(array: npt.NDArray[Any]) -> Any:
    """0-dim arrays as numpy scalars, which keep their dtype (a float64 count is also a Python float)."""
    return array[()] if array.ndim == 0 else array
