"""domain.outer in process: the outer step against the formulas of FedAvg, FedAvgM (as Flower defines
it), DiLoCo's Nesterov outer step, and torch.optim.Adam stepped by hand on the same pseudo-gradients.

Every case runs several rounds, so optimizer state (momentum, moments) carries over as it must. The
gradients the parameters held before are put back; a refused call changes nothing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from weightavg_server.domain import footprint, optimizers, outer
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.errors import InvalidArgument

TOL = 1e-6


def module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def averages(m: torch.nn.Module, rounds: int, seed: int = 1) -> list[TensorDict]:
    """A round's average: the global weights moved by some client drift (fixed in advance per round)."""
    g = torch.Generator().manual_seed(seed)
    return [
        TensorDict({n: 0.1 * torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}) for _ in range(rounds)
    ]


def drifted(m: torch.nn.Module, drift: TensorDict) -> TensorDict:
    return TensorDict({n: p.detach() + drift.entries[n] for n, p in m.named_parameters()})


def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = TOL) -> bool:
    return a.keys() == b.keys() and all(float((a[n] - b[n]).abs().max()) <= tol for n in a)


def test_sgd_with_lr_1_puts_the_average_in_place() -> None:
    m = module()
    opt = optimizers.create_optimizer("sgd", m, (1.0,))
    avg = drifted(m, averages(m, 1)[0])
    outer.outer_step(opt, avg)
    assert close(weights(m), {n: t for n, t in avg.entries.items()})


def test_momentum_sgd_is_fedavgm_over_several_rounds() -> None:
    """FedAvgM as in Flower (server_learning_rate eta, server_momentum beta): g = w - w_avg; m = g in
    the first round, then m = beta m + g; w = w - eta m."""
    m = module()
    eta, beta = 0.8, 0.6
    opt = optimizers.create_optimizer("sgd", m, (eta, beta))
    w = weights(m)
    momentum: dict[str, torch.Tensor] = {}
    for drift in averages(m, 4):
        avg = drifted(m, drift)
        g = {n: w[n] - avg.entries[n] for n in w}
        momentum = {n: g[n] if not momentum else beta * momentum[n] + g[n] for n in w}
        w = {n: w[n] - eta * momentum[n] for n in w}
        outer.outer_step(opt, avg)
        assert close(weights(m), w)


def test_nesterov_sgd_is_dilocos_outer_step() -> None:
    """DiLoCo: pseudo-gradient g = global - average, Nesterov momentum mu: b = mu b + g (b = g at
    first), w = w - lr (g + mu b)."""
    m = module(3)
    lr, mu = 0.7, 0.9
    opt = optimizers.create_optimizer("sgd", m, (lr, mu), (("nesterov", True),))
    w = weights(m)
    buf: dict[str, torch.Tensor] = {}
    for drift in averages(m, 5, seed=4):
        avg = drifted(m, drift)
        g = {n: w[n] - avg.entries[n] for n in w}
        buf = {n: g[n] if not buf else mu * buf[n] + g[n] for n in w}
        w = {n: w[n] - lr * (g[n] + mu * buf[n]) for n in w}
        norm = outer.outer_step(opt, avg)
        assert close(weights(m), w)
        assert math.isclose(norm, math.sqrt(sum(float((v**2).sum()) for v in g.values())), rel_tol=1e-5)


def test_the_norm_of_a_2_23_element_pseudo_gradient_is_as_accurate_as_float64() -> None:
    """A 4096x2048 layer: the norm is that of the float32 pseudo-gradient taken in float64, within
    1e-6 relative (each row's norm is rounded to float32, 6e-8). torch's CPU float32 vector_norm of
    the whole tensor was off by 2e-4."""
    torch.manual_seed(8)
    m = torch.nn.Linear(2048, 4096, bias=False)
    avg = TensorDict({"weight": m.weight.detach() + 0.01 * torch.randn(4096, 2048) + 0.003})
    g = (m.weight.detach() - avg.entries["weight"]).double()
    want = float(g.square().sum().sqrt())
    norm = outer.outer_step(optimizers.create_optimizer("sgd", m, (1.0,)), avg)
    assert math.isclose(norm, want, rel_tol=1e-6), (norm, want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_sum_of_squares_reads_any_dense_layout_in_rows(layout: str) -> None:
    """The rows are taken in memory order, so the sum is the same whatever the layout (and over the
    partial last row): 3*5*7*41 = 4305 elements, one whole row of 4096 and a rest of 209. Within
    1e-6 relative: each row's norm is rounded to float32."""
    g = torch.Generator().manual_seed(9)
    t = torch.randn(3, 5, 7, 41, generator=g)
    laid = {"contiguous": t, "channels_last": t.to(memory_format=torch.channels_last), "transposed": t.transpose(1, 3)}
    want = float(t.double().square().sum())
    assert math.isclose(outer.sum_of_squares(laid[layout]), want, rel_tol=1e-6)


def test_adam_steps_as_torch_adam_does_on_the_pseudo_gradient() -> None:
    m = module(5)
    twin = copy.deepcopy(m)
    opt = optimizers.create_optimizer("adam", m, (0.05, 0.9, 0.99, 1e-9))
    reference = torch.optim.Adam(twin.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-9)
    for drift in averages(m, 4, seed=6):
        avg = drifted(m, drift)
        for n, p in twin.named_parameters():
            p.grad = p.detach() - avg.entries[n]
        reference.step()
        outer.outer_step(opt, avg)
        assert close(weights(m), weights(twin))


def ones(dtype: torch.dtype) -> torch.nn.Module:
    m = torch.nn.Linear(1, 4).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    return m


def test_a_bfloat16_model_moves_to_a_float32_average_within_half_its_ulp() -> None:
    """1.003 lies within half a bfloat16 ulp (2^-8) of 1.0: rounding the average to bfloat16 before
    subtracting gave a gradient of exactly 0, and 20 Nesterov rounds left the weights at 1.0. torch,
    subtracting in float32 and casting the gradient once, reaches 1.0078125 (and so must the server,
    bit for bit); the norm is that of the float32 difference. The bias's average is one float32 number
    (0-dim), which torch's own promotion would round to bfloat16: the promoted dtype is taken from the
    dtypes alone, so it moves the same way."""
    m, twin = ones(torch.bfloat16), ones(torch.bfloat16)
    avg = TensorDict({"weight": torch.full((4, 1), 1.003), "bias": torch.tensor(1.003)})
    full = {"weight": avg.entries["weight"], "bias": torch.full((4,), 1.003)}
    opt = optimizers.create_optimizer("sgd", m, (0.7, 0.9), (("nesterov", True),))
    reference = torch.optim.SGD(twin.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(20):
        want = math.sqrt(sum(float((p.detach().double() - full[n]).square().sum()) for n, p in twin.named_parameters()))
        for n, p in twin.named_parameters():
            p.grad = (p.detach() - full[n]).to(p.dtype)
        reference.step()
        norm = outer.outer_step(opt, avg)
        assert math.isclose(norm, want, rel_tol=1e-6), (norm, want)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin.parameters()))
    assert m.weight.flatten().tolist() == [1.0078125] * 4


@pytest.mark.parametrize(("model", "average"), [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
], ids=str)
def test_the_pseudo_gradient_is_taken_in_the_promoted_dtype_as_torch_takes_it(
    model: torch.dtype, average: torch.dtype
) -> None:
    """Bit for bit what torch's DiLoCo step does with `(p - average)` in the dtype the two promote to,
    cast once into the gradient, over several rounds of drift (float32 against float32 as before)."""
    m = module(7).to(model)
    twin = copy.deepcopy(m)
    opt = optimizers.create_optimizer("sgd", m, (0.7, 0.9), (("nesterov", True),))
    reference = torch.optim.SGD(twin.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for drift in averages(m, 4, seed=8):
        avg = TensorDict({n: t.to(average) for n, t in drifted(twin, drift).entries.items()})
        for n, p in twin.named_parameters():
            wide = torch.promote_types(p.dtype, average)
            p.grad = (p.detach().to(wide) - avg.entries[n].to(wide)).to(p.dtype)
        reference.step()
        outer.outer_step(opt, avg)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin.parameters()))


@pytest.mark.parametrize(("model", "average", "optimizer", "extra"), [
    # the float32 difference of the 4x5 weight, and its norm's scalars (outer.sum_of_squares_bytes: 48)
    (torch.bfloat16, torch.float32, "sgd", 4 * 20 + 48),
    # Adam's two moments and steps, and its step's temporaries (two of the weight's size), are larger
    (torch.bfloat16, torch.float32, "adam", 2 * 2 * 24 + 2 * 4 + 2 * 2 * 20),
    (torch.float16, torch.bfloat16, "sgd", 4 * 20 + 4 * 20 + 48),  # float32 difference, torch's float32 copy of the entry
    (torch.float32, torch.float32, "sgd", 48),  # the difference is the gradient
], ids=["bf16 sgd", "bf16 adam", "f16-bf16 sgd", "f32 sgd"])
def test_a_wider_average_reserves_one_difference_beside_the_gradients(
    model: torch.dtype, average: torch.dtype, optimizer: str, extra: int
) -> None:
    m = torch.nn.Linear(5, 4).to(model)
    avg = TensorDict({n: p.detach().to(average) for n, p in m.named_parameters()})
    opt = optimizers.create_optimizer(optimizer, m)
    grads = model.itemsize * 24
    assert footprint.outer_step_bytes(opt, avg) == {"cpu": grads + extra}


def test_the_gradients_held_before_are_put_back() -> None:
    m = module()
    first, second = list(m.parameters())[:2]
    kept = torch.full_like(first, 3.0)
    first.grad = kept
    opt = optimizers.create_optimizer("sgd", m, (0.5,))
    outer.outer_step(opt, drifted(m, averages(m, 1)[0]))
    assert first.grad is kept and second.grad is None


def test_frozen_parameters_are_neither_needed_nor_moved() -> None:
    m = module()
    frozen = m[0].bias
    frozen.requires_grad_(False)
    opt = optimizers.create_optimizer("sgd", m, (1.0,))
    avg = drifted(m, averages(m, 1)[0])
    del avg.entries["0.bias"]
    before = frozen.detach().clone()
    outer.outer_step(opt, avg)
    assert torch.equal(frozen, before)
    assert close({"2.weight": m[2].weight.detach()}, {"2.weight": avg.entries["2.weight"]})
    squares = outer.sum_of_squares_bytes(4 * 5, torch.float32)  # the norm's temporaries, one gradient at a time
    assert footprint.outer_step_bytes(opt) == {"cpu": 4 * (4 * 5 + 3 * 4 + 3) + squares}  # SGD without momentum: no state


def test_the_first_step_reserves_the_pseudo_gradients_and_the_optimizer_state() -> None:
    m = module()
    params = 4 * (4 * 5 + 4 + 3 * 4 + 3)
    adam = optimizers.create_optimizer("adam", m)
    temporaries = 2 * 4 * 4 * 5  # Adam's root of its second moment, then divided: the largest parameter's twice
    squares = outer.sum_of_squares_bytes(4 * 5, torch.float32)
    assert squares < temporaries
    assert footprint.outer_step_bytes(adam) == {"cpu": params + 2 * params + 4 * 4 + temporaries}  # grads, moments, steps
    outer.outer_step(adam, drifted(m, averages(m, 1)[0]))
    assert footprint.outer_step_bytes(adam) == {"cpu": params + temporaries}  # the state exists now


@pytest.mark.parametrize(("dtype", "average_dtype"), [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float32),
    (torch.float16, torch.bfloat16),
])
@pytest.mark.parametrize(("name", "options"), [
    ("sgd", ()), ("sgd", (("momentum", 0.9), ("nesterov", True))), ("adam", (("eps", 1e-3),)),
    ("rmsprop", (("centered", True), ("eps", 1e-3))),
    ("fedadam", (("tau", 1e-2),)), ("fedyogi", ()), ("fedadagrad", (("tau", 1e-2),)),  # domain/fedopt.py
])
def test_an_outer_step_allocates_no_more_than_it_reserves(
    name: str, options: tuple[tuple[str, float | bool], ...], dtype: torch.dtype, average_dtype: torch.dtype
) -> None:
    """Its check, its pseudo-gradients and their norms, and the optimizer's step, over several rounds,
    within what `footprint.outer_step_bytes` reserves. An Adam step allocated 6,520 bytes where 3,968
    were reserved: its temporaries, the check's |x| and masks, the norms' rows (found by review)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).to(dtype)
    opt = optimizers.create_optimizer(name, m, (0.5,), options)
    for _ in range(3):
        avg = TensorDict({n: (p.detach() + 0.01).to(average_dtype) for n, p in m.named_parameters()})
        outer.check_average(opt, avg)
        reserved = footprint.outer_step_bytes(opt, avg)["cpu"]
        meter = footprint._PeakBytes()
        with meter:
            outer.check_average(opt, avg)
            outer.outer_step(opt, avg, checked=True)
        assert meter.peak <= reserved <= meter.peak + 300 * 40 * 8, (reserved, meter.peak)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.entries.pop("2.bias"), "no entry '2.bias'"),
    (lambda d: d.entries.__setitem__("2.bias", torch.zeros(3, dtype=torch.int64)), "holds int64"),
    (lambda d: d.entries.__setitem__("2.bias", torch.zeros(4)), r"size of tensor a \(3\)"),
    (lambda d: d.entries.__setitem__("2.bias", torch.zeros(2, 3)), "does not fit parameter of shape"),
    (lambda d: d.entries["0.weight"].__setitem__((1, 2), float("nan")), "'0.weight' of the average holds NaN"),
    (lambda d: d.entries["2.bias"].__setitem__(0, float("-inf")), "'2.bias' of the average holds NaN or infinite"),
])
def test_an_average_that_does_not_fit_is_refused_and_changes_nothing(change, message) -> None:  # type: ignore[no-untyped-def]
    m = module()
    opt = optimizers.create_optimizer("sgd", m, (1.0, 0.9))
    avg = drifted(m, averages(m, 1)[0])
    change(avg)
    before = weights(m)
    with pytest.raises(InvalidArgument, match=message):
        outer.outer_step(opt, avg)
    assert close(weights(m), before, tol=0.0)
    assert not opt.optim.state and all(p.grad is None for p in m.parameters())


def test_a_broadcasting_average_entry_is_accepted() -> None:
    m = module()
    opt = optimizers.create_optimizer("sgd", m, (1.0,))
    avg = drifted(m, averages(m, 1)[0])
    avg.entries["2.bias"] = torch.tensor([0.25])
    outer.outer_step(opt, avg)
    assert torch.equal(m[2].bias.detach(), torch.full((3,), 0.25))
