"""Staged rollouts, the pure part: what the canaries did (from their events and status) and what
to do next. No I/O here: cloud/rollout_driver.py reads the database, calls `decide` and acts.

A rollout announces a version to its canaries only. Once every canary runs it, the soak starts
(its deadline stored, wall clock); when the soak is over it is promoted to the whole channel. A
canary that rejects the version or rolls it back halts the rollout at once. A newer announcement
on the channel that is none of the rollout's own (a publish to the whole channel, a rollback,
another rollout's canaries) supersedes it: it neither promotes nor halts after that."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cloud.rolloutdb import CANARY, HALTING, OPEN, PROMOTING, Rollout

STALE_S = 60.0  # a promotion or halt claimed this long ago and not finished was interrupted: redo it
FAILED_STATES = ("rejected", "rolled_back")


@dataclass(frozen=True)
class Observed:
    """One canary, as the collector saw it since the rollout began."""

    active: bool = False  # it runs the rollout's model
    failed: str | None = None  # "rejected: <its reason>" or "rolled_back: <its reason>"
    left: str | None = None  # "retired: <its reason>": it ran the model, and another one replaced it

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active, "failed": self.failed, "left": self.left}


@dataclass(frozen=True)
class Action:
    kind: Literal["none", "wait", "soak", "promote", "halt", "redo", "supersede"]
    reason: str = ""
    until: float | None = None  # for "soak": the wall-clock deadline


def observe(r: Rollout, events: Iterable[Mapping[str, Any]], active: Mapping[str, str | None]) -> dict[str, Observed]:
    """Each canary's state from its `model_state` events (oldest first) about the rollout's model
    and the active model its status reports. A canary moved off the model without a rollback
    (`agent activate`/`pin` of another version, a newer announcement) no longer counts as running
    it, unless its status says it does (the same model recorded again retires its first record)."""
    seen = {d: Observed(active=active.get(d) == r.sha256) for d in r.canaries}
    for e in events:
        device = e.get("device_id")
        if device not in seen or e.get("sha256") != r.sha256 or seen[device].failed:
            continue
        state, why = e.get("state"), e.get("reason") or "no reason given"
        if state in FAILED_STATES:
            seen[device] = Observed(active=False, failed=f"{state}: {why}")
        elif state == "active":
            seen[device] = Observed(active=True)
        elif state == "retired" and active.get(device) != r.sha256:
            seen[device] = Observed(active=False, left=f"retired: {why}")
    return seen


def supersedable(r: Rollout, now: float) -> bool:
    """A canary rollout, or a promotion or halt that was interrupted (not one in progress)."""
    return r.state == CANARY or (r.state in OPEN and now - r.updated_at > STALE_S)


def own(r: Rollout, ann: Mapping[str, Any]) -> bool:
    """Whether announcement `ann` (its JSON) is one `r` sends in its state: the canaries', and
    once claimed, the promotion or the canaries' rollback."""
    manifest, targets = ann.get("manifest") or {}, ann.get("targets")
    to_canaries = targets is not None and sorted(targets) == sorted(r.canaries)
    if manifest.get("sha256") == r.sha256 and (to_canaries or (targets is None and r.state == PROMOTING)):
        return True
    return r.state == HALTING and to_canaries and manifest.get("version") == r.previous_version


def superseded_by(ann: Mapping[str, Any]) -> str:
    targets = ann.get("targets")
    to = "the whole channel" if targets is None else ", ".join(targets)
    version = (ann.get("manifest") or {}).get("version")
    return f"superseded by {version} (announcement {ann.get('sequence')} to {to})"


def decide(r: Rollout, seen: Mapping[str, Observed], now: float, latest: Mapping[str, Any] | None = None) -> Action:
    """The next step for rollout `r`, given what its canaries did, the channel's last announcement
    (`latest`, its JSON; None: not known) and the collector's wall clock."""
    if not supersedable(r, now):
        return Action("none")
    if latest is not None and not own(r, latest):
        return Action("supersede", superseded_by(latest))
    if r.state != CANARY:
        return Action("redo", f"finishing an interrupted {r.state}")
    for device in r.canaries:
        failed = seen.get(device, Observed()).failed
        if failed:
            return Action("halt", f"canary {device} {failed}")
    waiting = [d for d in r.canaries if not seen.get(d, Observed()).active]
    if waiting:
        left = "; ".join(f"{d} left it: {o.left}" for d in waiting if (o := seen.get(d, Observed())).left)
        why = f"waiting for {', '.join(waiting)} to activate {r.version}"
        return Action("wait", f"{why} ({left})" if left else why)
    if r.soak_until is None:
        return Action("soak", f"every canary runs {r.version}: soaking {r.soak_s:g} s", until=now + r.soak_s)
    if now >= r.soak_until:
        return Action("promote", f"every canary ran {r.version} for {r.soak_s:g} s without a rejection or rollback")
    return Action("wait", f"soaking until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(r.soak_until))}")


def pick_canaries(devices: Iterable[str], fraction: float, version: str) -> list[str]:
    """ceil(fraction x devices) of them (at least one), a different draw per version but the same
    on every call: ordered by a hash of version and device id."""
    if not 0 < fraction <= 1:
        raise ValueError(f"canary fraction {fraction!r} must be in (0, 1]")
    pool = sorted(set(devices), key=lambda d: hashlib.sha256(f"{version}/{d}".encode()).hexdigest())
    return sorted(pool[: max(1, math.ceil(fraction * len(pool)))]) if pool else []
