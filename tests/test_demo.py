"""`weightavg demo`: the command runs end to end, and the MNIST reader takes gzipped and plain IDX files."""

from __future__ import annotations

import gzip
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightavg._cli import main as cli_main
from weightavg_server.ops import demo

QUICK = ["--epochs", "1", "--avg-epochs", "1", "--avg-runs", "1", "--hidden", "32", "--ema-epochs", "4"]


def test_demo_command_runs_both_examples_on_digits() -> None:
    pytest.importorskip("sklearn")
    script = Path(sys.executable).with_name("weightavg")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "weightavg._cli"]
    result = subprocess.run([*command, "demo", *QUICK], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "scikit-learn digits (8x8): 1437 train, 360 test" in out
    assert "averaging run 1 (mean of 2)" in out
    assert "averaged weights, batchnorm recalculated" in out
    # 1,437 samples in batches of 100: 15 batches per epoch, 2 epochs before, 15 after recalculation
    assert "num_batches_tracked             30                              15" in out
    assert "[##############################] 1/1" in result.stderr
    # Example 3: SWA from epoch 1 (4 // 3) holds 4 epochs at epoch 4; the EMA's warm-up decay at step 4
    # is 1 - 4 ** (-2/3) = 0.603 (below the 0.9 cap)
    assert "Example 3: one run averaged two ways" in out
    assert "EMA: float32, decay 0.9 with timm's warm-up" in out
    assert re.search(r"^\s+4\s+\d+\.\d\d%\s+\d+\.\d\d%\s+4\s+\d+\.\d\d%\s+0\.603$", out, re.MULTILINE), out


def _idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_demo_reads_mnist_idx_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 250)
    images = rng.integers(0, 40, (250, 28, 28))
    images[np.arange(250), labels, :] = 255  # a bright row per label: learnable
    _idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=True)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=False)
    d = demo.load_mnist(tmp_path)
    assert d.x.shape == (200, 784) and d.X.shape == (50, 784) and d.x.dtype == np.float32
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    np.testing.assert_array_equal(d.Y, labels[200:])
    demo.main(["--mnist", str(tmp_path), *QUICK])
    out = capsys.readouterr().out
    assert "MNIST test set (first 200 train / last 50 test)" in out
    assert "num_batches_tracked             4                               2" in out


def test_idx_reader_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        demo.read_idx(tmp_path / "bad")
    with pytest.raises(SystemExit, match="no t10k-images"):
        demo.load_mnist(tmp_path)


def test_cli_usage_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "serve" in usage and "demo" in usage
    assert cli_main(["train"]) == 2
