"""The collector's benchmark (`python scripts/fleet_sim.py --bench`): its own mosquitto (and
PostgreSQL), `fleet collect` processes, the simulator in two processes of its own, and this
process polling the database.

Figures: ingest rate sustained (rows that became visible per second while the simulator sent),
end-to-end lag (a telemetry row's first sighting by the poller minus the `ts` its device put in the
payload; the poll period, 0.1 s, is part of it), `fleet status --json` (the whole command, Python's
start included), the query behind it (`FleetDB.devices()`) and `GET /api/devices` from `fleet serve`
over HTTP, at each fleet size. The baseline is the same collector with `batch_max = 1`: one
transaction per message, as before batching."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud.fleetdb import FleetDB
from scripts.loopback.postgres import PostgreSQL
from scripts.loopback.services import Mosquitto, free_port, stop

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.1
LOOK_BACK = 2000  # ids: a batch's rows not yet committed when a later one was
SIMS = 2  # simulator processes: one Python process cannot publish much more than 4,000 messages/s
FLEET = [sys.executable, "-c", "import sys; from cloud.cli import main; sys.exit(main())"]  # this checkout's


@dataclass(frozen=True)
class Run:
    devices: int
    batch_max: int = 500
    backend: str = "sqlite"
    collectors: int = 1

    def __str__(self) -> str:
        where = f"{self.backend:<10} {self.collectors} collector(s)"
        return f"{self.devices:>6} devices  {where}  batch_max {self.batch_max:>3}"


@dataclass
class Poller:
    """Telemetry rows as they become visible, with their lag, and the events' count."""

    target: Path | str
    lags: list[float] = field(default_factory=list)
    seen: list[tuple[float, int]] = field(default_factory=list)  # (time, rows visible so far)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        db = FleetDB(self.target)
        ids: set[int] = set()
        low = 0  # every id up to here was seen (or is older than the look-back)
        while not self.stop.wait(POLL_S):
            # Ids are taken at insert and seen at commit: with two writers a lower one can show up
            # after a higher one, so read from the first id not seen yet.
            rows = db.db.execute("SELECT id, ts FROM telemetry WHERE id > ?", (low,)).fetchall()
            events = db.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            now = time.time()
            for row_id, ts in rows:
                if row_id not in ids:
                    ids.add(row_id)
                    self.lags.append(now - ts)
            low = max(low, max(ids, default=0) - LOOK_BACK)
            while low + 1 in ids:
                low += 1
            self.seen.append((time.monotonic(), len(ids) + int(events)))
        db.close()

    def rows(self) -> int:
        return self.seen[-1][1] if self.seen else 0

    def rows_at(self, t: float) -> int:
        return next((n for when, n in reversed(self.seen) if when <= t), 0)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _config(work: Path, broker: Mosquitto, target: str, run: Run, k: int) -> Path:
    cfg = work / f"collector{k}.toml"
    share = 'share_group = "bench"\n' if run.collectors > 1 else ""
    cfg.write_text(
        f'[s3]\nbucket = "bench"\n[mqtt]\nurl = "{broker.url}"\ntopic_prefix = "bench"\n'
        f'client_id = "bench-collector-{k}"\n[collector]\ndb = "{target}"\nbatch_max = {run.batch_max}\n{share}'
    )
    return cfg


def _simulate(broker: Mosquitto, run: Run, rate: float, seconds: float) -> tuple[float, float, float, int]:
    """(start, end, rate achieved, events and telemetry sent) of the timed phase."""
    sims = []
    for k in range(SIMS):
        args = ["--url", broker.url, "--prefix", "bench", "--devices", str(run.devices // SIMS), "--name", f"s{k}"]
        args += ["--rate", str(rate / SIMS), "--seconds", str(seconds)]
        sims.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "scripts/fleet_sim.py"), *args],
                env=_env(),
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for s in sims:
        assert s.stdout is not None
        s.stdout.readline()  # "running": statuses sent
    t0 = time.monotonic()
    outs = [s.communicate()[0] for s in sims]
    t1 = time.monotonic()
    achieved = sum(float(out.split(" at ")[1].split()[0]) for out in outs)
    return t0, t1, achieved, sum(int(out.split()[1]) for out in outs) - SIMS * (run.devices // SIMS)


def scenario(work: Path, run: Run, rate: float, seconds: float, pg: PostgreSQL | None) -> dict[str, float]:
    work.mkdir(parents=True)
    broker = Mosquitto(work / "broker", persistence=False)
    broker.start()
    target: str = pg.new_database() if pg is not None and run.backend == "postgresql" else str(work / "fleet.db")
    cfgs = [_config(work, broker, target, run, k) for k in range(run.collectors)]
    collectors = [
        subprocess.Popen(
            [*FLEET, "--config", str(c), "collect"], env=_env(), stderr=(work / f"{c.stem}.log").open("wb")
        )
        for c in cfgs
    ]
    time.sleep(2)  # connected and subscribed
    poller = Poller(target)
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        t0, t1, achieved, sent = _simulate(broker, run, rate, seconds)
        while poller.rows() < sent and time.monotonic() - t1 < 60:
            time.sleep(POLL_S)
        drained = time.monotonic() - t1
        lags = np.array(poller.lags)
        figures = {
            "offered_per_s": achieved,
            "sent": sent,
            "ingest_per_s": (poller.rows_at(t1) - poller.rows_at(t0)) / (t1 - t0),
            "stored": poller.rows(),
            "drain_s": drained,
            "lag_p50_s": float(np.percentile(lags, 50)) if lags.size else float("nan"),
            "lag_p99_s": float(np.percentile(lags, 99)) if lags.size else float("nan"),
        }
        figures.update(query_times(cfgs[0], target))
        return figures
    finally:
        poller.stop.set()
        thread.join()
        codes = [stop(c) for c in collectors]
        broker.stop()
        print(f"  {run}: collectors exited {codes} on SIGTERM", file=sys.stderr)


def query_times(cfg: Path, target: Path | str) -> dict[str, float]:
    cli = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run(
            [*FLEET, "--config", str(cfg), "status", "--json"], env=_env(), check=True, stdout=subprocess.DEVNULL
        )
        cli.append(time.monotonic() - t)
    db = FleetDB(target)
    query = []
    for _ in range(5):
        t = time.monotonic()
        db.devices()
        query.append(time.monotonic() - t)
    db.close()
    return {
        "status_cli_s": statistics.median(cli),
        "devices_query_ms": 1000 * statistics.median(query),
        "api_devices_ms": 1000 * api_devices_s(cfg),
    }


def api_devices_s(cfg: Path, tries: int = 9) -> float:
    """`GET /api/devices` from `fleet serve` over HTTP: the median of `tries`, after one warm-up."""
    url = f"http://127.0.0.1:{free_port()}"
    serve = subprocess.Popen(
        [*FLEET, "--config", str(cfg), "serve", "--listen", url.removeprefix("http://")],
        env=_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/devices", timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        took = []
        for _ in range(tries):
            t = time.monotonic()
            urllib.request.urlopen(f"{url}/api/devices", timeout=30).read()
            took.append(time.monotonic() - t)
        return statistics.median(took)
    finally:
        stop(serve)


RUNS = (
    Run(1000, batch_max=1),
    Run(1000),
    Run(10000),
    Run(10000, backend="postgresql"),
    Run(10000, backend="postgresql", collectors=2),
)


def bench(rate: float, seconds: float) -> int:
    print(f"fleet collector benchmark: {rate:.0f} messages/s offered, {seconds:.0f} s a run, {os.cpu_count()} CPUs")
    pg = PostgreSQL()
    pg.start()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
            for k, run in enumerate(RUNS):
                r = scenario(Path(tmp) / f"run{k}", run, rate, seconds, pg)
                results.append(r)
                print(
                    f"{run}  offered {r['offered_per_s']:>5.0f}/s  ingest {r['ingest_per_s']:>5.0f}/s"
                    f"  stored {r['stored']:.0f}/{r['sent']:.0f}"
                    f"  drain {r['drain_s']:>4.1f} s  lag p50 {r['lag_p50_s']:.2f} s p99 {r['lag_p99_s']:.2f} s"
                    f"  `fleet status --json` {r['status_cli_s']:.2f} s  devices query {r['devices_query_ms']:.0f} ms"
                    f"  GET /api/devices {r['api_devices_ms']:.0f} ms",
                    flush=True,
                )
    finally:
        pg.stop()
    base, batched = results[0], results[1]
    print(
        f"batched vs one transaction per message (1,000 devices, SQLite):"
        f" ingest x{batched['ingest_per_s'] / base['ingest_per_s']:.1f},"
        f" lag p99 {base['lag_p99_s']:.2f} s -> {batched['lag_p99_s']:.2f} s"
    )
    return 0
