"""Snapshots of models, optimizers and losses: a restored model trains on exactly as if never stopped.

The oracle is a server that was never restarted: the original server after an on-demand snapshot,
or, for SIGTERM, an in-process server driven through the same calls. Weights start from fixed
arrays, and shuffling comes from each model's seeded generator, so both servers compute the same
floating-point operations in the same order: equality is bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from weightavg import Client, Handle
from weightavg_server.store import snapshot
from weightavg_server.ops.app import Runtime, create_runtime
from weightavg_server.ops.config import ServerConfig
from weightavg_server.store.registry import Kind, Registry

from conftest import LiveServer
from test_snapshot import _peak_mib_over, start_server as start_subprocess

NET = ["sequential", ["linear", "a", 6, 8], ["batchnorm1d", "b", 8], ["relu", "c"], ["linear", "d", 8, 3]]


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def prepare(c: Client) -> dict[str, Handle]:
    """Two models trained a few epochs (momentum SGD with nesterov, and Adam), with every part that a
    snapshot must keep: shared module, loss and optimizer handles, a changed learning rate, shuffle
    generators mid-sequence, test options, an input handle, averaged dictionaries."""
    rng = np.random.default_rng(7)
    h: dict[str, Handle] = {}
    for name, opt in (("sgd", ("sgd", 0.05, 0.9)), ("adam", ("adam", 0.01))):
        q = c.module(NET)
        for p in c.parmnames(q):
            c.parm(q, p, rng.standard_normal(c.parm(q, p).shape).astype(np.float32) * 0.5)
        loss = c.loss("ce", smoothing=0.05)
        o = c.opt(opt[0], q, *opt[1:], **({"nesterov": True} if name == "sgd" else {}))
        m = c.model(c.addref(q), c.addref(loss), c.addref(o))
        h.update({f"{name}_q": q, f"{name}_loss": loss, f"{name}_opt": o, name: m})
        c.train(m, batchsize=16, shuffle=True, seed=11, metrics=["loss", "batchloss"])
        c.train(m, *_data(1, 100))
        c.test(m, batchsize=30, metrics=["accuracy", "output"])
        c.test(m, *_data(2, 40))
        for _ in range(3):
            c.run(m)
        avg = c.copyparms(m)
        for _ in range(2):
            c.run(m)
            c.avgparms(m, avg)
        h[f"{name}_avg"] = avg
    c.lr(h["sgd_opt"], 0.03)  # through the optimizer's own handle: the model's optimizer is the same
    h["input"] = c.input(h["sgd"])
    c.batch(h["sgd"])
    c.batch(h["sgd"])  # the model's data stand at their second batch
    return h


def carry_on(c: Client, h: dict[str, Handle]) -> dict[str, Any]:
    """What a client sees after more work: batching on from where it stood, one more epoch and
    average per model, a test run; every weight, buffer and average."""
    seen: dict[str, Any] = {"batch": c.tensor(h["input"]), "more": c.batch(h["sgd"])}
    seen["batch2"] = c.tensor(h["input"])
    for name in ("sgd", "adam"):
        m = h[name]
        seen[f"{name}_run"] = c.run(m)
        seen[f"{name}_count"] = c.avgparms(m, h[f"{name}_avg"])
        seen[f"{name}_avg"] = c.dict(h[f"{name}_avg"])
        seen[f"{name}_test"] = c.testrun(m)
        seen[f"{name}_parms"] = {p: c.parm(h[f"{name}_q"], p) for p in c.parmnames(m)}
        seen[f"{name}_buffers"] = c.dict(c.buffers(m))
        seen[f"{name}_lr"] = c.lr(h[f"{name}_opt"])
        seen[f"{name}_describe"] = c.model(m)
    return seen


def carry_on_restored(registry: Registry, h: dict[str, Handle]) -> dict[str, Any]:
    """`carry_on` through a new server over a registry restored from a snapshot."""
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu"), registry=registry)
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=120) as c:
            return carry_on(c, h)
    finally:
        runtime.stop(None)


def assert_bit_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    else:
        assert type(a) is type(b) and a == b, (where, a, b)



def test_an_on_demand_snapshot_restores_models_that_train_on_bit_identically(
    state_server: Runtime, tmp_path: Path
) -> None:
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        h = prepare(c)
        result = c.snapshot()
        assert result["skipped"] == [] and result["handles"] == len(h)
        reference = carry_on(c, h)  # the never-restarted server goes on
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == len(h)
    # One module object behind the model, the module handle, the optimizer and the input handle,
    # all under one lock: the parts are shared as they were, not copies.
    entries = dict(restored.items())
    model = entries[h["sgd"].id].obj
    assert entries[h["sgd_q"].id].obj is model.module
    assert entries[h["sgd_opt"].id].obj is model.optimizer and model.optimizer.module is model.module
    assert entries[h["sgd_loss"].id].obj is model.loss
    assert entries[h["input"].id].obj.tensor is model.train_data.x
    assert len({id(entries[h[k].id].lock) for k in ("sgd", "sgd_q", "sgd_opt", "input")}) == 1
    assert entries[h["sgd"].id].lock is not entries[h["adam"].id].lock
    assert model.optimizer.optim.state  # momentum buffers came back
    after = carry_on_restored(restored, h)
    assert after["batch"].shape == (16, 6) and after["more"] is True
    assert after["sgd_lr"] == 0.03 and after["sgd_count"] == 4
    assert_bit_identical(after, reference)


def test_sigterm_restores_models_that_train_on_bit_identically(
    tmp_path: Path, start_server: Callable[..., LiveServer]
) -> None:
    state_dir = tmp_path / "state"
    server = start_subprocess(state_dir)
    try:
        with Client(server.address, timeout=120) as c:
            h = prepare(c)
        code, err = server.terminate()
        assert code == 0, err
        assert "no snapshot format" not in err and "cannot save" not in err
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()
    reference_server = start_server()
    with Client(reference_server.address, timeout=120) as ref:
        reference = carry_on(ref, prepare(ref))
    again = start_subprocess(state_dir)
    try:
        with Client(again.address, timeout=120) as c2:
            assert sorted(i.handle.id for i in c2.handles()) == sorted(x.id for x in h.values())
            after = carry_on(c2, h)
    finally:
        code, err = again.terminate()
    assert code == 0, err
    assert_bit_identical(after, reference)


def test_a_restored_optimizer_keeps_every_state_tensor(state_server: Runtime, tmp_path: Path) -> None:
    """Each optimizer type's state (momentum buffers, moment estimates, step counts) comes back with
    its dtype and value; nothing is re-initialised."""
    kinds: dict[str, tuple[Any, ...]] = {
        "sgd": (0.1, 0.9), "adam": (0.01, 0.9, 0.99, 1e-8, 0.0, True), "adamw": (0.01,), "rmsprop": (0.01, 0.9, 1e-8, 0.0, 0.5, True),
        "adagrad": (0.1,), "fedadam": (0.1, 0.9, 0.99, 1e-3), "fedyogi": (), "fedadagrad": (0.1,),
    }
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        handles = {}
        for kind, args in kinds.items():
            q = c.module(["linear", 6, 3])
            m = c.model(q, c.loss("ce"), c.opt(kind, q, *args))
            c.train(m, *_data(3, 20))
            c.run(m)
            handles[kind] = m
        c.snapshot()
    live = dict(state_server.registry.items())
    restored = Registry()
    snapshot.load(restored, tmp_path / "d", torch.device("cpu"))
    back = dict(restored.items())
    for kind, m in handles.items():
        before, after = live[m.id].obj.optimizer.optim, back[m.id].obj.optimizer.optim
        assert type(after) is type(before)
        assert after.param_groups[0]["lr"] == before.param_groups[0]["lr"]
        assert [p.data_ptr() for p in after.param_groups[0]["params"]] == [
            p.data_ptr() for p in back[m.id].obj.module.parameters()
        ]
        old, new = before.state_dict()["state"], after.state_dict()["state"]
        assert old.keys() == new.keys() and old, kind
        for i in old:
            assert old[i].keys() == new[i].keys(), kind
            for key, value in old[i].items():
                if isinstance(value, torch.Tensor):
                    assert new[i][key].dtype == value.dtype and torch.equal(new[i][key], value), (kind, key)
                else:
                    assert new[i][key] == value, (kind, key)
        assert back[m.id].obj.optimizer.options == live[m.id].obj.optimizer.options


def test_an_adagrad_whose_init_no_longer_fits_its_moved_parameters_restores(state_server: Runtime, tmp_path: Path) -> None:
    """Adagrad's sums are filled with `init` when it is built; after a move to float16, init 1e5 does not
    fit, and the restore's rebuild raised torch's overflow: the state directory could not be restored."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        q = c.module(["linear", 6, 3])
        m = c.model(q, c.loss("mse"), c.opt("adagrad", q, 0.1, init=1e5))
        c.to(m, "cpu", "float16")
        c.snapshot()
    live = state_server.registry.get(m.id).obj.optimizer
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == 1
    back = restored.get(m.id).obj.optimizer
    assert back.options == live.options and back.options["init"] == 1e5
    assert back.optim.param_groups[0]["initial_accumulator_value"] == 1e5
    old, new = live.optim.state_dict()["state"], back.optim.state_dict()["state"]
    assert old.keys() == new.keys() and old
    for i in old:
        assert new[i]["sum"].dtype == torch.float16 and torch.equal(new[i]["sum"], old[i]["sum"])
        assert torch.equal(new[i]["step"], old[i]["step"])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_an_adagrad_model_restores_without_a_second_set_of_sums(state_server: Runtime, tmp_path: Path) -> None:
    """Adagrad fills its sums when it is built: the restore's rebuild allocated them, a copy of the
    module's bytes that nothing reserved, and held them until the saved sums replaced them (a
    restore peaked 5x the module's bytes for a 128 MiB module, where 4x are needed: the file's
    module and sums, the module, the sums; found by review). The rebuild is made over meta twins."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        q = c.module(["linear", 4096, 8192])  # 128 MiB
        m = c.model(q, c.loss("mse"), c.opt("adagrad", q, 0.1, init=0.5))
        c.snapshot()
    restored = Registry()
    peak = _peak_mib_over(lambda: snapshot.load(restored, tmp_path / "d", torch.device("cpu")))
    assert peak < 128 * 4.5
    live, back = state_server.registry.get(m.id).obj.optimizer.optim, restored.get(m.id).obj.optimizer.optim
    assert back.param_groups[0]["params"] == list(restored.get(m.id).obj.module.parameters())
    assert back.param_groups[0]["initial_accumulator_value"] == 0.5
    old, new = live.state_dict()["state"], back.state_dict()["state"]
    assert old.keys() == new.keys() == {0, 1}
    for i in old:
        assert torch.equal(new[i]["sum"], old[i]["sum"]) and torch.equal(new[i]["step"], old[i]["step"])
    assert restored.held_bytes() == {"cpu": 2 * (4096 * 8192 + 8192) * 4 + 2 * 4}


def test_a_snapshot_saved_on_cuda_restores_on_a_cpu_server_and_trains_on(
    state_server: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CUDA server writes each tensor's device ("cuda:0") into the state; a server without that
    device places the tensors on its own. Written here by editing a CPU snapshot's devices (no GPU):
    the models train on bit-identically to the server that wrote it, and the log says so once per
    missing device (it said so once per tensor: 64 lines for these two small models, thousands for
    a real one; found by review)."""
    import hashlib
    import json
    import logging

    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        h = prepare(c)
        c.snapshot()
        reference = carry_on(c, h)
    directory = tmp_path / "d"
    manifest = json.loads((directory / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith("state-"))
    state = json.loads((directory / name).read_text())
    for info in state["tensors"].values():
        info["device"] = "cuda:0" if info["device"] == "cpu" else info["device"]
    raw = json.dumps(state).encode()
    (directory / name).write_bytes(raw)
    manifest["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if torch.cuda.is_available():
        pytest.skip("the server has cuda:0, so the tensors would go there")
    restored = Registry()
    with caplog.at_level(logging.WARNING, logger="weightavg.snapshot"):
        assert snapshot.load(restored, directory, torch.device("cpu")) == len(h)
    assert [r.getMessage() for r in caplog.records if r.name == "weightavg.snapshot"] == [
        "snapshot tensors were on cuda:0, which this server lacks; placing them on cpu"
    ]
    assert_bit_identical(carry_on_restored(restored, h), reference)


def test_a_model_without_data_and_a_lone_loss_restore(state_server: Runtime, tmp_path: Path) -> None:
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        q = c.module(["linear", 2, 2])
        m = c.model(q, c.loss("mse", "sum"), c.opt("sgd", q))
        lone = c.loss("smoothl1", beta=0.5)
        described = c.model(m)
        c.snapshot()
    restored = Registry()
    assert snapshot.load(restored, tmp_path / "d", torch.device("cpu")) == 2
    back = dict(restored.items())
    assert back[lone.id].kind is Kind.LOSS and back[lone.id].obj.options == {"reduce": "mean", "beta": 0.5}
    assert back[lone.id].obj.fn.beta == 0.5
    runtime = create_runtime(ServerConfig(host="127.0.0.1", port=0, device="cpu"), registry=restored)
    runtime.start()
    try:
        with Client(f"127.0.0.1:{runtime.port}", timeout=120) as c2:
            assert c2.model(m) == described
    finally:
        runtime.stop(None)


def test_models_moved_to_float64_restore_and_train_on_bit_identically(state_server: Runtime, tmp_path: Path) -> None:
    """A move carries the optimizer's state and the data (the SGD model's stand at their second
    batch): a snapshot keeps the new dtypes, and the restored models train on as the original does."""
    with Client(f"127.0.0.1:{state_server.port}", timeout=120) as c:
        h = prepare(c)
        c.to(h["sgd"], dtype="float64")
        c.to(h["adam_opt"], dtype="float64")  # through the optimizer's own handle
        c.snapshot()
        reference = carry_on(c, h)
    assert reference["batch"].dtype == np.float64 and reference["batch"].shape == (16, 6)
    restored = Registry()
    snapshot.load(restored, tmp_path / "d", torch.device("cpu"))
    after = carry_on_restored(restored, h)
    assert after["adam_parms"] and all(p.dtype == np.float64 for p in after["adam_parms"].values())
    assert_bit_identical(after, reference)
