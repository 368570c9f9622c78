"""The candidate queue: one model goes through the pipeline at a time, on the pipeline thread; a
newer candidate waits, supersedes whatever waited before it, and cancels the build of the one at
work. Everything here but `_work` runs on the coordinator thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypedDict

from agent.config import GateConfig
from agent.coordinator.gate import BehaviouralCheck, GateContext
from agent.coordinator.lifecycle import ModelState
from agent.coordinator.pipeline import (
    BuildProgressed,
    Candidate,
    DownloadProgress,
    Pipeline,
    StageReached,
    skipped_checks,
)
from agent.coordinator.reporter import Reporter
from agent.coordinator.store import ModelRecord, Store
from agent.errors import Cancelled, DiskFull, RejectedModel
from agent.proc import durable
from agent.serving.server import InferenceServer, ServedModel

log = logging.getLogger(__name__)

SPACE_RETRY_S = 10.0  # a candidate short of disk space is tried again this often


class Pending(TypedDict):
    """The candidate at work, for `agent status`."""

    version: str
    stage: str
    reason: str
    downloaded_bytes: int
    total_bytes: int
    queued: int
    build: dict[str, Any] | None  # pid, stage, percent, elapsed_s of a running build


@dataclass(frozen=True)
class PipelineDone:
    """The pipeline thread finished a candidate: `served` passed the gate, else `error` says why not."""

    cand: Candidate
    served: ServedModel | None
    error: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False  # stopped on purpose (superseded, the agent stopping): `error` says why
    no_space: bool = False  # the state dir's filesystem was full: it waits for space, not rejected


class CandidateScheduler:
    def __init__(
        self,
        *,
        pipeline: Pipeline,
        store: Store,
        reporter: Reporter,
        server: InferenceServer,
        gate: GateConfig,
        behavioural: list[BehaviouralCheck],
        post: Callable[[PipelineDone], None],
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.reporter = reporter
        self.server = server
        self.gate = gate
        self.behavioural = behavioural
        self.post = post
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self.working: Candidate | None = None
        self.waiting: list[Candidate] = []
        self.progress: dict[int, tuple[int, int]] = {}  # record id -> (bytes downloaded, total)
        self.build_progress: dict[int, dict[str, Any]] = {}  # record id -> the running build's info
        self.short_of_space: tuple[Candidate, str, float] | None = None  # (candidate, why, next try)
        self.unrecorded: dict[int, str] = {}  # record id -> why a stage of it could not be recorded

    def schedule(self, cand: Candidate) -> None:
        if self.short_of_space is not None:  # the newer one supersedes the one waiting for space
            old, self.short_of_space = self.short_of_space[0], None
            newer = cand.manifest.version
            self.reporter.transition(self.store.get(old.record_id), ModelState.REJECTED, f"superseded by {newer}")
        if self.working is None:
            self._start(cand)
        else:
            self.waiting.append(cand)
            self.pipeline.supersede(self.working.record_id, cand.manifest.version)

    def working_sha(self) -> str | None:
        """The sha256 of the model in the pipeline (its files are kept from collection)."""
        return self.working.manifest.sha256 if self.working else None

    def _start(self, cand: Candidate) -> None:
        self.working = cand
        self.pipeline.cancel.clear()
        self.worker.submit(self._work, cand, self._gate_context(cand))

    def _gate_context(self, cand: Candidate) -> GateContext:
        model = self.server.model
        return GateContext(
            active_inputs=model.inputs if model else None,
            active_outputs=model.outputs if model else None,
            latency_budget_us=self.gate.latency_budget_us,
            latency_calls=self.gate.latency_calls,
            behavioural=list(self.behavioural),
            skip=skipped_checks(cand),
        )

    def _work(self, cand: Candidate, gate: GateContext) -> None:
        """Runs on the pipeline thread; whatever happens, the coordinator hears of it."""
        try:
            self.post(PipelineDone(cand, self.pipeline.prepare(cand, gate)))
        except Cancelled as err:
            self.post(PipelineDone(cand, None, str(err), cancelled=True))
        except DiskFull as err:
            self.post(PipelineDone(cand, None, str(err), no_space=True))
        except RejectedModel as err:
            self.post(PipelineDone(cand, None, str(err), err.figures))
        except Exception as err:
            log.exception("pipeline failed on %s", cand.manifest.version)
            self.post(PipelineDone(cand, None, f"internal error: {type(err).__name__}: {err}"))

    # -- what the pipeline thread reported ----------------------------------------------------------
    def stage_reached(self, event: StageReached) -> None:
        rec = self.store.get(event.record_id)
        figures = dict(event.figures)
        try:
            if "engine_key" in figures:
                self.store.set_engine_key(rec, figures.pop("engine_key"))
            self.reporter.transition(rec, event.state, event.reason, **figures)
        except Exception as err:
            if not durable.no_space(err):
                raise
            # Its history would miss a stage: whatever the pipeline ends with, it goes again later.
            log.error("%s: %s not recorded, the state dir is full: %s", rec.version, event.state.value, err)
            self.unrecorded[rec.id] = f"the state dir is full: {err}"

    def downloaded(self, event: DownloadProgress) -> None:
        self.progress[event.record_id] = (event.done, event.total)

    def building(self, event: BuildProgressed) -> None:
        """Status shows every update; the cloud gets an event when the build enters a new stage."""
        previous = self.build_progress.get(event.record_id)
        self.build_progress[event.record_id] = event.info
        if previous is None or previous["stage"] != event.info["stage"]:
            self.reporter.emit("build_progress", model_id=event.record_id, **event.info)

    def finished(self, done: PipelineDone) -> tuple[ModelRecord, ServedModel] | None:
        """The candidate that passed the gate, for activation; a failed one is rejected here. The
        caller then starts the next one (`start_next`), after activation: its gate compares it
        with the model active by then."""
        self.working = None
        self.progress.pop(done.cand.record_id, None)
        self.build_progress.pop(done.cand.record_id, None)
        unrecorded = self.unrecorded.pop(done.cand.record_id, None)
        if done.no_space or unrecorded:
            if done.served is not None:
                self.server.release(done.served)
            self.wait_for_space(done.cand, done.error or unrecorded or "")
            return None
        rec = self.store.get(done.cand.record_id)
        if done.served is not None:
            return rec, done.served
        if not rec.state.terminal:
            reason = f"cancelled while {rec.state.value}: {done.error}" if done.cancelled else done.error
            self.reporter.transition(rec, ModelState.REJECTED, reason, **done.figures)
        return None

    def wait_for_space(self, cand: Candidate, why: str) -> None:
        """Not the model's fault: its partial files go, and it is tried again every SPACE_RETRY_S."""
        freed = self.pipeline.free_partial(cand.manifest.sha256)
        self.short_of_space = (cand, why, time.monotonic() + SPACE_RETRY_S)
        log.warning("%s waits for disk space (%s; %d partial files removed)", cand.manifest.version, why, freed)
        self.reporter.emit("disk_full", model_id=cand.record_id, version=cand.manifest.version, reason=why)

    def start_next(self) -> None:
        """The newest waiting candidate, else the one short of space when its next try is due."""
        if self.working is None and not self.waiting and self.short_of_space is not None:
            cand, _why, due = self.short_of_space
            if time.monotonic() >= due:
                self.short_of_space = None
                log.info("trying %s again (it waited for disk space)", cand.manifest.version)
                self._start(cand)
            return
        if self.working is not None or not self.waiting:
            return
        newest, older = self.waiting[-1], self.waiting[:-1]
        self.waiting = []
        for c in older:
            self.reporter.transition(
                self.store.get(c.record_id), ModelState.REJECTED, f"superseded by {newest.manifest.version}"
            )
        self._start(newest)

    # -- for `agent status` ---------------------------------------------------------------------------
    def pending(self) -> Pending | None:
        cand = self.working or (self.short_of_space[0] if self.short_of_space else None)
        if cand is None:
            return None
        rec = self.store.get(cand.record_id)
        done, total = self.progress.get(rec.id, (0, rec.manifest.size))
        reason = rec.reason
        if self.working is None and self.short_of_space is not None:
            left = max(0.0, self.short_of_space[2] - time.monotonic())
            reason = f"waiting for disk space, next try in {left:.0f} s: {self.short_of_space[1]}"
        return {
            "version": rec.version,
            "stage": rec.state.value,
            "reason": reason,
            "downloaded_bytes": done,
            "total_bytes": total,
            "queued": len(self.waiting),
            "build": self.build_progress.get(rec.id),
        }

    def staged_elsewhere(self) -> list[str]:
        """Staged models other than the one at work: waiting for `agent activate`."""
        return [
            r.version
            for r in self.store.in_state(ModelState.STAGED)
            if self.working is None or r.id != self.working.record_id
        ]

    def stop(self) -> None:
        self.pipeline.cancel.set()
        self.worker.shutdown(wait=True, cancel_futures=True)
