"""GPU tensors through CUDA IPC (Client(..., shm=True) and a server on this host with CUDA): one
CUDA buffer a client exports once (torch's `UntypedStorage._share_cuda_()`, sent as plain
protobuf fields, never a pickle) and registers as its region "cuda.<tag>" (_shm.RegionNames). An upload copies the tensors
into it device to device and names where they lie; a fetch has the server copy into it and clones
out of it. The bytes never touch host memory.

The client never imports torch: this module uses the torch its caller loaded (`_torch()`), and
only once it holds a torch tensor, so weightavg works where torch is not installed.

Synchronization: the client waits for its copies into the buffer before a call is sent (the
server reads it from another process), and for its clones out of it before the next call may
write it; the server waits for its copies before it answers. The buffer may be freed here at any
time: torch keeps an exported storage's memory out of reuse (its "limbo") until the server, which
drops its mapping when the region is unregistered or replaced, decrements torch's counter.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import numpy.typing as npt

from . import wire
from .v1 import weightavg_pb2 as pb

REGION_NAME = "cuda"
"""The base of the name the client's CUDA buffer is registered under (with the client's tag: _shm.RegionNames)."""
ALIGN = 64
MIN_BYTES = 1 << 20
_TORCH_CODES = {
    "float32": pb.DTYPE_FLOAT32, "float64": pb.DTYPE_FLOAT64, "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16, "int8": pb.DTYPE_INT8, "uint8": pb.DTYPE_UINT8, "int16": pb.DTYPE_INT16,
    "int32": pb.DTYPE_INT32, "int64": pb.DTYPE_INT64, "bool": pb.DTYPE_BOOL, "complex64": pb.DTYPE_COMPLEX64,
    "complex128": pb.DTYPE_COMPLEX128,
}
"""The wire's dtypes by torch's name for them (torch.float32 is 'torch.float32')."""
_TORCH_NAMES = {code: name for name, code in _TORCH_CODES.items()}


def _torch() -> Any:
    """The torch module the caller imported (a tensor in hand means it is loaded)."""
    return sys.modules["torch"]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def is_cuda(value: Any) -> bool:
    """Whether `value` is a torch tensor in GPU memory (checked without importing torch)."""
    return type(value).__module__.startswith("torch") and getattr(value, "is_cuda", False) is True


def host_array(value: Any) -> npt.NDArray[Any]:
    """A CUDA tensor's values as a host array, bit for bit (bfloat16 as ml_dtypes.bfloat16): what
    the stream and host shared memory send."""
    return wire.torch_host_array(value)


def as_tensor(value: Any) -> Any:
    """A torch tensor with exactly the value's bits: a tensor as it is, anything else as the wire
    would send it (wire.to_array; bfloat16 arrays as bfloat16 tensors)."""
    torch = _torch()

    if isinstance(value, torch.Tensor):
        return value.detach()
    array = wire.to_array(value)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy() if not array.flags.writeable else array)


def code(t: Any) -> pb.Dtype.ValueType:
    """The wire dtype of a torch tensor; TypeError for one the wire lacks."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in _TORCH_CODES:
        raise TypeError(f"dtype {t.dtype} cannot be sent; use one of {sorted(_TORCH_CODES)}")
    return _TORCH_CODES[name]


def describe(buffer: Any) -> pb.CudaIpcRegion:
    """The registration of a CUDA buffer: `_share_cuda_()`'s eight values as protobuf fields, and
    the device's UUID so that a server numbering devices differently finds it."""
    torch = _torch()

    (device, handle, size, offset, ref_counter, ref_counter_offset, event, event_sync_required) = (
        buffer.untyped_storage()._share_cuda_()
    )
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return pb.CudaIpcRegion(
        device_uuid=str(uuid) if uuid is not None else "", device_index=device, handle=handle,
        storage_size_bytes=size, storage_offset_bytes=offset, ref_counter_handle=ref_counter.decode(),
        ref_counter_offset=ref_counter_offset, event_handle=event, event_sync_required=bool(event_sync_required),
    )


def release(message: pb.CudaIpcRegion) -> None:
    """Give back the reference torch's `_share_cuda_()` counted for the server, after the server
    refused the registration without opening the buffer (no CUDA there, no --allow-shm, fields it
    refuses): otherwise torch keeps the buffer's memory out of reuse for the life of this process.

    A server that refuses after opening it (bounds, the session's region checks) has given the
    reference back by dropping it; this second release then wraps torch's unsigned counter, and
    the one buffer stays out of reuse, as it would without either. The client cannot tell the two
    apart, and a correct client and server meet neither."""
    torch = _torch()

    try:
        torch.UntypedStorage._release_ipc_counter(
            message.ref_counter_handle.encode(), message.ref_counter_offset
        )
    except RuntimeError:  # best effort, as torch's own consumers do
        pass


class CudaRegion:
    """The client's registered CUDA buffer; replaced by a larger one (or one on another device)
    when a call needs it."""

    def __init__(self) -> None:
        self.buffer: Any = None
        self.size = 0

    def ensure(self, nbytes: int, device: Any, register: Callable[[pb.CudaIpcRegion, int], None]) -> Any:
        """A uint8 CUDA tensor of at least `nbytes` on `device`, registered with the server
        (`register(message, size)`, which raises when the server refuses it)."""
        torch = _torch()

        device = torch.device(device)
        if self.buffer is None or self.size < nbytes or self.buffer.device != device:
            size = max(_aligned(nbytes), 2 * self.size, MIN_BYTES)
            buffer = torch.empty(size, dtype=torch.uint8, device=device)
            message = describe(buffer)
            try:
                register(message, size)
            except BaseException as exc:
                if _refused(exc):
                    release(message)
                raise
            # The server dropped the old buffer's mapping when this one replaced it.
            self.buffer, self.size = buffer, size
        return self.buffer

    def close(self) -> None:
        self.buffer, self.size = None, 0


def _refused(exc: BaseException) -> bool:
    """Whether a failed registration surely left the server without the buffer (a status it
    answers before registering); a lost answer (UNAVAILABLE, a deadline) may not have."""
    definite = {
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
    }
    return isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call) and exc.code() in definite


def layout(items: Sequence[tuple[str, Any]]) -> tuple[list[tuple[pb.SharedTensor, Any]], int]:
    """Where each CUDA tensor goes in the buffer (64-byte aligned) and the bytes they take."""
    placed, at = [], 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        placed.append((pb.SharedTensor(name=name, dtype=code(t), shape=t.shape, offset=at, byte_size=nbytes), t))
        at = _aligned(at + nbytes)
    return placed, at


def write(buffer: Any, placed: Sequence[tuple[pb.SharedTensor, Any]]) -> None:
    """Copy each tensor into its place (device to device), and wait for the copies: the server
    reads the buffer from another process as soon as the call arrives."""
    torch = _torch()

    for message, t in placed:
        if message.byte_size:
            target = buffer[message.offset:message.offset + message.byte_size].view(t.dtype).view(t.shape)
            target.copy_(t.detach())  # copy_ resolves conjugate and negative views
    _wait(buffer)


def read(buffer: Any, tensors: Sequence[pb.SharedTensor]) -> list[tuple[str, Any]]:
    """New CUDA tensors holding copies of what the server wrote, on the buffer's device; waits for
    the copies, so the next call may write the buffer again."""
    torch = _torch()

    out = []
    for t in tensors:
        if t.dtype not in _TORCH_NAMES:
            raise ValueError(f"the server sent tensor '{t.name}' with an unknown dtype {t.dtype}")
        dtype = getattr(torch, _TORCH_NAMES[t.dtype])
        shape = tuple(t.shape)
        size = torch.empty((), dtype=dtype).element_size()
        if t.byte_size != math.prod(shape) * size or t.offset < 0 or t.offset + t.byte_size > buffer.numel():
            raise ValueError(f"the server placed tensor '{t.name}' outside the CUDA shared memory region")
        if t.byte_size:
            value = buffer[t.offset:t.offset + t.byte_size].view(dtype).view(shape).clone()
        else:
            value = torch.empty(shape, dtype=dtype, device=buffer.device)
        out.append((t.name, value))
    _wait(buffer)
    return out


def _wait(buffer: Any) -> None:
    """Wait for this thread's copies into or out of the buffer (they run on its device's current
    stream; a copy between devices runs on the destination's, which for reads is the buffer's too)."""
    torch = _torch()

    if buffer.is_cuda:
        torch.cuda.current_stream(buffer.device).synchronize()
