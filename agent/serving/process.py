"""One serving process per loaded model, and the daemon's handle on it.

Why a process: loading an engine (an ONNX Runtime session, a TensorRT engine) holds the Python
interpreter lock for milliseconds in C++ code (docs/benchmarks.md has the figures). In a process
that also served, every swap would stall the answer to the controller for that long, longer than
its control period. Here the next model loads in its own
process while the current one keeps answering, and the swap is a hand-over of the client sockets
(agent.serving.loop). A model that crashes its runtime takes down its own process, not the daemon.

The process is started fresh (multiprocessing `spawn`, like the build child) and dies with the
daemon (PR_SET_PDEATHSIG). One that loads a model does so in the background (agent.proc.sched) and is
raised to the serving priority when it takes the clients; an engine-less one (start-up, no model
yet) is needed at once and starts at the daemon's priority."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agent.contract.protocol import TensorSpec
from agent.engines import Backend, Engine
from agent.engines.probes import random_inputs
from agent.errors import Cancelled, EngineLoadFailed, HandOverRefused, RejectedModel, ServingFailed
from agent.proc import crashpoints
from agent.proc.child import die_with_parent, exit_reason
from agent.proc.sched import pin, start_in_background, to_background, to_serving
from agent.serving.loop import ServingLoop, ready
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
    TakeCounts,
    Time,
    Times,
    Unload,
    Unloaded,
)

log = logging.getLogger(__name__)

_MP = multiprocessing.get_context("spawn")
R = TypeVar("R")
PROCESS_NAME = "edge-serve"
WARMUP_CALLS = 20


class ServingPool:
    """The serving processes. Each model loads in one; the process of a model that is released
    stays as a spare (engine closed, runtime imported, a CUDA context kept) and loads the next one,
    so a steady stream of swaps alternates between two processes and starts none: starting a
    process (exec, imports, page faults) is kernel work that nothing preempts on a PREEMPT_NONE
    kernel. Thread-safe: the pipeline thread loads, the coordinator retires."""

    MAX_SPARES = 1
    ROOM_POLL_S = 0.2

    def __init__(self, backend: Backend | None, max_processes: int = 0) -> None:
        self.backend = backend
        # On a Jetson each of these processes (and a build child) holds a CUDA context in the memory
        # the CPU shares: at most this many at once (0: no bound). A spare is closed to keep to it.
        self.max_processes = max_processes
        self._spares: list[ServingProcess] = []
        self._all: set[ServingProcess] = set()  # every process started and not yet closed
        self._held = 0  # places taken by `room`: a build child, or a process about to start
        self._lock = threading.Lock()

    def _live(self) -> int:
        return sum(1 for w in self._all if not w.closed and w.failure() is None)

    @contextlib.contextmanager
    def room(self, cancelled: Callable[[], str | None], *, load: bool) -> Iterator[None]:
        """Waits until one more process fits under max_processes, and holds its place meanwhile: a
        candidate that arrives during a watch waits for the previous model to be unloaded. For a
        model's `load`, a spare is room already (the model loads there); for a build child, a
        spare is closed to make room (it only saves a process start)."""
        while not self._take_place(load):
            why = cancelled()
            if why:
                raise Cancelled(why)
            time.sleep(self.ROOM_POLL_S)
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1

    def _take_place(self, load: bool) -> bool:
        with self._lock:
            full = self.max_processes > 0 and self._live() + self._held >= self.max_processes
            if full and load and self._spares:
                full = False
            spare = self._spares.pop() if full and not load and self._spares else None
            if not full:
                self._held += 1
                return True
        if spare is not None:
            spare.close()  # its place goes to the build; the next load starts a process
        return False

    def count(self) -> int:
        """Serving processes alive now (the one in service, standbys, the spare)."""
        with self._lock:
            return self._live()

    def start(self, engine_path: Path | None, identity: Identity) -> ServingProcess:
        with self._lock:
            spare = self._spares.pop() if self._spares and engine_path is not None else None
        if spare is None:
            return self._new(engine_path, identity)
        assert engine_path is not None
        try:
            spare.load(engine_path, identity)
        except EngineLoadFailed:
            self.retire(spare)
            raise
        except ServingFailed:
            spare.close()
            return self._new(engine_path, identity)
        return spare

    def _new(self, engine_path: Path | None, identity: Identity) -> ServingProcess:
        worker = ServingProcess(self.backend, engine_path, identity)
        with self._lock:
            self._all = {w for w in self._all if not w.closed} | {worker}
        return worker

    def retire(self, worker: ServingProcess) -> None:
        """A released model's process: kept as a spare (engine closed), else ended. Releasing
        one twice changes nothing."""
        with self._lock:
            if worker in self._spares or worker.closed:
                return
        if self.backend is not None and worker.failure() is None:
            try:
                worker.unload()
                with self._lock:
                    fits = self.max_processes <= 0 or self._live() + self._held <= self.max_processes
                    if len(self._spares) < self.MAX_SPARES and fits:
                        self._spares.append(worker)
                        return
            except ServingFailed as err:
                log.warning("serving process %d cannot be reused: %s", worker.pid, err)
        worker.close()

    def close(self) -> None:
        """Every process this pool started: spares, standby models, the one in service."""
        with self._lock:
            workers, self._spares, self._all = self._all, [], set()
        for worker in workers:
            worker.close()


class ServingProcess:
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
        if engine_path is None:
            self.proc.start()  # the daemon waits for it to answer "no active model yet"
        else:
            start_in_background(self.proc)
        child_ctl.close()
        inbox.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid
        self._lock = threading.Lock()
        self._closed = False
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        try:
            self._loaded(self._reply(ready_timeout_s), identity)
        except ServingFailed:
            self.close()
            raise
        log.info("serving process %d started (%s)", self.pid, identity.version or "no model")

    # -- requests --------------------------------------------------------------------------------
    def request(self, msg: Request, fd: int | None = None, timeout: float = 5.0, crash_point: str = "") -> Reply:
        with self._lock:
            try:
                self.ctl.send(msg)
                if fd is not None:
                    reduction.send_handle(self.ctl, fd, self.pid)
            except OSError as err:
                raise ServingFailed(self.failure() or f"the serving process is unreachable: {err}") from err
            crashpoints.reached(crash_point)  # tests: the daemon dies with the request in flight
            return self._reply(timeout)

    def _reply(self, timeout: float) -> Reply:
        try:
            if self.ctl.poll(timeout):
                reply: Reply = self.ctl.recv()
                return reply
        except (EOFError, OSError):
            self.proc.join(1)
            raise ServingFailed(self.failure() or "the serving process closed its channel") from None
        # A late reply would be read as the answer to the next request: a process that does not
        # answer its control channel in time is ended.
        self.proc.kill()
        self.proc.join(5)
        raise ServingFailed(f"the serving process (pid {self.pid}) did not answer within {timeout:g} s; ended it")

    def load(self, engine_path: Path, identity: Identity, timeout: float = 600.0) -> None:
        """A spare process loads the next model (it must hold no clients)."""
        try:
            self._loaded(self.request(Load(str(engine_path), identity), timeout=timeout), identity)
        except EngineLoadFailed:
            raise
        except ServingFailed:
            self.close()
            raise
        log.debug("serving process %d loaded %s", self.pid, identity.version)

    def _loaded(self, reply: Reply, identity: Identity) -> None:
        """The answer to a load (or to the start): the engine's I/O, or why it does not load."""
        if isinstance(reply, Failed):
            raise EngineLoadFailed(f"the engine does not load: {reply.error}")
        if not isinstance(reply, Ready):
            raise ServingFailed(f"the serving process answered a load with {reply!r}")
        self.identity, self.inputs, self.outputs = identity, reply.inputs, reply.outputs

    def unload(self) -> None:
        self._expect(self.request(Unload(), timeout=30.0), Unloaded)
        self.identity = self.identity.emptied()
        self.inputs, self.outputs = [], []

    def stats(self) -> Counts:
        return self._expect(self.request(TakeCounts()), Counts)

    def hand_over_to(self, successor: ServingProcess) -> HandedOver:
        """This process sends its listener and clients to `successor`; returns how many moved and
        its last counts. HandOverRefused (this process keeps serving) when the successor cannot
        take them."""
        reply = self.request(HandOver(), successor._feed.fileno(), crash_point="hand-over")
        if isinstance(reply, Failed):
            raise HandOverRefused(reply.error)
        return self._expect(reply, HandedOver)

    def _expect(self, reply: Reply, kind: type[R]) -> R:
        if not isinstance(reply, kind):
            raise ServingFailed(f"the serving process (pid {self.pid}) answered {reply!r}, not {kind.__name__}")
        return reply

    def give(self, listener: socket.socket) -> None:
        """The first holder (or the one after a crash) gets the listener from the daemon."""
        header = json.dumps({"listener": True, "conns": []}).encode()
        socket.send_fds(self._feed, [header], [listener.fileno()])

    def failure(self) -> str | None:
        """Why the process ended, or None while it runs."""
        if self.proc.is_alive():
            return None
        code = self.proc.exitcode
        return exit_reason(code, "the serving process") if code is not None else "the serving process ended"

    def serving_priority(self, rt_priority: int, cpus: set[int] | None = None) -> None:
        """Raised before it takes the clients (agent.proc.sched.to_serving)."""
        to_serving(self.pid, rt_priority, cpus)

    def standby_priority(self, cpus: set[int] | None = None) -> None:
        """Back to the background (and its CPUs) once it has handed its clients over."""
        to_background(self.pid)
        if cpus:
            pin(self.pid, cpus)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.is_alive():
            try:
                self.request(Stop(), timeout=2.0)
            except ServingFailed as err:
                log.warning("serving process %d did not stop cleanly: %s", self.pid, err)
            self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.ctl.close()
        self._feed.close()


class GateEngine:
    """A loaded candidate as the gate sees it (agent.coordinator.gate's Engine): every call runs in its
    serving process, where the model will serve. So the daemon loads no engine of its own (one
    deserialisation per model, no CUDA context in the daemon), the latency is measured where it
    counts, and a model that crashes its runtime ends that process, not the daemon."""

    RUN_TIMEOUT_S = 60.0
    TIME_TIMEOUT_S = 600.0

    def __init__(self, worker: ServingProcess) -> None:
        self.worker = worker
        self.inputs = worker.inputs
        self.outputs = worker.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._ask(Run([feeds]), self.RUN_TIMEOUT_S, Outputs).outputs[0]

    def time_calls(self, feed: dict[str, np.ndarray], calls: int) -> list[float]:
        return self._ask(Time(feed, calls), self.TIME_TIMEOUT_S, Times).us

    def close(self) -> None:
        """Nothing to free: the process and its model serve once the gate passes."""

    def _ask(self, msg: Run | Time, timeout: float, kind: type[R]) -> R:
        try:
            reply = self.worker.request(msg, timeout=timeout)
            if isinstance(reply, Failed):
                raise RejectedModel("validate", f"the model failed during the gate: {reply.error}")
            return self.worker._expect(reply, kind)
        except ServingFailed as err:
            raise RejectedModel("validate", f"the model's serving process failed during the gate: {err}") from err


def _child(
    backend: Backend | None, engine_path: str | None, identity: Identity, ctl: Connection, inbox: socket.socket
) -> None:
    die_with_parent(PROCESS_NAME)
    logging.basicConfig(level=logging.INFO, format=f"{PROCESS_NAME}[%(process)d] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the agent's terminal is for the daemon

    def load(path: str) -> Engine:
        assert backend is not None
        engine = backend.load(Path(path))
        _warm_up(engine)
        return engine

    loop = ServingLoop(None, identity, ctl, inbox, load if backend is not None else None)
    if engine_path is not None:
        reply = loop.load_model(engine_path, identity)
        ctl.send(reply)
        if isinstance(reply, Failed):
            return
    else:
        gc.freeze()
        ctl.send(ready(None))
    loop.run()


def _warm_up(engine: Any) -> None:
    """First calls allocate (ONNX Runtime arenas, TensorRT's lazy set-up): not on a client's time."""
    feed = random_inputs(engine.inputs, 1)[0]
    for _ in range(WARMUP_CALLS):
        engine.run(feed)
