"""Contract quality: buf lint, no breaking change against earlier commits, committed stubs current, mypy --strict."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = "weightavg/v1/weightavg.proto"


def tool(name: str) -> str:
    """A command-line tool from PATH or this interpreter's bin folder (pip-installed binaries); skip without it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed (see the dev extra)")
    return found


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("buf"), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def proto_at(revision: str, into: Path) -> Path:
    """proto/ as it was at a commit, extracted into a folder (works in worktrees and plain checkouts)."""
    archive = subprocess.run(["git", "archive", revision, "proto"], capture_output=True, timeout=120, cwd=ROOT)
    assert archive.returncode == 0, archive.stderr
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse odd members
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    return isolated(into / "proto")


def isolated(proto: Path) -> Path:
    """Make a proto folder outside the repo its own buf module, so that buf does not adopt a buf.yaml
    it finds in a parent folder (another checkout's, in a shared /tmp)."""
    (proto / "buf.yaml").write_text("version: v2\n")
    return proto


def test_buf_lint_is_clean() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_is_buf_formatted() -> None:
    result = buf("format", "--diff", "proto")
    assert result.returncode == 0 and result.stdout == "", result.stdout


def _history_or_skip() -> None:
    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    if git("rev-parse", "--verify", "--quiet", "HEAD~1^{commit}").returncode != 0:
        pytest.skip("no previous commit (shallow clone?); fetch history to check breaking changes")


def test_no_breaking_change_against_the_previous_commit(tmp_path: Path) -> None:
    _history_or_skip()
    if git("cat-file", "-e", f"HEAD~1:proto/{PROTO}").returncode != 0:
        pytest.skip("the previous commit has no proto to compare with")
    result = buf("breaking", "proto", "--against", str(proto_at("HEAD~1", tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_any_earlier_contract(tmp_path: Path) -> None:
    # HEAD~1 and the first version alone would let a break slip through when several commits land at
    # once and the broken message was added after the first version: compare with every committed one.
    _history_or_skip()
    versions = git("log", "--format=%H", "--", f"proto/{PROTO}").stdout.split()
    if not versions:
        pytest.skip("the proto is not committed yet")
    for i, revision in enumerate(versions):
        result = buf("breaking", "proto", "--against", str(proto_at(revision, tmp_path / str(i))))
        assert result.returncode == 0, f"against {revision}:\n{result.stdout}{result.stderr}"


def test_buf_breaking_catches_a_renumbered_field(tmp_path: Path) -> None:
    # The check above can fail: renumbering Handle.id must be reported.
    changed = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", changed)
    isolated(changed)
    path = changed / PROTO
    text = path.read_text()
    assert "  string id = 1;" in text
    path.write_text(text.replace("  string id = 1;", "  string id = 99;", 1))
    result = buf("breaking", str(changed), "--against", str(ROOT / "proto"))
    assert result.returncode != 0
    assert 'field "1" with name "id" on message "Handle" was deleted' in result.stdout


def test_committed_stubs_match_the_proto() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    assert gen_protos.stale_files() == [], "run: python scripts/gen_protos.py"


def test_client_server_examples_and_bench_are_mypy_strict_clean() -> None:
    # Configuration (strict; files: client/weightavg, server/weightavg_server, examples, bench, two scripts) lives in pyproject.toml.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (ROOT / "client/weightavg/py.typed").exists()
    assert (ROOT / "client/weightavg/v1/weightavg_pb2.pyi").exists()
