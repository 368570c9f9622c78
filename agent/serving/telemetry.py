"""Latency histograms (HdrHistogram: percentiles, not a running average that hides the tail).

The daemon records what the serving process reports; readers take snapshots. One lock, held for a
record or a snapshot."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 60_000_000, 2


def _hist() -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)


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


class LatencyRecorder:
    """Two views of the same samples: since the last report, and a sliding last minute
    (12 buckets of 5 s)."""

    def __init__(self, window_s: float = 60.0, buckets: int = 12) -> None:
        self._lock = threading.Lock()
        self._interval = _hist()
        self._bucket_s = window_s / buckets
        self._buckets: deque[tuple[float, HdrHistogram]] = deque(maxlen=buckets)
        self._new_bucket(time.monotonic())

    def _new_bucket(self, t: float) -> None:
        self._buckets.append((t - t % self._bucket_s, _hist()))

    def record(self, us: int) -> None:
        t = time.monotonic()
        with self._lock:
            self._interval.record_value(max(us, _LOWEST_US))
            if t - self._buckets[-1][0] >= self._bucket_s:
                self._new_bucket(t)
            self._buckets[-1][1].record_value(max(us, _LOWEST_US))

    def take_interval(self) -> LatencySummary:
        """Summary of the samples since the last call; starts a new interval."""
        with self._lock:
            h, self._interval = self._interval, _hist()
        return summarize(h)

    def last_minute(self) -> LatencySummary:
        horizon = time.monotonic() - self._bucket_s * self._buckets.maxlen  # type: ignore[operator]
        total = _hist()
        with self._lock:
            for start, h in self._buckets:
                if start >= horizon:
                    total.add(h)
        return summarize(total)
