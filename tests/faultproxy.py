"""A TCP proxy on loopback that misbehaves on request, between the agent and the broker or S3
(Toxiproxy's faults, which Debian does not package): latency with jitter, a bandwidth cap,
connections reset after some bytes, a black hole (bytes vanish, nothing is closed)."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bytes_per_s: float = 0.0  # 0: no cap
    reset_after: int = 0  # reset each connection after this many bytes towards the client; 0: never
    black_hole: bool = False  # forward nothing, close nothing


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults = Faults()
        self.resets = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut_all()
        self._thread.join(5)

    def cut_all(self) -> None:
        """Close every connection (as a restarting peer would)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for src, dst, towards_client in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, towards_client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, towards_client: bool) -> None:
        sent = 0
        try:
            while not self._stop.is_set():
                data = src.recv(16384)
                if not data:
                    break
                f = self.faults
                while f.black_hole and not self._stop.is_set():
                    time.sleep(0.05)  # the bytes vanish; the sockets stay open
                if f.latency_s or f.jitter_s:
                    time.sleep(max(0.0, f.latency_s + random.uniform(-f.jitter_s, f.jitter_s)))
                if towards_client and f.reset_after and sent + len(data) > f.reset_after:
                    self.resets += 1
                    _reset(dst)
                    _reset(src)
                    return
                dst.sendall(data)
                sent += len(data)
                if f.bytes_per_s:
                    time.sleep(len(data) / f.bytes_per_s)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def _reset(s: socket.socket) -> None:
    """Close with an RST (linger 0), as a middlebox dropping the connection does."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)  # wakes the other direction's recv: the last close then sends the RST
    s.close()
