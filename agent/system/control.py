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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypedDict, TypeVar

from agent.contract.protocol import name_problem
from agent.errors import DaemonNotRunning
from agent.system.peercred import Authority, peer_of

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0
# `agent rollback/activate/pin` are answered once the model serves; a stored model's engine may
# need building first (after a TensorRT upgrade): minutes.
LOAD_REPLY_TIMEOUT_S = 1800.0
LOADING_COMMANDS = ("rollback", "activate", "pin")
OperatorVerb = Literal["rollback", "activate", "pin"]


def reply_timeout(cmd: str) -> float:
    """How long the daemon's answer to `cmd` may take."""
    return LOAD_REPLY_TIMEOUT_S if cmd in LOADING_COMMANDS else REPLY_TIMEOUT_S


DEBUG_HANG_ENV = "EDGE_AGENT_DEBUG_HANG"  # "1" enables the `debug-hang` request (tests only)


# -- what the daemon is asked: one typed request per command, parsed where it enters --------------
@dataclass(frozen=True)
class StatusQuery:
    """`agent status`."""


@dataclass(frozen=True)
class DeployFile:
    """`agent deploy`: the file, already received under <state_dir>/incoming."""

    path: Path
    version: str
    skip_checks: tuple[str, ...] = ()
    deploy_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class OperatorCommand:
    """`agent rollback`, `agent activate VERSION`, `agent pin VERSION`: answered once the model serves."""

    verb: OperatorVerb
    version: str | None


@dataclass(frozen=True)
class Unpin:
    """`agent unpin`."""


@dataclass(frozen=True)
class DebugHang:
    """Test hook, parsed only under EDGE_AGENT_DEBUG_HANG=1: the coordinator answers, then blocks
    for `seconds` so that the watchdog pings stop. The shipped unit removes that variable
    (UnsetEnvironment=, applied after any Environment= a drop-in adds), and the daemon says in its
    log at start when the hook is on."""

    seconds: float


Request = StatusQuery | DeployFile | OperatorCommand | Unpin | DebugHang


class _ReplyBase(TypedDict):
    ok: bool


class Reply(_ReplyBase, total=False):
    """The daemon's answer, one JSON object: `ok`, and `error` when it is false."""

    error: str
    denied: bool  # refused for the caller's identity (peercred)
    status: dict[str, Any]  # StatusQuery: agent.coordinator.status.Status
    version: str  # OperatorCommand: the model now active; DeployFile: the version deployed
    was: str | None  # Unpin: the version it was pinned to
    id: int  # DeployFile: the model record, for `agent deploy --wait`
    sha256: str  # DeployFile


def refused(error: str) -> Reply:
    return {"ok": False, "error": error}


R = TypeVar("R")


@dataclass(frozen=True)
class ControlRequest(Generic[R]):
    """A parsed request for the thread that serves it (the agent's coordinator: a `Request`; the
    Go2 controller's loop: its own); the connection's thread waits on `reply` for the answer (the
    agent's is a `Reply`)."""

    request: R
    reply: queue.Queue[Any]


def parse_request(obj: dict[str, Any], received: Path | None) -> Request:
    """The typed request for a JSON object from the socket; ValueError names what is wrong."""
    cmd = obj["cmd"]
    if cmd == "status":
        return StatusQuery()
    if cmd == "unpin":
        return Unpin()
    if cmd in LOADING_COMMANDS:
        version = obj.get("version")
        if version is not None and (problem := name_problem("version", version)):
            raise ValueError(problem)
        verb: OperatorVerb = cmd
        return OperatorCommand(verb, version or None)
    if cmd == "deploy" and received is not None:
        skip = obj.get("skip_checks") or []
        config = obj.get("deploy_config")
        if not isinstance(skip, list) or not all(isinstance(c, str) for c in skip):
            raise ValueError("'skip_checks' is a list of check names")
        if config is not None and not isinstance(config, dict):
            raise ValueError("'deploy_config' is an object")
        version = obj.get("version") or ""
        if version and (problem := name_problem("version", version)):
            raise ValueError(problem)
        return DeployFile(received, version, tuple(skip), config)
    if cmd == "debug-hang" and os.environ.get(DEBUG_HANG_ENV) == "1":
        return DebugHang(float(obj.get("seconds", 3600)))
    raise ValueError(f"unknown command {cmd!r}")


class ControlServer(Generic[R]):
    def __init__(
        self,
        path: Path,
        incoming: Path,
        post: Callable[[ControlRequest[R]], None],
        parse: Callable[[dict[str, Any], Path | None], R],
        authority: Authority | None = None,
    ) -> None:
        self.path = path
        self.incoming = incoming
        self.post = post
        self.parse = parse  # the JSON object (and a received file) -> the typed request; ValueError
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
                reply: Reply = {"ok": False, "error": refusal, "denied": True} if refusal else self._handle(f, request)
            except (ValueError, OSError, KeyError, TypeError, RecursionError) as err:
                reply = refused(f"bad request: {err}")
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()

    def _handle(self, f: Any, obj: dict[str, Any]) -> Reply:
        received = None
        if obj["cmd"] == "deploy":
            size = obj.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError("deploy needs 'size': the byte count that follows")
            received = self._receive(f, size)
        try:
            request = self.parse(obj, received)
        except (ValueError, TypeError):
            if received is not None:
                received.unlink(missing_ok=True)
            raise
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

    def _ask(self, request: R) -> Reply:
        reply: queue.Queue[Reply] = queue.Queue(1)
        self.post(ControlRequest(request, reply))
        wait = LOAD_REPLY_TIMEOUT_S if isinstance(request, OperatorCommand) else REPLY_TIMEOUT_S
        try:
            answer: Reply = reply.get(timeout=wait)
            return answer
        except queue.Empty:
            return refused(f"the daemon did not answer within {wait:.0f} s (`agent status` shows its state)")


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
