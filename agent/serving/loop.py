"""The loop of one serving process (agent.serving.process): it owns one loaded engine and, while it is the
active one, the inference socket's listener and every client connection.

One thread does everything: it multiplexes the client sockets (selectors) and runs every inference.
No other Python thread shares this process, so nothing the daemon does (downloads, the gate,
loading the next engine, MQTT, SQLite) can hold the lock this thread needs to answer.

A swap is a hand-over between two processes: the old one, between two requests, sends its listener
and its connections (file descriptors, with any bytes of a partial request or an unsent reply) to
the new one in one SCM_RIGHTS message; the new one answers the next request. Clients keep their
connection and see nothing but the version in the replies."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import selectors
import socket
import time
from collections.abc import Callable
from multiprocessing import reduction
from multiprocessing.connection import Connection

import numpy as np

from agent.engines import Engine
from agent.engines.probes import time_calls
from agent.errors import ProtocolError
from agent.serving import wire
from agent.serving.pipe import (
    Counts,
    Failed,
    HandedOver,
    HandOver,
    Identity,
    Load,
    Outputs,
    Ready,
    Reply,
    Request,
    Run,
    Stop,
    Stopped,
    TakeCounts,
    Time,
    Times,
    Unload,
    Unloaded,
)

log = logging.getLogger(__name__)

MAX_FDS = 250  # per SCM_RIGHTS message (the kernel's limit is 253)
PIECE = 1 << 16  # buffered bytes follow the descriptors in messages of at most this size


class _Conn:
    __slots__ = ("inbuf", "outbuf", "sock", "writing")

    def __init__(self, sock: socket.socket, inbuf: bytes = b"", outbuf: bytes = b"") -> None:
        self.sock = sock
        self.inbuf = bytearray(inbuf)
        self.outbuf = bytearray(outbuf)
        self.writing = False  # registered for EVENT_WRITE (a reply did not fit the socket buffer)


def ready(engine: Engine | None) -> Ready:
    """The reply to a load: the engine's I/O, which the daemon checks models against."""
    return Ready(list(engine.inputs), list(engine.outputs)) if engine is not None else Ready([], [])


class ServingLoop:
    def __init__(
        self,
        engine: Engine | None,
        identity: Identity,
        ctl: Connection,
        inbox: socket.socket,
        load: Callable[[str], Engine] | None = None,
    ) -> None:
        self.engine = engine
        self.load = load
        self.identity = identity
        self.ctl = ctl
        self.inbox = inbox
        self.counts = Counts()
        self._conns: dict[int, _Conn] = {}
        self._listener: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._sel.register(ctl.fileno(), selectors.EVENT_READ, "ctl")
        self._sel.register(inbox, selectors.EVENT_READ, "inbox")
        self._stop = False

    def run(self) -> None:
        while not self._stop:
            for key, mask in self._sel.select(timeout=1.0):
                self._dispatch(key, mask)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._unload()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "ctl":
            self._on_ctl()
        elif key.data == "inbox":
            self._take_over()
        else:
            conn = self._conns.get(key.fd)
            if conn is None:
                return
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and conn.sock.fileno() in self._conns:
                self._flush(conn)

    # -- the daemon's requests -------------------------------------------------------------------
    def _on_ctl(self) -> None:
        try:
            msg: Request = self.ctl.recv()
        except (EOFError, OSError):  # the daemon is gone (PR_SET_PDEATHSIG ends us too)
            self._stop = True
            return
        self.ctl.send(self._reply_to(msg))

    def _reply_to(self, msg: Request) -> Reply:
        match msg:
            case TakeCounts():
                return self._take_counts(len(self._conns))
            case HandOver():
                target = socket.socket(fileno=reduction.recv_handle(self.ctl))
                try:
                    return HandedOver(self._hand_over(target), self._take_counts(0))
                except OSError as err:
                    return Failed(f"the next serving process did not take the clients: {err}")
                finally:
                    target.close()
            case Load():
                return self.load_model(msg.engine_path, msg.identity)
            case Unload():
                self._unload()
                return Unloaded()
            case Run() | Time():
                return self._gate(msg)
            case Stop():
                self._stop = True
                return Stopped()

    def _take_counts(self, clients: int) -> Counts:
        taken, self.counts = self.counts, Counts()
        taken.clients = clients
        return taken

    # -- a spare process loads the next model --------------------------------------------------------
    def load_model(self, engine_path: str, identity: Identity) -> Ready | Failed:
        if self._serving:
            return Failed("this process is serving: hand its clients over first")
        if self.load is None:
            return Failed("this process has no backend")
        self._unload()
        try:
            self.engine = self.load(engine_path)
        except Exception as err:
            return Failed(f"{type(err).__name__}: {err}")
        self.identity = identity
        gc.collect()
        gc.freeze()  # what is loaded stays; a full collection never walks it while we serve
        return ready(self.engine)

    @property
    def _serving(self) -> bool:
        return bool(self._conns) or self._listener is not None

    def _gate(self, msg: Run | Time) -> Outputs | Times | Failed:
        """The gate's calls on a loaded model that serves no one yet: outputs for some inputs
        (Run), or each call's time, measured here where it will serve (Time)."""
        if self._serving:
            return Failed("this process is serving: the gate runs before the swap")
        if self.engine is None:
            return Failed("no model loaded")
        try:
            if isinstance(msg, Run):
                return Outputs([self.engine.run(feed) for feed in msg.feeds])
            return Times(time_calls(self.engine, msg.feed, msg.calls))
        except Exception as err:
            return Failed(f"{type(err).__name__}: {err}")

    def _unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        self.identity = self.identity.emptied()
        gc.unfreeze()

    # -- the hand-over -----------------------------------------------------------------------------
    def _hand_over(self, target: socket.socket) -> int:
        """Send the listener and every connection to the next serving process; returns how many
        connections moved. Runs between two requests: no request is half answered. Each message
        carries up to MAX_FDS descriptors and the sizes of their buffered bytes, which follow in
        pieces. An OSError (the successor is gone) leaves everything as it was: this process keeps
        serving."""
        items: list[tuple[socket.socket, _Conn | None]] = []
        if self._listener is not None:
            items.append((self._listener, None))
        items += [(c.sock, c) for c in self._conns.values()]
        for start in range(0, len(items), MAX_FDS):
            chunk = items[start : start + MAX_FDS]
            conns = [c for _, c in chunk if c is not None]
            header = {"listener": chunk[0][1] is None, "conns": [[len(c.inbuf), len(c.outbuf)] for c in conns]}
            socket.send_fds(target, [json.dumps(header).encode()], [sock.fileno() for sock, _ in chunk])
            data = b"".join(bytes(c.inbuf) + bytes(c.outbuf) for c in conns)
            for off in range(0, len(data), PIECE):
                target.sendall(data[off : off + PIECE])
        for sock, _ in items:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()
        moved = len(self._conns)
        self._conns.clear()
        self._listener = None
        return moved

    def _take_over(self) -> None:
        data, fds, flags, _addr = socket.recv_fds(self.inbox, PIECE, MAX_FDS)
        if not data:
            self._stop = True
            return
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("a truncated hand-over message")
            header = json.loads(data)
            sizes = [(int(i), int(o)) for i, o in header["conns"]]
            if len(socks) != int(bool(header["listener"])) + len(sizes):
                raise ValueError(f"{len(socks)} descriptors for {len(sizes)} connections")
            payload = self._read_exactly(sum(i + o for i, o in sizes))
        except (ValueError, KeyError, OSError) as err:
            log.error("a hand-over failed (%s): %d connections lost", err, len(socks))
            for sock in socks:
                sock.close()
            return
        if header["listener"]:
            if self._listener is not None:  # there is only one listener: keep the newest
                self._sel.unregister(self._listener)
                self._listener.close()
            self._listener = socks.pop(0)
            self._listener.setblocking(False)
            self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        off = 0
        for sock, (i, o) in zip(socks, sizes, strict=True):
            self._adopt(sock, payload[off : off + i], payload[off + i : off + i + o])
            off += i + o

    def _read_exactly(self, n: int) -> bytes:
        """The buffered bytes that follow a hand-over header (the sender writes them at once)."""
        got = bytearray()
        self.inbox.settimeout(5.0)
        try:
            while len(got) < n:
                piece = self.inbox.recv(PIECE)
                if not piece:
                    raise OSError("the previous serving process closed mid-hand-over")
                got += piece
        finally:
            self.inbox.settimeout(None)
        return bytes(got)

    def _adopt(self, sock: socket.socket, inbuf: bytes = b"", outbuf: bytes = b"") -> None:
        sock.setblocking(False)
        conn = _Conn(sock, inbuf, outbuf)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, "conn")
        if conn.inbuf:
            self._answer(conn)
        elif conn.outbuf:
            self._flush(conn)

    # -- clients -----------------------------------------------------------------------------------
    def _accept(self) -> None:
        if self._listener is None:  # handed over earlier in this select batch
            return
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        self._adopt(sock)

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
        self._answer(conn)

    def _answer(self, conn: _Conn) -> None:
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
        version = self.identity.version if self.engine else ""
        try:
            kind, rid = wire.parse_head(body)
        except ProtocolError as err:
            self.counts.errors += 1
            return wire.error(0, version, str(err))
        if self.engine is None:
            self.counts.errors += 1
            return wire.error(rid, "", "no active model yet")
        if kind == wire.INFO:
            return wire.info(rid, version, json.dumps(self.identity.info(self.engine)).encode())
        if kind != wire.INFER:
            self.counts.errors += 1
            return wire.error(rid, version, f"unknown request kind {kind}")
        return self._infer(self.engine, rid, body)

    def _infer(self, engine: Engine, rid: int, body: bytes) -> bytes:
        counts, version = self.counts, self.identity.version
        try:
            feeds = wire.unpack_tensors(memoryview(body), 5)
            t0 = time.perf_counter_ns()
            outputs = engine.run(feeds)
            us = (time.perf_counter_ns() - t0) // 1000
        except Exception as err:  # a bad request must not take serving down
            counts.errors += 1
            return wire.error(rid, version, f"{type(err).__name__}: {err}")
        counts.samples.append(us)  # histograms are fed by the daemon, off the hot path
        counts.requests += 1
        for out in outputs.values():
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                counts.nonfinite += 1  # still answered: the controller's safety layer decides
                break
        return wire.result(rid, version, outputs)

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

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
