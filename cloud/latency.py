"""Fleet latency from the collector's history: histograms merged with hdrh, then the percentiles.

Merging first is what makes a fleet figure exact: the p99 of a fleet is the p99 of every call it
served (to the histogram's precision), not an average of each device's p99, which a few slow
devices or many idle ones would skew."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from hdrh.codec import HdrCookieException, HdrHistogramSettingsException, HdrLengthException
from hdrh.histogram import HdrHistogram

from agent.errors import ProtocolError
from cloud.fleetdb import LatencyRow

PERCENTILES = (("p50_us", 50.0), ("p90_us", 90.0), ("p99_us", 99.0), ("p999_us", 99.9))


def decode(hdr: str) -> HdrHistogram:
    """A histogram from its compressed base64 encoding; ProtocolError for anything else."""
    try:
        h = HdrHistogram.decode(hdr.encode("ascii"))
    except (
        HdrCookieException,
        HdrHistogramSettingsException,
        HdrLengthException,
        ValueError,  # binascii.Error, UnicodeError
        zlib.error,
        IndexError,
    ) as err:
        raise ProtocolError(f"not an HdrHistogram encoding: {err}") from err
    if h is None:
        raise ProtocolError("not an HdrHistogram encoding")
    return h


def encode(h: HdrHistogram) -> str:
    text: str = h.encode().decode("ascii")  # hdrh's encode() is base64 already
    return text


def merge(hdrs: Iterable[str]) -> HdrHistogram | None:
    """One histogram of every sample in `hdrs`; None when there are none."""
    total: HdrHistogram | None = None
    for hdr in hdrs:
        h = decode(hdr)
        if total is None:
            total = h
        else:
            total.add(h)
    return total


@dataclass(frozen=True)
class Percentiles:
    calls: int
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int

    @staticmethod
    def of(h: HdrHistogram | None) -> Percentiles:
        if h is None or h.get_total_count() == 0:
            return Percentiles(0, 0, 0, 0, 0, 0)
        p50, p90, p99, p999 = (int(h.get_value_at_percentile(q)) for _, q in PERCENTILES)
        return Percentiles(int(h.get_total_count()), p50, p90, p99, p999, int(h.get_max_value()))

    @staticmethod
    def of_rows(rows: Iterable[LatencyRow]) -> Percentiles:
        return Percentiles.of(merge(r.hdr for r in rows))

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class VersionLatency:
    """One version's fleet figures (all its devices' samples merged) and each device's."""

    channel: str
    version: str
    fleet: Percentiles
    devices: dict[str, Percentiles] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "version": self.version,
            **self.fleet.to_json(),
            "devices": [{"device_id": d, **p.to_json()} for d, p in sorted(self.devices.items())],
        }


def by_version(rows: Iterable[LatencyRow]) -> list[VersionLatency]:
    groups: dict[tuple[str, str], dict[str, list[LatencyRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.channel, r.version)][r.device_id].append(r)
    return [
        VersionLatency(
            channel,
            version,
            Percentiles.of_rows(r for device_rows in per_device.values() for r in device_rows),
            {device: Percentiles.of_rows(device_rows) for device, device_rows in per_device.items()},
        )
        for (channel, version), per_device in sorted(groups.items())
    ]


@dataclass(frozen=True)
class Comparison:
    """Two versions on the devices that ran both: per device and merged over those devices."""

    old: str
    new: str
    fleet: tuple[Percentiles, Percentiles]
    devices: dict[str, tuple[Percentiles, Percentiles]]

    def to_json(self) -> dict[str, Any]:
        def side_by_side(a: Percentiles, b: Percentiles) -> dict[str, Any]:
            return {self.old: a.to_json(), self.new: b.to_json(), "ratio": ratios(a, b)}

        return {
            "old": self.old,
            "new": self.new,
            "fleet": side_by_side(*self.fleet),
            "devices": [{"device_id": d, **side_by_side(*pair)} for d, pair in sorted(self.devices.items())],
        }


def ratios(a: Percentiles, b: Percentiles) -> dict[str, float | None]:
    """b / a for each percentile (above 1: b is slower); None where a has nothing."""
    return {k: (getattr(b, k) / getattr(a, k) if getattr(a, k) else None) for k, _ in PERCENTILES} | {
        "max_us": b.max_us / a.max_us if a.max_us else None
    }


def compare(rows: Iterable[LatencyRow], old: str, new: str) -> Comparison:
    per: dict[str, dict[str, list[LatencyRow]]] = {old: defaultdict(list), new: defaultdict(list)}
    for r in rows:
        if r.version in per:
            per[r.version][r.device_id].append(r)
    both = sorted(set(per[old]) & set(per[new]))
    devices = {d: (Percentiles.of_rows(per[old][d]), Percentiles.of_rows(per[new][d])) for d in both}
    fleet = tuple(Percentiles.of_rows(r for d in both for r in per[v][d]) for v in (old, new))
    return Comparison(old, new, (fleet[0], fleet[1]), devices)


def series(rows: Iterable[LatencyRow], bin_s: float) -> dict[str, list[tuple[float, Percentiles]]]:
    """Per version ('channel/version' when several channels share a name), the merged
    percentiles of each `bin_s` slice of time, by the rows' start: for plotting."""
    rows = list(rows)
    several_channels = len({r.channel for r in rows}) > 1
    per_version: dict[str, list[LatencyRow]] = defaultdict(list)
    for r in rows:
        name = f"{r.channel}/{r.version}" if several_channels else r.version
        per_version[name or "-"].append(r)
    return {name: timeline(version_rows, bin_s) for name, version_rows in sorted(per_version.items())}


def timeline(rows: Iterable[LatencyRow], bin_s: float) -> list[tuple[float, Percentiles]]:
    """The merged percentiles of each `bin_s` slice of time (by the rows' start), at its middle."""
    bins: dict[float, list[LatencyRow]] = defaultdict(list)
    for r in rows:
        bins[r.start - r.start % bin_s].append(r)
    return [(t + bin_s / 2, Percentiles.of_rows(rs)) for t, rs in sorted(bins.items())]
