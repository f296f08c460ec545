"""The benchmark measures what its rows say: the same work on both sides of a ratio.
No timing is asserted: these check what each side does, against a real server."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from bench import cases
from conftest import LiveServer
from weightavg import Client, wire

ROOT = Path(__file__).resolve().parent.parent


def test_the_small_tensors_baseline_reads_the_stream_as_the_client_does(live_server: LiveServer, client: Client) -> None:
    """One chunk a message, each read with the client's zero-copy decoder: parsing with protobuf
    (the generated stub) copied every chunk twice more than `Client.dict` does, so the "packed"
    speedup measured the parser as well as the packing."""
    rng = np.random.default_rng(0)
    values = {f"block{i}.weight": rng.standard_normal(cases.SMALL_FLOATS, dtype=np.float32) for i in range(50)}
    d = client.dict(values)
    try:
        with grpc.insecure_channel(live_server.address) as channel:
            chunks = list(cases.unpacked_chunks(channel, d.id))
            fetched = cases.unpacked_fetch(channel, d.id)
        assert all(isinstance(chunk, wire.ChunkView) for chunk in chunks)
        assert not any(chunk.packed for chunk in chunks)  # really one chunk a message
        expected = client.dict(d)
        assert list(fetched) == list(expected)
        for name, array in expected.items():
            assert type(fetched[name]) is type(array) and fetched[name].dtype == array.dtype
            np.testing.assert_array_equal(fetched[name], array)
    finally:
        client.free(d)
