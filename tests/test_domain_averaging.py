"""domain.averaging in process: copy_parameters, load_parameters and the running average
average_parameters, checked against torch.optim.swa_utils.AveragedModel and against PyTorch's own
broadcasting and casting rules. Every refused call must leave every entry, '.n' included, as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode

from weightavg_server.domain import averaging
from weightavg_server.domain.dictionaries import COUNT_KEY, TensorDict
from weightavg_server.domain.errors import InvalidArgument


def net(seed: int = 0) -> torch.nn.Module:
    """Nested parameters (a.weight, a.bias, c.weight) and a batchnorm with buffers and parameters."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(5, 4), b=torch.nn.BatchNorm1d(4), r=torch.nn.ReLU(), c=torch.nn.Linear(4, 3, bias=False),
    ))


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter somewhere new, as a training step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def full_copy(d: TensorDict) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in d.entries.items()}


def assert_same(d: TensorDict, before: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, and every tensor equal in value, dtype, shape and device."""
    assert list(d.entries) == list(before)
    for name, t in before.items():
        now = d.entries[name]
        torch.testing.assert_close(now, t, rtol=0, atol=0, equal_nan=True, msg=name)


# -- copy_parameters ------------------------------------------------------------------------------


def test_copy_parameters_clones_every_parameter_and_no_buffer() -> None:
    module = net()
    d = averaging.copy_parameters(module)
    assert not d.live
    assert list(d.entries) == ["a.weight", "a.bias", "b.weight", "b.bias", "c.weight"]
    for name, p in module.named_parameters():
        copy = d.entries[name]
        assert torch.equal(copy, p) and copy.dtype == p.dtype and copy.device == p.device
        assert not copy.requires_grad
        assert copy.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


def test_copy_parameters_is_independent_of_the_module_both_ways() -> None:
    module = net()
    d = averaging.copy_parameters(module)
    saved = full_copy(d)
    perturb(module, 1)
    assert_same(d, saved)
    weight_before = module.a.weight.detach().clone()
    d.entries["a.weight"].fill_(7.0)
    assert torch.equal(module.a.weight, weight_before)


def test_copy_parameters_keeps_dtype_and_includes_frozen_parameters() -> None:
    module = torch.nn.Linear(3, 2).double()
    module.bias.requires_grad_(False)
    d = averaging.copy_parameters(module)
    assert list(d.entries) == ["weight", "bias"]
    assert all(t.dtype == torch.float64 for t in d.entries.values())


# -- load_parameters ------------------------------------------------------------------------------


def test_load_parameters_reports_each_parameter_in_module_order_and_ignores_extra_keys() -> None:
    module = torch.nn.Linear(4, 2)
    bias = module.bias.detach().clone()
    d = TensorDict({"other": torch.tensor(2), "weight": torch.tensor(1), COUNT_KEY: torch.tensor(3.0, dtype=torch.float64)})
    result = averaging.load_parameters(module, d)
    assert list(result.items()) == [("weight", True), ("bias", False)]
    assert torch.equal(module.weight, torch.ones(2, 4))  # a long scalar broadcast and converted
    assert torch.equal(module.bias, bias)


def test_load_parameters_copies_values_without_gradient_history() -> None:
    module = net()
    source = net(seed=5)
    d = averaging.copy_parameters(source)
    assert averaging.load_parameters(module, d) == dict.fromkeys(d.entries, True)
    for name, p in module.named_parameters():
        assert torch.equal(p, d.entries[name])
        assert p.is_leaf and p.requires_grad and p.grad_fn is None
    d.entries["a.weight"].fill_(3.0)  # copied, not shared
    assert not torch.equal(module.a.weight, d.entries["a.weight"])


@pytest.mark.parametrize(
    "value, expected",
    [
        (torch.tensor(1.5), torch.full((2, 4), 1.5)),
        (torch.arange(4.0).reshape(1, 4), torch.arange(4.0).expand(2, 4)),
        (torch.arange(4.0), torch.arange(4.0).expand(2, 4)),
        (torch.ones(2, 4, dtype=torch.int32), torch.ones(2, 4)),
        (torch.full((2, 4), 0.5, dtype=torch.float64), torch.full((2, 4), 0.5)),
    ],
    ids=["scalar", "row", "vector", "int32", "float64"],
)
def test_load_parameters_broadcasts_and_converts_like_copy_(value: torch.Tensor, expected: torch.Tensor) -> None:
    module = torch.nn.Linear(4, 2)
    assert averaging.load_parameters(module, TensorDict({"weight": value}))["weight"]
    assert module.weight.dtype == torch.float32
    assert torch.equal(module.weight, expected)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(2, 3), r"The size of tensor a \(4\) must match the size of tensor b \(3\) at non-singleton dimension 1"),
        (torch.ones(3, 2, 4), r"output with shape \[2, 4\] doesn't match the broadcast shape \[3, 2, 4\]"),
    ],
    ids=["wrong-width", "extra-dimension"],
)
def test_load_parameters_is_all_or_nothing(bad: torch.Tensor, message: str) -> None:
    """The bad entry is the last parameter, so a loop that copied as it went would have changed weight."""
    module = torch.nn.Linear(4, 2)
    module.register_parameter("extra", torch.nn.Parameter(torch.zeros(2, 4)))
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    d = TensorDict({"weight": torch.full((2, 4), 9.0), "bias": torch.full((2,), 9.0), "extra": bad})
    with pytest.raises(InvalidArgument, match=message) as info:
        averaging.load_parameters(module, d)
    assert "parameter 'extra'" in str(info.value) and info.value.code == "INVALID_ARGUMENT"
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name


def test_load_parameters_from_an_empty_dictionary_copies_nothing() -> None:
    module = torch.nn.Linear(2, 2)
    before = module.weight.detach().clone()
    assert averaging.load_parameters(module, TensorDict()) == {"weight": False, "bias": False}
    assert torch.equal(module.weight, before)


# -- average_parameters: against AveragedModel ----------------------------------------------------


def test_average_parameters_equals_torch_averaged_model_over_many_updates() -> None:
    module = net()
    swa = AveragedModel(module)  # default: the equal-weight running mean
    swa.update_parameters(module)  # its first update copies, as copy_parameters does
    d = averaging.copy_parameters(module)
    assert COUNT_KEY not in d.entries
    for step in range(1, 9):
        perturb(module, seed=step)
        swa.update_parameters(module)
        assert averaging.average_parameters(module, d) == step + 1
        assert int(swa.n_averaged) == step + 1
        assert d.entries[COUNT_KEY].item() == step + 1
    averaged = dict(swa.module.named_parameters())
    assert sorted(averaged) == sorted(k for k in d.entries if k != COUNT_KEY)
    for name, value in averaged.items():
        torch.testing.assert_close(d.entries[name], value.detach(), rtol=0, atol=1e-6)


def test_average_parameters_reproduces_the_reference_walk_through() -> None:
    """swa.rst: weight -0.4876026 -0.3645594 averaged with 10 gives 4.756198 4.81772 and count 2; ten
    more calls give count 12 and 9.126033."""
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[-0.4876026, -0.3645594]]))
    d = averaging.copy_parameters(module)
    with torch.no_grad():
        module.weight.fill_(10.0)
    assert averaging.average_parameters(module, d) == 2
    torch.testing.assert_close(d.entries["weight"], torch.tensor([[4.756198, 4.81772]]), rtol=0, atol=1e-5)
    for _ in range(10):
        count = averaging.average_parameters(module, d)
    assert count == 12
    assert d.entries[COUNT_KEY].dtype == torch.float64 and d.entries[COUNT_KEY].item() == 12.0
    torch.testing.assert_close(d.entries["weight"][0, 0], torch.tensor(9.126033), rtol=0, atol=1e-5)


def test_average_parameters_never_touches_buffers_or_the_module() -> None:
    module = net()
    d = averaging.copy_parameters(module)
    perturb(module, 3)
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    averaging.average_parameters(module, d)
    assert not any(name in d.entries for name in buffers)
    assert all(torch.equal(p, params[n]) for n, p in module.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in module.named_buffers())


# -- the count '.n' -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, weight_of_new, returned",
    [(None, 1 / 2, 2), (1.0, 1 / 2, 2), (3.0, 1 / 4, 4), (0.0, 1.0, 1), (2.0**53 - 1, 2.0**-53, 2**53)],
    ids=["absent-is-one", "one", "three", "zero", "largest"],
)
def test_count_weights_the_new_sample(count: float | None, weight_of_new: float, returned: int) -> None:
    module = torch.nn.Linear(3, 2).double()
    d = TensorDict({"weight": torch.zeros(2, 3, dtype=torch.float64), "bias": torch.zeros(2, dtype=torch.float64)})
    if count is not None:
        d.entries[COUNT_KEY] = torch.tensor(count, dtype=torch.float64)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.fill_(-2.0)
    assert averaging.average_parameters(module, d) == returned
    n = d.entries[COUNT_KEY]
    assert n.dim() == 0 and n.dtype == torch.float64 and n.device.type == "cpu"
    assert n.item() == (1.0 if count is None else count) + 1
    torch.testing.assert_close(d.entries["weight"], torch.full((2, 3), weight_of_new, dtype=torch.float64))
    torch.testing.assert_close(d.entries["bias"], torch.full((2,), -2.0 * weight_of_new, dtype=torch.float64))


@pytest.mark.parametrize(
    "count",
    [
        torch.tensor(2.0, dtype=torch.float32),
        torch.tensor(2, dtype=torch.int64),
        torch.tensor([2.0], dtype=torch.float64),
        torch.tensor(-1.0, dtype=torch.float64),
        torch.tensor(float("nan"), dtype=torch.float64),
        torch.tensor(float("inf"), dtype=torch.float64),
        torch.tensor(2.0**53, dtype=torch.float64),
    ],
    ids=["float32", "int64", "one-element-vector", "negative", "nan", "inf", "too-large"],
)
def test_bad_count_is_refused_and_nothing_changes(count: torch.Tensor) -> None:
    module = net()
    d = averaging.copy_parameters(module)
    perturb(module, 2)
    d.entries[COUNT_KEY] = count
    before = full_copy(d)
    with pytest.raises(InvalidArgument, match=r"'\.n' must be"):
        averaging.average_parameters(module, d)
    assert_same(d, before)


def test_a_count_the_average_made_is_written_in_place_and_a_count_set_from_outside_is_replaced() -> None:
    """The count tensor an average made is its own: later averages write into it (no new storage
    for the store to walk). A '.n' set from outside may share memory with what it came from, so
    the next average replaces it and leaves it as it was."""
    module = net()
    d = averaging.copy_parameters(module)
    assert not averaging.prepare_average(module, d).in_place  # no count yet: a new one
    assert averaging.average_parameters(module, d) == 2
    made = d.entries[COUNT_KEY]
    for expected in (3, 4):
        assert averaging.prepare_average(module, d).in_place
        assert averaging.average_parameters(module, d) == expected
        assert d.entries[COUNT_KEY] is made and made.item() == expected
    assert averaging.prepare_ema(module, d).in_place  # an EMA replaces no tensor
    made.fill_(10.0)  # the count is read from the tensor's memory each time, never kept aside
    assert averaging.average_parameters(module, d) == 11 and made.item() == 11.0
    made.fill_(-1.0)
    before = full_copy(d)
    with pytest.raises(InvalidArgument, match=r"'\.n' must be a count"):
        averaging.average_parameters(module, d)
    assert_same(d, before)
    made.fill_(4.0)

    given = torch.tensor(7.0, dtype=torch.float64)
    d.entries[COUNT_KEY] = given
    assert not averaging.prepare_average(module, d).in_place
    assert averaging.average_parameters(module, d) == 8
    assert given.item() == 7.0 and d.entries[COUNT_KEY] is not given
    assert averaging.prepare_average(module, d).in_place


# -- all or nothing -------------------------------------------------------------------------------


def _break_missing(d: TensorDict) -> None:
    del d.entries["c.weight"]


def _break_shape(d: TensorDict) -> None:
    d.entries["c.weight"] = torch.zeros(3, 5)


def _break_scalar(d: TensorDict) -> None:
    d.entries["c.weight"] = torch.tensor(0.0)


def _break_dtype(d: TensorDict) -> None:
    d.entries["c.weight"] = torch.zeros(3, 4, dtype=torch.int64)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_break_missing, r"parameter 'c.weight' not found in the dictionary"),
        (_break_shape, r"The size of tensor a \(4\) must match the size of tensor b \(5\)"),
        (_break_scalar, r"output with shape \[\] doesn't match the broadcast shape \[3, 4\]"),
        (_break_dtype, r"holds int64; an average needs a floating-point entry"),
    ],
    ids=["missing", "wrong-shape", "scalar", "integer"],
)
@pytest.mark.parametrize("with_count", [False, True], ids=["no-count", "count"])
def test_average_parameters_is_all_or_nothing(
    breakage: Callable[[TensorDict], None], message: str, with_count: bool
) -> None:
    """The broken entry is the module's last parameter: every earlier one would have moved."""
    module = net()
    d = averaging.copy_parameters(module)
    if with_count:
        d.entries[COUNT_KEY] = torch.tensor(5.0, dtype=torch.float64)
    breakage(d)
    perturb(module, 4)
    before = full_copy(d)
    with pytest.raises(InvalidArgument, match=message):
        averaging.average_parameters(module, d)
    assert_same(d, before)  # '.n' neither added nor incremented


def test_average_parameters_refuses_a_self_overlapping_entry_before_changing_anything() -> None:
    module = torch.nn.Linear(3, 2)
    d = averaging.copy_parameters(module)
    d.entries["bias"] = torch.zeros(1).expand(2)  # what set_entries stores when handed an expanded tensor
    perturb(module, 6)
    before = full_copy(d)
    with pytest.raises(InvalidArgument):
        averaging.average_parameters(module, d)
    assert_same(d, before)


# -- broadcasting and dtypes: as PyTorch's in-place add_ allows -----------------------------------


def _torch_allows(avg_shape: tuple[int, ...], avg_dtype: torch.dtype, p: torch.Tensor) -> bool:
    """Whether PyTorch itself can fold p into an entry of this shape and dtype in place."""
    avg = torch.zeros(avg_shape, dtype=avg_dtype)
    try:
        avg.add_((p - avg) * 0.5)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(
    "avg_shape",
    [(2, 4), (4,), (1, 4), (2, 1), (), (3, 2, 4), (1, 2, 4), (2, 3), (4, 2)],
    ids=lambda s: "x".join(map(str, s)) or "scalar",
)
def test_average_parameters_accepts_exactly_the_shapes_torch_broadcasts_into(avg_shape: tuple[int, ...]) -> None:
    module = torch.nn.Linear(4, 2, bias=False)  # weight [2, 4]
    with torch.no_grad():
        module.weight.copy_(torch.arange(8.0).reshape(2, 4))
    d = TensorDict({"weight": torch.zeros(avg_shape)})
    allowed = _torch_allows(avg_shape, torch.float32, module.weight.detach())
    if allowed:
        assert averaging.average_parameters(module, d) == 2
        expected = torch.zeros(avg_shape) + (module.weight.detach() - torch.zeros(avg_shape)) / 2
        assert d.entries["weight"].shape == avg_shape
        torch.testing.assert_close(d.entries["weight"], expected)
    else:
        with pytest.raises(InvalidArgument, match="parameter 'weight'"):
            averaging.average_parameters(module, d)
        assert torch.equal(d.entries["weight"], torch.zeros(avg_shape)) and COUNT_KEY not in d.entries


@pytest.mark.parametrize(
    "avg_dtype, param_dtype, allowed",
    [
        (torch.float32, torch.float32, True),
        (torch.float64, torch.float32, True),
        (torch.float16, torch.float32, True),
        (torch.bfloat16, torch.float32, True),
        (torch.float32, torch.float64, True),
        (torch.complex64, torch.float32, True),
        (torch.float32, torch.complex64, False),
        (torch.int64, torch.float32, False),
        (torch.bool, torch.float32, False),
    ],
    ids=str,
)
def test_average_parameters_dtype_rules(avg_dtype: torch.dtype, param_dtype: torch.dtype, allowed: bool) -> None:
    """An entry must be floating (or complex) and able to hold the result, as torch's in-place add_ says."""
    p = torch.nn.Parameter(torch.full((3,), 2.0).to(param_dtype), requires_grad=param_dtype.is_floating_point or param_dtype.is_complex)
    module = torch.nn.Module()
    module.register_parameter("w", p)
    d = TensorDict({"w": torch.zeros(3, dtype=avg_dtype)})
    if avg_dtype.is_floating_point or avg_dtype.is_complex:
        assert _torch_allows((3,), avg_dtype, p.detach()) == allowed  # the table agrees with torch
    if allowed:
        assert averaging.average_parameters(module, d) == 2
        assert d.entries["w"].dtype == avg_dtype
        torch.testing.assert_close(d.entries["w"], torch.ones(3, dtype=avg_dtype))
    else:
        with pytest.raises(InvalidArgument, match="'w' holds"):
            averaging.average_parameters(module, d)
        assert torch.equal(d.entries["w"], torch.zeros(3, dtype=avg_dtype)) and COUNT_KEY not in d.entries


def test_an_integer_parameter_is_copied_and_a_floating_one_into_an_integer_entry_refused() -> None:
    """Integer tensors are copied, never averaged, whichever the source: a module's integer
    parameter too (its copyparms copy keeps its dtype, and every average into it was refused)."""
    module = torch.nn.Module()
    module.register_parameter("k", torch.nn.Parameter(torch.full((3,), 2, dtype=torch.int32), requires_grad=False))
    module.register_parameter("w", torch.nn.Parameter(torch.full((3,), 2.0)))
    d = TensorDict({"k": torch.zeros(3, dtype=torch.int32), "w": torch.zeros(3)})
    assert averaging.average_parameters(module, d) == 2
    assert torch.equal(d.entries["k"], torch.full((3,), 2, dtype=torch.int32))
    assert torch.equal(d.entries["w"], torch.ones(3))
    d.entries["k"] = torch.zeros(3, dtype=torch.int32)
    d.entries["w"] = torch.zeros(3, dtype=torch.int32)
    d.changed()
    with pytest.raises(InvalidArgument, match="'w' holds int32; an average needs a floating-point entry"):
        averaging.average_parameters(module, d)
    assert not d.entries["k"].any() and d.entries[COUNT_KEY].item() == 2


def test_broadcast_shape_matches_torch_broadcast_shapes() -> None:
    pairs = [((2, 4), (4,)), ((1,), (3, 1)), ((), (2,)), ((5, 1, 3), (4, 1)), ((2, 3), (2, 4)), ((3,), (2, 4))]
    for a, b in pairs:
        try:
            expected: tuple[int, ...] | None = tuple(torch.broadcast_shapes(a, b))
        except RuntimeError:
            expected = None
        if expected is None:
            with pytest.raises(InvalidArgument, match="must match the size"):
                averaging.broadcast_shape(a, b)
        else:
            assert averaging.broadcast_shape(a, b) == expected, (a, b)


def test_average_parameters_into_a_float64_copy_accumulates_in_float64() -> None:
    module = torch.nn.Linear(3, 2)
    d = TensorDict({name: t.double() for name, t in averaging.copy_parameters(module).entries.items()})
    history = [averaging.copy_parameters(module)]
    for step in range(5):
        perturb(module, 10 + step)
        history.append(averaging.copy_parameters(module))
        averaging.average_parameters(module, d)
    for name in ("weight", "bias"):
        mean = torch.stack([h.entries[name].double() for h in history]).mean(0)
        assert d.entries[name].dtype == torch.float64
        torch.testing.assert_close(d.entries[name], mean, rtol=0, atol=1e-12)


class _FailingAllocation(TorchDispatchMode):
    """Raises torch's CPU out-of-memory error at the k-th operation that allocates a tensor (an
    `empty` or a dtype conversion), as a full device would; every other operation runs."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.left = k

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten._to_copy):
            self.left -= 1
            if self.left == 0:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes.")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["average", "ema"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_running_out_of_memory_for_a_cast_changes_nothing(kind: str, k: int) -> None:
    """float16 values into float32 entries are cast before their lerp (torch's path: the native
    kernel takes no float16). Each cast allocated its own piece as it came, so the k-th failing left
    the pairs before it averaged and the count or EMA step as they were; now the casts share one
    buffer made before the first write, and a failure at any allocation changes nothing."""
    module = net()
    module.half()
    d = averaging.copy_parameters(module, torch.float32)
    d.entries = {name: t.clone() for name, t in d.entries.items()}  # separate tensors: a cast per pair
    d.changed()
    averaging.average_parameters(module, d) if kind == "average" else averaging.ema_update(module, d)
    perturb(module, seed=1)
    before, ema = full_copy(d), d.ema
    try:
        with _FailingAllocation(k):
            averaging.average_parameters(module, d) if kind == "average" else averaging.ema_update(module, d)
    except RuntimeError:
        assert_same(d, before)
        assert d.ema == ema
        return
    expected = {name: t.clone() for name, t in before.items()}
    weight = 1 / 3 if kind == "average" else 1 - d.ema.schedule.decay if d.ema is not None else 0.0
    for name, p in module.named_parameters():
        expected[name].lerp_(p.detach().float(), weight)
        assert torch.equal(d.entries[name], expected[name]), name
