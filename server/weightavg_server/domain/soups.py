"""Greedy model soups: average fine-tuned ingredients one by one, keeping each that helps on held-out data.

The ingredients are ranked by their score on the model's test data, best first (tied ones last given
first, as model-soups' reversed stable sort leaves them); the soup starts as the best one, and each
next ingredient is tried as the uniform average of the soup's ingredients and itself (soup * k/(k+1)
+ ingredient/(k+1)), kept only when it strictly improves the score. So the soup's score on that data
is never worse than the best ingredient's. The model's own tensors serve as the workspace and are
put back, bit for bit, afterwards (also on failure or cancellation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from . import training
from .dictionaries import COUNT_KEY, TensorDict
from .dtypes import NAMES
from .errors import FailedPrecondition, InvalidArgument
from .options import Opt, Value, ValueType, Wording, resolve, str_value
from .tensors import storage_key

D = TypeVar("D")
E = TypeVar("E")

SOUP_OPTIONS = (Opt("metric", ValueType.STR, "accuracy", choices=("accuracy", "loss")),)
"""accuracy: higher is better; loss: the model's loss, lower is better."""


@dataclass(frozen=True)
class SoupPlan:
    """A checked soup: the entries souped (every parameter, and the floating buffers the ingredients
    hold, such as batchnorm statistics), the module's tensors they go into, and the metric."""

    names: tuple[str, ...]
    targets: tuple[torch.Tensor, ...]
    metric: str


@dataclass(frozen=True)
class Soup(Generic[D]):
    """A greedy soup and how it was made: its dictionary (here the tensors; the service's answer
    holds its handle instead), and every score on the way.

    scores: each ingredient alone, in the order given. order: the ingredients by score, best first
    (tied ones last given first).
    tried: the score of each soup tried, in that order (the first is the best ingredient alone).
    kept: the ingredients in the soup, in the order they joined. score: the soup's score.
    """

    dictionary: D
    metric: str
    scores: list[float]
    order: list[int]
    tried: list[float]
    kept: list[int]
    score: float

    def holding(self, dictionary: E) -> Soup[E]:
        """The same soup record with another representation of its dictionary (a handle)."""
        return Soup(dictionary, self.metric, self.scores, self.order, self.tried, self.kept, self.score)


def plan_soup(
    model: training.Model, ingredients: Sequence[TensorDict], kwargs: Sequence[tuple[str, Value]] = ()
) -> SoupPlan:
    """Check a soup before anything changes.

    Raises:
        FailedPrecondition: the model has no test data.
        InvalidArgument: no ingredient, an unknown option, an ingredient that lacks a parameter or
            has an entry that is neither a parameter nor a buffer, one whose entry differs in shape,
            dtype or device from the model's tensor, or one that is a live view of the model itself.
    """
    metric = str_value(resolve("soup", SOUP_OPTIONS, (), kwargs, Wording.SETTING), "metric")
    if not ingredients:
        raise InvalidArgument("soup: give at least one ingredient")
    if training.data_size(model, "test") < 0:
        raise FailedPrecondition(
            "soup: the model has no test data to score ingredients on; load it with test(m, X, Y) "
            "(SetModelData, split DATA_SPLIT_TEST)"
        )
    params = dict(model.module.named_parameters())
    buffers = dict(model.module.named_buffers())
    first = [n for n in ingredients[0].entries if n != COUNT_KEY]
    names = [n for n in first if n in params or (n in buffers and buffers[n].is_floating_point())]
    for n in first:
        if n not in params and n not in buffers:
            raise InvalidArgument(f"soup: ingredient 1 has '{n}', which is neither a parameter nor a buffer of the model")
    missing = [n for n in params if n not in names]
    if missing:
        raise InvalidArgument(f"soup: ingredient 1 lacks parameter '{missing[0]}'; make ingredients with copyparms")
    targets = [params[n] if n in params else buffers[n] for n in names]
    own = {storage_key(t) for t in targets}
    for i, d in enumerate(ingredients):
        label = f"ingredient {i + 1}"
        if {n for n in d.entries if n != COUNT_KEY} != set(first):
            raise InvalidArgument(f"soup: {label} has other entries than ingredient 1; every ingredient needs the same names")
        for n, t in zip(names, targets):
            value = d.entries[n]
            if value.shape != t.shape or value.dtype != t.dtype or value.device != t.device:
                raise InvalidArgument(
                    f"soup: {label}'s '{n}' is {_described(value)}, the model's is {_described(t)}: every "
                    "ingredient needs the model's shapes, dtypes and device (copy them with copyparms(m) "
                    "(CopyParameters), or move or convert them with to() (MoveHandle)); nothing changed"
                )
            if storage_key(value) in own:
                raise InvalidArgument(f"soup: {label} shares the model's own '{n}' (a live view); copy it with copyparms (CopyParameters)")
    return SoupPlan(tuple(names), tuple(targets), metric)


def _described(t: torch.Tensor) -> str:
    """A tensor's dtype (by the name clients send), shape and device, e.g. "float64 [2, 2] on cpu"."""
    return f"{NAMES.get(t.dtype, str(t.dtype))} {list(t.shape)} on {t.device}"


def _better(metric: str, a: float, b: float) -> bool:
    """Whether score a strictly beats b (NaN never does)."""
    return a > b if metric == "accuracy" else a < b


def _rank(metric: str, scores: list[float]) -> list[int]:
    """Ingredient indices, best score first and NaN last, ranked as model-soups' recipe ranks them: a
    stable sort from worst to best, reversed. So tied ingredients come out last given first; ties are
    common, an accuracy being a whole number of samples, and the first of the ranking starts the soup."""
    sign = 1.0 if metric == "accuracy" else -1.0  # sign * score: higher is better

    def worst_first(i: int) -> tuple[bool, float]:
        nan = math.isnan(scores[i])
        return not nan, 0.0 if nan else sign * scores[i]

    return sorted(range(len(scores)), key=worst_first)[::-1]


def greedy_soup(
    model: training.Model, ingredients: Sequence[TensorDict], plan: SoupPlan,
    should_stop: training.StopCheck = training.never_stop,
) -> Soup[TensorDict]:
    """Make a greedy soup (see the module docstring) of ingredients checked by plan_soup.

    Raises:
        InvalidArgument: the test data do not fit the model.
        Cancelled: should_stop turned true (between test batches); the model is put back first.

    Example: with ingredients fine-tuned from one model with different seeds, the soup's accuracy
    on the test data is at least the best ingredient's.
    """
    targets = plan.targets
    saved = [t.detach().clone() for t in targets]
    soup = TensorDict({n: torch.empty_like(t) for n, t in zip(plan.names, targets)})
    metrics = model.test["metrics"]

    def load(d: TensorDict) -> None:
        for n, t in zip(plan.names, targets):
            t.copy_(d.entries[n])

    def score() -> float:
        return float(training.test_epoch(model, should_stop)[0][1])

    try:
        model.test["metrics"] = plan.metric
        with torch.no_grad():
            scores = []
            for d in ingredients:
                load(d)
                scores.append(score())
            order = _rank(plan.metric, scores)
            for n in plan.names:
                soup.entries[n].copy_(ingredients[order[0]].entries[n])
            kept, best, tried = [order[0]], scores[order[0]], [scores[order[0]]]
            for i in order[1:]:
                weight = 1.0 / (len(kept) + 1)
                for n, t in zip(plan.names, targets):
                    t.copy_(soup.entries[n]).lerp_(ingredients[i].entries[n], weight)
                candidate = score()
                tried.append(candidate)
                if _better(plan.metric, candidate, best):
                    # The same lerp on the soup itself, not a copy of the model's tensors: scoring may
                    # have changed those in place (a max_norm embedding renormalises the rows it reads).
                    for n in plan.names:
                        soup.entries[n].lerp_(ingredients[i].entries[n], weight)
                    kept.append(i)
                    best = candidate
    finally:
        model.test["metrics"] = metrics
        with torch.no_grad():
            for t, value in zip(targets, saved):
                t.copy_(value)
    return Soup(soup, plan.metric, scores, order, tried, kept, best)
