"""An average (EMA or SWA) of a sharded model, each rank keeping the average of its own shards on a
weightavg server: FSDP2 (`fully_shard`) and other DTensor models, whose parameters no process holds
whole, and plain models alike.

EMA and SWA are elementwise, so the average of a shard is the shard of the average: every rank
folds its local shards (`DTensor.to_local()`) into a dictionary of its own on the server, and
`copy_to(model)` writes them back into the same shards, exactly what averaging the whole model and
sharding it would give. The model is read and written through its `state_dict()` (FSDP2 puts its
parameters back in their sharded form there), since FSDP refuses `copy.deepcopy` and so
`AveragedModel` and `weightavg.torch.RemoteAveragedModel`, which keep a copy of the model, cannot
wrap it. Each rank runs the same calls on its own client (or one client per process).

Example (on every rank, after `fully_shard(model)`):
    >>> from weightavg import Client
    >>> from weightavg.sharded import ShardedAverage
    >>> with Client("averager:50051") as c:
    ...     ema = ShardedAverage(c, model, "ema", decay=0.999, dtype="float32")
    ...     for x, y in loader:
    ...         train_step(model, x, y)
    ...         ema.update_parameters(model)
    ...     with ema.swapped(model):    # the model holds the average, on every rank, until the block ends
    ...         evaluate(model)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

# weightavg.torch first: without PyTorch it raises the ImportError that says to install it.
from .torch import (  # isort: skip
    _average_held, _Background, _buffer_mode, _dtype_of, _fold_in, _schedule, _unwrapped, fetch, push,
)

import torch

from ._client import Client
from ._errors import WeightavgError
from ._records import Handle

__all__ = ["ShardedAverage", "local_state"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (sharing its memory), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's state dict with this rank's shard of each entry (DTensors' local tensors, which share
    the model's memory: writing them writes the model), and the names that are parameters. Inside
    torch.compile's and DDP's wrappers, by the model's own names."""
    inner = _unwrapped(model)
    state = {name: _local(t).detach() for name, t in inner.state_dict().items()}
    return state, {name for name, _ in inner.named_parameters()}


class ShardedAverage:
    """The average of a (sharded) model's parameters on a weightavg server, per rank.

    Args:
        client: this process's connected Client.
        model: the model, as training uses it (an FSDP2 module, a DTensor model, a plain module, or
            one inside torch.compile's or DDP's wrapper).
        mode: "ema" (timm's schedule, as Client.ema) or "swa" (the equal-weight running mean).
        decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step: the EMA schedule,
            each left out taking weightavg.torch.EMA_DEFAULTS; refused for "swa".
        use_buffers: average floating buffers with the parameters (integer ones, such as
            num_batches_tracked, are copied); False copies every buffer at each update, as torch's
            AveragedModel does. Only buffers in the state dict (persistent ones) are kept.
        buffers: "average", "copy" or "skip" (left as they were when the average was made), as
            RemoteAveragedModel's; given, it replaces use_buffers.
        every: send every k-th call of update_parameters.
        dtype: the server average's floating dtype ("float32" for a bfloat16 model); default: each
            tensor's own. copy_to casts back to the model's dtypes.
        asynchronous: update_parameters copies this rank's shards (on their device) and returns; a
            background thread sends them and folds them in while training goes on, one update in
            flight at a time (RemoteAveragedModel's: every other call and wait() wait for it first,
            and raise its error there).

    Raises:
        ValueError: a mode, `every`, dtype or schedule field out of range (nothing is sent); from
            update_parameters and copy_to, for a model whose local shards differ in name or shape
            from the ones it was made with (a model resharded differently: make a new one).
    """

    def __init__(
        self, client: Client, model: torch.nn.Module, mode: str = "ema", *,
        decay: float | None = None, warmup: bool | None = None, warmup_gamma: float | None = None,
        warmup_power: float | None = None, min_decay: float | None = None, update_after_step: int | None = None,
        use_buffers: bool = False, buffers: str | None = None, every: int = 1, dtype: str | torch.dtype | None = None,
        asynchronous: bool = False,
    ) -> None:
        self.schedule = _schedule(mode, {
            "decay": decay, "warmup": warmup, "warmup_gamma": warmup_gamma, "warmup_power": warmup_power,
            "min_decay": min_decay, "update_after_step": update_after_step,
        })
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        target = _dtype_of(dtype)
        self.buffer_mode = _buffer_mode(use_buffers, buffers)
        self.client, self.mode, self.use_buffers, self.every = client, mode, self.buffer_mode == "average", every
        state, parameters = local_state(model)
        start = {name: t.to(target) if target is not None and t.is_floating_point() else t for name, t in state.items()}
        self._layout = {name: (t.shape, t.dtype) for name, t in start.items()}
        """Each entry's local shape and the average's dtype: what every later model must match."""
        self._averaged = {
            name for name, t in state.items()
            if t.is_floating_point() and (name in parameters or self.use_buffers)
        }
        """The entries folded into the average."""
        self._copied = {name for name in state if name not in self._averaged and (name in parameters or self.buffer_mode != "skip")}
        """The entries copied into it at each update: buffers, unless averaged or skipped, and integer
        entries."""
        if mode == "swa":
            start[".n"] = torch.tensor(0.0, dtype=torch.float64)  # the first update copies, as AveragedModel's
        self.average: Handle = push(client, start)
        self.source: Handle | None = None
        self.n_averaged = 0
        """Updates folded in (with asynchronous, once folded in: wait() before reading it)."""
        self._calls = 0
        self._freed = False
        self.asynchronous = asynchronous
        self._background = _Background()

    def _shards(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's local shards, checked against the average's layout (names and shapes)."""
        state, _ = local_state(model)
        fix = "nothing was sent or changed; make a new ShardedAverage for a model sharded another way"
        for name, t in state.items():
            if name not in self._layout:
                raise ValueError(f"the model's '{name}' is not in the average; {fix}")
            if t.shape != self._layout[name][0]:
                raise ValueError(
                    f"this rank's shard of '{name}' has shape {list(t.shape)} but the average's is "
                    f"{list(self._layout[name][0])}; {fix}"
                )
        for name in self._layout:
            if name not in state:
                raise ValueError(f"the average's '{name}' is not in the model; {fix}")
        return state

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """Fold this rank's shards of the model into its average (every `every`-th call); the entries
        that are not averaged are copied after it, so a refused average changes nothing."""
        self._check_not_freed()
        self.wait()
        if (self._calls + 1) % self.every != 0:
            self._calls += 1
            return
        state = self._shards(model)
        sent = [(n, t) for n, t in state.items() if n in self._averaged]
        kept = [(n, t) for n, t in state.items() if n in self._copied]
        if self.asynchronous:
            self._background.send(self._update, sent, kept)
        else:
            self._update(sent, kept)

    def wait(self) -> None:
        """Wait for the update in flight (asynchronous=True); raise its error if the server refused it."""
        self._background.wait()

    def _update(self, sent: list[tuple[str, torch.Tensor]], kept: list[tuple[str, torch.Tensor]]) -> None:
        """Fold the averaged entries in, then copy the others into the average (a refused average has
        changed nothing); the call counts once folded in."""
        with self._held():
            self.source = push(self.client, sent, into=self.source)
            self.n_averaged = _fold_in(self.client, self.mode, self.schedule, self.source, self.average, self.n_averaged + 1)
            self._calls += 1
            copied = [(n, t.to(self._layout[n][1])) for n, t in kept]
            try:
                if copied:
                    push(self.client, copied, into=self.average)
            except WeightavgError as exc:
                raise type(exc)(
                    f"the update was folded into the average (n_averaged is now {self.n_averaged}), but copying the "
                    f"entries that are not averaged (buffers) into it was refused: {exc.message}. The next update "
                    "copies them; do not repeat this one",
                    exc.code,
                ) from exc

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the average into the model's shards on this rank (cast to the model's dtypes), in
        place: parameters and the state dict's buffers. Every rank calls it for a sharded model."""
        self._check_not_freed()
        self.wait()
        state = self._shards(model)
        devices = {t.device for t in state.values()}
        device = next(iter(devices)) if len(devices) == 1 and next(iter(devices)).type == "cuda" else None
        with self._held():
            values = fetch(self.client, self.average, device, names=list(state))
        for name, t in state.items():
            t.copy_(values[name])

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model holding the average for the block (evaluation, a checkpoint of the average), its own
        values put back after it, bit for bit, whatever the block raised. Holds one copy of this rank's
        shards meanwhile."""
        state = self._shards(model)
        kept = {name: t.clone() for name, t in state.items()}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for name, t in local_state(model)[0].items():
                    t.copy_(kept[name])

    def state_dict(self) -> dict[str, Any]:
        """This rank's average (its shards, by name) and count, for a checkpoint of its own."""
        self._check_not_freed()
        self.wait()
        with self._held():
            values = fetch(self.client, self.average)
        values.pop(".n", None)
        return {"average": values, "n_averaged": self.n_averaged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set this rank's average and count from `state_dict()`'s (all or nothing: the names and shapes
        must be the average's)."""
        self._check_not_freed()
        self.wait()
        values = dict(state["average"])
        if set(values) != set(self._layout):
            raise ValueError(
                f"the state holds {sorted(values)} but the average is of {sorted(self._layout)}; nothing was loaded"
            )
        for name, t in values.items():
            if t.shape != self._layout[name][0]:
                raise ValueError(f"'{name}' has shape {list(t.shape)}, not {list(self._layout[name][0])}; nothing was loaded")
        count = int(state["n_averaged"])
        sent = [(name, t.to(self._layout[name][1])) for name, t in values.items()]
        if self.mode == "swa":
            sent.append((".n", torch.tensor(float(count), dtype=torch.float64)))
        with self._held():
            push(self.client, sent, into=self.average)
        self.n_averaged = count

    def free(self) -> None:
        """Free the server's dictionaries (after the update in flight); later calls are refused."""
        if not self._freed:
            try:
                self.wait()
            finally:
                self._background.close()
            self.client.free(*[h for h in (self.average, self.source) if h is not None])
            self.source = None
            self._freed = True

    def _check_not_freed(self) -> None:
        if self._freed:
            raise RuntimeError("this ShardedAverage was freed (free()); make a new one to average again")

    def _held(self) -> contextlib.AbstractContextManager[None]:
        return _average_held("this rank's average", "ShardedAverage")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "a ShardedAverage holds a connection and server handles, so it cannot be copied or pickled: save "
            "its state_dict() and load it into a new ShardedAverage"
        )

