"""The hot-swap slot and the Unix-socket inference server.

One thread does everything on the hot path: it multiplexes the client sockets (selectors), runs
every inference, and applies swaps between two requests. A swap is one reference change; the old
engine is closed by this same thread after the requests in flight are answered, which also keeps
TensorRT/CUDA contexts on the one thread that owns them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import wire
from agent.engines import Engine
from agent.errors import ProtocolError
from agent.telemetry import LatencyRecorder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    engine: Engine
    version: str
    sha256: str
    backend: str
    deploy_config: dict[str, Any] | None = None  # the Go2 controller's deploy config, from the manifest

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "sha256": self.sha256,
            "backend": self.backend,
            "inputs": [t.to_json() for t in self.engine.inputs],
            "outputs": [t.to_json() for t in self.engine.outputs],
        }
        if self.deploy_config is not None:
            d["deploy_config"] = self.deploy_config
        return d


class _Conn:
    __slots__ = ("inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class InferenceServer:
    def __init__(self, path: Path, recorder: LatencyRecorder) -> None:
        self.path = path
        self.recorder = recorder
        self.requests = 0
        self.errors = 0
        self._model: ServedModel | None = None
        self._pending: list[ServedModel] = []
        self._pending_lock = threading.Lock()
        self._swapped = threading.Condition(self._pending_lock)
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None

    # -- called from other threads -------------------------------------------------------------
    @property
    def model(self) -> ServedModel | None:
        return self._model

    @property
    def clients(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a crashed run; we hold the daemon's lock, so it is ours
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o660)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="serve", daemon=True)
        self._thread.start()

    def swap(self, model: ServedModel, timeout: float = 5.0) -> bool:
        """Hand a loaded, warmed-up model to the serving thread; returns once it serves it."""
        with self._swapped:
            self._pending.append(model)
            self._wake_w.send(b"s")
            return self._swapped.wait_for(lambda: self._model is model, timeout)

    def swap_now(self, model: ServedModel) -> None:
        """Before start(): the model restored from the state dir."""
        assert self._thread is None
        self._model = model

    def stop(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)

    # -- the serving thread --------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop:
                for key, mask in self._sel.select(timeout=1.0):
                    self._dispatch(key, mask)
                if self._pending:
                    self._apply_swap()
        finally:
            self._shutdown()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "wake":
            self._wake_r.recv(64)
        else:
            conn = self._conns.get(key.fd)
            if conn is None:
                return
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and conn.sock.fileno() in self._conns:
                self._flush(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._conns[sock.fileno()] = _Conn(sock)
        self._sel.register(sock, selectors.EVENT_READ, "conn")

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        try:
            bodies = wire.split_frames(conn.inbuf)
        except ProtocolError as err:
            log.warning("closing a client that sent a bad frame: %s", err)
            self._close(conn)
            return
        for body in bodies:
            conn.outbuf += self._handle(body)
        self._flush(conn)

    def _handle(self, body: bytes) -> bytes:
        if self._pending:  # a swap lands between two requests, never during one
            self._apply_swap()
        model = self._model
        version = model.version if model else ""
        try:
            kind, rid = wire.parse_head(body)
        except ProtocolError as err:
            self.errors += 1
            return wire.error(0, version, str(err))
        if model is None:
            self.errors += 1
            return wire.error(rid, "", "no active model yet")
        if kind == wire.INFO:
            return wire.info(rid, version, json.dumps(model.info()).encode())
        if kind != wire.INFER:
            self.errors += 1
            return wire.error(rid, version, f"unknown request kind {kind}")
        return self._infer(model, rid, body)

    def _infer(self, model: ServedModel, rid: int, body: bytes) -> bytes:
        try:
            feeds = wire.unpack_tensors(memoryview(body), 5)
            t0 = time.perf_counter_ns()
            outputs = model.engine.run(feeds)
            self.recorder.record((time.perf_counter_ns() - t0) // 1000)
        except Exception as err:  # a bad request must not take serving down
            self.errors += 1
            return wire.error(rid, model.version, f"{type(err).__name__}: {err}")
        self.requests += 1
        return wire.result(rid, model.version, outputs)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf) if conn.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        if self._sel.get_key(conn.sock).events != want:
            self._sel.modify(conn.sock, want, "conn")

    def _apply_swap(self) -> None:
        with self._swapped:
            pending, self._pending = self._pending, []
            old = self._model
            self._model = pending[-1]
            self._swapped.notify_all()
        for stale in [old, *pending[:-1]]:
            if stale is not None and stale is not self._model:
                _close_engine(stale)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _shutdown(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)
        if self._model is not None:
            _close_engine(self._model)


def _close_engine(model: ServedModel) -> None:
    try:
        model.engine.close()
    except Exception:
        log.exception("closing engine of %s failed", model.version)
