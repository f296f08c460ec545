"""Objects over the verbs: modules and dictionaries with methods, freed at the end of a `with` block.

The verbs stay the interface; these classes only call them. A verb takes `obj.handle`. The objects
know the client only as `Verbs`, the calls they make, so this module does not import `_client`
(which imports it to hand objects out).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Protocol

import numpy.typing as npt

from ._errors import NotFoundError
from ._records import Handle, ModuleRow


class Verbs(Protocol):
    """The client calls the objects make; `weightavg.Client` has them all (see it for what each does)."""

    def free(self, *handles: Handle) -> int: ...

    def size(self, h: Handle) -> Any: ...

    def module(self, spec: Any) -> Any: ...

    def parmnames(self, m: Handle) -> list[str]: ...

    def parm(self, m: Handle, name: str, *value: Any) -> Any: ...

    def parms(self, m: Handle) -> Handle: ...

    def buffers(self, m: Handle) -> Handle: ...

    def copyparms(self, m: Handle, d: Handle | None = None) -> Any: ...

    def avgparms(self, m: Handle, d: Handle) -> int: ...

    def batchnorm(self, m: Handle, momenta: Mapping[str, float | None] | None = None) -> Any: ...

    def addref(self, h: Handle) -> Handle: ...

    def dict(self, x: Any, key: Any = None, *value: Any) -> Any: ...


def _handle_of(x: Remote | Handle) -> Handle:
    return x.handle if isinstance(x, Remote) else x


class Remote:
    """A handle together with the client that made it. `with obj:` frees the handle at the end of the
    block (a handle already freed is fine); `free()` frees it now."""

    def __init__(self, client: Verbs, handle: Handle) -> None:
        self.client = client
        self.handle = handle

    @property
    def id(self) -> str:
        return self.handle.id

    def free(self) -> None:
        """Release the handle on the server (the object lives on while other handles hold it)."""
        self.client.free(self.handle)

    def __enter__(self) -> Remote:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.free()
        except NotFoundError:
            pass  # freed inside the block already (or by a model that consumed it)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.handle.id!r})"


class Dictionary(Remote):
    """A dictionary of named tensors on the server (a parameter copy, a running average...).

    Example::

        with c.Module(["linear", 4, 2]) as q, q.copy() as avg:
            q.average_into(avg)
            avg.count, avg["weight"]
    """

    def __enter__(self) -> Dictionary:
        return self

    def to_dict(self) -> dict[str, npt.NDArray[Any]]:
        """Every entry as a numpy array, in order."""
        values: dict[str, npt.NDArray[Any]] = self.client.dict(self.handle)
        return values

    def keys(self) -> list[str]:
        """Entry names, in order, from the dictionary's sizes: no tensor is downloaded."""
        return [name for name, shape in self.client.size(self.handle).items() if isinstance(shape, tuple)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, key: str) -> npt.NDArray[Any]:
        value: npt.NDArray[Any] = self.client.dict(self.handle, key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.client.dict(self.handle, key, value)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set several entries in one call."""
        self.client.dict(self.handle, dict(values))

    @property
    def count(self) -> int:
        """How many parameter sets a running average holds: its '.n' entry, or 1 without one (as
        avgparms counts a plain copy). Downloads '.n' alone, never the averaged tensors."""
        return int(self[".n"]) if ".n" in self.keys() else 1


class Module(Remote):
    """A module on the server, built from a layer spec.

    Example::

        with c.Module(["sequential", ["linear", "a", 4, 8], "relu", ["linear", "b", 8, 2]]) as q:
            q.parameters()["a.weight"].shape   # (8, 4)
    """

    def __enter__(self) -> Module:
        return self

    def describe(self) -> list[ModuleRow]:
        """The module's layers and options, one row per layer."""
        rows: list[ModuleRow] = self.client.module(self.handle)
        return rows

    def parameter_names(self) -> list[str]:
        """The names of the module's parameters, in registration order, as parmnames(q)."""
        return self.client.parmnames(self.handle)

    def parameters(self) -> dict[str, npt.NDArray[Any]]:
        """Every parameter's value as a numpy array, by name, in registration order: read through a
        view in one fetch (as `buffers`), so the values are of one moment, not one call per
        parameter with averages landing between them."""
        with Dictionary(self.client, self.client.parms(self.handle)) as view:
            return view.to_dict()

    def buffers(self) -> dict[str, npt.NDArray[Any]]:
        """Every buffer's value (batchnorm statistics), by name."""
        with Dictionary(self.client, self.client.buffers(self.handle)) as view:
            return view.to_dict()

    def set_parameter(self, name: str, value: Any) -> None:
        """Copy a value into a parameter in place (or register a new one), as parm(q, name, value)."""
        self.client.parm(self.handle, name, value)

    def copy(self) -> Dictionary:
        """A new dictionary holding copies of the parameters (copyparms(q))."""
        return Dictionary(self.client, self.client.copyparms(self.handle))

    def load(self, d: Dictionary | Handle) -> dict[str, bool]:
        """Copy a dictionary's entries into the parameters, all or nothing (copyparms(q, d))."""
        copied: dict[str, bool] = self.client.copyparms(self.handle, _handle_of(d))
        return copied

    def average_into(self, d: Dictionary | Handle) -> int:
        """Fold the parameters into the running average d (avgparms(q, d)); returns its new count."""
        return self.client.avgparms(self.handle, _handle_of(d))

    def batchnorm(self, momenta: Mapping[str, float | None] | None = None) -> Any:
        """Reset batchnorm statistics (returns the old momenta), or restore momenta (batchnorm(q, r))."""
        return self.client.batchnorm(self.handle, momenta)

    def addref(self) -> Module:
        """A second handle to the same module (freeing one leaves the other)."""
        return Module(self.client, self.client.addref(self.handle))
