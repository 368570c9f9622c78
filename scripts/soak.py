#!/usr/bin/env python3
"""Soak: hours of the daemon's life compressed, on real services on loopback. N swaps through the
full pipeline (publish -> download -> verify -> engine -> gate -> swap -> watch), a rejected model
and a rollback every 10 swaps, a broker restart every 100, while a 500 Hz client calls throughout.
Every second it samples each of the agent's processes (RSS, PSS, anonymous RSS, open fds, threads), how many there
are, the state dir's disk use and the database's size.

Prints the figures after warm-up (the first 20 % of the swaps): growth per 1,000 swaps by a
least-squares slope, the counts at the end against after warm-up, the client's failures; writes
the samples and the figures as JSON (--json) and, with matplotlib (the `cloud` extra), a plot (--plot).

    .venv/bin/python scripts/soak.py --swaps 1000 --plot soak.png --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loopback.calling import CallingClient
from loopback.models import mlp
from loopback.procs import descendants
from loopback.services import Mosquitto, MotoS3, bin_path, s3_env, stop, write_agent_config, write_fleet_config

from agent.system.control import call
from cloud import config as fleet_config
from cloud.publish import publish, rollback

WARMUP = 0.2  # the share of the swaps before the figures count
# Latency is not under test (a loaded machine): a generous gate budget and watch rollback factor.
WATCH = "[watch]\nwindow_s = 0.2\nkeep_models = 3\nlatency_factor = 10\n[gate]\nlatency_budget_us = 50000\n"


def proc_figures(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = {k: int(v.split()[0]) for k, v in rollup.items()}
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "pss_kib": kib["Pss"],
        # Its anonymous pages (heaps, stacks): what a leak or the allocators' creep raises. PSS and
        # USS count library pages by how many processes map them, the machine's other Python
        # processes too, and move when those come and go.
        "anon_kib": int(fields["RssAnon"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Sampler(threading.Thread):
    def __init__(self, agent_pid: int, state: Path, progress: list[int]) -> None:
        super().__init__(daemon=True)
        self.agent_pid, self.state, self.progress = agent_pid, state, progress
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                self.samples.append(self.sample())
            except (OSError, KeyError, ValueError):
                continue  # a process ended between the listing and the reading

    def sample(self) -> dict[str, Any]:
        kids = descendants(self.agent_pid)
        daemon = proc_figures(self.agent_pid)
        others = [proc_figures(p) for p in kids]
        db = sum(f.stat().st_size for f in self.state.glob("agent.db*"))
        return {
            "t": time.monotonic(),
            "swaps": self.progress[0],
            "daemon": daemon,
            "children": len(kids),
            "children_rss_kib": sum(o["rss_kib"] for o in others),
            "children_pss_kib": sum(o["pss_kib"] for o in others),
            "state_dir_bytes": du(self.state),
            "db_bytes": db,
        }


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def longest_gap(client: CallingClient, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The longest wait between two answers, and where in the run it fell."""
    ts = [t for t, _ in client.answers]
    if len(ts) < 2:
        return {"ms": 0.0}
    i = max(range(1, len(ts)), key=lambda k: ts[k] - ts[k - 1])
    near = min(samples, key=lambda s: abs(s["t"] - ts[i - 1])) if samples else {"swaps": None}
    return {
        "ms": round(1000 * (ts[i] - ts[i - 1]), 1),
        "near_swap": near["swaps"],
        "versions": [client.answers[i - 1][1], client.answers[i][1]],
    }


def figures(samples: list[dict[str, Any]], swaps: int, client: CallingClient) -> dict[str, Any]:
    warm = [s for s in samples if s["swaps"] >= swaps * WARMUP]
    first, last = warm[0], warm[-1]
    xs = [float(s["swaps"]) for s in warm]
    return {
        "swaps": swaps,
        "samples": len(samples),
        "client_calls": len(client.answers),
        "client_failures": client.failures,
        "client_longest_gap": longest_gap(client, samples),
        "daemon_rss_mib_per_1000_swaps": round(slope_per_1000(xs, [s["daemon"]["rss_kib"] / 1024 for s in warm]), 2),
        "daemon_pss_mib_per_1000_swaps": round(slope_per_1000(xs, [s["daemon"]["pss_kib"] / 1024 for s in warm]), 2),
        "daemon_anon_mib_per_1000_swaps": round(slope_per_1000(xs, [s["daemon"]["anon_kib"] / 1024 for s in warm]), 2),
        "daemon_rss_mib": [round(first["daemon"]["rss_kib"] / 1024, 1), round(last["daemon"]["rss_kib"] / 1024, 1)],
        "fds": [first["daemon"]["fds"], last["daemon"]["fds"], max(s["daemon"]["fds"] for s in warm)],
        "threads": [first["daemon"]["threads"], last["daemon"]["threads"], max(s["daemon"]["threads"] for s in warm)],
        "children": [first["children"], last["children"], max(s["children"] for s in warm)],
        "state_dir_mib_max": round(max(s["state_dir_bytes"] for s in warm) / 2**20, 1),
        "db_kib": [first["db_bytes"] >> 10, last["db_bytes"] >> 10],
    }


class Soak:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.broker, self.s3 = Mosquitto(work / "mq"), MotoS3(work)
        self.broker.start()
        self.s3.start()
        os.environ.update(s3_env())
        self.s3.client().create_bucket(Bucket="models")
        self.cfg = write_agent_config(
            work / "agent.toml",
            broker=self.broker.url,
            s3=self.s3.url,
            state_dir=work / "state",
            socket_path=work / "run" / "infer.sock",
            channel="soak",
            device_id="soak-01",
            prefix="soak",
            extra="",
        )
        self.cfg.write_text(self.cfg.read_text() + WATCH)
        fleet_file = write_fleet_config(
            work / "fleet.toml",
            broker=self.broker.url,
            s3=self.s3.url,
            bucket="models",
            prefix="soak",
            db=work / "f.db",
        )
        self.fleet = fleet_config.load(fleet_file)
        self.control = work / "run" / "control.sock"
        log = (work / "agent.log").open("ab")
        self.agent = subprocess.Popen([bin_path("agent"), "--config", str(self.cfg), "run"], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not self.control.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not start")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = call(self.control, {"cmd": "status"})["status"]
        return status

    def wait(self, done: Any, what: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if done(s):
                return s
            time.sleep(0.05)
        raise TimeoutError(f"{what}: {self.status()}")

    def swap(self, i: int) -> None:
        model = mlp(self.work / "m.onnx", seed=i)
        publish(self.fleet, model, channel="soak", version=f"v{i}")
        self.wait(lambda s: (s["active"] or {}).get("version") == f"v{i}" and s["watch"] is None, f"v{i}")

    def reject(self, i: int) -> None:
        publish(self.fleet, mlp(self.work / "bad.onnx", seed=i, nan=True), channel="soak", version=f"bad{i}")
        self.wait(lambda s: (s["last_rejected"] or {}).get("version") == f"bad{i}", f"bad{i} rejected")

    def roll_back(self, i: int) -> None:
        rollback(self.fleet, "soak", f"v{i - 1}")
        self.wait(lambda s: (s["active"] or {}).get("version") == f"v{i - 1}" and not s["pending"], f"back to v{i - 1}")

    def restart_broker(self) -> None:
        self.broker.stop()
        time.sleep(0.5)
        self.broker.start()
        self.wait(lambda s: s["broker"]["connected"], "the broker again", 30)

    def close(self) -> None:
        stop(self.agent)
        self.s3.stop()
        self.broker.stop()


def run(swaps: int, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    soak = Soak(work)
    progress = [0]
    try:
        soak.swap(0)
        sampler = Sampler(soak.agent.pid, work / "state", progress)
        sampler.start()
        with CallingClient(work / "run" / "infer.sock", hz=500) as client:
            started = time.monotonic()
            for i in range(1, swaps + 1):
                soak.swap(i)
                if i % 10 == 0:
                    soak.reject(i)
                    soak.roll_back(i)
                    soak.swap(i + swaps)  # forward again, as a new model
                if i % 100 == 0:
                    soak.restart_broker()
                progress[0] = i
                if i % 50 == 0:
                    print(f"{i} swaps, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        sampler.stop_event.set()
        sampler.join(5)
        return sampler.samples, {**figures(sampler.samples, swaps, client), "seconds": time.monotonic() - started}
    finally:
        soak.close()


def plot(samples: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["swaps"] for s in samples]

    def col(get: Any) -> list[float]:
        return [float(get(s)) for s in samples]

    series = [
        (
            "daemon RSS / PSS / anonymous RSS (MiB)",
            [col(lambda s, k=k: s["daemon"][k] / 1024) for k in ("rss_kib", "pss_kib", "anon_kib")],
        ),
        ("children PSS (MiB)", [col(lambda s: s["children_pss_kib"] / 1024)]),
        ("daemon fds / threads", [col(lambda s: s["daemon"]["fds"]), col(lambda s: s["daemon"]["threads"])]),
        ("child processes", [col(lambda s: s["children"])]),
        ("state dir / db (MiB)", [col(lambda s: s["state_dir_bytes"] / 2**20), col(lambda s: s["db_bytes"] / 2**20)]),
    ]
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.2 * len(series)), sharex=True)
    for ax, (title, ys) in zip(axes, series, strict=True):
        for y in ys:
            ax.plot(x, y, linewidth=1)
        ax.set_title(title, fontsize=9)
    axes[-1].set_xlabel("swaps")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        samples, result = run(args.swaps, Path(tmp))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"figures": result, "samples": samples}))
    if args.plot:
        plot(samples, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
