"""Staged rollouts, the side effects: start one (publish to the canaries, record it), drive the
open ones (`fleet collect` calls `tick` every second), promote or halt one (also by hand).

Before it acts, the driver reads the channel's last announcement from S3: one that is none of the
rollout's own supersedes the rollout (whoever sent it, with or without access to this database).

Each change is claimed in the database before it is announced and marked done after: a process
that dies in between leaves the rollout `promoting` or `halting`, and the collector finishes it
after rollouts.STALE_S (announcing once more is harmless: a newer sequence of the same model)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from agent.contract.protocol import Announcement
from agent.delivery.s3_fetch import s3_client
from agent.errors import AgentError, PublishError
from cloud.config import FleetConfig
from cloud.fleetdb import FleetDB, open_existing
from cloud.publish import announce_version, current_version, latest_announcement
from cloud.rolloutdb import CANARY, HALTED, HALTING, PROMOTED, PROMOTING, SUPERSEDED, Rollout, RolloutDB
from cloud.rollouts import Observed, decide, observe, own, pick_canaries, supersedable, superseded_by

log = logging.getLogger(__name__)


def open_db(cfg: FleetConfig) -> FleetDB:
    return open_existing(cfg.collector.database)


def choose_canaries(
    cfg: FleetConfig,
    db: FleetDB,
    channel: str,
    version: str,
    *,
    canary: list[str] | None,
    fraction: float | None,
    target: list[str] | None,
) -> list[str]:
    """The named canaries, the target groups' devices, and a fraction of the groups' devices (or
    of the channel's devices the collector knows)."""
    unknown = [g for g in target or () if g not in cfg.device_groups]
    if unknown:
        known = ", ".join(sorted(cfg.device_groups)) or "none"
        raise PublishError(f"no device group {unknown[0]!r} in the fleet config's [device_groups] (known: {known})")
    grouped = sorted({d for g in target or () for d in cfg.device_groups[g]})
    chosen = set(canary or ())
    if fraction is None:
        chosen |= set(grouped)
    else:
        pool = grouped if target else [d["device_id"] for d in db.devices() if d["channel"] == channel]
        try:
            chosen |= set(pick_canaries(pool, fraction, version))
        except ValueError as err:
            raise PublishError(str(err)) from None
    if not chosen:
        raise PublishError(f"no canary: no device known on channel {channel!r} (is `fleet collect` running?)")
    return sorted(chosen)


def start(
    cfg: FleetConfig,
    db: FleetDB,
    *,
    channel: str,
    publish: Callable[[list[str]], Announcement],
    canaries: list[str],
    soak_s: float,
    sign_key: Path | None,
) -> tuple[Announcement, str]:
    """Announce to the canaries (`publish(targets)`) and record the rollout, superseding the
    channel's older ones (even one of the same version and canaries); (announcement, id)."""
    previous = current_version(cfg, channel)
    ann = publish(canaries)
    rdb = RolloutDB(db)
    now = time.time()
    rollout = Rollout(
        id=rdb.free_id(f"{ann.channel}-{ann.manifest.version}"[:56]),
        channel=ann.channel,
        version=ann.manifest.version,
        sha256=ann.manifest.sha256,
        previous_version=previous if previous != ann.manifest.version else None,
        canaries=tuple(canaries),
        soak_s=soak_s,
        sign_key=None if sign_key is None else str(sign_key.resolve()),
        state=CANARY,
        reason=f"announced to {', '.join(canaries)}",
        created_at=now,
        soak_until=None,
        updated_at=now,
    )
    rdb.add(rollout)
    for older in rdb.all(open_only=True):
        if older.channel == rollout.channel and older.id != rollout.id and supersedable(older, now):
            rdb.claim(older, SUPERSEDED, superseded_by(ann.to_json()), now)
    return ann, rollout.id


class Driver:
    """Drives rollouts on one database connection; `lock` guards it (the collector's MQTT thread
    shares it)."""

    def __init__(self, cfg: FleetConfig, db: FleetDB, lock: AbstractContextManager[object] | None = None) -> None:
        self.cfg = cfg
        self.rdb = RolloutDB(db)
        self.lock = lock if lock is not None else threading.Lock()
        self._s3: Any = None  # one client for the reads of every tick

    def latest(self, channel: str) -> dict[str, Any] | None:
        """The channel's last announcement, read from S3 now."""
        if self._s3 is None:
            self._s3 = s3_client(self.cfg.s3.endpoint_url, self.cfg.s3.region)
        return latest_announcement(self.cfg, channel, self._s3)

    def observed(self, r: Rollout) -> dict[str, Observed]:
        with self.lock:
            events = self.rdb.events_of(r.canaries, r.created_at)
            active = self.rdb.active_of(r.canaries)
        return observe(r, events, active)

    def tick(self, now: float | None = None) -> None:
        with self.lock:
            rollouts = self.rdb.all(open_only=True)
        latest: dict[str, dict[str, Any] | None] = {}  # per channel, read once a tick
        for r in rollouts:
            try:
                if r.channel not in latest:
                    latest[r.channel] = self.latest(r.channel)
                self.step(r, time.time() if now is None else now, latest[r.channel])
            except AgentError as err:  # the broker or S3 unreachable: the next tick tries again
                log.warning("rollout %s: %s", r.id, err)
            except Exception:  # S3's errors too (botocore's): the collector keeps collecting
                log.exception("rollout %s: the step failed; trying again", r.id)

    def step(self, r: Rollout, now: float, latest: dict[str, Any] | None) -> None:
        action = decide(r, self.observed(r), now, latest)
        if action.kind == "supersede":
            self._supersede(r, action.reason, now)
        elif action.kind == "wait" and action.reason != r.reason:
            with self.lock:
                self.rdb.set_reason(r.id, action.reason)
        elif action.kind == "soak" and action.until is not None:
            log.info("rollout %s: %s", r.id, action.reason)
            with self.lock:
                self.rdb.set_soak_until(r.id, action.until, action.reason)
        elif action.kind == "promote":
            self.promote(r, action.reason, now)
        elif action.kind == "halt":
            self.halt(r, action.reason, now)
        elif action.kind == "redo":
            self._finish(r, r.state, r.reason, now)

    def promote(self, r: Rollout, reason: str, now: float | None = None) -> bool:
        """Announce `r`'s version to the whole channel; False when `r` was no longer a canary, or
        is superseded now."""
        now = time.time() if now is None else now
        return r.state == CANARY and self._current(r, now) and self._finish(r, PROMOTING, reason, now)

    def halt(self, r: Rollout, reason: str, now: float | None = None) -> bool:
        """Tell the canaries to roll back to the previous version; False when `r` was no longer a
        canary, or is superseded now."""
        now = time.time() if now is None else now
        return r.state == CANARY and self._current(r, now) and self._finish(r, HALTING, reason, now)

    def _current(self, r: Rollout, now: float) -> bool:
        """Whether `r` still owns the channel's last announcement (read now, just before acting);
        if not, it is superseded."""
        latest = self.latest(r.channel)
        if latest is None or own(r, latest):
            return True
        self._supersede(r, superseded_by(latest), now)
        return False

    def _supersede(self, r: Rollout, reason: str, now: float) -> None:
        with self.lock:
            if self.rdb.claim(r, SUPERSEDED, reason, now):
                log.info("rollout %s: %s", r.id, reason)

    def _finish(self, r: Rollout, state: str, reason: str, now: float) -> bool:
        with self.lock:
            if not self.rdb.claim(r, state, reason, now):
                return False
        claimed = dataclasses.replace(r, state=state, reason=reason, updated_at=now)
        log.info("rollout %s: %s (%s)", r.id, state, reason)
        key = None if r.sign_key is None else Path(r.sign_key)
        if state == PROMOTING:
            announce_version(self.cfg, r.channel, r.version, key)
            done = PROMOTED
        elif r.previous_version is not None:
            announce_version(self.cfg, r.channel, r.previous_version, key, targets=list(r.canaries))
            done, reason = HALTED, f"{reason}; canaries told to roll back to {r.previous_version}"
        else:
            done, reason = HALTED, f"{reason}; no earlier version on {r.channel} to roll back to"
        with self.lock:
            self.rdb.claim(claimed, done, reason, time.time())
        return True
