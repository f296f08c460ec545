"""weightavg.checkpoints against the safetensors package itself: files the package writes are read
bit for bit, files written here load in the package (and so in transformers), every dtype included;
damaged or foreign files are refused with the reason, and nothing in a file runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from weightavg import checkpoints
from weightavg.checkpoints import CheckpointError

TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(TORCH_DTYPES):
        values = torch.randn(3, 5, generator=g) * 50
        out[f"layers.{i}.w"] = values > 0 if dtype == torch.bool else values.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def test_a_file_the_safetensors_package_wrote_is_read_bit_for_bit(tmp_path: Path) -> None:
    sent = _tensors()
    save_file(sent, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    got = checkpoints.read(tmp_path / "m.safetensors")
    assert sorted(got) == sorted(sent)
    for name, t in sent.items():
        assert got[name].shape == tuple(t.shape), name
        assert got[name].dtype.itemsize == t.element_size(), name
        assert np.array_equal(got[name].reshape(-1).view(np.uint8), _bits(t).reshape(-1)), name
        assert not got[name].flags.writeable  # views of the mapped file, never written through
    assert got["layers.3.w"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_a_file_written_here_loads_in_the_safetensors_package(tmp_path: Path) -> None:
    sent = {name: t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
            for name, t in _tensors().items()}
    sent["big endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    sent["strided"] = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    checkpoints.write(tmp_path / "out.safetensors", sent, {"format": "pt"})
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(loaded) == sorted(sent)
    for name, array in sent.items():
        want = array.astype(array.dtype.newbyteorder("<")).copy(order="C")
        assert tuple(loaded[name].shape) == array.shape, name
        assert np.array_equal(_bits(loaded[name]).reshape(-1), want.reshape(-1).view(np.uint8)), name
    header_length = struct.unpack("<Q", (tmp_path / "out.safetensors").read_bytes()[:8])[0]
    assert header_length % 8 == 0  # padded, as the format asks
    assert not (tmp_path / "out.safetensors.partial").exists()


def test_a_directory_of_shards_is_one_checkpoint_and_a_name_in_two_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert {n: a.tolist() for n, a in checkpoints.read(tmp_path).items()} == {"a": [1.0, 1.0], "b": [0.0, 0.0, 0.0]}
    save_file({"a": torch.ones(1)}, str(tmp_path / "model-00003-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'a' is in two shards"):
        checkpoints.read(tmp_path)
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors file .only safetensors checkpoints"):
        checkpoints.read(_empty_dir(tmp_path))
    with pytest.raises(CheckpointError, match="neither a .safetensors file nor a directory"):
        checkpoints.read(tmp_path / "missing")


def _empty_dir(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _file(tmp_path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


@pytest.mark.parametrize(("header", "data", "length", "message"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, r"data_offsets \[0, 8\] outside"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "8 bytes for shape"),
    ({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "has dtype 'F8_E4M3'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "lacks dtype, shape or data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps the tensor before it"),
    ([1, 2], b"", None, "not a JSON object"),
    ({}, b"", 1 << 40, "does not fit in the file"),
])
def test_a_damaged_or_foreign_file_is_refused_with_the_reason(
    tmp_path: Path, header: object, data: bytes, length: int | None, message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        checkpoints.read(_file(tmp_path, header, data, length))


def test_a_header_that_is_not_json_and_a_file_too_short_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(CheckpointError, match="the header is not JSON"):
        checkpoints.read(path)
    path.write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="too short for a safetensors header"):
        checkpoints.read(path)


def test_an_array_safetensors_cannot_hold_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tensor 'c' has dtype complex64"):
        checkpoints.write(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
    assert not list(tmp_path.iterdir())


def test_shards_follow_mergekits_rule_and_names_and_the_index_maps_each_tensor(tmp_path: Path) -> None:
    """A shard closes when the next tensor would take it past the limit (mergekit's TensorWriter rule);
    a tensor larger than the limit sits alone; names are Hugging Face's, and the index gives each
    tensor's shard and the total size. The safetensors package reads every shard."""
    sizes = {"a": 40, "b": 40, "c": 30, "big": 500, "d": 10, "e": 90}  # float32 elements: 160, 160, 120, 2000, ...
    arrays = {name: np.arange(n, dtype=np.float32) + i for i, (name, n) in enumerate(sizes.items())}
    with checkpoints.ShardWriter(tmp_path, 400, {"format": "pt"}) as writer:
        for name, array in arrays.items():
            writer.add(name, array)
        written = writer.finish()
    assert written == tmp_path / "model.safetensors.index.json"
    index = json.loads(written.read_text())
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "big": names[2], "d": names[3],
                                   "e": names[3]}
    assert index["metadata"] == {"total_size": sum(a.nbytes for a in arrays.values())}
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    for shard in names:
        for name, t in load_file(str(tmp_path / shard)).items():
            np.testing.assert_array_equal(t.numpy(), arrays[name])


def test_one_shard_is_model_safetensors_and_earlier_outputs_are_replaced_not_mixed(tmp_path: Path) -> None:
    """Where one shard holds everything the file is model.safetensors, and shards and an index an earlier
    run left are removed (a loader would read them instead of, or beside, the new file); other files
    of the directory stay. Before `finish` nothing is visible, and `abort` (or an exception in the
    with block) leaves the directory as it was."""
    for old in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                "config.json", "model-notes.safetensors.txt"):
        (tmp_path / old).write_text("old")
    with pytest.raises(RuntimeError):
        with checkpoints.ShardWriter(tmp_path, 1 << 20) as writer:
            writer.add("w", np.ones(3, np.float32))
            assert len([f for f in tmp_path.iterdir() if f.name.startswith(".weightavg-")]) == 1
            raise RuntimeError("a failed merge")
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
         "config.json", "model-notes.safetensors.txt"])
    with checkpoints.ShardWriter(tmp_path, 1 << 20) as writer:
        writer.add("w", np.ones(3, np.float32))
        with pytest.raises(CheckpointError, match="already added"):
            writer.add("w", np.zeros(3, np.float32))
        assert writer.finish() == tmp_path / "model.safetensors"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model-notes.safetensors.txt",
                                                          "model.safetensors"]
    np.testing.assert_array_equal(checkpoints.read(tmp_path / "model.safetensors")["w"], np.ones(3, np.float32))
    with pytest.raises(ValueError, match="positive size"):
        checkpoints.ShardWriter(tmp_path / "x", 0)
    with pytest.raises(CheckpointError, match="no tensor"), checkpoints.ShardWriter(tmp_path / "y") as empty:
        empty.finish()


def test_tensors_go_to_disk_when_added_and_a_header_that_outgrows_its_room_still_makes_a_valid_file(
    tmp_path: Path
) -> None:
    """The writer holds no shard in memory: a tensor's bytes are in the staged file once added, after
    the room kept for the header, which is written there padded with spaces (the safetensors package
    reads it). With too little room (8 bytes) the shard is copied once behind a header of its size,
    and reads the same."""
    arrays = {f"layers.{i}.w": np.arange(1000, dtype=np.float32) * i for i in range(5)}
    for room, name in ((checkpoints.header_room({k: a.shape for k, a in arrays.items()}), "roomy"), (8, "tight")):
        out = tmp_path / name
        with checkpoints.ShardWriter(out, 1 << 20, {"format": "pt"}, header_room=room) as writer:
            staged = next(f for f in out.iterdir() if f.name.startswith(".weightavg-"))
            for i, (key, array) in enumerate(arrays.items()):
                writer.add(key, array)
                assert (staged / "0.safetensors").stat().st_size == 8 + room + (i + 1) * array.nbytes
            written = writer.finish()
        (length,) = struct.unpack("<Q", written.read_bytes()[:8])
        assert (length == room) == (name == "roomy")
        loaded = load_file(str(written))
        assert list(loaded) == list(arrays)
        for key, array in arrays.items():
            np.testing.assert_array_equal(loaded[key].numpy(), array)


def test_header_room_bounds_every_header_of_those_shapes() -> None:
    """Whatever the dtypes (4-letter codes the longest) and the offsets, a shard's header of these
    tensors fits the room `header_room` gives: the writer never copies a shard of a planned merge."""
    g = np.random.default_rng(0)
    for trial in range(20):
        shapes = {f"model.layers.{i}.{'x' * int(g.integers(1, 40))}": tuple(int(d) for d in g.integers(0, 5000, size=int(g.integers(0, 4))))
                  for i in range(int(g.integers(1, 60)))}
        metadata = {"format": "pt", "merge_method": "ties"}
        room = checkpoints.header_room(shapes, metadata)
        header = {"__metadata__": metadata} | {name: {"dtype": "BF16", "shape": list(shape),
                                                     "data_offsets": [10**19 - 1, 10**19 - 1]}
                                              for name, shape in shapes.items()}
        assert len(json.dumps(header, separators=(",", ":"))) <= room and room % 8 == 0, trial
