#!/usr/bin/env python3
"""Hot-swap benchmark (run by a person, not a test). One run, one machine, real services on loopback:

  1. a 500 Hz client loop (a miss = a round trip over 2 ms) with no swaps, then across N swaps through
     the full pipeline (local deploy -> verify -> engine -> gate -> swap) between two models:
     misses and the largest gap between responses in each phase;
  2. the naive alternative: restart the serving process to load the new model (the gap in ms);
  3. served p99 while a 200 MB model downloads, hashes, builds and passes the gate in the background,
     against idle;
  4. served p50/p99 against a direct ONNX Runtime call (regression figure).
Prints a table and writes bench-results/swap.json.

    .venv/bin/python scripts/bench_swap.py [--swaps 100] [--idle-s SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serving import round_trips
from loopback.models import mlp
from loopback.services import (
    Mosquitto,
    MotoS3,
    bin_path,
    s3_env,
    stop,
    write_agent_config,
    write_fleet_config,
)

from agent.contract.protocol import Manifest
from agent.delivery.s3_fetch import s3_client
from agent.system.control import call
from cloud import config as fleet_config
from cloud.publish import announce

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, **s3_env()}
# The client stands for the Go2 controller, which its unit runs SCHED_FIFO 80 (systemd/go2-controller
# .service); root can give it that here. Everything is measured the same way in every phase.
CONTROLLER_FIFO = 80 if os.geteuid() == 0 else 0
WARMUP_S = 1.0


class World:
    def __init__(self, work: Path, serving_cpu: int | None = None) -> None:
        self.work = work
        self.serving_cpu = serving_cpu
        self.broker, self.s3 = Mosquitto(work / "mq"), MotoS3(work)
        self.broker.start()
        self.s3.start()
        if serving_cpu is not None:
            # On a fleet the broker and S3 are other machines: here they keep off the CPU that the
            # serving process and the controller own.
            rest = os.sched_getaffinity(0) - {serving_cpu}
            for proc in (self.broker.proc, self.s3.proc):
                assert proc is not None
                os.sched_setaffinity(proc.pid, rest)
        os.environ.update(s3_env())
        self.s3.client().create_bucket(Bucket="models")
        self.cfg = write_agent_config(
            work / "agent.toml",
            broker=self.broker.url,
            s3=self.s3.url,
            state_dir=work / "state",
            socket_path=work / "run" / "infer.sock",
            channel="bench",
            device_id="bench-01",
            prefix="bench",
            interval_s=10.0,
            extra=("" if serving_cpu is None else f"serving_cpus = [{serving_cpu}]\n")
            + "[watch]\nwindow_s = 0.2\nkeep_models = 3\n",
        )
        self.fleet_cfg = write_fleet_config(
            work / "fleet.toml",
            broker=self.broker.url,
            s3=self.s3.url,
            bucket="models",
            prefix="bench",
            db=work / "fleet.db",
        )
        self.sock = work / "run" / "infer.sock"
        self.control = work / "run" / "control.sock"
        self.agent: subprocess.Popen[bytes] | None = None

    def start_agent(self) -> None:
        with (self.work / "agent.log").open("ab") as log:
            self.agent = subprocess.Popen(
                [bin_path("agent"), "--config", str(self.cfg), "run"], env=ENV, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while not self.control.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("agent did not start")
            time.sleep(0.02)

    def stop_agent(self) -> None:
        if self.agent is not None:
            stop(self.agent)
            self.agent = None

    def close(self) -> None:
        self.stop_agent()
        self.s3.stop()
        self.broker.stop()

    def deploy(self, model: Path, version: str) -> None:
        """The full local pipeline through the control socket (what `agent deploy` sends)."""
        reply = call(self.control, {"cmd": "deploy", "version": version, "size": model.stat().st_size}, model)
        assert reply["ok"], reply
        self.wait_active(version)

    def wait_active(self, version: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = call(self.control, {"cmd": "status"})["status"]
            if (status["active"] or {}).get("version") == version:
                return
            if (status["last_rejected"] or {}).get("version") == version:
                raise RuntimeError(f"{version} rejected: {status['last_rejected']['reason']}")
            time.sleep(0.1)  # as `agent deploy --wait` polls; a status request costs the daemon work
        raise TimeoutError(f"{version} not active")


class Client:
    """scripts/load_client.py at 500 Hz in its own process."""

    def __init__(self, world: World, name: str) -> None:
        self.out = world.work / f"client-{name}.json"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "load_client.py"),
                "--socket",
                str(world.sock),
                "--hz",
                "500",
                "--out",
                str(self.out),
                "--fifo",
                str(CONTROLLER_FIFO),
                "--warmup-s",
                str(WARMUP_S),
                *([] if world.serving_cpu is None else ["--cpu", str(world.serving_cpu)]),
            ],
            env=ENV,
        )
        time.sleep(WARMUP_S)  # connected and warm: the client counts from here

    def result(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


def phase_idle_and_swaps(world: World, models: list[Path], swaps: int, idle_s: float) -> dict[str, Any]:
    """The swaps first, then the same client as long without swaps (unless --idle-s says how long):
    the largest gap of a longer phase is larger by chance alone, so both phases get the same time."""
    c = Client(world, "swaps")
    t0 = time.monotonic()
    for i in range(swaps):
        world.deploy(models[i % 2], f"s{i + 1}")
    swap_s = time.monotonic() - t0
    time.sleep(0.5)
    swapping = c.result()
    c = Client(world, "idle")
    time.sleep(idle_s or swap_s)
    idle = c.result()
    return {
        "idle": idle,
        "swaps": swapping,
        "swap_count": swaps,
        "swap_phase_s": round(swap_s, 1),
        "idle_phase_s": round(idle_s or swap_s, 1),
        "swaps_per_s": round(swaps / swap_s, 2),
    }


def phase_restart(world: World) -> dict[str, Any]:
    c = Client(world, "restart")
    t0 = time.monotonic()
    world.stop_agent()
    world.start_agent()
    ready_s = time.monotonic() - t0
    time.sleep(1.5)
    r = c.result()
    return {"client": r, "restart_to_control_socket_s": round(ready_s, 3)}


def phase_background(world: World, big: Path, version: str) -> dict[str, Any]:
    """The 200 MB model is uploaded first (on a real fleet S3 and the publisher are elsewhere); the
    busy phase is the agent's own work: download, hashing, ONNX check, engine build, gate, swap."""
    staged = subprocess.run(
        [
            bin_path("fleet"),
            "--config",
            str(world.fleet_cfg),
            "publish",
            str(big),
            "--channel",
            "bench-staging",
            "--version",
            version,
        ],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    manifest = Manifest.from_json(json.loads(staged.stdout)["manifest"])
    fleet_cfg = fleet_config.load(world.fleet_cfg)
    c = Client(world, "bg-idle")
    time.sleep(8)
    idle = c.result()
    c = Client(world, "bg-busy")
    t0 = time.monotonic()
    announce(fleet_cfg, s3_client(fleet_cfg.s3.endpoint_url, fleet_cfg.s3.region), "bench", manifest)
    world.wait_active(version, timeout=300)
    busy_s = time.monotonic() - t0
    busy = c.result()
    return {"idle": idle, "busy": busy, "busy_s": round(busy_s, 1), "model_mib": round(big.stat().st_size / 2**20)}


def phase_background_capped(world: World, big: Path, version: str, mbps: float) -> dict[str, Any]:
    """The same at a link's rate: the agent restarted with `[s3] max_download_mbps`."""
    text = world.cfg.read_text()
    world.cfg.write_text(text.replace("[s3]\n", f"[s3]\nmax_download_mbps = {mbps}\n", 1))
    world.stop_agent()
    world.start_agent()
    result = phase_background(world, big, version)
    result["max_download_mbps"] = mbps
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--swaps", type=int, default=100)
    p.add_argument("--idle-s", type=float, default=0.0, help="no-swap phase length (default: the swap phase's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "swap.json")
    p.add_argument(
        "--serving-cpu",
        type=int,
        default=max(os.sched_getaffinity(0)) if len(os.sched_getaffinity(0)) > 1 else -1,
        help="the CPU for the serving process and the client (`serving_cpus`; default the last one; -1: none)",
    )
    p.add_argument("--link-mbps", type=float, default=40.0, help="download cap of the second background phase")
    p.add_argument("--keep", type=Path, help="keep the agent's log and the clients' JSON in this folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            work = args.keep
        world = World(work, None if args.serving_cpu < 0 else args.serving_cpu)
        try:
            models = [mlp(work / f"m{i}.onnx", seed=i) for i in range(2)]
            bigs = [mlp(work / f"big{i}.onnx", seed=9 + i, pad_bytes=200 * 2**20) for i in range(2)]
            world.start_agent()
            world.deploy(models[1], "s0")
            results = {
                "swap": phase_idle_and_swaps(world, models, args.swaps, args.idle_s),
                "restart": phase_restart(world),
                "background": phase_background(world, bigs[0], "big"),
                "background_capped": phase_background_capped(world, bigs[1], "big-capped", args.link_mbps),
            }
            world.stop_agent()
            world.start_agent()
            served, direct, floor = round_trips(world.sock, models[0], 3000, 3)
            results["served_vs_direct_us"] = {"served": served, "direct": direct, "socket_floor": floor}
            results["setup"] = {
                "cpus": sorted(os.sched_getaffinity(0)),
                "serving_cpu": None if args.serving_cpu < 0 else args.serving_cpu,
                "client_sched_fifo": CONTROLLER_FIFO,
            }
        finally:
            world.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwritten to {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    s, rs, sv = r["swap"], r["restart"]["client"], r["served_vs_direct_us"]
    idle, sw = s["idle"], s["swaps"]
    gap_ratio = sw["max_gap_ms"] / idle["max_gap_ms"] if idle["max_gap_ms"] else float("nan")
    rows = [
        (
            f"500 Hz client, no swaps, {s['idle_phase_s']} s",
            f"{idle['ok']} calls",
            f"{idle['misses']} misses",
            f"{idle['failed']} failed",
            f"max gap {idle['max_gap_ms']} ms",
            f"p99 {idle['p99_us']} µs",
        ),
        (
            f"500 Hz client, {s['swap_count']} swaps, {s['swap_phase_s']} s",
            f"{sw['ok']} calls",
            f"{sw['misses']} misses",
            f"{sw['failed']} failed",
            f"max gap {sw['max_gap_ms']} ms",
            f"p99 {sw['p99_us']} µs",
        ),
        (
            "naive: restart the serving process",
            f"{rs['ok']} calls",
            f"{rs['misses']} misses",
            f"{rs['failed']} failed",
            f"max gap {rs['max_gap_ms']} ms",
            f"p99 {rs['p99_us']} µs",
        ),
    ]
    for bg in (r["background"], r["background_capped"]):
        link = f", {bg['max_download_mbps']:g} MB/s cap" if "max_download_mbps" in bg else ", no cap"
        rows += [
            ("served, idle", f"{bg['idle']['ok']} calls", f"{bg['idle']['misses']} misses", "", "", _p99(bg["idle"])),
            (
                f"served, {bg['model_mib']} MB download{link} + build",
                f"{bg['busy']['ok']} calls",
                f"{bg['busy']['misses']} misses",
                f"{bg['busy']['failed']} failed",
                "",
                _p99(bg["busy"]),
            ),
        ]
    setup = r["setup"]
    where = f"CPU {setup['serving_cpu']}" if setup["serving_cpu"] is not None else "any CPU"
    print(f"\nclient SCHED_FIFO {setup['client_sched_fifo']}, client and serving process on {where}")
    for row in rows:
        print(f"{row[0]:<44} {row[1]:>12} {row[2]:>11} {row[3]:>10} {row[4]:>18} {row[5]:>14}")
    print(
        f"\nswaps: {s['swap_count']} in {s['swap_phase_s']} s; extra misses from swaps: "
        f"{sw['misses'] - idle['misses']}; max-gap ratio swaps/no swaps: {gap_ratio:.2f}"
    )
    for bg in (r["background"], r["background_capped"]):
        ratio = bg["busy"]["p99_us"] / bg["idle"]["p99_us"] if bg["idle"]["p99_us"] else float("nan")
        link = f"capped at {bg['max_download_mbps']:g} MB/s" if "max_download_mbps" in bg else "not capped"
        print(f"background load ({link}): p99 ratio busy/idle {ratio:.2f} over {bg['busy_s']} s of work")
    print(
        f"served p50/p99 {sv['served']['p50']}/{sv['served']['p99']} µs vs direct ONNX Runtime "
        f"{sv['direct']['p50']}/{sv['direct']['p99']} µs (bare socket floor {sv['socket_floor']['p50']}/"
        f"{sv['socket_floor']['p99']} µs)"
    )


def _p99(client: dict[str, Any]) -> str:
    return f"p99 {client['p99_us']} µs"


if __name__ == "__main__":
    raise SystemExit(main())
