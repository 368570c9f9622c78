"""The ONNX check (onnx.checker and the I/O signature) in a fresh child process.

Parsing a large model holds the GIL for as long as protobuf takes (long enough to stall the serving
thread for many control periods), and the onnx package would stay in the daemon's memory for good.
The child returns only the signature, or the one-line reason the file is no valid model."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

from agent.build import background, die_with_parent, exit_reason, start_in_background
from agent.errors import RejectedModel
from agent.protocol import TensorSpec

_MP = multiprocessing.get_context("spawn")
_LAUNCHER = ThreadPoolExecutor(1, thread_name_prefix="onnx-check", initializer=background)
Signature = tuple[list[TensorSpec], list[TensorSpec]]


def inspect_onnx(path: Path, timeout_s: float = 600.0) -> Signature:
    """RejectedModel('onnx', reason) when the file is not a valid model. The child is started
    from a background-priority thread, so it runs at nice 10 from its first instruction (its
    interpreter start-up included) whichever thread asks."""
    return _LAUNCHER.submit(_inspect, path, timeout_s).result()


def _inspect(path: Path, timeout_s: float) -> Signature:
    recv, send = _MP.Pipe(duplex=False)
    proc = _MP.Process(target=_child, args=(str(path), send), name="onnx-check", daemon=True)
    start_in_background(proc)
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise RejectedModel("onnx", f"the ONNX check took longer than {timeout_s:g} s")
        ok, payload = recv.recv()
    except EOFError:
        proc.join(5)
        raise RejectedModel(
            "onnx", f"the ONNX check failed: {exit_reason(proc.exitcode or 0, 'the ONNX check process')}"
        ) from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        recv.close()
    if not ok:
        raise RejectedModel("onnx", str(payload))
    inputs, outputs = payload
    return inputs, outputs


def _child(path: str, conn: Connection) -> None:
    from agent.onnxinfo import check_onnx, signature

    die_with_parent("edge-onnx-check")
    try:
        conn.send((True, signature(check_onnx(Path(path)))))
    except RejectedModel as err:
        conn.send((False, err.reason))
    conn.close()
