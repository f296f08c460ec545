"""Caps on tensor bytes per device, live handles, message size, upload size and spec depth, each
through a real server started with small caps: over a cap is RESOURCE_EXHAUSTED (or
INVALID_ARGUMENT for depth), refused before allocating, changes nothing, and the server serves on."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from conftest import LiveServer, assert_unchanged, snapshot
from weightavg import Client, InvalidArgumentError, ResourceExhaustedError
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain import specs
from weightavg_server.transport import convert
from weightavg_server.ops.cli import build_parser, config_from_args
from weightavg_server.ops.config import ServerConfig

CAP = 64 * 1024
"""Device byte cap of the capped server: room for one 100x100 linear layer (40,400 bytes), not two."""


@contextlib.contextmanager
def built_with_room(server: LiveServer) -> Iterator[None]:
    """The cap doubled for the block: a 100x100 linear layer's weight is built in a storage of its own
    before it is copied into the module's buffer, 80,400 bytes at the widest (`footprint.module_bytes`)."""
    limits = server.registry.limits
    server.registry.set_limits(dataclasses.replace(limits, max_device_bytes=2 * CAP))
    try:
        yield
    finally:
        server.registry.set_limits(limits)


@pytest.fixture
def capped(start_server):  # type: ignore[no-untyped-def]
    return start_server(max_device_bytes=CAP, max_upload_bytes=1 << 62)


@pytest.fixture
def capped_client(capped) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    with Client(capped.address, timeout=60) as c:
        yield c


def refused(server, call) -> str:  # type: ignore[no-untyped-def]
    """Run a call that must hit the device byte cap; assert it changed nothing; return its message."""
    before = snapshot(server.registry)
    held = server.registry.held_bytes()
    with pytest.raises(ResourceExhaustedError) as err:
        call()
    assert_unchanged(before, snapshot(server.registry))
    assert server.registry.held_bytes() == held
    assert "--max-device-bytes" in err.value.message
    return err.value.message


def test_module_over_the_byte_cap_is_refused_from_its_spec(capped, capped_client: Client) -> None:
    c = capped_client
    with built_with_room(capped):
        m = c.module(["linear", 100, 100])
    assert capped.registry.held_bytes() == {"cpu": 100 * 100 * 4 + 100 * 4}
    refused(capped, lambda: c.module(["linear", 100, 100]))
    # 20000 x 20000 floats would be 1.6 GB, and as much again while the weight is built in a storage of its
    # own: refused from the spec's estimate, before building it.
    message = refused(capped, lambda: c.module(["sequential", ["linear", 20000, 20000], ["relu"]]))
    assert "3200080000 more tensor bytes" in message
    c.ping()
    c.free(m)
    assert capped.registry.held_bytes() == {}
    c.module(["linear", 100, 50])  # room again once the first is freed (20,200 bytes, its weight 20,000 more)


def test_every_allocating_call_checks_the_byte_cap(capped, capped_client: Client) -> None:
    c = capped_client
    with built_with_room(capped):
        m = c.module(["linear", 100, 100])  # 40,400 bytes
    d = c.dict({"x": np.zeros(3000, np.float32)})  # 12,000
    t = c.tensor(np.zeros(100, np.float32))  # 400: 52,800 of 65,536 held, 12,736 left
    big = np.zeros(5000, np.float32)  # 20,000 bytes
    refused(capped, lambda: c.copyparms(m))
    refused(capped, lambda: c.dict({"small": np.zeros(1000, np.float32), "big": big}))  # fails at the 2nd
    refused(capped, lambda: c.dict(d, "y", big))
    refused(capped, lambda: c.tensor(big))
    refused(capped, lambda: c.parm(m, "extra", big))
    refused(capped, lambda: c.to(m, dtype="float64"))  # float64 copies of 40,400 bytes of floats
    refused(capped, lambda: c.to(d, dtype="float64"))
    assert capped.registry.held_bytes() == {"cpu": 52_800}
    # Calls that allocate nothing still work at the cap, and the server still serves.
    assert c.avgparms(m, c.parms(m)) == 2
    assert c.size(t) == (100,)
    c.dict({"fits": np.zeros(3000, np.float32)})
    c.ping()


def test_upload_is_refused_from_its_header_before_the_data_arrives(capped) -> None:
    """A header declaring a terabyte is refused by the cap at once; no buffer of that size is made."""
    stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(capped.address))
    header = pb.TensorChunk(name="x", dtype=pb.DTYPE_FLOAT32, shape=[2**38])
    for call, request in [
        (stub.CreateDictionary, pb.CreateDictionaryRequest(chunk=header)),
        (stub.CreateTensor, pb.CreateTensorRequest(chunk=header)),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(iter([request]), timeout=30)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-device-bytes" in err.value.details()
    stub.Ping(pb.PingRequest(), timeout=30)
    assert capped.registry.held_bytes() == {} and len(capped.registry) == 0


def test_concurrent_creators_never_overshoot_the_byte_cap(capped) -> None:
    """16 threads each upload 10,000 bytes against a 65,536-byte cap: exactly 6 fit, whatever the order."""
    results: list[str] = []
    lock = threading.Lock()

    def create() -> None:
        with Client(capped.address, timeout=60) as c:
            try:
                c.tensor(np.zeros(2500, np.float32))
                outcome = "ok"
            except ResourceExhaustedError:
                outcome = "refused"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert sorted(results) == ["ok"] * 6 + ["refused"] * 10
    assert capped.registry.held_bytes() == {"cpu": 60_000}


def test_byte_accounting_returns_to_zero(start_server) -> None:  # type: ignore[no-untyped-def]
    """After views, addrefs, copies, averages, updates, deletes and moves, freeing all leaves 0 bytes held."""
    server = start_server(max_device_bytes=1 << 30)
    with Client(server.address, timeout=60) as c:
        m = c.module(["sequential", ["linear", "a", 8, 4], ["batchnorm1d", "b", 4]])
        view, bufs, ref = c.parms(m), c.buffers(m), c.addref(m)
        p = c.copyparms(m)
        c.avgparms(m, p)
        c.dict(p, "extra", np.ones(7, np.float64))
        c.delete(p, "extra")
        c.to(p, dtype="float64")
        c.to(m, dtype="float64")
        c.parm(m, "new", np.ones(3, np.float32))
        t = c.tensor(np.ones(5, np.int16))
        c.to(t, dtype="float32")
        infos = {i.handle.id: i.bytes for i in c.handles()}
        held = server.registry.held_bytes()["cpu"]
        # The module is charged once for itself, its views and its second handle.
        assert held == infos[m.id] + infos[p.id] + infos[t.id]
        assert infos[view.id] <= infos[m.id] and infos[ref.id] == infos[m.id] and infos[bufs.id] > 0
        c.free(m)
        assert server.registry.held_bytes()["cpu"] == held  # still alive through ref and the views
        c.free(ref, view, bufs)
        assert server.registry.held_bytes()["cpu"] == infos[p.id] + infos[t.id]
        c.purge()
        assert server.registry.held_bytes() == {}


def test_handle_cap(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(max_handles=3)
    with Client(server.address, timeout=60) as c:
        m = c.module(["linear", 2, 2])
        d = c.dict({"a": 1.0})
        t = c.tensor(np.ones(2))
        for call in [
            lambda: c.module(["linear", 2, 2]), lambda: c.copyparms(m), lambda: c.parms(m),
            lambda: c.buffers(m), lambda: c.addref(d), lambda: c.dict({"b": 2.0}), lambda: c.tensor(np.ones(1)),
        ]:
            before = snapshot(server.registry)
            with pytest.raises(ResourceExhaustedError, match="cap of 3 live handles"):
                call()
            assert_unchanged(before, snapshot(server.registry))
        c.ping()
        c.free(t)
        c.addref(d)


def test_message_size_cap(start_server) -> None:  # type: ignore[no-untyped-def]
    cap = 64 * 1024
    server = start_server(max_message_bytes=cap, chunk_bytes=16 * 1024)
    with Client(server.address, timeout=60, chunk_bytes=16 * 1024) as c:
        d = c.dict({"w": np.arange(100_000, dtype=np.float32)})
        with pytest.raises(ResourceExhaustedError, match="over the cap of 65536"):
            c.module(["linear", "x" * 100_000, 2, 2])
        # Tensors far bigger than the cap still travel, in chunks below it.
        np.testing.assert_array_equal(c.dict(d, "w"), np.arange(100_000, dtype=np.float32))
        before = snapshot(server.registry)
        with Client(server.address, timeout=60, chunk_bytes=100_000) as big_chunks:
            # The whole stream fails, even the entry that came before the oversized chunk.
            for call in [
                lambda: big_chunks.dict({"small": np.zeros(10, np.float32), "w": np.zeros(100_000, np.float32)}),
                lambda: big_chunks.dict(d, {"small": np.zeros(10, np.float32), "w": np.ones(100_000, np.float32)}),
            ]:
                with pytest.raises(ResourceExhaustedError, match="over the cap of 65536"):
                    call()
        assert_unchanged(before, snapshot(server.registry))
        c.ping()


def test_spec_depth_cap(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(max_spec_depth=3)

    def nested(depth: int) -> list:  # type: ignore[type-arg]
        spec: list = ["linear", 1, 1]  # type: ignore[type-arg]
        for _ in range(depth):
            spec = ["sequential", spec]
        return spec

    with Client(server.address, timeout=60) as c:
        c.module(nested(3))
        with pytest.raises(InvalidArgumentError, match="deeper than 3"):
            c.module(nested(4))
        assert len(server.registry) == 1


def test_spec_layer_cap(start_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A spec is refused before anything is built once it holds more layers than the cap, at any depth,
    and GetServerInfo says the cap. A bare LayerSpec message of many `relu` children, as a generated
    client sends it, was built whatever its size: 0.4 ms and 2.5 KB a layer, out of any cap's sight, so
    one 64 MiB request (eight million layers) could run the host out of memory. The layers converted are
    recorded (a bound on the refusal's time said the same, and could fail on a loaded machine)."""
    converted: list[str] = []
    layer_spec = convert._layer_spec

    def recorded(message: pb.LayerSpec, max_depth: int, depth: int) -> specs.LayerSpec:
        converted.append(message.type)
        return layer_spec(message, max_depth, depth)

    monkeypatch.setattr(convert, "_layer_spec", recorded)
    server = start_server(max_spec_layers=5)
    spec = ["sequential", ["sequential", "s", ["relu", "a"], ["relu", "b"]], ["relu", "c"]]  # five layers
    with Client(server.address, timeout=60) as c, grpc.insecure_channel(server.address) as channel:
        assert c.info()["max_spec_layers"] == 5
        c.module(spec)
        assert len(converted) == 5
        with pytest.raises(InvalidArgumentError, match="more than 5 layers"):
            c.module([*spec, ["relu", "e"]])
        with pytest.raises(InvalidArgumentError, match="more than 5 layers"):
            c.module(["sequential", ["sequential", "s", *(["relu"] for _ in range(5))]])
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        wide = pb.LayerSpec(type="sequential", children=[pb.LayerSpec(type="relu")] * 200_000)
        converted.clear()
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateModule(pb.CreateModuleRequest(spec=wide), timeout=60)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "--max-spec-layers" in err.value.details()
        assert converted == []  # refused on the count, before converting any layer; building took about 80 s
        assert len(server.registry) == 1


def test_the_default_layer_cap_refuses_a_wide_spec_message_at_once(live_server: LiveServer) -> None:
    """The same through the default cap of a server started with no flags."""
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        wide = pb.LayerSpec(type="sequential", children=[pb.LayerSpec(type="relu")] * specs.MAX_SPEC_LAYERS)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateModule(pb.CreateModuleRequest(spec=wide), timeout=60)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert f"more than {specs.MAX_SPEC_LAYERS} layers" in err.value.details()


def test_upload_byte_cap_per_request(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(max_upload_bytes=1000)
    with Client(server.address, timeout=60) as c:
        c.dict({"a": np.zeros(250, np.float32)})
        with pytest.raises(ResourceExhaustedError, match="at most 1000 bytes"):
            c.dict({"a": np.zeros(150, np.float32), "b": np.zeros(150, np.float32)})
        assert len(server.registry) == 1


def test_caps_come_from_flags_and_environment() -> None:
    env = {"WEIGHTAVG_MAX_DEVICE_BYTES": "12345", "WEIGHTAVG_MAX_HANDLES": "7"}
    config = ServerConfig.from_env(env)
    assert (config.max_device_bytes, config.max_handles) == (12345, 7)
    args = build_parser().parse_args(["--max-device-bytes", "999", "--max-handles", "5"])
    assert (config_from_args(args).max_device_bytes, config_from_args(args).max_handles) == (999, 5)
    assert ServerConfig().max_device_bytes == 0  # the device's own memory size


def test_serve_command_applies_the_caps() -> None:
    """`python -m weightavg_server` with cap flags and variables refuses over them."""
    env = {**os.environ, "WEIGHTAVG_MAX_HANDLES": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightavg_server", "--port", "0", "--device", "cpu", "--max-device-bytes", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("weightavg serving on"), line
        with Client(line.split()[-1], timeout=60) as c:
            with pytest.raises(ResourceExhaustedError, match="--max-device-bytes"):
                c.tensor(np.zeros(26, np.float32))
            c.tensor(np.zeros(25, np.float32))
            with pytest.raises(ResourceExhaustedError, match="cap of 1 live handles"):
                c.tensor(np.zeros(1, np.float32))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_is_resource_exhausted_and_the_server_serves_on(start_server) -> None:  # type: ignore[no-untyped-def]
    """With no byte cap, copies of a 1 GiB module fill the GPU until CUDA itself runs out: that call is
    RESOURCE_EXHAUSTED, nothing is registered for it, and after freeing a copy the next one works."""
    server = start_server(device="cuda", max_device_bytes=2**62)
    with Client(server.address, timeout=300) as c:
        m = c.module(["linear", 16384, 16384, False])  # 2**28 floats: 1 GiB
        copies = []
        limit = torch.cuda.get_device_properties(0).total_memory // (1 << 30) + 2
        with pytest.raises(ResourceExhaustedError, match="CUDA out of memory"):
            for _ in range(limit):
                copies.append(c.copyparms(m))
        assert len(server.registry) == 1 + len(copies)
        c.ping()
        c.free(copies.pop())
        copies.append(c.copyparms(m))
        c.purge()
    torch.cuda.empty_cache()  # the in-process server's allocator keeps the GPU otherwise: later tests' servers need it


def test_a_forward_whose_output_overflows_int64_is_refused_not_run(live_server: LiveServer) -> None:
    """An adaptive pool to 2**40 x 2**40 has more output bytes than int64 counts, which meta refuses:
    the sizing pass reserved nothing then and let the real pass run, which for a convolution answered
    a wrong, tiny output (torch's CPU convolution counts those sizes in 32 bits; see the next test).
    It is RESOURCE_EXHAUSTED now, before the module runs."""
    with Client(live_server.address, timeout=60) as c:
        q = c.module(["adaptavg2d", [2**40, 2**40]])
        before = snapshot(live_server.registry)
        for verb in (c.forward, c.eforward):
            with pytest.raises(ResourceExhaustedError, match="larger than any memory"):
                verb(q, np.ones((1, 1, 3, 3), np.float32))
        assert_unchanged(before, snapshot(live_server.registry))
        c.free(q)


@pytest.mark.parametrize(
    "options, output",
    [
        ({"dilate": 2, "pad": 2**32}, "[8589934592]"),  # answered an empty [1, 1, 0] output
        ({"dilate": 2**32 + 1, "pad": 2**32}, "[4294967297]"),  # answered [1, 1, 1]
        ({"pad": 2**31}, "[4294967297]"),  # tried to allocate 34 GB, unreserved
    ],
)
def test_a_convolution_whose_output_torch_would_count_wrongly_is_refused(start_server, options, output) -> None:  # type: ignore[no-untyped-def]
    """torch's CPU convolution computes output sizes in 32 bits, the meta pass that reserves them in
    64: on a server whose cap holds the true output (a big host's memory; here a 1 TiB cap, nothing of
    it allocated), the pass answered a wrong, tiny tensor. Refused INVALID_ARGUMENT before it runs."""
    server = start_server(max_device_bytes=2**40)
    with Client(server.address, timeout=60) as c:
        q = c.module(["conv1d", 1, 1, 2, options])
        before = snapshot(server.registry)
        with pytest.raises(InvalidArgumentError, match=re.escape(f"output of spatial size {output}; torch's convolutions")):
            c.forward(q, np.ones((1, 1, 2), np.float32))
        assert_unchanged(before, snapshot(server.registry))
        assert server.registry.held_bytes() == {"cpu": 12}  # the weight (2) and bias (1), nothing left reserved
        sane = c.module(["conv1d", 1, 1, 2, {"dilate": 2, "pad": 2}])
        assert c.size(c.forward(sane, np.ones((1, 1, 2), np.float32))) == (1, 1, 4)  # it serves on


@pytest.mark.parametrize("call", ["evaluate", "eforward"])
def test_an_eval_pass_of_one_row_through_batchnorm_reserves_its_output(start_server, call: str) -> None:  # type: ignore[no-untyped-def]
    """The output was sized with the module's own train flag (on between calls), where a batch of one
    through batchnorm fails: nothing was reserved, and an eval-mode pass of one row made its output
    past the cap (evaluate's reply is never a handle, so no later check caught it; found by review)."""
    n = 1000
    module_bytes, row_bytes = 4 * n * 4 + 8, n * 4  # weight, bias, running mean and var; the batch count
    server = start_server(max_device_bytes=module_bytes + 2 * row_bytes - 1)  # the row's upload fits, its output not
    with Client(server.address, timeout=60) as c:
        q = c.module(["batchnorm1d", n])
        m = c.model(q, c.loss("mse"), c.opt("sgd", q, 0.1))
        x = np.ones((1, n), np.float32)
        message = refused(server, lambda: c.evaluate(m, x) if call == "evaluate" else c.eforward(m, x))
        kept = 2 * n * 4 + 8  # the copy of the buffers the pass keeps to put them back (`forward_copy_bytes`)
        assert f"{row_bytes + kept} more tensor bytes" in message
        assert server.registry.held_bytes() == {"cpu": module_bytes}


def test_an_epoch_whose_batches_need_more_room_than_the_cap_leaves_is_refused_before_it_trains(start_server) -> None:  # type: ignore[no-untyped-def]
    """A batch's activations (what autograd saves for backward, and the gradients flowing back) were
    never reserved: an epoch of wide batches under a cap its module and data fit ran into the host's
    memory (or the GPU's) instead of the cap. Now one batch's pass is sized on meta before the epoch:
    over the cap RESOURCE_EXHAUSTED naming the batch size, nothing trained; smaller batches train."""
    server = start_server(max_device_bytes=4_000_000)
    with Client(server.address, timeout=60) as c:
        q = c.module(["sequential", ["linear", 4, 2048], ["relu"], ["linear", 2048, 2]])
        m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1))
        rng = np.random.default_rng(0)
        c.train(m, rng.standard_normal((1000, 4)).astype(np.float32), rng.integers(0, 2, 1000))
        c.train(m, batchsize=1000)  # 1000 x 2048 float32 activations, several of them: over 16 MB
        weights = c.dict(c.copyparms(m))
        message = refused(server, lambda: c.run(m))
        assert "train on smaller batches: a batch of 1000 rows takes" in message
        assert "train(m, batchsize=w)" in message
        c.train(m, batchsize=5000)  # larger than the data: a batch is their 1000 rows, and says so
        again = refused(server, lambda: c.run(m))
        assert again.split("a batch of")[1] == message.split("a batch of")[1]
        np.testing.assert_array_equal(c.dict(c.copyparms(m))["0.weight"], weights["0.weight"])
        c.train(m, batchsize=50)
        c.run(m)
        assert not np.array_equal(c.dict(c.copyparms(m))["0.weight"], weights["0.weight"])


def test_a_forward_with_gradients_reserves_what_autograd_keeps_for_backward(start_server) -> None:  # type: ignore[no-untyped-def]
    """forward (train mode, gradients on) keeps every relu's output and every linear's input for a
    backward pass until it ends, most of the layers' outputs at once; its pass was sized without
    gradients, the widest point of eforward and nforward, and allocated twice what it had reserved
    (found by review). Under a cap that eforward and nforward fit, forward is now refused, nothing
    changed, with the fix: a pass without gradients."""
    server = start_server(max_device_bytes=7_000_000)
    with Client(server.address, timeout=60) as c:
        q = c.module(["sequential", ["linear", 4, 256], ["relu"], ["linear", 256, 256], ["relu"],
                      ["linear", 256, 256], ["relu"], ["linear", 256, 2]])
        x = c.tensor(np.random.default_rng(0).standard_normal((2000, 4)).astype(np.float32))
        for fits in (c.eforward, c.nforward):  # 2000 x 256 float32 activations: two of them at once
            c.free(fits(q, x))
        message = refused(server, lambda: c.forward(q, x))  # three saved for backward, and one being made
        assert "run it without gradients" in message and "nforward and eforward" in message
