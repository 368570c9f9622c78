"""Activation: the swap, the post-activation watch with its automatic rollback, the operator's
commands (activate, rollback, pin, unpin) and the retention of stored models and engines.

Runs on the coordinator thread, except `load_for` (an operator command's load, on its own thread).
The swap itself is a hand-over of the clients between two
serving processes (agent.serving.server); the replaced one stays loaded during the watch, so a rollback is a
swap too."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig
from agent.coordinator.lifecycle import ALLOWED, ModelState
from agent.coordinator.pipeline import Pipeline
from agent.coordinator.reporter import Reporter
from agent.coordinator.store import Entry, ModelRecord, Store
from agent.engines import Backend, engine_key, key_precision
from agent.errors import AgentError, HandOverRefused, ServingFailed
from agent.proc import crashpoints, durable
from agent.proc.memory import release_free_memory
from agent.serving.server import InferenceServer, ServedModel, SwapStats

log = logging.getLogger(__name__)

IdlePolicy = Callable[[], tuple[bool, str]]  # (may activate now, why not): the Go2 when-idle policy
IDLE_CHECK_S = 0.5
RESTART_EVERY_S = 5.0
PIN_MARK = "pin"
WATCH_MARK = "watch"  # {record_id, previous_id} while a watch runs: a restart resumes it
HISTORY_KEPT = 500  # models `agent models` remembers; older finished ones without files are forgotten


@dataclass(frozen=True)
class OperatorJob:
    """`agent rollback/activate/pin` whose model must be loaded before the swap."""

    cmd: str  # "rollback", "activate" or "pin"
    target: ModelRecord
    reason: str  # for the target's transition to active
    active_id: int | None  # the active model when it was asked: finish refuses if that changed


@dataclass
class Watch:
    record_id: int
    version: str
    previous_id: int | None
    previous: ServedModel | None  # still loaded: rolling back is a swap
    started: float
    baseline_p99_us: int | None  # the previous model's served p99, when it served enough calls

    def to_json(self, stats: SwapStats, window_s: float) -> dict[str, Any]:
        summary = stats.latency.last_minute()
        return {
            "version": self.version,
            "remaining_s": round(max(0.0, window_s - (time.monotonic() - self.started)), 1),
            "requests": stats.requests,
            "errors": stats.errors,
            "nonfinite": stats.nonfinite,
            "p99_us": summary.p99_us,
            "baseline_p99_us": self.baseline_p99_us,
        }


class Activation:
    def __init__(
        self,
        *,
        cfg: AgentConfig,
        store: Store,
        server: InferenceServer,
        pipeline: Pipeline,
        backend: Backend,
        reporter: Reporter,
        in_pipeline: Callable[[], str | None],
        idle_policy: IdlePolicy | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.server = server
        self.pipeline = pipeline
        self.backend = backend
        self.transition = reporter.transition
        self.transitions = reporter.transitions
        self.emit = reporter.emit
        self.in_pipeline = in_pipeline  # the sha256 of the candidate at work: its files are kept
        self.idle_policy = idle_policy
        self.watch: Watch | None = None
        self.parked: tuple[int, ServedModel] | None = None  # passed the gate, loaded, waiting for idle
        self.parked_why = ""
        self.loading: OperatorJob | None = None  # an operator command's model, loading off the coordinator
        self._next_idle_check = 0.0
        self._next_restart = 0.0

    @property
    def pinned(self) -> str | None:
        value = self.store.mark(PIN_MARK)
        return str(value) if value else None

    # -- a model that passed the gate --------------------------------------------------------------
    def staged(self, rec: ModelRecord, served: ServedModel) -> None:
        if self.cfg.activation == "manual" or self.pinned:
            why = f"pinned to {self.pinned}" if self.pinned else "activation policy is manual"
            self.server.release(served)
            self.transition(rec, ModelState.STAGED, f"waiting: {why}; `agent activate {rec.version}` to use it")
            return
        if self.idle_policy is not None:
            self._park(rec, served)
            return
        self._activate_or_reject(rec, served, "passed the gate; swapped in")

    def _activate_or_reject(self, rec: ModelRecord, served: ServedModel, reason: str) -> None:
        try:
            self.activate(rec, served, reason)
        except AgentError as err:
            self.transition(rec, ModelState.REJECTED, f"swap: {err}")

    def _park(self, rec: ModelRecord, served: ServedModel) -> None:
        """when-idle: the loaded model waits until the controller says the robot stands still."""
        if self.parked is not None:
            old_id, old = self.parked
            self.server.release(old)
            self.transition(self.store.get(old_id), ModelState.REJECTED, f"superseded by {rec.version}")
        self.parked, self.parked_why = (rec.id, served), ""
        self._next_idle_check = 0.0
        self._activate_parked()

    def _activate_parked(self) -> None:
        if self.parked is None or self.idle_policy is None or time.monotonic() < self._next_idle_check:
            return
        self._next_idle_check = time.monotonic() + IDLE_CHECK_S
        ready, why = self.idle_policy()
        rec = self.store.get(self.parked[0])
        if not ready:
            if why != self.parked_why:
                self.parked_why = why
                log.info("%s waits to activate: %s", rec.version, why)
                self.emit("activation_waiting", model_id=rec.id, version=rec.version, reason=why)
            return
        served = self.parked[1]
        self.parked, self.parked_why = None, ""
        self._activate_or_reject(rec, served, "passed the gate; swapped in while the robot was idle")

    def release_parked(self) -> None:
        if self.parked is not None:
            self.server.release(self.parked[1])
            self.parked = None

    def activate(self, rec: ModelRecord, served: ServedModel, reason: str) -> None:
        previous_rec = self.store.active()
        baseline = self._served_p99()
        previous = self._swap_ending_watch(rec, served, "replaced before its watch ended", keep_previous=True)
        previous_id = previous_rec.id if previous_rec is not None and previous_rec.id != rec.id else None
        changes = [(rec, ModelState.ACTIVE, reason)]
        if previous_rec is not None and previous_id is not None:
            changes.append((previous_rec, ModelState.RETIRED, f"replaced by {rec.version}"))
        try:
            self.transitions(*changes, mark=(WATCH_MARK, {"record_id": rec.id, "previous_id": previous_id}))
        except Exception:  # not recorded (a full disk): what serves must stay what the history says
            if previous is not None:
                self.server.swap(previous)
            raise
        self.watch = Watch(rec.id, rec.version, previous_id, previous, time.monotonic(), baseline)

    def resume_watch(self) -> None:
        """At start: a watch that a crash or a stop cut short begins again for the active model
        (the previous one is loaded only if it must roll back)."""
        mark = self.store.mark(WATCH_MARK)
        if not mark:
            return
        active = self.store.active()
        if active is None or active.id != mark.get("record_id"):  # its activation was not recorded
            self.store.set_mark(WATCH_MARK, None)
            return
        self.watch = Watch(active.id, active.version, mark.get("previous_id"), None, time.monotonic(), None)
        log.warning("the watch of %s was cut short by a restart: it begins again", active.version)
        self.emit("watch_resumed", model_id=active.id, version=active.version)

    def _swap(self, rec: ModelRecord, served: ServedModel, keep_previous: bool) -> ServedModel | None:
        try:
            return self.server.swap(served, keep_previous=keep_previous)
        except (HandOverRefused, ServingFailed) as err:  # its serving process ended while it waited
            self.server.release(served)
            raise AgentError(f"{rec.version} was not swapped in: {err}") from err

    def _swap_ending_watch(
        self, rec: ModelRecord, served: ServedModel, why: str, keep_previous: bool
    ) -> ServedModel | None:
        """The watch ends and `rec` is swapped in; the watch's mark changes in the caller's commit of
        the swap (a power cut between two commits would leave the active model unwatched), or here
        if the swap fails."""
        self._end_watch(why, clear_mark=False)
        try:
            return self._swap(rec, served, keep_previous=keep_previous)
        except Exception:
            self._clear_watch_mark()
            raise

    def _served_p99(self) -> int | None:
        summary = self.server.stats.latency.last_minute()
        return summary.p99_us if summary.count >= self.cfg.watch.min_calls else None

    # -- the post-activation watch -----------------------------------------------------------------
    def tick(self) -> None:
        self._activate_parked()
        w = self.watch
        if self.server.failure and w is None:
            self._restart_serving(self.server.failure)
        if w is None:
            return
        stats = self.server.stats
        reason = self._verdict(stats, w)
        if reason:
            self._rollback(w, reason)
        elif time.monotonic() - w.started >= self.cfg.watch.window_s:
            self.emit("watch_passed", **w.to_json(stats, 0))
            self._end_watch("")
            self.collect_garbage()

    def _verdict(self, stats: SwapStats, w: Watch) -> str:
        wc = self.cfg.watch
        if self.server.failure:
            return self.server.failure
        if stats.errors > wc.max_errors:
            return f"{stats.errors} request errors in service"
        if stats.nonfinite:
            return f"{stats.nonfinite} responses with NaN/Inf outputs in service"
        summary = stats.latency.last_minute()
        if w.baseline_p99_us is not None and summary.count >= wc.min_calls:
            limit = max(wc.latency_factor * w.baseline_p99_us, wc.min_p99_us)
            if summary.p99_us > limit:
                return (
                    f"served p99 {summary.p99_us} µs is over {wc.latency_factor:g} x the previous model's "
                    f"{w.baseline_p99_us} µs"
                )
        return ""

    def _rollback(self, w: Watch, reason: str) -> None:
        rec = self.store.get(w.record_id)
        self.watch = None
        if w.previous_id is None:
            log.error("%s failed its watch (%s) and there is no previous model to go back to", w.version, reason)
            self.store.set_mark(WATCH_MARK, None)
            self.emit("watch_failed", version=w.version, reason=f"{reason}; no previous model to roll back to")
            return
        previous = self.store.get(w.previous_id)
        try:
            if w.previous is None:
                raise ServingFailed("it was not loaded again after the restart")
            self.server.swap(w.previous)  # the failed model's process becomes the spare
        except (HandOverRefused, ServingFailed) as err:  # the previous model's process is gone too
            if w.previous is not None:
                self.server.release(w.previous)
            log.warning("rolling back to %s: %s; loading it again", previous.version, err)
            try:
                self.server.swap(self._load_stored(previous))
            except Exception as err2:
                log.error(
                    "%s failed its watch (%s) and %s does not load: %s", w.version, reason, previous.version, err2
                )
                self.emit(
                    "watch_failed", version=w.version, reason=f"{reason}; {previous.version} does not load: {err2}"
                )
                return
        crashpoints.reached("rollback:swapped")
        self.transitions(
            (rec, ModelState.ROLLED_BACK, f"post-activation watch: {reason}"),
            (previous, ModelState.ACTIVE, f"restored: {w.version} was rolled back ({reason})"),
            mark=(WATCH_MARK, None),
        )

    def _restart_serving(self, failure: str) -> None:
        """The active model's serving process ended outside a watch: load it again in a new one."""
        if time.monotonic() < self._next_restart:
            return
        self._next_restart = time.monotonic() + RESTART_EVERY_S
        rec = self.store.active()
        if rec is None or self.server.model is None:
            log.error("%s; starting a new one (no model is active)", failure)
            self.server.serve_nothing()
            return
        log.error("%s; loading %s in a new serving process", failure, rec.version)
        self.emit("serving_restarted", model_id=rec.id, version=rec.version, reason=failure)
        try:
            self.server.swap(self._load_stored(rec))
        except Exception as err:
            log.error("cannot restart serving %s: %s (retrying in %g s)", rec.version, err, RESTART_EVERY_S)

    def _end_watch(self, why: str, clear_mark: bool = True) -> None:
        w, self.watch = self.watch, None
        if w is None:
            return
        if w.previous is not None:
            self.server.release(w.previous)
        if clear_mark:
            self._clear_watch_mark()
        if why:
            log.info("watch of %s ended: %s", w.version, why)

    def _clear_watch_mark(self) -> None:
        try:
            self.store.set_mark(WATCH_MARK, None)
        except Exception as err:  # a full disk: a restart would watch this model again, no harm
            if not durable.no_space(err):
                raise

    # -- operator commands -------------------------------------------------------------------------
    # Each is begun on the coordinator (checks, and the swap when the model is loaded already), its
    # model loaded off it (load_for: a stored engine may need building first, e.g. after a TensorRT
    # upgrade, which would hold the coordinator for minutes and the watchdog would end the daemon),
    # and finished on it again, or abandoned. `loading` is the job in flight (one at a time).
    def begin(self, cmd: str, version: str | None) -> ModelRecord | OperatorJob:
        """A done command's active record, or the job that must load its model first."""
        if self.loading is not None:
            raise AgentError(
                f"busy: `agent {self.loading.cmd}` is loading {self.loading.target.version}; try again after"
            )
        active = self.store.active()
        if cmd == "rollback":
            rec = self._rollback_target(active)
            reason = "restored by the operator (`agent rollback`)"
        elif version:
            rec = self._find(version)
            reason = (
                "activated by the operator" if cmd == "activate" else f"pinned by the operator (`agent pin {version}`)"
            )
        else:
            raise AgentError(f"`agent {cmd}` needs a version")
        job = OperatorJob(cmd, rec, reason, active.id if active else None)
        at_hand = self._loaded(rec)
        if at_hand is not None:
            return self.finish(job, at_hand)
        if active is not None and active.id == rec.id:
            return self._done(job, rec)
        self.loading = job
        return job

    def _rollback_target(self, active: ModelRecord | None) -> ModelRecord:
        target = next((e for e in self._stored_history() if active is None or e.sha256 != active.sha256), None)
        if target is None:
            raise AgentError("no previous model is stored on this device to roll back to")
        return self.store.get(target.id)

    def _loaded(self, rec: ModelRecord) -> ServedModel | None:
        """The record's model when a serving process holds it already (the watch's previous one, or
        the one parked for when-idle), taken from there."""
        w = self.watch
        if w is not None and w.previous_id == rec.id and w.previous is not None:
            served, w.previous = w.previous, None
            return served
        if self.parked is not None and self.parked[0] == rec.id:
            served, self.parked = self.parked[1], None
            return served
        return None

    def load_for(self, rec: ModelRecord) -> ServedModel:
        """Off the coordinator: a stored model in a serving process (its engine built if need be)."""
        path = self.pipeline.stored_engine(rec.sha256, self._precision(rec))
        return self.server.load(path, rec.version, rec.sha256, rec.manifest.extra.get("deploy_config"))

    def abandon(self, job: OperatorJob) -> None:
        if self.loading is job:
            self.loading = None

    def finish(self, job: OperatorJob, served: ServedModel) -> ModelRecord:
        """Swap the loaded model in, unless what it was asked against changed while it loaded."""
        self.abandon(job)
        rec = self.store.get(job.target.id)
        self._note_engine_key(rec)
        active = self.store.active()
        if active is not None and active.id == rec.id:  # it became active meanwhile (a watch's rollback)
            self.server.release(served)
            return self._done(job, rec)
        changed = (active.id if active else None) != job.active_id
        if changed or ModelState.ACTIVE not in ALLOWED[rec.state]:
            self.server.release(served)
            now = f"{active.version} became active" if changed and active else f"{rec.version} is {rec.state.value}"
            raise AgentError(f"`agent {job.cmd}` not done: {now} while {rec.version} loaded; run it again")
        if job.cmd != "rollback":
            self.activate(rec, served, job.reason)
            return self._done(job, rec)
        self._swap_ending_watch(rec, served, "rolled back by the operator", keep_previous=False)
        changes = [(rec, ModelState.ACTIVE, job.reason)]
        if active is not None:
            changes.insert(0, (active, ModelState.ROLLED_BACK, "rolled back by the operator (`agent rollback`)"))
        return self.transitions(*changes, mark=(WATCH_MARK, None))[-1]

    def _done(self, job: OperatorJob, rec: ModelRecord) -> ModelRecord:
        if job.cmd == "pin":
            self.store.set_mark(PIN_MARK, rec.version)
            self.emit("pinned", version=rec.version)
        return self.store.get(rec.id)

    def unpin(self) -> str | None:
        was = self.pinned
        self.store.set_mark(PIN_MARK, None)
        if was:
            self.emit("unpinned", version=was)
        return was

    def _find(self, version: str) -> ModelRecord:
        candidates = self.store.by_version(version, ModelState.ACTIVE, ModelState.STAGED, ModelState.RETIRED)
        if not candidates:
            known = sorted({e.version for e in self._stored_history()})
            raise AgentError(f"no usable model {version!r} on this device (stored: {', '.join(known) or 'none'})")
        rec = candidates[0]
        if not self.store.model_path(rec.sha256).exists():
            raise AgentError(f"{version} is no longer stored on this device; `fleet rollback` brings it back")
        return rec

    def _stored_history(self) -> list[Entry]:
        """Models that served before (most recent first) whose files are still here."""
        found = self.store.entries(ModelState.ACTIVE, ModelState.ACTIVE, ModelState.RETIRED)
        return [e for e in found if self.store.model_path(e.sha256).exists()]

    def _load_stored(self, rec: ModelRecord) -> ServedModel:
        """On the coordinator, for a serving process that died: the model's engine is kept with it."""
        served = self.load_for(rec)
        self._note_engine_key(rec)
        return served

    def _note_engine_key(self, rec: ModelRecord) -> None:
        key = engine_key(rec.sha256, self.backend, self._precision(rec))
        if rec.engine_key != key:
            self.store.set_engine_key(rec, key)

    def _precision(self, rec: ModelRecord) -> str | None:
        """The precision its engine passed the gate with (FP32 after an FP16 fallback); None: the backend's first."""
        precision = key_precision(rec.engine_key)
        return precision if precision in self.backend.precisions() else None

    # -- retention ---------------------------------------------------------------------------------
    def collect_garbage(self) -> None:
        """Keep the files of the last `keep_models` models that served, the staged ones and the one
        being prepared; remove the rest and stale .part files."""
        keep = {e.sha256 for e in self._stored_history()[: self.cfg.watch.keep_models]}
        keep |= {r.sha256 for r in self.store.in_state(ModelState.STAGED, ModelState.ACTIVE)}
        working = self.in_pipeline()
        if working:
            keep.add(working)
        if self.loading is not None:
            keep.add(self.loading.target.sha256)
        keys = {engine_key(sha, self.backend, p) for sha in keep for p in self.backend.precisions()}
        removed = 0
        for folder, keep_names in (
            (self.store.models_dir, keep),
            (self.store.golden_dir, keep),
            (self.store.engines_dir, keys),
        ):
            for f in folder.iterdir():
                stem = f.name.split(".")[0]
                if stem not in keep_names:
                    f.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("removed %d stored files beyond the last %d models", removed, self.cfg.watch.keep_models)
        self.store.forget_old(HISTORY_KEPT, keep)
        release_free_memory()
