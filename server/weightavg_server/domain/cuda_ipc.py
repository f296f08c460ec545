"""Shared memory in a client's GPU: a CUDA buffer the client exported with torch's
`UntypedStorage._share_cuda_()` and registered once, opened here with `_new_shared_cuda` (the
same eight values, passed as plain values: never a pickle, never torch.multiprocessing's
reductions, which pickle). Uploads and fetches then copy device to device, as Triton's CUDA
shared memory does.

What torch does on each side (torch/csrc/StorageSharing.cpp, CudaIPCTypes.cpp):
- `_share_cuda_()` returns (device, handle, storage size, storage offset in the allocation,
  ref-counter object name, ref-counter index, event handle, event_sync_required). It wraps the
  client's storage in a "sent data" context whose counter starts at 1 and records an interprocess
  event on the client's current stream. When the client frees the storage while the counter is
  above 0, the memory waits in torch's limbo (not reused) until a consumer decrements it.
- `_new_shared_cuda(...)` waits on the event (when required), opens the handle (cached per
  process, closed with the last storage using it) and returns a storage whose deleter syncs the
  stream and decrements the counter. So the server holds the storage for the registration's
  lifetime and drops it at unregistration or session end; the client keeps its buffer alive until
  then (it unregisters before freeing it).

Nothing in an error names a handle. This module runs only where CUDA does; the checks that need
no GPU (field shapes, the ref-counter object, bounds arithmetic) are unit-tested everywhere.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass

import torch

from .errors import FailedPrecondition, InvalidArgument
from .shm import KEY, SHM_DIRECTORY, Region

MAX_HANDLE_BYTES = 1024
"""A cudaIpcMemHandle_t is 64 bytes; torch's handle for expandable segments is longer. A bound,
not a format check (torch and the driver check the contents)."""
EVENT_HANDLE_BYTES = 64
"""sizeof(cudaIpcEventHandle_t)."""
REF_COUNTER_SLOTS = 10000
"""torch's CUDA_IPC_REF_COUNTER_FILE_SIZE: int64 counters per ref-counter object."""


@dataclass(frozen=True)
class CudaIpc:
    """The fields of `_share_cuda_()` as the client sent them (RegisterSharedMemoryRequest.cuda)."""

    device_uuid: str
    device_index: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: str
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


def check_fields(ipc: CudaIpc, byte_size: int) -> None:
    """InvalidArgument unless the values are shaped as `_share_cuda_()` gives them and the region
    lies inside the storage; FailedPrecondition unless the ref counter is a shared memory object of
    the server's user (the client runs as the server's user, as for CPU regions)."""
    if byte_size <= 0:
        raise InvalidArgument(f"a shared memory region needs byte_size > 0; got {byte_size}")
    if not ipc.handle or len(ipc.handle) > MAX_HANDLE_BYTES:
        raise InvalidArgument("the CUDA IPC handle must be the bytes UntypedStorage._share_cuda_() gives (1 to 1024 bytes)")
    if ipc.storage_size_bytes < byte_size or ipc.storage_offset_bytes < 0:
        raise InvalidArgument(
            f"the CUDA region registers {byte_size} bytes of a storage of {ipc.storage_size_bytes} bytes at offset "
            f"{ipc.storage_offset_bytes}; register at most the storage's size, at a non-negative offset"
        )
    if ipc.event_sync_required and len(ipc.event_handle) != EVENT_HANDLE_BYTES:
        raise InvalidArgument(f"the CUDA IPC event handle must be {EVENT_HANDLE_BYTES} bytes when event_sync_required is set")
    if ipc.device_index < 0:
        raise InvalidArgument(f"the CUDA device index must be >= 0; got {ipc.device_index}")
    if not 0 <= ipc.ref_counter_offset < REF_COUNTER_SLOTS:
        raise InvalidArgument(f"the CUDA IPC reference counter's index must lie in [0, {REF_COUNTER_SLOTS})")
    name = ipc.ref_counter_handle
    if not name.startswith("/") or not KEY.fullmatch(name[1:]):
        raise InvalidArgument(
            "the CUDA IPC reference counter must be the shared memory name UntypedStorage._share_cuda_() gives "
            "('/' and one file name)"
        )
    try:
        info = os.stat(os.path.join(SHM_DIRECTORY, name[1:]), follow_symlinks=False)
    except OSError:
        raise FailedPrecondition(
            "the CUDA IPC reference counter could not be found: share the buffer from a process on this host, "
            "as the server's user"
        ) from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size < 8 * REF_COUNTER_SLOTS:
        raise FailedPrecondition(
            "the CUDA IPC reference counter must be torch's, in /dev/shm, owned by the server's user"
        )


def local_device(ipc: CudaIpc) -> torch.device:
    """The server's device for the client's: by UUID where given (device numbering follows each
    process's CUDA_VISIBLE_DEVICES), else by index. FailedPrecondition without CUDA or that device."""
    if not torch.cuda.is_available():
        raise FailedPrecondition(
            "this server has no CUDA device, so it takes no CUDA shared memory: send GPU tensors through "
            "the stream or host shared memory"
        )
    torch.cuda.current_device()  # initializes CUDA here, as torch's own consumer does before _new_shared_cuda
    count = torch.cuda.device_count()
    if ipc.device_uuid:
        for i in range(count):
            if device_uuid(i) == ipc.device_uuid:
                return torch.device("cuda", i)
        raise FailedPrecondition("the CUDA region's device is not visible to the server (check CUDA_VISIBLE_DEVICES)")
    if ipc.device_index >= count:
        raise FailedPrecondition("the CUDA region's device is not visible to the server (check CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", ipc.device_index)


def device_uuid(index: int) -> str:
    """A device's UUID as text, the same in every process that sees it ("" where torch cannot say)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else ""


def _allocation(pointer: int) -> tuple[int, int] | None:
    """The base and size of the device allocation holding `pointer` (cuMemGetAddressRange, in
    the current context); None where the driver cannot say."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        query = driver.cuMemGetAddressRange_v2
    except (OSError, AttributeError):
        return None
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    query.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    query.restype = ctypes.c_int
    if query(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer)) != 0:
        return None
    return base.value, size.value


class CudaRegion(Region):
    """A client's CUDA buffer, opened for the registration's lifetime: `bytes_at` gives uint8 views
    of it on its device, and `settle()` waits for the copies into or out of it, so a call answers
    only once its bytes are where they belong."""

    def __init__(self, ipc: CudaIpc, byte_size: int) -> None:  # noqa: D107 - no file: Region's __init__ is not run
        check_fields(ipc, byte_size)
        self.device = local_device(ipc)
        self.byte_size = byte_size
        self.identity = ("cuda", ipc.device_uuid or str(ipc.device_index), ipc.handle, ipc.storage_offset_bytes)
        self._fd = -1
        self._init_copies()
        with torch.cuda.device(self.device):
            try:
                storage = torch.UntypedStorage._new_shared_cuda(
                    self.device.index, ipc.handle, ipc.storage_size_bytes, ipc.storage_offset_bytes,
                    ipc.ref_counter_handle.encode(), ipc.ref_counter_offset, ipc.event_handle, ipc.event_sync_required,
                )
            except RuntimeError:
                # The driver's message may quote the handle; say what to check instead.
                raise FailedPrecondition(
                    "the CUDA IPC handle could not be opened: export it with UntypedStorage._share_cuda_() from "
                    "another process on this host, on a device the server sees, and keep the buffer alive"
                ) from None
            # The opened mapping is the whole allocation; the storage must lie inside it, or a copy
            # would touch memory outside it (an illegal address ends the server's CUDA context).
            found = _allocation(storage.data_ptr())
            if found is None:
                del storage
                # Unchecked bounds are refused; the client then sends GPU tensors through the host.
                raise FailedPrecondition("the CUDA driver could not say where the CUDA region's allocation ends")
            if not found[0] <= storage.data_ptr() <= storage.data_ptr() + byte_size <= found[0] + found[1]:
                del storage
                raise InvalidArgument(
                    "the CUDA region's bytes do not lie inside the allocation its handle names: register the "
                    "storage _share_cuda_() described, at most its size"
                )
        self._storage: torch.UntypedStorage | None = storage

    def close(self) -> None:
        """Drop the mapping (torch's deleter syncs and decrements the client's counter); a copy
        still running keeps its view, and so the mapping, until it ends."""
        self._storage = None

    def check_size(self) -> None:
        if self._storage is None:
            raise FailedPrecondition("the shared memory region was unregistered; register it again")

    def bytes_at(self, offset: int, nbytes: int, what: str) -> torch.Tensor:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.byte_size:
            raise InvalidArgument(
                f"{what}: bytes [{offset}, {offset + nbytes}) lie outside the region's {self.byte_size} bytes"
            )
        storage = self._storage
        if storage is None:
            raise FailedPrecondition("the shared memory region was unregistered; register it again")
        whole = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, 0, (self.byte_size,), (1,))
        return whole[offset:offset + nbytes]

    def settle(self) -> None:
        """Wait for this thread's copies into the region: they run on the region device's current
        stream (torch runs a copy between devices on the destination's). Copies out of it go to
        host buffers here, which torch's copy_ finishes before it returns."""
        torch.cuda.current_stream(self.device).synchronize()
