"""The exponential moving average in process: domain.ema's schedule and averaging's EMA update, copies
with a dtype and buffers, buffer modes and dictionary sources.

Oracles: torch's own `AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))`; for the warm-up schedule a
transcription of the formula documented for timm's ModelEmaV3 (timm itself does not install next to
the pinned torch here: it pulls a newer torch and torchvision); and float64 arithmetic for the
float32 average of a bfloat16 module. Runs are short real training loops (SGD on fixed data, so
batchnorm statistics move too), with the same seeds on both sides.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weightavg_server.domain import averaging
from weightavg_server.domain.averaging import BufferMode
from weightavg_server.domain.dictionaries import COUNT_KEY, TensorDict
from weightavg_server.domain.ema import MAX_STEP, EmaSchedule, EmaState, ScheduleChange
from weightavg_server.domain.errors import InvalidArgument

STEPS = 50
TOLERANCE = 1e-6
"""The issue's bound for float32 results. Both sides lerp the same float32 values with the same
weight, so the differences seen are a few ulps (or zero)."""


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(6, 8), b=torch.nn.BatchNorm1d(8), r=torch.nn.ReLU(), c=torch.nn.Linear(8, 3),
    ))


def batches(seed: int = 1, n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train_step(module: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    module.train()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    opt.step()


def floating_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def assert_matches(d: TensorDict, expected: dict[str, torch.Tensor], atol: float = TOLERANCE) -> None:
    for name, value in expected.items():
        got = d.entries[name]
        assert got.dtype == value.dtype, name
        assert (got - value).abs().max().item() <= atol, (name, (got - value).abs().max().item())


# -- the schedule --------------------------------------------------------------------------------


def documented_decay(step: int, decay: float, warmup: bool, gamma: float, power: float, least: float, after: int) -> float:
    """timm ModelEmaV3's decay at a step, from its documented formula (written out here as the oracle)."""
    since = step - after - 1
    if since <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(least, min(decay, 1.0 - (1.0 + since / gamma) ** (-power)))


SCHEDULES = [
    EmaSchedule(),
    EmaSchedule(decay=0.999),
    EmaSchedule(decay=0.999, warmup=True),
    EmaSchedule(decay=0.9, warmup=True, warmup_gamma=3.0, warmup_power=0.75, min_decay=0.2, update_after_step=4),
    EmaSchedule(decay=0.5, warmup=True, min_decay=0.7),  # min_decay above decay wins, as in timm
    EmaSchedule(decay=0.0),
    EmaSchedule(decay=1.0, update_after_step=10),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_decay_follows_the_documented_timm_formula_at_every_step(schedule: EmaSchedule) -> None:
    for step in [*range(0, 200), 10**4, 10**6, 2**40]:
        expected = documented_decay(step, schedule.decay, schedule.warmup, schedule.warmup_gamma,
                                    schedule.warmup_power, schedule.min_decay, schedule.update_after_step)
        assert schedule.decay_at(step) == expected, step


def test_warmup_reaches_the_decays_timm_documents() -> None:
    """gamma 1, power 2/3: 0.999 at about 31.6K steps, 0.9999 at 1M; power 3/4: 0.999 at 10K. Step s
    has s - 1 steps of warm-up behind it, so its decay is 1 - s**-power."""
    two_thirds = EmaSchedule(decay=1.0, warmup=True)
    assert abs(two_thirds.decay_at(31_623) - 0.999) < 1e-8
    assert abs(two_thirds.decay_at(1_000_000) - 0.9999) < 1e-12
    three_quarters = EmaSchedule(decay=1.0, warmup=True, warmup_power=0.75)
    assert abs(three_quarters.decay_at(10_000) - 0.999) < 1e-12


def test_the_first_steps_copy() -> None:
    schedule = EmaSchedule(decay=0.99, update_after_step=3)
    assert [schedule.decay_at(s) for s in range(7)] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.99, 0.99]


@pytest.mark.parametrize(
    "change, message",
    [
        (ScheduleChange(decay=1.5), "decay must be between 0 and 1"),
        (ScheduleChange(decay=math.nan), "decay must be between 0 and 1"),
        (ScheduleChange(min_decay=-0.1), "min_decay must be between 0 and 1"),
        (ScheduleChange(warmup_gamma=0.0), "warmup_gamma must be a finite number greater than 0"),
        (ScheduleChange(warmup_power=math.inf), "warmup_power must be a finite number greater than 0"),
        (ScheduleChange(update_after_step=-1), "update_after_step must be between 0"),
    ],
    ids=["decay", "nan", "min_decay", "gamma", "power", "after"],
)
def test_a_bad_schedule_is_refused_naming_the_field_and_nothing_changes(change: ScheduleChange, message: str) -> None:
    module = net()
    d = averaging.copy_parameters(module)
    averaging.ema_update(module, d, ScheduleChange(decay=0.9))
    before = {k: v.clone() for k, v in d.entries.items()}
    kept = d.ema
    train_step(module, torch.optim.SGD(module.parameters(), lr=0.1), *batches(n=1)[0])
    with pytest.raises(InvalidArgument, match=message):
        averaging.ema_update(module, d, change)
    assert d.ema == kept
    assert all(torch.equal(d.entries[k], v) for k, v in before.items())


def test_a_negative_step_is_refused() -> None:
    module = net()
    d = averaging.copy_parameters(module)
    with pytest.raises(InvalidArgument, match="step must be between 0"):
        averaging.ema_update(module, d, step=-1)
    assert d.ema is None


def test_an_implicit_step_past_the_largest_says_to_give_one_and_changes_nothing() -> None:
    """After an update at the largest step, an update without a step is refused saying so and how
    to go on (it used to name 2**62 + 1, a step the caller never sent); an explicit step goes on."""
    module = net()
    d = averaging.copy_parameters(module)
    averaging.ema_update(module, d, ScheduleChange(decay=0.5), step=MAX_STEP)
    kept, before = d.ema, {k: v.clone() for k, v in d.entries.items()}
    with pytest.raises(InvalidArgument, match=r"last step is already 4611686018427387904.*give the step to use"):
        averaging.ema_update(module, d)
    assert d.ema == kept and all(torch.equal(d.entries[k], v) for k, v in before.items())
    assert averaging.ema_update(module, d, step=1) == (1, 0.0)


# -- steps and the kept schedule -----------------------------------------------------------------


def test_the_kth_update_uses_step_k_and_the_schedule_is_kept() -> None:
    module = net()
    d = averaging.copy_parameters(module)
    change = ScheduleChange(decay=0.99, warmup=True, warmup_power=0.75)
    assert averaging.ema_update(module, d, change) == (1, 0.0)
    step, decay = averaging.ema_update(module, d)  # nothing given: the kept schedule, the next step
    assert step == 2 and decay == EmaSchedule(decay=0.99, warmup=True, warmup_power=0.75).decay_at(2)
    assert d.ema == EmaState(EmaSchedule(decay=0.99, warmup=True, warmup_power=0.75), 2)
    assert averaging.ema_update(module, d, ScheduleChange(decay=0.5), step=100)[0] == 100
    assert d.ema == EmaState(EmaSchedule(decay=0.5, warmup=True, warmup_power=0.75), 100)
    assert averaging.ema_update(module, d)[0] == 101


def test_a_schedule_sent_again_unchanged_is_the_kept_one_and_a_changed_field_is_still_checked() -> None:
    kept = EmaSchedule(decay=0.99, warmup=True)
    assert ScheduleChange(decay=0.99, warmup=True).applied_to(kept) is kept  # nothing to make or check
    assert ScheduleChange(decay=0.5).applied_to(kept) == EmaSchedule(decay=0.5, warmup=True)
    for bad in (float("nan"), 1.5):
        with pytest.raises(InvalidArgument, match="decay must be between 0 and 1"):
            ScheduleChange(decay=bad).applied_to(kept)


def test_a_decay_of_zero_copies_exactly_even_over_a_non_finite_average() -> None:
    module = net()
    d = averaging.copy_parameters(module, torch.float64)
    for t in d.entries.values():
        t.fill_(math.nan)
    averaging.ema_update(module, d)  # step 1: decay 0
    for name, p in module.named_parameters():
        assert torch.equal(d.entries[name], p.detach().double()), name


# -- against torch's AveragedModel and the timm formula ------------------------------------------


@pytest.mark.parametrize("use_buffers", [False, True], ids=["parameters", "with-buffers"])
def test_ema_over_50_steps_equals_averaged_model_with_the_ema_multi_avg_fn(use_buffers: bool) -> None:
    decay = 0.9
    module = net()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    oracle = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    d = averaging.copy_parameters(module, buffers=use_buffers)
    mode = BufferMode.AVERAGE if use_buffers else BufferMode.EXCLUDE
    for k, (x, y) in enumerate(batches(), start=1):
        train_step(module, opt, x, y)
        oracle.update_parameters(module)
        assert averaging.ema_update(module, d, ScheduleChange(decay=decay), buffers=mode) == (k, 0.0 if k == 1 else decay)
    expected = floating_state(oracle.module) if use_buffers else {
        n: p.detach() for n, p in oracle.module.named_parameters()
    }
    assert_matches(d, expected)
    if use_buffers:
        # torch lerps num_batches_tracked and truncates (it lags behind); here it is the module's own
        assert d.entries["b.num_batches_tracked"].item() == module.b.num_batches_tracked.item() == STEPS
        assert oracle.module.b.num_batches_tracked.item() < STEPS


def timm_style_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float, exclude_buffers: bool) -> None:
    """What ModelEmaV3's documentation says an update does: floating state lerped by 1 - decay, other
    state copied; with exclude_buffers only parameters lerped and every buffer copied."""
    params = {n for n, _ in module.named_parameters()}
    with torch.no_grad():
        for name, value in module.state_dict().items():
            average = value.is_floating_point() and (name in params or not exclude_buffers)
            if average:
                ema[name].lerp_(value, 1.0 - decay)
            else:
                ema[name].copy_(value)


@pytest.mark.parametrize("exclude_buffers", [False, True], ids=["average-buffers", "copy-buffers"])
def test_ema_with_warmup_equals_timms_schedule_and_update(exclude_buffers: bool) -> None:
    schedule = EmaSchedule(decay=0.995, warmup=True, warmup_gamma=1.0, warmup_power=0.75, min_decay=0.1,
                           update_after_step=2)
    module = net()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    oracle = {k: v.clone() for k, v in module.state_dict().items()}
    d = averaging.copy_parameters(module, buffers=True)
    mode = BufferMode.COPY if exclude_buffers else BufferMode.AVERAGE
    change = ScheduleChange(**vars(schedule))
    for k, (x, y) in enumerate(batches(), start=1):
        train_step(module, opt, x, y)
        decay = documented_decay(k, 0.995, True, 1.0, 0.75, 0.1, 2)
        timm_style_update(oracle, module, decay, exclude_buffers)
        assert averaging.ema_update(module, d, change, buffers=mode) == (k, decay)
    assert_matches(d, {k: v for k, v in oracle.items() if v.is_floating_point()})
    assert torch.equal(d.entries["b.num_batches_tracked"], oracle["b.num_batches_tracked"])


# -- bfloat16 modules ------------------------------------------------------------------------------


def test_a_float32_ema_of_a_bfloat16_module_equals_float64_arithmetic_within_float32_rounding() -> None:
    decay = 0.99
    module = net().to(torch.bfloat16)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    d = averaging.copy_parameters(module, torch.float32)
    exact = {n: p.detach().double() for n, p in module.named_parameters()}
    for k, (x, y) in enumerate(batches(), start=1):
        train_step(module, opt, x.to(torch.bfloat16), y)
        d_k = 0.0 if k == 1 else decay
        for n, p in module.named_parameters():
            exact[n] += (1.0 - d_k) * (p.detach().double() - exact[n])
        averaging.ema_update(module, d, ScheduleChange(decay=decay))
    for n, e in exact.items():
        got = d.entries[n]
        assert got.dtype == torch.float32
        # each update rounds once to float32 (half an ulp, 2**-24 relative); 50 of them at most
        bound = STEPS * 2.0**-24 * e.abs().max().item()
        assert (got.double() - e).abs().max().item() <= bound, n


def test_a_bfloat16_ema_stalls_where_a_float32_one_moves() -> None:
    """With decay 0.999 an update moves the average by 0.001 of its distance to the weights. Near 1.0,
    bfloat16 values are 2**-7 apart, so any move under 2**-8 rounds away: weights a whole unit away
    leave a bfloat16 average exactly where it started, step after step."""
    module = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.fill_(2.0)
    low = TensorDict({"weight": torch.ones(1, 4, dtype=torch.bfloat16)})
    high = TensorDict({"weight": torch.ones(1, 4, dtype=torch.float32)})
    for _ in range(100):
        averaging.ema_update(module, low, ScheduleChange(decay=0.999), step=1000)
        averaging.ema_update(module, high, ScheduleChange(decay=0.999), step=1000)
    assert torch.equal(low.entries["weight"], torch.ones(1, 4, dtype=torch.bfloat16))  # never moved
    moved = 2.0 - 0.999**100  # 1 + (1 - 0.999**100) * (2 - 1)
    assert abs(high.entries["weight"][0, 0].item() - moved) < 1e-5
    assert high.entries["weight"][0, 0].item() > 1.09


# -- buffers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [BufferMode.AVERAGE, BufferMode.COPY], ids=["average", "copy"])
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_integer_buffers_are_copied_never_averaged(mode: BufferMode, kind: str) -> None:
    module = net()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    d = averaging.copy_parameters(module, buffers=True)
    assert d.entries["b.num_batches_tracked"].dtype == torch.int64
    for x, y in batches(n=7):
        train_step(module, opt, x, y)
        if kind == "swa":
            averaging.average_parameters(module, d, mode)
        else:
            averaging.ema_update(module, d, ScheduleChange(decay=0.9), buffers=mode)
    assert d.entries["b.num_batches_tracked"].dtype == torch.int64
    assert d.entries["b.num_batches_tracked"].item() == 7 == module.b.num_batches_tracked.item()
    running = d.entries["b.running_mean"]
    if mode is BufferMode.COPY:
        assert torch.equal(running, module.b.running_mean)
    else:
        assert not torch.equal(running, module.b.running_mean)  # averaged: it lags the module's


def test_average_with_buffers_averages_floating_buffers_as_averaged_model_does() -> None:
    module = net()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    oracle = AveragedModel(module, use_buffers=True)
    oracle.update_parameters(module)
    d = averaging.copy_parameters(module, buffers=True)
    for x, y in batches(n=10):
        train_step(module, opt, x, y)
        oracle.update_parameters(module)
        averaging.average_parameters(module, d, BufferMode.AVERAGE)
    assert_matches(d, floating_state(oracle.module))


def test_buffers_left_out_are_left_alone() -> None:
    module = net()
    d = averaging.copy_parameters(module, buffers=True)
    stale = d.entries["b.running_mean"].clone()
    train_step(module, torch.optim.SGD(module.parameters(), lr=0.1), *batches(n=1)[0])
    averaging.ema_update(module, d, ScheduleChange(decay=0.5))
    averaging.average_parameters(module, d)
    assert torch.equal(d.entries["b.running_mean"], stale)


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_a_missing_buffer_is_refused_and_nothing_changes(kind: str) -> None:
    module = net()
    d = averaging.copy_parameters(module, buffers=True)
    del d.entries["b.num_batches_tracked"]  # the last buffer: a loop that changed as it went would have moved all
    d.entries[COUNT_KEY] = torch.tensor(3.0, dtype=torch.float64)
    averaging.ema_update(module, d, ScheduleChange(decay=0.5))
    state = d.ema
    train_step(module, torch.optim.SGD(module.parameters(), lr=0.1), *batches(n=1)[0])
    before = {k: v.clone() for k, v in d.entries.items()}
    with pytest.raises(InvalidArgument, match="buffer 'b.num_batches_tracked' not found.*copyparms"):
        if kind == "swa":
            averaging.average_parameters(module, d, BufferMode.COPY)
        else:
            averaging.ema_update(module, d, buffers=BufferMode.COPY)
    assert list(d.entries) == list(before) and d.ema == state
    assert all(torch.equal(d.entries[k], v) for k, v in before.items())


# -- copies with a dtype and buffers ---------------------------------------------------------------


def test_copy_with_a_dtype_converts_floating_tensors_and_keeps_integers() -> None:
    module = net().to(torch.bfloat16)
    d = averaging.copy_parameters(module, torch.float32, buffers=True)
    assert list(d.entries) == [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        copy_ = d.entries[name]
        want = torch.float32 if t.is_floating_point() else t.dtype
        assert copy_.dtype == want and torch.equal(copy_, t.detach().to(want)), name
        assert copy_.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_copy_to_a_dtype_that_is_not_floating_is_refused(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidArgument, match="converts to a floating dtype"):
        averaging.copy_parameters(net(), dtype)


# -- dictionaries as the source --------------------------------------------------------------------


def test_a_dictionary_source_averages_floating_entries_and_copies_the_rest() -> None:
    target = TensorDict({"w": torch.zeros(3), "n": torch.tensor(0), "other": torch.full((2,), 5.0)})
    source = TensorDict({"w": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(7),
                         COUNT_KEY: torch.tensor(9.0, dtype=torch.float64)})
    assert averaging.ema_update(source, target, ScheduleChange(decay=0.75), step=5) == (5, 0.75)
    assert torch.equal(target.entries["w"], torch.full((3,), 0.25))
    assert target.entries["n"].item() == 7 and target.entries["n"].dtype == torch.int64
    assert torch.equal(target.entries["other"], torch.full((2,), 5.0))  # not in the source: left alone
    assert averaging.average_parameters(source, target) == 2  # the source's '.n' is not folded in
    assert torch.equal(target.entries["w"], torch.full((3,), 0.625))


def test_a_dictionary_source_with_buffers_or_an_unknown_entry_is_refused() -> None:
    target = TensorDict({"w": torch.zeros(3)})
    with pytest.raises(InvalidArgument, match="a dictionary source has no buffers"):
        averaging.ema_update(TensorDict({"w": torch.ones(3)}), target, buffers=BufferMode.AVERAGE)
    with pytest.raises(InvalidArgument, match="entry 'x' of the source dictionary not found"):
        averaging.average_parameters(TensorDict({"w": torch.ones(3), "x": torch.ones(1)}), target)
    assert torch.equal(target.entries["w"], torch.zeros(3)) and COUNT_KEY not in target.entries and target.ema is None


# -- what an update holds at its peak ---------------------------------------------------------------


def test_an_update_holds_one_cast_value_at_a_time_and_none_for_a_copy() -> None:
    module = net().to(torch.bfloat16)  # a.weight, 8 x 6, is the largest parameter
    d = averaging.copy_parameters(module, torch.float32)
    first = averaging.prepare_ema(module, d, ScheduleChange(decay=0.9))
    assert first.weight == 1.0 and first.cast_bytes() == {}
    averaging.apply(first, d)
    second = averaging.prepare_ema(module, d)
    assert second.cast_bytes() == {"cpu": 8 * 6 * 4}
    same = averaging.copy_parameters(module)
    averaging.ema_update(module, same)
    assert averaging.prepare_ema(module, same).cast_bytes() == {}
    assert copy.copy(second.ema) == EmaState(EmaSchedule(decay=0.9), 2)
