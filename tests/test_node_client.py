"""The Node example clients (examples/node) against real servers: the avgparms walk-through and a
declared, checksummed dictionary upload from another language, loading the same .proto at run time."""

from __future__ import annotations

import os
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


def _upload(address: str, node_example: Path, token: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEIGHTAVG_TOKEN": token}
    return subprocess.run(
        ["node", "upload.js", address], cwd=node_example, capture_output=True, text=True, timeout=300, env=env
    )


def test_node_client_uploads_a_declared_checksummed_dictionary(live_server: LiveServer, node_example: Path) -> None:
    """What docs/clients.md promises a client written from the docs alone: several dtypes cut at any byte,
    declared and checksummed, come back bit for bit; a retry with the same request_id, cut and packed
    otherwise, gets the first answer; a corrupted, a short and a re-declared stream are refused and
    make nothing; the moving average follows the schedule's formula; a merge with weights by layer
    (LayerValues) and a TIES merge give the numbers docs/merging.md's formulas give."""
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    done = _upload(live_server.address, node_example)
    assert done.returncode == 0, f"node upload failed:\n{done.stdout}\n{done.stderr}"
    assert "FAIL" not in done.stdout and "all checks passed" in done.stdout
    for line in (
        "ok   worked-bytes checksum: 3214553959 vs 3214553959",
        "ok   every tensor back bit for bit, with its dtype and shape: true vs true",
        "ok   every fetched tensor carried a matching CRC32C: 6 vs 6",
        "ok   packed reply: messages for 6 tensors: 1 vs 1",
        "ok   a corrupted tensor: \"DATA_LOSS\" vs \"DATA_LOSS\"",
        "ok   a stream cut short: \"INVALID_ARGUMENT\" vs \"INVALID_ARGUMENT\"",
        "ok   tensorCount set on a later chunk: \"INVALID_ARGUMENT\" vs \"INVALID_ARGUMENT\"",
        "ok   step 2: decay: [0.4053964424986395] vs [0.4053964424986395]",
        "ok   the schedule kept with the dictionary: [0.9,true,3] vs [0.9,true,3]",
        "ok   linear with weights by layer: a's first layer, b's second: [[0.5,-0.25,0.125,0],[0.75,1.5,1.25,1]] vs "
        "[[0.5,-0.25,0.125,0],[0.75,1.5,1.25,1]]",
        "ok   ties, density .5, weights 1 and .5",
        "ok   handles freed: 9 vs 9",
    ):
        assert line in done.stdout, done.stdout
    assert "ok   a retry with the same request_id gets the first answer" in done.stdout
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before


def test_node_client_sends_its_token_as_bearer_metadata(start_server, node_example: Path) -> None:  # type: ignore[no-untyped-def]
    """A server with a token: the same program passes with 'authorization: Bearer <token>' and
    fails UNAUTHENTICATED without it."""
    server = start_server(token="node-token-0123456789")
    done = _upload(server.address, node_example, token="node-token-0123456789")
    assert done.returncode == 0, f"node upload failed:\n{done.stdout}\n{done.stderr}"
    refused = _upload(server.address, node_example)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
