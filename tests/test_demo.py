"""`weightavg demo`: the default run (does averaging help?) and --reference run end to end, the README's
sample output is what the demo's own code prints, and the MNIST reader takes gzipped and plain IDX files."""

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
from weightavg_server.ops import demo, demo_swa

QUICK = ["--reference", "--epochs", "1", "--avg-epochs", "1", "--avg-runs", "1", "--hidden", "32", "--ema-epochs", "4"]
ROOT = Path(__file__).resolve().parent.parent


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("weightavg")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "weightavg._cli"]
    return subprocess.run([*command, "demo", *args], capture_output=True, text=True, timeout=600, check=False)


# -- the default run, and the README's sample of it ---------------------------------------------------


def _readme_sample() -> list[str]:
    """The fenced block after the README's demo-output marker."""
    text = (ROOT / "README.md").read_text()
    after = text.split("<!-- demo-output", 1)[1]
    block = after.split("```", 2)[1]
    return block.split("\n")[1:-1]  # past the fence's language tag, up to the closing fence


def _skeleton(lines: list[str]) -> list[str]:
    """Lines with every number as # and runs of spaces as one: what the format fixes, not the values."""
    return [" ".join(re.sub(r"\d+(\.\d+)?", "#", line).split()) for line in lines]


def _accuracies(lines: list[str]) -> dict[str, list[float]]:
    rows = {}
    for line in lines:
        for row in demo_swa.ROWS:
            if line.startswith(row + "  "):
                rows[row] = [float(v) for v in line[len(row):].split()[:-3]]  # the last three: mean ± sd
    return rows


def test_readme_sample_is_what_the_demo_s_code_prints_for_its_numbers() -> None:
    sample = _readme_sample()
    assert sample[0] == "weightavg demo: stochastic weight averaging on scikit-learn digits (8x8), 1437 train / 360 test"
    body = sample[3:-2]  # after the two heading lines and a blank; before a blank and "done in"
    accuracy = _accuracies(body)
    seeds = list(range(len(accuracy[demo_swa.LAST])))
    assert len(seeds) >= 3 and all(len(v) == len(seeds) for v in accuracy.values())
    result = demo_swa.Result("", 1437, 360, 64, demo_swa.Recipe(), seeds, accuracy)
    assert demo_swa.render(result) == body  # the recipe, the table, means, spreads and verdicts
    assert body[-2].startswith("averaging helped: +")  # the default run makes its case
    assert re.fullmatch(r"done in \d+\.\d s", sample[-1]) and float(sample[-1].split()[2]) < 120


def test_default_demo_prints_the_readme_s_format() -> None:
    pytest.importorskip("sklearn")
    result = _demo("--epochs", "1", "--swa-epochs", "2", "--hidden", "16")
    assert result.returncode == 0, result.stderr
    out = result.stdout.rstrip("\n").split("\n")
    sample = _readme_sample()
    verdicts = slice(-4, -2)
    assert len(out) == len(sample)
    for line in out[verdicts]:
        assert re.fullmatch(r"averaging (helped|made no clear difference|did not help on this data): [+-]\d+\.\d\d "
                            r"points .*, (but )?better in (only )?\d of 5 seeds", line), line
    del out[verdicts], sample[verdicts]
    assert _skeleton(out) == _skeleton(sample)
    assert "seed 4: " in result.stderr


@pytest.mark.parametrize(
    ("averaged", "other", "words"),
    [
        ([95.0, 94.0, 96.0], [94.0, 94.5, 95.0], "averaging helped: +0.50 points over the last weights on average, "
                                                  "better in 2 of 3 seeds"),
        ([95.0, 94.0, 94.0], [94.0, 94.5, 94.1], "averaging made no clear difference: +0.13 points over the last "
                                                  "weights on average, but better in only 1 of 3 seeds"),
        ([94.0, 94.0, 94.0], [94.0, 94.5, 94.1], "averaging did not help on this data: -0.20 points against the "
                                                  "last weights on average, better in 0 of 3 seeds"),
    ],
)
def test_the_verdict_says_in_words_whether_averaging_helped(averaged: list[float], other: list[float], words: str) -> None:
    assert demo_swa.verdict(averaged, other, "last weights") == words


def test_spread_is_mean_and_sample_standard_deviation() -> None:
    assert demo_swa.spread([94.0, 95.0, 96.0]) == "95.00 ± 1.00"


# -- the reference's examples (--reference) ----------------------------------------------------------


def test_demo_command_runs_both_examples_on_digits() -> None:
    pytest.importorskip("sklearn")
    result = _demo(*QUICK)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "scikit-learn digits (8x8), 1437 train / 360 test" in out
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




def test_every_demo_option_is_in_models_md_with_its_default() -> None:
    """`weightavg demo`'s options against docs/models.md, which listed five of its fifteen."""
    text = " ".join((ROOT / "docs" / "models.md").read_text().split())
    parser = demo.build_parser()
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        for flag in flags:
            assert f"`{flag}" in text, flag
            if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
                assert f"`{flag}` ({action.default:g}" in text, (flag, action.default)


# -- failures it can name, and a server at --address ---------------------------------------------------


def test_a_demo_that_cannot_run_says_why_in_one_line_not_a_traceback() -> None:
    """A device this machine lacks, a server that is not there, a setting the server refuses: each
    printed a traceback (found by review)."""
    for args, line in [
        (["--device", "nosuch"], "weightavg demo: --device nosuch: unknown device 'nosuch'; use cpu, cuda or cuda:N"),
        (["--address", "127.0.0.1:1"], "weightavg demo: UNAVAILABLE: "),
        (["--lr", "nan", "--seeds", "1", "--epochs", "1", "--swa-epochs", "1"],
         "weightavg demo: INVALID_ARGUMENT: sgd: option 'lr' must be finite, given nan"),
    ]:
        result = _demo(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.splitlines()[-1].startswith(line), result.stderr


def test_the_demo_runs_against_a_server_with_a_token(
    start_server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """`weightavg demo --address` had no way to send a token, while UNAUTHENTICATED told it to use
    --token or WEIGHTAVG_TOKEN (found by review): it takes both now, as the operator commands do."""
    pytest.importorskip("sklearn")
    server = start_server(token="sekret")
    quick = ["--address", server.address, "--seeds", "1", "--epochs", "1", "--swa-epochs", "1", "--hidden", "8"]
    with pytest.raises(SystemExit, match="^weightavg demo: UNAUTHENTICATED: no bearer token"):
        demo.main(quick)
    demo.main([*quick, "--token", "sekret"])
    assert "(remote)" in capsys.readouterr().out
    monkeypatch.setenv("WEIGHTAVG_TOKEN", "sekret")
    demo.main(quick)
    assert "averaging" in capsys.readouterr().out
    assert len(server.registry) == 0  # its session freed what it made


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
    assert "MNIST test set (first 200 train / last 50 test), 200 train / 50 test" in out
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
