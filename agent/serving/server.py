"""The inference socket, the model in service and the swap, seen from the daemon.

Each loaded model runs in its own serving process (agent.serving.process); the one in service holds the
socket's listener and every client connection. A swap hands them to the next process between two
requests (agent.serving.loop); the replaced process stays loaded during the post-activation watch,
so a rollback is a hand-over back. Before any model is active a process without an engine answers
"no active model yet". The daemon collects what each process served (counts and latencies) every
STATS_EVERY_S, off the hot path."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.protocol import TensorSpec
from agent.engines import Backend
from agent.errors import HandOverRefused, ServingFailed
from agent.proc.sched import describe, to_foreground
from agent.serving.pipe import Counts, Identity
from agent.serving.process import GateEngine, ServingPool, ServingProcess
from agent.serving.telemetry import LatencyRecorder

log = logging.getLogger(__name__)

STATS_EVERY_S = 0.1


@dataclass(frozen=True)
class ServedModel:
    """A loaded model: its serving process, started and warmed up."""

    worker: ServingProcess

    @property
    def version(self) -> str:
        return self.worker.identity.version

    @property
    def sha256(self) -> str:
        return self.worker.identity.sha256

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.worker.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.worker.outputs


class SwapStats:
    """What the model in service served since it was swapped in: the post-activation watch reads
    it. Replaced (not reset) at each swap, so a reader never sees a mix."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.requests = 0
        self.errors = 0
        self.nonfinite = 0
        self.latency = LatencyRecorder(window_s=3600, buckets=1)


class InferenceServer:
    def __init__(
        self,
        path: Path,
        recorder: LatencyRecorder,
        backend: Backend,
        *,
        rt_priority: int = 0,
        serving_cpus: list[int] | None = None,
        max_processes: int = 0,
    ) -> None:
        self.path = path
        self.recorder = recorder
        self.backend = backend
        self.rt_priority = rt_priority
        self.serving_cpus = set(serving_cpus or ())
        # Everything else (this daemon, its children, a standby model) stays off the serving CPUs.
        self.background_cpus = os.sched_getaffinity(0) - self.serving_cpus if self.serving_cpus else None
        self.pool = ServingPool(backend, max_processes)
        self.requests = 0
        self.errors = 0
        self.clients = 0
        self.stats = SwapStats("")
        self.failure: str | None = None  # why the process in service ended, until the next swap
        self._model: ServedModel | None = None
        self._holder: ServingProcess | None = None  # the process that holds the listener and clients
        self._listener: socket.socket | None = None
        self._next_stats = 0.0

    @property
    def model(self) -> ServedModel | None:
        return self._model

    @property
    def serving_pid(self) -> int | None:
        """The process that answers the clients now."""
        return self._holder.pid if self._holder else None

    def serving_info(self) -> dict[str, Any] | None:
        """What the kernel says of the process in service: its scheduling and CPUs."""
        pid = self.serving_pid
        if pid is None:
            return None
        try:
            sched = describe(pid)
            cpus = sorted(os.sched_getaffinity(pid))
        except OSError:
            return {"pid": pid, "scheduling": "gone", "cpus": []}
        return {"pid": pid, "scheduling": sched, "cpus": cpus}

    def load(self, engine_path: Path, version: str, sha256: str, deploy_config: dict[str, Any] | None) -> ServedModel:
        """Load an engine in a serving process (a spare one when there is one), off the serving
        path; raises ServingFailed (EngineLoadFailed: the engine's fault) with the reason."""
        identity = Identity(version, sha256, self.backend.name, deploy_config)
        return ServedModel(self.pool.start(engine_path, identity))

    @contextlib.contextmanager
    def gating(self, model: ServedModel) -> Iterator[GateEngine]:
        """A loaded candidate's engine for the gate. Its process runs at the daemon's priority
        meanwhile (a background process's latency would be the scheduler's, not the model's), and
        goes back to the background after."""
        worker = model.worker
        to_foreground(worker.pid)
        try:
            yield GateEngine(worker)
        finally:
            if worker.failure() is None:
                worker.standby_priority(self.background_cpus)

    def swap_now(self, model: ServedModel) -> None:
        """Before start(): the model restored from the state dir."""
        assert self._listener is None
        self._model = model
        self.stats = SwapStats(model.version)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a crashed run; we hold the daemon's lock, so it is ours
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o660)
        listener.listen(64)
        self._listener = listener
        holder = self._model.worker if self._model else self.pool.start(None, Identity("", "", self.backend.name))
        holder.serving_priority(self.rt_priority, self.serving_cpus)
        holder.give(listener)
        self._holder = holder

    def swap(self, model: ServedModel, keep_previous: bool = False) -> ServedModel | None:
        """The clients move to `model`'s process; returns once it holds them. With `keep_previous`
        the replaced model is handed back still loaded (for an instant rollback) and the caller
        must `release` it later; otherwise it is released here (its process becomes the spare).
        HandOverRefused when `model`'s process is gone: nothing changed, the old one still serves."""
        new, holder = model.worker, self._holder
        assert holder is not None and self._listener is not None, "start() first"
        new.serving_priority(self.rt_priority, self.serving_cpus)
        try:
            self._count(holder.hand_over_to(new).counts)
        except HandOverRefused:
            new.standby_priority(self.background_cpus)
            raise
        except ServingFailed as err:  # it is gone (or was ended): its clients reconnect to the new one
            log.warning("the serving process %d could not hand over (%s): starting afresh", holder.pid, err)
            holder.close()
            new.give(self._listener)
        holder.standby_priority(self.background_cpus)
        old = self._model
        self._model, self._holder = model, new
        self.stats, self.failure = SwapStats(model.version), None
        if old is None or holder is not old.worker or holder.closed:
            self.pool.retire(holder)  # the engine-less process, or one that failed
            return None
        if not keep_previous:
            self.pool.retire(old.worker)
            return None
        return old

    def serve_nothing(self) -> None:
        """No model is active and the engine-less process ended: a new one answers "no active
        model yet" (new connections would otherwise wait unanswered)."""
        assert self._listener is not None and self._model is None
        if self._holder is not None:
            self._holder.close()
        holder = self.pool.start(None, Identity("", "", self.backend.name))
        holder.serving_priority(self.rt_priority, self.serving_cpus)
        holder.give(self._listener)
        self._holder, self.failure = holder, None

    def release(self, model: ServedModel) -> None:
        """Close a model handed back by `swap` (or loaded and never swapped in); its process stays
        as a spare for the next model."""
        if model is not self._model:
            self.pool.retire(model.worker)

    def drain(self, force: bool = False) -> None:
        """Collect what the process in service answered since the last call (at most every
        STATS_EVERY_S unless forced) into the histograms and the watch's stats."""
        now = time.monotonic()
        if self._holder is None or self.failure or (not force and now < self._next_stats):
            return
        self._next_stats = now + STATS_EVERY_S
        try:
            self._count(self._holder.stats())
        except ServingFailed as err:
            self.failure = str(err)
            log.error("serving failed: %s", err)

    def _count(self, got: Counts) -> None:
        stats = self.stats
        self.requests += got.requests
        self.errors += got.errors
        self.clients = got.clients
        stats.requests += got.requests
        stats.errors += got.errors
        stats.nonfinite += got.nonfinite
        for us in got.samples:
            self.recorder.record(us, stats.version)
            stats.latency.record(us)

    def stop(self) -> None:
        for worker in {self._holder, self._model.worker if self._model else None} - {None}:
            assert worker is not None
            worker.close()
        self.pool.close()
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)
