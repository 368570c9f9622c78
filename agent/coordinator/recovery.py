"""A restart, on the coordinator thread before serving starts: the active model comes back from the
state dir (no download, no build), and the newest unfinished candidate resumes where it stopped."""

from __future__ import annotations

import logging

from agent.coordinator.lifecycle import ModelState
from agent.coordinator.pipeline import Candidate
from agent.coordinator.reporter import Reporter
from agent.coordinator.scheduler import CandidateScheduler
from agent.coordinator.store import ModelRecord, Store
from agent.engines import Backend, cache, engine_key, key_precision
from agent.errors import AgentError
from agent.serving.server import InferenceServer

log = logging.getLogger(__name__)

RESUMABLE = (
    ModelState.ANNOUNCED,
    ModelState.DOWNLOADING,
    ModelState.VERIFIED,
    ModelState.BUILDING,
    ModelState.VALIDATING,
    ModelState.STAGED,
)


def restore_active(store: Store, server: InferenceServer, backend: Backend, reporter: Reporter) -> None:
    """Load the active model's engine; one that does not load is rolled back and rebuilt later."""
    rec = store.active()
    if rec is None or rec.engine_key is None:
        return
    try:
        path = store.engine_path(rec.engine_key)
        expected = engine_key(rec.sha256, backend, key_precision(rec.engine_key))
        problem = cache.stale_or_damaged(path, rec.engine_key, expected)
        if problem is not None:
            raise AgentError(problem)
        served = server.load(path, rec.version, rec.sha256, rec.manifest.extra.get("deploy_config"))
    except Exception as err:
        log.error("the active model %s does not load from its engine: %s", rec.version, err)
        reporter.transition(rec, ModelState.ROLLED_BACK, f"engine does not load after restart: {err}")
        _rebuild_later(store, reporter, backend, rec)
        return
    server.swap_now(served)
    log.info("restored active model %s from %s", rec.version, rec.engine_key)


def _rebuild_later(store: Store, reporter: Reporter, backend: Backend, rec: ModelRecord) -> None:
    """Queue the model again (its ONNX file is still here) so its engine is rebuilt for this
    backend; a newer unfinished candidate takes precedence."""
    if store.in_state(*RESUMABLE):
        return
    reason = f"rebuilding the engine of {rec.version} for {backend.name} {backend.version()}"
    reporter.record(rec.manifest, rec.channel, None, rec.source, reason)


def resume_unfinished(store: Store, reporter: Reporter, scheduler: CandidateScheduler) -> None:
    """The newest unfinished candidate goes on from its stage; older ones are superseded by it."""
    unfinished = store.in_state(*RESUMABLE)
    for rec in unfinished[:-1]:
        reporter.transition(rec, ModelState.REJECTED, f"superseded by {unfinished[-1].version}")
    if unfinished:
        rec = unfinished[-1]
        log.info("resuming %s from %s", rec.version, rec.state.value)
        scheduler.schedule(Candidate(rec.id, rec.manifest, rec.source))
