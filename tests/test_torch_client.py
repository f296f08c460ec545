"""weightavg.torch against a real server: tensors of every dtype (and CUDA tensors) round-trip bit for
bit, the thin client imports without torch, and RemoteAveragedModel in real training loops equals
torch's AveragedModel for SWA and EMA, with and without buffers, update_bn included."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn, update_bn

from weightavg import Client, NotFoundError, ResourceExhaustedError
from weightavg.torch import RemoteAveragedModel, fetch, from_array, push, to_array

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-6
"""The issue's bound. Both sides lerp the same float32 values with the same weights, so differences
are a few ulps at most."""
STEPS = 30


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Values a lossy path would change: infinities, NaN, signed zero, the smallest subnormal, and
    numbers that need every mantissa bit; as a non-contiguous view."""
    info = torch.finfo(dtype)
    base = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, info.max, info.tiny], dtype=dtype)
    subnormal = torch.tensor([info.tiny], dtype=dtype) / 4
    noise = torch.randn(4, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.cat([base, subnormal, noise.t().reshape(-1)]).reshape(4, 11).t()  # transposed: not contiguous


def bits(t: torch.Tensor) -> bytes:
    return to_array(t.contiguous()).tobytes()


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHERS = [
    torch.arange(-5, 5, dtype=torch.int8), torch.arange(7, dtype=torch.uint8), torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16),
    torch.tensor([-(2**31), 7], dtype=torch.int32), torch.tensor([-(2**63), 2**63 - 1]), torch.tensor([True, False]),
    torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64), torch.tensor(3.5, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("value", [special_values(d) for d in FLOATS] + OTHERS,
                         ids=[str(d) for d in FLOATS] + [f"{t.dtype}-{t.dim()}d" for t in OTHERS])
def test_tensors_round_trip_through_the_server_bit_for_bit(client: Client, value: torch.Tensor) -> None:
    d = push(client, {"x": value})
    back = fetch(client, d)["x"]
    assert back.dtype == value.dtype and back.shape == value.shape
    assert bits(back) == bits(value)


def test_arrays_and_tensors_convert_without_loss_both_ways() -> None:
    t = special_values(torch.bfloat16)
    a = to_array(t)
    assert a.dtype.name == "bfloat16" and a.shape == tuple(t.shape)
    assert bits(from_array(a)) == bits(t)
    assert from_array(np.float16(1.5)).dtype == torch.float16  # a scalar, as dict(p, key) returns
    read_only = np.frombuffer(np.arange(3, dtype=np.float32).tobytes(), np.float32)
    assert torch.equal(from_array(read_only), torch.arange(3, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_round_trip_bit_for_bit(client: Client) -> None:
    value = special_values(torch.bfloat16).cuda()
    d = push(client, {"x": value, "h": value.half()})
    back = fetch(client, d, device="cuda")
    assert back["x"].is_cuda and bits(back["x"].cpu()) == bits(value.cpu())
    assert bits(back["h"].cpu()) == bits(value.half().cpu())


def test_the_thin_client_imports_without_torch() -> None:
    code = "\n".join([
        "import sys",
        "class Blocker:",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name == 'torch' or name.startswith('torch.'):",
        "            raise ImportError('torch is blocked in this test')",
        "sys.meta_path.insert(0, Blocker())",
        "import weightavg, weightavg.wire",
        "from weightavg import Client",
        "assert 'torch' not in sys.modules",
        "for name in ('weightavg.torch', 'weightavg.sharded'):",
        "    try:",
        "        __import__(name)",
        "    except ImportError as exc:",
        "        print('refused:', exc)",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{ROOT / 'client'}", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused: weightavg.torch needs PyTorch (pip install torch)") == 2, done.stdout


# -- RemoteAveragedModel in a training loop --------------------------------------------------------


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(OrderedDict(
        a=torch.nn.Linear(6, 8), b=torch.nn.BatchNorm1d(8), r=torch.nn.ReLU(), c=torch.nn.Linear(8, 3),
    ))


def data(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model: torch.nn.Module, averages: list[torch.nn.Module], every: int = 1) -> None:
    """SGD with momentum over fixed batches; every `every`-th step (for the oracle) the averages update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step, (x, y) in enumerate(data(), start=1):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for average in averages:
            if isinstance(average, RemoteAveragedModel) or step % every == 0:
                average.update_parameters(model)  # type: ignore[operator]


def averaged(client: Client, model: torch.nn.Module, mode: str, **options: Any) -> RemoteAveragedModel:
    """RemoteAveragedModel in `mode`, with the decay the oracles' EMA uses (0.9) where mode is "ema"
    ("swa" refuses a decay)."""
    return RemoteAveragedModel(client, model, mode, **({"decay": 0.9} if mode == "ema" else {}), **options)


def oracle_for(model: torch.nn.Module, mode: str, use_buffers: bool, decay: float) -> AveragedModel:
    fn = get_ema_multi_avg_fn(decay) if mode == "ema" else None
    return AveragedModel(model, multi_avg_fn=fn, use_buffers=use_buffers)


def assert_same_floats(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        if value.is_floating_point():
            assert ours[name].dtype == value.dtype, name
            assert (ours[name] - value).abs().max().item() <= TOLERANCE, name


@pytest.mark.parametrize("use_buffers", [False, True], ids=["buffers-copied", "buffers-averaged"])
@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_remote_averaged_model_equals_averaged_model_in_a_training_loop(
    client: Client, mode: str, use_buffers: bool
) -> None:
    model = net()
    oracle = oracle_for(model, mode, use_buffers, decay=0.9)
    ours = averaged(client, model, mode, use_buffers=use_buffers)
    train(model, [oracle, ours])
    assert int(ours.n_averaged) == int(oracle.n_averaged) == STEPS
    assert_same_floats(ours.state_dict(), oracle.state_dict())
    ours_count = ours.module.b.num_batches_tracked.item()
    assert ours_count == model.b.num_batches_tracked.item() == STEPS  # integer buffers: copied, never averaged
    if not use_buffers:
        assert oracle.module.b.num_batches_tracked.item() == STEPS

    # update_bn on the pulled copy, as a training loop runs it at the end; then both evaluate alike
    loader = [x for x, _ in data(5, seed=2)]
    update_bn(loader, oracle.module)
    update_bn(loader, ours.module)
    assert_same_floats(ours.state_dict(), oracle.state_dict())
    ours.eval()
    oracle.eval()
    with torch.no_grad():
        assert (ours(loader[0]) - oracle(loader[0])).abs().max().item() <= 10 * TOLERANCE


def test_skipped_buffers_stay_as_the_model_had_them_while_the_parameters_average(client: Client) -> None:
    """buffers="skip" (what EMA users ask for beside average and copy): the parameters average as
    AveragedModel's, the buffers are never sent and stay as the model had them when the average was
    made (running statistics and num_batches_tracked alike), for update_bn to recompute."""
    model = net()
    initial = {name: b.clone() for name, b in model.named_buffers()}
    oracle = oracle_for(model, "ema", False, decay=0.9)
    ours = RemoteAveragedModel(client, model, "ema", decay=0.9, buffers="skip")
    train(model, [oracle, ours])
    assert ours.buffer_mode == "skip" and not ours.use_buffers
    state = ours.state_dict()
    for name, value in oracle.state_dict().items():
        key = name.removeprefix("module.")
        if key in initial:
            assert torch.equal(state[name], initial[key]), name
            assert not torch.equal(initial[key], dict(model.named_buffers())[key]), name  # training moved them
        elif value.is_floating_point():
            assert (state[name] - value).abs().max().item() <= TOLERANCE, name
    for given, fix in (({"buffers": "keep"}, "buffers must be one of average, copy, skip"),
                       ({"buffers": "copy", "use_buffers": True}, "give one of the two")):
        with pytest.raises(ValueError, match=fix):
            RemoteAveragedModel(client, net(), "ema", **given)


def test_updates_every_k_steps_equal_averaged_model_updated_every_k_steps(client: Client) -> None:
    model = net()
    oracle = oracle_for(model, "ema", False, decay=0.8)
    ours = RemoteAveragedModel(client, model, "ema", decay=0.8, every=3)
    train(model, [oracle, ours], every=3)
    assert int(ours.n_averaged) == int(oracle.n_averaged) == STEPS // 3
    assert_same_floats(ours.state_dict(), oracle.state_dict())
    assert client.size(ours.average)[".ema"]["step"] == STEPS // 3


class TimmStyleEma:
    """The oracle for an EMA with timm's full schedule: ModelEmaV3's `get_decay` and `update`
    (timm/utils/model_ema.py, transcribed in /work/shared/reference/averaging-methods.md) on a
    float32 copy of the model's state, so a bfloat16 model is averaged in float32 as
    `dtype="float32"` asks: floating tensors `lerp_(value.float(), 1 - d)` (buffers too unless
    `exclude_buffers`, then copied), integer ones copied. timm itself does not install beside the
    pinned torch; its real ModelEmaV3 gave the same bits in a review's probe."""

    def __init__(self, model: torch.nn.Module, exclude_buffers: bool, **schedule: Any) -> None:
        self.ema = {k: v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v.detach().clone()
                    for k, v in model.state_dict().items()}
        self.parameters = {name for name, _ in model.named_parameters()}
        self.exclude_buffers, self.schedule, self.step = exclude_buffers, schedule, 0

    def decay(self, step: int) -> float:
        s = self.schedule
        since = max(0, step - s["update_after_step"] - 1)
        if since <= 0:
            return 0.0
        if not s["warmup"]:
            return float(s["decay"])
        warm = 1.0 - (1.0 + since / s["warmup_gamma"]) ** -s["warmup_power"]
        return float(max(min(warm, s["decay"]), s["min_decay"]))

    def update_parameters(self, model: torch.nn.Module) -> None:
        self.step += 1
        decay = self.decay(self.step)
        for name, value in model.state_dict().items():
            averaged = value.is_floating_point() and (name in self.parameters or not self.exclude_buffers)
            if averaged:
                self.ema[name].lerp_(value.float(), 1.0 - decay)
            else:
                self.ema[name].copy_(value)


def train_in(dtype: torch.dtype, model: torch.nn.Module, averages: list[Any]) -> None:
    """`train` for a model of any floating dtype: the same fixed batches cast to it, the loss in float32."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data():
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
        for average in averages:
            average.update_parameters(model)


@pytest.mark.parametrize("use_buffers", [False, True], ids=["buffers-copied", "buffers-averaged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_remote_ema_with_timms_full_schedule_equals_timms_update_in_a_training_loop(
    client: Client, dtype: torch.dtype, use_buffers: bool
) -> None:
    """Warm-up, min_decay above the warm-up's first decays, copies until update_after_step + 1, a
    bfloat16 model into a float32 average, batchnorm statistics averaged or copied: the server's
    average holds timm ModelEmaV3's numbers bit for bit after every step of a training loop (both
    sides lerp the same float32 values with the same weight), and its count is the model's."""
    schedule: dict[str, Any] = dict(
        decay=0.85, warmup=True, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.3, update_after_step=3
    )
    model = net().to(dtype)
    oracle = TimmStyleEma(model, exclude_buffers=not use_buffers, **schedule)
    ours = RemoteAveragedModel(client, model, "ema", use_buffers=use_buffers, dtype="float32", **schedule)
    train_in(dtype, model, [oracle, ours])
    assert [oracle.decay(k) for k in (1, 4, 5, 6)] == [0.0, 0.0, 0.3, pytest.approx(1 - 2 ** -0.75)]
    assert oracle.decay(20) < 0.85 == oracle.decay(STEPS)  # the warm-up reaches the decay within the run
    got = fetch(client, ours.average)
    assert got.keys() == oracle.ema.keys()
    for name, value in oracle.ema.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert int(got["b.num_batches_tracked"]) == STEPS
    assert int(ours.n_averaged) == STEPS and client.size(ours.average)[".ema"]["step"] == STEPS


def test_update_bn_on_the_object_keeps_its_statistics_until_the_next_update(client: Client) -> None:
    model = net()
    oracle = oracle_for(model, "swa", True, decay=0.0)
    ours = RemoteAveragedModel(client, model, "swa", use_buffers=True)
    train(model, [oracle, ours])
    loader = [x for x, _ in data(3, seed=3)]
    update_bn(loader, oracle)
    update_bn(loader, ours)  # walks the modules (pulling the average first), resets, forwards
    assert_same_floats(ours.state_dict(), oracle.state_dict())
    recomputed = ours.module.b.running_mean.clone()
    assert torch.equal(ours.state_dict()["module.b.running_mean"], recomputed)  # no pull: nothing new
    ours.update_parameters(model)
    assert not torch.equal(ours.module.b.running_mean, recomputed)  # the server's average again


def test_a_float32_average_of_a_bfloat16_model_moves_where_a_bfloat16_one_stalls(client: Client) -> None:
    model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    wide = RemoteAveragedModel(client, model, "ema", decay=0.999, dtype="float32")
    narrow = RemoteAveragedModel(client, model, "ema", decay=0.999)
    for average in (wide, narrow):
        average.update_parameters(model)  # step 1 copies 1.0
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(50):
        wide.update_parameters(model)
        narrow.update_parameters(model)
    assert client.dict(wide.average)["weight"].dtype == np.float32
    assert float(fetch(client, narrow.average)["weight"][0, 0]) == 1.0  # stalled: every step rounds away
    moved = float(fetch(client, wide.average)["weight"][0, 0])
    assert abs(moved - (2.0 - 0.999**50)) < 1e-5
    assert wide.module.weight.dtype == torch.bfloat16  # the local copy keeps the model's dtype


def test_bad_arguments_are_refused_before_anything_is_sent(client: Client) -> None:
    before = len(client.handles())
    with pytest.raises(ValueError, match="mode must be 'swa' or 'ema'"):
        RemoteAveragedModel(client, net(), "mean")
    with pytest.raises(ValueError, match="every must be at least 1"):
        RemoteAveragedModel(client, net(), every=0)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        RemoteAveragedModel(client, net(), dtype="int32")
    with pytest.raises(ValueError, match="dtype must be a floating dtype such as 'float32', not 'float23'"):
        RemoteAveragedModel(client, net(), dtype="float23")
    with pytest.raises(ValueError, match="dtype must be a floating dtype such as 'float32', not 'float8_e4m3fn'"):
        RemoteAveragedModel(client, net(), dtype="float8_e4m3fn")  # floating, but the wire has no float8
    assert len(client.handles()) == before


@pytest.mark.parametrize(("field", "value", "message"), [
    ("decay", 1.5, "decay must be between 0 and 1, not 1.5"),
    ("decay", float("nan"), "decay must be between 0 and 1, not nan"),
    ("min_decay", -0.1, "min_decay must be between 0 and 1"),
    ("warmup_gamma", 0.0, "warmup_gamma must be a finite number greater than 0"),
    ("warmup_power", float("inf"), "warmup_power must be a finite number greater than 0"),
    ("update_after_step", -1, "update_after_step must be 0 or more"),
])
def test_an_ema_schedule_out_of_range_is_refused_when_the_object_is_made(
    client: Client, field: str, value: float, message: str
) -> None:
    """As torch's get_ema_multi_avg_fn refuses a decay outside [0, 1] when it is made; ours was
    refused by the server at the first update sent, which with every=1000 came 1000 calls into the
    training, after a dictionary had been made for it."""
    before = len(client.handles())
    with pytest.raises(ValueError, match=re.escape(message)):
        RemoteAveragedModel(client, net(), "ema", every=1000, **{field: value})
    assert len(client.handles()) == before
    with pytest.raises(ValueError, match=f"^{field} is an EMA schedule setting"):  # SWA has no schedule
        RemoteAveragedModel(client, net(), "swa", **{field: value})
    assert len(client.handles()) == before


# -- a checkpoint, a changed model ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_a_loaded_checkpoint_resumes_as_averaged_model_resumes(client: Client, mode: str) -> None:
    """Save both averages halfway, load the checkpoints into fresh objects (a restarted job), train on:
    ours must fold the rest into the loaded average and count on from n_averaged, as AveragedModel
    does, not start a new average at the first update after the load."""
    model = net()
    oracle = oracle_for(model, mode, False, decay=0.9)
    ours = averaged(client, model, mode)
    train(model, [oracle, ours])
    saved, ours_saved = oracle.state_dict(), ours.state_dict()
    resumed_oracle = oracle_for(net(seed=5), mode, False, decay=0.9)
    resumed_oracle.load_state_dict(saved)
    resumed = averaged(client, net(seed=5), mode)
    resumed.load_state_dict(ours_saved)
    assert_same_floats(resumed.state_dict(), resumed_oracle.state_dict())
    train(model, [resumed_oracle, resumed])
    assert int(resumed.n_averaged) == int(resumed_oracle.n_averaged) == 2 * STEPS
    assert_same_floats(resumed.state_dict(), resumed_oracle.state_dict())


class Trainer(torch.nn.Module):
    """A training module that keeps its average as an attribute (as Lightning modules and many
    training loops keep their AveragedModel), checkpointed and loaded as one module."""

    def __init__(self, model: torch.nn.Module, average: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.average = average


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_a_checkpoint_loaded_through_a_parent_module_resumes_as_averaged_model_resumes(
    client: Client, mode: str
) -> None:
    """The parent's load_state_dict loads its children through torch's internals, not through ours:
    the local copy took the checkpoint, the server's average did not, and the next update folded
    into the server's fresh average instead (its values far from AveragedModel's)."""
    model = net()
    oracle = Trainer(model, oracle_for(model, mode, False, decay=0.9))
    ours = Trainer(model, averaged(client, model, mode))
    train(model, [oracle.average, ours.average])
    saved, ours_saved = oracle.state_dict(), ours.state_dict()
    fresh = net(seed=5)
    resumed_oracle = Trainer(fresh, oracle_for(fresh, mode, False, decay=0.9))
    resumed_oracle.load_state_dict(saved)
    fresh = net(seed=5)
    resumed = Trainer(fresh, averaged(client, fresh, mode))
    resumed.load_state_dict(ours_saved)
    train(resumed.model, [resumed.average])
    train(resumed_oracle.model, [resumed_oracle.average])
    assert int(resumed.average.n_averaged) == int(resumed_oracle.average.n_averaged) == 2 * STEPS
    assert_same_floats(resumed.state_dict(), resumed_oracle.state_dict())


def test_a_parent_load_without_the_averages_entries_leaves_the_server_average_alone(client: Client) -> None:
    """A parent's partial load (strict=False) that holds none of the average's entries must not send
    the local copy: for a float32 average of a bfloat16 model that would round it to bfloat16."""
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    parent = Trainer(model, RemoteAveragedModel(client, model, "ema", decay=0.9, dtype="float32"))
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.01)
        parent.average.update_parameters(model)
    before = client.dict(parent.average.average)
    parent.load_state_dict({"model.weight": model.weight.detach().clone()}, strict=False)
    parent.average.pull()
    after = client.dict(parent.average.average)
    assert before.keys() == after.keys()
    assert all(before[name].dtype == after[name].dtype and before[name].tobytes() == after[name].tobytes() for name in before)


def broken_checkpoint(saved: dict[str, Any], fault: str) -> dict[str, Any]:
    """A checkpoint torch's load_state_dict refuses only after copying every other entry: all values
    changed (count included), with one key missing or one tensor of another shape."""
    broken = {name: (t + 100 if t.is_floating_point() else t + 7) for name, t in saved.items()}
    if fault == "missing":
        del broken["module.c.bias"]
    else:
        broken["module.c.bias"] = torch.zeros(5)
    return broken


@pytest.mark.parametrize(("fault", "assign"), [("missing", False), ("shape", True)], ids=["missing-copied", "shape-assigned"])
@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_a_refused_checkpoint_changes_neither_the_local_copy_nor_the_count(
    client: Client, unchanged: Any, mode: str, fault: str, assign: bool
) -> None:
    """torch's load_state_dict copies every entry it can before it raises; ours then pushed nothing,
    so the local copy and n_averaged held the refused checkpoint while the server kept its average,
    and an EMA went on at the checkpoint's step. Now a refused load changes nothing, and the
    training goes on exactly as AveragedModel's that never saw it."""
    model = net()
    oracle = oracle_for(model, mode, False, decay=0.9)
    ours = averaged(client, model, mode)
    train(model, [oracle, ours])
    saved = ours.state_dict(keep_vars=True)
    kept = {name: t.detach().clone() for name, t in saved.items()}
    with unchanged():
        with pytest.raises(RuntimeError, match="Missing key|size mismatch"):
            ours.load_state_dict(broken_checkpoint(saved, fault), assign=assign)
    after = ours.state_dict(keep_vars=True)
    assert all(torch.equal(after[name], t) for name, t in kept.items())
    assert all(after[name] is saved[name] for name in saved)  # the same tensors, not others like them
    train(model, [oracle, ours])
    assert int(ours.n_averaged) == int(oracle.n_averaged) == 2 * STEPS
    assert_same_floats(ours.state_dict(), oracle.state_dict())


def test_a_loaded_checkpoint_keeps_a_float32_average_in_float32(client: Client) -> None:
    """The local copy (and so the checkpoint) holds the model's bfloat16; loading it must not turn the
    server's float32 average into a bfloat16 one, which would stall."""
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    ours = RemoteAveragedModel(client, model, "ema", decay=0.999, dtype="float32")
    ours.update_parameters(model)
    ours.load_state_dict(ours.state_dict())
    assert {str(v.dtype) for v in client.dict(ours.average).values()} == {"float32"}


def width(n: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(a=torch.nn.Linear(6, n), b=torch.nn.BatchNorm1d(n)))


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_a_model_of_another_shape_is_refused_and_changes_nothing(client: Client, unchanged: Any, mode: str) -> None:
    model = width(8)
    ours = RemoteAveragedModel(client, model, mode)
    ours.update_parameters(model)
    with unchanged():
        with pytest.raises(ValueError, match=r"'a\.weight' has shape \[5, 6\] but the average's is \[8, 6\]"):
            ours.update_parameters(width(5))
    assert int(ours.n_averaged) == 1
    ours.update_parameters(model)
    assert int(ours.n_averaged) == 2
    assert ours.module.b.running_mean.shape == (8,)


def test_a_parameter_added_then_removed_is_refused_then_averaged_again(client: Client, unchanged: Any) -> None:
    """A model that gained a parameter is refused with its name, changing nothing; once it is gone
    again the updates go on (the values sent for it must not stay behind and block every update)."""
    model = width(8)
    ours = RemoteAveragedModel(client, model, "ema", decay=0.5)
    ours.update_parameters(model)
    model.extra = torch.nn.Parameter(torch.ones(2))
    with unchanged():
        with pytest.raises(ValueError, match="the model's 'extra' is not in the average"):
            ours.update_parameters(model)
    del model.extra
    del model.a.bias
    model.a.register_parameter("bias", None)
    with unchanged():
        with pytest.raises(ValueError, match="the average's 'a.bias' is not in the model"):
            ours.update_parameters(model)
    assert int(ours.n_averaged) == 1
    ours.update_parameters(width(8))
    assert int(ours.n_averaged) == 2


def test_a_freed_average_keeps_its_local_copy_and_refuses_updates_without_sending(client: Client) -> None:
    """free() frees both dictionaries; the local copy keeps the last average; a later update is
    refused here, before it can leave a new dictionary on the server."""
    before = len(client.handles())
    model = net()
    ours = RemoteAveragedModel(client, model, "swa")
    ours.update_parameters(model)
    expected = fetch(client, ours.average)["a.weight"]
    ours.free()
    assert len(client.handles()) == before
    with pytest.raises(RuntimeError, match=r"freed \(free\(\)\); make a new RemoteAveragedModel"):
        ours.update_parameters(model)
    assert len(client.handles()) == before
    assert torch.equal(ours.module.a.weight, expected)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32, torch.uint16, torch.uint64])
def test_a_dtype_the_wire_cannot_carry_is_refused_by_name_before_anything_is_sent(client: Client, dtype: torch.dtype) -> None:
    before = len(client.handles())
    ok = torch.zeros(2)
    with pytest.raises(TypeError, match=rf"tensor 'w' is {dtype}, which the wire cannot carry .*; cast it first"):
        push(client, {"ok": ok, "w": torch.zeros(3).to(dtype)})
    with pytest.raises(TypeError, match=rf"{dtype}, which the wire cannot carry"):
        to_array(torch.zeros(3).to(dtype))
    assert len(client.handles()) == before


def test_a_value_that_is_not_a_tensor_is_refused_as_such(client: Client) -> None:
    """A numpy array's float64 was refused as a dtype the wire cannot carry, in a message that listed
    float64 among the dtypes it carries."""
    before = len(client.handles())
    with pytest.raises(TypeError, match=r"tensor 'a' is a numpy\.ndarray, not a torch tensor; convert it with torch\.as_tensor"):
        push(client, {"a": np.ones(2)})
    with pytest.raises(TypeError, match="the tensor is a builtins.list, not a torch tensor"):
        to_array([1.0])  # type: ignore[arg-type]
    assert len(client.handles()) == before


def test_a_module_or_unnamed_tensors_given_to_push_are_refused_saying_what_to_pass(client: Client) -> None:
    """push(c, model) failed as "cannot unpack non-iterable Linear object" (a Sequential iterates its
    layers), and push(c, [t]) alike: neither said that push takes named tensors."""
    before = len(client.handles())
    with pytest.raises(TypeError) as err:
        push(client, torch.nn.Sequential(torch.nn.Linear(2, 1)))  # type: ignore[arg-type]
    assert str(err.value) == (
        "push takes named tensors, not a Sequential module: pass model.state_dict() (parameters and buffers) or "
        "dict(model.named_parameters()); nothing was sent"
    )
    with pytest.raises(TypeError, match=r"given an item that is a Tensor; name each tensor, e\.g\. \{'weight': t\}"):
        push(client, [torch.ones(2)])  # type: ignore[list-item]
    assert len(client.handles()) == before
    pairs = push(client, [["a", torch.ones(1)], ("b", torch.zeros(1))])  # type: ignore[list-item]
    assert sorted(client.dict(pairs)) == ["a", "b"]


def test_a_name_given_twice_is_refused_before_anything_is_sent(client: Client) -> None:
    """push takes (name, tensor) pairs; a name given twice kept the last value and dropped the other
    without a word."""
    d = push(client, {"a": torch.ones(1)})
    before = len(client.handles())
    for into in (None, d):
        with pytest.raises(ValueError, match="tensor 'a' is named twice"):
            push(client, [("a", torch.full((1,), 5.0)), ("b", torch.ones(1)), ("a", torch.zeros(1))], into=into)
    assert len(client.handles()) == before
    assert torch.equal(fetch(client, d)["a"], torch.ones(1))


NAMES = ["a.b.c", "ünï©ødé/名前", "x" * 100_000, "a\x00b", "\n", "a/b\\c"]


@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shared-memory"])
def test_names_of_any_text_round_trip_and_one_that_is_not_utf8_is_refused_before_any_call(
    start_server: Any, shm: bool
) -> None:
    """Entry names are UTF-8 strings: dots, non-ASCII, control characters and 100,000 characters come
    back as they went. A lone surrogate has no UTF-8 form: it used to fail inside gRPC's request
    thread, UNKNOWN 'Exception iterating requests!'."""
    server = start_server(allow_shm=True)
    with Client(server.address, shm=shm, timeout=60) as c:
        values = {name: torch.full((2,), float(i)) for i, name in enumerate(NAMES)}
        back = fetch(c, push(c, values))
        assert list(back) == NAMES and all(torch.equal(back[n], v) for n, v in values.items())
        before = len(c.handles())
        with pytest.raises(ValueError, match=r"name 'a\\ud800' is not valid UTF-8"):
            push(c, {"ok": torch.ones(1), "a\ud800": torch.ones(1)})
        assert len(c.handles()) == before


def test_copying_or_pickling_the_object_is_refused_with_what_to_do_instead(client: Client) -> None:
    """It holds a connection and server handles (a copy would share, and free, the one average):
    deepcopy and torch.save of the object used to fail deep inside gRPC's channel ('no default
    __reduce__ due to non-trivial __cinit__'); its state dict and local copy copy as usual."""
    import copy
    import io

    model = net()
    ours = RemoteAveragedModel(client, model, "ema", decay=0.5)
    ours.update_parameters(model)
    for action in (lambda: copy.deepcopy(ours), lambda: torch.save(ours, io.BytesIO())):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*torch\.save\(ema\.state_dict\(\)"):
            action()
    assert torch.equal(copy.deepcopy(ours.module).a.weight, ours.module.a.weight)
    torch.save(ours.state_dict(), io.BytesIO())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_the_average_is_bit_identical_to_averaged_models_foreach_lerp(client: Client, mode: str, dtype: torch.dtype) -> None:
    """The server lerps as torch's `_foreach_lerp_` does: SWA equals AveragedModel with
    get_swa_multi_avg_fn() (its default on CUDA; its CPU default divides instead, a few ulps off)
    and EMA get_ema_multi_avg_fn, bit for bit, in the model's own dtype."""
    model = net().to(dtype)
    fn = get_ema_multi_avg_fn(0.9) if mode == "ema" else get_swa_multi_avg_fn()
    oracle = AveragedModel(model, multi_avg_fn=fn)
    ours = averaged(client, model, mode)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype))
        oracle.update_parameters(model)
        ours.update_parameters(model)
    theirs = oracle.state_dict()
    for name, value in ours.state_dict().items():
        assert value.dtype == theirs[name].dtype and torch.equal(value, theirs[name]), name


def test_an_average_the_server_no_longer_holds_says_why_and_how_to_resume(start_server: Any) -> None:
    """A server restarted without --state-dir holds none of the object's dictionaries: the update
    and the pull say so and how to go on, where they said only "unknown handle 'dic_...' (never
    created, or already freed)"."""
    first = start_server()
    model = net()
    with Client(first.address, timeout=60) as c:
        ours = RemoteAveragedModel(c, model, "ema", decay=0.5)
        ours.update_parameters(model)
        c.purge()  # what a restart without a state directory leaves: none of its handles
        expected = r"the server no longer holds this RemoteAveragedModel's average .*restarted without --state-dir.*load_state_dict"
        with pytest.raises(NotFoundError, match=expected):
            ours.update_parameters(model)
        with pytest.raises(NotFoundError, match=expected):
            ours.pull()


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "DistributedDataParallel"])
def test_a_wrapped_model_updates_the_average_as_averaged_model_takes_it(
    client: Client, wrap: str, tmp_path: Path
) -> None:
    """timm's and torch's recipes make the average of the bare model, then train it compiled or
    wrapped for data parallelism, and update with the wrapper, whose parameter names carry
    '_orig_mod.' or 'module.'. AveragedModel pairs tensors by position and takes it; ours refused
    it as a model of another layout. The average is kept by the bare model's names."""
    import torch.distributed as dist

    model = net()
    oracle = oracle_for(model, "ema", False, decay=0.9)
    ours = RemoteAveragedModel(client, model, "ema", decay=0.9)
    if wrap == "DistributedDataParallel":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped: torch.nn.Module = (
            torch.compile(model, backend="eager") if wrap == "compile"  # type: ignore[assignment]
            else torch.nn.DataParallel(model) if wrap == "DataParallel"
            else torch.nn.parallel.DistributedDataParallel(model)
        )
        assert all(name.startswith(("_orig_mod.", "module.")) for name, _ in wrapped.named_parameters())
        train(model, [])
        for average in (oracle, ours):
            average.update_parameters(wrapped)
        train(model, [])
        for average in (oracle, ours):
            average.update_parameters(model)  # the bare model again: the same average
        wrapped_ours = RemoteAveragedModel(client, wrapped, "ema", decay=0.9)  # made from the wrapper
        wrapped_ours.update_parameters(model)
        wrapped_ours.update_parameters(wrapped)
        assert list(wrapped_ours.state_dict()) == list(AveragedModel(wrapped).state_dict())
    finally:
        if wrap == "DistributedDataParallel":
            dist.destroy_process_group()
    assert int(ours.n_averaged) == 2
    assert_same_floats(ours.state_dict(), oracle.state_dict())


def test_a_read_only_or_strided_array_converts_with_its_shape() -> None:
    """from_array copies an array torch cannot share (read-only, as np.frombuffer's and
    safetensors.numpy's are, or not C-contiguous); the copy turned a 0-dim array into shape [1]."""
    scalar = np.frombuffer(np.float32(2.5).tobytes(), np.float32).reshape(())
    assert not scalar.flags.writeable
    t = from_array(scalar)
    assert t.shape == () and t.dtype == torch.float32 and t.item() == 2.5
    bf16 = np.frombuffer(np.array(1.5, ml_dtypes.bfloat16).tobytes(), ml_dtypes.bfloat16).reshape(())
    assert from_array(bf16).shape == () and from_array(bf16).dtype == torch.bfloat16
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert torch.equal(from_array(fortran), torch.arange(6, dtype=torch.int16).reshape(2, 3))


def test_a_refused_update_does_not_count_towards_every(client: Client) -> None:
    """A refused call leaves the object as it was, its count of calls included: with every=2 the
    call after a refused second call is the second and is sent."""
    model = width(8)
    ours = RemoteAveragedModel(client, model, "swa", every=2)
    ours.update_parameters(model)  # the first call: not sent
    with pytest.raises(ValueError, match="has shape"):
        ours.update_parameters(width(5))
    ours.update_parameters(model)
    assert int(ours.n_averaged) == 1


def test_an_update_the_server_refuses_does_not_count_towards_every(start_server: Any) -> None:
    """As a call refused here, one the server refuses (its cap of handles reached when the first
    update makes the dictionary of values sent) leaves the count of calls as it was: the call after
    it is sent. The call used to be counted before it was sent, so with every=2 the next call was
    skipped and the average fell a step behind."""
    server = start_server(max_handles=2)
    with Client(server.address, timeout=60) as c:
        model = width(8)
        ours = RemoteAveragedModel(c, model, "swa", every=2)  # the average: one handle
        other = c.dict({"x": np.ones(1, np.float32)})  # the cap's second
        ours.update_parameters(model)  # the first call: not sent
        with pytest.raises(ResourceExhaustedError, match="--max-handles"):
            ours.update_parameters(model)
        c.free(other)
        ours.update_parameters(model)
        assert int(ours.n_averaged) == 1
        assert float(c.dict(ours.average)[".n"]) == 1.0


def test_fetch_takes_one_name_as_a_string_as_client_dict_does(client: Client) -> None:
    """fetch(c, d, names="a.weight") walked the string as a list of names and asked for the entry
    '.', NOT_FOUND; Client.dict(d, "a.weight") takes a string as one name, and so does fetch now."""
    d = push(client, {"a.weight": torch.ones(2), "a": torch.zeros(1)})
    got = fetch(client, d, names="a.weight")
    assert list(got) == ["a.weight"] and torch.equal(got["a.weight"], torch.ones(2))


def test_a_refused_copy_of_the_buffers_says_the_update_was_folded_in(start_server: Any) -> None:
    """With use_buffers=False the buffers go to the average by a call after it, which a byte cap can
    refuse alone (it holds the buffers' bytes while it runs; here a buffer fifty times the
    parameters). The update has then been folded in and counted: the error says so and not to
    repeat it, where it used to read as a refused update (a caller who repeated it folded the
    model in twice)."""
    class WithTable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.zeros(1000))

    server = start_server(max_device_bytes=6000)  # the average (4080 bytes) and the values sent (80) fit
    with Client(server.address, timeout=60) as c:
        model = WithTable()
        ours = RemoteAveragedModel(c, model, "ema", decay=0.5)
        with pytest.raises(ResourceExhaustedError, match=r"was folded into the average \(n_averaged is now 1\).*"
                           r"--max-device-bytes.*do not repeat this one"):
            ours.update_parameters(model)
        assert int(ours.n_averaged) == 1 and c.size(ours.average)[".ema"]["step"] == 1


def test_an_ema_setting_given_without_mode_ema_is_refused_saying_to_pass_it(client: Client) -> None:
    """RemoteAveragedModel(c, model, decay=0.999) made an equal-weight mean and dropped the decay
    without a word; now it says to pass mode="ema", and nothing is sent."""
    before = len(client.handles())
    with pytest.raises(ValueError, match=r"^decay is an EMA schedule setting: pass mode='ema'"):
        RemoteAveragedModel(client, net(), decay=0.999)
    with pytest.raises(ValueError, match=r"^decay, warmup are EMA schedule settings: pass mode='ema'"):
        RemoteAveragedModel(client, net(), "swa", decay=0.999, warmup=True)
    assert len(client.handles()) == before
    ema = RemoteAveragedModel(client, net(), "ema", warmup=True)  # the fields left out take EMA_DEFAULTS
    assert (ema.decay, ema.warmup, ema.min_decay) == (0.9999, True, 0.0)
    ema.free()


@pytest.mark.parametrize(("mode", "use_buffers", "every"), [("swa", False, 1), ("ema", True, 1), ("ema", False, 3)])
def test_asynchronous_updates_fold_in_what_the_model_held_when_they_were_made(
    client: Client, mode: str, use_buffers: bool, every: int
) -> None:
    """Training goes on while an update is sent: an asynchronous average ends bit for bit where a
    synchronous one does, the model changed in place right after each update_parameters returned."""
    model = net()
    synchronous = averaged(client, model, mode, use_buffers=use_buffers, every=every)
    background = averaged(client, model, mode, use_buffers=use_buffers, every=every, asynchronous=True)
    train(model, [synchronous, background])
    background.wait()
    assert int(background.n_averaged) == int(synchronous.n_averaged) == STEPS // every
    theirs, ours = synchronous.state_dict(), background.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    background.free()
    synchronous.free()


def test_an_asynchronous_update_the_server_refuses_is_raised_by_the_next_call(client: Client) -> None:
    model = net()
    ours = averaged(client, model, "ema", asynchronous=True)
    ours.update_parameters(model)
    ours.wait()
    client.free(ours.average)  # the server loses the average behind the object's back
    ours.update_parameters(model)  # returns at once; the background update is refused
    with pytest.raises(NotFoundError, match="in the background by an earlier update_parameters failed: the server no "
                                            "longer holds this RemoteAveragedModel's average"):
        ours.update_parameters(model)
    assert int(ours.n_averaged) == 1  # the refused update did not count
    ours.wait()  # raised once; nothing in flight now
