"""weightavg.sharded.ShardedAverage: an average kept per rank of each rank's shards. On a plain model
in this process against torch's AveragedModel, and on an FSDP2 model trained under torchrun (2 CPU
ranks, gloo) against AveragedModel of an unsharded copy (tests/sharded_script.py); both through a
real server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import LiveServer
from weightavg import Client
from weightavg.sharded import ShardedAverage, local_state
from weightavg_server.ops.launch import START_SECONDS

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-6
"""As tests/test_torch_client.py's: the same float32 lerps on both sides, a few ulps apart at most."""


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(6, 8), b=torch.nn.BatchNorm1d(8), r=torch.nn.ReLU(), c=torch.nn.Linear(8, 3),
    ))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.train()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_a_plain_models_average_equals_averaged_model_and_swaps_in_and_out(client: Client, mode: str) -> None:
    model = net()
    oracle = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9) if mode == "ema" else None)
    ours = ShardedAverage(client, model, mode, **({"decay": 0.9} if mode == "ema" else {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        train_step(model, opt, g)
        ours.update_parameters(model)
        oracle.update_parameters(model)
    assert ours.n_averaged == int(oracle.n_averaged) == 12
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ours.swapped(model) as swapped:
        assert swapped is model
        for name, value in oracle.module.state_dict().items():
            if value.is_floating_point():
                assert (model.state_dict()[name] - value).abs().max().item() <= TOLERANCE, name
            else:  # integer buffers: copied from the model at each update, never averaged
                assert torch.equal(model.state_dict()[name], value), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name  # put back bit for bit


def test_a_checkpoint_round_trips_and_a_model_of_another_layout_is_refused(client: Client) -> None:
    model = net()
    ema = ShardedAverage(client, model, "ema", decay=0.5, dtype="float32")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        train_step(model, opt, g)
        ema.update_parameters(model)
    saved = ema.state_dict()
    assert saved["n_averaged"] == 3 and set(saved["average"]) == set(model.state_dict())
    again = ShardedAverage(client, net(), "ema", decay=0.5, dtype="float32")
    again.load_state_dict(saved)
    train_step(model, opt, g)
    ema.update_parameters(model)
    again.update_parameters(model)
    assert again.n_averaged == ema.n_averaged == 4
    for name, value in ema.state_dict()["average"].items():
        assert torch.equal(again.state_dict()["average"][name], value), name
    other = torch.nn.Sequential(OrderedDict(a=torch.nn.Linear(6, 4)))
    with pytest.raises(ValueError, match="has shape \\[4, 6\\] but the average's is \\[8, 6\\]; nothing was sent"):
        ema.update_parameters(other)
    with pytest.raises(ValueError, match="nothing was loaded"):
        again.load_state_dict({"average": {"a.weight": torch.zeros(8, 6)}, "n_averaged": 1})
    assert again.n_averaged == 4
    with pytest.raises(ValueError, match="decay is an EMA schedule setting"):
        ShardedAverage(client, model, "swa", decay=0.9)
    ema.free()
    with pytest.raises(RuntimeError, match="was freed"):
        ema.update_parameters(model)
    again.free()


def test_an_asynchronous_average_is_the_synchronous_one_though_the_model_changes_at_once(client: Client) -> None:
    """asynchronous=True sends copies taken when update_parameters returns: the model is changed in place
    right after each call, and the average equals the synchronous one bit for bit."""
    model = net()
    ours = ShardedAverage(client, model, "ema", decay=0.8, asynchronous=True)
    sync = ShardedAverage(client, model, "ema", decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        train_step(model, opt, g)
        sync.update_parameters(model)
        ours.update_parameters(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(100.0)  # what the copy must not see
                p.sub_(100.0)
            model.a.weight.mul_(-1)
            model.a.weight.mul_(-1)
    ours.wait()
    assert ours.n_averaged == sync.n_averaged == 5
    theirs = sync.state_dict()["average"]
    for name, value in ours.state_dict()["average"].items():
        assert torch.equal(value, theirs[name]), name
    ours.free()
    sync.free()


def test_skipped_buffers_stay_as_the_model_had_them(client: Client) -> None:
    model = net()
    initial = {name: b.clone() for name, b in model.named_buffers()}
    ours = ShardedAverage(client, model, "ema", decay=0.9, buffers="skip")
    copied = ShardedAverage(client, model, "ema", decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        train_step(model, opt, g)
        ours.update_parameters(model)
        copied.update_parameters(model)
    skipped, theirs = ours.state_dict()["average"], copied.state_dict()["average"]
    for name, value in theirs.items():
        if name in initial:
            assert torch.equal(skipped[name], initial[name]) and not torch.equal(value, initial[name]), name
        else:
            assert torch.equal(skipped[name], value), name  # the parameters average alike
    ours.free()
    copied.free()


def test_local_state_is_each_dtensors_local_shard_sharing_its_memory() -> None:
    model = net()
    state, parameters = local_state(model)
    assert parameters == {name for name, _ in model.named_parameters()}
    assert state["a.weight"].data_ptr() == model.a.weight.data_ptr()  # writes reach the model
    assert "b.num_batches_tracked" in state and "b.num_batches_tracked" not in parameters


def test_an_fsdp2_models_shards_average_to_the_whole_models_average(live_server: LiveServer, tmp_path: Path) -> None:
    """Two ranks train a sharded model (a Linear's 3 rows shard 2 and 1) on data of their own; each
    rank's ShardedAverage (EMA, SWA) of its shards, swapped into the model, gives the whole tensors
    of torch's AveragedModel of the unsharded model, the same outputs, and the trained values back
    after the swap."""
    out = tmp_path / "found.pt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "sharded_script.py"), live_server.address, str(out)],
        timeout=START_SECONDS, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "client"), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0, f"the script failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    found = torch.load(out)
    assert found["ema state"] == found["ema-async state"] == 0.0, found  # elementwise: bit for bit the whole EMA
    for mode in ("ema", "swa", "ema-async"):
        assert found[f"{mode} state"] <= TOLERANCE, found  # SWA: AveragedModel's formula, a few ulps off
        assert found[f"{mode} output"] <= 10 * TOLERANCE, found
        assert found[f"{mode} restored"] == 0.0, found
        assert found[f"{mode} count"] == 0.0, found
