"""Snapshots of every live handle in a state directory: tensors in safetensors, everything else in JSON.

Layout of the directory::

    manifest.json               written last: format, generation, size and sha256 of each file below
    state-<gen>.json            sessions (id, lease, tenant), objects (kind + JSON description), handles
                                (id, object, lock group, session, tenant; no tenant: the default one),
                                remembered request IDs with their answers (absent in older snapshots)
    tensors-<gen>.safetensors   every tensor, keyed t0, t1, ... (written a tensor at a time by
                                `write_tensors`, read by safetensors)

Each file is written under a temporary name, fsynced and renamed, then the directory is fsynced;
files of older generations are removed only once the new manifest is in place. A crash at any point
therefore leaves either the previous snapshot or the new one, never a mix. While a generation is
written a marker `.writing-<gen>` names it, so that the files of a first snapshot cut short by a
crash (no manifest yet, no previous snapshot) read as what they are, nothing, rather than as a
snapshot whose manifest was lost. The directory is created 0700 and refused when other users may
write to it: they could put a snapshot of their choosing in the server's place. A `weightavg serve`
process holds its directory (`hold_directory`, an flock on it) for as long as it runs, so a second
server started on the same directory is refused rather than writing over the first's snapshots. Loading checks every
file's size and sha256 before building anything and raises SnapshotError on any mismatch: a torn or
modified snapshot is refused, never half-loaded. Nothing is ever unpickled.

Kinds plug in with `register_format(kind, save, load)`: `save(obj, SaveContext) -> dict` describes an
object in JSON-able values, storing tensors with `ctx.tensor(t)` (which returns a key); `load(dict,
LoadContext) -> obj` rebuilds it, reading tensors back with `ctx.tensor(key)`. Modules, dictionaries
tensors, losses, optimizers and models are registered below; a kind with no format is skipped with an error log (and reported
by the Snapshot RPC) rather than failing the whole snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..domain import batching, dtypes, flat, hostcache, losses, optimizers, specs, training
from ..domain.dictionaries import COUNT_KEY, Count, TensorDict
from ..domain.dtypes import DTYPES
from ..domain.ema import MAX_STEP, EmaSchedule, EmaState
from ..domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..domain.losses import Loss
from ..domain.optimizers import Optimizer
from ..domain.tensors import TensorHolder
from . import requests
from .registry import Entry, Kind, Registry, locked
from .versions import GroupLock
from .tenants import DEFAULT_TENANT, check_tenant_name

log = logging.getLogger("weightavg.snapshot")

FORMAT = "weightavg-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
FILE_MODE = 0o600
"""Every snapshot file is readable by the server's user alone: the tensors are the weights, and the
JSON lists tenant names and handle, session and request IDs (the JSON was written 0644 while
safetensors wrote 0600; found by review)."""
DIR_MODE = 0o700
"""A state directory the server creates (and any missing parent) is its user's alone: it was 0755
under the usual umask, so every user of the host could list it (found by review)."""
_GENERATION_FILE = re.compile(r"^(state|tensors)-(\d+)\.(json|safetensors)$")
_WRITING = re.compile(r"^\.writing-(\d+)$")
"""The marker of a generation being written, removed once its manifest is in place."""
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.complex64: "C64",
}
"""Dtypes safetensors stores natively, with the names its header gives them; others (complex128) are
stored as their raw bytes."""
_ITEMSIZE = {name: dtype.itemsize for dtype, name in _SAFETENSORS_DTYPES.items()}
"""Bytes per element of each stored dtype name."""
WRITE_CHUNK = 1 << 24
"""Bytes of a tensor the writer copies to the host at a time when it cannot write the tensor's own
memory (one on a GPU, or one not laid out contiguously): 16 MiB, so the host memory a snapshot needs
beyond what the server holds is that, reserved, rather than a copy of every tensor at once."""
_write_lock = threading.Lock()
"""Held by a snapshot from its cut to its manifest, so generations are numbered in the order of their cuts."""
_CPU_ALIGNMENT = 64
"""Bytes to which PyTorch's CPU allocator aligns every allocation."""


class SnapshotError(FailedPrecondition):
    """A snapshot cannot be written, or the one on disk is torn, modified or not understood."""


class SaveContext:
    """Handed to each kind's save function: stores tensors, and finds tensors that belong to a module."""

    def __init__(self, copy: bool = True) -> None:
        self._copy = copy
        self.tensors: dict[str, torch.Tensor] = {}
        self.tensor_info: dict[str, dict[str, Any]] = {}
        self._keys: dict[int, str] = {}
        self._pinned: list[torch.Tensor] = []
        self._owners: dict[int, dict[str, Any]] = {}
        self.nbytes = 0
        self.objects: list[dict[str, Any]] = []
        self.index_of: dict[int, int] = {}

    def tensor(self, t: torch.Tensor, *, same_as: torch.Tensor | None = None) -> str:
        """Store t, copied to the host now unless the context was made with copy=False; returns its key.
        The same tensor object stored twice gets one key, so aliasing survives a restore. With
        `same_as`, t is stored under that tensor's identity (its full-size view, say).

        With copy=False (the shutdown snapshot) t itself is kept, wherever it lives: the writer
        (`write_tensors`) streams it to the file, so no copy of every tensor is ever held at once."""
        ident = same_as if same_as is not None else t
        key = self._keys.get(id(ident))
        if key is not None:
            return key
        key = f"t{len(self.tensors)}"
        self._keys[id(ident)] = key
        self._pinned.extend((t, ident))  # keeps the ids from being reused by other tensors during this save
        data = t.detach()
        if self._copy:
            # One contiguous host copy, whatever t's layout, in memory the host cache kept (a large one):
            # each periodic snapshot of a changing server faulted every page of its copies in anew.
            data = hostcache.empty_as(data.numel(), data.dtype).reshape(data.shape).copy_(data)
        raw = data.dtype not in _SAFETENSORS_DTYPES
        self.tensor_info[key] = {
            "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "device": str(t.device), "raw": raw,
        }
        self.tensors[key] = data
        self.nbytes += data.numel() * data.element_size()
        return key

    def ref(self, obj: Any, kind: Kind) -> int:
        """The index of obj among the saved objects, saving it now (without a handle) if it is not yet
        saved: how a model refers to its module, loss and optimizer, so that objects shared with other
        handles stay one object after a restore.

        Raises:
            InvalidArgument: obj cannot be saved (its kind has no format, or its format refuses it).
        """
        found = self.index_of.get(id(obj))
        if found is not None:
            return found
        fmt = FORMATS.get(kind)
        if fmt is None:
            raise InvalidArgument(f"{kind.value} objects have no snapshot format")
        data = fmt.save(obj, self)
        index = len(self.objects)
        self.objects.append({"kind": kind.value, "data": data})
        self.index_of[id(obj)] = index
        self._pinned.append(obj)
        if kind is Kind.MODULE:
            self.own(index, obj)
        return index

    def owned(self, t: torch.Tensor) -> dict[str, Any] | None:
        """Where t lives if it is a saved module's own parameter or buffer: {"object", "tensor", "name"}."""
        return self._owners.get(id(t))

    def own(self, obj_index: int, module: torch.nn.Module) -> None:
        """Record a saved module's tensors so that live views onto them are saved as references
        (the module is held by the registry throughout the save, so the ids stay its tensors')."""
        for name, p in module.named_parameters():
            self._owners[id(p)] = {"object": obj_index, "tensor": "parameter", "name": name}
        for name, b in module.named_buffers():
            self._owners[id(b)] = {"object": obj_index, "tensor": "buffer", "name": name}


class LoadContext:
    """Handed to each kind's load function: reads tensors back and resolves references to other objects."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], info: dict[str, dict[str, Any]], device: torch.device,
        load_object: Callable[[int], Any], on_place: Callable[[str, int], None],
    ) -> None:
        self.device = device
        self._on_place = on_place
        self._tensors = tensors
        self._info = info
        self._load_object = load_object
        self._loaded: dict[str, torch.Tensor] = {}
        self._missing: set[str] = set()
        """Saved devices this server lacks, warned about once each (a line per tensor was thousands)."""

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor stored under key, on the device it was saved from when this server has it, else on
        the server's device. A key used twice gives the same tensor object."""
        if key in self._loaded:
            return self._loaded[key]
        data, placement = self._source(key)
        self._on_place(str(placement), data.numel() * data.element_size())
        # Always a copy. safetensors hands out CPU tensors in a private mapping of the file: held by
        # the restored objects, it kept the file's disk blocks after the next snapshot deleted it (a
        # third snapshot's room while the server ran; found by review), and an edit of the file in
        # place would reach live weights. A fresh allocation is also aligned: at their offsets in the
        # file, vectorised CPU kernels split the data differently, and sums would differ in the last
        # bit from the saved server's (an epoch after a restart would not be bit-identical).
        t = data.to(placement, copy=True)
        self._loaded[key] = t
        return t

    def flat_tensors(self, keys: list[str]) -> list[torch.Tensor]:
        """The tensors stored under keys, as `tensor` gives them, except that those not loaded yet are
        placed back to back in one new buffer per device and dtype (`flat.flat_empty`), reserved before
        it is allocated: how flat modules and dictionaries come back flat.

        Placed one by one and then flattened, a module's parameters were allocated twice, the second
        time unreserved, and the first copies lived until the whole restore ended: a snapshot that fit
        the caps could need twice its modules' bytes to restore (found by review).
        """
        fresh = [key for key in dict.fromkeys(keys) if key not in self._loaded]
        sources = [self._source(key) for key in fresh]
        for data, placement in sources:
            self._on_place(str(placement), data.numel() * data.element_size())
        views = flat.flat_empty([(tuple(data.shape), (placement, data.dtype)) for data, placement in sources])
        with torch.no_grad():
            for key, view, (data, _) in zip(fresh, views, sources):
                view.copy_(data)
                self._loaded[key] = view
        return [self._loaded[key] for key in keys]

    def _source(self, key: str) -> tuple[torch.Tensor, torch.device]:
        """The tensor stored under key as read from the file (checked against the state's dtype and
        shape), and the device it goes to."""
        info = self._info[key]
        dtype = DTYPES[info["dtype"]]
        data = self._tensors[key]
        if info["raw"]:
            if data.data_ptr() % _CPU_ALIGNMENT:
                # safetensors places bytes right after the tensor before them (4 mod 8 after an
                # int32): copied as bytes into an aligned buffer first, since torch's copies of a
                # misaligned complex128 view crash the process (found by review: every restart).
                data = data.clone()
            data = data.view(dtype).reshape(info["shape"])
        if data.dtype != dtype or list(data.shape) != info["shape"]:
            raise SnapshotError(f"tensor {key} is {dtypes.name(data.dtype)} {list(data.shape)}; state says {dtypes.name(dtype)} {info['shape']}")
        return data, self._placement(info["device"])

    def count(self, key: str) -> Count:
        """A running average's own count (`TensorDict.own_count`) holding the value stored under key: a
        new 0-dim float64 on the CPU, reserved before it is made, as an average makes one.

        Raises:
            SnapshotError: the stored value is not a 0-dim float64.
        """
        data, _ = self._source(key)
        if data.dim() != 0 or data.dtype != torch.float64:
            raise SnapshotError(f"tensor {key} is a dictionary's count but is {dtypes.name(data.dtype)} {list(data.shape)}")
        self._on_place("cpu", data.element_size())
        return Count(float(data))

    def host_tensor(self, key: str) -> torch.Tensor:
        """The tensor stored under key as read from the file, for host-side state that no object
        holds (a generator's state): neither placed on a device nor reserved."""
        return self._tensors[key]

    def object(self, index: int) -> Any:
        """The restored object at index (restored now if it was not yet)."""
        return self._load_object(index)

    def _placement(self, saved: str) -> torch.device:
        dev = torch.device(saved)
        if dev.type == "cpu":
            return dev
        if dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count():
            return dev
        if saved not in self._missing:
            self._missing.add(saved)
            log.warning("snapshot tensors were on %s, which this server lacks; placing them on %s", saved, self.device)
        return self.device


@dataclass(frozen=True)
class Format:
    """How one kind of object is written to and read from a snapshot."""

    save: Callable[[Any, SaveContext], dict[str, Any]]
    load: Callable[[dict[str, Any], LoadContext], Any]


FORMATS: dict[Kind, Format] = {}


def register_format(
    kind: Kind, save: Callable[[Any, SaveContext], dict[str, Any]], load: Callable[[dict[str, Any], LoadContext], Any]
) -> None:
    """Let snapshots carry objects of `kind` (models, optimizers and losses register theirs here)."""
    FORMATS[kind] = Format(save, load)


# -- modules, dictionaries, tensors --------------------------------------------------------------------


def spec_to_json(spec: specs.LayerSpec) -> dict[str, Any]:
    """A layer spec as JSON values (int lists for size tuples)."""
    return {
        "type": spec.type,
        "name": spec.name,
        "args": [list(v) if isinstance(v, tuple) else v for v in spec.args],
        "options": [[k, list(v) if isinstance(v, tuple) else v] for k, v in spec.options],
        "children": [spec_to_json(c) for c in spec.children],
    }


def spec_from_json(data: dict[str, Any]) -> specs.LayerSpec:
    """The layer spec `spec_to_json` wrote."""

    def value(v: Any) -> specs.OptionValue:
        return tuple(int(x) for x in v) if isinstance(v, list) else v

    return specs.LayerSpec(
        type=str(data["type"]),
        name=data["name"],
        args=tuple(value(v) for v in data["args"]),
        options=tuple((str(k), value(v)) for k, v in data["options"]),
        children=tuple(spec_from_json(c) for c in data["children"]),
    )


def save_module(module: torch.nn.Module, ctx: SaveContext) -> dict[str, Any]:
    """The spec it was built from, every parameter and buffer (as they are now: values, dtypes, new
    parameters), and each submodule's train flag and batchnorm momentum."""
    spec = specs.spec_of(module)
    if spec is None:
        raise InvalidArgument("module was not built from a spec; it cannot be snapshotted")
    return {
        "spec": spec_to_json(spec),
        "parameters": [
            {"name": n, "tensor": ctx.tensor(p), "requires_grad": p.requires_grad} for n, p in module.named_parameters()
        ],
        "buffers": [
            {"name": n, "tensor": ctx.tensor(b), "persistent": _is_persistent(module, n)}
            for n, b in module.named_buffers()
        ],
        "modules": [
            {"path": path, "training": m.training, **({"momentum": m.momentum} if hasattr(m, "momentum") else {})}
            for path, m in module.named_modules()
        ],
    }


def _owner(module: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = dotted.rpartition(".")
    return module.get_submodule(path), leaf


def _is_persistent(module: torch.nn.Module, dotted: str) -> bool:
    owner, leaf = _owner(module, dotted)
    return leaf not in owner._non_persistent_buffers_set


def load_module(data: dict[str, Any], ctx: LoadContext) -> torch.nn.Module:
    """Rebuild a module from its spec (allowlisted layers only), then put back its saved state.

    The spec is built on the meta device: the saved tensors replace every parameter and buffer, and
    they are reserved as they are placed. Built for real, the module was allocated and initialised
    whole before any of its bytes were reserved (a restore refused at a 1,000-byte cap peaked at
    1.3 GB; found by review)."""
    with torch.device("meta"):
        module = specs.build_module(spec_from_json(data["spec"]), max_depth=10**6)
    # Flat, as a new module's parameters are (`flat.build_flat`), so its handles' sizes and speed survive a restart.
    values = ctx.flat_tensors([p["tensor"] for p in data["parameters"]])
    for p, value in zip(data["parameters"], values):
        owner, leaf = _owner(module, p["name"])
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=p["requires_grad"])
        else:
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=p["requires_grad"]))
    for b in data["buffers"]:
        owner, leaf = _owner(module, b["name"])
        owner.register_buffer(leaf, ctx.tensor(b["tensor"]), persistent=b["persistent"])
    missing = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if missing:
        raise SnapshotError(f"the snapshot holds no value for the module's {missing[0]!r}")
    for row in data["modules"]:
        m = module.get_submodule(row["path"])
        m.training = bool(row["training"])
        if "momentum" in row:
            m.momentum = row["momentum"]
    return module


def save_dictionary(d: TensorDict, ctx: SaveContext) -> dict[str, Any]:
    """Entries in order; a live view's entries that are a saved module's own tensors are references;
    whether the entries are flat (`flat.is_flat_by_group`, the '.n' count aside); whether '.n' is the
    count a running average made (`"count": "own"`); an exponential moving average's schedule and
    last step."""
    entries: list[dict[str, Any]] = []
    for name, t in d.entries.items():
        ref = ctx.owned(t) if d.live else None
        entries.append({"name": name, "ref": ref} if ref is not None else {"name": name, "tensor": ctx.tensor(t)})
    saved: dict[str, Any] = {"live": d.live, "entries": entries}
    if d.own_count is not None and d.entries.get(COUNT_KEY) is d.own_count.tensor:
        saved["count"] = "own"
    values = [t for name, t in d.entries.items() if name != COUNT_KEY]
    if not d.live and len(values) > 1 and flat.is_flat_by_group(values):
        saved["flat"] = True
    if d.ema is not None:
        s = d.ema.schedule
        saved["ema"] = {
            "decay": s.decay, "warmup": s.warmup, "warmup_gamma": s.warmup_gamma, "warmup_power": s.warmup_power,
            "min_decay": s.min_decay, "update_after_step": s.update_after_step, "step": d.ema.step,
        }
    return saved


def _ema_state(data: dict[str, Any] | None) -> EmaState | None:
    """The EMA state `save_dictionary` wrote (None for a dictionary without one), checked as a request is."""
    if data is None:
        return None
    schedule = EmaSchedule(
        decay=float(data["decay"]), warmup=bool(data["warmup"]), warmup_gamma=float(data["warmup_gamma"]),
        warmup_power=float(data["warmup_power"]), min_decay=float(data["min_decay"]),
        update_after_step=int(data["update_after_step"]),
    )
    schedule.check()
    step = int(data["step"])
    if not 0 <= step <= MAX_STEP:  # the next update would refuse it, naming a step the client never sent
        raise InvalidArgument(f"the EMA's last step must be between 0 and {MAX_STEP}, got {step}")
    return EmaState(schedule, step)


def load_dictionary(data: dict[str, Any], ctx: LoadContext) -> TensorDict:
    """Rebuild a dictionary; references become the restored module's own tensors again (a live view).
    A flat dictionary (a copy of a module's parameters, an EMA, a merge's result) comes back flat:
    restored entry by entry, later averages into it no longer fused and ran several times slower.
    A count a running average made comes back as the dictionary's own (`TensorDict.own_count`), so
    the next average writes it in place as it would have without the restart: restored as a plain
    entry, the next average replaced it with a count it had not reserved and walked the dictionary
    to recharge it (found by review). Snapshots written before "count" restore '.n' as a plain
    entry, which the next average replaces, as it replaces an uploaded count."""
    if data.get("flat"):
        ctx.flat_tensors([e["tensor"] for e in data["entries"] if "tensor" in e and e["name"] != COUNT_KEY])
    entries: dict[str, torch.Tensor] = {}
    own: Count | None = None
    for e in data["entries"]:
        if e["name"] == COUNT_KEY and "tensor" in e and data.get("count") == "own":
            own = ctx.count(e["tensor"])
            entries[e["name"]] = own.tensor
        elif "ref" in e:
            ref = e["ref"]
            module = ctx.object(int(ref["object"]))
            get = module.get_parameter if ref["tensor"] == "parameter" else module.get_buffer
            entries[e["name"]] = get(ref["name"])
        else:
            entries[e["name"]] = ctx.tensor(e["tensor"])
    return TensorDict(entries, live=bool(data["live"]), ema=_ema_state(data.get("ema")), own_count=own)


def save_batchable(t: torch.Tensor, ctx: SaveContext) -> dict[str, Any]:
    """A tensor that `batch` may have narrowed in place (batching.py): its full-size data, keyed by the
    tensor itself so every holder shares it, and the batch it stands at (absent at full size)."""
    try:
        n = batching.full_size(t)
    except InvalidArgument:
        return {"tensor": ctx.tensor(t)}  # not batchable: saved as it is
    start = batching.position(t)
    if start == 0 and t.shape[0] == n:
        return {"tensor": ctx.tensor(t)}
    shape = (n, *t.shape[1:])
    with torch.no_grad():
        full = torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), 0, shape, torch.empty(shape, device="meta").stride()
        )
    return {"tensor": ctx.tensor(full, same_as=t), "batch": [start, t.shape[0]]}


def load_batchable(data: dict[str, Any], ctx: LoadContext) -> torch.Tensor:
    """The tensor `save_batchable` wrote, narrowed back to its batch."""
    t = ctx.tensor(data["tensor"])
    if "batch" in data:
        start, rows = (int(v) for v in data["batch"])
        batching.seek(t, start, rows)
    return t


register_format(Kind.MODULE, save_module, load_module)
register_format(Kind.DICTIONARY, save_dictionary, load_dictionary)
register_format(
    Kind.TENSOR, lambda holder, ctx: save_batchable(holder.tensor, ctx),
    lambda data, ctx: TensorHolder(load_batchable(data, ctx)),
)


# -- losses, optimizers, models ------------------------------------------------------------------------


def _json_options(options: dict[str, Any]) -> list[list[Any]]:
    return [[k, list(v) if isinstance(v, tuple) else v] for k, v in options.items()]


def _options(rows: list[list[Any]]) -> tuple[tuple[str, Any], ...]:
    return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in rows)


def save_loss(loss: Loss, ctx: SaveContext) -> dict[str, Any]:
    """Type and options: the loss holds no tensors of its own."""
    if not isinstance(loss, Loss):
        raise InvalidArgument(f"not a loss built by CreateLoss ({type(loss).__name__})")
    return {"type": loss.type, "options": _json_options(loss.options)}


def load_loss(data: dict[str, Any], ctx: LoadContext) -> Loss:
    """Rebuild the loss through the same allowlist as CreateLoss."""
    loss = losses.create_loss(str(data["type"]), kwargs=_options(data["options"]))
    loss.fn.to(ctx.device)
    return loss


def save_optimizer(optimizer: Optimizer, ctx: SaveContext) -> dict[str, Any]:
    """Type, options, the module it updates (by reference), which of its parameters each group holds
    (by name), every group's settings (lr included) and the per-parameter state: tensors (momentum
    buffers, moment estimates, step counts) into the tensor file, anything else as JSON values."""
    if not isinstance(optimizer, Optimizer):
        raise InvalidArgument(f"not an optimizer built by CreateOptimizer ({type(optimizer).__name__})")
    names = {id(p): n for n, p in optimizer.module.named_parameters()}
    state = optimizer.optim.state_dict()
    groups = []
    for live, saved in zip(optimizer.optim.param_groups, state["param_groups"]):
        missing = [i for i, p in enumerate(live["params"]) if id(p) not in names]
        if missing:
            raise InvalidArgument("the optimizer updates a parameter its module no longer holds")
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in saved.items() if k not in ("params", "param_names")}
        groups.append({"params": [names[id(p)] for p in live["params"]], "ids": saved["params"], "settings": settings})
    per_param = []
    for pid, values in state["state"].items():
        row: dict[str, Any] = {}
        for k, v in values.items():
            row[k] = {"tensor": ctx.tensor(v)} if isinstance(v, torch.Tensor) else {"value": v}
        per_param.append({"id": pid, "state": row})
    json.dumps([groups, per_param])  # anything not JSON-able fails here, before the snapshot is written
    return {
        "type": optimizer.type, "options": _json_options(optimizer.options),
        "module": ctx.ref(optimizer.module, Kind.MODULE), "groups": groups, "state": per_param,
    }


def _build_over_meta(
    opt_type: optimizers.OptimizerType, params: list[torch.nn.Parameter], options: dict[str, Any],
) -> torch.optim.Optimizer:
    """The torch optimizer over params, built over meta twins of them and then pointed at them, with
    no state: the state a build fills in (Adagrad's sums, the module's size again) was allocated
    unreserved and held until the saved state replaced it (found by review: a restore of an
    Adagrad model peaked one module's bytes higher than it reserved)."""
    twins = [torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in params]
    optim = opt_type.build(twins, options)
    optim.state.clear()
    real = iter(params)
    for group in optim.param_groups:
        group["params"] = [next(real) for _ in group["params"]]
    return optim


def load_optimizer(data: dict[str, Any], ctx: LoadContext) -> Optimizer:
    """Rebuild the torch optimizer over the restored module's named parameters, then load its groups and
    state with `load_state_dict` (which keeps the values bit for bit: they already have the parameters'
    dtypes and devices)."""
    module = ctx.object(int(data["module"]))
    opt_type = optimizers.OPTIMIZER_TYPES[str(data["type"])]
    options = dict(_options(data["options"]))
    params = [module.get_parameter(n) for g in data["groups"] for n in g["params"]]
    # The state loaded below replaces what the build fills in. Adagrad fills its sums with `init`,
    # which need not fit the parameters' dtype any more: after a move to float16, init 1e5 made the
    # snapshot impossible to restore (torch's overflow while filling; found by review). Built from 0,
    # the saved sums and the group's saved initial_accumulator_value come back all the same.
    optim = _build_over_meta(opt_type, params, {**options, "init": 0.0} if "init" in options else options)
    if len(optim.param_groups) != len(data["groups"]):
        raise SnapshotError(f"optimizer has {len(optim.param_groups)} parameter groups; the snapshot {len(data['groups'])}")
    groups = []
    for fresh, saved in zip(optim.param_groups, data["groups"]):
        settings = {k: tuple(v) if isinstance(fresh.get(k), tuple) else v for k, v in saved["settings"].items()}
        groups.append({**settings, "params": saved["ids"]})
    state = {
        int(row["id"]): {k: ctx.tensor(v["tensor"]) if "tensor" in v else v["value"] for k, v in row["state"].items()}
        for row in data["state"]
    }
    optim.load_state_dict({"state": state, "param_groups": groups})
    return Optimizer(str(data["type"]), options, module, optim)


def save_model(model: training.Model, ctx: SaveContext) -> dict[str, Any]:
    """References to the module, loss and optimizer (shared with their handles, if any), the train and
    test options, the data (at full size, with the batch position), and the shuffle generator's state."""

    def data(d: training.Data | None) -> dict[str, Any] | None:
        return None if d is None else {"x": save_batchable(d.x, ctx), "y": save_batchable(d.y, ctx)}

    return {
        "module": ctx.ref(model.module, Kind.MODULE),
        "loss": ctx.ref(model.loss, Kind.LOSS),
        "optimizer": ctx.ref(model.optimizer, Kind.OPTIMIZER),
        "train": _json_options(model.train), "test": _json_options(model.test),
        "train_data": data(model.train_data), "test_data": data(model.test_data),
        "generator": ctx.tensor(model.generator.get_state()),
    }


def load_model(data: dict[str, Any], ctx: LoadContext) -> training.Model:
    """Rejoin the restored parts; the generator continues from its saved state."""

    def loaded(d: dict[str, Any] | None) -> training.Data | None:
        return None if d is None else training.Data(load_batchable(d["x"], ctx), load_batchable(d["y"], ctx))

    module = ctx.object(int(data["module"]))
    optimizer = ctx.object(int(data["optimizer"]))
    if optimizer.module is not module:
        raise SnapshotError("a model's optimizer does not update the model's module")
    model = training.Model(
        module, ctx.object(int(data["loss"])), optimizer,
        train=dict(_options(data["train"])), test=dict(_options(data["test"])),
        train_data=loaded(data["train_data"]), test_data=loaded(data["test_data"]),
    )
    model.generator.set_state(ctx.host_tensor(data["generator"]))
    return model


register_format(Kind.LOSS, save_loss, load_loss)
register_format(Kind.OPTIMIZER, save_optimizer, load_optimizer)
register_format(Kind.MODEL, save_model, load_model)

_SAVE_ORDER = {Kind.MODULE: 0, Kind.MODEL: 1, Kind.OPTIMIZER: 2, Kind.LOSS: 3}
"""Modules and models (whose modules they save) first, so that views and input tensors find theirs."""


# -- writing ---------------------------------------------------------------------------------------------


def _stored(t: torch.Tensor, raw: bool) -> tuple[str, list[int]]:
    """The safetensors dtype name and shape under which t's bytes are stored (raw: as U8 bytes)."""
    if raw:
        return "U8", [t.numel() * t.element_size()]
    return _SAFETENSORS_DTYPES[t.dtype], list(t.shape)


def _writes_in_place(t: torch.Tensor) -> bool:
    """Whether the writer writes t's own memory: a contiguous CPU tensor whose bytes are its values
    (not a lazily conjugated or negated view, whose bytes are not)."""
    return t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _row_bytes(t: torch.Tensor) -> int:
    """The bytes the writer copies at the least in one piece: an element of a contiguous tensor, a
    row (along the first dimension) of any other."""
    return t.element_size() * (1 if t.is_contiguous() else t[0].numel())


def buffer_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The host buffer `write_tensors` needs for these tensors: none when every one is a contiguous
    CPU tensor (its own memory is written); else the largest piece it copies, at most `WRITE_CHUNK`
    bytes (or one row of a non-contiguous tensor, if a row is larger)."""
    need = 0
    for t in tensors.values():
        nbytes = t.numel() * t.element_size()
        if nbytes and not _writes_in_place(t):
            row = _row_bytes(t)
            need = max(need, min(nbytes, max(row, WRITE_CHUNK // row * row)))
    return need


def host_pieces(t: torch.Tensor, buffer: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """t's bytes in row-major order, as 1-D uint8 CPU tensors, each valid until the next is taken.

    A contiguous CPU tensor is its own memory (nothing copied). Any other, on a GPU or strided, is
    copied into `buffer` (uint8, at least `buffer_bytes` long) as many whole rows at a time as fit,
    rows of its flat view when it is contiguous: the same steps on every device, the copy being a
    device-to-host one on a GPU (synchronous into pageable memory, so the bytes are there when
    written).
    """
    if not t.numel():
        return
    if _writes_in_place(t):
        yield t.reshape(-1).view(torch.uint8)
        return
    if buffer is None:
        raise ValueError("a tensor that is not a contiguous CPU tensor needs a host buffer to be written")
    source = t.reshape(-1) if t.is_contiguous() else t  # a view either way: nothing copied on the device
    row = _row_bytes(t)
    rows = len(buffer) // row
    for start in range(0, source.shape[0], rows):
        part = source[start:start + rows]
        piece = buffer[:part.numel() * part.element_size()]
        piece.view(part.dtype).view(part.shape).copy_(part)
        yield piece


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], raw: set[str], metadata: dict[str, str], buffer: torch.Tensor | None,
) -> None:
    """Write tensors to path in the safetensors format, one piece at a time (`host_pieces`).

    safetensors' own `save_file` takes every tensor at once and moves each GPU tensor to the host
    before it writes any: a shutdown snapshot of a GPU server held a host copy of everything it
    held, unreserved (found by review). The format is simple enough to stream: an 8-byte little-
    endian header length, a JSON header (each key's dtype, shape and byte offsets, and the metadata)
    padded with spaces to 8 bytes, then the bytes. Tensors go in order of decreasing element size,
    as safetensors places them, so each starts aligned to its element; `safetensors.torch.load_file`
    reads the file back (tests/test_snapshot.py compares it with save_file's). The keys in `raw` are
    stored as their bytes (U8). The buffer is that of `host_pieces`.
    """
    stored = {key: _stored(t, key in raw) for key, t in tensors.items()}
    order = sorted(tensors, key=lambda key: (-_ITEMSIZE[stored[key][0]], key))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = tensors[key]
        end = offset + t.numel() * t.element_size()
        header[key] = {"dtype": stored[key][0], "shape": stored[key][1], "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for key in order:
            for piece in host_pieces(tensors[key], buffer):
                f.write(piece.numpy().data)


@dataclass
class SnapshotResult:
    """What a snapshot wrote."""

    directory: str
    handles: int
    tensor_bytes: int
    skipped: list[str] = field(default_factory=list)
    """Handles not saved, as "id (kind): why"."""


def save(registry: Registry, directory: str | os.PathLike[str], *, copy: bool = True) -> SnapshotResult:
    """Write every live handle and session to `directory`, atomically (see the module docstring).

    Every object is read under its lock, all locks held together, so the snapshot is one consistent
    cut even while calls run. With copy=True (a running server) tensors are copied and the locks
    released before the disk writes, at the cost of that much memory; with copy=False (shutdown,
    nothing else running) the locks are held through the writes and the tensors are streamed to the
    file (`write_tensors`): a contiguous CPU tensor is written from its own memory, any other (on a
    GPU, or strided) through one reserved host buffer of at most `WRITE_CHUNK` bytes.

    Raises:
        SnapshotError: the directory cannot be written; with copy=False, the host buffer does not fit
            the host's byte cap.
        ResourceExhausted: with copy=True, the host copies would not fit the host's byte cap
            (--max-device-bytes): they are reserved as every other allocation is.
    """
    if not copy:
        return _save(registry, directory, copy)
    # Every held tensor is copied to the host for the cut (a CUDA one as well): reserved first, or
    # a snapshot could take the host past its cap (found by review: +97 MB with 1,000 bytes left).
    # Objects made between this count and the cut are copied unreserved: a call's worth at most.
    # Against the server's cap alone: the copies are every tenant's, and the caller's tenant (the
    # default one for a periodic snapshot) paid for them in its quota, so a `default` tenant with a
    # quota below what all tenants held made every periodic snapshot fail (found by review).
    copies = sum(registry.held_bytes().values())
    with contextlib.ExitStack() as reserved:
        try:
            reserved.enter_context(registry.reserve(nbytes={"cpu": copies}, tenant_quota=False))
        except ResourceExhausted as exc:
            raise ResourceExhausted(f"a snapshot copies every tensor to the host first ({copies} bytes): {exc}") from None
        return _save(registry, directory, copy)


def _save(registry: Registry, directory: str | os.PathLike[str], copy: bool) -> SnapshotResult:
    """`save`, its reservation made."""
    # One snapshot at a time from its cut to its manifest: two snapshots cut in one order but written
    # in the other (a periodic one and a Snapshot call) left the older cut as the newest generation,
    # so a restart lost changes the newer snapshot had already reported saved (found by review).
    with _write_lock:
        while True:
            changes = registry.changes.count  # before the cut: a change counted later may be missing
            # Calls with request IDs are held back while the cut is taken, so that it holds the ID of
            # every such call whose change it holds, and no other (requests.py).
            with registry.requests.paused():
                items = registry.items()
                with locked(*(entry for _, entry in items), check_live=False):
                    if any(entry.freed for _, entry in items):
                        # A handle went while the cut waited for a busy object (a free or a model
                        # taking its parts, by a call without a request ID, or a session's expiry):
                        # the cut failed with that handle's NotFound (found by review). Take it anew.
                        continue
                    state, ctx, skipped = _collect(registry, items, SaveContext(copy))
                    if not copy:
                        with _host_buffer(registry, ctx.tensors) as buffer:
                            result = _write(Path(directory), state, ctx, skipped, buffer)
                        registry.changes.saved(changes)
                        return result
            result = _write(Path(directory), state, ctx, skipped, None)  # host copies: written as they are
            registry.changes.saved(changes)
            return result


@contextlib.contextmanager
def _host_buffer(registry: Registry, tensors: dict[str, torch.Tensor]) -> Iterator[torch.Tensor | None]:
    """The host buffer `write_tensors` copies through (`buffer_bytes`; None when it needs none),
    reserved against the server's host cap before it is made, as every allocation is.

    Raises:
        SnapshotError: the buffer does not fit the host cap (at shutdown: the server exits 1, saying so).
    """
    need = buffer_bytes(tensors)
    if not need:
        yield None
        return
    with contextlib.ExitStack() as reserved:
        try:
            reserved.enter_context(registry.reserve(nbytes={"cpu": need}, tenant_quota=False))
        except ResourceExhausted as exc:
            raise SnapshotError(
                f"a snapshot copies the tensors it cannot write in place (on a GPU, or strided) to the host {need} "
                f"bytes at a time, and those do not fit: {exc}"
            ) from None
        yield torch.empty(need, dtype=torch.uint8)


def _write(
    root: Path, state: dict[str, Any], ctx: SaveContext, skipped: list[str], buffer: torch.Tensor | None,
) -> SnapshotResult:
    """Write the files of one generation, then the manifest, then drop older generations (under
    `_write_lock`, taken by the caller before its cut); `buffer` is the host buffer of `write_tensors`."""
    generation = 0
    committed = False
    try:
        prepare_directory(root)
        generation = max(_generations(root), default=0) + 1
        _mark_writing(root, generation)
        tensors_name = f"tensors-{generation}.safetensors"
        state_name = f"state-{generation}.json"
        raw = {key for key, info in ctx.tensor_info.items() if info["raw"]}
        _write_atomic(root / tensors_name, lambda tmp: write_tensors(tmp, ctx.tensors, raw, {"format": FORMAT}, buffer))
        _write_atomic(root / state_name, lambda tmp: tmp.write_bytes(json.dumps(state, indent=1).encode()))
        manifest = {
            "format": FORMAT, "version": VERSION, "generation": generation,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {name: _digest(root / name) for name in (state_name, tensors_name)},
        }
        _write_atomic(root / MANIFEST, lambda tmp: tmp.write_bytes(json.dumps(manifest, indent=1).encode()))
        committed = True
        _fsync_dir(root)
        for old in root.iterdir():
            match = _GENERATION_FILE.match(old.name)
            if (match and int(match.group(2)) != generation) or old.name.startswith((".tmp-", ".writing-")):
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as exc:
        # A full disk (OSError). (While safetensors wrote the tensor file, it reported its write errors
        # as SafetensorError, which escaped as INTERNAL, and at shutdown as a traceback; found by
        # review.) Or torch failing a device-to-host copy of the streamed write (a CUDA error, out of
        # memory: RuntimeError), which escaped the same way and left the generation's files behind
        # (found by review).
        if generation and not committed:
            _discard(root, generation)
        raise SnapshotError(f"cannot write a snapshot to {root}: {exc}") from exc
    handles = len(state["handles"])
    log.info("snapshot %d: %d handle(s), %d tensor bytes in %s", generation, handles, ctx.nbytes, root)
    return SnapshotResult(str(root), handles, ctx.nbytes, skipped)


def _discard(root: Path, generation: int) -> None:
    """Remove what a generation that failed before its manifest wrote (best effort): a tensor file
    left by a full disk took the room the next try needed, which then failed too, until a restart."""
    for name in (f"tensors-{generation}.safetensors", f"state-{generation}.json"):
        for path in (root / name, root / f".tmp-{name}"):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (root / f".writing-{generation}").unlink(missing_ok=True)


def _collect(
    registry: Registry, items: list[tuple[str, Entry]], ctx: SaveContext
) -> tuple[dict[str, Any], SaveContext, list[str]]:
    """The JSON state and the tensors of every saveable handle; modules and models first, so that views
    can refer to their tensors."""
    lock_of: dict[int, int] = {}
    skipped: list[str] = []
    refused: dict[int, str] = {}  # id(object) -> why its format refused it, reported with each of its handles
    order = sorted(items, key=lambda item: _SAVE_ORDER.get(item[1].kind, len(_SAVE_ORDER)))
    for handle_id, entry in order:
        if id(entry.obj) in ctx.index_of or id(entry.obj) in refused or FORMATS.get(entry.kind) is None:
            continue
        try:
            ctx.ref(entry.obj, entry.kind)
        except InvalidArgument as exc:
            refused[id(entry.obj)] = str(exc)
    handles = []
    for handle_id, entry in items:
        found = ctx.index_of.get(id(entry.obj))
        if found is None:
            # The reason rides in the reply, for `weightavg snapshot` to print: every refused handle was
            # logged as having "no snapshot format yet", though every kind has one now (found by review).
            reason = refused.get(id(entry.obj), f"{entry.kind.value} objects have no snapshot format")
            skipped.append(f"{handle_id} ({entry.kind.value}): {reason}")
            log.error("snapshot: %s handle %s not saved: %s", entry.kind.value, handle_id, reason)
            continue
        handles.append({"id": handle_id, "object": found, "lock": lock_of.setdefault(id(entry.lock), len(lock_of)),
                        "session": entry.session, "tenant": entry.tenant})
    sessions = [{"id": s.id, "lease": s.lease, "tenant": s.tenant} for s in registry.sessions()]
    state = {"format": FORMAT, "version": VERSION, "sessions": sessions, "objects": ctx.objects, "handles": handles,
             "tensors": ctx.tensor_info, "requests": registry.requests.export(), "saved_at": time.time()}
    return state, ctx, skipped


def prepare_directory(directory: str | os.PathLike[str]) -> Path:
    """The state directory, created 0700 with any missing parent (as `mkdir -p`, but private), or an
    existing one checked; called when the server starts and before every write.

    Raises:
        SnapshotError: the path is not a directory, the server's user cannot write it, or other
            users can (anyone on the host could then put in a snapshot the next start restores, or
            delete the one there); the message says the fix.
    """
    root = Path(directory)
    missing = [p for p in (root, *root.parents) if not p.exists()]
    try:
        for folder in reversed(missing):
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
        found = root.stat()
    except OSError as exc:
        raise SnapshotError(f"cannot create the state directory {root}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise SnapshotError(f"the state directory {root} is not a directory; give --state-dir a directory")
    mode = stat.S_IMODE(found.st_mode)
    if mode & stat.S_IWOTH:
        raise SnapshotError(
            f"the state directory {root} is writable by every user (mode {mode:04o}): anyone on this host "
            f"could replace the snapshot this server restores; make it the server's own (chmod o-w {root}, "
            "or chmod 0700)"
        )
    if not os.access(root, os.W_OK | os.X_OK):
        raise SnapshotError(
            f"the state directory {root} is not writable by this server's user (uid {os.geteuid()}): no snapshot "
            f"could be written; chown it to that user (mode 0700)"
        )
    return root


_held: dict[Path, int] = {}
"""State directories this process holds, with the descriptor whose flock holds each (open until exit)."""


def hold_directory(directory: str | os.PathLike[str]) -> None:
    """Hold the state directory for this process until it exits, made or checked first
    (`prepare_directory`): an exclusive flock on the directory itself, which the kernel releases
    when the process ends, however it ends (kill -9 included), so nothing is left to clean up.

    Two servers started on one directory (a second `weightavg serve` by mistake, a new container
    started before the old one stopped) each restored it and then wrote their own snapshots into
    it: the one that wrote last replaced the other's (an empty server's shutdown snapshot replaced
    a busy one's), and writes at once removed each other's temporary files and failed (found by
    review). A filesystem without flock (some network filesystems) is served with a WARNING, as before.

    Raises:
        SnapshotError: another process holds the directory (the message names its pid where
            /proc/locks tells it), or the directory is refused by `prepare_directory`.
    """
    root = prepare_directory(directory).resolve()
    if root in _held:
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            log.warning("cannot lock the state directory %s (%s): nothing stops a second server from writing its "
                        "snapshots there; give each server its own --state-dir", root, exc.strerror or exc)
            return
        holder = _lock_holder(root)
        by = f" (pid {holder})" if holder else ""
        raise SnapshotError(
            f"the state directory {root} is in use by another weightavg server{by}: two servers writing one "
            "directory replace each other's snapshots; stop that server first, or give this one its own --state-dir"
        ) from None
    _held[root] = fd


def _lock_holder(root: Path) -> int | None:
    """The pid holding an flock on `root`, as /proc/locks lists it; None where it does not say."""
    try:
        found = root.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    for line in lines:
        parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:3623383 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == inode and parts[4].isdigit():
            return int(parts[4])
    return None


def _mark_writing(root: Path, generation: int) -> None:
    """Name the generation about to be written (see the module docstring), durably before its files."""
    os.close(os.open(root / f".writing-{generation}", os.O_WRONLY | os.O_CREAT, FILE_MODE))
    _fsync_dir(root)


def _unfinished(root: Path) -> set[int]:
    """Generations whose write began and did not finish (their marker is still there)."""
    return {int(m.group(1)) for p in root.iterdir() if (m := _WRITING.match(p.name))}


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write to a temporary file in the same directory, created FILE_MODE before any byte is written,
    fsync it, then rename it over path. A temporary file left by a crash is removed first: writing
    into it would keep its mode."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # in case the writer made the file anew
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def _generations(root: Path) -> list[int]:
    return [int(m.group(2)) for p in root.iterdir() if (m := _GENERATION_FILE.match(p.name))]


# -- reading ---------------------------------------------------------------------------------------------


def load(registry: Registry, directory: str | os.PathLike[str], device: torch.device) -> int:
    """Restore the snapshot in `directory` into an empty registry: same handle IDs, sessions, values.

    A directory that does not exist or holds no snapshot files restores nothing. Returns the number
    of handles restored.

    Raises:
        SnapshotError: a file is missing, torn or modified (size or sha256 mismatch), the state is
            not understood. Nothing is added to the registry then.
        ResourceExhausted: the snapshot does not fit the registry's caps; the message names the cap.
    """
    root = Path(directory)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        held = set(_generations(root)) if root.is_dir() else set()
        if held and held <= _unfinished(root):
            # The first snapshot, cut short (kill -9, a full disk): there was nothing before it.
            log.warning(
                "%s holds only the files of a first snapshot that never finished (generation %s, no %s): "
                "starting empty; the next snapshot replaces them", root, ", ".join(map(str, sorted(held))), MANIFEST,
            )
            return 0
        if held:
            raise SnapshotError(
                f"{root} holds snapshot files but no {MANIFEST}; refusing to guess which are whole. Restore "
                f"{MANIFEST}, or move {root} away to start empty"
            )
        return 0
    try:
        manifest = json.loads(manifest_path.read_bytes())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise SnapshotError(f"{manifest_path} is not a {FORMAT} version {VERSION} manifest")
        files: dict[str, dict[str, Any]] = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            # a hand-edited manifest ended the start in a traceback (AttributeError; found by review)
            raise TypeError(f"'files' must map each file name to its sha256 and bytes, found {files!r:.80}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # RecursionError: JSON nested past Python's recursion limit ended the start in a traceback (found by review)
        raise SnapshotError(f"{manifest_path} is unreadable ({exc}); the snapshot is torn or was modified") from exc
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            raise SnapshotError(f"snapshot file {path} is missing")
        found = _digest(path)
        if found != {"sha256": expected.get("sha256"), "bytes": expected.get("bytes")}:
            raise SnapshotError(
                f"checksum mismatch for {path}: expected sha256 {expected.get('sha256')} ({expected.get('bytes')} bytes), "
                f"found {found['sha256']} ({found['bytes']} bytes); the snapshot is torn or was modified. "
                f"Refusing to start rather than serve wrong weights: restore the file, or move {root} away to start empty"
            )
    state_name = next((n for n in files if n.endswith(".json")), None)
    tensors_name = next((n for n in files if n.endswith(".safetensors")), None)
    if state_name is None or tensors_name is None:
        raise SnapshotError(f"{manifest_path} does not name a state file and a tensor file")
    try:
        state = json.loads((root / state_name).read_bytes())
        tensors = safetensors.torch.load_file(str(root / tensors_name))
        restored = _restore(registry, state, tensors, device)
        registry.changes.saved(registry.changes.count)  # what it holds now is on disk
        return restored
    except SnapshotError:
        raise
    except ResourceExhausted as exc:
        # The caps' own advice ("free some handles first") cannot be followed by a server that has
        # not started (found by review): say what can.
        cap = str(exc).removesuffix("; free some handles first")
        raise ResourceExhausted(
            f"the snapshot in {root} does not fit this server's caps: {cap}. Start with the cap raised, or move "
            f"{root} away to start empty"
        ) from None
    except (
        ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, InvalidArgument, NotFound,
        ArithmeticError,  # an edited number out of range (int() of 1e400 read as infinity): a traceback
        safetensors.SafetensorError,  # a tensor file that is not safetensors, its manifest made to match: a traceback
    ) as exc:
        raise SnapshotError(f"snapshot in {root} cannot be restored: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _HandleRecord:
    """One saved handle, checked: what `Registry.add` is given for it."""

    id: str
    kind: Kind
    object: int
    lock: int
    session: str | None
    tenant: str


def _records(
    state: dict[str, Any], objects: list[dict[str, Any]],
) -> tuple[list[tuple[str, float, str]], list[_HandleRecord]]:
    """The saved sessions (id, lease, tenant) and handles, every field checked before any is registered.

    A record that does not hold (a tenant name, a handle ID given twice, a session that is not
    saved) was found only as it was registered: the sessions and handles before it stayed in the
    registry, charged, while the restore was refused (found by review).

    Raises:
        InvalidArgument, ValueError, KeyError, TypeError: a record is not one a server writes
            (`load` reports each as a SnapshotError naming the directory).
    """
    # Snapshots written before tenants existed have no "tenant": their objects are the default
    # tenant's, as they were on the server that wrote them.
    sessions = [
        (str(s["id"]), float(s["lease"]), check_tenant_name(s.get("tenant", DEFAULT_TENANT))) for s in state["sessions"]
    ]
    session_ids = {session_id for session_id, _, _ in sessions}
    if len(session_ids) != len(sessions):
        raise ValueError("the state names a session twice")
    handles = []
    for h in state["handles"]:
        index = int(h["object"])
        if not 0 <= index < len(objects):
            raise ValueError(f"handle {h['id']!r} refers to object {index}, which the state does not hold")
        session = None if h["session"] is None else str(h["session"])
        if session is not None and session not in session_ids:
            raise ValueError(f"handle {h['id']!r} belongs to a session the state does not hold")
        handles.append(_HandleRecord(
            str(h["id"]), Kind(objects[index]["kind"]), index, int(h["lock"]), session,
            check_tenant_name(h.get("tenant", DEFAULT_TENANT)),
        ))
    if len({h.id for h in handles}) != len(handles):
        raise ValueError("the state names a handle twice")
    return sessions, handles


def _restore(registry: Registry, state: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> int:
    """Build every object first, then register sessions and handles, so a failure adds nothing."""
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise SnapshotError(f"state file is not {FORMAT} version {VERSION}")
    if len(registry):
        raise SnapshotError("a snapshot can only be restored into an empty server")
    objects: list[dict[str, Any]] = state["objects"]
    built: dict[int, Any] = {}
    # Snapshots written before request IDs have none; the time the server was down counts against the window.
    answers = requests.parse_saved(state.get("requests", []))
    down = time.time() - float(state.get("saved_at", time.time()))

    def load_object(index: int) -> Any:
        if index not in built:
            record = objects[index]
            fmt = FORMATS.get(Kind(record["kind"]))
            if fmt is None:
                raise SnapshotError(f"this server cannot restore {record['kind']} objects")
            built[index] = fmt.load(record["data"], ctx)
        return built[index]

    sessions, handles = _records(state, objects)
    # Restored tensors count against the caps like any other: each is reserved before it is placed.
    # Against the server's caps alone: a restore admits every saved handle even where its tenant's
    # quota is now lower (docs/security.md), and each object is charged to its own tenant by `add`.
    with registry.reserve(handles=len(handles), tenant_quota=False) as reservation:
        ctx = LoadContext(
            tensors, state["tensors"], device, load_object,
            on_place=lambda where, nbytes: registry.grow(reservation, nbytes={where: nbytes}),
        )
        for index in range(len(objects)):
            load_object(index)
        locks: dict[int, GroupLock] = {}
        for session_id, lease, tenant in sessions:
            registry.create_session(lease, session_id=session_id, tenant=tenant)
        for h in handles:
            lock = locks.setdefault(h.lock, GroupLock())
            registry.add(
                h.kind, built[h.object], reservation, lock=lock, handle_id=h.id, session=h.session, tenant=h.tenant,
            )
    remembered = registry.requests.restore(answers, elapsed=down)
    log.info(
        "restored %d handle(s), %d session(s) and %d request ID(s)", len(state["handles"]), len(state["sessions"]),
        remembered,
    )
    return len(state["handles"])
