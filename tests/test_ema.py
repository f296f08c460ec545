"""Exponential moving averages through a real server: the verb, the kept schedule (size, listings,
requests that leave it unset), buffers, dictionary sources, errors, and snapshots."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from conftest import LiveServer
from weightavg import Client, InvalidArgumentError, NotFoundError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.ops.app import Runtime, create_runtime
from weightavg_server.ops.config import ServerConfig
from weightavg_server.store import snapshot
from weightavg_server.store.registry import Registry

BN_NET = ["sequential", ["linear", "a", 4, 3], ["batchnorm1d", "b", 3]]
WEIGHTS = {"weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "bias": np.ones(3, np.float32)}


def set_weights(c: Client, q: object, scale: float) -> None:
    for name, value in WEIGHTS.items():
        c.parm(q, name, value * scale)


def test_ema_updates_toward_the_weights_and_returns_the_step(client: Client) -> None:
    q = client.module(["linear", 4, 3])
    e = client.copyparms(q, dtype="float64")
    assert client.ema(q, e, decay=0.75) == 1  # the first step copies
    before = client.dict(e)
    client.parm(q, "weight", 1.0)
    assert client.ema(q, e, decay=0.75) == 2
    after = client.dict(e)
    np.testing.assert_allclose(after["weight"], 0.75 * before["weight"] + 0.25, rtol=0, atol=1e-15)
    assert after["weight"].dtype == np.float64
    assert client.ema(q, e, decay=0.75, step=40) == 40
    assert client.ema(q, e, decay=0.75) == 41


def test_the_schedule_shows_in_size_and_listings(client: Client) -> None:
    q = client.module(["linear", 2, 1])
    e = client.copyparms(q)
    assert ".ema" not in client.size(e)
    client.ema(q, e, decay=0.99, warmup=True, warmup_power=0.75, update_after_step=2)
    client.ema(q, e, decay=0.99, warmup=True, warmup_power=0.75, update_after_step=2)
    schedule = {"decay": 0.99, "warmup": True, "warmup_gamma": 1.0, "warmup_power": 0.75, "min_decay": 0.0,
                "update_after_step": 2, "step": 2}
    sizes = client.size(e)
    assert sizes == {"weight": (1, 2), "bias": (1,), ".ema": schedule}
    listed = {info.handle.id: info for info in client.handles()}
    assert listed[e.id].ema == schedule and listed[q.id].ema is None
    assert client.Dictionary({"x": 1.0}).keys() == ["x"]
    d = client.Dictionary({"weight": np.zeros((1, 2), np.float32), "bias": np.zeros(1, np.float32)})
    client.ema(q, d.handle)
    assert d.keys() == ["weight", "bias"]  # '.ema' is shown by size, but is not an entry


def test_a_request_that_leaves_the_schedule_unset_keeps_the_dictionarys(live_server: LiveServer, client: Client) -> None:
    q = client.module(["linear", 2, 1])
    e = client.copyparms(q)
    client.ema(q, e, decay=0.5, min_decay=0.25, warmup=True)
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        reply = stub.UpdateMovingAverage(
            pb.UpdateMovingAverageRequest(handle=q.id, dictionary=e.id, request_id="7c9e6679-7425-40de-944b-e07fc1f90ae7"),
            timeout=30,
        )
        # step 2: warm-up gives 1 - 2**(-2/3) ~ 0.37, clamped to the kept [0.25, 0.5]
        assert reply.step == 2 and reply.decay == pytest.approx(1 - 2 ** (-2 / 3), abs=1e-15)
        reply = stub.UpdateMovingAverage(
            pb.UpdateMovingAverageRequest(handle=q.id, dictionary=e.id, decay=0.3), timeout=30
        )
        assert reply.step == 3 and reply.decay == 0.3  # min_decay 0.25 kept; warm-up 0.52 clamped to 0.3
    assert client.size(e)[".ema"]["min_decay"] == 0.25 and client.size(e)[".ema"]["decay"] == 0.3


def test_a_first_update_without_a_schedule_takes_timms_defaults(live_server: LiveServer, client: Client) -> None:
    q = client.module(["linear", 2, 1])
    e = client.copyparms(q)
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        stub.UpdateMovingAverage(pb.UpdateMovingAverageRequest(handle=q.id, dictionary=e.id), timeout=30)
    kept = client.size(e)[".ema"]
    assert kept == {"decay": 0.9999, "warmup": False, "warmup_gamma": 1.0, "warmup_power": 2 / 3, "min_decay": 0.0,
                    "update_after_step": 0, "step": 1}


def test_buffers_through_the_wire_average_floats_and_copy_counts(client: Client) -> None:
    q = client.module(BN_NET)
    e = client.copyparms(q, buffers=True)
    s = client.copyparms(q, buffers=True, dtype="float64")
    assert client.size(e)["b.num_batches_tracked"] == ()
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    for _ in range(3):
        client.free(client.nforward(q, x))  # train-mode forward: running statistics and the count move
        client.ema(q, e, decay=0.5, buffers=True)
        client.avgparms(q, s, buffers="copy")
    values, module_buffers, averaged = client.dict(e), client.dict(client.buffers(q)), client.dict(s)
    assert values["b.num_batches_tracked"] == module_buffers["b.num_batches_tracked"] == 3
    assert not np.array_equal(values["b.running_mean"], module_buffers["b.running_mean"])  # averaged, lagging
    np.testing.assert_array_equal(averaged["b.running_mean"], module_buffers["b.running_mean"].astype(np.float64))
    assert averaged["b.num_batches_tracked"] == 3 and averaged[".n"] == 4.0


def test_a_dictionary_is_a_source(client: Client) -> None:
    e = client.dict({"w": np.zeros(3, np.float32), "k": np.int64(0)})
    source = client.dict({"w": np.ones(3, ml_bf16()), "k": np.int64(5)})
    assert client.ema(source, e, decay=0.5, step=2) == 2
    assert client.dict(e, "w").tolist() == [0.5] * 3 and client.dict(e, "k") == 5


def ml_bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, q, e, t: c.ema(q, e, decay=1.5), "decay must be between 0 and 1"),
        (lambda c, q, e, t: c.ema(q, e, warmup=True, warmup_gamma=0.0), "warmup_gamma must be a finite number greater than 0"),
        (lambda c, q, e, t: c.ema(q, e, step=-2), "step must be between 0"),
        (lambda c, q, e, t: c.ema(q, e, buffers=True), "buffer 'b.running_mean' not found in the dictionary; copy the buffers"),
        (lambda c, q, e, t: c.ema(e, e, buffers="copy"), "a dictionary source has no buffers"),
        (lambda c, q, e, t: c.ema(t, e), "expecting module or model or optimizer or dictionary handle"),
        (lambda c, q, e, t: c.copyparms(q, dtype="int32"), "converts to a floating dtype"),
    ],
    ids=["decay", "gamma", "step", "missing-buffer", "dictionary-buffers", "tensor-source", "integer-copy"],
)
def test_bad_ema_calls_are_invalid_arguments_that_say_the_fix_and_change_nothing(
    client: Client, unchanged: object, call: object, message: str
) -> None:
    q = client.module(BN_NET)
    e = client.copyparms(q)
    t = client.tensor(np.zeros(2))
    client.ema(q, e, decay=0.5)
    with unchanged(), pytest.raises(InvalidArgumentError, match=message):  # type: ignore[operator]
        call(client, q, e, t)  # type: ignore[operator]


def test_an_unknown_dictionary_is_not_found(client: Client) -> None:
    q = client.module(["linear", 2, 1])
    with pytest.raises(NotFoundError):
        client.ema(q, "dic_" + "0" * 32)


def test_client_side_argument_errors_need_no_server(client: Client) -> None:
    q = client.module(["linear", 2, 1])
    with pytest.raises(ValueError, match="buffers must be False"):
        client.ema(q, client.copyparms(q), buffers="average")
    with pytest.raises(ValueError, match="unknown dtype 'f32'"):
        client.copyparms(q, dtype="f32")
    with pytest.raises(TypeError, match="shape a new copy"):
        client.copyparms(q, client.copyparms(q), dtype="float32")


def test_an_ema_survives_a_snapshot_and_continues_bit_identically(state_server: Runtime, tmp_path: Path) -> None:
    with Client(f"127.0.0.1:{state_server.port}", timeout=60) as c:
        q = c.module(["linear", 4, 3])
        c.to(q, dtype="bfloat16")
        e = c.copyparms(q, dtype="float32")
        for scale in (1.0, 2.0, 3.0):
            set_weights(c, q, scale)
            c.ema(q, e, decay=0.9, warmup=True, min_decay=0.1)
        kept = c.size(e)[".ema"]
        assert c.snapshot()["skipped"] == []
        set_weights(c, q, 4.0)
        reference = (c.ema(q, e), c.dict(e))  # the never-restarted server: the kept schedule, step 4
    restored = Registry()
    snapshot.load(restored, tmp_path / "d", torch.device("cpu"))
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu"), registry=restored)
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=60) as c2:
            assert c2.size(e)[".ema"] == kept
            set_weights(c2, q, 4.0)
            step, values = c2.ema(q, e), c2.dict(e)
    finally:
        runtime.stop(None)
    assert step == reference[0] == 4
    for name, value in reference[1].items():
        assert value.dtype == values[name].dtype and value.tobytes() == values[name].tobytes(), name


def timm_decay(step: int, decay: float, gamma: float, power: float, least: float, after: int) -> float:
    """timm ModelEmaV3.get_decay with warm-up (the reference file's transcription), the oracle below."""
    since = max(0, step - after - 1)
    if since <= 0:
        return 0.0
    return max(least, min(decay, 1.0 - (1.0 + since / gamma) ** -power))


def test_explicit_steps_out_of_order_and_the_extremes_follow_timms_schedule_and_torchs_lerp(client: Client) -> None:
    """Steps given explicitly and out of order (a resumed or replayed job), step 0, the largest
    step, and the implicit steps after them, with warm-up: each update uses timm's decay at that
    step and lerps as torch does (NaN and infinities in the weights included), and the next
    implicit step is one past the last used."""
    schedule = dict(decay=0.9, warmup=True, warmup_gamma=1.5, warmup_power=0.75, min_decay=0.2, update_after_step=2)
    values = [np.array([1.0, -2.0, 0.5], np.float32), np.array([3.0, np.nan, -1.0], np.float32),
              np.array([np.inf, 4.0, 2.0], np.float32), np.array([-5.0, 1.0, 7.0], np.float32)]
    e = client.dict({"w": values[0]})
    expected = torch.from_numpy(values[0].copy())
    steps: list[int | None] = [7, 3, 3, 0, None, 2**62, 20, None, None]
    last = 0
    for k, step in enumerate(steps):
        source = client.dict({"w": values[k % len(values)]})
        used = client.ema(source, e, step=step, **schedule)  # type: ignore[arg-type]
        want = step if step is not None else last + 1
        assert used == want
        decay = timm_decay(want, 0.9, 1.5, 0.75, 0.2, 2)
        value = torch.from_numpy(values[k % len(values)])
        if decay == 0.0:
            expected.copy_(value)  # a full copy, exact even over a non-finite average
        else:
            expected.lerp_(value, 1.0 - decay)
        got = torch.from_numpy(np.asarray(client.dict(e, "w")))
        assert torch.equal(got.isnan(), expected.isnan()), (step, got, expected)
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected)), (step, got, expected)
        assert client.size(e)[".ema"]["step"] == want
        last = want
        client.free(source)
