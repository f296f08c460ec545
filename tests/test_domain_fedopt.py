"""domain.fedopt in process: FedAdam, FedYogi and FedAdagrad as outer steps, against the formulas of
Flower's strategies (fedadam.py, fedyogi.py, fedadagrad.py) transcribed here in float64 numpy.

flwr itself does not install next to this project's pins (it wants an older protobuf), so the
oracle is the strategies' formulas written out once (tests/fedopt_oracle.py), plus rounds worked by
hand that pin FedAdam's bias correction of round r by r + 1 and each second moment's rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightavg_server.domain import optimizers, outer
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.errors import InvalidArgument

from fedopt_oracle import FLOWER_DEFAULTS, flower_rounds

def module(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


def drawn_rounds(m: torch.nn.Module, count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Each round's average: the starting weights moved by a drift drawn per round, some rounds
    moving back (so Yogi's sign and Adam's moments see both directions)."""
    rng = np.random.default_rng(seed)
    start = {n: p.detach().double().numpy() for n, p in m.named_parameters()}
    return [{n: a + 0.2 * rng.standard_normal(a.shape) for n, a in start.items()} for _ in range(count)]


def step_all(kind: str, m: torch.nn.Module, rounds: list[dict[str, np.ndarray]], options: dict[str, float]) -> None:
    names = ("lr", "tau") if kind == "fedadagrad" else ("lr", "beta1", "beta2", "tau")
    opt = optimizers.create_optimizer(kind, m, kwargs=tuple((k, options[k]) for k in names))
    dtype = next(m.parameters()).dtype
    for average in rounds:
        outer.outer_step(opt, TensorDict({n: torch.from_numpy(a).to(dtype) for n, a in average.items()}))


@pytest.mark.parametrize("kind", list(FLOWER_DEFAULTS))
@pytest.mark.parametrize("custom", [False, True], ids=["flower defaults", "other settings"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_six_rounds_give_flowers_weights(kind: str, custom: bool, dtype: torch.dtype, tol: float) -> None:
    options = dict(FLOWER_DEFAULTS[kind])
    if custom:
        options.update(lr=0.3, tau=0.05, **({} if kind == "fedadagrad" else {"beta1": 0.5, "beta2": 0.7}))
    m = module(dtype)
    start = {n: p.detach().double().numpy().copy() for n, p in m.named_parameters()}
    rounds = drawn_rounds(m, 6)
    step_all(kind, m, rounds, options)
    want = flower_rounds(kind, start, rounds, **options)
    for n, p in m.named_parameters():
        moved = np.abs(want[n] - start[n]).max()
        assert moved > 0.01  # the rounds moved the weights, so agreeing means something
        np.testing.assert_allclose(p.detach().double().numpy(), want[n], rtol=0, atol=tol * max(1.0, moved))


def test_fedadams_first_round_corrects_its_bias_with_round_two() -> None:
    """One weight at 0, an average of 1, Flower's defaults: delta 1, m = 0.1, v = 0.01, and the rate
    0.1 sqrt(1 - 0.99^2) / (1 - 0.9^2) (round 1 corrected with r + 1 = 2, as Flower's server_round + 1);
    torch's Adam would take sqrt(1 - 0.99) / (1 - 0.9) there."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = optimizers.create_optimizer("fedadam", _holder(p))
    outer.outer_step(opt, TensorDict({"p": torch.ones(1, dtype=torch.float64)}))
    rate = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert float(p.detach()) == pytest.approx(rate * 0.1 / (0.1 + 1e-3), rel=1e-14)
    assert float(p.detach()) == pytest.approx(0.0735109, rel=1e-6)


def test_fedyogis_second_moment_moves_towards_the_square_by_a_fixed_step() -> None:
    """v starts at 0 and moves (1 - beta2) g^2 towards g^2 each round (Adam's moves a share of the
    way): gradients of 2 (g^2 = 4) with beta2 0.5 give v = 2, 4, 4 (Adam's 2, 3, 3.5), then a
    gradient of 1 gives 3.5 (Adam's 2.25)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = optimizers.create_optimizer("fedyogi", _holder(p), (0.0, 0.0, 0.5))  # lr 0: only the state moves
    seen = []
    for average in (-2.0, -2.0, -2.0, -1.0):  # g = p - average = 2, 2, 2, then 1
        outer.outer_step(opt, TensorDict({"p": torch.tensor([average], dtype=torch.float64)}))
        seen.append(float(opt.optim.state[p]["exp_avg_sq"]))
    assert seen == [2.0, 4.0, 4.0, 3.5]


def test_fedadagrad_keeps_no_first_moment_and_sums_the_squares() -> None:
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = optimizers.create_optimizer("fedadagrad", _holder(p), (0.0,))
    for average in ([-1.0, 2.0], [-3.0, 0.0]):
        outer.outer_step(opt, TensorDict({"p": torch.tensor(average, dtype=torch.float64)}))
    state = opt.optim.state[p]
    assert set(state) == {"step", "exp_avg_sq"} and float(state["step"]) == 2.0
    assert state["exp_avg_sq"].tolist() == [10.0, 4.0]


def _holder(p: torch.nn.Parameter) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.register_parameter("p", p)
    return holder


@pytest.mark.parametrize(("kind", "args", "kwargs", "message"), [
    ("fedadam", (), (("tau", 0.0),), "'tau' must be positive"),
    ("fedyogi", (0.01, 1.0), (), "'beta1' must be in \\[0, 1\\)"),
    ("fedadam", (), (("beta2", -0.1),), "'beta2' must be in \\[0, 1\\)"),
    ("fedadagrad", (-0.1,), (), "'lr' must be non-negative"),
    ("fedadagrad", (), (("beta1", 0.9),), "beta1"),
])
def test_bad_settings_are_refused(kind: str, args: tuple[float, ...], kwargs: tuple[tuple[str, float], ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        optimizers.create_optimizer(kind, module(torch.float32), args, kwargs)


def test_a_tau_that_rounds_to_zero_in_the_parameters_dtype_is_refused() -> None:
    """tau 1e-9 (the older Flower classes' default for FedAdam) is 0 in float16: a parameter whose
    round moved it by exactly 0 would become NaN (0/0) at its first step."""
    with pytest.raises(InvalidArgument, match="option 'tau' is 0 in the parameters' dtype float16"):
        optimizers.create_optimizer("fedadam", module(torch.float16), kwargs=(("tau", 1e-9),))
    optimizers.create_optimizer("fedadam", module(torch.float16))  # the default 1e-3 is not
