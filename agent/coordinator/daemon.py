"""The composition root and the coordinator. `Daemon` builds every part, then one thread (the
caller of `run`) owns all state: paho, the control socket and the pipeline worker only enqueue."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.contract.digest import sha256_file
from agent.contract.protocol import Announcement, Manifest, ObjectRef, Topics, decode, encode, new_event, now
from agent.coordinator.activation import Activation, IdlePolicy, OperatorJob
from agent.coordinator.gate import BehaviouralCheck, GateContext, GateRejected
from agent.coordinator.lifecycle import ModelState
from agent.coordinator.pipeline import Candidate, Pipeline, skipped_checks
from agent.coordinator.status import StatusBuilder
from agent.coordinator.store import ModelRecord, Store
from agent.delivery.mqtt_link import Link
from agent.delivery.onnx_check import inspect_onnx
from agent.engines import Backend, cache, engine_key, select_backend
from agent.engines.fleet_share import EngineShare
from agent.engines.provisioner import Provisioner
from agent.errors import AgentError, ProtocolError, RejectedModel
from agent.proc.child import protect_daemon
from agent.proc.sched import choose_background, pin_process
from agent.serving.server import InferenceServer, ServedModel
from agent.serving.telemetry import LatencyRecorder
from agent.system.control import LOADING_COMMANDS, ControlServer

log = logging.getLogger(__name__)

TICK_S = 0.5
OUTBOX_BATCH = 50


class Daemon:
    def __init__(self, cfg: AgentConfig, backend: Backend | None = None, config_file: Path | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(cfg.state_dir / "agent.lock")
        self.store = Store(cfg.state_dir)
        self.backend = backend or select_backend(cfg.backend, cfg.build.workspace_mb, cfg.build.fp16)
        self.recorder = LatencyRecorder()
        self.server = InferenceServer(
            cfg.socket, self.recorder, self.backend, cfg.serving_rt_priority, cfg.serving_cpus
        )
        self.link = Link(
            cfg.mqtt, cfg.device_id, self.topics.status(cfg.device_id), encode(self._offline_status()), self.events
        )
        self._s3: Any = None
        self.pipeline = Pipeline(
            self.store,
            self.backend,
            self.server,
            cfg.s3,
            cfg.disk_reserve_mb * 2**20,
            self._report_stage,
            self._report_progress,
            self._provisioner(),
            lambda rid, info: self.events.put(("build-progress", rid, info)),
            lambda kind, fields: self.events.put(("emit", kind, fields)),
        )
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self.operator_thread = ThreadPoolExecutor(1, thread_name_prefix="operator")
        self.activation = Activation(
            cfg,
            self.store,
            self.server,
            self.pipeline,
            self.backend,
            self.transition,
            self.emit,
            lambda: self.working.manifest.sha256 if self.working else None,
            self._idle_policy(),
        )
        self.behavioural: list[BehaviouralCheck] = self._behaviour_checks()
        from agent.system.service import Service

        self.control = ControlServer(cfg.control_path, cfg.state_dir / "incoming", self.events, Service.authority(cfg))
        self.status = StatusBuilder(self)
        self.working: Candidate | None = None
        self.waiting: list[Candidate] = []
        self.progress: dict[int, tuple[int, int]] = {}
        self.build_progress: dict[int, dict[str, Any]] = {}  # record id -> the running build's info
        self.inflight: dict[int, int] = {}  # MQTT message id -> outbox row
        self.ignored_payloads = 0
        self.last_ignored = ""
        self.stopping = False
        self._handlers = self._handler_table()
        self.started_at = time.time()
        self._next_telemetry = time.monotonic() + cfg.telemetry.interval_s
        self.service = Service(self, config_file)

    # -- life ------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.server.background_cpus:
            pin_process(self.server.background_cpus)  # before any child starts: they inherit it
        background = choose_background(self.cfg.serving_rt_priority)
        log.info("downloads, checks, builds and model loads run %s", background)
        self.service.install_signal_handlers()
        protect_daemon()
        self._restore_active()
        self.server.start()
        self.control.start()
        self.link.start()
        self._resume_unfinished()
        log.info(
            "agent %s serving on %s (device %s, channel %s, backend %s %s)",
            __version__,
            self.cfg.socket,
            self.cfg.device_id,
            self.cfg.channel,
            self.backend.name,
            self.backend.version(),
        )
        self.service.started()
        while not self.stopping:
            try:
                event = self.events.get(timeout=min(TICK_S, self.service.notifier.interval or TICK_S))
            except queue.Empty:
                event = ("tick",)
            try:
                for signalled in self.service.take_signals():
                    self._dispatch(signalled)
                self._dispatch(event)
                self._periodic()
            except Exception:  # a bug in one event must not take serving down with it
                log.exception("coordinator failed on %s", event[0])
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        log.info("stopping")
        self.service.stopping()
        self.pipeline.cancel.set()
        self.control.stop()
        self.link.stop(self.topics.status(self.cfg.device_id), encode(self._offline_status()))
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.operator_thread.shutdown(wait=True, cancel_futures=True)
        self.activation.release_parked()
        self.server.stop()
        self.store.close()
        os.close(self._lock_fd)

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        kind, args = event[0], event[1:]
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(*args)
        elif kind in self.service.KINDS:
            self.service.dispatch(event)

    def _handler_table(self) -> dict[str, Callable[..., None]]:
        """What the coordinator does with each event kind that paho, the control socket, the
        pipeline thread and the build watcher put on its queue."""
        return {
            "stop": lambda: setattr(self, "stopping", True),
            "mqtt-message": lambda topic, payload, _retained: self._on_message(topic, payload),
            "mqtt-connected": self._on_connected,
            "mqtt-disconnected": self._on_disconnected,
            "mqtt-published": self._on_published,
            "stage": self._apply_stage,
            "progress": lambda rid, done, total: self.progress.__setitem__(rid, (done, total)),
            "build-progress": self._on_build_progress,
            "emit": lambda kind, fields: self.emit(kind, **fields),
            "pipeline-done": self._on_pipeline_done,
            "control": self._on_control_request,
            "operator-loaded": self._on_operator_loaded,
            "tick": lambda: None,
        }

    def _on_disconnected(self, reason: str) -> None:
        log.warning("broker connection lost: %s", reason)
        self.inflight.clear()  # unacknowledged events stay in the outbox and go again

    def _on_published(self, mid: int) -> None:
        row = self.inflight.pop(mid, None)
        if row is not None:
            self.store.outbox_done(row)

    def _periodic(self) -> None:
        self.server.drain()
        self.activation.tick()
        self.service.tick()
        self._drain_outbox()
        if time.monotonic() >= self._next_telemetry:
            self._next_telemetry += self.cfg.telemetry.interval_s
            self._publish_telemetry()

    # -- MQTT ------------------------------------------------------------------------------------
    def _on_connected(self, session_present: bool) -> None:
        log.info("connected to %s (session present: %s)", self.cfg.mqtt.url, session_present)
        self.link.subscribe(self.topics.announce(self.cfg.channel))
        self.inflight.clear()
        self.publish_status()

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            raw = decode(payload, "announcement")
            ann = Announcement.from_json(raw)
            if ann.channel != self.cfg.channel or topic != self.topics.announce(ann.channel):
                raise ProtocolError(f"announcement for channel {ann.channel!r} on topic {topic}")
        except ProtocolError as err:
            self.ignored_payloads += 1
            self.last_ignored = f"{topic}: {err}"
            log.warning("ignored a payload on %s: %s", topic, err)
            self.emit("payload_ignored", topic=topic, reason=str(err))
            return
        if self.service.rejects(raw, ann):
            return
        self._on_announcement(ann)

    def _on_announcement(self, ann: Announcement) -> None:
        mark = f"seq:{ann.channel}"
        pinned = self.activation.pinned
        if pinned and (self.store.mark(mark) or -1) < ann.sequence:
            self.store.set_mark(f"deferred:{ann.channel}", ann.to_json())
            self.emit(
                "announcement_deferred",
                version=ann.manifest.version,
                sequence=ann.sequence,
                reason=f"pinned to {pinned}; `agent unpin` follows the channel again",
            )
            return
        last = self.store.mark(mark)
        if last is not None and ann.sequence == last:
            log.debug("announcement %d already handled", ann.sequence)
            return
        if last is not None and ann.sequence < last:
            rec = self.store.add(ann.manifest, ann.channel, ann.sequence, "channel", "announced")
            self.transition(
                rec,
                ModelState.REJECTED,
                f"stale announcement: sequence {ann.sequence} is older than the last handled ({last})",
            )
            return
        self.store.set_mark(mark, ann.sequence)
        rec = self.store.add(
            ann.manifest, ann.channel, ann.sequence, "channel", f"announced on {ann.channel} (sequence {ann.sequence})"
        )
        self._announce_event(rec)
        self._schedule(Candidate(rec.id, ann.manifest, "channel"))

    # -- the pipeline ------------------------------------------------------------------------------
    def _schedule(self, cand: Candidate) -> None:
        if self.working is None:
            self._start(cand)
        else:
            self.waiting.append(cand)
            self.pipeline.supersede(self.working.record_id, cand.manifest.version)

    def _start(self, cand: Candidate) -> None:
        self.working = cand
        self.pipeline.cancel.clear()
        self.worker.submit(self._work, cand, self._gate_context(cand))

    def _gate_context(self, cand: Candidate) -> GateContext:
        model = self.server.model
        return GateContext(
            active_inputs=model.inputs if model else None,
            active_outputs=model.outputs if model else None,
            precision=self.backend.cache_identity().get("precision", "fp32"),
            latency_budget_us=self.cfg.gate.latency_budget_us,
            latency_calls=self.cfg.gate.latency_calls,
            behavioural=list(self.behavioural),
            skip=skipped_checks(cand),
        )

    def _work(self, cand: Candidate, gate: GateContext) -> None:
        """Runs on the pipeline thread."""
        try:
            served = self.pipeline.prepare(cand, gate)
            self.events.put(("pipeline-done", cand, served, "", {}))
        except GateRejected as err:
            checks = {r.name: r.to_json() for r in err.results}
            self.events.put(("pipeline-done", cand, None, str(err), {"gate": checks}))
        except RejectedModel as err:
            self.events.put(("pipeline-done", cand, None, str(err), {}))
        except Exception as err:
            log.exception("pipeline failed on %s", cand.manifest.version)
            self.events.put(("pipeline-done", cand, None, f"internal error: {type(err).__name__}: {err}", {}))

    def _report_stage(self, record_id: int, state: ModelState, reason: str, figures: dict[str, Any]) -> None:
        self.events.put(("stage", record_id, state, reason, figures))

    def _report_progress(self, record_id: int, done: int, total: int) -> None:
        last = self.progress.get(record_id, (0, 0))[0]
        if done == total or done - last >= max(total // 50, 1 << 20):
            self.events.put(("progress", record_id, done, total))

    def _apply_stage(self, record_id: int, state: ModelState, reason: str, figures: dict[str, Any]) -> None:
        rec = self.store.get(record_id)
        if "engine_key" in figures:
            self.store.set_engine_key(rec, figures.pop("engine_key"))
        self.transition(rec, state, reason, **figures)

    def _on_pipeline_done(
        self, cand: Candidate, served: ServedModel | None, error: str, figures: dict[str, Any]
    ) -> None:
        self.working = None
        self.progress.pop(cand.record_id, None)
        self.build_progress.pop(cand.record_id, None)
        rec = self.store.get(cand.record_id)
        if served is None:
            if not rec.state.terminal:
                self.transition(rec, ModelState.REJECTED, error or "cancelled", **figures)
        else:
            self.activation.staged(rec, served)
        if self.waiting:
            newest, older = self.waiting[-1], self.waiting[:-1]
            self.waiting = []
            for c in older:
                self.transition(
                    self.store.get(c.record_id), ModelState.REJECTED, f"superseded by {newest.manifest.version}"
                )
            self._start(newest)

    def _on_build_progress(self, record_id: int, info: dict[str, Any]) -> None:
        """Status shows every update; the cloud gets an event when the build enters a new stage."""
        previous = self.build_progress.get(record_id)
        self.build_progress[record_id] = info
        if previous is None or previous["stage"] != info["stage"]:
            self.emit("build_progress", model_id=record_id, **info)

    def _provisioner(self) -> Provisioner:
        share = None
        if self.cfg.share.enabled:
            share = EngineShare(self._s3_client(), self.cfg.share, self.cfg.device_id)
        return Provisioner(
            engines_dir=self.store.engines_dir,
            backend=self.backend,
            cfg=self.cfg.build,
            share=share,
            device_id=self.cfg.device_id,
        )

    # -- restart recovery ------------------------------------------------------------------------
    def _restore_active(self) -> None:
        """The active model comes back from the state dir: no download, no build."""
        rec = self.store.active()
        if rec is None or rec.engine_key is None:
            return
        try:
            path = self.store.engine_path(rec.engine_key)
            problem = cache.stale_or_damaged(path, rec.engine_key, engine_key(rec.sha256, self.backend))
            if problem is not None:
                raise AgentError(problem)
            served = self.server.load(path, rec.version, rec.sha256, rec.manifest.extra.get("deploy_config"))
        except Exception as err:
            log.error("the active model %s does not load from its engine: %s", rec.version, err)
            self.transition(rec, ModelState.ROLLED_BACK, f"engine does not load after restart: {err}")
            self._rebuild_later(rec)
            return
        self.server.swap_now(served)
        log.info("restored active model %s from %s", rec.version, rec.engine_key)

    def _rebuild_later(self, rec: ModelRecord) -> None:
        """Queue the model again (its ONNX file is still here) so its engine is rebuilt for this
        backend; a newer unfinished candidate takes precedence."""
        if self.store.in_state(*_RESUMABLE):
            return
        reason = f"rebuilding the engine of {rec.version} for {self.backend.name} {self.backend.version()}"
        self.store.add(rec.manifest, rec.channel, None, rec.source, reason)

    def _resume_unfinished(self) -> None:
        unfinished = [r for r in self.store.in_state(*_RESUMABLE)]
        for rec in unfinished[:-1]:
            self.transition(rec, ModelState.REJECTED, f"superseded by {unfinished[-1].version}")
        if unfinished:
            rec = unfinished[-1]
            log.info("resuming %s from %s", rec.version, rec.state.value)
            self._schedule(Candidate(rec.id, rec.manifest, rec.source))

    # -- local deploy and other control requests --------------------------------------------------
    def _on_control_request(self, req: dict[str, Any], reply: queue.Queue[dict[str, Any]]) -> None:
        """Every request gets an answer: the CLI waits for it (for minutes, for a load)."""
        try:
            if req.get("cmd") in LOADING_COMMANDS:
                self._operator(req, reply)
            else:
                reply.put(self._on_control(req))
        except Exception as err:
            log.exception("control request %r failed", req.get("cmd"))
            reply.put({"ok": False, "error": f"internal error: {type(err).__name__}: {err}"})

    def _operator(self, req: dict[str, Any], reply: queue.Queue[dict[str, Any]]) -> None:
        """`agent rollback/activate/pin`: answered when the model serves. A model that must be
        loaded (or its engine built) first loads on the operator thread; the coordinator goes on."""
        version = str(req["version"]) if req.get("version") else None
        try:
            step = self.activation.begin(str(req["cmd"]), version)
        except AgentError as err:
            reply.put({"ok": False, "error": str(err)})
            return
        if isinstance(step, ModelRecord):
            reply.put({"ok": True, "version": step.version})
            return
        log.info("`agent %s`: loading %s", step.cmd, step.target.version)
        self.operator_thread.submit(self._load_for_operator, step, reply)

    def _load_for_operator(self, job: OperatorJob, reply: queue.Queue[dict[str, Any]]) -> None:
        """Runs on the operator thread."""
        try:
            self.events.put(("operator-loaded", job, self.activation.load_for(job.target), "", reply))
        except Exception as err:
            self.events.put(("operator-loaded", job, None, f"{type(err).__name__}: {err}", reply))

    def _on_operator_loaded(
        self, job: OperatorJob, served: ServedModel | None, error: str, reply: queue.Queue[dict[str, Any]]
    ) -> None:
        if served is None:
            self.activation.abandon(job)
            log.error("`agent %s`: %s does not load: %s", job.cmd, job.target.version, error)
            reply.put({"ok": False, "error": f"{job.target.version} does not load: {error}"})
            return
        try:
            rec = self.activation.finish(job, served)
        except AgentError as err:  # finish released what it did not swap in
            reply.put({"ok": False, "error": str(err)})
            return
        except Exception as err:
            self.server.release(served)  # a no-op for the model in service
            log.exception("`agent %s` failed after loading %s", job.cmd, job.target.version)
            reply.put({"ok": False, "error": f"internal error: {err}"})
            return
        reply.put({"ok": True, "version": rec.version})

    def _on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        try:
            if cmd == "status":
                return {"ok": True, "status": self.status.build()}
            if cmd == "deploy":
                return self._deploy(Path(req["path"]), str(req.get("version") or ""), _deploy_extra(req))
            if cmd == "unpin":
                return self._unpin()
        except AgentError as err:
            return {"ok": False, "error": str(err)}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _unpin(self) -> dict[str, Any]:
        was = self.activation.unpin()
        deferred = self.store.mark(f"deferred:{self.cfg.channel}")
        if deferred is not None:
            self.store.set_mark(f"deferred:{self.cfg.channel}", None)
            self._on_announcement(Announcement.from_json(deferred))  # catch up with the channel
        return {"ok": True, "was": was}

    def _deploy(self, part: Path, version: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A local file takes the channel's pipeline from 'verified' on; authorised by socket access."""
        try:
            inputs, outputs = inspect_onnx(part)
        except RejectedModel:
            part.unlink(missing_ok=True)
            raise
        sha = sha256_file(part).hexdigest()
        dest = self.store.model_path(sha)
        os.replace(part, dest)
        manifest = Manifest(
            version=version or f"local-{sha[:12]}",
            sha256=sha,
            size=dest.stat().st_size,
            model=ObjectRef("local", dest.name),
            inputs=inputs,
            outputs=outputs,
            created_at=now(),
            extra=extra or {},
        )
        forced = f"; forced past: {', '.join(extra['skip_checks'])}" if extra and extra.get("skip_checks") else ""
        rec = self.store.add(manifest, self.cfg.channel, None, "local", f"deployed from a local file{forced}")
        self._announce_event(rec)
        self._schedule(Candidate(rec.id, manifest, "local"))
        return {"ok": True, "id": rec.id, "version": manifest.version, "sha256": sha}

    # -- reporting -------------------------------------------------------------------------------
    def transition(self, rec: ModelRecord, state: ModelState, reason: str, **figures: Any) -> ModelRecord:
        rec = self.store.set_state(rec, state, reason, **figures)
        level = logging.WARNING if state in (ModelState.REJECTED, ModelState.ROLLED_BACK) else logging.INFO
        log.log(level, "model %s -> %s: %s", rec.version, state.value, reason)
        self.emit(
            "model_state",
            model_id=rec.id,
            version=rec.version,
            sha256=rec.sha256,
            state=state.value,
            reason=reason,
            source=rec.source,
            figures=figures,
        )
        self.publish_status()
        return rec

    def _announce_event(self, rec: ModelRecord) -> None:
        self.emit(
            "model_state",
            model_id=rec.id,
            version=rec.version,
            sha256=rec.sha256,
            state=rec.state.value,
            reason=rec.reason,
            source=rec.source,
            figures={},
        )

    def emit(self, kind: str, **fields: Any) -> None:
        event = new_event(self.cfg.device_id, kind, **fields)
        dropped = self.store.outbox_put(
            self.topics.events(self.cfg.device_id), encode(event), self.cfg.outbox_max_events
        )
        if dropped:
            log.warning("outbox full: dropped the %d oldest events", dropped)
        self._drain_outbox()

    def _drain_outbox(self) -> None:
        if not self.link.connected:
            return
        for row_id, topic, payload in self.store.outbox_peek(OUTBOX_BATCH, set(self.inflight.values())):
            mid = self.link.publish(topic, payload, qos=1)
            if mid is None:
                return
            self.inflight[mid] = row_id

    def publish_status(self) -> None:
        self.link.publish(self.topics.status(self.cfg.device_id), encode(self.status.mqtt()), retain=True)

    def _publish_telemetry(self) -> None:
        self.server.drain(force=True)
        summary = self.recorder.take_interval()
        model = self.server.model
        payload = {
            "protocol": 1,
            "type": "telemetry",
            "device_id": self.cfg.device_id,
            "ts": now(),
            "interval_s": self.cfg.telemetry.interval_s,
            "model_version": model.version if model else None,
            **summary.to_json(),
        }
        self.link.publish(self.topics.telemetry(self.cfg.device_id), encode(payload), qos=1)
        self.publish_status()

    def _offline_status(self) -> dict[str, Any]:
        return {"protocol": 1, "type": "status", "device_id": self.cfg.device_id, "online": False, "ts": now()}

    def _behaviour_checks(self) -> list[BehaviouralCheck]:
        """The Go2 gate (deploy config, sim rollout) when the config has a [go2] section."""
        if self.cfg.go2 is None:
            return []
        from agent.go2.simgate import Go2Gate

        return [Go2Gate(self.cfg.go2)]

    def _idle_policy(self) -> IdlePolicy | None:
        """`[go2] activation = "when-idle"`: activate only while the controller reports the robot idle."""
        go2 = self.cfg.go2
        if go2 is None or go2.activation == "immediate":
            return None
        from agent.go2.activation import WhenIdle
        from agent.go2.cli import control_socket

        return WhenIdle(control_socket(self.cfg)).ready

    def _s3_client(self) -> Any:
        """Only fleet engine sharing needs S3 in this process; downloads run in a child."""
        from agent.delivery.s3_fetch import s3_client

        if self._s3 is None:
            s3 = self.cfg.s3
            self._s3 = s3_client(s3.endpoint_url, s3.region, s3.connect_timeout_s, s3.read_timeout_s)
        return self._s3


def _deploy_extra(req: dict[str, Any]) -> dict[str, Any]:
    """Manifest extras a local deploy may carry: checks forced past, the Go2 deploy config."""
    extra: dict[str, Any] = {}
    skip = req.get("skip_checks") or []
    if not isinstance(skip, list) or any(c not in ("sim",) for c in skip):
        raise AgentError(f"skip_checks: only 'sim' can be skipped, got {skip!r}")
    if skip:
        extra["skip_checks"] = sorted(skip)
    if req.get("deploy_config") is not None:
        from agent.go2.deploy import from_dict

        extra["deploy_config"] = from_dict(req["deploy_config"]).source
    return extra


_RESUMABLE = (
    ModelState.ANNOUNCED,
    ModelState.DOWNLOADING,
    ModelState.VERIFIED,
    ModelState.BUILDING,
    ModelState.VALIDATING,
    ModelState.STAGED,
)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise AgentError(f"another agent is already running on {path.parent}") from err
    return fd
