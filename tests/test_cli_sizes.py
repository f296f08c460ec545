"""Byte sizes of `weightavg serve`: every --*-bytes flag and WEIGHTAVG_*_BYTES variable takes units
(64MiB, 1G, 500MB) through one parser, and refuses anything else naming the flag and the forms.

Only plain integers were taken: `--max-device-bytes 1GiB` stopped the start with argparse's
"invalid int value" (found by review)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightavg import Client, ResourceExhaustedError
from weightavg_server.ops.cli import OPTIONS, build_parser, config_from_args
from weightavg_server.ops.config import BYTE_SIZES, MAX_BYTE_SIZE, ServerConfig, parse_bytes

ROOT = Path(__file__).resolve().parent.parent
WEIGHTAVG = str(Path(sys.executable).parent / "weightavg")

KI, MI, GI, TI = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("text, size", [
    ("67108864", 64 * MI), ("0", 0), (" 5 ", 5), ("1_000_000", 10**6), ("+5", 5),  # plain integers as int() took them
    ("1B", 1), ("1b", 1),
    ("1K", KI), ("1k", KI), ("1Ki", KI), ("1KiB", KI), ("1kib", KI), ("1KB", 1000), ("1kb", 1000),
    ("64M", 64 * MI), ("64MiB", 64 * MI), ("64Mi", 64 * MI), ("64MB", 64 * 10**6), ("64mb", 64 * 10**6),
    ("1G", GI), ("1GiB", GI), ("1gib", GI), ("1GB", 10**9), ("1 GiB", GI), ("1.5G", 3 * GI // 2),
    ("0.5KiB", 512), ("1.0", 1), ("2T", 2 * TI), ("1TB", 10**12), ("8388607TiB", 8388607 * TI),
])
def test_a_size_is_bytes_or_a_number_with_a_unit_binary_unless_it_says_kb_mb_gb_tb(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text, problem", [
    ("-1", "is negative"), ("-1G", "is negative"),
    ("1.5", "is 1.5 bytes, not a whole number"), ("0.3K", "is 307.2 bytes, not a whole number"),
    ("abc", "is not a size"), ("", "is not a size"), ("1e3", "is not a size"), ("1 000", "is not a size"),
    ("1PiB", "is not a size"), ("1GiBs", "is not a size"), ("0x10", "is not a size"), ("inf", "is not a size"),
    ("8388608TiB", f"is more than {MAX_BYTE_SIZE} bytes"), ("9" * 5000, f"is more than {MAX_BYTE_SIZE} bytes"),
])
def test_anything_else_is_refused_saying_why_and_what_a_size_is(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_bytes(text)
    message = str(info.value)
    assert problem in message and len(message) < 400, message  # a runaway value is not echoed whole
    if "more than" not in problem:
        assert "give a whole number of bytes, optionally with a unit: K, M, G, T or KiB" in message


def test_every_bytes_setting_takes_sizes_and_every_size_setting_says_bytes() -> None:
    """One rule for which settings are sizes (the name), so a new *_bytes setting needs no other list."""
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    assert BYTE_SIZES == {
        "max_message_bytes", "chunk_bytes", "max_upload_bytes", "max_device_bytes", "max_request_id_bytes",
        "pinned_cache_bytes", "max_locked_bytes", "host_cache_bytes",
    }
    assert all(fields[name].type in (int, "int") for name in BYTE_SIZES)
    assert {name for flag, name, _ in OPTIONS if flag.endswith("-bytes")} == BYTE_SIZES


@pytest.mark.parametrize("name", sorted(BYTE_SIZES))
def test_each_size_flag_and_its_variable_take_the_same_forms(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    from_flag = config_from_args(build_parser().parse_args([flag, "3MiB"]))
    from_env = ServerConfig.from_env({"WEIGHTAVG_" + name.upper(): "3MiB"})
    assert getattr(from_flag, name) == getattr(from_env, name) == 3 * MI
    with pytest.raises(ValueError, match=rf"^WEIGHTAVG_{name.upper()}='-2M' is negative; give a whole number of bytes"):
        ServerConfig.from_env({"WEIGHTAVG_" + name.upper(): "-2M"})


@pytest.mark.parametrize("value, problem", [
    ("1.5", "'1.5' is 1.5 bytes, not a whole number"), ("-1", "'-1' is negative"), ("lots", "'lots' is not a size"),
])
def test_a_bad_size_flag_is_argparses_error_naming_the_flag(value: str, problem: str) -> None:
    result = subprocess.run(
        [WEIGHTAVG, "serve", "--port", "0", "--device", "cpu", f"--max-device-bytes={value}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"weightavg serve: error: argument --max-device-bytes: {problem}; give a whole number of bytes" in (
        result.stderr
    )


def test_serve_with_sizes_in_units_serves_with_those_sizes() -> None:
    """The real `weightavg serve --max-device-bytes 1GiB` start, with flags and a variable in units."""
    process = subprocess.Popen(
        [WEIGHTAVG, "serve", "--port", "0", "--device", "cpu", "--metrics-port", "-1", "--max-device-bytes", "1GiB",
         "--max-message-bytes", "8MiB", "--chunk-bytes", "4M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, WEIGHTAVG_MAX_UPLOAD_BYTES="1KiB"),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("weightavg serving on "), process.communicate(timeout=60)
        with Client(line.split()[-1], timeout=60) as c:
            info = c.info()
            assert (info["max_message_bytes"], info["chunk_bytes"]) == (8 * MI, 4 * MI)
            c.dict({"a": np.zeros(256, np.float32)})  # 1 KiB: at the upload cap, under the device cap
            with pytest.raises(ResourceExhaustedError):
                c.dict({"a": np.zeros(257, np.float32)})
    finally:
        process.terminate()
        _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("quota, size", [('"8GiB"', 8 * GI), ('"8GB"', 8 * 10**9), ('"512 MiB"', 512 * MI), ("1024", KI)])
def test_a_tokens_files_byte_quota_takes_sizes_as_the_flags_do(quota: str, size: int, tmp_path: Path) -> None:
    """The tokens file's max_device_bytes took whole numbers only, while the flags now take units."""
    from weightavg_server.ops.tokens import load_tokens

    path = tmp_path / "tokens.toml"
    path.write_text(f'[tenants.a]\nmax_device_bytes = {quota}\n[[tokens]]\ntoken = "a-token-long-enough-1"\n'
                    'tenant = "a"\nrole = "user"\n')
    path.chmod(0o600)
    assert load_tokens(path).quotas["a"].max_device_bytes == size


@pytest.mark.parametrize("quota", ['"a-token-long-enough-2"', '"-1G"', '"0.3K"', '"8PiB"'])
def test_a_byte_quota_that_is_no_size_is_refused_without_quoting_it(quota: str, tmp_path: Path) -> None:
    from weightavg_server.ops.tokens import TokensFileError, load_tokens

    path = tmp_path / "tokens.toml"
    path.write_text(f'[tenants.a]\nmax_device_bytes = {quota}\n')
    path.chmod(0o600)
    with pytest.raises(TokensFileError, match=r"tenants\.a\.max_device_bytes must be a whole number of bytes") as info:
        load_tokens(path)
    assert quota.strip('"') not in str(info.value)
