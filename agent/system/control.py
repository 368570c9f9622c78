"""The control socket: how `agent status`, `agent deploy` and friends talk to the running daemon.

One JSON object per line each way. `deploy` is followed by `size` raw bytes of the ONNX file, which
this thread stores under <state_dir>/incoming before handing the request to the coordinator.
Access to this socket (file mode 0660) is what authorises a local deploy."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

from agent.errors import DaemonNotRunning
from agent.system.peercred import Authority, peer_of

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0
# `agent rollback/activate/pin` are answered once the model serves; a stored model's engine may
# need building first (after a TensorRT upgrade): minutes.
LOAD_REPLY_TIMEOUT_S = 1800.0
LOADING_COMMANDS = ("rollback", "activate", "pin")


def reply_timeout(cmd: str) -> float:
    """How long the daemon's answer to `cmd` may take."""
    return LOAD_REPLY_TIMEOUT_S if cmd in LOADING_COMMANDS else REPLY_TIMEOUT_S


DEBUG_HANG_ENV = "EDGE_AGENT_DEBUG_HANG"  # "1" enables the `debug-hang` request (tests only)


class ControlServer:
    def __init__(
        self,
        path: Path,
        incoming: Path,
        events: queue.Queue[tuple[Any, ...]],
        authority: Authority | None = None,
    ) -> None:
        self.path = path
        self.incoming = incoming
        self.events = events
        self.authority = authority
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.part"):
            stale.unlink()
        if self.path.is_socket():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._sock.close()
            self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            try:
                request = json.loads(f.readline(1 << 16) or b"null")
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError("a request is a JSON object with a string 'cmd'")
                refusal = self.authority.refusal(peer_of(conn), request["cmd"]) if self.authority else None
                reply = {"ok": False, "error": refusal, "denied": True} if refusal else self._handle(f, request)
            except (ValueError, OSError, KeyError, TypeError, RecursionError) as err:
                reply = {"ok": False, "error": f"bad request: {err}"}
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()

    def _handle(self, f: Any, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "deploy":
            size = request.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError("deploy needs 'size': the byte count that follows")
            request["path"] = str(self._receive(f, size))
        elif request["cmd"] == "debug-hang" and os.environ.get(DEBUG_HANG_ENV) == "1":
            # Test hook: blocks the coordinator thread so that the watchdog pings stop.
            self.events.put(("debug-hang", float(request.get("seconds", 3600))))
            return {"ok": True}
        return self._ask(request)

    def _receive(self, f: Any, size: int) -> Path:
        part = self.incoming / f"{uuid.uuid4().hex}.part"
        left = size
        with part.open("wb") as out:
            while left:
                block = f.read(min(left, 1 << 20))
                if not block:
                    part.unlink()
                    raise ValueError(f"the file ended after {size - left} of {size} bytes")
                out.write(block)
                left -= len(block)
        return part

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        reply: queue.Queue[dict[str, Any]] = queue.Queue(1)
        self.events.put(("control", request, reply))
        wait = reply_timeout(request["cmd"])
        try:
            return reply.get(timeout=wait)
        except queue.Empty:
            return {
                "ok": False,
                "error": f"the daemon did not answer within {wait:.0f} s (`agent status` shows its state)",
            }


def call(path: Path, request: dict[str, Any], payload: Path | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Client side: one request, one reply. DaemonNotRunning when nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as err:
        sock.close()
        raise DaemonNotRunning(f"the agent is not running (nothing answers on {path})") from err
    except PermissionError as err:
        sock.close()
        raise DaemonNotRunning(f"no permission to talk to the agent on {path} (join its group)") from err
    with sock, sock.makefile("rwb") as f:
        try:
            f.write(json.dumps(request).encode() + b"\n")
            if payload is not None:
                with payload.open("rb") as src:
                    while block := src.read(1 << 20):
                        f.write(block)
            f.flush()
        except BrokenPipeError:
            pass  # the daemon answered (a refusal) without reading the payload: its reply is below
        line = f.readline()
    if not line:
        raise DaemonNotRunning(f"the agent closed the control socket {path} without answering")
    result: dict[str, Any] = json.loads(line)
    return result
