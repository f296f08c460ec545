"""What the cluster's ranks send one another, and what they build from it
(server/weightavg_server/control_wire.py).

torch.distributed's object collectives unpickled whatever reached a rank's gloo port, and rebuilt
each tensor among a command's results with torch's own loader. The ranks now encode what they send
in weightavg's own tagged format (no pickle): plain values, tensors as dtype, shape and bytes, and
the package's data classes listed in `SENT`; tests/test_cluster.py runs every command through real
torchrun clusters with it installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from weightavg_server import cluster, control_wire, service
from weightavg_server.control_wire import ControlDecodeError, decode, encode
from weightavg_server.domain.errors import InvalidArgument, ResourceExhausted, Unavailable, WeightavgError
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Service
from weightavg_server.store.registry import Kind
from weightavg_server.store.tenants import Caller, Role

ROOT = Path(__file__).resolve().parent.parent


class _Runs:
    """A stand-in for a hostile pickle: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = pickle.dumps(_Runs(marker))
    assert pickle.loads(hostile) == 0 and marker.exists()  # what torch's own unpickler did with it
    marker.unlink()
    with pytest.raises(ControlDecodeError, match="not weightavg's control format"):
        decode(hostile)
    assert not marker.exists()


def _text(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _named(tag: bytes, module: str, name: str, *rest: bytes) -> bytes:
    """A stream naming `module.name` under `tag` (what a forger would write)."""
    return control_wire.MAGIC + tag + _text(module) + _text(name) + b"".join(rest)


@pytest.mark.parametrize("module, name", [
    ("weightavg_server.ops.metrics", "_BoundedServer"),  # binds a port
    ("weightavg_server.domain.flat", "_Arena"),  # allocates buffers of the sizes it is given
    ("weightavg_server.service", "Service"), ("weightavg_server.ops.app", "Periodic"),  # threads
    ("weightavg_server.ops.launch", "LocalCluster"),  # starts a torchrun
    ("weightavg_server.domain.shm", "Region"),  # maps any file of the server's user
    ("weightavg_server.cluster", "Command.__init__"), ("weightavg_server.cluster", "os.system"),  # dotted walks
    ("weightavg_server.cluster", "Fabric"), ("weightavg_server.control_wire", "ControlReader"),
    ("weightavg_server", "cluster"), ("weightavg_server_extra", "Command"), ("weightavg_server.__main__", "main"),
    ("builtins", "eval"), ("builtins", "SystemExit"), ("posix", "system"), ("subprocess", "Popen"),
    ("collections", "OrderedDict"), ("torch", "_dynamo"), ("torch", "load"), ("torch.storage", "_load_from_bytes"),
])
@pytest.mark.parametrize("tag", [control_wire.DATA, control_wire.FUNCTION, control_wire.ERROR, control_wire.ENUM])
def test_names_outside_the_table_are_refused_before_anything_is_imported(module: str, name: str, tag: bytes) -> None:
    with pytest.raises(ControlDecodeError, match="only what the server's ranks send one another"):
        decode(_named(tag, module, name))


def test_naming_the_servers_main_module_neither_imports_nor_runs_it() -> None:
    """Importing `weightavg_server.__main__` runs the server's command line with the rank's own
    arguments: a 60-byte pickle started a second, plaintext gRPC server inside the rank (found by
    review). Run in a process of its own, with `--version` for arguments, where that prints and exits."""
    stream = _named(control_wire.FUNCTION, "weightavg_server.__main__", "main")
    script = (
        "import sys\n"
        "sys.argv = ['weightavg_server', '--version']\n"
        "from weightavg_server import control_wire\n"
        "try:\n"
        f"    control_wire.decode({stream!r})\n"
        "except control_wire.ControlDecodeError as exc:\n"
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


def test_a_name_of_the_table_under_another_kinds_tag_is_refused() -> None:
    """A dataclass named as a function (called) or an error named as a dataclass is refused."""
    with pytest.raises(ControlDecodeError, match="for a tag"):
        decode(_named(control_wire.FUNCTION, "weightavg_server.cluster", "Command"))
    with pytest.raises(ControlDecodeError, match="for a tag"):
        decode(_named(control_wire.DATA, "weightavg_server.cluster", "never"))


def test_a_dataclass_gets_only_its_own_fields() -> None:
    good = encode(cluster.Command("free"))
    assert decode(good) == cluster.Command("free")
    state = encode({"op": "free", "__class__": "x"})[len(control_wire.MAGIC):]
    with pytest.raises(ControlDecodeError, match=r"fields \['__class__'\] it does not know"):
        decode(_named(control_wire.DATA, "weightavg_server.cluster", "Command", state))


@pytest.mark.parametrize("stream, said", [
    (b"", "not weightavg's control format"), (control_wire.MAGIC, "truncated"),
    (control_wire.MAGIC + control_wire.STR + struct.pack("<Q", 1 << 40), "truncated"),
    (control_wire.MAGIC + b"?", "unknown tag"), (control_wire.MAGIC + control_wire.NONE + b"x", "bytes after"),
    (control_wire.MAGIC + control_wire.BIGINT + _text("1e9"), "for an integer"),
    (control_wire.MAGIC + control_wire.STR + _text("a")[:-1] + b"\xff", "not UTF-8"),
    (control_wire.MAGIC + (control_wire.LIST + struct.pack("<Q", 1)) * 300 + control_wire.NONE, "nested over"),
])
def test_bytes_that_are_not_the_format_are_refused(stream: bytes, said: str) -> None:
    with pytest.raises(ControlDecodeError, match=said):
        decode(stream)


def test_the_writer_refuses_what_the_ranks_do_not_send() -> None:
    """A class missing from the table fails on the sending rank, with its name, not on the others."""
    from collections import OrderedDict

    for obj in (OrderedDict(a=1), object(), os.system, 1j, bytearray(2), Service):
        with pytest.raises(TypeError, match="does not send"):
            encode(obj)


@pytest.mark.parametrize("tensor", [
    torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor(2.5, dtype=torch.float64),
    torch.ones(3, dtype=torch.bfloat16), torch.tensor([True, False]), torch.empty(0, 4, dtype=torch.int64),
    torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
], ids=["float32", "0-dim float64", "bfloat16", "bool", "empty", "transposed"])
def test_tensors_travel_as_dtype_shape_and_bytes(tensor: torch.Tensor) -> None:
    [(label, back)] = decode(encode([("loss", tensor)]))
    assert label == "loss" and back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_what_the_ranks_send_one_another_round_trips() -> None:
    """Objects of the kinds the control plane carries (seen in the cluster tests): commands' specs and
    enums, errors, dtypes, sizes, the stop check, and plain values of every kind."""
    sent = {
        "spec": LayerSpec("sequential", children=(LayerSpec("linear", "a", (2, 3)),)), "kind": Kind.MODULE,
        "error": ResourceExhausted("rank 1: no room"), "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
        "device": torch.device("cpu"), "stop": cluster.never, "kept": {1, 2}, "frozen": frozenset({"a"}),
        "big": -(2**80), "small": -5, "float": 0.1, "none": None, "bytes": b"\0x", "flag": False,
        ("tuple", 1): [1.5, "x"], "sink": cluster.Sink(), "command": cluster.Command("free", (["m"], False)),
    }
    back = decode(encode(sent))
    assert isinstance(back, dict)
    assert back == {**sent, "error": back["error"]}
    assert str(back["error"]) == "rank 1: no room" and type(back["error"]) is ResourceExhausted
    assert back["kind"] is Kind.MODULE and back["dtype"] is torch.bfloat16 and back["stop"] is cluster.never
    assert type(back["size"]) is torch.Size and type(back[("tuple", 1)]) is list


def test_what_a_dataclass_leaves_out_of_its_state_stays_out() -> None:
    """A Sink's held stack and tensors stay on rank 0 (its __getstate__), as they did when pickled."""
    sink = cluster.Sink(named=[("w", torch.ones(1))])
    assert decode(encode(sink)) == cluster.Sink()


def test_install_makes_torchs_object_collectives_use_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c10d, "_pickler", pickle.Pickler)
    monkeypatch.setattr(c10d, "_unpickler", pickle.Unpickler)
    control_wire.install()
    assert c10d._pickler is control_wire.ControlWriter and c10d._unpickler is control_wire.ControlReader
    tensor, size = c10d._object_to_tensor({"w": torch.ones(2)}, torch.device("cpu"), None)
    assert bytes(tensor[: len(control_wire.MAGIC)].tolist()) == control_wire.MAGIC
    assert torch.equal(c10d._tensor_to_object(tensor, size, None)["w"], torch.ones(2))


def _tensor_stream(dtype: str, shape: bytes, device: str, data: bytes) -> bytes:
    return control_wire.MAGIC + control_wire.TENSOR + _text(dtype) + shape + _text(device) + struct.pack(
        "<Q", len(data)) + data


def _shape(*sizes: object) -> bytes:
    return encode(tuple(sizes))[len(control_wire.MAGIC):]


@pytest.mark.parametrize("args, said", [
    (("float32", _shape(2, 3), "cpu", bytes(20)), "with 20 bytes, not its 24"),  # short: read past the bytes
    (("float32", _shape(2, 3), "cpu", bytes(28)), "with 28 bytes, not its 24"),
    (("float32", _shape(1 << 20, 1 << 20), "cpu", b""), "not its"),  # huge, its bytes short: nothing allocated
    (("float32", _shape(1 << 40, 1 << 40), "cpu", b""), "past torch's sizes"),
    (("float32", _shape(0, 1 << 62, 1 << 62), "cpu", b""), "past torch's sizes"),  # torch's strides overflow
    (("float32", _shape(0, 1 << 64), "cpu", b""), "past torch's sizes"),  # was a TypeError from reshape
    (("qint8", _shape(2), "cpu", bytes(2)), "dtype 'qint8'"),  # its scale is not among its bytes
    (("float32", _shape(-1), "cpu", bytes(4)), "not sizes"), (("float32", _shape(True), "cpu", bytes(4)), "not sizes"),
    (("float32", encode([1])[len(control_wire.MAGIC):], "cpu", bytes(4)), "not sizes"),
    (("_dynamo", _shape(1), "cpu", bytes(4)), "dtype '_dynamo'"), (("Tensor", _shape(1), "cpu", bytes(4)), "dtype 'Tensor'"),
    (("float32", _shape(1), "cuda:99", bytes(4)), "device 'cuda:99'"),
    (("float32", _shape(1), "meta", bytes(4)), "device 'meta'"),
    (("float32", _shape(1), "nowhere", bytes(4)), "device 'nowhere'"),
])
def test_a_tensor_whose_values_are_not_a_tensors_is_refused(args: tuple[str, bytes, str, bytes], said: str) -> None:
    with pytest.raises(ControlDecodeError, match=said):
        decode(_tensor_stream(*args))


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
    # a fetch's answer is read where it was fetched: another rank's copies come to rank 0 through a
    # Sink (their layout, then the tensors point to point), never as the Fetched list itself
    ("weightavg_server.service", "Fetched"),
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
    found = control_wire._sent(module, name)
    if not isinstance(found, type):
        assert found is cluster.never
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


# -- found by review (2026-11-28): each of these raised something other than ControlDecodeError --------

_M = control_wire.MAGIC


def _body(obj: object) -> bytes:
    return encode(obj)[len(_M):]


@pytest.mark.parametrize("stream, said", [
    # a length past what the platform indexes was an OverflowError from BytesIO.read
    (_M + control_wire.STR + struct.pack("<Q", 2**64 - 1), "truncated"),
    (_M + control_wire.BYTES + struct.pack("<Q", 2**63), "truncated"),
    (_M + control_wire.LIST + struct.pack("<Q", 2**60), "truncated"),
    # int() of what str.isdigit took: ValueErrors, and quadratic time past Python's digit limit
    (_M + control_wire.BIGINT + _text("²"), "for an integer"), (_M + control_wire.BIGINT + _text("--5"), "for an integer"),
    (_M + control_wire.BIGINT + _text("9" * 5000), "for an integer"),
    (_M + control_wire.BIGINT + _text("9" * 10**6), "for an integer"),
    # unhashable keys and members were TypeErrors; a key given twice was silently dropped
    (_M + control_wire.DICT + struct.pack("<Q", 1) + _body([1]) + _body(1), "keys that cannot be keys"),
    (_M + control_wire.SET + struct.pack("<Q", 1) + _body(cluster.Sink()), "members that cannot be members"),
    (_M + control_wire.FROZENSET + struct.pack("<Q", 1) + _body(cluster.Command("free", ([1],))), "cannot be members"),
    (_M + control_wire.DICT + struct.pack("<Q", 2) + _body("a") + _body(1) + _body("a") + _body(2), "keys given twice"),
    (_M + control_wire.SET + struct.pack("<Q", 2) + _body(1) + _body(1), "members given twice"),
    (_M + control_wire.SIZE + _body((2**64,)), "past torch's sizes"),  # was a ValueError from torch.Size
], ids=lambda value: "" if isinstance(value, bytes) else None)
def test_counts_integers_keys_and_sizes_that_are_not_the_format_are_refused(stream: bytes, said: str) -> None:
    with pytest.raises(ControlDecodeError, match=said):
        decode(stream)


_P = 2**61 - 1  # Python hashes an integer modulo this


@pytest.mark.parametrize("tag", [control_wire.DICT, control_wire.SET, control_wire.FROZENSET])
def test_keys_built_to_share_a_hash_are_refused(tag: bytes) -> None:
    """Integers equal modulo 2**61 - 1 share a hash: 160,000 of them as keys (6 MB) held a rank inside
    one dict's construction for two minutes, quadratic in their number."""
    keys = [(k + 1) * _P for k in range(2000)]
    assert len({hash(k) for k in keys}) == 1
    items = b"".join(_body(k) + (_body(0) if tag == control_wire.DICT else b"") for k in keys)
    with pytest.raises(ControlDecodeError, match="2000 (keys|members) of one hash"):
        decode(_M + tag + struct.pack("<Q", len(keys)) + items)
    few = {(k + 1) * _P: k for k in range(control_wire.MAX_SHARED_HASH)} | {-1: "a", -2: "b"}  # -1 hashes as -2
    assert decode(encode(few)) == few


def _command(state: dict[str, object]) -> bytes:
    full = {"op": "free", "args": (), "kwargs": {}, "ranks": None, "seed": "", "caller": None, "per_rank": None,
            "sink": None}
    return _named(control_wire.DATA, "weightavg_server.cluster", "Command", _body({**full, **state}))


@pytest.mark.parametrize("stream, said", [
    # missing fields made an object whose every use was an AttributeError (UNKNOWN), in the rank that used it
    (_named(control_wire.DATA, "weightavg_server.cluster", "Command", _body({})), r"Command without its fields"),
    (_command({"op": 5}), r"Command.op holding a int"),  # runnable(5): 'int' has no attribute 'startswith'
    (_command({"ranks": [1]}), r"Command.ranks holding a list"),
    (_command({"caller": "admin"}), r"Command.caller holding a str"),
    (_command({"kwargs": {1: 2}}), r"Command.kwargs holding a dict"),
    (_command({"per_rank": {"1": ()}}), r"Command.per_rank"),
    (_named(control_wire.DATA, "weightavg_server.cluster", "Failure", _body({"error": None})), r"Failure.error"),
    (_named(control_wire.DATA, "weightavg_server.domain.specs", "LayerSpec",
            _body({"type": "linear", "name": None, "args": ([2],), "options": (), "children": ()})), "LayerSpec.args"),
    # an error's state hid its class's code
    (_named(control_wire.ERROR, "weightavg_server.domain.errors", "InvalidArgument", _body(("x",)), _body({"code": 5})),
     r"attributes \['code'\] would hide"),
])
def test_a_data_class_gets_every_field_each_of_its_type(stream: bytes, said: str) -> None:
    with pytest.raises(ControlDecodeError, match=said):
        decode(stream)


def test_the_writer_refuses_a_data_class_whose_fields_are_not_their_types() -> None:
    """On the sending rank: the others would refuse it."""
    with pytest.raises(control_wire.ControlEncodeError, match="Command.op holding a int"):
        encode(cluster.Command(5))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Failure.error"):
        encode(cluster.Failure(RuntimeError("x")))  # type: ignore[arg-type]


def _nested_spec(levels: int) -> LayerSpec:
    spec = LayerSpec("linear", "a", (2, 3))
    for _ in range(levels):
        spec = LayerSpec("sequential", children=(spec,))
    return spec


def test_what_the_writer_writes_the_reader_reads_however_deep() -> None:
    """A command carrying a spec nested 65 layers deep (--max-spec-depth allows any depth) was written
    by rank 0 and refused by every other rank as nested over 200 deep, which stops the rank; the
    writer now refuses it first, on the sending rank."""
    caller = Caller("t", Role.ADMIN)
    deepest = cluster.Command("create_module", (_nested_spec(64),), {"request": None}, None, "ab", caller)
    assert decode(encode(deepest)) == deepest
    with pytest.raises(control_wire.ControlEncodeError, match="nested over 200 deep"):
        encode(cluster.Command("create_module", (_nested_spec(65),), {"request": None}, None, "ab", caller))
    nested: list[object] = []
    for _ in range(control_wire.MAX_DEPTH):
        nested = [nested]
    assert decode(encode(nested)) == nested
    with pytest.raises(control_wire.ControlEncodeError, match="nested over"):
        encode([nested])


@pytest.mark.parametrize("made, said", [
    (lambda: 10**5000, "over 4300 digits"), (lambda: -(10**4300), "over 4300 digits"),
    (lambda: torch.eye(2).to_sparse(), "layout torch.sparse_coo"), (lambda: torch.empty(2, device="meta"), "on meta"),
    (lambda: torch.quantize_per_tensor(torch.ones(2), 0.5, 1, torch.qint8), "torch.qint8"),
    (lambda: torch.qint8, "dtype qint8"),
], ids=["long int", "long negative int", "sparse", "meta", "quantized", "quantized dtype"])
def test_the_writer_refuses_what_the_reader_would_not_build(made: typing.Callable[[], object], said: str) -> None:
    value = made()
    with pytest.raises(control_wire.ControlEncodeError, match=said):
        encode(value)


@pytest.mark.parametrize("tensor", [
    torch.ones(1, 3)[:, 1],  # one element of stride 3: the writer's view as bytes was a RuntimeError
    torch.arange(4.0)[::2][:1], torch.tensor([1 + 2j]).conj(), torch.tensor([1 + 2j]).conj().imag,
    torch.arange(6.0).reshape(2, 3)[:, ::2],
], ids=["column of one row", "stepped single", "conjugate", "negative view", "stepped"])
def test_strided_and_lazily_resolved_tensors_travel_as_their_values(tensor: torch.Tensor) -> None:
    back = decode(encode(tensor))
    assert back.dtype == tensor.dtype and torch.equal(back, tensor.resolve_conj().resolve_neg())


def test_integers_travel_up_to_their_digit_limit() -> None:
    for value in (2**63, -(2**63) - 1, 10**4300 - 1, -(10**4300 - 1)):
        assert decode(encode(value)) == value


def _samples() -> list[object]:
    """One of each data class the table names, as the ranks build them."""
    from weightavg_server.domain import ema, specs, tensors
    from weightavg_server.domain.averaging import BufferMode
    from weightavg_server.store import snapshot, tenants

    schedule = ema.EmaSchedule(0.99, True, 1.0, 0.75, 0.0, 10)
    state = ema.EmaState(schedule, 3)
    return [
        cluster.Command("free", (["m"], False), {"request": None}, (1,), "ab", Caller("t", Role.USER), {1: ("x",)},
                        cluster.Sink()),
        cluster.Failure(InvalidArgument("rank 1: no")), cluster.Sink(named=[("w", torch.ones(1))]),
        cluster.Relayed([("w", (2, 3), torch.float32)], [("w", torch.ones(2, 3))]), cluster.RemoteStop("ab"),
        cluster.Move("h", 1, -1, True), cluster.Layout("module", [("w", "parameter", (2,), torch.float16, "cpu")]),
        tenants.Quota(1, 2, 3), specs.LayerSpec("linear", "a", (2, 3, None, 1.5, True, "x", (1, 2)), (("bias", False),)),
        specs.OptionRow(1, "linear", "a", (("in_features", 2),)), BufferMode.COPY,
        ema.ScheduleChange(decay=0.5, warmup=None, update_after_step=3), state,
        tensors.HandleSummary("cpu", torch.float32, 8, 2, state), tensors.HandleSummary("", None, 0, 0),
        snapshot.SnapshotResult("/s", 2, 10, ["x"]), service.Ref("h", Kind.MODEL, "t"), service.RankInfo(1, "cpu", 2, 3),
        service.RankMetrics([[("loss", torch.tensor(0.5))], []]), service.Reduced(1, 2),
        service.Size(entries=[("w", (2,))], ema=state), service.Size(shape=(2, 3)), service.Size(parameter_count=4),
        service.EmaResult(3, 0.99), Caller("t", Role.READER), ema.EmaSchedule(1, False, 1, 1, 0, 0),  # ints as floats
        service.ModelDescription([specs.OptionRow(0, "relu", "", ())], "mse", {}, "sgd", {"lr": 0.1, "x": (1,)},
                                 {"batch_size": 2}, {}, 4, 0),
        snapshot.SnapshotError("torn"),
    ]


def test_one_of_each_data_class_the_ranks_send_round_trips() -> None:
    """The field checks take what the ranks really build (a float field given an int included)."""
    samples = _samples()
    sent_dataclasses = {
        key for key in control_wire.SENT
        if isinstance(found := control_wire._sent(*key), type) and dataclasses.is_dataclass(found)
    }
    assert sent_dataclasses <= {(type(s).__module__, type(s).__qualname__) for s in samples}
    for sample in samples:
        back = decode(encode(sample))
        if isinstance(sample, BaseException):
            assert type(back) is type(sample) and back.args == sample.args
        elif isinstance(sample, cluster.Failure):
            assert type(back.error) is type(sample.error) and back.error.args == sample.error.args
        elif isinstance(sample, cluster.Sink):
            assert back == cluster.Sink()
        elif isinstance(sample, cluster.Relayed):
            assert back.headers == sample.headers and back.tensors == []
        elif isinstance(sample, service.RankMetrics):
            assert len(back.ranks) == 2 and torch.equal(back.ranks[0][0][1], sample.ranks[0][0][1])
        else:
            assert back == sample, sample


def _mutated(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """`data` with one random corruption: a bit flipped, a byte replaced, a count made huge, cut short,
    or a piece of another valid encoding spliced in."""
    at = rng.randrange(len(control_wire.MAGIC), len(data))
    how = rng.randrange(6)
    if how == 0:
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    if how == 1:
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
    if how == 2:
        return data[:at] + struct.pack("<Q", rng.choice([2**64 - 1, 2**63, 2**60, 2**32, 7])) + data[at + 8:]
    if how == 3:
        return data[:at]
    other = rng.choice(others)
    start = rng.randrange(len(control_wire.MAGIC), len(other))
    piece = other[start:start + rng.randrange(1, 64)]
    return data[:at] + piece + (data[at:] if how == 4 else data[at + len(piece):])


def test_corrupted_encodings_decode_to_a_value_or_a_control_decode_error() -> None:
    """Thousands of seeded corruptions of valid encodings: each decodes to a value the writer can send
    again, or fails as ControlDecodeError; never another exception, never a hang."""
    rng = random.Random(20261128)
    valid = [encode(sample) for sample in _samples()] + [encode({
        "ints": [0, -1, 2**63, -(2**70)], "floats": (0.5, float("nan")), "s": "é", "b": b"\0\1", "set": {1, "a"},
        "frozen": frozenset({(1, 2)}), "t": torch.arange(6, dtype=torch.int16).reshape(2, 3), "dtype": torch.float16,
        "size": torch.Size([2, 0]), "device": torch.device("cpu"), "stop": cluster.never, "kind": Kind.TENSOR,
    })]
    decoded = refused = 0
    for _ in range(20000):
        stream = _mutated(rng, rng.choice(valid), valid)
        try:
            value = decode(stream)
        except ControlDecodeError:
            refused += 1
            continue
        decoded += 1
        decode(encode(value))  # whatever the reader built is what a rank sends
    assert refused > 15000 and decoded > 200  # the corruptions reached past the first checks


@pytest.fixture
def rank_0_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[cluster.ClusterService]:
    """Rank 0's `_send` in a one-rank gloo group: torch's real broadcast and gather, through
    control_wire's writer and reader, with nothing of the service built but what `_send` uses."""
    import threading

    import torch.distributed as dist

    class _Fabric:
        world_size, rank, timeout = 1, 0, 30.0
        control = None

    service = object.__new__(cluster.ClusterService)
    service.fabric = _Fabric()  # type: ignore[assignment]
    service._channel = threading.Lock()
    service._broken = ""
    service.on_broken = lambda reason: None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(c10d, "_pickler", control_wire.ControlWriter)
    monkeypatch.setattr(c10d, "_unpickler", control_wire.ControlReader)
    try:
        yield service
    finally:
        dist.destroy_process_group()


def test_a_command_rank_0_cannot_encode_is_refused_without_breaking_the_cluster(
    rank_0_alone: cluster.ClusterService,
) -> None:
    """A create_module whose spec nests 65 layers deep (allowed with --max-spec-depth 65 or more) is
    refused by the writer on rank 0 before any byte moves: INVALID_ARGUMENT naming the nesting, and the
    cluster serves on. It was UNAVAILABLE for good, as if a rank had died."""
    with pytest.raises(InvalidArgument, match="rank 0 cannot send create_module .* nested over 200 deep"):
        rank_0_alone._send(cluster.Command("create_module", (_nested_spec(65),)))
    assert rank_0_alone._broken == ""


@pytest.mark.parametrize("held", ["12", -1, True])
def test_a_reply_that_is_not_a_ranks_breaks_the_cluster_with_unavailable(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch, held: object
) -> None:
    """A reply that decodes but is not what `follow` sends (a result, then two byte counts) was
    unpacked by rank 0 into a TypeError or ValueError: INTERNAL to the client, and the cluster went on
    with a rank answering what this code never sends. It is UNAVAILABLE naming the rank, the cluster
    broken as when a rank is lost. The reply here is rank 0's own, through torch's real gather."""
    monkeypatch.setattr(cluster, "execute", lambda service, fabric, command: None)
    monkeypatch.setattr(cluster, "held_bytes", lambda service: held)
    said = r"rank 0 sent a tuple where follow's \(result, held bytes, kept bytes\) was expected"
    with pytest.raises(Unavailable, match=f"the cluster lost a rank .*_ping: MalformedExchange: {said}"):
        rank_0_alone._send(cluster.Command("_ping"))
    assert rank_0_alone._broken
    with pytest.raises(Unavailable):  # for good: the next call is refused before it is sent
        rank_0_alone._send(cluster.Command("_ping"))


def test_a_gathered_reply_of_another_shape_is_named() -> None:
    """Rank 0 names the first rank whose reply is not a (result, held, kept) triple."""
    replies = [(None, 0, 0), ({"a": 1}, 5, 7)]
    assert cluster._as_sent(replies, cluster._is_reply, "a reply") is replies
    with pytest.raises(cluster.MalformedExchange, match="^rank 1 sent a list where a reply was expected"):
        cluster._as_sent([(None, 0, 0), [None, 0, 0]], cluster._is_reply, "a reply")
    for reply in [(None, 0), (None, 0, 1.5), (None, True, 0), (None, 0, -1)]:
        with pytest.raises(cluster.MalformedExchange, match="^rank 0 sent a tuple where a reply was expected"):
            cluster._as_sent([reply], cluster._is_reply, "a reply")


# -- what a rank receives from another, checked before use (review 2026-11-28) ---------------------------
# Every value a rank receives in an object collective decodes (control_wire's own checks) and then must be
# what cluster.py sends there: otherwise a MalformedExchange, which stops the ranks (rank 0: UNAVAILABLE),
# never a TypeError turned INTERNAL with the ranks out of step, nor snapshots deleted.


def _sending(monkeypatch: pytest.MonkeyPatch, value: object) -> None:
    """This rank sends `value` in place of its own in its next all_gather_object, through torch's real
    collective and control_wire's writer and reader (a one-rank group: `rank_0_alone`)."""
    import torch.distributed as dist

    real = dist.all_gather_object
    calls = iter(range(2**31))

    def forged(out: list[object], obj: object, *args: object, **kwargs: object) -> None:
        real(out, value if next(calls) == 0 else obj, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dist, "all_gather_object", forged)


def _peer_sends(monkeypatch: pytest.MonkeyPatch, me: int, peer: int, values: list[object]) -> None:
    """A two-rank exchange in one process: in each all_gather_object, this rank (`me`) gets back what
    it sent and `peer` sends the next of `values`, each through control_wire's writer and reader."""
    import torch.distributed as dist

    pending = list(values)

    def gathered(out: list[object], obj: object, group: object = None) -> None:
        out[me], out[peer] = decode(encode(obj)), decode(encode(pending.pop(0)))

    monkeypatch.setattr(dist, "all_gather_object", gathered)


def _fabric(rank: int, world_size: int) -> cluster.Fabric:
    return cluster.Fabric(rank, world_size, torch.device("cpu"), ("cpu",) * world_size, "gloo", None, 30.0)


@pytest.fixture
def rank_service() -> Service:
    """A rank's service on the CPU, under a cap of 1 MB, holding a dictionary of one entry 'w'."""
    from weightavg_server.store.limits import Limits
    from weightavg_server.store.registry import Registry

    s = Service(Registry(Limits(max_device_bytes=2**20)), service.Settings(
        device=torch.device("cpu"), max_spec_depth=32, session_lease_seconds=60.0, max_session_lease_seconds=60.0,
    ))
    s.create_dictionary(cluster.Replay([("w", torch.ones(4))]))
    return s


def _held(s: Service) -> str:
    """The handle of the one object `s` holds."""
    [(handle, _)] = s.store.items()
    return handle


@pytest.mark.parametrize("sent", [7, None, ["cpu"]])
def test_a_device_that_is_not_a_name_stops_every_rank_at_join(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch, sent: object
) -> None:
    """At join each rank's device name: anything else was made a str and kept as that rank's device.
    A MalformedExchange is a ValueError: `weightavg serve: rank 0 sent ...`, before serving."""
    assert cluster._gathered_devices(None, 1, torch.device("cpu")) == ("cpu",)
    _sending(monkeypatch, sent)
    with pytest.raises(ValueError, match="^rank 0 sent a .* where its device's name \\(a str\\) was expected"):
        cluster._gathered_devices(None, 1, torch.device("cpu"))


@pytest.mark.parametrize("sent", ["3", {3: 1}, [3, -1], [3.0]])
def test_snapshot_generations_that_are_not_numbers_stop_the_start_and_delete_nothing(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sent: object
) -> None:
    """A rank's generations in place of a list of ints: the string "3" made generation "3", which no
    directory's int equals, so every rank deleted every snapshot it held (gen-3 included) and started
    empty. It stops the start now, before anything is removed."""
    from weightavg_server.store import snapshot

    (tmp_path / "gen-3").mkdir()
    (tmp_path / "gen-3" / snapshot.MANIFEST).write_text("{}")
    _sending(monkeypatch, sent)
    with pytest.raises(cluster.MalformedExchange, match="^rank 0 sent a .* where the snapshot generations"):
        cluster.agree_on_snapshot(_fabric(0, 1), str(tmp_path))
    assert cluster.generations(str(tmp_path)) == [3]


def test_a_refusal_that_is_not_a_bool_breaks_the_cluster_with_unavailable(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank's refusal (`_agree`) that is a tensor of two values: `any()` of it was a RuntimeError that
    rank 0 answered as its own failure (INTERNAL to the client) with the other ranks out of step. It
    breaks the cluster now, through torch's real collectives, as a lost rank does."""
    monkeypatch.setattr(cluster, "execute", lambda s, fabric, command: cluster._answered(
        fabric, command.op, lambda: cluster._agree(fabric, None)))
    monkeypatch.setattr(cluster, "held_bytes", lambda s: 0)
    _sending(monkeypatch, torch.ones(2))
    said = "_ping: MalformedExchange: rank 0 sent a Tensor where whether it refuses its part"
    with pytest.raises(Unavailable, match=f"the cluster lost a rank .*{said}"):
        rank_0_alone._send(cluster.Command("_ping"))
    assert rank_0_alone._broken


@pytest.mark.parametrize("layout", [
    "w", {"w": (4,)}, [("w", (4,))], [("w", (-4,), torch.float32)], [("w", (2**40, 2**40), torch.float32)],
    [("w", (4,), "float32")],
])
def test_a_fetch_layout_of_another_shape_stops_before_rank_0_reserves(
    rank_service: Service, monkeypatch: pytest.MonkeyPatch, layout: object
) -> None:
    """Rank 1's layout of what rank 0 fetches from it: a str or rows of another shape were a ValueError
    or TypeError, a negative size a RuntimeError from torch.empty, sizes past torch's (whose numel
    overflowed to 0, so nothing was reserved) a TypeError: INTERNAL to the client, with rank 1 by
    then in the next exchange (`_agree`) and rank 0 in the gather of replies."""
    _peer_sends(monkeypatch, 0, 1, [layout, False])
    with contextlib.ExitStack() as held:
        with pytest.raises(cluster.MalformedExchange, match="^rank 1 sent a .* where a fetch's layout"):
            cluster._fetch(rank_service, _fabric(0, 2), "x", ["w"], 1, cluster.Sink(held))


@pytest.mark.parametrize("signature", [
    [("w", (torch.ones(2),), "torch.float32")], torch.ones(2), "w", [("w", (4,), torch.float32)],
    [("w", [4], "torch.float32")],
])
def test_a_broadcast_signature_of_another_shape_stops_the_ranks(
    rank_service: Service, monkeypatch: pytest.MonkeyPatch, signature: object
) -> None:
    """Rank 1's signature for a broadcast: a tensor among a row's sizes made every rank's comparison a
    RuntimeError (INTERNAL); anything else was FAILED_PRECONDITION telling the client to set per-rank
    values alike, which no client can do about a rank that sends no signature."""
    monkeypatch.setattr(rank_service, "_replicated_of", lambda entry: [("w", torch.ones(4))])
    _peer_sends(monkeypatch, 0, 1, [signature])
    with pytest.raises(cluster.MalformedExchange, match="^rank 1 sent a .* where a broadcast's signature"):
        cluster._broadcast(rank_service, _fabric(0, 2), _held(rank_service))


_ROW = ("w", "entry", (4,), torch.float32, "cpu")


@pytest.mark.parametrize("layout", [
    "w", [_ROW], cluster.Layout("dictionary", [("w", "entry", (-4,), torch.float32, "cpu")]),
    cluster.Layout("tree", [_ROW]), cluster.Layout("module", [_ROW]),
    cluster.Layout("dictionary", [("w", "buffer", (4,), torch.float32, "cpu")]),
])
def test_a_move_layout_of_another_shape_stops_the_receiving_rank_before_it_reserves(
    rank_service: Service, monkeypatch: pytest.MonkeyPatch, layout: object
) -> None:
    """The layout rank 0 sends of a source it moves to rank 1: a str or list had no rows (AttributeError),
    a negative size failed in torch.empty (RuntimeError), while rank 0 went on to `_agree` and to send;
    a kind or role that `_layout` never makes built a stand-in without the rows' tensors."""
    _peer_sends(monkeypatch, 1, 0, [layout, False])
    with contextlib.ExitStack() as held:
        with pytest.raises(cluster.MalformedExchange, match="^rank 0 sent a .* where a move's layout"):
            cluster._moved(rank_service, _fabric(1, 2), cluster.Move("x", 0, 1), held)


@pytest.mark.parametrize("size", [-2**20, "5", 2.5, True, [5]])
def test_a_metrics_size_that_is_not_a_byte_count_stops_before_rank_0_reserves(
    rank_service: Service, monkeypatch: pytest.MonkeyPatch, size: object
) -> None:
    """Rank 1's bytes of the metrics it will send rank 0 (`_rank_metrics`): a str or a list was a
    TypeError in rank 0's sum (INTERNAL, rank 1 by then in `_agree`); a negative count or a float went
    through (reserving nothing, or a fraction of a byte)."""
    _peer_sends(monkeypatch, 0, 1, [size, False])
    with contextlib.ExitStack() as held:
        with pytest.raises(cluster.MalformedExchange, match="^rank 1 sent a .* where the bytes of its metrics"):
            cluster._rank_metrics(rank_service, _fabric(0, 2), "test", "m", 1, cluster.Sink(held))


@pytest.mark.parametrize("meta", [
    ((-3,), torch.float32), ((3,), "float32"), ((3,), torch.float32, 1), "3", [(3,), torch.float32],
    ((2**62, 4), torch.float32),
])
def test_a_tensor_answers_meta_of_another_shape_stops_before_rank_0_reserves(
    rank_service: Service, monkeypatch: pytest.MonkeyPatch, meta: object
) -> None:
    """Rank 1's (shape, dtype) of its tensor answer (`_tensor_back`): a negative size failed in the
    allocation, a dtype's name had no itemsize, a 3-tuple or a str failed to unpack: INTERNAL, with
    rank 1 by then in `_agree`."""
    _peer_sends(monkeypatch, 0, 1, [meta, False])
    with contextlib.ExitStack() as held:
        command = cluster.Command("evaluate", ranks=(1,), sink=cluster.Sink(held))
        with pytest.raises(cluster.MalformedExchange, match="^rank 1 sent a .* where a tensor answer's"):
            cluster._tensor_back(rank_service, _fabric(0, 2), command, None)


@pytest.mark.parametrize("sent", ["_stop", None, [cluster.Command("_stop")], cluster.Command("_ping", ranks=(7,))])
def test_a_follower_stops_on_what_is_no_command_of_this_cluster_saying_so(
    monkeypatch: pytest.MonkeyPatch, sent: object
) -> None:
    """What rank 1 receives from rank 0 in place of a command: anything but a Command was taken for
    rank 0's stop (logged 'stop from rank 0', exit status 0, so torchrun did not restart the group);
    a command for rank 7 of two ranks was taken for one. It stops now with a MalformedExchange
    (`weightavg serve: rank 0 sent ...`, exit status 1)."""
    import torch.distributed as dist

    boxes = [sent, cluster.Command("_stop")]
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, group: box.__setitem__(
        0, decode(encode(boxes.pop(0)))))
    monkeypatch.setattr(dist, "gather_object", lambda *args, **kwargs: None)
    with pytest.raises(cluster.MalformedExchange, match="^rank 0 sent a .* where a command was expected"):
        cluster.follow(object.__new__(Service), _fabric(1, 2))


def test_what_the_ranks_send_one_another_is_what_they_expect(rank_service: Service) -> None:
    """The checks take what this code sends at each exchange (so none stops a healthy cluster)."""
    entry = rank_service.store.get(_held(rank_service))
    layout, _ = cluster._layout(cluster.source_of(entry), buffers=False)
    sent = [
        (cluster._is_generations, [[], [1, 2]]),
        (cluster._is_fetch_layout, [None, [("w", (4,), torch.float32), ("s", (), torch.int64)]]),
        (cluster._is_signature, [None, [("w", (4,), "torch.float32")]]),
        (cluster._is_move_layout, [None, layout, cluster._layout(torch.nn.Linear(2, 3), buffers=True)[0]]),
        (cluster._is_tensor_meta, [None, ((0, 3), torch.float16), ((), torch.bool)]),
        (cluster._is_reply, [(None, 0, 0), ([1, "a"], 2**40, 7)]),
        (lambda v: cluster._is_command(v, 2), [cluster.Command("_stop"), cluster.Command("free", ranks=(1,))]),
    ]
    for fits, values in sent:
        assert all(fits(decode(encode(v))) for v in values), fits


def test_every_sent_name_is_in_the_table_the_reader_looks_names_up_in() -> None:
    """The reader finds a stream's class in a table built from modules imported in control_wire's own
    code, never by importing what the stream names: every `SENT` entry must be there, as the object
    its module holds under that name (one left out would fail only when a rank first sent it)."""
    table = control_wire._table()
    assert set(table) == set(control_wire.SENT)
    for (module, name), found in table.items():
        assert (found.__module__, found.__qualname__) == (module, name)


# -- each verb's answer from another rank, checked against what the verb answers ------------------------


def _with_rank_1_answering(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch, answer: object
) -> None:
    """Rank 0 of a two-rank cluster whose rank 1 replies `answer` for every command: torch's real
    gather runs over the one-rank group (rank 0's own reply, through control_wire), and rank 1's reply
    is put beside it, encoded and decoded as it would arrive."""
    real = cluster.dist.gather_object
    rank_0_alone.fabric.world_size = 2  # type: ignore[misc]
    rank_0_alone._placements_lock = threading.Lock()  # what `_send` takes to note each rank's bytes

    def gather(obj: object, replies: list[object], dst: int, group: object) -> None:
        mine: list[object] = [None]
        real(obj, mine, dst=dst, group=group)
        replies[0], replies[1] = mine[0], decode(encode((answer, 0, 0)))

    monkeypatch.setattr(cluster.dist, "gather_object", gather)
    monkeypatch.setattr(cluster, "execute", lambda service, fabric, command: None)
    monkeypatch.setattr(cluster, "held_bytes", lambda service: 0)


@pytest.mark.parametrize(("op", "args", "forged"), [
    ("average_parameters", (), "12"),  # an int answer: a count
    ("load_parameters", (), {"w": "yes"}),  # dict[str, bool]
    ("update_dictionary", (), ("w",)),  # list[str], a tuple
    ("create_module", (), ("h", 1)),  # a Ref
    ("_release", (), [1, 2]),  # list[str], rank 1's freed handles
    ("_across", ("average_parameters", (), {}, 1, []), [3]),  # the verb _across runs answers an int
])
def test_an_answer_of_another_rank_that_is_not_what_the_verb_answers_breaks_the_cluster(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch, op: str, args: tuple[object, ...],
    forged: object,
) -> None:
    """A reply that is a (result, held, kept) triple but whose result is not what the verb answers
    reached the caller: `_handles` unpacked as pairs (TypeError: INTERNAL), a count or copy map
    turned into a reply field by the servicer, or a wrong value answered as right. Rank 0 now checks
    every other rank's result against the verb's annotated answer: UNAVAILABLE naming the rank and
    the verb, the cluster broken as for a lost rank."""
    _with_rank_1_answering(rank_0_alone, monkeypatch, forged)
    said = rf"rank 1 sent a {type(forged).__name__} where what {op} answers"
    with pytest.raises(Unavailable, match=f"the cluster lost a rank .*MalformedExchange: {said}"):
        rank_0_alone._send(cluster.Command(op, args))
    assert rank_0_alone._broken


@pytest.mark.parametrize(("op", "args", "answer"), [
    ("average_parameters", (), 12),
    ("load_parameters", (), {"w": True, "b": False}),
    ("update_dictionary", (), ["w"]),
    ("create_module", (), service.Ref("h", Kind.MODULE)),
    ("reset_batchnorm", (), {"bn.running_mean": 0.1, "other": None}),
    ("_release", (), ["a", "b"]),
    ("_across", ("average_parameters", (), {}, 1, []), 3),
    ("average_parameters", (), None),  # a rank that took no part
    ("average_parameters", (), cluster.Failure(InvalidArgument("no"))),
    ("_ping", (), None),
])
def test_what_a_verb_answers_passes_rank_0s_check(
    rank_0_alone: cluster.ClusterService, monkeypatch: pytest.MonkeyPatch, op: str, args: tuple[object, ...],
    answer: object,
) -> None:
    _with_rank_1_answering(rank_0_alone, monkeypatch, answer)
    results = rank_0_alone._send(cluster.Command(op, args))
    assert repr(results[1]) == repr(answer) and not rank_0_alone._broken  # errors compare by identity


def test_every_verb_a_rank_runs_says_what_it_answers() -> None:
    """The check reads each verb's answer from its return annotation: every Service method and rank
    operation a command may name has one that resolves (a verb added without one would be checked
    against Any, so this test names it); only `_ping` (answers nothing) and `_across` (answers the
    verb it runs) are Any."""
    ops = list(cluster.RANK_OPS) + [n for n in vars(Service) if cluster.runnable(n)]
    hints = {op: cluster.answer_hint(op) for op in ops}
    assert sorted(op for op, hint in hints.items() if hint is typing.Any) == ["_across", "_ping"]
