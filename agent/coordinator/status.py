"""What `agent status` and the retained MQTT status topic say, built on the coordinator thread
from the parts that hold each piece (nothing here changes state). `Status` is the schema of
`agent status --json`."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict

from agent import __version__
from agent.config import AgentConfig
from agent.contract.protocol import now
from agent.coordinator.activation import Activation
from agent.coordinator.announcements import Announcements
from agent.coordinator.lifecycle import ModelState
from agent.coordinator.scheduler import CandidateScheduler, Pending
from agent.coordinator.store import Store
from agent.delivery.mqtt_link import Link
from agent.engines import Backend
from agent.serving.server import InferenceServer
from agent.serving.telemetry import LatencyRecorder


class Broker(TypedDict):
    url: str
    connected: bool
    conflict: str | None


class Active(TypedDict):
    version: str
    sha256: str
    backend: str
    precision: str | None  # the engine's, as it passed the gate
    precision_note: str | None  # why not the first precision (an FP16 engine that missed its golden outputs)
    activated_at: float | None
    source: str


class Disk(TypedDict):
    free_mb: int  # on the state dir's filesystem
    problem: str | None  # what waits for space, and why


class Outcome(TypedDict):
    version: str
    reason: str
    at: float


class Status(TypedDict):
    device_id: str
    state: str  # "running" or "stopping"
    pid: int
    uptime_s: float
    agent_version: str
    channel: str
    backend: str
    backend_version: str
    broker: Broker
    active: Active | None
    pending: Pending | None
    waiting_to_activate: dict[str, str] | None  # a model held back by the when-idle policy
    last_rejected: Outcome | None
    last_rollback: Outcome | None
    activation: str
    staged: list[str]
    pinned: str | None
    operator: dict[str, str] | None  # an operator command loading its model: cmd, version
    deferred: str | None  # the announcement held back while pinned
    watch: dict[str, Any] | None
    latency_last_minute: dict[str, int]
    clients: int
    serving: dict[str, Any] | None  # the serving process: pid, scheduling, cpus
    requests: int
    request_errors: int
    ignored_payloads: int
    last_ignored_payload: str | None
    outbox: int
    disk: Disk


MQTT_STATUS_KEYS = (
    "device_id",
    "agent_version",
    "channel",
    "backend",
    "backend_version",
    "active",
    "pending",
    "last_rejected",
    "uptime_s",
)


@dataclass
class Life:
    """The daemon's own state, shared with the status."""

    started_at: float = field(default_factory=time.monotonic)  # uptime survives a stepped wall clock
    stopping: bool = False
    disk_problem: str | None = None  # messages a full disk kept from being recorded


class StatusBuilder:
    def __init__(
        self,
        *,
        cfg: AgentConfig,
        life: Life,
        store: Store,
        backend: Backend,
        server: InferenceServer,
        recorder: LatencyRecorder,
        link: Link,
        scheduler: CandidateScheduler,
        activation: Activation,
        announcements: Announcements,
    ) -> None:
        self.cfg = cfg
        self.life = life
        self.store = store
        self.backend = backend
        self.server = server
        self.recorder = recorder
        self.link = link
        self.scheduler = scheduler
        self.activation = activation
        self.announcements = announcements

    def build(self) -> Status:
        self.server.drain(force=True)
        minute = self.recorder.last_minute()
        a = self.activation
        return {
            "device_id": self.cfg.device_id,
            "state": "stopping" if self.life.stopping else "running",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.life.started_at, 1),
            "agent_version": __version__,
            "channel": self.cfg.channel,
            "backend": self.backend.name,
            "backend_version": self.backend.version(),
            "broker": self._broker(),
            "active": self._active(),
            "pending": self.scheduler.pending(),
            "waiting_to_activate": self._parked(),
            "last_rejected": self._last_rejected(),
            "last_rollback": self._last_rollback(),
            "activation": self.cfg.activation,
            "staged": self.scheduler.staged_elsewhere(),
            "pinned": a.pinned,
            "operator": None if a.loading is None else {"cmd": a.loading.cmd, "version": a.loading.target.version},
            "deferred": self.announcements.deferred_version(),
            "watch": None if a.watch is None else a.watch.to_json(self.server.stats, self.cfg.watch.window_s),
            "latency_last_minute": {"count": minute.count, "p50_us": minute.p50_us, "p99_us": minute.p99_us},
            "clients": self.server.clients,
            "serving": self.server.serving_info(),
            "requests": self.server.requests,
            "request_errors": self.server.errors,
            "ignored_payloads": self.announcements.ignored_payloads,
            "last_ignored_payload": self.announcements.last_ignored or None,
            "outbox": self.store.outbox_size(),
            "disk": self._disk(),
        }

    def _disk(self) -> Disk:
        problem = self.life.disk_problem
        waiting = self.scheduler.short_of_space
        if waiting is not None:
            problem = f"{waiting[0].manifest.version} waits for disk space: {waiting[1]}"
        return {"free_mb": shutil.disk_usage(self.cfg.state_dir).free >> 20, "problem": problem}

    def as_dict(self) -> dict[str, Any]:
        """The status as a plain JSON object (what the control socket and STATUS= take)."""
        return dict(self.build())

    def _broker(self) -> Broker:
        conflict = self.link.conflict_until > time.monotonic()
        return {
            "url": self.cfg.mqtt.url,
            "connected": self.link.connected,
            "conflict": "another agent connected with this device_id; backing off (give each robot its own device_id)"
            if conflict
            else None,
        }

    def _active(self) -> Active | None:
        rec = self.store.active()
        if rec is None:
            return None
        return {
            "version": rec.version,
            "sha256": rec.sha256,
            "backend": self.backend.name,
            "precision": rec.figures.get("precision"),
            "precision_note": rec.figures.get("precision_note"),
            "activated_at": rec.activated_at,
            "source": rec.source,
        }

    def _parked(self) -> dict[str, str] | None:
        """A staged model held back by the activation policy (go2 `when-idle`)."""
        parked = self.activation.parked
        if parked is None:
            return None
        return {"version": parked[1].version, "reason": self.activation.parked_why or "checking the controller"}

    def _last_rejected(self) -> Outcome | None:
        rec = self.store.last_rejected()
        return None if rec is None else {"version": rec.version, "reason": rec.reason, "at": rec.updated_at}

    def _last_rollback(self) -> Outcome | None:
        rolled = self.store.by_entry(ModelState.ROLLED_BACK, limit=1)
        if not rolled:
            return None
        return {"version": rolled[0].version, "reason": rolled[0].reason, "at": rolled[0].updated_at}

    def mqtt(self) -> dict[str, Any]:
        """The retained status topic's payload: a subset of the status."""
        s: dict[str, Any] = dict(self.build())
        return {"protocol": 1, "type": "status", "online": True, "ts": now(), **{k: s[k] for k in MQTT_STATUS_KEYS}}
