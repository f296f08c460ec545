"""The transport floor: a raw-bytes streaming service (no protobuf, no tensors) for the same server.

It is registered on the very server object `create_server` builds, so it runs with the same channel
options, thread pool and concurrency cap as the weightavg service it is compared with.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

SERVICE = "weightavg.bench.Raw"
DOWNLOAD = f"/{SERVICE}/Download"
UPLOAD = f"/{SERVICE}/Upload"


def payload(total: int) -> bytes:
    """`total` bytes to stream: made once, sliced per chunk as any Python gRPC sender must (one copy)."""
    return (bytes(range(256)) * (total // 256 + 1))[:total]


def pieces(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Chunks of `data`; slicing bytes copies, the least a Python gRPC message costs for data in memory."""
    for start in range(0, len(data), chunk_bytes):
        yield data[start:start + chunk_bytes]


class _RawHandler(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._payload = b""
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            DOWNLOAD: grpc.unary_stream_rpc_method_handler(self._download),
            UPLOAD: grpc.stream_unary_rpc_method_handler(self._upload),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)

    def _download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        total, chunk_bytes = struct.unpack("<qq", request)
        if len(self._payload) != total:
            self._payload = payload(total)  # keep one size only: the sweep goes up to 256 MB
        yield from pieces(self._payload, chunk_bytes)

    def _upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return struct.pack("<q", sum(len(r) for r in requests))


def add_raw_service(server: grpc.Server) -> None:
    """Register the raw service on a server that has not started yet."""
    server.add_generic_rpc_handlers((_RawHandler(),))


class RawClient:
    """Calls the raw service over a channel built with the weightavg client's options."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._download: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(DOWNLOAD)
        self._upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(UPLOAD)

    def download(self, total: int, chunk_bytes: int) -> int:
        """Stream `total` bytes from the server; returns the bytes received."""
        return sum(len(piece) for piece in self._download(struct.pack("<qq", total, chunk_bytes), timeout=600))

    def download_into_numpy(self, total: int, chunk_bytes: int) -> np.ndarray:
        """Stream `total` bytes and land them in a fresh numpy array, as a fetch must (one copy)."""
        out = np.empty(total, np.uint8)
        filled = 0
        for piece in self._download(struct.pack("<qq", total, chunk_bytes), timeout=600):
            out[filled:filled + len(piece)] = np.frombuffer(piece, np.uint8)
            filled += len(piece)
        return out

    def upload(self, data: bytes, chunk_bytes: int) -> int:
        """Stream `data` to the server in chunks; returns the byte count it saw."""
        received: int = struct.unpack("<q", self._upload(pieces(data, chunk_bytes), timeout=600))[0]
        return received
