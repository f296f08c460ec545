"""Schedules of averaging across a cluster's ranks: torch's model averagers, driven from a client.

torch.distributed.algorithms.model_averaging runs inside each training process: after every
optimizer step, `PeriodicModelAverager` averages the parameters over every rank each `period` steps
once `warmup_steps` have passed, and `HierarchicalModelAverager` averages within groups of
consecutive ranks at short periods and across larger groups (the last: every rank) at longer ones.
Here the ranks are a weightavg cluster's and the training runs on them (`Client.run`), so the same
schedules are a client's loop of `allreduce` calls: these classes keep the step count and decide,
exactly as torch's do, when to average and over which group (`Client.allreduce(group_size=...)`).
The decisions need nothing from the server; the averages are the server's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ._records import Handle


class Reduces(Protocol):
    """The client calls the averagers make (`weightavg.Client` has them)."""

    def allreduce(
        self, h: Handle | str, op: str = "mean", weights: Iterable[float] | None = None, group_size: int = 0
    ) -> int: ...

    def info(self) -> dict[str, Any]: ...


def _count(value: object, what: str, least: int) -> int:
    """A whole number of at least `least` (bools refused: True is not a period)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what} must be a whole number of at least {least}; got {value!r}")
    return value


class PeriodicAverager:
    """torch's PeriodicModelAverager for a replicated module, model or dictionary of a cluster.

    Call `average_parameters()` once per training step, after the step: when `step >= warmup_steps`
    and `(step - warmup_steps) % period == 0` it averages the object over every rank (one
    `allreduce`); then `step` grows by one. `weights`, one per rank, weigh the mean (e.g. examples
    per rank); none: equal.
    """

    def __init__(
        self, client: Reduces, handle: Handle | str, period: int, warmup_steps: int = 0,
        weights: Iterable[float] | None = None,
    ) -> None:
        self.client = client
        self.handle = handle
        self.period = _count(period, "period", 1)
        self.warmup_steps = _count(warmup_steps, "warmup_steps", 0)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.step = 0

    def due(self) -> bool:
        """Whether the current step averages."""
        return self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0

    def average_parameters(self) -> bool:
        """Average over every rank if this step is due, then count the step; whether it averaged. A
        refused average (an error) leaves the step uncounted, so a retry averages the same step."""
        averaged = self.due()
        if averaged:
            self.client.allreduce(self.handle, weights=self.weights)
        self.step += 1
        return averaged


class HierarchicalAverager:
    """torch's HierarchicalModelAverager for a replicated module, model or dictionary of a cluster.

    `period_group_size` maps averaging periods, in increasing order, to group sizes: e.g. {2: 4, 8: 16}
    on 16 ranks averages within each 4 consecutive ranks every 2 steps and over all 16 every 8 steps.
    The last group size must be the cluster's world size, and each must divide it. Call
    `average_parameters()` once per training step, after the step: once `step >= warmup_steps`, the
    largest period that divides `step` (the step itself, not the steps since the warmup, as in torch)
    chooses the group; no period divides it: no average. Then `step` grows by one.
    """

    def __init__(
        self, client: Reduces, handle: Handle | str, period_group_size: Mapping[int, int], warmup_steps: int = 0,
        weights: Iterable[float] | None = None,
    ) -> None:
        if not period_group_size:
            raise ValueError("period_group_size must map at least one period to a group size")
        periods = [_count(p, "every period", 1) for p in period_group_size]
        if any(a >= b for a, b in zip(periods, periods[1:])):
            raise ValueError(f"give the periods in increasing order (the largest that divides a step wins); got {periods}")
        world = int(client.info()["world_size"])
        sizes = [_count(s, "every group size", 1) for s in period_group_size.values()]
        if sizes[-1] != world:
            raise ValueError(
                f"the last group size ({sizes[-1]}) must be the cluster's world size, {world}: the longest period "
                "averages over every rank"
            )
        if any(world % s for s in sizes):
            raise ValueError(f"every group size must divide the world size {world}; got {sizes}")
        self.client = client
        self.handle = handle
        self.period_group_size = dict(zip(periods, sizes))
        self.world_size = world
        self.warmup_steps = _count(warmup_steps, "warmup_steps", 0)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.step = 0

    def due(self) -> int:
        """The group size the current step averages over; 0 when it does not average."""
        if self.step < self.warmup_steps:
            return 0
        for period in reversed(self.period_group_size):
            if self.step % period == 0:
                return self.period_group_size[period]
        return 0

    def average_parameters(self) -> int:
        """Average within this step's groups if it is due, then count the step; the group size averaged
        over (0: none). A refused average (an error) leaves the step uncounted."""
        size = self.due()
        if size:
            self.client.allreduce(self.handle, weights=self.weights, group_size=0 if size == self.world_size else size)
        self.step += 1
        return size
