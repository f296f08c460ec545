"""The service: one typed method per operation of the weightavg API.

Each method resolves handles to objects, takes their locks, reserves what the operation will
allocate before it allocates it, calls the domain, and lets the store recharge what changed:
objects are created through `Registry.create`/`Registry.add` and changed through
`Registry.mutate`, the two constructs that reserve and charge. The transport above decodes
requests into these calls and encodes their results; nothing here knows about gRPC or protobuf.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from . import __version__
from .domain import cuda_ipc, hostcache, pinned, shm
from .domain import (
    averaging, batching, batchnorm, collectives, devices, dictionaries, flat, footprint, losses, modules, moves, optimizers,
    specs, training,
)
from .domain.averaging import BufferMode
from .domain.batchnorm import Momenta
from .domain.dictionaries import TensorDict
from .domain.ema import EmaState, ScheduleChange
from .domain.dtypes import DTYPES
from .domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .domain.options import Value
from .domain.tensors import (
    Bytes, HandleSummary, StorageKey, TensorHolder, add_bytes, host_copies, storage_bytes, storages, tensor_bytes,
    tensors_of,
)
from .domain import merging, outer, soups
from .store import shm as store_shm
from .store import snapshot
from .store.accounting import Reservation
from .store.registry import CALLER_SESSION, MODULE_KINDS, Entry, Kind, Registry, TenantUsage
from .store.requests import RequestKey, RequestStats, register_answer_type
from .store.tenants import CALLER, Quota
from .store import versions

OnHeader = Callable[[str, int], "torch.device | None"]
"""Called with each uploaded tensor's name and byte size once its header is read, before its buffer
is allocated; it reserves the bytes, or raises to refuse the tensor. It returns the device the tensor
will be held on (None: not said): a tensor whose bytes lie in a CUDA region on that device is
received there, device to device, rather than through the host."""

Upload = Callable[[OnHeader], list[tuple[str, torch.Tensor]]]
"""A request's tensors, received when called: the transport joins the stream, calling back for
each header so the service can reserve before anything is allocated."""

StopCheck = Callable[[], bool]
"""True once the caller has gone (cancelled or past its deadline): long loops stop between batches."""

Named = list[tuple[str, torch.Tensor]]


class Fetched(Named):
    """What a fetch yields: the host copies, and the object's etag read under the same lock (the
    state the copies are of; `store/versions.py`), or "" where none is kept (a cluster's object
    beyond rank 0)."""

    etag: str = ""

    @classmethod
    def of(cls, copies: Named, etag: str) -> Fetched:
        fetched = cls(copies)
        fetched.etag = etag
        return fetched
T = TypeVar("T")
P = ParamSpec("P")


@register_answer_type  # answers that hold handles survive a snapshot with their request IDs
@dataclass(frozen=True)
class Ref:
    """A handle as callers see it: its ID and the kind of object it stands for."""

    id: str
    kind: Kind
    tenant: str = ""
    """The owning tenant, where a listing reports it."""


@dataclass(frozen=True)
class ServerInfo:
    """What the server runs and accepts."""

    version: str
    torch_version: str
    device: str
    layer_types: list[str]
    dtypes: list[str]
    max_spec_depth: int
    cuda_memory_allocated: int
    max_spec_layers: int = specs.MAX_SPEC_LAYERS


@dataclass(frozen=True)
class Size:
    """A handle's size: a dictionary's entry shapes (and its EMA state, if it holds one), a tensor's
    shape, or a module's parameter count."""

    entries: list[tuple[str, tuple[int, ...]]] | None = None
    shape: tuple[int, ...] | None = None
    parameter_count: int | None = None
    ema: EmaState | None = None
    etag: str = ""
    """The object's etag now (`store/versions.py`)."""


@register_answer_type  # a repeated EMA update answers with the step and decay of the first
@dataclass(frozen=True)
class EmaResult:
    """What an EMA update used: its step and the decay at that step (0.0: a full copy)."""

    step: int
    decay: float


@dataclass(frozen=True)
class ModelDescription:
    """A model's parts, options and data sizes."""

    module: list[specs.OptionRow]
    loss_type: str
    loss_options: dict[str, Value]
    optimizer_type: str
    optimizer_options: dict[str, Value]
    train: dict[str, Value]
    test: dict[str, Value]
    train_size: int
    test_size: int


register_answer_type(soups.Soup)  # a repeated soup answers with the first soup's handle and scores
SoupResult = soups.Soup[Ref]
"""A greedy soup's new dictionary handle and how it was made."""


@dataclass(frozen=True)
class DeviceUsage:
    """Live handles whose tensors are on a device, and the bytes of distinct storage there."""

    handles: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Settings:
    """What the service needs of the server's configuration."""

    device: torch.device
    max_spec_depth: int
    session_lease_seconds: float
    max_session_lease_seconds: float
    state_dir: str = ""
    allow_shm: bool = False
    """Whether clients on this host may register shared memory regions (--allow-shm)."""
    max_spec_layers: int = specs.MAX_SPEC_LAYERS
    """Most layers one spec may hold (--max-spec-layers)."""


@dataclass(frozen=True)
class Placement:
    """Where a new object lives in a cluster: every rank (`replicate`), one rank, or (neither) rank 0."""

    replicate: bool = False
    rank: int | None = None


@dataclass(frozen=True)
class RankInfo:
    """One rank of the cluster: its device, the handles it holds, and their bytes of tensor storage
    over all its devices (what default placement compares)."""

    rank: int
    device: str
    handles: int
    bytes: int = 0


@register_answer_type  # a repeated RunEpoch on a replicated model answers with every rank's metrics
@dataclass(frozen=True)
class RankMetrics:
    """The metrics of an epoch or a test pass that ran on every rank of a replicated model (a
    cluster's), each rank's in rank order."""

    ranks: list[Named]


Metrics = Named | RankMetrics
"""What RunEpoch and RunTest answer: the metrics, or on a cluster's replicated model each rank's."""


@register_answer_type  # a repeated AllReduce answers with what the first one reduced
@dataclass(frozen=True)
class Reduced:
    """What an all-reduce covered: tensors per rank and collectives issued."""

    tensors: int
    buckets: int


NOTHING: Mapping[str, int] = {}
"""For `mutate` calls that change values in place and allocate nothing new."""


class _Prepared:
    """An average's update, checked under the locks `mutate` takes (its `need`), so the check and
    the change hold the locks once: the check's bytes are what the change will allocate."""

    __slots__ = ("_prepare", "_dictionary", "update")

    def __init__(self, prepare: Callable[[], averaging.Update], dictionary: TensorDict) -> None:
        self._prepare = prepare
        self._dictionary = dictionary
        self.update: averaging.Update

    def need(self) -> Mapping[str, int]:
        self.update = self._prepare()
        return footprint.update_bytes(self.update, self._dictionary)

    def in_place(self) -> bool:
        """Whether the update, once prepared, replaced no tensor (`Update.in_place`): no recharge."""
        return self.update.in_place


def _plain_block(nbytes: int) -> torch.Tensor:
    """A host-cache block whose new pages are not advised for huge pages (`Service.upload_arena`)."""
    return hostcache.empty(nbytes, huge=False)


@dataclass
class _Receiving:
    """An upload being received: its reservation, and where the tensor whose header came last will
    be held (`Service._receive`), so that `Service.staging_buffer` can reserve a host buffer for it."""

    reservation: Reservation
    device: torch.device | None = None
    arena: bool = False
    """Whether its tensors may lie back to back in one buffer (`Service.upload_arena`): a dictionary's
    entries, which every verb reads as views (copyparms' flat copies are such views too). Training
    data and parameters stay tensors of their own: batching views a data tensor from its storage's
    start."""


_RECEIVING: contextvars.ContextVar[_Receiving | None] = contextvars.ContextVar("weightavg_receiving", default=None)
"""The upload the calling thread is receiving (the transport asks for each tensor's buffer in the
thread that receives it), or None."""


def _smaller_batch_hint(sized: Sequence[tuple[int, int]]) -> str:
    """What an epoch refused for room can change besides freeing handles: its batch size, where one
    batch's forward and backward pass take room (`footprint.batch_pass_bytes`; `sized`: the rows of
    a batch, the batch size at most the data's rows, and those bytes, as the refused reservation
    read them). A batch size above the data's rows once named itself as the batch's rows, where the
    bytes were a batch of the data's rows: lowering it to the data's rows changed nothing (found by
    review)."""
    if not sized or not sized[-1][1]:
        return ""
    rows, nbytes = sized[-1]
    return (
        f", or train on smaller batches: a batch of {rows} rows takes {nbytes} bytes for its forward and "
        "backward pass (train(m, batchsize=w))"
    )


def _without_gradients_hint(grad: bool) -> str:
    """What a forward refused for room can change besides freeing handles: with gradients, its pass
    keeps each layer's activations for a backward pass (`footprint.pass_bytes`); a pass without
    gradients keeps none of them."""
    if not grad:
        return ""
    return (
        ", or run it without gradients: forward keeps each layer's activations for a backward pass, "
        "nforward and eforward (FORWARD_MODE_TRAIN_NO_GRAD, FORWARD_MODE_EVAL) keep none"
    )


def _copied_in_place() -> bool:
    """For `mutate(in_place=...)`: a change that only copies values into tensors the object already
    holds (`load_parameters`; a test or an evaluation: rows a max_norm embedding renormalises, test
    data narrowed back to full size on their own storage), so no allocation it reaches changes."""
    return True


def _exactly_once(method: Callable[P, T]) -> Callable[P, T]:
    """A state-changing operation that runs once per request ID.

    Called with `request=RequestKey(...)` (the transport passes one when the call carries a request
    ID), the operation goes through the store's request table before it resolves any handle: a
    repeat gets the first call's answer, waits for it while it runs, or is refused when its
    arguments differ (store/requests.py). Without one it just runs. The decorated method declares
    the keyword so that callers are type-checked; its body never reads it.
    """

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        key = kwargs.get("request")
        if key is None:
            return method(*args, **kwargs)
        service = args[0]
        if not isinstance(service, Service) or not isinstance(key, RequestKey):
            raise TypeError(f"{method.__name__}(request=...) takes a RequestKey")
        return service.store.requests.answer(
            key, method.__name__, CALLER_SESSION.get(), lambda: method(*args, **kwargs), CALLER.get().tenant
        )

    return call


class Service:
    """The weightavg operations over one store; safe to call from many threads at once."""

    def __init__(self, store: Registry, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.device = settings.device

    # -- lookups ------------------------------------------------------------------------------------

    def _module(self, handle: str) -> Entry:
        """A module, model or optimizer handle's entry; under its lock, `module_of` is its module."""
        return self.store.get(handle, *MODULE_KINDS)

    def _source(self, handle: str) -> tuple[Entry, nn.Module | TensorDict]:
        """What an average folds in: a module (a model's, an optimizer's) or a dictionary's entries,
        as they are now (under the entry's lock, `source_of` says what they are then)."""
        entry = self.store.get(handle, *MODULE_KINDS, Kind.DICTIONARY)
        return entry, source_of(entry)

    def _model(self, handle: str) -> tuple[Entry, training.Model]:
        entry = self.store.get(handle, Kind.MODEL)
        return entry, entry.obj

    def _optimizer(self, handle: str) -> Entry:
        """An optimizer or model handle's entry; under its lock, `optimizer_of` is its optimizer."""
        return self.store.get(handle, Kind.OPTIMIZER, Kind.MODEL)

    def _receive(
        self, upload: Upload, reservation: Reservation, where: Callable[[str], torch.device], *, arena: bool = False
    ) -> Named:
        """An upload's tensors, each reserved on the device it will be held on (`where(name)`) from
        its header, before its buffer is allocated; with `arena`, a dictionary's entries, back to back
        in one buffer on a CPU server (`upload_arena`)."""
        receiving = _Receiving(reservation, arena=arena)

        def reserve(name: str, nbytes: int) -> torch.device:
            device = where(name)
            self.store.grow(reservation, nbytes={str(device): nbytes})
            receiving.device = device
            return device

        token = _RECEIVING.set(receiving)
        try:
            return upload(reserve)
        finally:
            _RECEIVING.reset(token)

    def _change_with_upload(
        self, entry: Entry, upload: Upload, count: int, wrong_count: str, change: Callable[[Named], T], etag: str = "",
    ) -> T:
        """Receive `count` tensors (each reserved on the device from its header), then apply `change`
        to them under the entry's lock, recharging it afterwards. A stale `etag` is refused before the
        upload is received, and again under the lock."""
        versions.check(entry.lock, etag, entry.kind.value)
        with self.store.reserve() as reservation:
            tensors = self._receive(upload, reservation, self._on_device)
            if len(tensors) != count:
                raise InvalidArgument(f"{wrong_count}; received {len(tensors)}")
            with self.store.mutate(entry, need=NOTHING, etag=etag):
                return change(tensors)

    def _on_device(self, name: str) -> torch.device:
        return self.device

    def _on_host(self, name: str) -> torch.device:
        return torch.device("cpu")

    def _entry_placement(self, name: str) -> torch.device:
        return dictionaries.placement(name, self.device)

    # -- the server ---------------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """Versions, device, and what the server accepts."""
        return ServerInfo(
            version=__version__, torch_version=torch.__version__, device=str(self.device), layer_types=list(specs.LAYER_TYPES), dtypes=list(DTYPES),
            max_spec_depth=self.settings.max_spec_depth, max_spec_layers=self.settings.max_spec_layers,
            cuda_memory_allocated=devices.allocated(self.device) if self.sees_server_wide() else 0,
        )

    def sees_server_wide(self) -> bool:
        """Whether the caller may see figures that count every tenant's objects and calls (device
        memory, per-method statistics, request IDs): admins, and every caller of a server without
        tokens. Others see their own tenant's (a review found a user reading another tenant's bytes
        and call counts from GetServerStats and GetServerInfo)."""
        return CALLER.get().is_admin

    def device_usage(self) -> dict[str, DeviceUsage]:
        """Handles and distinct tensor bytes per device ("" for handles holding no tensor), by device.

        Counted by walking every idle live object, apart from the store's ledger, so the two can be
        compared; a busy one counts what the store charged it at its last recharge. A scrape never
        waits behind a long call, and never touches a busy object's tensors: the call in flight
        changes them without the GIL, and a scrape that walked a training module read a gradient as
        the backward pass replaced it and crashed the server (found by review).
        """
        handles: dict[str, int] = {}
        seen: set[StorageKey] = set()
        caller = CALLER.get()
        for _, entry in self.store.items():
            if not caller.is_admin and entry.tenant != caller.tenant:  # a user sees its tenant's objects
                continue
            keys = self._walked(entry)
            if keys is None:  # freed since the listing began
                continue
            for device in sorted({device for device, _, _ in keys}) or [""]:
                handles[device] = handles.get(device, 0) + 1
            seen |= keys
        nbytes = storage_bytes(seen)
        return {d: DeviceUsage(handles.get(d, 0), nbytes.get(d, 0)) for d in sorted(set(handles) | set(nbytes))}

    def _walked(self, entry: Entry) -> frozenset[StorageKey] | None:
        """The allocations an object reaches: walked under its lock if it is free now, else (busy)
        those the store charged it (`Registry.charged`); None once its handle is freed."""
        if not entry.lock.acquire(blocking=False):
            keys = self.store.charged(entry)
            return None if entry.freed else keys
        try:
            return None if entry.freed else frozenset(storages(tensors_of(entry.obj)))
        finally:
            entry.lock.release()

    def rank_bytes(self) -> list[int]:
        """Bytes of tensor storage each rank holds, every tenant's, in rank order: here the one rank
        (the operator's figure, for metrics; a cluster's: cluster.ClusterService)."""
        return [sum(self.store.held_bytes().values())]

    def rank_kept_bytes(self) -> list[int]:
        """Freed host memory each rank's host cache keeps idle, in rank order: here the one rank
        (for metrics; a cluster's: cluster.ClusterService)."""
        return [hostcache.cache().stats().idle_bytes]

    def request_id_stats(self) -> RequestStats:
        """Request IDs remembered now, duplicates answered from them, and IDs dropped at the caps:
        server-wide figures, so none for a caller that does not see those (`sees_server_wide`)."""
        return self.store.requests.stats() if self.sees_server_wide() else RequestStats(0, 0, 0)

    # -- modules ------------------------------------------------------------------------------------

    @_exactly_once
    def create_module(
        self, spec: specs.LayerSpec, *, placement: Placement = Placement(), request: RequestKey | None = None
    ) -> Ref:
        """Build a module from a spec on the server's device (a one-rank server: rank 0 or replicated)."""
        self._one_rank(placement.rank)
        specs.check_layer_count(spec, self.settings.max_spec_layers)  # before the footprint builds it once
        depth = self.settings.max_spec_depth
        need = footprint.module_bytes(spec, self.device, depth)
        handle = self.store.create(Kind.MODULE, need, lambda: self._built(spec, depth))
        return Ref(handle, Kind.MODULE)

    def _built(self, spec: specs.LayerSpec, depth: int) -> nn.Module:
        """The module of a spec on the server's device, each dtype's parameters in one buffer
        (`flat`: averages over them are one kernel)."""
        module = flat.build_flat(lambda: specs.build_module(spec, max_depth=depth))
        moves.move(module, self.device, None)  # moves the parameters into one buffer per dtype there too
        return module

    def describe_module(self, handle: str) -> list[specs.OptionRow]:
        """The module's options table, one row per layer."""
        entry = self._module(handle)
        with self.store.reading(entry):
            return specs.describe_module(module_of(entry))

    def parameter_names(self, handle: str, child: str) -> list[str]:
        entry = self._module(handle)
        with self.store.reading(entry):
            return modules.parameter_names(module_of(entry), child)

    def buffer_names(self, handle: str, child: str) -> list[str]:
        entry = self._module(handle)
        with self.store.reading(entry):
            return modules.buffer_names(module_of(entry), child)

    @_exactly_once
    def set_parameter(
        self, handle: str, name: str, upload: Upload, *, rank: int | None = None, etag: str = "",
        request: RequestKey | None = None,
    ) -> bool:
        """Copy an uploaded tensor into a parameter, or register a new one; True when registered. With
        `etag`, only if the module's group is still at that etag (ABORTED otherwise)."""
        self._one_rank(rank)
        entry = self._module(handle)
        return self._change_with_upload(
            entry, upload, 1, "SetParameter takes exactly one tensor",
            lambda tensors: modules.set_parameter(module_of(entry), name, tensors[0][1]), etag,
        )

    def _view(self, handle: str, make: Callable[[nn.Module, str], TensorDict], child: str) -> Ref:
        entry = self._module(handle)
        with self.store.reading(entry):
            return Ref(
                self.store.create(Kind.DICTIONARY, NOTHING, lambda: make(module_of(entry), child), share=entry),
                Kind.DICTIONARY,
            )

    @_exactly_once
    def view_parameters(self, handle: str, child: str, *, request: RequestKey | None = None) -> Ref:
        """A live dictionary over a module's (or child's) parameters."""
        return self._view(handle, modules.view_parameters, child)

    @_exactly_once
    def view_buffers(self, handle: str, child: str, *, request: RequestKey | None = None) -> Ref:
        """A live dictionary over a module's (or child's) buffers."""
        return self._view(handle, modules.view_buffers, child)

    @_exactly_once
    def copy_parameters(
        self, handle: str, dtype: torch.dtype | None = None, buffers: bool = False, *,
        request: RequestKey | None = None,
    ) -> Ref:
        """A new dictionary holding copies of the module's parameters (and buffers), floating ones
        converted to `dtype` when given."""
        entry = self._module(handle)
        averaging.check_copy_dtype(dtype)
        with self.store.reading(entry):
            module = module_of(entry)
            need = footprint.copy_bytes(module, dtype, buffers)
            copy = self.store.create(
                Kind.DICTIONARY, need, lambda: averaging.copy_parameters(module, dtype, buffers)
            )
        return Ref(copy, Kind.DICTIONARY)

    @_exactly_once
    def load_parameters(
        self, handle: str, dictionary: str, *, etag: str = "", request: RequestKey | None = None
    ) -> dict[str, bool]:
        """Copy a dictionary's values into the module's parameters; per-name success. With `etag`, only
        if the module's group is still at that etag."""
        entry = self._module(handle)
        source = self.store.get(dictionary, Kind.DICTIONARY)
        with self.store.mutate(entry, need=NOTHING, reading=(source,), in_place=_copied_in_place, etag=etag):
            return averaging.load_parameters(module_of(entry), source.obj)

    @_exactly_once
    def average_parameters(
        self, handle: str, dictionary: str, buffers: BufferMode = BufferMode.EXCLUDE, *, etag: str = "",
        request: RequestKey | None = None,
    ) -> int:
        """Fold the module's parameters (or a dictionary's entries) into the dictionary's running
        average; the new count. With `etag`, only if the dictionary is still at that etag."""
        entry, _ = self._source(handle)
        target = self.store.get(dictionary, Kind.DICTIONARY)
        update = _Prepared(lambda: averaging.prepare_average(source_of(entry), target.obj, buffers), target.obj)
        with self.store.mutate(target, need=update.need, reading=(entry,), in_place=update.in_place, etag=etag):
            averaging.apply(update.update, target.obj)
        return int(update.update.count or 0.0)

    @_exactly_once
    def update_moving_average(
        self, handle: str, dictionary: str, change: ScheduleChange, step: int | None,
        buffers: BufferMode = BufferMode.EXCLUDE, *, etag: str = "", request: RequestKey | None = None,
    ) -> EmaResult:
        """One exponential-moving-average update of the dictionary from the module (or a dictionary's
        entries), with the dictionary's schedule changed by `change`; the step and decay used. With
        `etag`, only if the dictionary is still at that etag."""
        entry, _ = self._source(handle)
        target = self.store.get(dictionary, Kind.DICTIONARY)
        update = _Prepared(
            lambda: averaging.prepare_ema(source_of(entry), target.obj, change, step, buffers), target.obj
        )
        with self.store.mutate(target, need=update.need, reading=(entry,), in_place=update.in_place, etag=etag):
            averaging.apply(update.update, target.obj)
        return EmaResult(averaging.used_step(update.update), update.update.decay)

    @_exactly_once
    def reset_batchnorm(self, handle: str, *, request: RequestKey | None = None) -> Momenta:
        entry = self._module(handle)
        with self.store.mutate(entry, need=NOTHING):
            return batchnorm.reset_batchnorm(module_of(entry))

    @_exactly_once
    def restore_momentum(self, handle: str, momenta: Momenta, *, request: RequestKey | None = None) -> None:
        entry = self._module(handle)
        with self.store.mutate(entry, need=NOTHING):
            batchnorm.restore_momentum(module_of(entry), momenta)

    # -- dictionaries and tensors -------------------------------------------------------------------

    @_exactly_once
    def create_dictionary(
        self, upload: Upload, *, placement: Placement = Placement(), request: RequestKey | None = None
    ) -> Ref:
        """A new dictionary of the uploaded tensors ('.n' on the CPU, the rest on the device)."""
        self._one_rank(placement.rank)
        with self.store.reserve(handles=1) as reservation:
            tensors = self._receive(upload, reservation, self._entry_placement, arena=True)
            d = TensorDict()
            dictionaries.set_entries(d, tensors, self.device)
            return Ref(self.store.add(Kind.DICTIONARY, d, reservation), Kind.DICTIONARY)

    @_exactly_once
    def update_dictionary(
        self, handle: str, upload: Upload, *, rank: int | None = None, etag: str = "",
        request: RequestKey | None = None,
    ) -> list[str]:
        """Set entries of a dictionary from an upload, all or nothing; the names set. In a cluster,
        `rank` sets one rank's entries of a replicated dictionary. With `etag`, only if the dictionary
        is still at that etag (checked before the upload is received, and under the lock)."""
        self._one_rank(rank)
        entry = self.store.get(handle, Kind.DICTIONARY)
        versions.check(entry.lock, etag, entry.kind.value)
        with self.store.reserve() as reservation:
            # Counted as additions: the old values are still held while the new ones arrive.
            tensors = self._receive(upload, reservation, self._entry_placement, arena=not entry.obj.live)
            with self.store.mutate(entry, need=NOTHING, etag=etag):
                return dictionaries.set_entries(entry.obj, tensors, self.device)

    @_exactly_once
    def delete_entries(
        self, handle: str, names: Sequence[str], *, etag: str = "", request: RequestKey | None = None
    ) -> None:
        """Remove entries, all or nothing; with `etag`, only if the dictionary is still at that etag."""
        entry = self.store.get(handle, Kind.DICTIONARY)
        with self.store.mutate(entry, need=NOTHING, etag=etag):
            dictionaries.delete_entries(entry.obj, list(names))

    @_exactly_once
    def create_tensor(self, upload: Upload, *, request: RequestKey | None = None) -> Ref:
        """A new tensor handle holding the one uploaded tensor, on the device."""
        with self.store.reserve(handles=1) as reservation:
            tensors = self._receive(upload, reservation, self._on_device)
            if len(tensors) != 1:
                raise InvalidArgument(f"CreateTensor takes exactly one tensor, received {len(tensors)}")
            holder = TensorHolder(tensors[0][1].to(self.device))
            return Ref(self.store.add(Kind.TENSOR, holder, reservation), Kind.TENSOR)

    @contextlib.contextmanager
    def fetch(
        self, handle: str, names: Sequence[str], *, rank: int | None = None, reused: bool = False
    ) -> Iterator[Fetched]:
        """Host copies of a dictionary's entries (all, or the named), a tensor, or named parameters,
        for the length of the block (`with service.fetch(h, names) as copies:`), with the object's
        etag as of the copies (`copies.etag`).

        The copies are taken together under the object's lock, so the reply is one consistent cut,
        and reserved on the host until the block ends (the reply has streamed). All of them are
        there at once, so the reply can declare how many tensors and bytes it carries. With `reused`
        (for a caller that reads the copies only inside the block, as a reply does) the CPU copies
        lie in kept host memory that later replies reuse (`hostcache.lending`).
        """
        self._one_rank(rank)
        entry = self.store.get(handle)
        with contextlib.ExitStack() as held:
            with self.store.reading(entry):
                named = self._named(handle, entry, names)
                held.enter_context(self.store.reserve(nbytes=tensor_bytes((t for _, t in named), "cpu")))
                copies = host_copies(named, held.enter_context(hostcache.lending()) if reused else None)
                etag = versions.etag(entry.lock)
            yield Fetched.of(copies, etag)

    def _named(self, handle: str, entry: Entry, names: Sequence[str]) -> Named:
        """What a fetch names: dictionary entries (all when no names), a tensor, or module parameters,
        each name once (a repeated name was copied and streamed once per repeat)."""
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise InvalidArgument(f"'{name}' is named twice; name each entry once per fetch")
            seen.add(name)
        if entry.kind is Kind.DICTIONARY:
            return dictionaries.select(entry.obj, list(names))
        if entry.kind is Kind.TENSOR:
            if names:
                raise InvalidArgument("a tensor handle has no names; fetch it without names")
            return [("", entry.obj.tensor)]
        module = module_of(self._module(handle))  # a loss has no parameters: INVALID_ARGUMENT
        if not names:
            # What to do instead, since "all" is what a user fetching a model's weights asks first; in
            # the client's verbs and, for a client generated from the .proto, in the contract's.
            raise InvalidArgument(
                "name the parameters to fetch from a module, or fetch them all through a view: dict(parms(m)) "
                "(and its buffers: dict(buffers(m))), or a copy: copyparms(m, buffers=True); on the wire: set "
                "FetchTensorsRequest.names, or fetch the dictionary that ViewParameters, ViewBuffers or "
                "CopyParameters (with buffers) returns"
            )
        return [(name, modules.parameter(module, name).detach()) for name in names]

    def size(self, handle: str) -> Size:
        """Entry shapes of a dictionary, a tensor's shape, or a module's parameter count."""
        entry = self.store.get(handle)
        with self.store.reading(entry):
            etag = versions.etag(entry.lock)
            if entry.kind is Kind.DICTIONARY:
                return Size(entries=dictionaries.sizes(entry.obj), ema=entry.obj.ema, etag=etag)
            if entry.kind is Kind.TENSOR:
                return Size(shape=tuple(entry.obj.tensor.shape), etag=etag)
            return Size(parameter_count=modules.parameter_count(module_of(self._module(handle))), etag=etag)

    @_exactly_once
    def free(
        self, handles: Sequence[str], every: bool, tenant: str = "", purge: bool = False, *,
        request: RequestKey | None = None,
    ) -> int:
        """Free the handles (all or nothing), every handle of the caller's session (`every`), every
        handle of `tenant` (admins), or every handle on the server (`purge`, admins: an operator's
        clean-up); how many. Each of these takes no handles: given some, nothing is freed.

        `every` without a session is refused: such a caller cannot tell its handles from other
        clients', and freeing all handles of no session took theirs too.
        """
        if purge:
            if handles or every or tenant:
                raise InvalidArgument("purge frees every handle on the server: give no handles and not all with it")
            return self.store.purge()
        if tenant:
            if handles or every:
                raise InvalidArgument("free a tenant's handles, or the handles given, or all: one at a time")
            return self.store.purge(tenant)
        if not every:
            return self.store.free(list(handles))
        if handles:  # found by review: the handles were ignored and every handle of the session freed
            raise InvalidArgument(
                "free the handles given, or all of your session's handles (all): one at a time; nothing freed"
            )
        if CALLER_SESSION.get() is None:
            raise FailedPrecondition(
                "free() without handles (FreeHandlesRequest.all) frees your session's handles, and this call has no "
                "session; nothing freed. Name the handles (free(h1, h2); FreeHandlesRequest.handles), use a session "
                "(Client(address, session=True), or CreateSession's id in 'weightavg-session' metadata: closing it "
                "frees what it made), or, as the server's operator, free every handle on it (weightavg purge ADDRESS)"
            )
        return self.store.free_all()

    @_exactly_once
    def addref(self, handle: str, *, request: RequestKey | None = None) -> Ref:
        """A second handle to the same object."""
        handle_id, kind = self.store.addref(handle)
        return Ref(handle_id, kind)

    def list_handles(self, all_tenants: bool = False) -> list[tuple[Ref, HandleSummary]]:
        """The caller's live handles (with `all_tenants`, for admins: every tenant's) with what they
        hold and their tenant, oldest first."""
        listed = []
        for handle_id, entry in self.store.visible_items(all_tenants):
            summary = self.store.describe(entry)
            if summary is not None:  # else freed since the listing began
                listed.append((Ref(handle_id, entry.kind, entry.tenant), summary))
        return listed

    def tenant_usage(self, named: Iterable[str] = ()) -> dict[str, TenantUsage]:
        """Per tenant, what it holds and its quota: every tenant for an admin, else the caller's own;
        sorted. `named` tenants (those that made calls) are listed too, holding nothing if the store
        knows nothing of them: a tenant that never held anything was missing from GetServerStats,
        its calls and failures with it, while the metrics showed them (found by review)."""
        usage = self.store.tenant_usage()
        for name in named:
            if name not in usage:
                usage[name] = TenantUsage(0, {}, Quota())
        caller = CALLER.get()
        return {name: u for name, u in sorted(usage.items()) if caller.is_admin or name == caller.tenant}

    @_exactly_once
    def move(self, handle: str, device: str, dtype: torch.dtype | None, *, request: RequestKey | None = None) -> Ref:
        """Move a tensor, dictionary, module, optimizer or model to another device and/or floating
        dtype, in place. A module moves with the state of its optimizers and its models' data
        (`moves.group`), whichever of their handles is named."""
        entry = self.store.get(handle)
        target = devices.parse(device) if device else None

        def moving() -> moves.Group | None:
            return moves.group(entry.obj, self.store.objects_sharing(entry.lock))

        with self.store.mutate(entry, need=lambda: moves.move_bytes(entry.obj, target, dtype, moving())):
            moves.move(entry.obj, target, dtype, moving())
        return Ref(handle, entry.kind)

    # -- losses, optimizers, models -----------------------------------------------------------------

    @_exactly_once
    def create_loss(
        self, type_name: str, args: tuple[Value, ...], kwargs: tuple[tuple[str, Value], ...],
        *, request: RequestKey | None = None,
    ) -> Ref:
        """A loss function on the server's device (losses hold no tensors of their own)."""
        loss = losses.create_loss(type_name, args, kwargs)
        need = tensor_bytes(loss.tensors(), self.device)
        return Ref(self.store.create(Kind.LOSS, need, lambda: _placed(loss, self.device)), Kind.LOSS)

    @_exactly_once
    def create_optimizer(
        self, handle: str, type_name: str, args: tuple[Value, ...], kwargs: tuple[tuple[str, Value], ...],
        *, request: RequestKey | None = None,
    ) -> Ref:
        """An optimizer over a module's (or model's module's) parameters."""
        entry = self._module(handle)
        if entry.kind is Kind.OPTIMIZER:
            raise InvalidArgument("build an optimizer over a module or model, not over another optimizer")
        with self.store.reading(entry):
            module = module_of(entry)
            need = footprint.optimizer_bytes(type_name, module, args, kwargs)
            handle_id = self.store.create(
                Kind.OPTIMIZER, need, lambda: optimizers.create_optimizer(type_name, module, args, kwargs), share=entry
            )
        return Ref(handle_id, Kind.OPTIMIZER)

    def learning_rate(self, handle: str) -> float:
        entry = self._optimizer(handle)
        with self.store.reading(entry):
            return optimizers.get_lr(optimizer_of(entry))

    @_exactly_once
    def set_learning_rate(self, handle: str, lr: float, *, request: RequestKey | None = None) -> None:
        entry = self._optimizer(handle)
        with self.store.mutate(entry, need=NOTHING):
            optimizers.set_lr(optimizer_of(entry), lr)

    @_exactly_once
    def create_model(self, module: str, loss: str, optimizer: str, *, request: RequestKey | None = None) -> Ref:
        """A model from a module, a loss and an optimizer; their handles become the model's."""
        parts = (
            self.store.get(module, Kind.MODULE), self.store.get(loss, Kind.LOSS), self.store.get(optimizer, Kind.OPTIMIZER)
        )
        # No handle slot is reserved ahead: the model takes its parts' three handles, which `add`
        # counts, so a model can be made even at the handle cap.
        with self.store.reading(*parts), self.store.reserve() as reservation:
            model = training.create_model(parts[0].obj, parts[1].obj, parts[2].obj)
            handle = self.store.add(Kind.MODEL, model, reservation, lock=parts[0].lock, replacing=parts)
        return Ref(handle, Kind.MODEL)

    @_exactly_once
    def update_model(self, handle: str, parts: Sequence[str], *, request: RequestKey | None = None) -> Ref:
        """Replace a model's module, loss and/or optimizer; the parts' handles become the model's.
        Refused, nothing changed, when the new parts would not take the loaded data's dtypes."""
        entry, model = self._model(handle)
        given: dict[Kind, Entry] = {}
        for part_handle in parts:
            part = self.store.get(part_handle, Kind.MODULE, Kind.LOSS, Kind.OPTIMIZER)
            if part.kind in given:
                raise InvalidArgument(f"two {part.kind.value} handles given; give at most one of each part")
            given[part.kind] = part
        new = [given[k].obj if k in given else None for k in (Kind.MODULE, Kind.LOSS, Kind.OPTIMIZER)]
        with self.store.mutate(entry, *given.values(), need=NOTHING):
            training.check_parts(model, *new)
            module = given.get(Kind.MODULE)
            if module is not None and module.obj is not model.module:
                # The model keeps its own lock; a module that other handles (addref, views, other
                # optimizers) reach under the module's lock would then be guarded by two locks.
                others = self.store.handles_sharing(module.lock, besides=tuple(given.values()))
                if others:
                    raise InvalidArgument(
                        f"the new module has other handles ({', '.join(others)}); free them first, or build a new model"
                    )
            training.replace_parts(model, *new)
            # Charged to the model before the parts' handles go: freed first, the new parts' bytes
            # counted nowhere until the mutation's recharge, and a concurrent call could take them.
            self.store.recharge(entry)
            self.store.free(list(parts))
        return Ref(handle, Kind.MODEL)

    def describe_model(self, handle: str) -> ModelDescription:
        entry, model = self._model(handle)
        with self.store.reading(entry):
            return ModelDescription(
                module=specs.describe_module(model.module),
                loss_type=model.loss.type, loss_options=dict(model.loss.options),
                optimizer_type=model.optimizer.type, optimizer_options=model.optimizer.describe(),
                train=dict(model.train), test=dict(model.test),
                train_size=training.data_size(model, "train"), test_size=training.data_size(model, "test"),
            )

    def model_options(self, handle: str, split: str) -> dict[str, Value]:
        entry, model = self._model(handle)
        with self.store.reading(entry):
            return training.get_options(model, split)

    @_exactly_once
    def set_model_options(
        self, handle: str, split: str, values: Sequence[tuple[str, Value]], *, request: RequestKey | None = None,
    ) -> dict[str, Value]:
        entry, model = self._model(handle)
        with self.store.mutate(entry, need=NOTHING):
            return training.set_options(model, split, values)

    @_exactly_once
    def set_model_data(
        self, handle: str, split: str, upload: Upload, *, shard: bool = False, rank: int | None = None,
        request: RequestKey | None = None,
    ) -> int:
        """Load training or test inputs and targets (reserved on the device as they arrive, and their
        dtype conversions before they are made), checked against the model; the number of batches.
        In a cluster, `shard` splits the rows over the ranks and `rank` loads one rank's data."""
        self._one_rank(rank)
        entry, model = self._model(handle)
        with self.store.reserve() as reservation:
            tensors = self._receive(upload, reservation, self._on_device)
            if len(tensors) != 2:
                raise InvalidArgument(f"SetModelData takes two tensors, inputs then targets; received {len(tensors)}")
            (x_name, x), (y_name, y) = tensors
            names = (x_name or "x", y_name or "y")
            with self.store.mutate(entry, need=lambda: footprint.data_bytes(model, x, y, self.device, names)):
                return training.set_data(model, split, x, y, self.device, names)

    @_exactly_once
    def run_epoch(
        self, handle: str, should_stop: StopCheck, *, request: RequestKey | None = None,
        held: contextlib.ExitStack | None = None,
    ) -> Metrics:
        """Train one epoch; the train metrics (a cluster's replicated model: each rank's). Reserved
        before it starts: the first epoch's gradients and optimizer state, the copies that put the
        model back if the epoch fails, a shuffled epoch's reordered data, and the outputs and
        predictions the metrics keep. Those last stay reserved for the call or, given `held`, until
        it closes: the servicer holds them so until the reply has streamed."""
        with self._epoch_ready(handle, held) as model:
            return training.run_epoch(model, should_stop)

    @contextlib.contextmanager
    def _epoch_ready(self, handle: str, held: contextlib.ExitStack | None = None) -> Iterator[training.Model]:
        """A model locked and an epoch's memory reserved, nothing changed yet: train it inside the
        block. The metrics' outputs and predictions are reserved apart, for as long as `held` (or the
        block) lasts: they outlive the epoch until its reply has streamed, and were released with
        the lock, so other calls could take their bytes while a slow reader held them (found by
        review). A cluster's ranks each get this far before any trains (cluster.py, `_rank_metrics`), so
        that a refusal on one rank changes no rank.

        Raises:
            WeightavgError: the handle or the room do not allow an epoch; nothing changed.
        """
        entry, model = self._model(handle)
        with contextlib.ExitStack() as call:
            kept = (held if held is not None else call).enter_context(self.store.reserve())
            sized: list[tuple[int, int]] = []  # one batch's rows and pass bytes, read under the lock

            def need() -> Bytes:
                sized.append((footprint.train_batch_rows(model), sum(footprint.batch_pass_bytes(model).values())))
                return footprint.epoch_bytes(model)

            try:
                call.enter_context(self.store.mutate(entry, need=need))
            except ResourceExhausted as exc:
                raise ResourceExhausted(f"{exc}{_smaller_batch_hint(sized)}") from None
            self.store.grow(kept, nbytes=footprint.metrics_bytes(model, "train"))
            yield model

    def run_test(self, handle: str, should_stop: StopCheck, held: contextlib.ExitStack | None = None) -> Metrics:
        """Test over the test data; the test metrics (a cluster's replicated model: each rank's).
        The outputs and predictions the metrics keep are reserved before it starts, for the call or,
        given `held`, until it closes (the servicer's: until the reply has streamed); the copy of
        what a pass writes in place (buffers, a max_norm embedding's weight), its widest point and,
        for a module that writes its input in place, the copy of a batch it is given, for the call."""
        with self._test_ready(handle, held) as model:
            return training.test_epoch(model, should_stop)

    @contextlib.contextmanager
    def _test_ready(self, handle: str, held: contextlib.ExitStack | None = None) -> Iterator[training.Model]:
        """A model locked for a change and a test's memory reserved, nothing run yet: test it inside
        the block (the metrics' outputs and predictions reserved for as long as `held`, or the block,
        lasts). A cluster's ranks each get this far before any tests (cluster.py, `_rank_metrics`).

        A test changes the model, so it takes the way changes go (`mutate`), not a read: it puts the
        test data back to full size (a `testbatch` position) and a max_norm embedding renormalises
        the rows it reads, both in place (`_copied_in_place`).

        Raises:
            WeightavgError: the handle or the room do not allow a test; nothing changed.
        """
        entry, model = self._model(handle)
        with contextlib.ExitStack() as call:
            kept = (held if held is not None else call).enter_context(self.store.reserve())
            with self.store.mutate(entry, need=NOTHING, in_place=_copied_in_place):
                self.store.grow(kept, nbytes=footprint.metrics_bytes(model, "test"))
                copies = add_bytes(
                    footprint.forward_copy_bytes(model.module), footprint.batch_copy_bytes(model, "test"),
                    footprint.testing_pass_bytes(model),
                )
                with self.store.reserve(nbytes=copies):
                    yield model

    def evaluate(
        self, handle: str, upload: Upload, should_stop: StopCheck, held: contextlib.ExitStack | None = None
    ) -> torch.Tensor:
        """The model's outputs for uploaded inputs. The inputs (as they arrive) and the outputs
        (before the model runs) are reserved for the length of the call, or, given `held`, until it
        closes: the servicer holds them so until the reply has streamed. The model's lock is held
        only while it runs."""
        entry, model = self._model(handle)
        with contextlib.ExitStack() as call:
            reservation = (held if held is not None else call).enter_context(self.store.reserve())
            tensors = self._receive(upload, reservation, self._on_host)
            if len(tensors) != 1:
                raise InvalidArgument(f"EvaluateModel takes one input tensor, received {len(tensors)}")
            x = tensors[0][1]
            with self._eval_locked(entry, model):
                self.store.grow(reservation, nbytes=footprint.evaluate_bytes(model, x))
                with self.store.reserve(nbytes=footprint.evaluate_pass_bytes(model, x)):
                    return training.evaluate(model, x, should_stop)

    @contextlib.contextmanager
    def _eval_locked(self, entry: Entry, model: training.Model) -> Iterator[None]:
        """The model locked for a pass in eval mode: as a change (`mutate`) where the pass writes the
        module (`training.writes_in_eval_mode`: a max_norm embedding renormalises the rows it reads, in
        place), else as a read. Decided once the lock is held: `model(m, part, ...)` may replace the
        module while the call waits for it."""
        with self.store.reading(entry):
            if not training.writes_in_eval_mode(model.module):
                yield
                return
            with self.store.mutate(entry, need=NOTHING, in_place=_copied_in_place):  # the same lock, taken again
                yield

    @_exactly_once
    def forward(
        self, handle: str, mode: str, input_handle: str, upload: Upload, *, request: RequestKey | None = None,
    ) -> Ref:
        """Run a module (or a model's module) on a tensor handle, an uploaded tensor, or the model's
        own data; the output is kept as a new tensor handle."""
        entry = self._module(handle)
        with self.store.reserve(handles=1) as reservation:
            tensors = self._receive(upload, reservation, self._on_host)
            if len(tensors) > 1 or (tensors and input_handle):
                raise InvalidArgument("RunForward takes one input: a tensor handle or one streamed tensor")
            source = self.store.get(input_handle, Kind.TENSOR) if input_handle else None
            with self.store.mutate(entry, need=NOTHING, reading=(source,) if source is not None else ()):
                module = module_of(entry)
                if source is not None:
                    x = source.obj.tensor
                elif tensors:
                    x = tensors[0][1]
                elif entry.kind is Kind.MODEL:
                    x = training.default_input(entry.obj, mode)
                else:
                    raise InvalidArgument("RunForward needs an input: a tensor handle or a streamed tensor")
                train, grad = training.forward_flags(mode)
                self.store.grow(reservation, nbytes=footprint.forward_bytes(module, x, train))
                with contextlib.ExitStack() as running:
                    try:
                        running.enter_context(self.store.reserve(nbytes=footprint.pass_bytes(module, x, train, grad)))
                    except ResourceExhausted as exc:
                        raise ResourceExhausted(f"{exc}{_without_gradients_hint(grad)}") from None
                    output = training.forward(module, x, mode)
            return Ref(self.store.add(Kind.TENSOR, TensorHolder(output), reservation), Kind.TENSOR)

    @_exactly_once
    def model_input(self, handle: str, *, request: RequestKey | None = None) -> Ref:
        """A tensor handle on the model's own training inputs (batching one batches the other)."""
        entry, model = self._model(handle)
        with self.store.reading(entry):
            x = training.input_tensor(model)
            return Ref(self.store.create(Kind.TENSOR, NOTHING, lambda: TensorHolder(x), share=entry), Kind.TENSOR)

    @_exactly_once
    def restore_data(self, handle: str, split: str, *, request: RequestKey | None = None) -> int:
        entry, model = self._model(handle)
        with self.store.mutate(entry, need=NOTHING):
            return training.restore_data(model, split)

    @_exactly_once
    def next_batch(self, handle: str, split: str | None, size: int, *, request: RequestKey | None = None) -> bool:
        """Narrow a tensor handle, or a model's data, to its next batch in place; False past the end."""
        entry = self.store.get(handle, Kind.TENSOR, Kind.MODEL)
        with self.store.mutate(entry, need=NOTHING):
            if entry.kind is Kind.MODEL:
                which = split or "train"
                if size:
                    raise InvalidArgument(f"a model batches by its {which} batchsize; set it with {which}(m, batchsize=w)")
                return training.next_model_batch(entry.obj, which)
            if split is not None:
                raise InvalidArgument("a split names a model's train or test data; a tensor handle takes none")
            return batching.next_batch(entry.obj.tensor, size)

    @_exactly_once
    def recalculate_batchnorm(
        self, handle: str, should_stop: StopCheck, *, request: RequestKey | None = None,
    ) -> Momenta:
        entry, model = self._model(handle)
        with self.store.mutate(entry, need=lambda: add_bytes(
            footprint.forward_copy_bytes(model.module), footprint.batch_copy_bytes(model),
            footprint.data_pass_bytes(model, "train"),
        )):
            return training.recalculate_batchnorm(model, should_stop)

    # -- sessions and snapshots ---------------------------------------------------------------------

    def _session(self, given: str) -> str:
        """The session a request names, else the one the call carries."""
        session = given or CALLER_SESSION.get()
        if not session:
            raise InvalidArgument("name a session, or call with 'weightavg-session' metadata")
        return session

    @_exactly_once
    def create_session(self, lease: float, *, request: RequestKey | None = None) -> tuple[str, float]:
        """A new session with `lease` seconds (0: the default); its ID and lease."""
        settings = self.settings
        chosen = lease or settings.session_lease_seconds
        if not 0 < chosen <= settings.max_session_lease_seconds:  # also refuses NaN
            raise InvalidArgument(
                f"lease of {lease} s is out of range: give 0 for the default "
                f"({settings.session_lease_seconds} s) or up to {settings.max_session_lease_seconds} s"
            )
        return self.store.create_session(chosen), chosen

    def keep_alive(self, session: str) -> float:
        return self.store.renew(self._session(session))

    @_exactly_once
    def close_session(self, session: str, *, request: RequestKey | None = None) -> int:
        return self.store.close_session(self._session(session))

    # -- the cluster (one rank here; cluster.ClusterService spans torchrun's ranks) ------------------

    def _one_rank(self, rank: int | None) -> None:
        if rank not in (None, 0):
            raise InvalidArgument(
                f"rank {rank} does not exist: this server is one rank (rank 0); start it under torchrun "
                "(torchrun --nproc-per-node N -m weightavg_server) for more"
            )

    def cluster_info(self) -> list[RankInfo]:
        """Each rank's device, handle count and bytes held, in rank order: here the one rank (for a
        caller that does not see server-wide figures, its tenant's)."""
        if self.sees_server_wide():
            return [RankInfo(0, str(self.device), len(self.store), sum(self.store.held_bytes().values()))]
        usage = self.store.tenant_usage().get(CALLER.get().tenant)
        held = (usage.handles, sum(usage.nbytes.values())) if usage is not None else (0, 0)
        return [RankInfo(0, str(self.device), *held)]

    def _replicated_of(self, entry: Entry) -> Named:
        """What a broadcast copies: a module's parameters then buffers (module order), or a
        dictionary's entries (name order); the same order on every rank. Read under the entry's lock
        (a model's module may be replaced while a call waits for it: `source_of`)."""
        source = source_of(entry)
        if isinstance(source, TensorDict):
            return sorted(source.entries.items())
        return [(n, t.data) for n, t in source.named_parameters()] + list(source.named_buffers())

    @_exactly_once
    def broadcast(self, handle: str, rank: int, *, request: RequestKey | None = None) -> int:
        """Give every rank `rank`'s values of a replicated object; how many tensors. On one rank
        there is nothing to copy: the values stay as they are."""
        self._one_rank(rank)
        entry, _ = self._source(handle)
        with self.store.reading(entry):
            return len(self._replicated_of(entry))

    def _reduced_of(self, entry: Entry) -> Named:
        """What an all-reduce of the entry covers: a module's floating parameters or a dictionary's
        floating entries with their names, in name order (the same order on every rank; the ranks
        compare the names too, since equal shapes under other names must not be summed together).
        Read under the entry's lock, as `_replicated_of`."""
        source = source_of(entry)
        if isinstance(source, TensorDict):
            named = sorted(source.entries.items())
        else:
            named = sorted(source.named_parameters())
        return [(n, t.data) for n, t in named if t.is_floating_point()]

    @_exactly_once
    def allreduce(
        self, handle: str, op: str, weights: Sequence[float], group_size: int = 0, *,
        request: RequestKey | None = None,
    ) -> Reduced:
        """Average (or sum) a replicated object over the ranks (in groups of `group_size` consecutive
        ranks; 0: all): on one rank, the values stay as they are."""
        collectives.rank_scale(op, weights, 0, 1, group_size)
        entry, _ = self._source(handle)
        with self.store.reading(entry):
            return Reduced(len(self._reduced_of(entry)), 0)

    def snapshot(self) -> snapshot.SnapshotResult:
        """Write every live handle to the state directory (admins only: it spans every tenant)."""
        CALLER.get().require_admin("a snapshot")
        if not self.settings.state_dir:
            raise FailedPrecondition("this server was started without --state-dir; there is nowhere to write a snapshot")
        return snapshot.save(self.store, self.settings.state_dir)

    # -- averaging across models --------------------------------------------------------------------

    def _sources(self, handles: Sequence[str]) -> list[Entry]:
        """Dictionary handles, or module, model or optimizer handles standing for their parameters."""
        return [self.store.get(h, Kind.DICTIONARY, *MODULE_KINDS) for h in handles]

    def _as_dictionary(self, entry: Entry) -> TensorDict:
        """A dictionary's object, or a module's parameters as a live dictionary (its lock held)."""
        if entry.kind is Kind.DICTIONARY:
            dictionary: TensorDict = entry.obj
            return dictionary
        return modules.view_parameters(module_of(entry))

    @_exactly_once
    def average(
        self, handles: Sequence[str], weights: Sequence[float] | None, into: str,
        options: Sequence[tuple[str, Value]] = (), *, etag: str = "", request: RequestKey | None = None,
    ) -> Ref:
        """The weighted mean of dictionaries (weights such as example counts; equal when none), into a
        new dictionary or into `into` (a dictionary, or a module's parameters), all or nothing. With
        `etag`, only if `into` is still at that etag."""
        method = merging.METHODS["average"]
        inputs = self._sources(handles)
        if etag and not into:
            raise InvalidArgument("an etag makes a change to `into` conditional: give `into`, or no etag")
        if not into:
            with self.store.reading(*inputs):
                dicts = [self._as_dictionary(e) for e in inputs]
                plan = merging.plan(method, dicts, weights=weights, kwargs=options)
                made = self.store.create(Kind.DICTIONARY, footprint.merge_bytes(plan), lambda: merging.run(plan, dicts))
            return Ref(made, Kind.DICTIONARY)
        target = self.store.get(into, Kind.DICTIONARY, *MODULE_KINDS)
        with self.store.mutate(target, need=NOTHING, reading=tuple(inputs), etag=etag) as reservation:
            dicts = [self._as_dictionary(e) for e in inputs]
            out = self._as_dictionary(target)
            plan = merging.plan(method, dicts, weights=weights, into=out, kwargs=options)
            self.store.grow(reservation, nbytes=footprint.merge_bytes(plan))
            merging.run(plan, dicts, into=out)
        return Ref(into, target.kind)

    @_exactly_once
    def merge(
        self, method: str, handles: Sequence[str], base: str, weights: Sequence[merging.Weight] | None,
        options: Sequence[tuple[str, Value]] = (), per_tensor: merging.PerTensor = (),
        tensor_weights: merging.TensorWeights = (), densities: Sequence[merging.Weight] = (),
        tensor_densities: merging.TensorWeights = (), *, request: RequestKey | None = None,
    ) -> Ref:
        """A new dictionary merged from dictionaries by a method (`merging.METHODS`: linear, slerp,
        task_arithmetic, ties, dare, della, breadcrumbs, multislerp, karcher, sce, ram, model_stock, nearswap,
        arcee_fusion),
        against `base` where the method takes one, one tensor at a time; weights (and TIES and
        DARE's per-dictionary densities) may be mergekit's gradients over the layers, and differ by
        entry-name pattern (`tensor_weights`, `tensor_densities`)."""
        chosen = merging.method_named(method)
        inputs = self._sources(handles)
        base_entry = self.store.get(base, Kind.DICTIONARY, *MODULE_KINDS) if base else None
        with self.store.reading(*inputs, *([base_entry] if base_entry is not None else [])):
            dicts = [self._as_dictionary(e) for e in inputs]
            base_dict = self._as_dictionary(base_entry) if base_entry is not None else None
            plan = merging.plan(
                chosen, dicts, base=base_dict, weights=weights, kwargs=options, per_tensor=per_tensor,
                tensor_weights=tensor_weights, densities=densities, tensor_densities=tensor_densities,
            )
            made = self.store.create(
                Kind.DICTIONARY, footprint.merge_bytes(plan), lambda: merging.run(plan, dicts, base=base_dict)
            )
        return Ref(made, Kind.DICTIONARY)

    @contextlib.contextmanager
    def _outer_step_ready(self, handle: str, average: str) -> Iterator[Callable[[], float]]:
        """An outer step checked and its memory reserved, under the locks, with nothing changed yet: the
        step itself, to run inside the block. A cluster's ranks each get this far before any steps
        (cluster.py, `_outer_step`), so that a refusal on one rank changes no rank.

        Raises:
            WeightavgError: the handles, the average or the room do not allow the step; nothing changed.
        """
        entry = self._optimizer(handle)
        source = self.store.get(average, Kind.DICTIONARY, *MODULE_KINDS)
        with self.store.mutate(entry, need=NOTHING, reading=(source,)) as reservation:
            optimizer = optimizer_of(entry)
            mean = self._as_dictionary(source)
            outer.check_average(optimizer, mean)
            self.store.grow(reservation, nbytes=footprint.outer_step_bytes(optimizer, mean))
            yield lambda: outer.outer_step(optimizer, mean, checked=True)

    @_exactly_once
    def outer_step(self, handle: str, average: str, *, request: RequestKey | None = None) -> float:
        """Step an optimizer (or a model's) with the gradient `parameters - average`; the gradient's
        norm. Its first step's state is reserved before it is allocated."""
        with self._outer_step_ready(handle, average) as step:
            return step()

    @_exactly_once
    def soup(
        self, handle: str, ingredients: Sequence[str], options: Sequence[tuple[str, Value]], should_stop: StopCheck,
        *, request: RequestKey | None = None,
    ) -> SoupResult:
        """A greedy soup of the ingredients on the model's test data, as a new dictionary; the model's
        tensors are put back afterwards."""
        entry, model = self._model(handle)
        inputs = self._sources(ingredients)
        with self.store.mutate(entry, need=NOTHING, reading=tuple(inputs)) as reservation:
            dicts = [self._as_dictionary(e) for e in inputs]
            plan = soups.plan_soup(model, dicts, options)
            # Scoring is a test pass: it keeps a copy of what a pass writes in place, a copy of each batch
            # for a module that writes its input in place, and makes its layers' outputs, as run_test
            # does (the last two were not reserved; found by review), and its metric's scalars. Its
            # metric is the plan's alone.
            need = add_bytes(
                footprint.soup_bytes(plan), footprint.forward_copy_bytes(model.module),
                footprint.batch_copy_bytes(model, "test"), footprint.testing_pass_bytes(model, plan.metric),
                footprint.metrics_bytes(model, "test", plan.metric),
            )
            self.store.grow(reservation, handles=1, nbytes=need)
            made = soups.greedy_soup(model, dicts, plan, should_stop)
            handle_id = self.store.add(Kind.DICTIONARY, made.dictionary, reservation)
        return made.holding(Ref(handle_id, Kind.DICTIONARY))

    # -- shared memory (co-located clients) ---------------------------------------------------------

    def _require_shm(self) -> None:
        if not self.settings.allow_shm:
            raise FailedPrecondition(
                "this server does not accept shared memory: start it with --allow-shm (WEIGHTAVG_ALLOW_SHM=1), "
                "or move tensors through the streams (FetchTensors, and uploads whose TensorChunk carries data, not "
                "shared; the Python client: Client(..., shm=False))"
            )

    def _region(self, name: str) -> shm.Region:
        """A region of the caller's session; NotFound for anyone else's, however it is named."""
        self._require_shm()
        return self.store.shared.get(CALLER.get().tenant, CALLER_SESSION.get(), name)

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        """A CPU buffer of nbytes for an upload's tensor: on a CPU server, the tensor's own memory, from
        the kept blocks of freed ones (`hostcache`); on a CUDA server, on its way to the device, pinned
        where `pinned.empty` has room (a fast, non-faulting copy to the device), else pageable.

        For a tensor that will be held on another device than the CPU, the buffer is a second copy,
        on the host, that lives until the call ends: its bytes are reserved on the CPU first, in the
        upload's reservation (refused: ResourceExhausted, nothing allocated). Reserved on the GPU
        only, uploads to a GPU server held host memory past the CPU's cap (found by review). A tensor
        held on the CPU is received into its own buffer, reserved already from its header; one whose
        bytes come from a region that reaches its device never asks for a buffer here.
        """
        if self.device.type != "cuda":
            return hostcache.empty(nbytes)
        receiving = _RECEIVING.get()
        if receiving is not None and receiving.device is not None and receiving.device.type != "cpu":
            self.store.grow(receiving.reservation, nbytes={"cpu": nbytes})
        return pinned.empty((nbytes,), torch.uint8, self.device)

    def upload_arena(self) -> Callable[[int], torch.Tensor] | None:
        """Where the upload being received lays its tensors back to back (`codec.TensorAssembler`'s
        arena): for a dictionary's entries on a CPU server, one block from the host cache, so averages
        and merges over uploaded dictionaries run over spans; None otherwise (a CUDA server stages
        tensor by tensor on the way to the GPU). A new block is not advised for huge pages: where the
        kernel must compact memory to grant them, the first touch of an advised 102 MB block took
        about three times as long, and the spans gain as much on 4 KiB pages (docs/perf.md)."""
        receiving = _RECEIVING.get()
        if receiving is None or not receiving.arena or self.device.type == "cuda":
            return None
        return _plain_block

    def shared_region(self, name: str) -> shm.Region:
        """The caller's region `name`, for an upload whose tensors' bytes lie in it (TensorChunk.shared)."""
        return self._region(name)

    @_exactly_once
    def register_shared_memory(
        self, name: str, key: str, byte_size: int, cuda: cuda_ipc.CudaIpc | None = None, *,
        request: RequestKey | None = None,
    ) -> int:
        """Map /dev/shm/<key>'s first `byte_size` bytes (or, with `cuda`, open the client's CUDA
        buffer) as the session's region `name`; the bytes mapped."""
        self._require_shm()
        caller, session = CALLER.get(), CALLER_SESSION.get()
        caller.require_writer("registering shared memory")
        if not session:
            raise FailedPrecondition(
                "shared memory regions belong to a session, so that they are unregistered when it ends: call "
                "with a session (CreateSession's id in 'weightavg-session' metadata; the Python client: "
                "Client(..., session=True), or Client(..., shm=True), which opens one)"
            )
        if cuda is not None and key:
            raise InvalidArgument("a shared memory region is a /dev/shm key or a CUDA buffer, not both")
        store_shm.check_name(name)  # before anything is mapped or opened
        if cuda is None:
            region: shm.Region = shm.Region(key, byte_size, proof=shm.proof(session))
        else:
            region = cuda_ipc.CudaRegion(cuda, byte_size)
        if cuda is None and self.device.type == "cuda":
            region.lock_pages(self.device)  # copies to and from the device as DMA; pageable if refused
        self.store.register_region(session, name, region)
        return byte_size

    @_exactly_once
    def unregister_shared_memory(self, name: str, *, request: RequestKey | None = None) -> int:
        """Unmap the session's region `name` (all of them when empty); how many."""
        self._require_shm()
        session = CALLER_SESSION.get()
        if not session:
            return 0
        return self.store.shared.unregister(CALLER.get().tenant, session, name)

    def list_shared_memory(self, name: str = "") -> list[tuple[str, shm.Region]]:
        """The caller's session's regions (or the one named), in the order registered; none without a
        session."""
        self._require_shm()
        if name:
            store_shm.check_name(name)  # a name no region can have is that mistake, not NOT_FOUND
        session = CALLER_SESSION.get()
        if not session:
            if name:
                raise NotFound(f"no shared memory region '{name}' is registered by this session (the call has none)")
            return []
        return self.store.shared.listed(CALLER.get().tenant, session, name)

    def fetch_to_shared_memory(
        self, handle: str, names: Sequence[str], region: str, offset: int, max_bytes: int = 0, overflow: str = ""
    ) -> tuple[list[shm.Placement], int, str, str]:
        """What `fetch` returns, written into the session's region from `offset` under the object's
        lock (one consistent cut, no host copies held); where each tensor went, the bytes used, the
        region written and the object's etag. When they do not fit (or take over `max_bytes`, if > 0)
        they go to the `overflow` region from offset 0 if that is given and they fit it; else nothing
        is written: no placements, the bytes they would need from `offset`, and no region."""
        entry = self.store.get(handle)  # first, so another tenant's handle is unknown whatever the region
        with self.store.reading(entry):
            written = self._write_shared(self._named(handle, entry, names), region, offset, max_bytes, overflow)
            return (*written, versions.etag(entry.lock))

    def _write_shared(
        self, named: Named, region: str, offset: int, max_bytes: int, overflow: str
    ) -> tuple[list[shm.Placement], int, str]:
        """fetch_to_shared_memory's writing of tensors it has (a cluster's rank 0 also writes those it
        fetched from another rank, where the session's regions are not)."""
        target = self._region(region)
        spill = self._region(overflow) if overflow else None
        placements, needed = shm.layout(named, offset)
        if offset + needed > target.byte_size or 0 < max_bytes < needed:
            if spill is None or needed > spill.byte_size:
                return [], needed, ""
            placements, needed = shm.layout(named, 0)
            target, region = spill, overflow
        shm.write(target, placements, named)
        return placements, needed, region

    @_exactly_once
    def create_dictionary_from_shared_memory(
        self, region: str, placements: Sequence[shm.Placement], *, request: RequestKey | None = None
    ) -> Ref:
        """`create_dictionary` of tensors copied out of the session's region."""
        source = self._region(region)
        return self.create_dictionary(
            lambda on_header: shm.read(source, placements, on_header, self.staging_buffer)
        )


def module_of(entry: Entry) -> nn.Module:
    """The module a module, model or optimizer entry stands for; read under the entry's lock, since
    UpdateModel gives a model another module: resolved before the lock, a call waiting for a busy
    model worked on the module it had lost, and a load into it answered success and changed nothing
    (found by review)."""
    module: nn.Module = entry.obj if entry.kind is Kind.MODULE else entry.obj.module
    return module


def optimizer_of(entry: Entry) -> optimizers.Optimizer:
    """The optimizer of an optimizer or model entry; read under the entry's lock (see `module_of`)."""
    optimizer: optimizers.Optimizer = entry.obj if entry.kind is Kind.OPTIMIZER else entry.obj.optimizer
    return optimizer


def source_of(entry: Entry) -> nn.Module | TensorDict:
    """What an average folds in from an entry: a dictionary, or the module a module, model or
    optimizer stands for; read under the entry's lock (see `module_of`)."""
    if entry.kind is Kind.DICTIONARY:
        dictionary: TensorDict = entry.obj
        return dictionary
    return module_of(entry)


def _placed(loss: losses.Loss, device: torch.device) -> losses.Loss:
    """The loss with its (rare) tensors on the device."""
    loss.fn.to(device)
    return loss
