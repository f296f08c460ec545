"""What the cluster's ranks may unpickle from one another (server/weightavg_server/control_wire.py).

torch.distributed's object collectives unpickled whatever reached a rank's gloo port, and rebuilt
each tensor among a command's results with a `torch.load(weights_only=False)`. The cluster's ranks
now pickle tensors as dtype, shape and bytes and unpickle only the classes they send one another;
tests/test_cluster.py runs every command through real torchrun clusters with them installed.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import os
import pickle
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from weightavg_server import cluster, control_wire
from weightavg_server.domain.errors import InvalidArgument, ResourceExhausted, Unavailable, WeightavgError
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Service
from weightavg_server.store.registry import Kind

ROOT = Path(__file__).resolve().parent.parent


def _round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    control_wire.ControlPickler(buffer).dump(obj)
    return control_wire.ControlUnpickler(io.BytesIO(buffer.getvalue())).load()


class _Runs:
    """A stand-in for a hostile stream: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_stream_that_names_anything_else_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = pickle.dumps(_Runs(marker))
    assert pickle.loads(hostile) == 0 and marker.exists()  # what torch's own unpickler did with it
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError, match="does not build posix.system"):
        control_wire.ControlUnpickler(io.BytesIO(hostile)).load()
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("torch.storage", "_load_from_bytes"), ("torch._utils", "_rebuild_tensor_v2"), ("builtins", "eval"),
    ("builtins", "getattr"), ("subprocess", "Popen"), ("weightavg_server.domain.hostcache", "release_freed_memory"),
])
def test_functions_outside_the_allowlist_are_refused(module: str, name: str) -> None:
    with pytest.raises(pickle.UnpicklingError):
        control_wire.ControlUnpickler(io.BytesIO(b"")).find_class(module, name)


@pytest.mark.parametrize("tensor", [
    torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor(2.5, dtype=torch.float64),
    torch.ones(3, dtype=torch.bfloat16), torch.tensor([True, False]), torch.empty(0, 4, dtype=torch.int64),
    torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
], ids=["float32", "0-dim float64", "bfloat16", "bool", "empty", "transposed"])
def test_tensors_travel_as_dtype_shape_and_bytes(tensor: torch.Tensor) -> None:
    buffer = io.BytesIO()
    control_wire.ControlPickler(buffer).dump([("loss", tensor)])
    assert b"_rebuild_tensor" not in buffer.getvalue() and b"_load_from_bytes" not in buffer.getvalue()
    [(label, back)] = control_wire.ControlUnpickler(io.BytesIO(buffer.getvalue())).load()  # type: ignore[misc]
    assert label == "loss" and back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_what_the_ranks_send_one_another_round_trips() -> None:
    """Objects of the kinds the control plane carries (seen in the cluster tests): commands' specs and
    enums, errors, dtypes, sizes, the stop check."""
    sent = {
        "spec": LayerSpec("sequential", children=(LayerSpec("linear", "a", (2, 3)),)), "kind": Kind.MODULE,
        "error": ResourceExhausted("rank 1: no room"), "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
        "device": torch.device("cpu"), "stop": cluster.never, "kept": {1, 2},
    }
    back = _round_trip(sent)
    assert isinstance(back, dict)
    assert back["spec"] == sent["spec"] and back["kind"] is Kind.MODULE and back["dtype"] is torch.bfloat16
    assert str(back["error"]) == "rank 1: no room" and isinstance(back["error"], ResourceExhausted)
    assert back["size"] == torch.Size([2, 3]) and back["stop"] is cluster.never and back["kept"] == {1, 2}


def test_install_makes_torchs_object_collectives_use_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c10d, "_pickler", pickle.Pickler)
    monkeypatch.setattr(c10d, "_unpickler", pickle.Unpickler)
    control_wire.install()
    assert c10d._pickler is control_wire.ControlPickler and c10d._unpickler is control_wire.ControlUnpickler
    tensor, size = c10d._object_to_tensor({"w": torch.ones(2)}, torch.device("cpu"), None)
    assert torch.equal(c10d._tensor_to_object(tensor, size, None)["w"], torch.ones(2))


class _Calls:
    """A stand-in for a hostile stream that calls `target(*args)` when unpickled (REDUCE)."""

    def __init__(self, target: object, *args: object) -> None:
        self.target, self.args = target, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.target, self.args


def test_a_class_of_this_package_that_starts_processes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every class of the package was allowed: a stream calling `LocalCluster(1)` started a torchrun
    of the server in the rank (found by review)."""
    from weightavg_server.ops import launch

    started: list[object] = []

    def popen(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise OSError("not started by this test")

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    hostile = pickle.dumps(_Calls(launch.LocalCluster, 1))
    with pytest.raises(pickle.UnpicklingError, match="does not build weightavg_server.ops.launch.LocalCluster"):
        control_wire.ControlUnpickler(io.BytesIO(hostile)).load()
    assert started == []


def test_a_class_of_this_package_that_maps_a_file_is_refused(tmp_path: Path) -> None:
    """`domain.shm.Region(key, size, directory)` opened, allocated and mapped any file of the server's
    user in any directory."""
    from weightavg_server.domain import shm

    (tmp_path / "victim").write_bytes(b"\0" * 4096)
    hostile = pickle.dumps(_Calls(shm.Region, "victim", 4096, str(tmp_path)))
    with pytest.raises(pickle.UnpicklingError, match="does not build weightavg_server.domain.shm.Region"):
        control_wire.ControlUnpickler(io.BytesIO(hostile)).load()


def test_naming_the_servers_main_module_neither_imports_nor_runs_it() -> None:
    """Importing `weightavg_server.__main__` runs the server's command line with the rank's own
    arguments: a 60-byte stream started a second, plaintext gRPC server inside the rank (found by
    review). Run in a process of its own, with `--version` for arguments, where that prints and exits."""
    script = (
        "import io, pickle, sys\n"
        "sys.argv = ['weightavg_server', '--version']\n"
        "from weightavg_server import control_wire\n"
        "stream = b'\\x80\\x04cweightavg_server.__main__\\nmain\\n.'\n"
        "try:\n"
        "    control_wire.ControlUnpickler(io.BytesIO(stream)).load()\n"
        "except pickle.UnpicklingError as exc:\n"
        "    print('refused:', exc)\n"
        "print('imported' if 'weightavg_server.__main__' in sys.modules else 'not imported')\n"
    )
    path = os.pathsep.join([str(ROOT / "client"), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused: the cluster's control plane does not build weightavg_server.__main__.main" in result.stdout
    assert result.stdout.strip().endswith("not imported")


@pytest.mark.parametrize("module, name", [
    ("weightavg_server.ops.metrics", "_BoundedServer"),  # binds a port
    ("weightavg_server.domain.flat", "_Arena"),  # allocates buffers of the sizes it is given
    ("weightavg_server.service", "Service"), ("weightavg_server.ops.app", "Periodic"),  # threads
    ("weightavg_server.cluster", "Command.__init__"), ("weightavg_server.cluster", "os.system"),  # dotted walks
    ("weightavg_server.cluster", "Fabric"), ("weightavg_server.control_wire", "ControlUnpickler"),
    ("weightavg_server", "cluster"), ("weightavg_server_extra", "Command"),
    ("builtins", "bytearray"), ("builtins", "SystemExit"), ("builtins", "ValueError"),
    ("collections", "OrderedDict"), ("torch", "_dynamo"), ("torch", "load"), ("torch", "Tensor"),
])
def test_names_outside_the_table_are_refused(module: str, name: str) -> None:
    with pytest.raises(pickle.UnpicklingError, match="only what the server's ranks send one another"):
        control_wire.ControlUnpickler(io.BytesIO(b"")).find_class(module, name)


def _tensor_stream(dtype: object, shape: object, device: object, data: object) -> bytes:
    return pickle.dumps(_Calls(control_wire._tensor, dtype, shape, device, data))


@pytest.mark.parametrize("args, said", [
    (("float32", (2, 3), "cpu", bytes(20)), "with 20 bytes, not its 24"),  # short: read past the bytes
    (("float32", (2, 3), "cpu", bytes(28)), "with 28 bytes, not its 24"),
    (("float32", (1 << 40, 1 << 40), "cpu", b""), "not its"),
    (("float32", (-1,), "cpu", bytes(4)), "not sizes"), (("float32", (True,), "cpu", bytes(4)), "not sizes"),
    (("float32", [1], "cpu", bytes(4)), "not sizes"), (("float32", (1,), "cpu", "abcd"), "with str bytes"),
    (("_dynamo", (1,), "cpu", bytes(4)), "dtype '_dynamo'"), (("Tensor", (1,), "cpu", bytes(4)), "dtype 'Tensor'"),
    ((torch.float32, (1,), "cpu", bytes(4)), "dtype torch.float32"),
    (("float32", (1,), "cuda:99", bytes(4)), "device 'cuda:99'"),
    (("float32", (1,), "meta", bytes(4)), "device 'meta'"),
    (("float32", (1,), "nowhere", bytes(4)), "device 'nowhere'"), (("float32", (1,), 0, bytes(4)), "device 0"),
])
def test_a_tensor_whose_values_are_not_a_tensors_is_refused(args: tuple[object, ...], said: str) -> None:
    with pytest.raises(pickle.UnpicklingError, match=said):
        control_wire.ControlUnpickler(io.BytesIO(_tensor_stream(*args))).load()


def _all_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_error_a_failure_can_carry_is_in_the_table() -> None:
    """A rank answers any WeightavgError it raises as a Failure (cluster._answered)."""
    missing = {
        (c.__module__, c.__qualname__) for c in [WeightavgError, *_all_subclasses(WeightavgError)]
        if c.__module__.startswith("weightavg_server.")
    } - control_wire.SENT
    assert not missing, f"add them to control_wire.SENT: {sorted(missing)}"


KEPT_ON_RANK_0 = {
    ("weightavg_server.service", "Placement"),  # ClusterService._placement reads it on rank 0
    ("weightavg_server.store.requests", "RequestKey"),  # _routed keeps request IDs on rank 0
    # shared memory is registered on rank 0, beside the gRPC client: its verbs never route elsewhere
    ("weightavg_server.domain.shm", "Region"), ("weightavg_server.domain.shm", "Placement"),
    ("weightavg_server.domain.cuda_ipc", "CudaIpc"),
}


def _package_classes(hint: object, seen: set[type]) -> Iterator[type]:
    """The classes of this package a value of type `hint` can hold, dataclasses' fields included."""
    if typing.get_origin(hint) is not None:
        for arg in typing.get_args(hint):
            yield from _package_classes(arg, seen)
    elif isinstance(hint, type) and hint.__module__.startswith("weightavg_server.") and hint not in seen:
        seen.add(hint)
        yield hint
        if dataclasses.is_dataclass(hint):
            for hinted in typing.get_type_hints(hint).values():
                yield from _package_classes(hinted, seen)


def test_what_the_routed_verbs_take_and_answer_is_in_the_table() -> None:
    """Every class among the arguments and answers of the Service verbs a ClusterService routes to
    other ranks, and of the operations only ranks perform (RANK_OPS), may travel: a class missing from
    SENT would fail that verb's collective, and so the cluster, the first time it ran."""
    seen: set[type] = set()
    where: dict[tuple[str, str], str] = {}
    verbs = [(n, f) for n, f in inspect.getmembers(Service, inspect.isfunction) if not n.startswith("_")]
    for name, function in [*verbs, *cluster.RANK_OPS.items()]:
        if name in cluster.LOCAL_ONLY:
            continue
        for parameter, hint in typing.get_type_hints(function).items():
            if parameter not in ("service", "fabric"):
                for found in _package_classes(hint, seen):
                    where.setdefault((found.__module__, found.__qualname__), f"{name}({parameter})")
    missing = {key: said for key, said in where.items() if key not in control_wire.SENT | KEPT_ON_RANK_0}
    assert not missing, f"add them to control_wire.SENT, or to KEPT_ON_RANK_0 saying why: {missing}"
    assert ("weightavg_server.cluster", "Command") in control_wire.SENT  # the walk found something to check
    assert len(where) > 10


@pytest.mark.parametrize("module, name", sorted(control_wire.SENT))
def test_every_name_in_the_table_is_plain_data(module: str, name: str) -> None:
    """What the table names is built with no code of its own: a dataclass, an enum, one of the
    errors, or one of the functions (so a stream cannot use one to open, start or allocate anything)."""
    found = control_wire.ControlUnpickler(io.BytesIO(b"")).find_class(module, name)
    if not isinstance(found, type):
        assert found in (cluster.never, control_wire._tensor)
    elif module == "torch":
        assert found in (torch.Size, torch.device)
    else:
        assert dataclasses.is_dataclass(found) or issubclass(found, (enum.Enum, WeightavgError)), found
        hooks = {"__setstate__", "__post_init__", "__del__", "__new__", "__reduce__", "__reduce_ex__"}
        own = {h for c in found.__mro__ if c.__module__.startswith("weightavg_server") for h in vars(c)}
        assert not (hooks & own) or issubclass(found, enum.Enum), (found, hooks & own)


@pytest.mark.parametrize("op, runs", [
    ("free", True), ("average_parameters", True), ("_ping", True), ("_across", True),
    ("_module", False), ("__init__", False), ("_exactly_once", False), ("store", False), ("nothing", False),
])
def test_a_command_runs_only_the_clusters_operations(op: str, runs: bool) -> None:
    """A stream forged from allowed classes is still a Command: a rank runs only RANK_OPS and Service's
    public methods, never a private helper or an attribute it names."""
    assert cluster.runnable(op) is runs


def test_a_forged_command_is_refused_before_anything_runs() -> None:
    class _Rank:
        rank = 1

    with pytest.raises(InvalidArgument, match="'_module', which is no operation"):
        cluster._executed(None, _Rank(), cluster.Command("_module", ("m_" + "0" * 32,)))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="'__init__', which is no operation"):
        cluster._across(None, _Rank(), "__init__", (), {}, cluster.ALL, [])  # type: ignore[arg-type]


def test_every_operation_the_cluster_sends_is_runnable() -> None:
    """The op names ClusterService and rank 0's housekeeping put in commands (read from cluster.py's
    source), each one the ranks will run."""
    source = Path(cluster.__file__).read_text()
    sent = (set(re.findall(r'_call\("(\w+)"', source)) | set(re.findall(r'Command\("(\w+)"', source))) - {"_stop"}
    assert {"free", "_ping", "_snapshot", "_across", "set_model_data"} <= sent
    assert [op for op in sent if not cluster.runnable(op)] == []


@pytest.mark.parametrize("error, expected, said", [
    (ResourceExhausted("no room"), ResourceExhausted, "rank 1: no room"),
    (cluster.Command("free"), Unavailable, "rank 1 answered a Command in place of an error"),
])
def test_rank_0_raises_a_ranks_failure_only_when_it_carries_an_error(
    error: object, expected: type[Exception], said: str
) -> None:
    """A Failure from another rank is re-raised as its own class; one carrying anything else (only a
    stream forged from the table's data classes could) is UNAVAILABLE, not a TypeError from calling a
    class that is no error."""

    class _Fabric:
        world_size = 2

    service = object.__new__(cluster.ClusterService)
    service.fabric = _Fabric()  # type: ignore[assignment]
    service._send = lambda command: [None, cluster.Failure(error)]  # type: ignore[method-assign, arg-type]
    with pytest.raises(expected, match=said):
        service._call("average_parameters", cluster.ALL, ("m", "d"))
