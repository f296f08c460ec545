"""domain.batchnorm in process: reset_batchnorm returns the momenta and resets the running statistics;
restore_momentum puts momenta back, all or nothing. Only BatchNorm1d/2d/3d count."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from weightavg_server.domain import batchnorm
from weightavg_server.domain.errors import InvalidArgument, NotFound


def net() -> torch.nn.Module:
    """Batchnorm layers at several depths and momenta, one untracked, and an instance norm that tracks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(4, 6),
        b=torch.nn.BatchNorm1d(6, momentum=0.3),
        blk=torch.nn.Sequential(OrderedDict(
            bn=torch.nn.BatchNorm1d(6, momentum=None),
            untracked=torch.nn.BatchNorm1d(6, track_running_stats=False),
        )),
        inorm=torch.nn.InstanceNorm1d(6, track_running_stats=True),
        c=torch.nn.Linear(6, 2),
    ))


def train_a_little(module: torch.nn.Module) -> None:
    """Three training batches through every norm layer, so each holds statistics away from the reset values."""
    module.train()
    with torch.no_grad():
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(8, 6, generator=g) * 3 + 1
            module.b(x)
            module.blk(x)
            module.inorm(torch.randn(8, 6, 5, generator=g) * 3 + 1)


def test_reset_returns_each_batchnorm_momentum_by_path_in_module_order() -> None:
    module = net()
    assert list(batchnorm.reset_batchnorm(module).items()) == [("b", 0.3), ("blk.bn", None), ("blk.untracked", 0.1)]


def test_reset_sets_momentum_none_and_resets_running_statistics_in_place() -> None:
    module = net()
    train_a_little(module)
    mean = module.b.running_mean
    assert int(module.b.num_batches_tracked) == 3 and not torch.equal(mean, torch.zeros(6))
    batchnorm.reset_batchnorm(module)
    for bn in (module.b, module.blk.bn):
        assert bn.momentum is None
        assert torch.equal(bn.running_mean, torch.zeros(6)) and torch.equal(bn.running_var, torch.ones(6))
        assert int(bn.num_batches_tracked) == 0
    assert module.b.running_mean is mean  # reset in place: live buffer views see it
    assert module.blk.untracked.momentum is None and module.blk.untracked.running_mean is None


def test_reset_leaves_instance_norm_and_parameters_alone() -> None:
    module = net()
    train_a_little(module)
    module.inorm.momentum = 0.2
    inorm_mean = module.inorm.running_mean.clone()
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    batchnorm.reset_batchnorm(module)
    assert module.inorm.momentum == 0.2 and torch.equal(module.inorm.running_mean, inorm_mean)
    assert all(torch.equal(p, params[n]) for n, p in module.named_parameters())


def test_reset_then_restore_gives_back_every_momentum() -> None:
    module = net()
    momenta = batchnorm.reset_batchnorm(module)
    batchnorm.restore_momentum(module, momenta)
    assert (module.b.momentum, module.blk.bn.momentum, module.blk.untracked.momentum) == (0.3, None, 0.1)


def test_root_batchnorm_has_the_empty_path() -> None:
    module = torch.nn.BatchNorm2d(3, momentum=0.05)
    assert batchnorm.reset_batchnorm(module) == {"": 0.05}
    batchnorm.restore_momentum(module, {"": 0.5})
    assert module.momentum == 0.5


@pytest.mark.parametrize("layer", [torch.nn.BatchNorm1d(2), torch.nn.BatchNorm2d(2), torch.nn.BatchNorm3d(2)], ids=["1d", "2d", "3d"])
def test_every_batchnorm_dimension_counts(layer: torch.nn.Module) -> None:
    module = torch.nn.Sequential(OrderedDict(x=layer))
    assert batchnorm.reset_batchnorm(module) == {"x": 0.1}


def test_without_batchnorm_layers_reset_returns_empty_and_changes_nothing() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.GroupNorm(1, 3),
                                 torch.nn.InstanceNorm1d(3, track_running_stats=True))
    before = {n: t.clone() for n, t in module.state_dict().items()}
    assert batchnorm.reset_batchnorm(module) == {}
    assert all(torch.equal(t, before[n]) for n, t in module.state_dict().items())
    batchnorm.restore_momentum(module, {})  # nothing to restore is fine


@pytest.mark.parametrize(
    "momenta, error, message",
    [
        ({"b": 0.9, "zz": 0.1}, NotFound, "unable to locate batchnorm module 'zz'"),
        ({"b": 0.9, "a": 0.1}, InvalidArgument, "module 'a' is Linear, not a batchnorm layer"),
        ({"b": 0.9, "inorm": 0.1}, InvalidArgument, "module 'inorm' is InstanceNorm1d"),
        ({"b": 0.9, "blk.bn": float("nan")}, InvalidArgument, "must be finite or None"),
        ({"b": 0.9, "blk.bn": float("inf")}, InvalidArgument, "must be finite or None"),
    ],
    ids=["unknown", "linear", "instance-norm", "nan", "inf"],
)
def test_restore_momentum_is_all_or_nothing(momenta: dict[str, float | None], error: type[Exception], message: str) -> None:
    module = net()
    with pytest.raises(error, match=message):
        batchnorm.restore_momentum(module, momenta)
    assert (module.b.momentum, module.blk.bn.momentum) == (0.3, None)


def test_restore_momentum_touches_momentum_only() -> None:
    module = net()
    train_a_little(module)
    before = {n: t.clone() for n, t in module.state_dict().items()}
    batchnorm.restore_momentum(module, {"b": None, "blk.bn": 0.25})
    assert module.b.momentum is None and module.blk.bn.momentum == 0.25
    assert all(torch.equal(t, before[n]) for n, t in module.state_dict().items())


def test_reset_with_momentum_none_makes_the_next_passes_an_equal_weight_mean() -> None:
    """With momentum None, k training passes leave the plain mean of the k batch means."""
    bn = torch.nn.BatchNorm1d(3, momentum=0.1)
    batchnorm.reset_batchnorm(bn)
    batches = [torch.randn(16, 3, generator=torch.Generator().manual_seed(s)) + s for s in range(4)]
    bn.train()
    for x in batches:
        bn(x)
    expected = torch.stack([x.mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=0, atol=1e-6)
    assert int(bn.num_batches_tracked) == 4
