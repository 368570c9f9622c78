"""One serving process per loaded model, and the daemon's handle on it.

Why a process: loading an engine (an ONNX Runtime session, a TensorRT engine) holds the Python
interpreter lock for milliseconds in C++ code. In a process that also serves, every swap would
stall the answer to the controller for that long (measured: 1-4 ms per ONNX Runtime session on
this project's 2-core CI machine, a 2 ms control period). Here the next model loads in its own
process while the current one keeps answering, and the swap is a hand-over of the client sockets
(agent.serving_loop). A model that crashes its runtime takes down its own process, not the daemon.

The process is started fresh (multiprocessing `spawn`, like the build child), dies with the
daemon (PR_SET_PDEATHSIG), loads at background priority and is raised to the serving priority
only when it takes the clients."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import socket
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.build import die_with_parent, exit_reason, idle, start_in_background
from agent.engines import Backend
from agent.errors import AgentError
from agent.protocol import TensorSpec
from agent.serving_loop import Identity, ServingLoop

log = logging.getLogger(__name__)

_MP = multiprocessing.get_context("spawn")
PROCESS_NAME = "edge-serve"
SERVING_NICE = -5
WARMUP_CALLS = 20


class WorkerFailed(AgentError):
    pass


class EngineWorker:
    """The daemon's side of one serving process. Not thread-safe beyond its request lock: the
    pipeline thread starts it, then hands it to the coordinator."""

    def __init__(
        self, backend: Backend | None, engine_path: Path | None, identity: Identity, ready_timeout_s: float = 600.0
    ) -> None:
        self.identity = identity
        self.ctl, child_ctl = _MP.Pipe(duplex=True)
        self._feed, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = str(engine_path) if engine_path is not None else None
        self.proc = _MP.Process(
            target=_child, args=(backend, path, identity, child_ctl, inbox), name=PROCESS_NAME, daemon=True
        )
        start_in_background(self.proc)
        child_ctl.close()
        inbox.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid
        self._lock = threading.Lock()
        self._closed = False
        try:
            ready = self._reply(ready_timeout_s)
        except WorkerFailed:
            self.close()
            raise
        if "error" in ready:
            self.close()
            raise WorkerFailed(f"the engine does not load: {ready['error']}")
        self.inputs = [TensorSpec.from_json(t) for t in ready["inputs"]]
        self.outputs = [TensorSpec.from_json(t) for t in ready["outputs"]]

    # -- requests --------------------------------------------------------------------------------
    def request(self, msg: dict[str, Any], fd: int | None = None, timeout: float = 5.0) -> dict[str, Any]:
        with self._lock:
            try:
                self.ctl.send(msg)
                if fd is not None:
                    reduction.send_handle(self.ctl, fd, self.pid)
            except OSError as err:
                raise WorkerFailed(self.failure() or f"the serving process is unreachable: {err}") from err
            return self._reply(timeout)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            if self.ctl.poll(timeout):
                reply: dict[str, Any] = self.ctl.recv()
                return reply
        except (EOFError, OSError):
            self.proc.join(1)
            raise WorkerFailed(self.failure() or "the serving process closed its channel") from None
        raise WorkerFailed(f"the serving process (pid {self.pid}) did not answer within {timeout:g} s")

    def stats(self) -> dict[str, Any]:
        return self.request({"cmd": "stats"})

    def hand_over_to(self, successor: EngineWorker) -> dict[str, Any]:
        """This process sends its listener and clients to `successor`; returns its last counts."""
        return self.request({"cmd": "handover"}, successor._feed.fileno())

    def give(self, listener: socket.socket) -> None:
        """The first holder (or the one after a crash) gets the listener from the daemon."""
        header = json.dumps({"listener": True, "conns": []}).encode()
        socket.send_fds(self._feed, [header], [listener.fileno()])

    def failure(self) -> str | None:
        """Why the process ended, or None while it runs."""
        if self.proc.is_alive():
            return None
        code = self.proc.exitcode
        return "the serving process ended" + (f": {exit_reason(code)}" if code is not None else "")

    def serving_priority(self, rt_priority: int) -> None:
        """Raise the process before it takes the clients: SCHED_FIFO when allowed (the unit's
        LimitRTPRIO), else nice -5. Its single serving thread is its main thread (tid = pid); threads
        the runtime started while loading keep background priority."""
        if rt_priority:
            try:
                os.sched_setscheduler(self.pid, os.SCHED_FIFO, os.sched_param(rt_priority))
                return
            except OSError as err:
                log.info(
                    "serving process %d cannot run SCHED_FIFO %d (%s): nice %d",
                    self.pid,
                    rt_priority,
                    err,
                    SERVING_NICE,
                )
        _setpriority(self.pid, SERVING_NICE)

    def standby_priority(self) -> None:
        """Back to background priority once it has handed its clients over (kept for a rollback)."""
        idle(self.pid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.is_alive():
            try:
                self.request({"cmd": "stop"}, timeout=2.0)
            except WorkerFailed as err:
                log.warning("serving process %d did not stop cleanly: %s", self.pid, err)
            self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.ctl.close()
        self._feed.close()


def _setpriority(pid: int, nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as err:  # raising needs CAP_SYS_NICE or the unit's LimitNICE
        log.info("process %d keeps its CPU priority (%s)", pid, err)


def _child(
    backend: Backend | None, engine_path: str | None, identity: Identity, ctl: Connection, inbox: socket.socket
) -> None:
    die_with_parent(PROCESS_NAME)  # also lowers our priority while we load
    logging.basicConfig(level=logging.INFO, format=f"{PROCESS_NAME}[%(process)d] %(levelname)s %(message)s")
    engine = None
    try:
        if backend is not None and engine_path is not None:
            engine = backend.load(Path(engine_path))
            _warm_up(engine)
    except Exception as err:
        ctl.send({"error": f"{type(err).__name__}: {err}"})
        return
    gc.collect()
    gc.freeze()  # what is loaded stays; a full collection never walks it while we serve
    specs = (engine.inputs, engine.outputs) if engine is not None else ([], [])
    ctl.send({"ready": True, "inputs": [t.to_json() for t in specs[0]], "outputs": [t.to_json() for t in specs[1]]})
    try:
        ServingLoop(engine, identity, ctl, inbox).run()
    finally:
        if engine is not None:
            engine.close()


def _warm_up(engine: Any) -> None:
    """First calls allocate (ONNX Runtime arenas, TensorRT's lazy set-up): not on a client's time."""
    from agent.validate import random_inputs

    feed = random_inputs(engine.inputs, 1)[0]
    for _ in range(WARMUP_CALLS):
        engine.run(feed)


__all__ = ["SERVING_NICE", "EngineWorker", "Identity", "WorkerFailed"]
