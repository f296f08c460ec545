"""Faults the tests inject on the wire: a client that stalls on a reply, and a proxy that loses one.

`stalling_channel` opens a channel whose reader holds back a streamed reply. `CuttingProxy` is a
TCP proxy on loopback that loses one answer after the server has applied the call. Bytes pass unchanged both ways. Once armed, the proxy reads the server's HTTP/2 frames and, at the
first HEADERS frame of a call (stream id > 0), closes both connections without passing it on. gRPC's
Python server sends a call's response headers only with its answer, once the handler has returned,
so the server has applied the call and the client sees the connection drop: UNAVAILABLE. The
proxy disarms itself after that one cut; the client's retry connects again and passes through.

Bounded: every socket has a timeout, the threads are daemons, and the proxy stops by itself after
`lifetime` seconds even if a test forgets to stop it.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from types import TracebackType

import grpc

_HEADERS = 0x1
_FRAME_HEADER = 9
_POLL = 0.2
"""Seconds between checks whether the proxy should stop."""
_SEND_TIMEOUT = 30.0


def stalling_channel(address: str) -> grpc.Channel:
    """A channel on which a streamed reply the caller stops reading stays on the server.

    gRPC's default flow control probes the link and grows its windows to megabytes on loopback, so
    a client that reads one chunk and waits still takes the whole of a 20 MB reply into its buffers
    within a second or two, and the server's handler returns as for a reader that kept up. Without
    the probe the window stays at 64 KiB: the server's generator waits at its next chunk, as it does
    for a reader that has stalled. (A test of what stays held while a reply streams read "refused"
    or not by chance: CI once found it released.)
    """
    return grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])


class CuttingProxy:
    """Listen on 127.0.0.1 (a free port) and forward every connection to `target` ("host:port")."""

    def __init__(self, target: str, lifetime: float = 120.0) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._deadline = time.monotonic() + lifetime
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._lock = threading.Lock()
        self.cuts = 0
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def arm(self) -> None:
        """Lose the next answer (the next response HEADERS frame), once."""
        self._armed.set()

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _accept(self) -> None:
        with self._listener:
            while self._running():
                try:
                    client, _ = self._listener.accept()
                except OSError:  # the poll timeout
                    continue
                try:
                    server = socket.create_connection(self._target, timeout=10)
                except OSError:
                    client.close()
                    continue
                for s in (client, server):
                    s.settimeout(_SEND_TIMEOUT)
                with self._lock:
                    self.connections += 1
                pair = (client, server)
                for pump in (self._requests, self._answers):
                    thread = threading.Thread(target=pump, args=pair, name="proxy-pump", daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _recv(self, source: socket.socket) -> bytes | None:
        """The next bytes from source; b"" while none came within the poll; None at its end."""
        try:
            ready, _, _ = select.select([source], [], [], _POLL)
            if not ready:
                return b""
            data = source.recv(1 << 16)
        except (OSError, ValueError):  # ValueError: select on a socket closed by the other pump
            return None
        return data or None

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        """Client to server, unchanged."""
        try:
            while self._running():
                data = self._recv(client)
                if data is None:
                    return
                server.sendall(data)
        except OSError:
            return
        finally:
            _close(client, server)

    def _answers(self, client: socket.socket, server: socket.socket) -> None:
        """Server to client, frame by frame, cutting at the first call's HEADERS frame once armed."""
        pending = b""
        try:
            while self._running():
                data = self._recv(server)
                if data is None:
                    return
                pending += data
                while len(pending) >= _FRAME_HEADER:
                    length = int.from_bytes(pending[:3], "big")
                    kind, stream = pending[3], int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
                    if kind == _HEADERS and stream and self._armed.is_set():
                        self._armed.clear()
                        with self._lock:
                            self.cuts += 1
                        return  # both connections close below; the answer is lost
                    if len(pending) < _FRAME_HEADER + length:
                        break
                    client.sendall(pending[:_FRAME_HEADER + length])
                    pending = pending[_FRAME_HEADER + length:]
        except OSError:
            return
        finally:
            _close(client, server)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
