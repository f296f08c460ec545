"""The Python client: the reference's verbs as methods, numpy in and out, handles as small objects."""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from . import _specs, _tensors
from ._errors import from_rpc_error
from .v1 import weightavg_pb2 as pb
from .v1 import weightavg_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 300.0
"""Seconds a call may take before DEADLINE_EXCEEDED; generous because training epochs are calls."""
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
"""Same cap as the server's default; tensors stream in 4 MiB chunks, so only runaway messages hit it."""

_KIND_NAMES = {
    pb.HANDLE_KIND_MODULE: "module",
    pb.HANDLE_KIND_MODEL: "model",
    pb.HANDLE_KIND_OPTIMIZER: "optimizer",
    pb.HANDLE_KIND_LOSS: "loss",
    pb.HANDLE_KIND_DICTIONARY: "dictionary",
    pb.HANDLE_KIND_TENSOR: "tensor",
}

T = TypeVar("T")


@dataclass(frozen=True)
class Handle:
    """A server object: its opaque id and its kind ("module", "dictionary", ...)."""

    id: str
    kind: str

    def __repr__(self) -> str:
        return f"<{self.kind} {self.id}>"


@dataclass(frozen=True)
class ModuleRow:
    """One row of a module's options table."""

    depth: int
    module: str
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class HandleInfo:
    """What ListHandles reports for one live handle."""

    handle: Handle
    device: str
    dtype: str | None
    bytes: int
    tensor_count: int


HandleLike = Handle | str


def _id(handle: HandleLike) -> str:
    return handle.id if isinstance(handle, Handle) else handle


def _handle(message: pb.Handle) -> Handle:
    return Handle(message.id, _KIND_NAMES.get(message.kind, "unknown"))


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Turn grpc.RpcError into the client's own exceptions, once, at the boundary."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    return call


class Client:
    """A connection to a weightavg server.

    Args:
        address: "host:port" of the server.
        timeout: default deadline of each call, in seconds.
        chunk_bytes: size of the pieces tensors are streamed in.

    Example:
        >>> with Client("127.0.0.1:50051") as c:
        ...     m = c.module(["linear", 2, 1])
        ...     p = c.copyparms(m)
        ...     c.avgparms(m, p)
        2
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        chunk_bytes: int = _tensors.CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel = channel or grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.WeightAveragingServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel; handles stay alive on the server until freed."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- server ---------------------------------------------------------------------------------

    @_rpc
    def ping(self) -> None:
        """One empty round trip."""
        self._stub.Ping(pb.PingRequest(), timeout=self.timeout)

    @_rpc
    def info(self) -> dict[str, Any]:
        """Server version, torch version, device, layer types, dtypes and limits."""
        r = self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout)
        return {
            "version": r.version,
            "torch_version": r.torch_version,
            "grpc_version": r.grpc_version,
            "device": r.device,
            "layer_types": list(r.layer_types),
            "dtypes": [pb.Dtype.Name(d).removeprefix("DTYPE_").lower() for d in r.dtypes],
            "max_message_bytes": r.max_message_bytes,
            "chunk_bytes": r.chunk_bytes,
            "max_spec_depth": r.max_spec_depth,
            "cuda_memory_allocated": r.cuda_memory_allocated,
        }

    @_rpc
    def stats(self) -> dict[str, Any]:
        """Per-method statistics since the server started, and live handles and bytes per device.

        Returns:
            {"uptime_seconds": float,
             "methods": {full method name: {"count", "in_flight", "failures", "codes" (name -> count),
                         "total_seconds", "max_seconds", "bytes_received", "bytes_sent"}},
             "devices": {device: {"handles", "bytes"}}}
        """
        r = self._stub.GetServerStats(pb.GetServerStatsRequest(), timeout=self.timeout)
        return {
            "uptime_seconds": r.uptime_seconds,
            "methods": {
                m.method: {
                    "count": m.count,
                    "in_flight": m.in_flight,
                    "failures": m.failures,
                    "codes": dict(m.codes),
                    "total_seconds": m.total_seconds,
                    "max_seconds": m.max_seconds,
                    "bytes_received": m.bytes_received,
                    "bytes_sent": m.bytes_sent,
                }
                for m in r.methods
            },
            "devices": {d.device: {"handles": d.handles, "bytes": d.bytes} for d in r.devices},
        }

    # -- modules ----------------------------------------------------------------------------------

    @_rpc
    def module(self, spec: Any) -> Any:
        """Build a module from a spec and return its handle; given a handle, return its options table.

        Specs are nested lists: ["linear", 64, 10], ["sequential", ["linear", "a", 784, 800], ...].
        """
        if isinstance(spec, Handle):
            r = self._stub.DescribeModule(pb.DescribeModuleRequest(handle=spec.id), timeout=self.timeout)
            return [
                ModuleRow(row.depth, row.module, row.name, {o.name: _specs.option_value(o.value) for o in row.options})
                for row in r.rows
            ]
        request = pb.CreateModuleRequest(spec=_specs.layer_spec(spec))
        return _handle(self._stub.CreateModule(request, timeout=self.timeout).module)

    @_rpc
    def parmnames(self, m: HandleLike, child: str = "") -> list[str]:
        """Dotted parameter names of a module, model or optimizer (or of one child)."""
        r = self._stub.ListParameterNames(pb.ListParameterNamesRequest(handle=_id(m), child=child), timeout=self.timeout)
        return list(r.names)

    @_rpc
    def buffernames(self, m: HandleLike, child: str = "") -> list[str]:
        """Dotted buffer names of a module, model or optimizer (or of one child)."""
        r = self._stub.ListBufferNames(pb.ListBufferNamesRequest(handle=_id(m), child=child), timeout=self.timeout)
        return list(r.names)

    @_rpc
    def parm(self, m: HandleLike, name: str, *value: Any) -> Any:
        """parm(m, name) returns a parameter's values; parm(m, name, value) sets it in place
        (broadcasting a scalar), or registers a new parameter when the name is new."""
        if not value:
            return self._fetch(_id(m), [name])[name]
        chunks = _tensors.array_chunks("", value[0], self.chunk_bytes)
        first = pb.SetParameterRequest(handle=_id(m), name=name, chunk=next(chunks))
        requests = iter([first, *(pb.SetParameterRequest(chunk=c) for c in chunks)])
        self._stub.SetParameter(requests, timeout=self.timeout)
        return None

    @_rpc
    def parms(self, m: HandleLike, child: str = "") -> Handle:
        """A dictionary handle over the module's live parameters (of a child, when named)."""
        r = self._stub.ViewParameters(pb.ViewParametersRequest(handle=_id(m), child=child), timeout=self.timeout)
        return _handle(r.dictionary)

    @_rpc
    def buffers(self, m: HandleLike, child: str = "") -> Handle:
        """A dictionary handle over the module's live buffers (of a child, when named)."""
        r = self._stub.ViewBuffers(pb.ViewBuffersRequest(handle=_id(m), child=child), timeout=self.timeout)
        return _handle(r.dictionary)

    # -- weight averaging -------------------------------------------------------------------------

    @_rpc
    def copyparms(self, m: HandleLike, d: HandleLike | None = None) -> Any:
        """copyparms(m): a new dictionary of parameter copies. copyparms(m, d): copy d into m's
        parameters, all or nothing; returns {parameter: True if d had it}."""
        if d is None:
            r = self._stub.CopyParameters(pb.CopyParametersRequest(handle=_id(m)), timeout=self.timeout)
            return _handle(r.dictionary)
        loaded = self._stub.LoadParameters(
            pb.LoadParametersRequest(handle=_id(m), dictionary=_id(d)), timeout=self.timeout
        )
        return {name: loaded.copied[name] for name in loaded.names}

    @_rpc
    def avgparms(self, m: HandleLike, d: HandleLike) -> int:
        """Fold m's parameters into the running average in d; returns the new count (d's '.n')."""
        r = self._stub.AverageParameters(
            pb.AverageParametersRequest(handle=_id(m), dictionary=_id(d)), timeout=self.timeout
        )
        return int(r.count)

    @_rpc
    def batchnorm(self, m: HandleLike, momenta: Mapping[str, float | None] | None = None) -> Any:
        """batchnorm(m): reset batchnorm statistics, momentum None; returns {layer: old momentum}.
        batchnorm(m, r): restore those momenta."""
        if momenta is not None:
            request = pb.RestoreMomentumRequest(
                handle=_id(m),
                momenta={k: pb.Momentum() if v is None else pb.Momentum(value=float(v)) for k, v in momenta.items()},
            )
            self._stub.RestoreMomentum(request, timeout=self.timeout)
            return None
        r = self._stub.ResetBatchNorm(pb.ResetBatchNormRequest(handle=_id(m)), timeout=self.timeout)
        return {
            name: r.momenta[name].value if r.momenta[name].HasField("value") else None for name in r.names
        }

    # -- dictionaries and tensors -----------------------------------------------------------------

    @_rpc
    def dict(self, x: Any, key: Any = None, *value: Any) -> Any:
        """dict({name: value}) creates a dictionary; dict(p) returns all values, dict(p, key) one,
        dict(p, key, value) sets one (replacing it; a live view copies in place), dict(p, {k: v}) several."""
        if not isinstance(x, (Handle, str)):
            if not isinstance(x, Mapping):
                raise TypeError("dict() takes a mapping of name -> value, or a dictionary handle")
            return self._create_dictionary(x.items())
        if value:
            self._update_dictionary(_id(x), [(key, value[0])])
            return None
        if isinstance(key, Mapping):
            self._update_dictionary(_id(x), list(key.items()))
            return None
        if key is None:
            return {name: _tensors.plain(a) for name, a in self._fetch_named(_id(x), [])}
        if isinstance(key, (list, tuple)):
            values = self._fetch(_id(x), list(key))
            return [values[k] for k in key]
        return self._fetch(_id(x), [key])[key]

    @_rpc
    def delete(self, d: HandleLike, *names: str) -> None:
        """Remove keys from a dictionary, all or nothing."""
        self._stub.DeleteEntries(pb.DeleteEntriesRequest(dictionary=_id(d), names=list(names)), timeout=self.timeout)

    @_rpc
    def tensor(self, x: Any) -> Any:
        """tensor(array) creates a tensor handle; tensor(handle) returns its values."""
        if isinstance(x, Handle):
            return _tensors.plain(self._fetch_named(x.id, [])[0][1])
        requests = (pb.CreateTensorRequest(chunk=c) for c in _tensors.array_chunks("", x, self.chunk_bytes))
        return _handle(self._stub.CreateTensor(requests, timeout=self.timeout).tensor)

    @_rpc
    def size(self, h: HandleLike) -> Any:
        """A dictionary's {name: shape}, a tensor's shape, or a module's number of parameter tensors."""
        r = self._stub.GetSize(pb.GetSizeRequest(handle=_id(h)), timeout=self.timeout)
        which = r.WhichOneof("size")
        if which == "dictionary":
            return {e.name: tuple(e.shape.dims) for e in r.dictionary.entries}
        if which == "tensor":
            return tuple(r.tensor.dims)
        return int(r.parameter_count)

    # -- handles ----------------------------------------------------------------------------------

    @_rpc
    def free(self, *handles: HandleLike) -> int:
        """Free the given handles (all must exist), or every handle when none is given."""
        request = pb.FreeHandlesRequest(handles=[_id(h) for h in handles], all=not handles)
        return int(self._stub.FreeHandles(request, timeout=self.timeout).freed)

    @_rpc
    def addref(self, h: HandleLike) -> Handle:
        """A second handle to the same object."""
        return _handle(self._stub.AddReference(pb.AddReferenceRequest(handle=_id(h)), timeout=self.timeout).handle)

    @_rpc
    def handles(self) -> list[HandleInfo]:
        """Every live handle with its device, dtype and bytes."""
        r = self._stub.ListHandles(pb.ListHandlesRequest(), timeout=self.timeout)
        return [
            HandleInfo(
                _handle(i.handle), i.device,
                pb.Dtype.Name(i.dtype).removeprefix("DTYPE_").lower() if i.dtype else None,
                i.bytes, i.tensor_count,
            )
            for i in r.handles
        ]

    @_rpc
    def to(self, h: HandleLike, device: str = "", dtype: str | None = None) -> Handle:
        """Move a tensor, dictionary or module to a device ("cpu", "cuda", "cuda:1") and/or dtype."""
        code = pb.Dtype.Value("DTYPE_" + dtype.upper()) if dtype else pb.DTYPE_UNSPECIFIED
        r = self._stub.MoveHandle(pb.MoveHandleRequest(handle=_id(h), device=device, dtype=code), timeout=self.timeout)
        return _handle(r.handle)

    # -- streaming helpers --------------------------------------------------------------------------

    def _fetch_named(self, handle: str, names: list[str]) -> list[tuple[str, npt.NDArray[Any]]]:
        stream = self._stub.FetchTensors(pb.FetchTensorsRequest(handle=handle, names=names), timeout=self.timeout)
        return _tensors.join_chunks(r.chunk for r in stream)

    def _fetch(self, handle: str, names: list[str]) -> builtins.dict[str, Any]:
        # builtins.dict: inside the class, `dict` names the Client.dict method.
        return {name: _tensors.plain(a) for name, a in self._fetch_named(handle, names)}

    def _create_dictionary(self, items: Iterable[tuple[str, Any]]) -> Handle:
        requests = (pb.CreateDictionaryRequest(chunk=c) for c in _tensors.mapping_chunks(items, self.chunk_bytes))
        return _handle(self._stub.CreateDictionary(requests, timeout=self.timeout).dictionary)

    def _update_dictionary(self, d: str, items: list[tuple[str, Any]]) -> None:
        def requests() -> Iterator[pb.UpdateDictionaryRequest]:
            yield pb.UpdateDictionaryRequest(dictionary=d)
            for chunk in _tensors.mapping_chunks(items, self.chunk_bytes):
                yield pb.UpdateDictionaryRequest(chunk=chunk)

        self._stub.UpdateDictionary(requests(), timeout=self.timeout)


def as_array(value: Any) -> npt.NDArray[Any]:
    """Values as numpy arrays (0-dim for scalars), for callers that want arrays throughout."""
    return np.asarray(value)
