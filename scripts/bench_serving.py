#!/usr/bin/env python3
"""First benchmark (run by a person, not a test): in one run on one machine, with real services on
loopback,
  1. served round trip (client -> daemon -> client) vs a direct ONNX Runtime call on the same
     48 -> 512 -> 256 -> 128 -> 12 MLP, interleaved in rounds so both see the same machine noise;
  2. time from `fleet publish` returning to the device's "active" event reaching an MQTT subscriber;
  3. the daemon's resident memory with the model loaded vs a process that only loads it in ORT.
Prints a table and writes bench-results/serving.json.

    .venv/bin/python scripts/bench_serving.py [--calls 4000] [--rounds 5] [--publishes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
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

from agent.client import Policy
from agent.contract.mqtt_client import host_port, make_client
from agent.contract.protocol import Topics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, **s3_env()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=4000, help="calls per round and per side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--publishes", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "serving.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results = run(Path(tmp), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwritten to {args.out}")
    return 0


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    broker, s3 = Mosquitto(work / "mq"), MotoS3(work)
    broker.start()
    s3.start()
    os.environ.update(s3_env())
    s3.client().create_bucket(Bucket="models")
    agent_cfg = write_agent_config(
        work / "agent.toml",
        broker=broker.url,
        s3=s3.url,
        state_dir=work / "state",
        socket_path=work / "run" / "infer.sock",
        channel="bench",
        device_id="bench-01",
        prefix="bench",
        interval_s=10.0,
    )
    fleet_cfg = write_fleet_config(
        work / "fleet.toml", broker=broker.url, s3=s3.url, bucket="models", prefix="bench", db=work / "fleet.db"
    )
    with (work / "agent.log").open("wb") as log:
        daemon = subprocess.Popen(
            [bin_path("agent"), "--config", str(agent_cfg), "run"], env=ENV, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        events = subscribe_events(broker.url)
        models = [mlp(work / f"m{i}.onnx", seed=i) for i in range(args.publishes + 1)]
        publish_times = [publish_to_active(fleet_cfg, m, f"v{i}", events) for i, m in enumerate(models)]
        served, direct, floor = round_trips(work / "run" / "infer.sock", models[-1], args.calls, args.rounds)
        memory = {
            "daemon_rss_mib": rss_mib(daemon.pid),
            "serving_rss_mib": [rss_mib(pid) for pid in serving_pids(daemon.pid)],
            "agent_pss_mib": round(sum(pss_mib(pid) for pid in [daemon.pid, *serving_pids(daemon.pid)]), 1),
            "ort_only_rss_mib": ort_only_rss(models[-1]),
        }
    finally:
        stop(daemon)
        s3.stop()
        broker.stop()
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "served_us": served,
        "direct_us": direct,
        "socket_floor_us": floor,
        "overhead_us": {k: round(served[k] - direct[k], 1) for k in ("p50", "p99")},
        "ratio": {k: round(served[k] / direct[k], 2) for k in ("p50", "p99")},
        "publish_to_active_s": {
            "from_invocation": spread([t[0] for t in publish_times[1:]]),
            "from_return": spread([t[1] for t in publish_times[1:]]),
        },
        "memory": memory,
    }


def subscribe_events(url: str) -> queue.Queue[tuple[float, dict[str, Any]]]:
    """Events with the time they reached this subscriber."""
    q: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
    client = make_client(f"bench-{os.getpid()}", url)
    client.on_message = lambda _c, _u, msg: q.put((time.monotonic(), json.loads(msg.payload)))
    client.connect(*host_port(url))
    client.subscribe(Topics("bench").events("bench-01"), qos=1)
    client.loop_start()
    time.sleep(0.3)
    return q


def publish_to_active(
    fleet_cfg: Path, model: Path, version: str, events: queue.Queue[tuple[float, dict[str, Any]]]
) -> tuple[float, float]:
    """Seconds from `fleet publish` starting, and from it returning, to the device's "active" event
    arriving (negative when the device was already active before the publishing process exited)."""
    invoked = time.monotonic()
    r = subprocess.run(
        [
            bin_path("fleet"),
            "--config",
            str(fleet_cfg),
            "publish",
            str(model),
            "--channel",
            "bench",
            "--version",
            version,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    returned = time.monotonic()
    deadline = returned + 60
    while time.monotonic() < deadline:
        arrived, event = events.get(timeout=60)
        if event.get("version") == version and event.get("state") in ("active", "rejected"):
            assert event["state"] == "active", event
            return arrived - invoked, arrived - returned
    raise TimeoutError(f"{version} not active: {r.stdout}")


def round_trips(
    sock: Path, model: Path, calls: int, rounds: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Alternate rounds of served and direct calls on the same input."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    policy = Policy(sock)
    floor: list[float] = []
    x = np.random.default_rng(0).standard_normal((1, 48)).astype(np.float32)
    served: list[float] = []
    direct: list[float] = []
    for _ in range(300):  # warm both
        policy.infer({"obs": x})
        session.run(None, {"obs": x})
    for _ in range(rounds):
        served += timed(lambda: policy.infer({"obs": x}), calls)
        direct += timed(lambda: session.run(None, {"obs": x}), calls)
        floor += socket_floor(calls)
    return summary(served), summary(direct), summary(floor)


def socket_floor(n: int) -> list[float]:
    """The machine's floor: a bare 200-byte ping-pong between two processes over a Unix socket."""
    code = "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\nwhile (d:=s.recv(65536)): s.send(d)"
    a, b = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", code, str(b.fileno())], pass_fds=[b.fileno()])
    b.close()
    msg = b"x" * 200
    for _ in range(200):
        a.sendall(msg)
        a.recv(65536)
    out = timed(lambda: (a.sendall(msg), a.recv(65536)), n)
    a.close()
    echo.wait(10)
    return out


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def summary(us: list[float]) -> dict[str, float]:
    a = np.array(us)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1), "n": len(us)}


def spread(xs: list[float]) -> dict[str, Any]:
    return {"runs": [round(x, 3) for x in xs], "median": round(float(np.median(xs)), 3), "max": round(max(xs), 3)}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def serving_pids(daemon: int) -> list[int]:
    """The daemon's serving processes (agent.serving.process): the one in service and a spare."""
    kids = Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split()
    return [int(k) for k in kids if Path(f"/proc/{k}/comm").read_text().strip() == "edge-serve"]


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages (the runtime's libraries) counted once across processes."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss")


def ort_only_rss(model: Path) -> float:
    code = (
        "import onnxruntime as ort, numpy as np, pathlib\n"
        f"s = ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
        "s.run(None, {'obs': np.zeros((1, 48), np.float32)})\n"
        "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return round(int(out.split()[1]) / 1024, 1)


def print_table(r: dict[str, Any]) -> None:
    s, d, o, q = r["served_us"], r["direct_us"], r["overhead_us"], r["ratio"]
    pa, m = r["publish_to_active_s"], r["memory"]
    print(f"\nmachine: {r['machine']}")
    print(f"{'figure':<44} {'p50':>9} {'p99':>9}")
    print(f"{'served round trip (client->daemon->client) µs':<44} {s['p50']:>9} {s['p99']:>9}")
    print(f"{'direct ONNX Runtime call µs':<44} {d['p50']:>9} {d['p99']:>9}")
    print(f"{'serving overhead (served - direct) µs':<44} {o['p50']:>9} {o['p99']:>9}")
    print(f"{'ratio served / direct':<44} {q['p50']:>9} {q['p99']:>9}")
    f = r["socket_floor_us"]
    print(f"{'floor: bare Unix-socket ping-pong µs':<44} {f['p50']:>9} {f['p99']:>9}")
    inv, ret = pa["from_invocation"], pa["from_return"]
    print(
        f"fleet publish invoked -> device reports active: median {inv['median']} s, max {inv['max']} s "
        f"over {len(inv['runs'])} publishes"
    )
    print(
        f"fleet publish returned -> device reports active: median {ret['median']} s, max {ret['max']} s "
        "(negative: active before the publishing process had exited)"
    )
    print(
        f"resident memory: daemon {m['daemon_rss_mib']} MiB, serving processes {m['serving_rss_mib']} MiB "
        f"(PSS of all of them together {m['agent_pss_mib']} MiB); a process that only loads the model in "
        f"ONNX Runtime {m['ort_only_rss_mib']} MiB"
    )


if __name__ == "__main__":
    raise SystemExit(main())
