"""The exponential moving average's schedule: its decay as a pure function of the step.

The schedule is timm's `ModelEmaV3.get_decay` (huggingface/pytorch-image-models,
timm/utils/model_ema.py), so an EMA kept here follows the same decays as one kept by timm: the
first `update_after_step + 1` steps copy the parameters, then the decay is constant or, with
warm-up, grows as 1 - (1 + k/gamma)^-power towards it. A dictionary that holds an EMA keeps its
schedule and the last step used (`EmaState`), so a client may omit both after the first update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import InvalidArgument

MAX_STEP = 2**62
"""Steps above this are refused: far beyond any training run, and far from int64 overflow."""


@dataclass(frozen=True)
class EmaSchedule:
    """How the decay of an EMA depends on the step; defaults are timm ModelEmaV3's."""

    decay: float = 0.9999
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    min_decay: float = 0.0
    update_after_step: int = 0

    def check(self) -> None:
        """InvalidArgument, naming the value to fix, unless every field is in range."""
        for name in ("decay", "min_decay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise InvalidArgument(f"{name} must be between 0 and 1, got {value}")
        for name in ("warmup_gamma", "warmup_power"):
            value = getattr(self, name)
            if not (value > 0.0 and math.isfinite(value)):
                raise InvalidArgument(f"{name} must be a finite number greater than 0, got {value}")
        if not 0 <= self.update_after_step <= MAX_STEP:
            raise InvalidArgument(f"update_after_step must be between 0 and {MAX_STEP}, got {self.update_after_step}")

    def decay_at(self, step: int) -> float:
        """The decay to use at `step` (timm's get_decay): 0.0, a full copy, until step
        update_after_step + 2; then `decay`, or with warm-up the growing decay clamped to
        [min_decay, decay] (min_decay wins if it is the larger).

        Example: EmaSchedule(0.999, warmup=True).decay_at(2) == 1 - 2 ** (-2 / 3), about 0.370.
        """
        k = max(0, step - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        warm: float = 1.0 - (1.0 + k / self.warmup_gamma) ** -self.warmup_power
        return max(min(warm, self.decay), self.min_decay)


@dataclass(frozen=True)
class ScheduleChange:
    """Schedule fields a request sets; None keeps the dictionary's value (or the default)."""

    decay: float | None = None
    warmup: bool | None = None
    warmup_gamma: float | None = None
    warmup_power: float | None = None
    min_decay: float | None = None
    update_after_step: int | None = None

    def applied_to(self, kept: EmaSchedule | None) -> EmaSchedule:
        """The schedule with these fields set over `kept` (timm's defaults when None), checked.

        Raises:
            InvalidArgument: a field is out of range.
        """
        base = kept if kept is not None else EmaSchedule()
        changes = {name: value for name, value in vars(self).items() if value is not None}
        if kept is not None and all(getattr(kept, name) == value for name, value in changes.items()):
            return kept  # checked when it was made: a client that sends its schedule on every update changes nothing
        schedule = replace(base, **changes)
        schedule.check()
        return schedule


@dataclass(frozen=True)
class EmaState:
    """What a dictionary that holds an EMA keeps: its schedule and the last step used."""

    schedule: EmaSchedule
    step: int


def next_step(kept: EmaState | None, step: int | None) -> int:
    """The step an update uses: the one given, else one more than the last (1 for the first update).

    Raises:
        InvalidArgument: the step is negative or absurdly large.
    """
    if step is None and kept is not None and kept.step >= MAX_STEP:
        # The caller gave no step: "step must be between 0 and ..., got 2**62 + 1" named a value it never sent.
        raise InvalidArgument(
            f"the dictionary's last step is already {kept.step}, the largest allowed; give the step to use "
            f"(between 0 and {MAX_STEP}), which also re-bases the count"
        )
    used = step if step is not None else (kept.step + 1 if kept is not None else 1)
    if not 0 <= used <= MAX_STEP:
        raise InvalidArgument(f"step must be between 0 and {MAX_STEP}, got {used}")
    return used
