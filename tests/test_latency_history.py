"""The fleet's latency history without services: histograms built with hdrh, stored in the
collector's database, merged, pruned, compared and plotted."""

from __future__ import annotations

import gc
import json
import struct
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from agent.contract.protocol import IntervalHistogram, encode, telemetry_histograms
from agent.errors import AgentError, ConfigError, ProtocolError
from agent.serving.telemetry import LatencyRecorder
from cloud import latency
from cloud.config import load
from cloud.fleetdb import HOUR, RAW, FleetDB
from cloud.retention import prune

T0 = 1_699_999_200.0  # a whole hour
PRECISION = 0.01  # 2 significant digits: a value is known to within 1 %


def hist(samples: np.ndarray) -> HdrHistogram:
    h = HdrHistogram(1, 60_000_000, 2)
    for v in samples:
        h.record_value(int(v))
    return h


def interval(device: str, version: str, samples: np.ndarray, start: float, channel: str = "walk") -> IntervalHistogram:
    h = hist(samples)
    return IntervalHistogram(version, channel, h.get_total_count(), latency.encode(h), start, start + 10)


def store(db: FleetDB, device: str, *histograms: IntervalHistogram) -> None:
    db.put_telemetry(device, {"ts": histograms[0].end, "histograms": "left out of the summary"}, list(histograms))


@pytest.fixture
def db(tmp_path: Path) -> FleetDB:
    return FleetDB(tmp_path / "fleet.db")


def pooled_percentile(samples: np.ndarray, q: float) -> float:
    """HdrHistogram's definition: the smallest sample with at least q % of them at or below it."""
    return float(np.percentile(samples, q, method="inverted_cdf"))


def test_skewed_fleet_merged_percentiles_are_the_pooled_ones_not_the_average(db: FleetDB) -> None:
    rng = np.random.default_rng(11)
    fast = {f"fast-{i}": rng.lognormal(np.log(300), 0.15, 20_000).astype(int) for i in range(9)}
    slow = rng.lognormal(np.log(300), 0.15, 20_000).astype(int)
    slow[rng.random(slow.size) < 0.05] = 40_000  # a robot whose calls sometimes stall
    devices = {**fast, "slow-0": slow}
    for device, samples in devices.items():
        for k, chunk in enumerate(np.array_split(samples, 4)):  # four telemetry intervals each
            store(db, device, interval(device, "v42", chunk, T0 + 10 * k))

    (v42,) = latency.by_version(db.latency_rows())
    everything = np.concatenate(list(devices.values()))
    averaged_p99 = float(np.mean([pooled_percentile(s, 99) for s in devices.values()]))
    print(
        f"p99: averaged per device {averaged_p99:.0f} µs, pooled {pooled_percentile(everything, 99):.0f} µs,"
        f" merged {v42.fleet.p99_us} µs"
    )

    assert v42.fleet.calls == everything.size == sum(p.calls for p in v42.devices.values())
    for key, q in latency.PERCENTILES:
        truth = pooled_percentile(everything, q)
        assert abs(getattr(v42.fleet, key) - truth) <= truth * PRECISION + 1, (key, getattr(v42.fleet, key), truth)
    assert abs(v42.fleet.max_us - everything.max()) <= everything.max() * PRECISION
    # The average of the devices' p99s is off by an order of magnitude: one slow robot pulls it up.
    truth_p99 = pooled_percentile(everything, 99)
    assert averaged_p99 > 5 * truth_p99
    assert abs(v42.devices["slow-0"].p99_us - 40_000) <= 40_000 * PRECISION
    # p99.9 of the fleet does see the stalls (0.5 % of all calls).
    assert abs(v42.fleet.p999_us - 40_000) <= 40_000 * PRECISION


def test_filters_and_duplicates(db: FleetDB) -> None:
    one = interval("a", "v1", np.full(100, 200), T0)
    store(db, "a", one)
    store(db, "a", one)  # QoS 1 delivered it twice: stored once
    store(db, "b", interval("b", "v2", np.full(50, 400), T0), interval("b", "v1", np.full(10, 100), T0))
    assert len(db.latency_rows()) == 3
    assert [r.calls for r in db.latency_rows(device_id="a")] == [100]
    assert {r.device_id for r in db.latency_rows(version="v1")} == {"a", "b"}
    assert db.latency_rows(since=T0 + 10) == [] and len(db.latency_rows(since=T0 + 9)) == 3
    assert db.latency_rows(channel="run") == []
    # the summary row keeps no histogram
    assert "histograms" not in json.loads(db.db.execute("SELECT payload FROM telemetry").fetchone()[0])


def test_compare_on_the_devices_that_ran_both(db: FleetDB) -> None:
    store(db, "a", interval("a", "v41", np.full(1000, 200), T0), interval("a", "v42", np.full(1000, 300), T0))
    store(db, "b", interval("b", "v41", np.full(1000, 400), T0), interval("b", "v42", np.full(3000, 400), T0))
    store(db, "c", interval("c", "v42", np.full(1000, 9000), T0))  # never ran v41: left out

    c = latency.compare(db.latency_rows(), "v41", "v42")
    assert set(c.devices) == {"a", "b"}
    a41, a42 = c.devices["a"]
    assert (a41.p50_us, a42.p50_us) == pytest.approx((200, 300), rel=PRECISION)
    assert latency.ratios(a41, a42)["p50_us"] == pytest.approx(1.5, rel=2 * PRECISION)
    assert c.fleet[0].calls == 2000 and c.fleet[1].calls == 4000  # c's calls are not in it
    assert c.fleet[1].p50_us == pytest.approx(400, rel=PRECISION) and c.fleet[1].max_us < 9000
    assert c.to_json()["devices"][0]["ratio"]["p50_us"] == pytest.approx(1.5, rel=2 * PRECISION)


def test_retention_merges_raw_into_hours_and_keeps_every_sample(db: FleetDB) -> None:
    rng = np.random.default_rng(3)
    samples = [rng.integers(100, 5000, 500) for _ in range(6)]
    for k, s in enumerate(samples):  # six intervals: four in the first hour, two in the next
        store(db, "a", interval("a", "v1", s, T0 + 900 * k))
    before = latency.Percentiles.of_rows(db.latency_rows())
    week, quarter = 7 * 86400.0, 90 * 86400.0

    # Nothing is old enough yet.
    assert prune(db, T0 + 3600, week, quarter).merged == 0
    # A week later the first three intervals are merged into their hour...
    done = prune(db, T0 + week + 2000, week, quarter)
    assert done.merged == 3
    rows = db.latency_rows()
    assert [(r.resolution, r.start, r.calls) for r in rows if r.resolution == HOUR] == [(HOUR, T0, 1500)]
    # ...then the rest: the hour that had a row already gains the fourth interval.
    prune(db, T0 + week + 7300, week, quarter)
    rows = db.latency_rows()
    assert all(r.resolution == HOUR for r in rows)
    assert [(r.start, r.calls) for r in rows] == [(T0, 2000), (T0 + 3600, 1000)]
    assert latency.Percentiles.of_rows(rows) == before  # merging loses no sample and moves no percentile
    assert db.db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 0

    # After the hourly retention the hours go too.
    assert prune(db, T0 + quarter + 3600 + 1, week, quarter).hourly_deleted == 1
    assert [r.start for r in db.latency_rows()] == [T0 + 3600]
    assert all(r.resolution != RAW for r in db.latency_rows())


def test_recorder_keeps_one_histogram_per_version() -> None:
    r = LatencyRecorder()
    for us in (100, 110, 120):
        r.record(us, "v1")
    r.record(900, "v2")  # a swap inside the interval
    taken = r.take_interval()
    assert taken.summary.count == 4 and taken.summary.max_us >= 900
    entries = taken.histograms("walk")
    assert [(e["model_version"], e["channel"], e["count"]) for e in entries] == [("v1", "walk", 3), ("v2", "walk", 1)]
    assert latency.decode(entries[1]["hdr"]).get_max_value() == pytest.approx(900, rel=PRECISION)
    assert r.take_interval().histograms("walk") == []  # a new interval starts empty


def test_histograms_the_recorder_drops_are_freed_without_the_garbage_collector() -> None:
    """hdrh's histogram and its encoder refer to each other: every histogram the daemon dropped
    (one a status, a bucket, an interval, a swap) waited for a full collection with its 10 KiB of
    counts, and the pile fragmented the daemon's heap (the soak, docs/benchmarks.md)."""
    r = LatencyRecorder()
    gc.disable()
    try:
        r.record(120, "v1")
        taken = r.take_interval()
        dropped = [weakref.ref(h) for h in taken.by_version.values()]
        entries = taken.histograms("walk")  # encoding goes through the weak back-reference
        del taken
        assert dropped and all(ref() is None for ref in dropped)
        assert latency.decode(entries[0]["hdr"]).get_total_count() == 1
        assert r.last_minute().count == 1
    finally:
        gc.enable()


def test_telemetry_message_histograms_are_optional_and_checked() -> None:
    old = {"protocol": 1, "type": "telemetry", "ts": T0, "interval_s": 10.0, "count": 0}
    assert telemetry_histograms(old) == []  # an older agent's message
    h = latency.encode(hist(np.full(5, 250)))
    new = {**old, "channel": "walk", "histograms": [{"model_version": "v1", "count": 5, "hdr": h}]}
    (got,) = telemetry_histograms(json.loads(encode(new)))
    assert (got.channel, got.model_version, got.count, got.start, got.end) == ("walk", "v1", 5, T0 - 10, T0)
    assert telemetry_histograms({**new, "interval_start": T0 - 7})[0].start == T0 - 7
    for bad in ([{"count": 5}], [{"hdr": h, "count": -1}], "x", [{"hdr": h, "count": 1, "model_version": "a/b"}]):
        with pytest.raises(ProtocolError):
            telemetry_histograms({**new, "histograms": bad})
    with pytest.raises(ProtocolError):
        latency.decode("bm90IGEgaGlzdG9ncmFt")


def test_collector_refuses_a_histogram_it_could_not_merge(tmp_path: Path) -> None:
    from cloud.collect import Collector

    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[s3]\nbucket = "b"\n[collector]\ndb = "{tmp_path / "fleet.db"}"\n')
    c = Collector(load(cfg))
    topic = c.topics.telemetry("a")
    msg = {"protocol": 1, "type": "telemetry", "ts": T0, "interval_s": 10.0, "count": 5, "channel": "walk"}
    with pytest.raises(ProtocolError):
        c.store(topic, encode({**msg, "histograms": [{"model_version": "v1", "count": 5, "hdr": "bm90IGEgaGlzdG9n"}]}))
    c.store(topic, encode(msg))  # no histograms: stored as before
    good = [{"model_version": "v1", "count": 5, "hdr": latency.encode(hist(np.full(5, 250)))}]
    c.store(topic, encode({**msg, "histograms": good}))
    assert [(r.device_id, r.channel, r.version, r.calls) for r in c.db.latency_rows()] == [("a", "walk", "v1", 5)]
    c.db.close()


@pytest.mark.parametrize(
    ("collector", "key"),
    [
        ('raw_retention = "7 days"', "collector.raw_retention"),
        ('prune_every = "0m"', "collector.prune_every"),
        ('raw_retention = "30d"\nhourly_retention = "7d"', "collector.hourly_retention"),
    ],
)
def test_retention_config_errors_name_the_key(tmp_path: Path, collector: str, key: str) -> None:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[s3]\nbucket = "b"\n[collector]\n{collector}\n')
    with pytest.raises(ConfigError, match=key):
        load(cfg)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_a_real_png_and_svg(db: FleetDB, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from cloud.plot import HEIGHT_PX, WIDTH_PX, plot_latency

    for k in range(30):
        store(db, "a", interval("a", "v1", np.full(100, 200 + k), T0 + 60 * k))
        store(db, "a", interval("a", "v2", np.full(100, 300 + k), T0 + 60 * k))
    series = latency.series(db.latency_rows(), 120)
    assert set(series) == {"v1", "v2"} and len(series["v1"]) == 15
    png = tmp_path / "latency.png"
    plot_latency(series, png, "test")
    assert png_size(png) == (WIDTH_PX, HEIGHT_PX) == (1200, 600)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (600, 1200)
    svg = tmp_path / "latency.svg"
    plot_latency(series, svg, "test")
    assert b"<svg" in svg.read_bytes()[:1000]
    with pytest.raises(AgentError, match=r"\.png or \.svg"):
        plot_latency(series, tmp_path / "latency.gif", "test")


def test_plot_without_matplotlib_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cloud.plot import plot_latency

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it fails
    with pytest.raises(AgentError, match=r"pip install 'edge-agent\[cloud\]'") as err:
        plot_latency({}, tmp_path / "x.png", "test")
    assert "\n" not in str(err.value)
