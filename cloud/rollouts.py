"""Staged rollouts, the pure part: what the canaries did (from their events and status) and what
to do next. No I/O here: cloud/rollout_driver.py reads the database, calls `decide` and acts.

A rollout announces a version to its canaries only. Once every canary runs it, the soak starts
(its deadline stored, wall clock); when the soak is over it is promoted to the whole channel. A
canary that rejects the version or rolls it back halts the rollout at once."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cloud.rolloutdb import CANARY, HALTING, PROMOTING, Rollout

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
    kind: Literal["none", "wait", "soak", "promote", "halt", "redo"]
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


def decide(r: Rollout, seen: Mapping[str, Observed], now: float) -> Action:
    """The next step for rollout `r`, given what its canaries did and the collector's wall clock."""
    if r.state in (PROMOTING, HALTING):
        return Action("redo", f"finishing an interrupted {r.state}") if now - r.updated_at > STALE_S else Action("none")
    if r.state != CANARY:
        return Action("none")
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
