"""The client's averaging schedules (weightavg.PeriodicAverager, HierarchicalAverager) against torch's
own model averagers, step by step: torch's classes run their own `average_parameters` with its
averaging function recording which group it was handed instead of reducing (no process group exists
in this process), and ours record the `allreduce` calls they make. The averages themselves, through a
real 4-rank cluster against torch's averagers under torchrun, are in tests/test_cluster_groups.py."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.algorithms.model_averaging import averagers as torch_averagers
from torch.distributed.algorithms.model_averaging import hierarchical_model_averager as torch_hierarchical
from torch.distributed.algorithms.model_averaging import utils as torch_utils

from weightavg import HierarchicalAverager, PeriodicAverager


class Recorder:
    """Stands for the client: records each allreduce's group size (the world size for 0)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: list[tuple[int, list[float] | None]] = []

    def allreduce(self, h: Any, op: str = "mean", weights: Iterable[float] | None = None, group_size: int = 0) -> int:
        assert op == "mean"
        self.calls.append((group_size or self.world, None if weights is None else list(weights)))
        return 1

    def info(self) -> dict[str, Any]:
        return {"world_size": self.world}


def torch_schedule(averager: Any, steps: int, handed: list[Any]) -> list[Any]:
    """torch's decision at each step: the group it averaged over, or None."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    decided = []
    for _ in range(steps):
        before = len(handed)
        averager.average_parameters(params)
        decided.append(handed[-1] if len(handed) > before else None)
    return decided


@pytest.mark.filterwarnings("ignore:When period is 1")  # torch's advice, not a refusal
@given(period=st.integers(1, 7), warmup=st.integers(0, 9))
def test_periodic_averages_at_torchs_steps(period: int, warmup: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        handed: list[Any] = []
        patch.setattr(torch_utils, "average_parameters_or_parameter_groups", lambda params, group: handed.append(group))
        world = object()  # torch's averager takes a process group it only hands on
        theirs = torch_schedule(torch_averagers.PeriodicModelAverager(period, warmup, process_group=world), 40, handed)
    client = Recorder(4)
    ours = PeriodicAverager(client, "module_x", period, warmup)
    averaged = [ours.average_parameters() for _ in range(40)]
    assert averaged == [g is world for g in theirs]
    assert [size for size, _ in client.calls] == [4] * sum(averaged)
    assert ours.step == 40


def hierarchical(periods: dict[int, int], warmup: int) -> Any:
    """torch's HierarchicalModelAverager with each group stood for by its size (its constructor makes
    process groups, which need a cluster; its decisions, `average_parameters` and
    `_find_process_group`, are torch's own)."""
    averager = object.__new__(torch_hierarchical.HierarchicalModelAverager)
    averager._periods = list(periods)
    averager.period_process_group_dict = dict(periods)
    averager.warmup_steps = warmup
    averager.step = 0
    return averager


@given(
    levels=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=3, unique=True).map(sorted),
    periods=st.lists(st.integers(1, 12), min_size=3, max_size=3, unique=True).map(sorted),
    warmup=st.integers(0, 10),
)
def test_hierarchical_averages_at_torchs_steps_over_torchs_groups(levels: list[int], periods: list[int], warmup: int) -> None:
    world = 8
    sizes = [*levels[:-1], world] if levels[-1] != world else levels
    table = dict(zip(periods, sizes))
    with pytest.MonkeyPatch.context() as patch:
        handed: list[Any] = []
        patch.setattr(torch_utils, "average_parameters_or_parameter_groups", lambda params, group: handed.append(group))
        theirs = torch_schedule(hierarchical(table, warmup), 60, handed)
    client = Recorder(world)
    ours = HierarchicalAverager(client, "module_x", table, warmup)
    decided = [ours.average_parameters() or None for _ in range(60)]
    assert decided == theirs
    assert [size for size, _ in client.calls] == [g for g in theirs if g is not None]


def test_the_whole_world_goes_as_group_size_0_and_weights_are_passed_on() -> None:
    sent: list[dict[str, Any]] = []

    class Client:
        def allreduce(self, h: Any, op: str = "mean", weights: Iterable[float] | None = None, group_size: int = 0) -> int:
            sent.append({"handle": h, "weights": weights, "group_size": group_size})
            return 1

        def info(self) -> dict[str, Any]:
            return {"world_size": 4}

    averager = HierarchicalAverager(Client(), "module_x", {1: 2, 2: 4}, weights=[1, 2, 3, 4])
    assert [averager.average_parameters() for _ in range(3)] == [4, 2, 4]
    assert [s["group_size"] for s in sent] == [0, 2, 0]
    assert all(s["weights"] == [1.0, 2.0, 3.0, 4.0] and s["handle"] == "module_x" for s in sent)


def test_a_refused_average_leaves_the_step_uncounted() -> None:
    class Refusing(Recorder):
        def allreduce(self, h: Any, op: str = "mean", weights: Iterable[float] | None = None, group_size: int = 0) -> int:
            raise RuntimeError("refused")

    for averager in (PeriodicAverager(Refusing(2), "m", 2), HierarchicalAverager(Refusing(2), "m", {2: 2})):
        with pytest.raises(RuntimeError, match="refused"):
            averager.average_parameters()
        assert averager.step == 0


@pytest.mark.parametrize(("table", "fix"), [
    ({}, "at least one period"),
    ({0: 4}, "every period must be a whole number of at least 1"),
    ({4: 2, 2: 4}, "increasing order"),
    ({2: 2}, "must be the cluster's world size, 4"),
    ({2: 3, 4: 4}, "must divide the world size 4"),
    ({2: True, 4: 4}, "every group size must be a whole number"),
])
def test_hierarchies_torch_would_refuse_or_misread_are_refused(table: dict[int, int], fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        HierarchicalAverager(Recorder(4), "m", table)


@pytest.mark.parametrize(("period", "warmup", "fix"), [
    (0, 0, "period must be"), (2.0, 0, "period must be"), (2, -1, "warmup_steps must be"),
])
def test_periods_and_warmups_torch_would_refuse_are_refused(period: Any, warmup: int, fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        PeriodicAverager(Recorder(2), "m", period, warmup)
