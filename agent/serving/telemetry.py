"""Latency histograms (HdrHistogram: percentiles, not a running average that hides the tail).

The daemon records what the serving process reports; readers take snapshots. One lock, held for a
record or a snapshot."""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 60_000_000, 2


def _hist() -> HdrHistogram:
    h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
    # hdrh's histogram and its encoder point at each other: each histogram the daemon drops (one a
    # status, a 5 s bucket, a telemetry interval, a swap) waited, with its 10 KiB of counts, for a
    # full garbage collection minutes later, hundreds at once in the main heap, which they
    # fragmented (docs/benchmarks.md, the soak). A weak back-reference frees each one when dropped.
    h.encoder.histogram = weakref.proxy(h)
    return h


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int

    def to_json(self) -> dict[str, int]:
        return {
            "count": self.count,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        }


def summarize(h: HdrHistogram) -> LatencySummary:
    if h.get_total_count() == 0:
        return LatencySummary(0, 0, 0, 0, 0)
    return LatencySummary(
        count=h.get_total_count(),
        p50_us=h.get_value_at_percentile(50),
        p90_us=h.get_value_at_percentile(90),
        p99_us=h.get_value_at_percentile(99),
        max_us=h.get_max_value(),
    )


def encoded(h: HdrHistogram) -> str:
    """HdrHistogram's standard compressed encoding, base64 text: any hdrh reader decodes it."""
    text: str = h.encode().decode("ascii")  # hdrh's encode() is base64 already
    return text


@dataclass(frozen=True)
class Interval:
    """The samples since the previous report: all of them, and one histogram per model version
    that served (two when a swap fell inside the interval)."""

    start: float  # wall clock
    summary: LatencySummary
    by_version: dict[str, HdrHistogram]

    def histograms(self, channel: str) -> list[dict[str, Any]]:
        """The telemetry message's `histograms` field (docs/protocol.md)."""
        return [
            {"model_version": v or None, "channel": channel, "count": h.get_total_count(), "hdr": encoded(h)}
            for v, h in sorted(self.by_version.items())
        ]


class LatencyRecorder:
    """Two views of the same samples: since the last report (per model version), and a sliding
    last minute (12 buckets of 5 s)."""

    def __init__(self, window_s: float = 60.0, buckets: int = 12) -> None:
        self._lock = threading.Lock()
        self._interval: dict[str, HdrHistogram] = {}
        self._interval_start = time.monotonic()
        self._bucket_s = window_s / buckets
        self._buckets: deque[tuple[float, HdrHistogram]] = deque(maxlen=buckets)
        self._new_bucket(time.monotonic())

    def _new_bucket(self, t: float) -> None:
        self._buckets.append((t - t % self._bucket_s, _hist()))

    def record(self, us: int, version: str = "") -> None:
        t = time.monotonic()
        with self._lock:
            h = self._interval.get(version)
            if h is None:
                h = self._interval[version] = _hist()
            h.record_value(max(us, _LOWEST_US))
            if t - self._buckets[-1][0] >= self._bucket_s:
                self._new_bucket(t)
            self._buckets[-1][1].record_value(max(us, _LOWEST_US))

    def take_interval(self) -> Interval:
        """The samples since the last call; starts a new interval."""
        with self._lock:
            by_version, self._interval = self._interval, {}
            started, self._interval_start = self._interval_start, time.monotonic()
        # The wall-clock start, from the interval's measured length: a clock stepped inside the
        # interval moves both bounds, never stretches the interval by hours.
        start = time.time() - (self._interval_start - started)
        total = _hist()
        for h in by_version.values():
            total.add(h)
        return Interval(start, summarize(total), by_version)

    def last_minute(self) -> LatencySummary:
        horizon = time.monotonic() - self._bucket_s * self._buckets.maxlen  # type: ignore[operator]
        total = _hist()
        with self._lock:
            for start, h in self._buckets:
                if start >= horizon:
                    total.add(h)
        return summarize(total)
