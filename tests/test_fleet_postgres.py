"""The collector's database on PostgreSQL (a real server, scripts/loopback/postgres.py) with the
same semantics as on SQLite: the same checks run against both, then `fleet collect` and
`fleet status` end to end on PostgreSQL with simulated devices over real mosquitto."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract.protocol import IntervalHistogram
from cloud.fleetdb import HOUR, RAW, FleetDB, LatencyRow
from cloud.retention import prune
from cloud.rolloutdb import CANARY, PROMOTING, Rollout, RolloutDB
from scripts.fleet_sim import Simulator, sample_histograms
from scripts.loopback.postgres import PostgreSQL
from tests.conftest import Fleet, wait_for

T0 = 1_699_999_200.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetDB]:
    if request.param == "sqlite":
        d = FleetDB(tmp_path / "fleet.db")
    else:
        server: PostgreSQL = request.getfixturevalue("postgres")
        d = FleetDB(server.new_database())
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
