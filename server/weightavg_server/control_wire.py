"""What the cluster's ranks may unpickle from one another.

Commands, results and layouts travel between a torchrun cluster's ranks through torch.distributed's
object collectives, which pickle on one rank and unpickle on the others. torch's own unpickler
builds whatever a pickle names: a stream sent to a rank's gloo port by anyone who can reach it ran
code there, and every tensor among a command's results (an epoch's metrics) was rebuilt by
`torch.storage._load_from_bytes`, a `torch.load` with `weights_only=False` (found by review).

`install` replaces the pickler and unpickler those collectives use in this process:

- `ControlPickler` writes a tensor as its dtype's name, shape, device and raw bytes (`_tensor`), as
  the gRPC transport does, never as torch's own pickle;
- `ControlUnpickler` builds only what the ranks send: classes defined in this package (commands,
  results, errors, enums), the functions in `FUNCTIONS`, torch's dtypes, `torch.Size` and
  `torch.device`, and a few plain builtins. Anything else, `os.system` or `torch.load` included, is
  `pickle.UnpicklingError` before its module is even imported.

The server's ranks still trust one another with the objects they send (docs/cluster.md, "Trust");
this bounds what a stream that is not theirs can do to a rank: nothing but fail the collective.
"""

from __future__ import annotations

import builtins
import pickle
from typing import Any, Final

import torch
import torch.distributed.distributed_c10d as c10d


PACKAGE: Final = "weightavg_server"

FUNCTIONS: Final = frozenset({("weightavg_server.cluster", "never"), (__name__, "_tensor")})
"""The functions a pickle may name: the stop check a command carries, and the tensor builder."""

BUILTINS: Final = frozenset({"set", "frozenset", "slice", "complex", "range", "bytearray"})
"""Plain builtins a pickle may name besides the exception classes (never `getattr` or `eval`)."""

TORCH_CLASSES: Final = frozenset({"Size", "device"})


def _tensor(dtype: str, shape: tuple[int, ...], device: str, data: bytes) -> torch.Tensor:
    """A tensor rebuilt from what `ControlPickler` wrote (a torch dtype by name), its bytes copied."""
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype):
        raise pickle.UnpicklingError(f"the cluster's control plane does not build a tensor of dtype {dtype!r}")
    flat = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).view(kind) if data else torch.empty(0, dtype=kind)
    )
    return flat.reshape(shape).to(device)


class ControlPickler(pickle.Pickler):
    """A pickler that writes tensors as dtype, shape, device and bytes (`_tensor`)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return _tensor, (str(t.dtype).removeprefix("torch."), tuple(t.shape), str(t.device), data)
        return NotImplemented


class ControlUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the ranks send one another (see the module's docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in FUNCTIONS:
            return super().find_class(module, name)
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith(PACKAGE):
                return found
        elif module == "torch":
            found = getattr(torch, name, None)
            if isinstance(found, torch.dtype) or name in TORCH_CLASSES:
                return found
        elif module == "builtins":
            found = getattr(builtins, name, None)
            if name in BUILTINS or (isinstance(found, type) and issubclass(found, BaseException)):
                return found
        elif (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the cluster's control plane does not build {module}.{name}: only what the server's ranks send one another"
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
