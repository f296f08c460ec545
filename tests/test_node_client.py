"""The Node example client (examples/node) against a real server: the avgparms walk-through from
another language, loading the same .proto at run time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import LiveServer  # the fixture's type; pytest puts tests/ on sys.path

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not on PATH"
)


@pytest.fixture(scope="module")
def node_example() -> Path:
    """examples/node with its dependencies installed from package-lock.json (npm ci) when missing."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR


def test_node_client_avgparms_walk_through(live_server: LiveServer, node_example: Path) -> None:
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    done = subprocess.run(
        ["node", "avgparms.js", live_server.address], cwd=node_example, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"node client failed:\n{done.stdout}\n{done.stderr}"
    assert "all checks passed" in done.stdout
    # The figures the reference prints, as the Node program saw them.
    assert "FAIL" not in done.stdout
    assert "count after ten more: 12 vs 12" in done.stdout
    # A reader with a small receive limit (max_chunk_bytes): 1 KiB pieces that join to the values set,
    # and a limit below 1 KiB refused with INVALID_ARGUMENT.
    assert "ok   largest chunk under max_chunk_bytes 1024: true vs true" in done.stdout
    assert "ok   weight fetched in 1 KiB pieces equals what was set: true vs true" in done.stdout
    assert 'ok   max_chunk_bytes 1000 refused: "INVALID_ARGUMENT" vs "INVALID_ARGUMENT"' in done.stdout
    # Every handle it made was freed: the walk-through leaves the server as it found it.
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before


def test_node_client_reports_unreachable_server(node_example: Path) -> None:
    """A failed call is a non-zero exit with the gRPC status, not a silent pass."""
    done = subprocess.run(
        ["node", "avgparms.js", "127.0.0.1:1"], cwd=node_example, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert "UNAVAILABLE" in done.stderr
