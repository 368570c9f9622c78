"""The collector at scale, on real mosquitto with simulated devices (scripts/fleet_sim.py): batched
writes, collectors sharing the load through an MQTT 5 shared subscription with nothing stored twice,
a collector killed with SIGKILL that loses nothing, and a clean stop that flushes its queue."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.fleet_sim import Simulator
from scripts.loopback.services import Mosquitto, bin_path, stop, write_fleet_config
from tests.conftest import Fleet, wait_for


def collector_config(fleet: Fleet, name: str, extra: str = "") -> Path:
    cfg = write_fleet_config(
        fleet.root / f"{name}.toml",
        broker=fleet.broker.url,
        s3=fleet.s3.url,
        bucket=fleet.bucket,
        prefix=fleet.prefix,
        db=fleet.root / "fleet.db",
        client_id=f"{name}-{uuid.uuid4().hex[:8]}",
    )
    cfg.write_text(cfg.read_text() + extra)  # [collector] is the last section
    return cfg


def start(fleet: Fleet, cfg: Path) -> subprocess.Popen[bytes]:
    return fleet.spawn([bin_path("fleet"), "--config", str(cfg), "collect"], fleet.root / f"{cfg.stem}.log")


def event_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT id FROM events")]


def device_count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return int(con.execute("SELECT COUNT(*) FROM devices").fetchone()[0])
    except sqlite3.OperationalError:  # no schema yet
        return 0


def stored_events(log: Path) -> tuple[int, int]:
    """(new events, duplicates) a collector said it stored when it stopped."""
    line = next((ln for ln in log.read_text().splitlines() if "stopped; stored:" in ln), None)
    assert line, log.read_text()[-2000:]
    new, dup = re.search(r"(\d+) events", line), re.search(r"(\d+) duplicate", line)
    return int(new.group(1)) if new else 0, int(dup.group(1)) if dup else 0


@pytest.fixture
def sim(fleet: Fleet) -> Iterator[Simulator]:
    s = Simulator(fleet.broker.url, fleet.prefix, devices=50, connections=2)
    yield s
    s.close()


def test_two_collectors_share_the_events_and_store_each_once(fleet: Fleet, sim: Simulator) -> None:
    share = '\nshare_group = "scale"\n'
    cfgs = [collector_config(fleet, name, share) for name in ("collector-a", "collector-b")]
    procs = [start(fleet, c) for c in cfgs]
    db = fleet.root / "fleet.db"
    sim.publish_status()
    wait_for(lambda: device_count(db) == 50, 30, "every device's status")

    sent = sim.send_events(2000)
    sim.flush()
    wait_for(lambda: len(event_ids(db)) >= len(sent), 60, "every event stored")
    for p in procs:
        assert stop(p) == 0

    ids = event_ids(db)
    assert len(ids) == len(set(ids)) == len(sent)
    assert set(ids) == set(sent)
    each = [stored_events(fleet.root / f"{c.stem}.log") for c in cfgs]
    print(f"(new, duplicate) events stored by each collector: {each}")
    assert all(new > 0 for new, _ in each)
    assert sum(new for new, _ in each) == len(sent)
    assert sum(dup for _, dup in each) == 0  # each event reached one collector only: shared, not copied


def test_a_collector_killed_with_sigkill_and_restarted_loses_nothing(fleet: Fleet, sim: Simulator) -> None:
    cfg = collector_config(fleet, "collector")
    db = fleet.root / "fleet.db"
    proc = start(fleet, cfg)
    sim.publish_status()
    wait_for(lambda: device_count(db) == 50, 30, "every device's status")

    sender = threading.Thread(target=sim.run, args=(1000, 4.0, 1.0))  # events only, 1,000/s for 4 s
    sender.start()
    wait_for(lambda: len(event_ids(db)) > 500, 30, "events flowing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(event_ids(db))
    sender.join()
    sim.flush()
    assert before < len(sim.sent_events)  # killed mid-stream: the broker holds the rest for its session

    start(fleet, cfg)  # same client id, within the session expiry
    wait_for(lambda: len(event_ids(db)) >= len(sim.sent_events), 60, "the missed events delivered")
    ids = event_ids(db)
    print(f"events: {before} stored before the kill, {len(ids)} after the restart, {len(sim.sent_events)} sent")
    assert len(ids) == len(set(ids)) == len(sim.sent_events)
    assert set(ids) == set(sim.sent_events)


def telemetry_rows(db: Path) -> tuple[int, int, int]:
    """(telemetry rows, distinct (device, ts) among them, latency rows)."""
    with sqlite3.connect(db) as con:
        rows, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT device_id || ts) FROM telemetry").fetchone()
        return int(rows), int(distinct), int(con.execute("SELECT COUNT(*) FROM latency").fetchone()[0])


def test_sigterm_stores_what_was_queued_and_telemetry_is_stored_once(fleet: Fleet, sim: Simulator) -> None:
    # The 50 statuses fill one batch; the 30 telemetry messages then wait for a batch that would
    # close only after 60 s: what stores them is the clean stop.
    cfg = collector_config(fleet, "collector", '\nbatch_max = 50\nbatch_wait = "60s"\n')
    db = fleet.root / "fleet.db"
    proc = start(fleet, cfg)
    sim.publish_status()
    wait_for(lambda: device_count(db) == 50, 30, "every device's status")
    for i in range(30):
        sim.telemetry(i)
    sim.flush()
    time.sleep(1.5)  # delivered to the collector, still queued
    assert telemetry_rows(db) == (0, 0, 0)
    assert stop(proc) == 0
    log = (fleet.root / "collector.log").read_text()
    flushed = telemetry_rows(db)[0]
    assert f"{flushed} telemetry" in log
    assert flushed > 0

    start(fleet, cfg)  # anything that reached it after the stop began was left unacked: delivered again
    wait_for(lambda: telemetry_rows(db)[0] >= 30, 30, "every telemetry message")
    time.sleep(0.5)
    assert telemetry_rows(db) == (30, 30, 30)  # one histogram per message (one version served), once


def test_batches_are_one_transaction_each(broker: Mosquitto, tmp_path: Path) -> None:
    """The writer in-process: 1,000 messages in at most a few batches, not one commit per message."""
    from cloud.collect import Collector
    from cloud.config import load

    cfg = tmp_path / "fleet.toml"
    prefix = f"t{uuid.uuid4().hex[:8]}"
    cfg.write_text(
        f'[s3]\nbucket = "b"\n[mqtt]\nurl = "{broker.url}"\ntopic_prefix = "{prefix}"\n'
        f'client_id = "c-{prefix}"\n[collector]\ndb = "{tmp_path / "fleet.db"}"\nbatch_max = 500\n'
    )
    c = Collector(load(cfg))
    sim = Simulator(broker.url, prefix, devices=10, connections=1)
    runner = threading.Thread(target=c.run, kwargs={"handle_signals": False})
    try:
        runner.start()
        assert c.subscribed.wait(10), "collector subscribed"
        for i in range(1000):
            sim.event(i)
        sim.flush()
        wait_for(lambda: c.writer.stored["events"] == 1000, 30, "1,000 events stored")
    finally:
        c.stop_event.set()
        runner.join()
        sim.close()
    print(f"1,000 events in {c.writer.batches} batches")
    assert 2 <= c.writer.batches <= 20
