"""The collector's benchmark (`python scripts/fleet_sim.py --bench`): its own mosquitto and
`fleet collect`, the simulator in a process of its own, and this process polling the database.

Figures: ingest rate sustained (rows that became visible per second while the simulator sent),
end-to-end lag (a row's first sighting by the poller minus the `ts` its device put in the payload;
the poll period, 0.1 s, is part of it), `fleet status --json` (the whole command) and the query
behind it (`FleetDB.devices()`, what `/api/devices` reads) at each fleet size. The baseline is
the same collector with `batch_max = 1`: one transaction per message, as before batching."""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud.fleetdb import FleetDB
from scripts.loopback.services import Mosquitto, stop

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.1
FLEET = [sys.executable, "-c", "import sys; from cloud.cli import main; sys.exit(main())"]  # this checkout's


@dataclass
class Poller:
    """Rows of events and telemetry as they become visible, and their lag."""

    db: Path
    lags: list[float] = field(default_factory=list)
    seen: list[tuple[float, int]] = field(default_factory=list)  # (time, rows visible so far)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.db.exists():
            time.sleep(POLL_S)
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        last = {"events": 0, "telemetry": 0}
        total = 0
        while not self.stop.wait(POLL_S):
            for table, after in last.items():
                try:
                    rows = con.execute(f"SELECT rowid, ts FROM {table} WHERE rowid > ?", (after,)).fetchall()
                except sqlite3.OperationalError:  # the collector has not created its schema yet
                    continue
                now = time.time()
                if rows:
                    last[table] = max(r[0] for r in rows)
                    self.lags.extend(now - r[1] for r in rows)
                    total += len(rows)
            self.seen.append((time.monotonic(), total))
        con.close()

    def rows(self) -> int:
        return self.seen[-1][1] if self.seen else 0

    def rows_at(self, t: float) -> int:
        return next((n for when, n in reversed(self.seen) if when <= t), 0)


def scenario(work: Path, devices: int, rate: float, seconds: float, batch_max: int) -> dict[str, float]:
    work.mkdir(parents=True)
    broker = Mosquitto(work / "broker", persistence=False)
    broker.start()
    db = work / "fleet.db"
    cfg = work / "fleet.toml"
    cfg.write_text(
        f'[s3]\nbucket = "bench"\n[mqtt]\nurl = "{broker.url}"\ntopic_prefix = "bench"\n'
        f'client_id = "bench-collector"\n[collector]\ndb = "{db}"\nbatch_max = {batch_max}\n'
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    collector = subprocess.Popen(
        [*FLEET, "--config", str(cfg), "collect"],
        env=env,
        stderr=(work / "collector.log").open("wb"),
    )
    poller = Poller(db)
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        time.sleep(2)  # connected and subscribed
        sim_args = ["--url", broker.url, "--prefix", "bench", "--devices", str(devices), "--rate", str(rate)]
        sim = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/fleet_sim.py"), *sim_args, "--seconds", str(seconds)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sim.stdout is not None
        sim.stdout.readline()  # "running": statuses sent
        t0, lag_from = time.monotonic(), len(poller.lags)
        out = sim.stdout.read()
        sim.wait()
        t1 = time.monotonic()
        sent = int(out.split()[1]) - devices
        achieved = float(out.split(" at ")[1].split()[0])
        while poller.rows() < sent and time.monotonic() - t1 < 120:
            time.sleep(POLL_S)
        drained = time.monotonic() - t1
        lags = np.array(poller.lags[lag_from:])
        figures = {
            "devices": devices,
            "batch_max": batch_max,
            "offered_per_s": achieved,
            "ingest_per_s": (poller.rows_at(t1) - poller.rows_at(t0)) / (t1 - t0),
            "stored": poller.rows(),
            "sent": sent,
            "drain_s": drained,
            "lag_p50_s": float(np.percentile(lags, 50)) if lags.size else float("nan"),
            "lag_p99_s": float(np.percentile(lags, 99)) if lags.size else float("nan"),
        }
        figures.update(query_times(cfg, db, env))
        return figures
    finally:
        poller.stop.set()
        thread.join()
        rc = stop(collector)
        broker.stop()
        print(f"  (collector exited {rc} on SIGTERM)", file=sys.stderr)


def query_times(cfg: Path, db: Path, env: dict[str, str]) -> dict[str, float]:
    cli = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run(
            [*FLEET, "--config", str(cfg), "status", "--json"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cli.append(time.monotonic() - t)
    fdb = FleetDB(db)
    query = []
    for _ in range(5):
        t = time.monotonic()
        fdb.devices()
        query.append(time.monotonic() - t)
    fdb.close()
    return {"status_cli_s": statistics.median(cli), "devices_query_ms": 1000 * statistics.median(query)}


def bench(rate: float, seconds: float) -> int:
    print(f"fleet collector benchmark: {rate:.0f} messages/s offered, {seconds:.0f} s a run, {os.cpu_count()} CPUs")
    runs = [(1000, 1), (1000, 500), (10000, 500)]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        results = [scenario(Path(tmp) / f"run{k}", d, rate, seconds, b) for k, (d, b) in enumerate(runs)]
    for r in results:
        print(
            f"devices {r['devices']:>6.0f}  batch_max {r['batch_max']:>4.0f}  offered {r['offered_per_s']:>6.0f}/s"
            f"  ingest {r['ingest_per_s']:>6.0f}/s  stored {r['stored']:.0f}/{r['sent']:.0f}"
            f"  drain {r['drain_s']:.1f} s  lag p50 {r['lag_p50_s']:.2f} s p99 {r['lag_p99_s']:.2f} s"
            f"  fleet status --json {r['status_cli_s']:.2f} s  devices query {r['devices_query_ms']:.0f} ms"
        )
    base, batched = results[0], results[1]
    ratio = batched["ingest_per_s"] / base["ingest_per_s"]
    print(
        f"batched vs one transaction per message (1,000 devices): ingest x{ratio:.1f},"
        f" lag p99 {base['lag_p99_s']:.2f} s -> {batched['lag_p99_s']:.2f} s"
    )
    return 0
