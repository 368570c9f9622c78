"""What the dashboard shows, as JSON-ready data: read from the collector's database, percentiles
from cloud.latency's merged histograms (the figures `fleet latency` prints)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from cloud import latency
from cloud.fleetdb import FleetDB, LatencyRow
from cloud.rolloutdb import Rollout

SPARK_WINDOW_S = 3600.0  # the overview's sparklines: the last hour ...
SPARK_BIN_S = 60.0  # ... one point a minute
CHART_POINTS, CHART_MIN_BIN_S = 60, 10.0  # the device page's chart
STAGED_SHOWN = 5  # a channel's newest staged rollouts
_PRIVATE = ("sign_key",)  # a path on the publisher's machine: not the dashboard's to show


def devices(db: FleetDB, device_id: str | None = None) -> list[dict[str, Any]]:
    """One row per device, as `fleet status --json`, with the pending model's progress (0..1)."""
    rows = db.devices(device_id)
    for r in rows:
        p = r["pending"]
        if p:
            total = p.get("total_bytes") or 0
            p["progress"] = round(min(1.0, (p.get("downloaded_bytes") or 0) / total), 3) if total else None
    return rows


def rollouts(rows: list[dict[str, Any]], staged: list[Rollout]) -> list[dict[str, Any]]:
    """Per channel, which devices run which version, which are fetching or checking one, and which
    rejected one (from the devices' last status); and its newest staged rollouts, with their state
    and why (from the rollouts table)."""
    channels: dict[str, dict[str, dict[str, list[str]]]] = defaultdict(
        lambda: {"active": defaultdict(list), "pending": defaultdict(list), "rejected": defaultdict(list)}
    )
    for r in rows:
        c = channels[r["channel"] or ""]
        c["active"][r["active_version"] or ""].append(r["device_id"])
        if r["pending"]:
            c["pending"][r["pending"]["version"]].append(r["device_id"])
        if r["last_rejected"]:
            c["rejected"][r["last_rejected"]["version"]].append(r["device_id"])
    newest: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ro in sorted(staged, key=lambda ro: ro.created_at, reverse=True):
        if len(newest[ro.channel]) < STAGED_SHOWN:
            newest[ro.channel].append({k: v for k, v in ro.to_json().items() if k not in _PRIVATE})
    return [
        {
            "channel": name or None,
            "devices": sum(len(d) for d in channels[name]["active"].values()),
            **{
                kind: [{"version": v or None, "devices": d} for v, d in sorted(per_version.items())]
                for kind, per_version in channels[name].items()
            },
            "staged": newest[name],
        }
        for name in sorted(set(channels) | set(newest))  # a channel with rollouts and no device yet too
    ]


def latency_report(
    db: FleetDB, since_s: float, channel: str | None, version: str | None, device_id: str | None
) -> dict[str, Any]:
    """What `fleet latency --json` prints, for the same filters."""
    since = time.time() - since_s
    rows = db.latency_rows(since=since, channel=channel, version=version, device_id=device_id)
    return {"since": since, "versions": [g.to_json() for g in latency.by_version(rows)]}


def sparklines(db: FleetDB, now: float) -> dict[str, list[tuple[float, int]]]:
    """Per device, its p99 (all versions merged) each minute of the last hour."""
    per_device: dict[str, list[LatencyRow]] = defaultdict(list)
    for r in db.latency_rows(since=now - SPARK_WINDOW_S):
        per_device[r.device_id].append(r)
    return {d: [(t, p.p99_us) for t, p in latency.timeline(rs, SPARK_BIN_S)] for d, rs in per_device.items()}


def device_series(db: FleetDB, device_id: str, since_s: float) -> dict[str, list[tuple[float, latency.Percentiles]]]:
    """One device's p50/p99 over time per version, in about 60 slices of the time it has history
    for in the window (a slice no shorter than a telemetry interval's default, 10 s)."""
    now = time.time()
    rows = db.latency_rows(since=now - since_s, device_id=device_id)
    span = now - min((r.start for r in rows), default=now)
    return latency.series(rows, max(CHART_MIN_BIN_S, span / CHART_POINTS))
