"""The ONNX check (onnx.checker and the I/O signature) in a child process.

Protobuf parsing a crafted file may crash or exhaust memory, and the onnx package would stay in the
daemon's memory for good: the child returns only the signature, or the one-line reason the file is
no valid model. The child is kept between checks (starting a Python process per deploy is kernel
work that a PREEMPT_NONE kernel does not preempt, next to the serving process); it is started again
after it dies, overruns its time or has parsed a large file (to give that memory back)."""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.contract.protocol import TensorSpec
from agent.errors import RejectedModel
from agent.proc.child import die_with_parent, exit_reason
from agent.proc.sched import start_in_background

_MP = multiprocessing.get_context("spawn")
Signature = tuple[list[TensorSpec], list[TensorSpec]]


# -- what the check child answers -------------------------------------------------------------------
@dataclass(frozen=True)
class Valid:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class Invalid:
    reason: str


RECYCLE_BYTES = 64 << 20  # after a file this large the child ends (its heap stays that large)


class _Checker:
    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def check(self, path: Path, timeout_s: float) -> Signature:
        with self._lock:
            try:
                answer = self._ask(path, timeout_s)
            finally:
                if self._proc is not None and (not self._proc.is_alive() or _size(path) > RECYCLE_BYTES):
                    self._stop()
        if isinstance(answer, Invalid):
            raise RejectedModel("onnx", answer.reason)
        return answer.inputs, answer.outputs

    def _ask(self, path: Path, timeout_s: float) -> Valid | Invalid:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        assert self._conn is not None
        try:
            self._conn.send(str(path))
            if not self._conn.poll(timeout_s):
                self._stop()
                raise RejectedModel("onnx", f"the ONNX check took longer than {timeout_s:g} s")
            reply: Valid | Invalid = self._conn.recv()
            return reply
        except (EOFError, OSError):
            self._proc.join(5)
            why = exit_reason(self._proc.exitcode or 0, "the ONNX check process")
            self._stop()
            raise RejectedModel("onnx", f"the ONNX check failed: {why}") from None

    def _start(self) -> None:
        self._conn, child = _MP.Pipe(duplex=True)
        self._proc = _MP.Process(target=_serve, args=(child,), name="onnx-check", daemon=True)
        start_in_background(self._proc)
        child.close()

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None


_CHECKER = _Checker()


def inspect_onnx(path: Path, timeout_s: float = 600.0) -> Signature:
    """RejectedModel('onnx', reason) when the file is not a valid model."""
    return _CHECKER.check(path, timeout_s)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _serve(conn: Connection) -> None:
    from agent.contract.onnx_signature import check_onnx, signature

    die_with_parent("edge-onnx-check")
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):  # the daemon closed its end
            return
        try:
            conn.send(Valid(*signature(check_onnx(Path(path)))))
        except RejectedModel as err:
            conn.send(Invalid(err.reason))
        except Exception as err:  # a check that breaks is a rejection with its reason, not a lost child
            conn.send(Invalid(f"{type(err).__name__}: {err}"))
