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

import numpy as np

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


class SwapStats:
    """What the serving thread saw of the model in service since the last swap: the post-activation
    watch reads it. Replaced (not reset) at each swap, so a reader never sees a mix."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.requests = 0
        self.errors = 0
        self.nonfinite = 0
        self.samples: list[int] = []  # appended by the serving thread, drained by the coordinator
        self.latency = LatencyRecorder(window_s=3600, buckets=1)


class _Conn:
    __slots__ = ("inbuf", "outbuf", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.writing = False  # registered for EVENT_WRITE (a reply did not fit the socket buffer)


class InferenceServer:
    def __init__(self, path: Path, recorder: LatencyRecorder) -> None:
        self.path = path
        self.recorder = recorder
        self.requests = 0
        self.errors = 0
        self._model: ServedModel | None = None
        self._pending: list[tuple[ServedModel, bool]] = []
        self._handed_back: dict[int, ServedModel | None] = {}
        self._to_close: list[ServedModel] = []
        self.stats = SwapStats("")
        self._samples: list[int] = []
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

    def swap(self, model: ServedModel, keep_previous: bool = False, timeout: float = 5.0) -> ServedModel | None:
        """Hand a loaded, warmed-up model to the serving thread; returns once it serves it. With
        `keep_previous` the replaced model is handed back open (for an instant rollback) and the
        caller must `release` it later; otherwise the serving thread closes it."""
        with self._swapped:
            self._pending.append((model, keep_previous))
            self._wake_w.send(b"s")
            if not self._swapped.wait_for(lambda: id(model) in self._handed_back, timeout):
                raise TimeoutError("the serving thread did not take the swap")
            return self._handed_back.pop(id(model))

    def release(self, model: ServedModel) -> None:
        """Close a model handed back by `swap` (on the serving thread, which owns engine contexts)."""
        with self._swapped:
            self._to_close.append(model)
            self._wake_w.send(b"r")

    def drain(self) -> None:
        """Coordinator side: move the serving thread's latency samples into the histograms."""
        samples, self._samples = self._samples, []
        for us in samples:
            self.recorder.record(us)
        stats = self.stats
        mine, stats.samples = stats.samples, []
        for us in mine:
            stats.latency.record(us)

    def swap_now(self, model: ServedModel) -> None:
        """Before start(): the model restored from the state dir."""
        assert self._thread is None
        self._model = model
        self.stats = SwapStats(model.version)

    def stop(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)

    # -- the serving thread --------------------------------------------------------------------
    def _loop(self) -> None:
        _raise_priority()
        try:
            while not self._stop:
                for key, mask in self._sel.select(timeout=1.0):
                    self._dispatch(key, mask)
                if self._pending:
                    self._apply_swap()
                if self._to_close:
                    self._close_released()
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
            data = conn.sock.recv(1 << 16)
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
        stats = self.stats
        try:
            feeds = wire.unpack_tensors(memoryview(body), 5)
            t0 = time.perf_counter_ns()
            outputs = model.engine.run(feeds)
            us = (time.perf_counter_ns() - t0) // 1000
        except Exception as err:  # a bad request must not take serving down
            self.errors += 1
            stats.errors += 1
            return wire.error(rid, model.version, f"{type(err).__name__}: {err}")
        self._samples.append(us)  # histograms are fed off the hot path (drain)
        stats.samples.append(us)
        self.requests += 1
        stats.requests += 1
        for out in outputs.values():
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                stats.nonfinite += 1  # still answered: the controller's safety layer decides
                break
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
        if bool(conn.outbuf) != conn.writing:
            conn.writing = bool(conn.outbuf)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.writing else 0)
            self._sel.modify(conn.sock, events, "conn")

    def _apply_swap(self) -> None:
        with self._swapped:
            for model, keep in self._pending:
                old, self._model = self._model, model
                self.stats = SwapStats(model.version)
                self._handed_back[id(model)] = old if keep else None
                if old is not None and not keep:
                    self._to_close.append(old)
            self._pending = []
            self._swapped.notify_all()

    def _close_released(self) -> None:
        with self._swapped:
            closing, self._to_close = self._to_close, []
        for model in closing:
            if model is not self._model:
                _close_engine(model)

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


SERVING_NICE = -5


def _raise_priority() -> None:
    """The serving thread answers the controller: let it preempt background work for the CPU.
    Needs CAP_SYS_NICE (root, or the unit's AmbientCapabilities); without it, it stays as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SERVING_NICE)
    except OSError as err:
        log.info("serving thread keeps its CPU priority (%s)", err)
