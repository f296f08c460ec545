"""What the cluster's ranks may unpickle from one another (server/weightavg_server/control_wire.py).

torch.distributed's object collectives unpickled whatever reached a rank's gloo port, and rebuilt
each tensor among a command's results with a `torch.load(weights_only=False)`. The cluster's ranks
now pickle tensors as dtype, shape and bytes and unpickle only the classes they send one another;
tests/test_cluster.py runs every command through real torchrun clusters with them installed.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from weightavg_server import cluster, control_wire
from weightavg_server.domain.errors import ResourceExhausted
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.store.registry import Kind


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
        "device": torch.device("cpu"), "stop": cluster.never, "kept": {1, 2}, "exc": ValueError("x"),
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
