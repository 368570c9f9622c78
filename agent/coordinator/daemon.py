"""The composition root and the coordinator loop. `Daemon` builds every part and passes each its
dependencies; then one thread (the caller of `run`) owns all state. paho, the control socket, the
file watcher, the pipeline and operator threads only post typed messages (agent.coordinator.messages),
which `_dispatch` hands to the part that owns them."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import time
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from agent.config import AgentConfig, cache_dir
from agent.contract.protocol import Manifest, Topics, encode
from agent.contract.signing import Trust
from agent.coordinator import recovery
from agent.coordinator.activation import Activation, IdlePolicy
from agent.coordinator.announcements import Announcements
from agent.coordinator.control_requests import ControlRequests, OperatorLoaded
from agent.coordinator.gate import BehaviouralCheck
from agent.coordinator.local_deploy import LocalDeploy
from agent.coordinator.messages import Event, Tick
from agent.coordinator.pipeline import BuildProgressed, DownloadProgress, Notify, Pipeline, StageReached
from agent.coordinator.reporter import Reporter, offline_status
from agent.coordinator.scheduler import CandidateScheduler, PipelineDone
from agent.coordinator.status import Life, StatusBuilder
from agent.coordinator.store import Store
from agent.delivery.mqtt_link import Connected, Disconnected, Link, MessageArrived, Published
from agent.engines import Backend, select_backend
from agent.engines.fleet_share import EngineShare
from agent.engines.provisioner import Provisioner
from agent.errors import AgentError
from agent.proc import crashpoints, durable
from agent.proc.child import protect_daemon
from agent.proc.crashpoints import CRASH_ENV
from agent.proc.sched import choose_background, pin_process
from agent.serving.server import InferenceServer
from agent.serving.telemetry import LatencyRecorder
from agent.system.control import DEBUG_HANG_ENV, ControlRequest, ControlServer, parse_request
from agent.system.inbox import FileDropped
from agent.system.reload import ReloadRequested
from agent.system.service import Service, StopRequested

log = logging.getLogger(__name__)

TICK_S = 0.5
DEFERRED_RETRY_S = 5.0  # announcements a full disk kept from being recorded are tried again this often


class Daemon:
    def __init__(self, cfg: AgentConfig, backend: Backend | None = None, config_file: Path | None = None) -> None:
        self.cfg = cfg
        self.events: queue.Queue[Event] = queue.Queue()
        self._deferred: list[Event] = []  # messages a full disk kept from being recorded
        self._next_deferred = 0.0
        self.life = Life()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(cfg.state_dir / "agent.lock")
        self.store = Store(cfg.state_dir)
        self.backend = backend or select_backend(cfg.backend, cfg.build, cache_dir(cfg))
        self.recorder = LatencyRecorder()
        self.server = InferenceServer(
            cfg.socket,
            self.recorder,
            self.backend,
            rt_priority=cfg.serving_rt_priority,
            serving_cpus=cfg.serving_cpus,
            max_processes=cfg.serving_max_processes,
        )
        self.topics = Topics(cfg.mqtt.topic_prefix)
        will = encode(offline_status(cfg.device_id))
        self.link = Link(cfg.mqtt, cfg.device_id, self.topics.status(cfg.device_id), will, self.post)
        self.reporter = Reporter(cfg=cfg, store=self.store, link=self.link, server=self.server, recorder=self.recorder)
        self._s3: Any = None
        self.pipeline = Pipeline(
            store=self.store,
            serving=self.server,
            engines=self._provisioner(),
            s3=cfg.s3,
            reserve_bytes=cfg.disk_reserve_mb * 2**20,
            post=self.post,
        )
        self.scheduler = CandidateScheduler(
            pipeline=self.pipeline,
            store=self.store,
            reporter=self.reporter,
            server=self.server,
            gate=cfg.gate,
            behavioural=self._behaviour_checks(),
            post=self.post,
        )
        self.activation = Activation(
            cfg=cfg,
            store=self.store,
            server=self.server,
            pipeline=self.pipeline,
            backend=self.backend,
            reporter=self.reporter,
            in_pipeline=self.scheduler.working_sha,
            idle_policy=self._idle_policy(),
        )
        self.announcements = Announcements(
            cfg=cfg, store=self.store, reporter=self.reporter, scheduler=self.scheduler, activation=self.activation
        )
        self.local_deploy = LocalDeploy(cfg=cfg, store=self.store, reporter=self.reporter, scheduler=self.scheduler)
        self.status_builder = StatusBuilder(
            cfg=cfg,
            life=self.life,
            store=self.store,
            backend=self.backend,
            server=self.server,
            recorder=self.recorder,
            link=self.link,
            scheduler=self.scheduler,
            activation=self.activation,
            announcements=self.announcements,
        )
        self.requests = ControlRequests(
            activation=self.activation,
            announcements=self.announcements,
            local_deploy=self.local_deploy,
            server=self.server,
            status=self.status,
            post=self.post,
        )
        self.control = ControlServer(
            cfg.control_path, cfg.state_dir / "incoming", self.post, parse_request, Service.authority(cfg)
        )
        self.service = Service(cfg, config_file, self)

    # -- life ------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.server.background_cpus:
            pin_process(self.server.background_cpus)  # before any child starts: they inherit it
        log.info("downloads, checks, builds and model loads run %s", choose_background(self.cfg.serving_rt_priority))
        if os.environ.get(DEBUG_HANG_ENV) == "1":
            log.warning("%s=1: the test hook that blocks the coordinator is on (never on a robot)", DEBUG_HANG_ENV)
        if crashpoints.armed():
            log.warning(
                "%s=%s: this daemon kills itself there (a test hook, never on a robot)", CRASH_ENV, crashpoints.armed()
            )
        self.service.install_signal_handlers()
        protect_daemon()
        recovery.restore_active(self.store, self.server, self.backend, self.reporter)
        self.activation.resume_watch()
        self.server.start()
        self.control.start()
        self.link.start()
        recovery.resume_unfinished(self.store, self.reporter, self.scheduler)
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
        while not self.life.stopping:
            self._turn()
        self._shutdown()
        return 0

    def _turn(self) -> None:
        event: Event
        try:
            event = self.events.get(timeout=min(TICK_S, self.service.notifier.interval or TICK_S))
        except queue.Empty:
            event = Tick()
        try:
            for signalled in self.service.take_signals():
                self._dispatch(signalled)
            self._dispatch(event)
            self._periodic()
        except Exception as err:  # a bug in one event must not take serving down with it
            if durable.no_space(err) and isinstance(event, MessageArrived):
                self._deferred.append(event)  # an announcement not recorded: again once there is space
                self.life.disk_problem = f"{len(self._deferred)} announcements wait to be recorded: {err}"
                log.error("the state dir is full (%s): an announcement waits until it can be recorded", err)
                return
            log.exception("coordinator failed on %s", type(event).__name__)

    def _shutdown(self) -> None:
        log.info("stopping")
        self.service.stopping()
        self.pipeline.cancel.set()
        self.control.stop()
        self.link.stop(self.topics.status(self.cfg.device_id), encode(offline_status(self.cfg.device_id)))
        self.scheduler.stop()
        self.requests.stop()
        self.activation.release_parked()
        self.server.stop()
        self.store.close()
        os.close(self._lock_fd)

    def _periodic(self) -> None:
        if self._deferred and time.monotonic() >= self._next_deferred:
            self._next_deferred = time.monotonic() + DEFERRED_RETRY_S
            self.life.disk_problem = None  # set again if they fail again
            for event in self._deferred:
                self.events.put(event)
            self._deferred = []
        self.scheduler.start_next()  # a candidate that waited for disk space, when due
        self.server.drain()
        self.activation.tick()
        self.service.tick()
        self.reporter.drain_outbox()
        self.reporter.telemetry_if_due()
        if self.reporter.status_changed:
            self.reporter.publish_status(self.status_builder.mqtt())

    def _dispatch(self, event: Event) -> None:  # noqa: PLR0912 (one case per kind of message)
        """Each message to the part that owns it."""
        match event:
            case StopRequested():
                self.life.stopping = True
            case MessageArrived():
                self.announcements.received(event.topic, event.payload)
            case Connected():
                log.info("connected to %s (session present: %s)", self.cfg.mqtt.url, event.session_present)
                self.link.subscribe(self.announcements.subscription())
                self.reporter.connection_changed()
            case Disconnected():
                log.warning("broker connection lost: %s", event.reason)
                self.reporter.connection_changed()
            case Published():
                self.reporter.acknowledged(event.mid)
            case StageReached():
                self.scheduler.stage_reached(event)
            case DownloadProgress():
                self.scheduler.downloaded(event)
            case BuildProgressed():
                self.scheduler.building(event)
            case Notify():
                self.reporter.emit(event.kind, **event.fields)
            case PipelineDone():
                self._pipeline_done(event)
            case ControlRequest():
                self.requests.handle(event)
            case OperatorLoaded():
                self.requests.loaded(event)
            case ReloadRequested():
                self.service.reload(event.why)
            case FileDropped():
                self.service.take_dropped(event.path)
            case Tick():
                pass
            case _:
                _unhandled(event)

    def _pipeline_done(self, done: PipelineDone) -> None:
        passed = self.scheduler.finished(done)
        try:
            if passed is not None:
                self.activation.staged(*passed)
        except Exception as err:
            if not durable.no_space(err):
                raise
            if passed is not None:
                self.server.release(passed[1])  # unless it serves: nothing to swap back to
            self.scheduler.wait_for_space(done.cand, f"the state dir is full: {err}")
        self.scheduler.start_next()  # after activation: its gate compares it with the model active now

    # -- what the service asks of the daemon (agent.system.service.ServiceHost) -------------------
    def post(self, event: Event) -> None:
        """Any thread: a message for the coordinator."""
        self.events.put(event)

    def status(self) -> dict[str, Any]:
        return self.status_builder.as_dict()

    def emit(self, kind: str, **fields: Any) -> None:
        self.reporter.emit(kind, **fields)

    def deploy_file(self, part: Path, version: str) -> None:
        self.local_deploy.deploy(part, version)

    def reject_file(self, manifest: Manifest, origin: str, reason: str) -> None:
        self.reporter.add_rejected(manifest, self.cfg.channel, None, "local", reason, added=origin)

    def apply_config(self, new: AgentConfig, key: str) -> None:
        """A reloaded key into effect (agent.system.reload.RELOADABLE); the config object itself is
        updated by the reloader."""
        if key == "log_level":
            logging.getLogger().setLevel(new.log_level.upper())
        elif key == "telemetry":
            self.reporter.restart_telemetry(new.telemetry.interval_s)
        elif key == "s3":
            self.pipeline.s3 = new.s3  # the next download's child uses the new settings
        elif key == "security":
            self.announcements.trust = Trust(new.security.trusted_keys)
            self.control.authority = Service.authority(new)
        elif key == "disk_reserve_mb":
            self.pipeline.reserve_bytes = new.disk_reserve_mb * 2**20

    # -- wiring helpers ------------------------------------------------------------------------------
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
            refused_file=cache_dir(self.cfg) / "refused-shared-engines.json",
        )

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


def _unhandled(event: NoReturn) -> NoReturn:
    """mypy proves this unreachable: every kind of Event has its case above."""
    raise AssertionError(f"no handler for {event!r}")


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise AgentError(f"another agent is already running on {path.parent}") from err
    return fd
