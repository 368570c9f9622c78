"""The latency history's retention: raw intervals older than the raw retention are merged into
one row per device, channel, version and hour; hourly rows older than theirs are deleted. Each
sample stays in exactly one row, so a query merges whatever rows its window holds."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from cloud.fleetdb import HOUR, RAW, FleetDB, LatencyRow
from cloud.latency import encode, merge

HOUR_S = 3600.0


@dataclass(frozen=True)
class Pruned:
    merged: int  # raw rows folded into hourly rows
    hourly_deleted: int
    telemetry_deleted: int


def prune(db: FleetDB, now: float, raw_keep_s: float, hourly_keep_s: float) -> Pruned:
    """One transaction: a crash leaves the history as it was, or pruned."""
    cutoff = now - raw_keep_s
    with db.transaction():
        old = db.latency_rows(before=cutoff, resolution=RAW)
        for key, rows in _by_hour(old).items():
            _fold(db, key, rows)
        db.delete_latency(RAW, cutoff)
        hourly = db.delete_latency(HOUR, now - hourly_keep_s)
        telemetry = db.delete_telemetry(cutoff)  # the per-message summaries follow the raw retention
    return Pruned(len(old), hourly, telemetry)


_Key = tuple[str, str, str, float]  # device, channel, version, hour start


def _by_hour(rows: list[LatencyRow]) -> dict[_Key, list[LatencyRow]]:
    groups: dict[_Key, list[LatencyRow]] = defaultdict(list)
    for r in rows:
        groups[(r.device_id, r.channel, r.version, r.start - r.start % HOUR_S)].append(r)
    return groups


def _fold(db: FleetDB, key: _Key, rows: list[LatencyRow]) -> None:
    """Add `rows` to their hour's row (made when it is the hour's first)."""
    device, channel, version, hour = key
    existing = db.latency_rows(channel=channel, version=version, device_id=device, resolution=HOUR)
    same_hour = [r for r in existing if r.start == hour]
    merged = merge(r.hdr for r in [*same_hour, *rows])
    assert merged is not None
    total = LatencyRow(
        device, channel, version, HOUR, hour, hour + HOUR_S, int(merged.get_total_count()), encode(merged)
    )
    db.put_latency(total, replace=True)
