"""The collector's database on PostgreSQL (a real server, scripts/loopback/postgres.py) with the
same semantics as on SQLite: the same checks run against both, then `fleet collect` and
`fleet status` end to end on PostgreSQL with simulated devices over real mosquitto."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract.protocol import IntervalHistogram, Topics
from cloud.fleetdb import HOUR, RAW, FleetDB, LatencyRow
from cloud.ingest import Parsed, parse, store
from cloud.retention import prune
from cloud.rolloutdb import CANARY, PROMOTING, Rollout, RolloutDB
from scripts.fleet_sim import Simulator, sample_histograms
from scripts.loopback.postgres import PostgreSQL
from tests.conftest import Fleet, wait_for

T0 = 1_699_999_200.0


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "fleet.db"
    server: PostgreSQL = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def db(target: Path | str) -> Iterator[FleetDB]:
    d = FleetDB(target)
    yield d
    d.close()


def event(i: int, ts: float = T0) -> dict[str, object]:
    return {"protocol": 1, "type": "event", "id": f"e{i}", "kind": "model_state", "ts": ts + i, "state": "active"}


def test_status_merges_and_events_are_stored_once(db: FleetDB) -> None:
    db.put_status("go2-01", {"online": True, "channel": "walk", "active": {"version": "v1", "sha256": "a"}})
    db.put_status("go2-01", {"online": False})  # offline keeps what the device said before
    assert db.put_event("go2-01", event(1)) is True
    assert db.put_event("go2-01", event(1)) is False  # a QoS 1 duplicate
    assert db.put_event("go2-01", event(2)) is True
    (row,) = db.devices()
    assert (row["device_id"], row["online"], row["channel"], row["active_version"]) == ("go2-01", False, "walk", "v1")
    assert [e["id"] for e in db.events()] == ["e1", "e2"]
    assert [e["id"] for e in db.events("go2-01", limit=1)] == ["e2"]
    assert RolloutDB(db).active_of(("go2-01", "nobody")) == {"go2-01": "a"}
    assert [e["id"] for e in RolloutDB(db).events_of(("go2-01",), 0)] == ["e1", "e2"]


def test_telemetry_and_latency_rows_are_stored_once_and_pruned(db: FleetDB) -> None:
    hdr = sample_histograms(1)[0][0]["hdr"]
    h = IntervalHistogram("v1", "walk", 200, hdr, T0, T0 + 10)
    report = {"ts": T0 + 10, "p50_us": 400, "p99_us": 700, "count": 200}
    for _ in range(2):  # delivered twice
        with db.transaction():
            db.put_telemetry("go2-01", report, [h])
    rows = db.latency_rows()
    assert [(r.device_id, r.version, r.resolution, r.start, r.calls) for r in rows] == [("go2-01", "v1", RAW, T0, 200)]
    assert db.devices()[0]["latency_p99_us"] == 700
    assert db.db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 1
    done = prune(db, T0 + 10 * 86400, raw_keep_s=86400, hourly_keep_s=90 * 86400)
    assert done.merged == 1
    assert [(r.resolution, r.start, r.calls) for r in db.latency_rows()] == [(HOUR, T0, 200)]
    db.put_latency(LatencyRow("go2-01", "walk", "v1", HOUR, T0, T0 + 3600, 5, hdr), replace=True)
    assert [r.calls for r in db.latency_rows()] == [5]


def test_a_batch_is_stored_once_whatever_arrives_twice(db: FleetDB) -> None:
    topics = Topics("edge")
    hdr = sample_histograms(1)[0][0]["hdr"]

    def telemetry(ts: float, p99: int) -> Parsed:
        report = {"ts": ts, "p50_us": 400, "p99_us": p99, "count": 200}
        return Parsed("go2-01", "telemetry", report, [IntervalHistogram("v1", "walk", 200, hdr, ts - 10, ts)])

    status = {"online": True, "channel": "walk", "active": {"version": "v1"}, "pending": {"version": "v2"}}
    rejected = {"last_rejected": {"version": "v0", "reason": "gate: NaN in the outputs"}}
    batch = [
        Parsed("go2-01", "status", status, []),
        Parsed("go2-01", "events", event(1), []),
        Parsed("go2-01", "events", event(1), []),  # twice in one batch
        telemetry(T0 + 10, 700),
        telemetry(T0 + 20, 900),  # the device's last report: the overview shows it
        Parsed("go2-02", "status", {"online": True, **rejected}, []),
        Parsed("go2-02", "status", {"online": False}, []),  # in the same batch: merged, in order
    ]
    with db.transaction(), db.pipeline():  # as the collector's writer stores
        assert store(db, batch) == {"status": 3, "events": 1, "duplicate": 1, "telemetry": 2}
    with db.transaction(), db.pipeline():
        assert store(db, batch[1:4]) == {"duplicate": 2, "telemetry": 1}  # delivered again
    one, two = db.devices()
    assert (one["channel"], one["active_version"], one["pending"], one["latency_p99_us"]) == (
        "walk",
        "v1",
        {"version": "v2"},
        900,
    )
    assert (two["online"], two["channel"], two["last_rejected"], two["latency_p99_us"]) == (
        False,
        None,
        rejected["last_rejected"],
        None,
    )
    assert db.db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 2
    assert len(db.latency_rows()) == 2 and len(db.events()) == 1
    assert parse(topics, topics.events("go2-01"), json.dumps(event(3)).encode()).kind == "events"


def test_a_database_from_before_the_overview_columns_gets_them(target: Path | str) -> None:
    old = (
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0,"
        " status TEXT NOT NULL DEFAULT '{}', telemetry TEXT NOT NULL DEFAULT '{}', last_seen DOUBLE PRECISION NOT NULL)"
    )
    status = {"channel": "walk", "active": {"version": "v3"}, "backend": "tensorrt", "last_rejected": {"version": "v4"}}
    row = ("go2-01", 1, json.dumps(status), json.dumps({"p50_us": 410, "p99_us": 820, "count": 3000}), T0)
    raw = FleetDB(target).db  # today's schema, then its devices table as it was
    raw.execute("DROP TABLE devices")
    raw.execute(old)
    raw.execute("INSERT INTO devices (device_id, online, status, telemetry, last_seen) VALUES (?,?,?,?,?)", row)
    raw.close()
    db = FleetDB(target)
    try:
        (d,) = db.devices()
        assert (d["channel"], d["active_version"], d["backend"], d["last_rejected"]) == (
            "walk",
            "v3",
            "tensorrt",
            {"version": "v4"},
        )
        assert (d["online"], d["latency_p50_us"], d["latency_p99_us"], d["latency_count"]) == (True, 410, 820, 3000)
    finally:
        db.close()


def test_rollouts_claim_once(db: FleetDB) -> None:
    rdb = RolloutDB(db)
    r = Rollout("walk-v2", "walk", "v2", "s" * 64, "v1", ("go2-01",), 60.0, None, CANARY, "x", T0, None, T0)
    rdb.add(r)
    assert rdb.free_id("walk-v2") == "walk-v2-2"
    assert rdb.all(open_only=True) == [r]
    assert rdb.claim(r, PROMOTING, "soaked", T0 + 1) is True
    assert rdb.claim(r, PROMOTING, "soaked", T0 + 2) is False  # read before the first claim: refused
    got = rdb.get("walk-v2")
    assert got is not None and (got.state, got.updated_at) == (PROMOTING, T0 + 1)


def test_a_transaction_that_fails_leaves_nothing(db: FleetDB) -> None:
    with pytest.raises(KeyError), db.transaction():
        db.put_event("go2-01", event(1))
        raise KeyError("a bug halfway")
    assert db.events() == []
    assert db.put_event("go2-01", event(1)) is True


def test_collector_on_postgresql_end_to_end(fleet: Fleet, postgres: PostgreSQL) -> None:
    url = postgres.new_database()
    cfg = fleet.fleet_cfg
    cfg.write_text(cfg.read_text().replace(f'db = "{fleet.root / "fleet.db"}"', f'db = "{url}"'))
    assert url in cfg.read_text()
    fleet.start_collector()
    sim = Simulator(fleet.broker.url, fleet.prefix, devices=20, connections=2, name=f"pg{uuid.uuid4().hex[:4]}")
    try:
        sim.publish_status()
        reader = FleetDB(url)
        wait_for(lambda: len(reader.devices()) == 20, 30, "every device's status")
        sent = sim.send_events(500)
        for i in range(100):
            sim.telemetry(i)
        sim.flush()
        wait_for(lambda: reader.db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 100, 30, "telemetry")
        wait_for(lambda: reader.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] >= 500, 30, "events")
        ids = [r[0] for r in reader.db.execute("SELECT id FROM events").fetchall()]
        assert sorted(ids) == sorted(sent)
        assert reader.db.execute("SELECT COUNT(*) FROM latency").fetchone()[0] == 100
        reader.close()
    finally:
        sim.close()
    status = json.loads(fleet.fleet("status", "--json").stdout)
    assert len(status) == 20
    assert {d["active_version"] for d in status} == {"v1"}
    assert all(d["latency_p99_us"] == 700 for d in status)
