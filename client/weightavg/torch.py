"""PyTorch on the client: tensors to and from a weightavg server bit for bit, and `RemoteAveragedModel`,
torch's `AveragedModel` with the average kept on the server.

Import it on its own (`import weightavg.torch`) where torch is installed; the rest of the client
never imports torch. Tensors travel as the wire's dtype + shape + bytes: bfloat16 through
ml_dtypes, float16 as it is, so nothing is rounded on the way. CUDA tensors go through CUDA IPC
with `Client(..., shm=True)` and a server on this host with CUDA (device to device, never through
host memory), else through host memory; the results are the same.

Example:
    >>> from weightavg import Client
    >>> from weightavg.torch import RemoteAveragedModel
    >>> with Client("127.0.0.1:50051") as c:
    ...     ema = RemoteAveragedModel(c, model, "ema", decay=0.999, warmup=True, dtype="float32")
    ...     for x, y in loader:
    ...         train_step(model, x, y)
    ...         ema.update_parameters(model)
    ...     evaluate(ema.module)   # the server's average, pulled into a local copy of the model
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import inspect
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import numpy.typing as npt

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without torch
    raise ImportError(
        "weightavg.torch needs PyTorch (pip install torch); the rest of weightavg works without it"
    ) from exc

from ._client import Client, HandleLike, _id
from ._errors import NotFoundError, WeightavgError
from ._records import Handle

__all__ = ["RemoteAveragedModel", "fetch", "from_array", "push", "to_array"]

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_SENDABLE = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32,
    torch.int64, torch.bool, torch.complex64, torch.complex128,
)
"""The torch dtypes the wire carries (weightavg.wire's table); float8, complex32 and the wide
unsigned integers have no wire dtype."""


def _check_sendable(t: torch.Tensor, what: str) -> None:
    """TypeError naming `what` and the fix unless the wire carries t's dtype (checked before any
    conversion: numpy has no float8 or complex32 at all, and its error names neither). Anything but
    a tensor is refused too: a numpy array's float64 was refused as a dtype the wire cannot carry,
    in a message that listed float64 among those it carries."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{what} is a {type(t).__module__}.{type(t).__qualname__}, not a torch tensor; convert it with "
            "torch.as_tensor(value), or send numpy arrays with Client.dict"
        )
    if t.dtype not in _SENDABLE:
        carried = ", ".join(str(d).removeprefix("torch.") for d in _SENDABLE)
        raise TypeError(
            f"{what} is {t.dtype}, which the wire cannot carry (it carries {carried}); cast it first, "
            f"e.g. t.to(torch.float32)"
        )


def to_array(t: torch.Tensor) -> npt.NDArray[Any]:
    """A host numpy array with exactly t's values: bfloat16 as ml_dtypes.bfloat16, a CUDA tensor
    copied to the host. For a CPU tensor the array may share t's memory; send it before changing t."""
    _check_sendable(t, "the tensor")
    host = t.detach().to("cpu").resolve_conj().resolve_neg()
    if host.dtype == torch.bfloat16:
        bits: npt.NDArray[Any] = host.contiguous().view(torch.int16).numpy()
        return bits.view(_BFLOAT16)
    array: npt.NDArray[Any] = host.numpy()
    return array


def from_array(value: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """A tensor with exactly the array's values (a bfloat16 array becomes a bfloat16 tensor), on `device`."""
    array = np.asarray(value)
    if not array.dtype.isnative:  # torch takes only the machine's byte order
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = array.copy(order="C")  # not ascontiguousarray: it makes a 0-dim array 1-dim
    if array.dtype == _BFLOAT16:
        t = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(array)
    return t if device is None else t.to(device)


def push(
    client: Client, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], into: HandleLike | None = None
) -> Handle:
    """Send named tensors of any device and of the wire's dtypes (float8, complex32 and uint16-64
    are refused with a TypeError naming the tensor, a name given twice with a ValueError, before
    anything is sent): a new dictionary, or (`into`) entries set in one, all or nothing. Returns
    the dictionary's handle."""
    items = _named_items(tensors)
    seen: set[str] = set()
    for name, t in items:
        _check_sendable(t, f"tensor '{name}'")
        if name in seen:  # the dict below kept the last of them and sent it without a word
            raise ValueError(f"tensor '{name}' is named twice; name each tensor once (nothing was sent)")
        seen.add(name)
    # CUDA tensors as they are: the client sends them through CUDA IPC where it can, else copies
    # them to the host as to_array does.
    arrays = {name: t.detach() if t.is_cuda else to_array(t) for name, t in items}
    if into is None:
        handle: Handle = client.dict(arrays)
        return handle
    client.dict(into, arrays)
    return into if isinstance(into, Handle) else Handle(into, "dictionary")


def _named_items(tensors: object) -> list[tuple[str, torch.Tensor]]:
    """push's tensors as (name, tensor) pairs, or a TypeError that says what to pass: a module itself
    failed as "cannot unpack non-iterable Linear object" (a Sequential iterates its layers), a list of
    tensors alike (found by a new user's walk-through)."""
    if isinstance(tensors, torch.nn.Module):
        raise TypeError(
            f"push takes named tensors, not a {type(tensors).__name__} module: pass model.state_dict() (parameters "
            "and buffers) or dict(model.named_parameters()); nothing was sent"
        )
    if isinstance(tensors, Mapping):
        return list(tensors.items())
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"push takes a mapping of name -> tensor or (name, tensor) pairs, not {type(tensors).__name__}")
    items = list(tensors)
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"push takes a mapping of name -> tensor or (name, tensor) pairs, given an item that is a "
                f"{type(item).__name__}; name each tensor, e.g. {{'weight': t}}; nothing was sent"
            )
    return items


def fetch(
    client: Client, d: HandleLike, device: torch.device | str | None = None, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every entry of a dictionary (or the `names` given, a list or one name; of a module, model or
    optimizer: those parameters, which must be named) as a tensor in its own dtype (bfloat16
    included), on `device`. A module's buffers are read through a view, `fetch(c, v := c.buffers(m))`,
    its parameters all at once through `fetch(c, v := c.parms(m))` (a view is a handle: `c.free(v)`
    after, unless the client's session frees it). An SWA average's count '.n' is an entry too: drop
    it before `model.load_state_dict`, which refuses a key the model lacks.

    On a CUDA device, with Client(..., shm=True) and a server on this host with CUDA, the server
    copies into the client's registered CUDA buffer (CUDA IPC) and the tensors are cloned from it
    on the device; elsewhere they come through the host. Bit-identical either way.

    Example: fetch(c, m, "cuda", names=["0.weight"])   # a parameter, on the GPU
    """
    # A string is one name, as Client.dict takes it: list("a.weight") asked for the entries 'a', '.', ...
    wanted = [names] if isinstance(names, str) else list(names) if names is not None else []
    if names is not None and not wanted:
        return {}  # the wire's empty list means "every entry"
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "cuda":
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        got = client._fetch_to_device(_id(d), wanted, target)
        if got is not None:
            return dict(got)
    if names is None:
        values = client.dict(d)
    else:
        values = dict(zip(wanted, client.dict(d, wanted)))
    return {name: from_array(value, device) for name, value in values.items()}


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers, whose tensors'
    names carry '_orig_mod.' or 'module.': the average is kept by the model's own names, so the
    wrapper and the bare model update one average (AveragedModel, pairing by position, takes both)."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        # torch.compile's wrapper; its module is loaded wherever a model was compiled.
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        inner = getattr(model, "_orig_mod", None)
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule) and isinstance(inner, torch.nn.Module):
            model = inner
            continue
        return model


def _state(model: torch.nn.Module, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """A model's parameters, then (with `buffers`) its buffers, by dotted name (inside any wrapper)."""
    model = _unwrapped(model)
    named = [(name, p.detach()) for name, p in model.named_parameters()]
    return named + list(model.named_buffers()) if buffers else named


def _check_layout(model: torch.nn.Module, layout: Mapping[str, tuple[torch.Size, torch.dtype]]) -> None:
    """ValueError, naming the first difference, unless the model has exactly the average's tensors
    (names and shapes; dtypes may differ, the server casts). An update of another model would
    fold in some tensors and not others, or replace buffers with ones of another shape."""
    state = dict(_state(model, True))
    fix = "nothing was sent; make a new RemoteAveragedModel for a model of another layout"
    for name, t in state.items():
        if name not in layout:
            raise ValueError(f"the model's '{name}' is not in the average; {fix}")
        if t.shape != layout[name][0]:
            raise ValueError(
                f"the model's '{name}' has shape {list(t.shape)} but the average's is {list(layout[name][0])}; {fix}"
            )
    for name in layout:
        if name not in state:
            raise ValueError(f"the average's '{name}' is not in the model; {fix}")


def _check_schedule(
    decay: float, min_decay: float, warmup_gamma: float, warmup_power: float, update_after_step: int
) -> None:
    """ValueError, naming the field, for an EMA schedule the server refuses (its checks, in
    weightavg_server.domain.ema.EmaSchedule.check): when the object is made, as torch's
    get_ema_multi_avg_fn refuses a decay outside [0, 1], rather than at the first update sent,
    `every` calls into training, after a dictionary was made for it (found by review)."""
    for name, value in (("decay", decay), ("min_decay", min_decay)):
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise ValueError(f"{name} must be between 0 and 1, not {value}; nothing was sent")
    for name, value in (("warmup_gamma", warmup_gamma), ("warmup_power", warmup_power)):
        if not (value > 0.0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number greater than 0, not {value}; nothing was sent")
    if update_after_step < 0:
        raise ValueError(f"update_after_step must be 0 or more, not {update_after_step}; nothing was sent")


class _EmaDefaults(NamedTuple):
    decay: float
    warmup: bool
    warmup_gamma: float
    warmup_power: float
    min_decay: float
    update_after_step: int


EMA_DEFAULTS = _EmaDefaults(
    **{name: inspect.signature(Client.ema).parameters[name].default for name in _EmaDefaults._fields}
)
"""RemoteAveragedModel's EMA schedule where mode="ema" leaves a field out: `Client.ema`'s defaults (timm's
ModelEmaV3's), read from its signature so that the client keeps them in one place."""


def _schedule(mode: str, given: Mapping[str, Any]) -> _EmaDefaults:
    """The EMA schedule of an average of `mode` from the fields given (None: left out), each left out
    taking EMA_DEFAULTS'; ValueError for a mode other than "swa" or "ema", a schedule field given for
    "swa" (which has none), or a field the server refuses."""
    if mode not in ("swa", "ema"):
        raise ValueError(f"mode must be 'swa' or 'ema', not {mode!r}")
    named = [name for name, value in given.items() if value is not None]
    if mode == "swa" and named:
        # RemoteAveragedModel(c, model, decay=0.999) made an equal-weight mean and dropped the decay
        # without a word (found by a new user's walk-through).
        raise ValueError(
            f"{', '.join(named)} {'is an' if len(named) == 1 else 'are'} EMA schedule setting"
            f"{'' if len(named) == 1 else 's'}: pass mode='ema' for an exponential moving average (mode "
            "'swa', the default, is the equal-weight running mean, which has no schedule)"
        )
    schedule = EMA_DEFAULTS._replace(**{name: given[name] for name in named})
    if mode == "ema":
        _check_schedule(schedule.decay, schedule.min_decay, schedule.warmup_gamma, schedule.warmup_power,
                        schedule.update_after_step)
    return schedule


BUFFER_MODES = ("average", "copy", "skip")
"""What an average does with the model's buffers: average the floating ones with the parameters
(integer ones copied), copy them all at each update, or leave them as they were when the average was
made (to recompute batchnorm statistics for the average, say)."""


def _buffer_mode(use_buffers: bool, buffers: str | None) -> str:
    """`buffers` (one of BUFFER_MODES), or from AveragedModel's `use_buffers` where it is not given;
    ValueError for another value or one that contradicts use_buffers=True."""
    if buffers is None:
        return "average" if use_buffers else "copy"
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers must be one of {', '.join(BUFFER_MODES)}, not {buffers!r}")
    if use_buffers and buffers != "average":
        raise ValueError(f"use_buffers=True averages the buffers, buffers={buffers!r} does not: give one of the two")
    return buffers


def _fold_in(client: Client, mode: str, schedule: _EmaDefaults, source: Handle, average: Handle, step: int) -> int:
    """Fold the values sent (`source`) into the average: avgparms for "swa", ema with the schedule at
    `step` for "ema" (the step from the object's count, so a loaded checkpoint's count carries on);
    the server's count after it."""
    if mode == "swa":
        return client.avgparms(source, average)
    return client.ema(source, average, **schedule._asdict(), step=step)


def _dtype_of(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """An average's floating dtype by name or dtype (None: each tensor's own); ValueError otherwise."""
    target = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype  # an unknown name stays a str: refused below
    if target is not None and not (isinstance(target, torch.dtype) and target.is_floating_point and target in _SENDABLE):
        raise ValueError(
            f"dtype must be a floating dtype such as 'float32', not {dtype!r} (the wire carries float32, "
            "float64, float16 and bfloat16)"
        )
    return target


def _copies_done(tensors: Iterable[torch.Tensor]) -> list[Any]:
    """A CUDA event recorded on the current stream of each CUDA device among `tensors`, after the copies
    queued there: another thread that waits on them reads the copies made, whatever stream it uses."""
    events = []
    for device in {t.device for t in tensors if t.is_cuda}:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return events


@contextlib.contextmanager
def _average_held(what: str, kind: str) -> Iterator[None]:
    """Calls on an averaging object's dictionaries: NOT_FOUND, which can only mean the server lost
    them, raised again saying so and how to go on."""
    try:
        yield
    except NotFoundError as exc:
        raise NotFoundError(
            f"the server no longer holds {what} ({exc.message}): it restarted without --state-dir, or the "
            f"dictionaries were freed; make a new {kind} and load_state_dict() your last checkpoint into it to go on"
        ) from exc


class _Background:
    """Updates sent from one background thread, one in flight at a time: `send` copies the tensors
    on their device (training changes them in place once the caller returns) and queues the update;
    `wait` waits for the one in flight and raises its error, wrapped to say which call it was."""

    def __init__(self) -> None:
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[None] | None = None

    def send(
        self, update: Callable[[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]], None],
        sent: list[tuple[str, torch.Tensor]], kept: list[tuple[str, torch.Tensor]],
    ) -> None:
        """Copy `sent` and `kept` now and run update(sent, kept) on the thread once the copies are made
        (CUDA events recorded after them on the caller's streams). The caller waited for the last."""
        sent = [(name, t.detach().clone()) for name, t in sent]
        kept = [(name, t.detach().clone()) for name, t in kept]
        copied = _copies_done(t for _, t in itertools.chain(sent, kept))

        def run() -> None:
            for event in copied:
                event.synchronize()
            with torch.no_grad():
                update(sent, kept)

        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weightavg-average")
        self._pending = self._worker.submit(run)

    def wait(self) -> None:
        """Wait for the update in flight; raise its error if the server refused it (the update then did
        not count). Does nothing when none is in flight."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except WeightavgError as exc:
            raise type(exc)(f"the update sent in the background by an earlier update_parameters failed: {exc.message}",
                            exc.code) from exc

    def close(self) -> None:
        """Stop the thread (after the update in flight)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


class RemoteAveragedModel(torch.nn.Module):
    """`torch.optim.swa_utils.AveragedModel` as a training loop uses it, with the average on a server.

    The average lives in a server dictionary (`average`); `update_parameters(model)` sends the
    model's tensors and folds them in there (avgparms for "swa", the equal-weight mean; ema for
    "ema", with timm's schedule). `module`, `state_dict()` and calls pull the average into a local
    copy of the model first, so `update_bn(loader, swa.module)` (or on the object itself) works
    on the pulled copy; a later update replaces it. `load_state_dict` loads the server's average and
    count too, so a job resumes from a checkpoint as it would with AveragedModel.

    Args:
        client: a connected weightavg Client.
        model: the model to average; it is deep-copied for the local copy, as AveragedModel does.
        mode: "swa" (equal-weight running mean) or "ema" (exponential moving average).
        decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step: the EMA schedule
            (Client.ema's) for "ema", each left out taking `EMA_DEFAULTS`; refused for "swa", which
            has no schedule (a decay given without mode="ema" is a mistake, not an equal-weight mean).
        use_buffers: average floating buffers with the parameters (integer buffers such as
            num_batches_tracked are copied, never averaged); False copies every buffer at each
            update, as AveragedModel does.
        buffers: the same choice by name, with a third: "average" (use_buffers=True), "copy" (the
            default) or "skip": never sent, the average keeps the buffers the model had when it was
            made (recompute them with update_bn); see BUFFER_MODES.
        every: send every k-th call of update_parameters (the others cost nothing). The decay
            applies per update sent: decay**k keeps an EMA's horizon in steps.
        dtype: the server average's floating dtype ("float32" for a bfloat16 model: a bfloat16
            average stalls); default: each tensor's own. The local copy keeps the model's dtypes.
        device: where the local copy lives (default: where the model is).
        asynchronous: update_parameters copies the model's tensors (on their device) and returns;
            a background thread sends them and folds them in while training goes on. One update
            is in flight at a time: the next update_parameters, a pull (module, state_dict(),
            calls), a load, free() and wait() first wait for it, and raise its error there if the
            server refused it (that update then did not count). n_averaged counts an update once
            it is folded in: call wait() before reading it.

    Raises:
        ValueError: a mode, `every`, dtype or EMA schedule field out of range, or a schedule field
            given for "swa" (nothing is sent); from
            update_parameters, for a model whose parameter and buffer names or shapes differ from
            the one it was made with (nothing is sent, nothing changes).
        NotFoundError: the server no longer holds the average (restarted without --state-dir).
        RuntimeError: after free().
        TypeError: for a sharded (DTensor, FSDP2) model, which weightavg.sharded.ShardedAverage takes;
            from copy.deepcopy or pickle (save the state dict instead).

    Differences from AveragedModel: integer buffers are copied, not averaged; nothing is averaged on
    the model's device; a model of another layout is refused, where AveragedModel pairs tensors by
    position and averages whatever lines up.
    """

    n_averaged: torch.Tensor

    def __init__(
        self,
        client: Client,
        model: torch.nn.Module,
        mode: str = "swa",
        *,
        decay: float | None = None,
        warmup: bool | None = None,
        warmup_gamma: float | None = None,
        warmup_power: float | None = None,
        min_decay: float | None = None,
        update_after_step: int | None = None,
        use_buffers: bool = False,
        buffers: str | None = None,
        every: int = 1,
        dtype: str | torch.dtype | None = None,
        device: torch.device | str | None = None,
        asynchronous: bool = False,
    ) -> None:
        super().__init__()
        schedule = _schedule(mode, {
            "decay": decay, "warmup": warmup, "warmup_gamma": warmup_gamma, "warmup_power": warmup_power,
            "min_decay": min_decay, "update_after_step": update_after_step,
        })
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        self.client = client
        self.mode = mode
        self.buffer_mode = _buffer_mode(use_buffers, buffers)
        self.use_buffers = self.buffer_mode == "average"
        self.every = every
        self.asynchronous = asynchronous
        self._background = _Background()
        """The update in flight (asynchronous): waited for, and its error raised, by `wait`."""
        self.schedule = schedule
        self.decay, self.warmup, self.min_decay = schedule.decay, schedule.warmup, schedule.min_decay
        self.warmup_gamma, self.warmup_power = schedule.warmup_gamma, schedule.warmup_power
        self.update_after_step = schedule.update_after_step
        target = _dtype_of(dtype)
        if any(callable(getattr(t, "to_local", None)) for _, t in _state(model, True)):
            # FSDP refuses deepcopy ("FSDP does not support deepcopy"), and no process holds a DTensor whole.
            raise TypeError(
                "the model's tensors are sharded (DTensors, e.g. after fully_shard): no process holds the whole "
                "model to copy; use weightavg.sharded.ShardedAverage, which averages each rank's shards"
            )
        local = copy.deepcopy(model)
        if device is not None:
            local.to(device)
        # Registered by hand: `module` is also the property below, which pulls before it answers.
        self._modules["module"] = local
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self._calls = 0
        self._stale = False
        self._freed = False
        self._loading = False
        """Within this object's own load_state_dict, which pushes what it loaded once it succeeded."""
        self._unpushed = False
        """Whether a parent module's load put values in the local copy that the server lacks."""
        start = [(n, t.to(target) if target is not None and t.is_floating_point() else t) for n, t in _state(model, True)]
        self._layout = {name: (t.shape, t.dtype) for name, t in start}
        """The average's tensors as made: what every model sent must match, and what a load casts to."""
        if mode == "swa":
            start.append((".n", torch.tensor(0.0, dtype=torch.float64)))  # so the first update copies, as AveragedModel's
        self.average: Handle = push(client, start)
        self.source: Handle | None = None

    @property
    def module(self) -> torch.nn.Module:
        """The local copy of the model, holding the server's average (pulled now if it changed)."""
        self._pull()
        return self._local()

    def _local(self) -> torch.nn.Module:
        local = self._modules["module"]
        if local is None:
            raise RuntimeError("the local copy of the model was removed from this RemoteAveragedModel")
        return local

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """AveragedModel's state dict ('module.<name>' and 'n_averaged'), with the server's average."""
        self._pull()
        return super().state_dict(*args, **kwargs)

    def named_modules(
        self, memo: set[torch.nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Module]]:
        # Walking the modules (update_bn does, to reset batchnorm statistics) sees the pulled average.
        self._pull()
        yield from super().named_modules(memo, prefix, remove_duplicate)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """Fold the model into the server's average (every `every`-th call); with `asynchronous`,
        in the background from copies of its tensors taken now."""
        self._check_not_freed()
        self.wait()
        if (self._calls + 1) % self.every != 0:
            self._calls += 1
            return
        _check_layout(model, self._layout)
        self._sync()
        sent = _state(model, self.buffer_mode == "average")
        kept = [(name, t) for name, t in _unwrapped(model).named_buffers()] if self.buffer_mode == "copy" else []
        if not self.asynchronous:
            with self._held():
                self._update(sent, kept)
            return
        self._background.send(self._update_held, sent, kept)

    def wait(self) -> None:
        """Wait for the update in flight (asynchronous=True) to be folded in; raise its error if the
        server refused it (the update then did not count). Does nothing when none is in flight."""
        self._background.wait()

    def _update_held(self, sent: list[tuple[str, torch.Tensor]], kept: list[tuple[str, torch.Tensor]]) -> None:
        with self._held():
            self._update(sent, kept)

    def _update(self, sent: list[tuple[str, torch.Tensor]], kept: list[tuple[str, torch.Tensor]]) -> None:
        """Send a checked model's tensors (`sent`) and fold them in; its buffers (`kept`, where they
        are copied rather than averaged) copied after the average (see below).

        The call is counted (towards `every`) once the server has folded it in: a call the server
        refuses (a cap reached, say) changes nothing, so the next call is the one sent. Counted
        before, a refused call with every=k made the next k - 1 calls skip (found by review)."""
        self.source = push(self.client, sent, into=self.source)
        count = _fold_in(self.client, self.mode, self.schedule, self.source, self.average, int(self.n_averaged) + 1)
        self.n_averaged.fill_(count)
        self._calls += 1
        self._stale = True
        if kept:
            # In the average's dtypes: sent as they were, a bfloat16 model's buffers replaced the
            # float32 entries of a dtype="float32" average with bfloat16 ones (found by review).
            # Copied as they are, as AveragedModel does; after the average, which the server
            # checks, so a refused average has changed nothing.
            self._copy_buffers([(name, t.to(self._layout[name][1])) for name, t in kept])

    def _copy_buffers(self, kept: list[tuple[str, torch.Tensor]]) -> None:
        """Copy the model's buffers into the average, after its parameters were folded in. A byte cap
        can refuse this call alone (it holds the buffers' bytes while it runs); its error used to
        read as if the update had been refused, so a caller who repeated it folded the model in
        twice (found by review). It now says the update counted and what to do."""
        try:
            push(self.client, kept, into=self.average)
        except WeightavgError as exc:
            raise type(exc)(
                f"the update was folded into the average (n_averaged is now {int(self.n_averaged)}), but copying "
                f"the model's buffers into it was refused: {exc.message}. The next update copies them; do not "
                "repeat this one",
                exc.code,
            ) from exc

    def _held(self) -> contextlib.AbstractContextManager[None]:
        return _average_held("this RemoteAveragedModel's average", "RemoteAveragedModel")

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy and pickle come here; without this they failed inside gRPC's channel with a
        # message that named neither this object nor what to do.
        raise TypeError(
            "a RemoteAveragedModel holds a connection and server handles, so it cannot be copied or pickled "
            "(a copy would share, and could free, the one average): save torch.save(ema.state_dict(), path) "
            "and load it into a new RemoteAveragedModel, or copy ema.module"
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load an AveragedModel (or RemoteAveragedModel) state dict, and the server's average with
        it: the local copy's values (cast to the average's dtypes) and the count, so the next
        update folds into the loaded average as AveragedModel's does, and an EMA's schedule goes on
        from step n_averaged + 1. A refused load (torch's RuntimeError for a missing, unexpected or
        ill-shaped entry, or the server's error) changes nothing, here or on the server, where
        torch's leaves the entries it copied before it raised."""
        self._check_not_freed()
        self._pull()  # entries a partial (strict=False) state dict leaves out are the server's
        restore = self._restorer()
        self._loading = True
        try:
            result = super().load_state_dict(state_dict, strict, assign)
            self._push_local()
            self._unpushed = False
        except BaseException:
            restore()
            raise
        finally:
            self._loading = False
        return result

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """torch calls this on every module a load reaches, before their children, also when the
        load is a parent module's (an object kept as an attribute of the training module, as
        Lightning and many training loops keep their AveragedModel): the entries the state dict
        leaves out are the server's, and what such a load puts in the local copy goes to the server
        before the next update or pull. It used to stay in the local copy alone, and the next
        update folded into the server's old average instead of the checkpoint's (found by review)."""
        self._check_not_freed()
        self._pull()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A parent's load (its children are loaded after this returns) that has entries for this object:
        # one without them leaves the server's average alone (a float32 one of a bfloat16 model is
        # not rounded to the local copy's bfloat16).
        if not self._loading and any(key.startswith(prefix) for key in state_dict):
            self._unpushed = True

    def _sync(self) -> None:
        """Put what a parent module's load put in the local copy on the server (see _load_from_state_dict)."""
        if self._unpushed:
            self._push_local()
            self._unpushed = False

    def _push_local(self) -> None:
        """Set the server's average to the local copy (cast to the average's dtypes) and its count."""
        local = _unwrapped(self._local())
        values = [
            (name, t.detach().to(self._layout[name][1]))
            for name, t in itertools.chain(local.named_parameters(), local.named_buffers()) if name in self._layout
        ]
        if self.mode == "swa":
            values.append((".n", torch.tensor(float(self.n_averaged), dtype=torch.float64)))
        with self._held():
            push(self.client, values, into=self.average)

    @torch.no_grad()
    def _restorer(self) -> Callable[[], None]:
        """A function that puts back this object's tensors (the local copy's and n_averaged) as they
        are now: the same tensor objects holding the same values.

        torch's load_state_dict copies every entry it can before it raises for a missing, unexpected
        or ill-shaped one, and a refused push changes nothing on the server; without this a failed
        load left the local copy and n_averaged loaded and the server's average not, so an EMA went
        on from the failed checkpoint's step (found by review). It holds one copy of the local
        model while the load runs."""
        kept: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor]] = []
        copies: dict[int, torch.Tensor] = {}  # tied tensors are copied once
        for module in torch.nn.Module.modules(self):
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None:
                        kept.append((table, name, t, copies.setdefault(id(t), t.detach().clone())))

        @torch.no_grad()
        def restore() -> None:
            for table, name, t, copy in kept:
                table[name] = t  # load_state_dict(assign=True) replaces the objects themselves
                t.detach().copy_(copy)

        return restore

    def pull(self) -> None:
        """Copy the server's average into the local copy now (module, state_dict() and calls do it),
        after sending what a parent module's load put in the local copy."""
        self._check_not_freed()
        self.wait()
        self._sync()
        self._stale = True
        self._pull()

    def free(self) -> None:
        """Free the server's dictionaries (the average and the last values sent). The local copy
        keeps the average (pulled first if it changed); later updates, loads and pulls are refused."""
        if self._freed:
            return
        try:
            self._pull()  # waits for an update in flight
        finally:
            self._background.close()
        self.client.free(*[h for h in (self.average, self.source) if h is not None])
        self.source = None
        self._freed = True

    def _check_not_freed(self) -> None:
        if self._freed:
            raise RuntimeError(
                "this RemoteAveragedModel's average was freed (free()); make a new RemoteAveragedModel to average again"
            )

    @torch.no_grad()
    def _pull(self) -> None:
        self.wait()  # every pull, load and local read comes here: the update in flight first
        if not self._stale:
            return
        local = self._local()
        devices = {t.device for t in itertools.chain(local.parameters(), local.buffers())}
        # A model on one GPU gets the average device to device where the client can (CUDA IPC).
        device = next(iter(devices)) if len(devices) == 1 and next(iter(devices)).type == "cuda" else None
        with self._held():
            values = fetch(self.client, self.average, device)
        named = _unwrapped(local)
        for name, t in itertools.chain(named.named_parameters(), named.named_buffers()):
            if name in values:
                t.copy_(values[name])
        self._stale = False
