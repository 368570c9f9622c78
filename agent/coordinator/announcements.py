"""Announcements from the channel, on the coordinator thread: decoded and checked (topic, channel,
signature), then sequenced. A device acts on an announcement only if its sequence is newer than
the last one it handled on that channel: a replayed or reordered one is rejected as stale, a
redelivered one ignored. While the device is pinned, the newest is deferred until `agent unpin`.
An announcement whose `targets` leave this device out (a rollout's canaries) is not acted on: its
sequence is taken and a `not_targeted` event says so, and nothing is downloaded."""

from __future__ import annotations

import logging
from typing import Any

from agent.config import AgentConfig
from agent.contract.protocol import Announcement, Topics, decode
from agent.contract.signing import Trust
from agent.coordinator.activation import Activation
from agent.coordinator.pipeline import Candidate
from agent.coordinator.reporter import Reporter
from agent.coordinator.scheduler import CandidateScheduler
from agent.coordinator.store import Store
from agent.errors import ProtocolError, SignatureRejected

log = logging.getLogger(__name__)


class Announcements:
    def __init__(
        self,
        *,
        cfg: AgentConfig,
        store: Store,
        reporter: Reporter,
        scheduler: CandidateScheduler,
        activation: Activation,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.reporter = reporter
        self.scheduler = scheduler
        self.activation = activation
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.trust = Trust(cfg.security.trusted_keys)
        self.ignored_payloads = 0
        self.last_ignored = ""

    def subscription(self) -> str:
        return self.topics.announce(self.cfg.channel)

    def received(self, topic: str, payload: bytes) -> None:
        try:
            raw = decode(payload, "announcement")
            ann = Announcement.from_json(raw)
            if ann.channel != self.cfg.channel or topic != self.topics.announce(ann.channel):
                raise ProtocolError(f"announcement for channel {ann.channel!r} on topic {topic}")
        except ProtocolError as err:
            self.ignored_payloads += 1
            self.last_ignored = f"{topic}: {err}"
            log.warning("ignored a payload on %s: %s", topic, err)
            self.reporter.emit("payload_ignored", topic=topic, reason=str(err))
            return
        if not self._signed(raw, ann):
            return
        self.handle(ann)

    def _signed(self, raw: dict[str, Any], ann: Announcement) -> bool:
        """False when a required signature is missing or wrong: the announcement is then recorded
        as a rejected model, and its sequence is not taken."""
        try:
            self.trust.check(raw)
        except SignatureRejected as err:
            self.reporter.add_rejected(ann.manifest, ann.channel, ann.sequence, "channel", str(err))
            return False
        return True

    def handle(self, ann: Announcement) -> None:
        mark = f"seq:{ann.channel}"
        last = self.store.mark(mark)
        if not ann.targets_device(self.cfg.device_id):
            self._not_targeted(ann, mark, last)
            return
        pinned = self.activation.pinned
        if pinned and (last if last is not None else -1) < ann.sequence:
            self.store.set_mark(self._deferred_mark, ann.to_json())
            self.reporter.emit(
                "announcement_deferred",
                version=ann.manifest.version,
                sequence=ann.sequence,
                reason=f"pinned to {pinned}; `agent unpin` follows the channel again",
            )
            return
        if last is not None and ann.sequence == last:
            log.debug("announcement %d already handled", ann.sequence)
            return
        if last is not None and ann.sequence < last:
            why = f"stale announcement: sequence {ann.sequence} is older than the last handled ({last})"
            self.reporter.add_rejected(ann.manifest, ann.channel, ann.sequence, "channel", why)
            return
        why = f"announced on {ann.channel} (sequence {ann.sequence})"
        rec = self.reporter.record(ann.manifest, ann.channel, ann.sequence, "channel", why, mark=(mark, ann.sequence))
        self.scheduler.schedule(Candidate(rec.id, ann.manifest, "channel"))

    def _not_targeted(self, ann: Announcement, mark: str, last: int | None) -> None:
        """Once per sequence (a retained announcement comes again on each reconnect)."""
        if last is not None and ann.sequence <= last:
            return
        self.store.set_mark(mark, ann.sequence)
        targets = ann.targets or ()
        self.reporter.emit(
            "not_targeted",
            version=ann.manifest.version,
            sequence=ann.sequence,
            reason=f"announced on {ann.channel} for {len(targets)} other device(s) only",
        )

    @property
    def _deferred_mark(self) -> str:
        return f"deferred:{self.cfg.channel}"

    def deferred_version(self) -> str | None:
        """The announcement held back while pinned, for `agent status`."""
        deferred = self.store.mark(self._deferred_mark) or {}
        version = deferred.get("manifest", {}).get("version")
        return str(version) if version else None

    def catch_up(self) -> None:
        """After `agent unpin`: the announcement deferred meanwhile, if any."""
        deferred = self.store.mark(self._deferred_mark)
        if deferred is not None:
            self.store.set_mark(self._deferred_mark, None)
            self.handle(Announcement.from_json(deferred))
