"""What the device tells the cloud, on the coordinator thread: each model's transitions (recorded
in the store, then published as events), other events through the on-disk outbox (QoS 1, drained
while the broker is connected, so nothing is lost while it is not), the retained status and the
latency telemetry."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from agent.config import AgentConfig
from agent.contract.protocol import Manifest, Topics, encode, new_event, now
from agent.coordinator.lifecycle import ModelState
from agent.coordinator.store import ModelRecord, Store
from agent.delivery.mqtt_link import Link
from agent.proc import crashpoints, durable
from agent.serving.server import InferenceServer
from agent.serving.telemetry import LatencyRecorder

log = logging.getLogger(__name__)

OUTBOX_BATCH = 50


def offline_status(device_id: str) -> dict[str, Any]:
    """The last will, and what a clean stop publishes."""
    return {"protocol": 1, "type": "status", "device_id": device_id, "online": False, "ts": now()}


class Reporter:
    def __init__(
        self,
        *,
        cfg: AgentConfig,
        store: Store,
        link: Link,
        server: InferenceServer,
        recorder: LatencyRecorder,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.link = link
        self.server = server
        self.recorder = recorder
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.inflight: dict[int, int] = {}  # MQTT message id -> outbox row
        self.status_changed = True  # the retained status is published on the coordinator's next turn
        self.unsaved: deque[bytes] = deque(maxlen=cfg.outbox_max_events)  # events a full disk refused
        self._next_telemetry = time.monotonic() + cfg.telemetry.interval_s

    # -- model records ------------------------------------------------------------------------------
    # A record's change and its event are one commit: a crash never leaves a state the cloud does
    # not hear of, nor an announcement's sequence taken without its record.
    def transition(self, rec: ModelRecord, state: ModelState, reason: str, **figures: Any) -> ModelRecord:
        """The one way a model changes state: recorded with its event, logged, published."""
        with self.store.transaction():
            rec = self.store.set_state(rec, state, reason, **figures)
            self._model_event(rec, figures)
        return self._recorded(rec)

    def transitions(
        self, *changes: tuple[ModelRecord, ModelState, str], mark: tuple[str, Any] | None = None
    ) -> list[ModelRecord]:
        """Several records change together (a swap: one active, the other retired or rolled back),
        with `mark`, in one commit: a crash between them would leave two active models or none."""
        with self.store.transaction():
            done = []
            for rec, state, reason in changes:
                done.append(self.store.set_state(rec, state, reason))
                self._model_event(done[-1], {})
            if mark is not None:
                self.store.set_mark(*mark)
        return [self._recorded(rec) for rec in done]

    def _recorded(self, rec: ModelRecord) -> ModelRecord:
        crashpoints.reached(f"recorded:{rec.state.value}")
        level = logging.WARNING if rec.state in (ModelState.REJECTED, ModelState.ROLLED_BACK) else logging.INFO
        log.log(level, "model %s -> %s: %s", rec.version, rec.state.value, rec.reason)
        self.status_changed = True
        self.drain_outbox()
        return rec

    def record(
        self,
        manifest: Manifest,
        channel: str,
        sequence: int | None,
        source: str,
        reason: str,
        *,
        mark: tuple[str, Any] | None = None,
    ) -> ModelRecord:
        """A new record (announced) with its first event, and `mark` (the channel's handled
        sequence) set in the same commit."""
        with self.store.transaction():
            if mark is not None:
                self.store.set_mark(*mark)
            rec = self.store.add(manifest, channel, sequence, source, reason)
            self._model_event(rec, {})
        return self._recorded(rec)

    def add_rejected(
        self,
        manifest: Manifest,
        channel: str,
        sequence: int | None,
        source: str,
        reason: str,
        *,
        added: str = "announced",
    ) -> ModelRecord:
        """A model refused before it became a candidate (a stale or unsigned announcement, a bad
        dropped file): recorded (`added` says how it came), then rejected with `reason`."""
        with self.store.transaction():
            rec = self.store.add(manifest, channel, sequence, source, added)
            self._model_event(rec, {})  # every transition has its event, the first one too
            rec = self.store.set_state(rec, ModelState.REJECTED, reason)
            self._model_event(rec, {})
        return self._recorded(rec)

    def _model_event(self, rec: ModelRecord, figures: dict[str, Any]) -> None:
        self._queue(
            "model_state",
            model_id=rec.id,
            version=rec.version,
            sha256=rec.sha256,
            state=rec.state.value,
            reason=rec.reason,
            source=rec.source,
            figures=figures,
        )

    # -- events through the outbox ------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> None:
        """An event through the outbox; while the state dir is full it waits in memory (bounded
        like the outbox) and goes into the outbox, in order, once a write succeeds again."""
        payload = encode(new_event(self.cfg.device_id, kind, **fields))
        self.unsaved.append(payload)
        try:
            while self.unsaved:
                self._put(self.unsaved[0])
                self.unsaved.popleft()
        except Exception as err:
            if not durable.no_space(err):
                raise
            log.error("%d events held in memory: the state dir is full (%s)", len(self.unsaved), err)
        self.drain_outbox()

    def _queue(self, kind: str, **fields: Any) -> None:
        self._put(encode(new_event(self.cfg.device_id, kind, **fields)))

    def _put(self, payload: bytes) -> None:
        topic = self.topics.events(self.cfg.device_id)
        dropped = self.store.outbox_put(topic, payload, self.cfg.outbox_max_events)
        if dropped:
            log.warning("outbox full: dropped the %d oldest events", dropped)

    def drain_outbox(self) -> None:
        if not self.link.connected:
            return
        for row_id, topic, payload in self.store.outbox_peek(OUTBOX_BATCH, set(self.inflight.values())):
            mid = self.link.publish(topic, payload, qos=1)
            if mid is None:
                return
            self.inflight[mid] = row_id

    def acknowledged(self, mid: int) -> None:
        row = self.inflight.pop(mid, None)
        if row is not None:
            self.store.outbox_done(row)

    def connection_changed(self) -> None:
        """Unacknowledged events stay in the outbox and go again on the new connection."""
        self.inflight.clear()
        self.status_changed = True

    # -- status and telemetry -----------------------------------------------------------------------
    def publish_status(self, status: dict[str, Any]) -> None:
        self.status_changed = False
        self.link.publish(self.topics.status(self.cfg.device_id), encode(status), retain=True)

    def restart_telemetry(self, interval_s: float) -> None:
        self._next_telemetry = time.monotonic() + interval_s

    def telemetry_if_due(self) -> None:
        """Every telemetry.interval_s: the interval's latency summary and histograms, then the status."""
        if time.monotonic() < self._next_telemetry:
            return
        self._next_telemetry += self.cfg.telemetry.interval_s
        self.server.drain(force=True)
        interval = self.recorder.take_interval()
        model = self.server.model
        payload = {
            "protocol": 1,
            "type": "telemetry",
            "device_id": self.cfg.device_id,
            "ts": now(),
            "interval_s": self.cfg.telemetry.interval_s,
            "interval_start": interval.start,
            "channel": self.cfg.channel,
            "model_version": model.version if model else None,
            **interval.summary.to_json(),
            "histograms": interval.histograms(self.cfg.channel),  # mergeable, per version (docs/protocol.md)
        }
        self.link.publish(self.topics.telemetry(self.cfg.device_id), encode(payload), qos=1)
        self.status_changed = True
