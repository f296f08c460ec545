"""What the cluster's ranks may unpickle from one another.

Commands, results and layouts travel between a torchrun cluster's ranks through torch.distributed's
object collectives, which pickle on one rank and unpickle on the others. torch's own unpickler
builds whatever a pickle names: a stream sent to a rank's gloo port by anyone who can reach it ran
code there, and every tensor among a command's results (an epoch's metrics) was rebuilt by
`torch.storage._load_from_bytes`, a `torch.load` with `weights_only=False` (found by review).

`install` replaces the pickler and unpickler those collectives use in this process:

- `ControlPickler` writes a tensor as its dtype's name, shape, device and raw bytes (`_tensor`), as
  the gRPC transport does, never as torch's own pickle;
- `ControlUnpickler` builds only what `SENT` lists (the classes and functions the ranks send one
  another), torch's dtypes, `torch.Size` and `torch.device`. Any other name, `os.system`, `torch.load`
  or another class of this package included, is `pickle.UnpicklingError` before anything is imported
  or looked up for it.

The list is explicit because a pickle may call what it names with any arguments and set any
attributes on what that returns: allowing every class of this package let a stream start a
torchrun (`ops.launch.LocalCluster`), bind a port (`ops.metrics`), map any file of the server's user
(`domain.shm.Region`), or import `weightavg_server.__main__`, which ran a second server in the rank
(found by review). Every class in `SENT` is plain data: building one runs no code but its fields'.

The server's ranks still trust one another with the objects they send (docs/cluster.md, "Security");
this bounds what a stream that is not theirs can do to a rank while it is unpickled: nothing but fail
the collective.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Final

import torch
import torch.distributed.distributed_c10d as c10d


SENT: Final = frozenset({
    # the commands and what travels inside them (cluster.py)
    ("weightavg_server.cluster", "Command"), ("weightavg_server.cluster", "Failure"),
    ("weightavg_server.cluster", "Sink"), ("weightavg_server.cluster", "Relayed"),
    ("weightavg_server.cluster", "RemoteStop"), ("weightavg_server.cluster", "Move"),
    ("weightavg_server.cluster", "Layout"), ("weightavg_server.cluster", "never"),
    ("weightavg_server.store.tenants", "Caller"), ("weightavg_server.store.tenants", "Role"),
    ("weightavg_server.store.tenants", "Quota"),
    # the Service verbs' arguments and answers
    ("weightavg_server.domain.specs", "LayerSpec"), ("weightavg_server.domain.specs", "OptionRow"),
    ("weightavg_server.domain.averaging", "BufferMode"), ("weightavg_server.domain.ema", "ScheduleChange"),
    ("weightavg_server.domain.ema", "EmaState"), ("weightavg_server.domain.ema", "EmaSchedule"),
    ("weightavg_server.domain.tensors", "HandleSummary"), ("weightavg_server.store.registry", "Kind"),
    ("weightavg_server.store.snapshot", "SnapshotResult"), ("weightavg_server.service", "Ref"),
    ("weightavg_server.service", "RankInfo"), ("weightavg_server.service", "RankMetrics"),
    ("weightavg_server.service", "Reduced"), ("weightavg_server.service", "Size"),
    ("weightavg_server.service", "EmaResult"), ("weightavg_server.service", "ModelDescription"),
    # the errors a Failure carries (every WeightavgError: tests/test_control_wire.py checks)
    ("weightavg_server.domain.errors", "WeightavgError"), ("weightavg_server.domain.errors", "InvalidArgument"),
    ("weightavg_server.domain.errors", "NotFound"), ("weightavg_server.domain.errors", "FailedPrecondition"),
    ("weightavg_server.domain.errors", "ResourceExhausted"), ("weightavg_server.domain.errors", "Cancelled"),
    ("weightavg_server.domain.errors", "DeadlineExceeded"), ("weightavg_server.domain.errors", "PermissionDenied"),
    ("weightavg_server.domain.errors", "DataLoss"), ("weightavg_server.domain.errors", "Unavailable"),
    ("weightavg_server.store.snapshot", "SnapshotError"),
    # tensors (ControlPickler), their shapes and devices
    (__name__, "_tensor"), ("torch", "Size"), ("torch", "device"),
})
"""The (module, qualified name) of every class and function the ranks send one another: all a pickle
may name besides a torch dtype. Logged from the cluster tests' every `find_class`, then completed
from the Service verbs' signatures; a class added to what the ranks send must be added here."""

DTYPES: Final = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
"""torch's dtypes by the name a pickle gives them (`torch.float32` pickles as torch.float32). Read from
the module's own attributes: `getattr(torch, name)` imports torch's lazy submodules for some names."""


def _tensor(dtype: str, shape: tuple[int, ...], device: str, data: bytes) -> torch.Tensor:
    """A tensor rebuilt from what `ControlPickler` wrote (a torch dtype by name), its bytes copied.

    Raises:
        pickle.UnpicklingError: the values are not a tensor's: an unknown dtype, a shape that is not
            whole numbers of at least 0, bytes that are not the shape's elements, or a device that
            is not a CPU or an existing CUDA device.
    """
    kind = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if kind is None:
        raise pickle.UnpicklingError(f"the cluster's control plane does not build a tensor of dtype {dtype!r}")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"the cluster's control plane got a tensor of shape {shape!r}: not sizes")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * kind.itemsize:
        raise pickle.UnpicklingError(
            f"the cluster's control plane got a {dtype} tensor of shape {list(shape)} with "
            f"{len(data) if isinstance(data, bytes) else type(data).__name__} bytes, not its "
            f"{math.prod(shape) * kind.itemsize}"
        )
    where = _device(device)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(kind) if data else torch.empty(0, dtype=kind)
    return flat.reshape(shape).to(where)


def _device(name: str) -> torch.device:
    """The device a tensor travelled from: the CPU or a CUDA device this process has (any other name
    would start a backend, or fail deep inside torch)."""
    try:
        device = torch.device(name) if isinstance(name, str) else None
    except RuntimeError:
        device = None
    if device is None or not (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
    ):
        raise pickle.UnpicklingError(f"the cluster's control plane does not build a tensor on device {name!r}")
    return device


class ControlPickler(pickle.Pickler):
    """A pickler that writes tensors as dtype, shape, device and bytes (`_tensor`)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return _tensor, (str(t.dtype).removeprefix("torch."), tuple(t.shape), str(t.device), data)
        return NotImplemented


class ControlUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the ranks send one another: `SENT` and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        if (module, name) in SENT:  # before anything is imported or looked up
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the cluster's control plane does not build {module}.{name}: only what the server's ranks send "
            "one another (control_wire.SENT)"
        )


def install() -> None:
    """Make torch.distributed's object collectives in this process use `ControlPickler` and
    `ControlUnpickler` (every rank, before the first collective: `cluster.join`).

    Raises:
        RuntimeError: this torch has no such hooks (the pinned version has them; a torch that moved
            them must not run a cluster whose ranks unpickle freely).
    """
    if not (hasattr(c10d, "_pickler") and hasattr(c10d, "_unpickler")):
        raise RuntimeError(
            "this torch's torch.distributed has no _pickler/_unpickler to replace; run the cluster on the "
            "torch version pyproject.toml pins"
        )
    c10d._pickler = ControlPickler
    c10d._unpickler = ControlUnpickler
