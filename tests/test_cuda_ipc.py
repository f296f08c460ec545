"""GPU tensors through CUDA IPC (Client(..., shm=True), weightavg serve --allow-shm): the checks and
the fallback that need no GPU run everywhere; the round trips through a real CUDA server (in its own
process: CUDA IPC handles cannot be opened by the process that exported them) are marked gpu and
skip without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from conftest import LiveServer
from weightavg import Client, _cuda
from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg_server.domain import cuda_ipc, shm
from weightavg_server.domain.errors import FailedPrecondition, InvalidArgument

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.SHM_DIRECTORY), reason="needs POSIX shared memory in /dev/shm")
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0
HANDLE = bytes(range(64))
"""A made-up cudaIpcMemHandle_t: the same size as a real one, and easy to spot in a message."""


def tensors() -> dict[str, torch.Tensor]:
    """Every wire dtype, odd sizes, a 0-dim and an empty tensor, a transposed and a conjugate view."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(33, 7, generator=g), "f64": torch.randn(5, dtype=torch.float64, generator=g),
        "f16": torch.randn(3, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i8": torch.arange(-3, 4, dtype=torch.int8), "u8": torch.arange(11, dtype=torch.uint8),
        "i16": torch.arange(6, dtype=torch.int16), "i32": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "i64": torch.tensor(7), "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(4, dtype=torch.complex64, generator=g).conj(), "c128": torch.tensor([1 + 2j]),
        "empty": torch.zeros(0, 4), "transposed": torch.randn(5, 3, generator=g).t(),
    }


def bits(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """dtype, shape and bytes, with a conjugate or negative view's values resolved."""
    host = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return host.dtype, tuple(host.shape), host.view(torch.uint8).numpy().tobytes() if host.dim() else host.reshape(1).view(torch.uint8).numpy().tobytes()


# -- no GPU needed ---------------------------------------------------------------------------------


def test_client_layout_write_and_read_round_trip_every_dtype_bit_for_bit() -> None:
    """The client's placement, copy in and copy out (device-agnostic; on the CPU here)."""
    values = tensors()
    placed, nbytes = _cuda.layout([(k, _cuda.as_tensor(v)) for k, v in values.items()])
    assert all(m.offset % _cuda.ALIGN == 0 for m, _ in placed) and nbytes % _cuda.ALIGN == 0
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    _cuda.write(buffer, placed)
    back = dict(_cuda.read(buffer, [m for m, _ in placed]))
    assert list(back) == list(values) and all(bits(back[k]) == bits(v) for k, v in values.items())
    outside = pb.SharedTensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[4], offset=nbytes - 8, byte_size=16)
    with pytest.raises(ValueError, match="outside the CUDA shared memory region"):
        _cuda.read(buffer, [outside])
    wrong_size = pb.SharedTensor(name="x", dtype=pb.DTYPE_FLOAT32, shape=[4], offset=0, byte_size=12)
    with pytest.raises(ValueError, match="outside"):
        _cuda.read(buffer, [wrong_size])


def test_host_values_beside_gpu_tensors_keep_their_bits() -> None:
    """An upload mixing host values with GPU tensors puts the host ones in the CUDA buffer too, as
    the wire would send them (Python scalars int64/float64, bfloat16 arrays as bfloat16)."""
    from weightavg.torch import to_array

    bf16 = to_array(torch.randn(3).bfloat16())
    assert _cuda.as_tensor(bf16).dtype == torch.bfloat16
    assert bits(_cuda.as_tensor(bf16)) == bits(torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16))
    assert _cuda.as_tensor(3).dtype == torch.int64 and _cuda.as_tensor(0.5).dtype == torch.float64
    read_only = np.frombuffer(np.arange(3, dtype=np.float32).tobytes(), np.float32)
    assert torch.equal(_cuda.as_tensor(read_only), torch.arange(3, dtype=torch.float32))
    t = torch.randn(4, 2).t()
    assert (_cuda.host_array(t) == t.numpy()).all()


@pytest.fixture
def ref_counter() -> Iterator[str]:
    """A file shaped like torch's CUDA IPC reference counter (10000 int64 counters), as '/name'."""
    memory = shared_memory.SharedMemory(create=True, size=8 * cuda_ipc.REF_COUNTER_SLOTS)
    yield "/" + memory.name.lstrip("/")
    memory.close()
    memory.unlink()


def _ipc(ref_counter: str, **changes: Any) -> pb.CudaIpcRegion:
    fields: dict[str, Any] = dict(
        device_uuid="", device_index=0, handle=HANDLE, storage_size_bytes=1 << 20, storage_offset_bytes=512,
        ref_counter_handle=ref_counter, ref_counter_offset=3, event_handle=bytes(64), event_sync_required=True,
    )
    fields.update(changes)
    return pb.CudaIpcRegion(**fields)


def _register(stub: Any, session: str | None, ipc: pb.CudaIpcRegion, size: int = 1 << 20, key: str = "") -> Any:
    metadata = [("weightavg-session", session)] if session else []
    request = pb.RegisterSharedMemoryRequest(name="cuda", key=key, byte_size=size, cuda=ipc)
    return stub.RegisterSharedMemory(request, metadata=metadata, timeout=WAIT)


def test_cuda_registrations_are_checked_and_errors_never_name_handles(
    start_server: Callable[..., LiveServer], ref_counter: str
) -> None:
    server = start_server(allow_shm=True)
    no_cuda = "no CUDA device" if not torch.cuda.is_available() else "could not be opened"
    with grpc.insecure_channel(server.address) as channel, Client(server.address, session=True) as owner:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        absent = "/" + ref_counter.lstrip("/") + "-absent"
        cases = [
            (None, _ipc(ref_counter), 1 << 20, grpc.StatusCode.FAILED_PRECONDITION, "belong to a session"),
            (owner.session, _ipc(ref_counter, handle=b""), 1 << 20, grpc.StatusCode.INVALID_ARGUMENT, "handle must be"),
            (owner.session, _ipc(ref_counter, handle=b"x" * 1025), 1 << 20, grpc.StatusCode.INVALID_ARGUMENT, "handle must be"),
            (owner.session, _ipc(ref_counter), (1 << 20) + 1, grpc.StatusCode.INVALID_ARGUMENT, "at most the storage's size"),
            (owner.session, _ipc(ref_counter), 0, grpc.StatusCode.INVALID_ARGUMENT, "byte_size > 0"),
            (owner.session, _ipc(ref_counter, storage_offset_bytes=-1), 16, grpc.StatusCode.INVALID_ARGUMENT, "non-negative offset"),
            (owner.session, _ipc(ref_counter, event_handle=b"e"), 16, grpc.StatusCode.INVALID_ARGUMENT, "event handle"),
            (owner.session, _ipc(ref_counter, device_index=-1), 16, grpc.StatusCode.INVALID_ARGUMENT, "device index"),
            (owner.session, _ipc(ref_counter, ref_counter_offset=10000), 16, grpc.StatusCode.INVALID_ARGUMENT, "counter's index"),
            (owner.session, _ipc("/../etc/passwd"), 16, grpc.StatusCode.INVALID_ARGUMENT, "reference counter must be"),
            (owner.session, _ipc(ref_counter.lstrip("/")), 16, grpc.StatusCode.INVALID_ARGUMENT, "reference counter must be"),
            (owner.session, _ipc(absent), 16, grpc.StatusCode.FAILED_PRECONDITION, "could not be found"),
            (owner.session, _ipc(ref_counter), 16, grpc.StatusCode.FAILED_PRECONDITION, no_cuda),
        ]
        for session, ipc, size, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                _register(stub, session, ipc, size)
            details = err.value.details() or ""
            assert err.value.code() == code and text in details, (text, details)
            assert ref_counter.lstrip("/") not in details and HANDLE.hex() not in details and repr(HANDLE) not in details
        with pytest.raises(grpc.RpcError) as err:  # a key and a CUDA buffer at once
            _register(stub, owner.session, _ipc(ref_counter), 16, key="wa_x")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in (err.value.details() or "")
        assert len(server.registry.shared) == 0
    plain = start_server()  # no --allow-shm
    with grpc.insecure_channel(plain.address) as channel, Client(plain.address, session=True) as owner:
        with pytest.raises(grpc.RpcError) as err:
            _register(pb_grpc.WeightAveragingServiceStub(channel), owner.session, _ipc(ref_counter))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--allow-shm" in (err.value.details() or "")


def test_a_ref_counter_that_is_not_a_regular_file_of_full_size_is_refused(ref_counter: str, tmp_path: Path) -> None:
    """In process: the counter torch's deleter decrements must be torch's own kind of object (a
    regular /dev/shm file of the server's user, 10000 counters long), never a link or a short file."""
    small = shared_memory.SharedMemory(create=True, size=64)
    link = os.path.join(shm.SHM_DIRECTORY, f"wa_link_{os.getpid()}")
    os.symlink(os.path.join(shm.SHM_DIRECTORY, ref_counter.lstrip("/")), link)
    try:
        for name in ("/" + small.name.lstrip("/"), "/" + os.path.basename(link)):
            ipc = cuda_ipc.CudaIpc("", 0, HANDLE, 1 << 20, 0, name, 0, b"", False)
            with pytest.raises(FailedPrecondition, match="must be torch's"):
                cuda_ipc.check_fields(ipc, 16)
        cuda_ipc.check_fields(cuda_ipc.CudaIpc("", 0, HANDLE, 1 << 20, 0, ref_counter, 9999, b"", False), 1 << 20)
        with pytest.raises(InvalidArgument):
            cuda_ipc.check_fields(cuda_ipc.CudaIpc("", 0, HANDLE, 16, 0, ref_counter, 0, b"", False), 17)
    finally:
        os.unlink(link)
        small.close()
        small.unlink()


def test_the_server_waits_for_its_copies_into_a_region_once_before_a_fetch_answers() -> None:
    """shm.write and shm.read end with the region's settle() (a CUDA region's copies are
    asynchronous: the client reads the region as soon as the call answers)."""
    events: list[str] = []

    class Recording(shm.Region):
        def __init__(self) -> None:  # no file: the region is host memory recording its use
            self.byte_size, self.identity, self._fd = 4096, ("recording",), -1
            self.memory = torch.zeros(4096, dtype=torch.uint8)
            self._init_copies()

        def check_size(self) -> None:
            pass

        def bytes_at(self, offset: int, nbytes: int, what: str) -> torch.Tensor:
            events.append("bytes")
            return self.memory[offset:offset + nbytes]

        def settle(self) -> None:
            events.append("settle")

    named = [("a", torch.arange(5.0)), ("b", torch.tensor([True, False])), ("c", torch.zeros(0))]
    placements, _ = shm.layout(named, 0)
    region = Recording()
    shm.write(region, placements, named)
    assert events.count("settle") == 1 and events[-1] == "settle"
    back = shm.read(region, placements)
    assert events.count("settle") == 2 and events[-1] == "settle"
    assert all(bits(t) == bits(dict(named)[k]) for k, t in back)


@pytest.fixture
def shared_uploads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The regions the server copied uploaded tensors out of (TensorChunk.shared), in order."""
    from weightavg_server.transport import codec

    seen: list[str] = []
    shared = codec.TensorAssembler._shared

    def spy(self: Any, chunk: pb.TensorChunk, crc: int | None) -> None:
        seen.append(chunk.shared.region)
        shared(self, chunk, crc)

    monkeypatch.setattr(codec.TensorAssembler, "_shared", spy)
    return seen


def test_a_server_without_cuda_refuses_the_region_and_gpu_tensors_come_through_the_host_unchanged(
    start_server: Callable[..., LiveServer], ref_counter: str, monkeypatch: pytest.MonkeyPatch,
    shared_uploads: list[str],
) -> None:
    """Without a GPU here, CPU tensors stand in for GPU ones on the client: the client registers a
    CUDA buffer (its fields made up, a real counter file), the CPU-only server refuses it with
    FAILED_PRECONDITION, the client gives torch's counted reference back, and every upload (then
    and later) goes through host shared memory with the stream's results."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA server would try to open the made-up handle; the gpu tests cover this path")
    monkeypatch.setattr(_cuda, "is_cuda", lambda value: isinstance(value, torch.Tensor))
    monkeypatch.setattr(_cuda, "describe", lambda buffer: _ipc(ref_counter, storage_size_bytes=buffer.numel()))
    released: list[str] = []
    monkeypatch.setattr(_cuda, "release", lambda message: released.append(message.ref_counter_handle))
    server = start_server(allow_shm=True)
    big = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))  # 75 KiB: above MIN_UPLOAD_BYTES
    values = {"big": big, **tensors()}
    with Client(server.address, timeout=WAIT, shm=True) as fast, Client(server.address, timeout=WAIT) as slow:
        d_fast = fast.dict(dict(values))
        assert released == [ref_counter] and fast._cuda is None
        assert set(shared_uploads) == {fast._shm_names.region} and len(server.registry.shared) == 1  # the host region only
        assert fast._fetch_to_device(d_fast.id, [], torch.device("cpu")) is None
        d_slow = slow.dict({k: _cuda.host_array(v) for k, v in values.items()})
        got, want = fast.dict(d_fast), slow.dict(d_slow)
        assert list(got) == list(want) == list(values)
        assert all(np.asarray(got[k]).tobytes() == np.asarray(want[k]).tobytes() for k in values)
        m = fast.module(["linear", 64, 300])
        fast.parm(m, "weight", big)  # a later upload: the host region, no second try of CUDA
        assert torch.equal(torch.from_numpy(fast.parm(m, "weight")), big) and released == [ref_counter]


# -- on a GPU: a real `weightavg serve --device cuda --allow-shm` in its own process ---------------

@pytest.fixture
def cuda_server() -> Iterator[str]:
    """`weightavg serve --device cuda --allow-shm` as a child process on a free port: its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "weightavg_server", "serve", "--port", "0", "--device", "cuda", "--allow-shm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        # This checkout first, then the inherited path (scripts/gpu-check puts the carried wheels there).
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT / "client"), str(ROOT / "server"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("weightavg serving on "), line + (process.stderr.read() if process.stderr else "")
        yield line.removeprefix("weightavg serving on ")
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def cuda_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What went through the client's CUDA buffer: 'write' per upload, 'read' per fetch."""
    calls: list[str] = []
    write, read = _cuda.write, _cuda.read
    monkeypatch.setattr(_cuda, "write", lambda *a: (calls.append("write"), write(*a))[1])
    monkeypatch.setattr(_cuda, "read", lambda *a: (calls.append("read"), read(*a))[1])
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_state_dicts_through_cuda_ipc_are_bit_identical_to_the_stream(
    cuda_server: str, cuda_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightavg import _shm
    from weightavg.torch import fetch, push

    monkeypatch.setattr(_shm, "MIN_UPLOAD_BYTES", 0)  # these small tensors through the buffer too
    values = {k: v.cuda() for k, v in tensors().items()}
    with Client(cuda_server, timeout=WAIT, shm=True) as fast, Client(cuda_server, timeout=WAIT) as slow:
        d_fast, d_slow = push(fast, values), push(slow, values)
        assert cuda_calls == ["write"] and fast._cuda is not None and fast._cuda.size > 0
        for got in (fetch(fast, d_fast, "cuda"), fetch(fast, d_slow, "cuda"), fetch(slow, d_fast, "cuda")):
            assert list(got) == list(values)
            assert all(got[k].is_cuda and bits(got[k]) == bits(v) for k, v in values.items())
        assert cuda_calls == ["write", "read", "read"]
        big = torch.randn(1 << 20, device="cuda")  # 4 MiB: the buffer grows, for the upload and the fetch
        d = push(fast, {"big": big})
        assert torch.equal(fetch(fast, d, "cuda")["big"], big) and fast._cuda.size >= 4 << 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_gpu_verb_through_cuda_ipc_matches_the_stream(cuda_server: str, cuda_calls: list[str]) -> None:
    """parm set and fetch, copyparms then fetch, training and test data, evaluate's input, a tensor."""
    from weightavg.torch import fetch

    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(300, 64, device="cuda", generator=g)
    x = torch.randn(512, 64, device="cuda", generator=g)
    y = torch.randint(0, 10, (512,), device="cuda", generator=g)
    mlp = ["sequential", ["linear", "l1", 64, 300], ["relu"], ["linear", "l2", 300, 10]]
    # The server is another process: a seed here does not reach its module initialization, and its
    # second module draws other values than its first. So every other parameter is set alike, as
    # host arrays (they take the stream or host shared memory, not the CUDA buffer).
    rng = np.random.default_rng(2)
    rest = {"l1.bias": rng.standard_normal(300, dtype=np.float32),
            "l2.weight": rng.standard_normal((10, 300), dtype=np.float32),
            "l2.bias": rng.standard_normal(10, dtype=np.float32)}
    with Client(cuda_server, timeout=WAIT, shm=True) as fast, Client(cuda_server, timeout=WAIT) as slow:
        results = []
        for c in (fast, slow):
            m = c.module(mlp)
            for name, value in rest.items():
                c.parm(m, name, value)
            c.parm(m, "l1.weight", w)
            before = fetch(c, m, "cuda", names=["l1.weight"])  # as set: training changes it below
            p = c.copyparms(m)
            c.dict(p, "l1.weight", w * 2)
            t = c.tensor(x)
            q = c.model(c.addref(m), c.loss("ce"), c.opt("sgd", m, 0.1))
            c.train(q, x, y)
            c.test(q, x, y)
            loss = c.run(q)
            results.append((before, fetch(c, p, "cuda"), c.tensor(t), c.evaluate(q, x), loss, c.testrun(q),
                            fetch(c, m, "cuda", names=["l1.weight", "l1.bias", "l2.weight", "l2.bias"])))
        # parm, entry, tensor, train and test data, evaluate's input; three fetches: the shm client's only
        assert cuda_calls.count("write") == 6 and cuda_calls.count("read") == 3
        (p1, d1, t1, e1, l1, r1, m1), (p2, d2, t2, e2, l2, r2, m2) = results
        assert bits(p1["l1.weight"]) == bits(p2["l1.weight"]) == bits(w)
        assert list(d1) == list(d2) and all(bits(d1[k]) == bits(d2[k]) for k in d2)
        assert bits(d1["l1.weight"]) == bits(w * 2)
        # The same epoch on the same values and data (no shuffle): the trained modules agree bit for bit.
        assert list(m1) == list(m2) and all(bits(m1[k]) == bits(m2[k]) for k in m2)
        assert not torch.equal(m1["l1.weight"], w)  # the epoch did train the module the parameter was set in
        assert np.asarray(t1).tobytes() == np.asarray(t2).tobytes() == x.cpu().numpy().tobytes()
        for a, b in ((e1, e2), (l1, l2), (r1, r2)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_remote_averaged_model_on_the_gpu_through_cuda_ipc_matches_the_stream(
    cuda_server: str, cuda_calls: list[str]
) -> None:
    from weightavg.torch import RemoteAveragedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 8)).cuda()
    with Client(cuda_server, timeout=WAIT, shm=True) as fast, Client(cuda_server, timeout=WAIT) as slow:
        averages = [RemoteAveragedModel(c, model, "ema", decay=0.9, use_buffers=True) for c in (fast, slow)]
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            for a in averages:
                a.update_parameters(model)
        states = [a.state_dict() for a in averages]
        assert "read" in cuda_calls and "write" in cuda_calls
        assert list(states[0]) == list(states[1])
        assert all(bits(states[0][k]) == bits(states[1][k]) for k in states[1])
        assert all(v.is_cuda for k, v in states[0].items() if k.startswith("module."))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_registration_outside_its_allocation_is_refused_and_the_server_goes_on(cuda_server: str) -> None:
    """Real handles with lying sizes: bytes past the storage, or a storage offset past the opened
    allocation, are refused before any copy (an illegal address would end the server's CUDA context)."""
    buffer = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    with grpc.insecure_channel(cuda_server) as channel, Client(cuda_server, timeout=WAIT, shm=True) as c:
        stub = pb_grpc.WeightAveragingServiceStub(channel)
        invalid, unchecked = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
        for change, size, codes in (
            ({}, (1 << 20) + 1, {invalid}),  # more than the storage
            ({"storage_size_bytes": 1 << 40}, 1 << 40, {invalid}),  # a storage larger than its allocation
            # an address in no allocation: the driver finds none (or, by chance, another one)
            ({"storage_offset_bytes": 1 << 40}, 1 << 20, {invalid, unchecked}),
            ({"handle": bytes(64)}, 1 << 20, {unchecked}),
        ):
            message = _cuda.describe(buffer)  # a fresh export each time: each refusal gives its reference back
            for field, value in change.items():
                setattr(message, field, value)
            with pytest.raises(grpc.RpcError) as err:
                _register(stub, c.session, message, size)
            assert err.value.code() in codes, err.value.details()
            assert message.handle.hex() not in (err.value.details() or "")
            _cuda.release(message)
        x = torch.randn(1 << 16, device="cuda")
        from weightavg.torch import fetch, push

        assert torch.equal(fetch(c, push(c, {"x": x}), "cuda")["x"], x)  # the server's CUDA context is fine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fetching_no_names_to_the_gpu_gives_nothing_as_on_the_host(cuda_server: str) -> None:
    """names=[] asks for no entries: the wire's empty list means "all", so the CUDA path had sent it
    on and returned every entry, where the host path returned none."""
    from weightavg.torch import fetch, push

    with Client(cuda_server, timeout=WAIT, shm=True) as c:
        d = push(c, {"a": torch.ones(3, device="cuda")})
        assert fetch(c, d, "cuda", names=[]) == {} == fetch(c, d, "cpu", names=[])
        assert list(fetch(c, d, "cuda", names=["a"])) == ["a"]


def test_a_failed_fetch_to_the_gpu_raises_the_clients_exception(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """weightavg.torch.fetch(..., device="cuda") fetches through the client's CUDA buffer by a
    private method that was not behind the client's error boundary: a freed handle escaped as a raw
    grpc.RpcError, past every `except WeightavgError` (found by review). Without a GPU here a CPU
    tensor stands in for the registered buffer; the fetch itself is real gRPC to a real server."""
    from weightavg import NotFoundError
    from weightavg.torch import fetch

    monkeypatch.setattr(_cuda.CudaRegion, "ensure", lambda self, nbytes, device, register: torch.empty(0, dtype=torch.uint8))
    server = start_server(allow_shm=True)
    with Client(server.address, timeout=WAIT, shm=True) as c:
        d = c.dict({"w": np.ones(2, np.float32)})
        c.free(d)
        with pytest.raises(NotFoundError, match="unknown handle"):
            fetch(c, d, torch.device("cuda", 0))
