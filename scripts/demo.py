#!/usr/bin/env python3
"""The newcomer's demo (run it through scripts/demo, which installs what is missing first).

Starts, on loopback and free ports: mosquitto, an S3 endpoint (moto's server), `fleet collect`,
`agent run`, `fleet serve` (the dashboard) and a controller-shaped client calling the agent at 200 Hz.
Then publishes v1, v2 and a broken v3 (it returns NaN), and shows `agent status`, `fleet status` and
`fleet events`.
Everything lives in .demo/ and is stopped at the end (`--stay`: after Ctrl-C, to look at the dashboard)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loopback.models import mlp
from loopback.services import (
    Mosquitto,
    MotoS3,
    bin_path,
    free_port,
    s3_env,
    stop,
    wait_port,
    write_agent_config,
    write_fleet_config,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".demo"
ENV = {**os.environ, **s3_env()}


def say(text: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {text}{plain}", flush=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args)), flush=True)
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, check=False)
    print((r.stdout + r.stderr).rstrip(), flush=True)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: {args[1:]} failed with exit code {r.returncode}")
    return r


def wait(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}; logs are in {WORK}")


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    services: list[Any] = []
    try:
        say("local broker and S3 endpoint on loopback")
        broker, s3 = Mosquitto(WORK / "mosquitto"), MotoS3(WORK)
        for svc in (broker, s3):
            svc.start()
            services.append(svc)
        os.environ.update(s3_env())
        s3.client().create_bucket(Bucket="models")
        print(f"mosquitto {broker.url}   S3 {s3.url} (bucket 'models')")
        agent_cfg = write_agent_config(
            WORK / "agent.toml",
            broker=broker.url,
            s3=s3.url,
            state_dir=WORK / "state",
            socket_path=WORK / "run" / "infer.sock",
            channel="go2-walk",
            device_id="go2-demo",
            prefix="edge",
            interval_s=2.0,
        )
        fleet_cfg = write_fleet_config(
            WORK / "fleet.toml", broker=broker.url, s3=s3.url, bucket="models", prefix="edge", db=WORK / "fleet.db"
        )
        agent = [bin_path("agent"), "--config", str(agent_cfg)]
        fleet = [bin_path("fleet"), "--config", str(fleet_cfg)]

        say("the collector (cloud) and the agent (robot)")
        procs.append(spawn([*fleet, "collect"], "collector.log"))
        procs.append(spawn([*agent, "run"], "agent.log"))
        wait("the agent", (WORK / "run" / "control.sock").exists, 30)
        print(f"configs: {agent_cfg}, {fleet_cfg}; logs in {WORK}")
        dashboard = serve(fleet, procs)

        code = scenario(agent, fleet, procs)
        if "--stay" in sys.argv[1:]:
            print(f"\nthe dashboard stays at {dashboard}; Ctrl-C stops everything", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        else:
            print(f"\nthe dashboard was at {dashboard} (`scripts/demo --stay` keeps it up)")
        return code
    finally:
        for p in reversed(procs):
            stop(p)
        for svc in reversed(services):
            svc.stop()


def scenario(agent: list[str], fleet: list[str], procs: list[subprocess.Popen[bytes]]) -> int:
    models = {v: mlp(WORK / f"policy-{v}.onnx", seed=i) for i, v in enumerate(("v1", "v2"), 1)}
    models["v3"] = mlp(WORK / "policy-v3.onnx", seed=3, nan=True)

    say("publish v1, then start a controller-shaped client at 200 Hz")
    publish(fleet, models["v1"], "v1")
    wait_state(agent, "v1", "active")
    load_out = WORK / "client.json"
    procs.append(
        spawn(
            [
                sys.executable,
                str(ROOT / "scripts" / "load_client.py"),
                "--socket",
                str(WORK / "run" / "infer.sock"),
                "--hz",
                "200",
                "--out",
                str(load_out),
            ],
            "client.log",
        )
    )
    time.sleep(2)

    say("publish v2: it is swapped in under the running client")
    t0 = time.monotonic()
    publish(fleet, models["v2"], "v2")
    wait_state(agent, "v2", "active")
    print(f"v2 active {time.monotonic() - t0:.2f} s after `fleet publish` returned")

    say("publish a broken v3 (returns NaN): rejected, v2 keeps serving")
    publish(fleet, models["v3"], "v3")
    wait_state(agent, "v3", "rejected")
    time.sleep(2.5)  # one more telemetry interval

    client = procs.pop()
    client.send_signal(signal.SIGTERM)
    client.wait(10)
    seen = json.loads(load_out.read_text())
    say("what the client saw")
    print(
        f"{seen['ok']} calls answered, {seen['failed']} failed, at {seen['rate_hz']} Hz; "
        f"round trip p50 {seen['p50_us']} µs, p99 {seen['p99_us']} µs; versions {seen['versions']}"
    )

    say("on the robot")
    sh(*agent, "status")
    sh(*agent, "models")
    say("in the cloud")
    sh(*fleet, "status")
    sh(*fleet, "events")
    sh(*fleet, "latency")  # from the merged histograms the collector kept: v1 and v2
    sh(*fleet, "compare", "v1", "v2")
    ok = seen["failed"] == 0 and status(agent)["active"]["version"] == "v2"
    say("demo " + ("done: v2 active, v3 rejected, no failed call" if ok else "FAILED"))
    return 0 if ok else 1


def serve(fleet: list[str], procs: list[subprocess.Popen[bytes]]) -> str:
    """`fleet serve` on a free loopback port; its address."""
    say("the dashboard (`fleet serve`)")
    wait("the collector's database", (WORK / "fleet.db").exists, 30)
    port = free_port()
    procs.append(spawn([*fleet, "serve", "--listen", f"127.0.0.1:{port}"], "serve.log"))
    wait_port(port, 30)
    url = f"http://127.0.0.1:{port}/"
    print(f"dashboard: {url}  (JSON: {url}api/devices, {url}api/events, {url}api/latency, {url}api/rollouts)")
    return url


def spawn(args: list[str], log: str) -> subprocess.Popen[bytes]:
    with (WORK / log).open("wb") as out:
        return subprocess.Popen(args, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def publish(fleet: list[str], model: Path, version: str) -> None:
    r = subprocess.run(
        [*fleet, "publish", str(model), "--channel", "go2-walk", "--version", version],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"$ fleet publish {model.name} --channel go2-walk --version {version}")
    if r.returncode != 0:
        raise SystemExit(f"demo: publish failed: {r.stderr}")
    m = json.loads(r.stdout)
    print(
        f"  announced {version}: sha256 {m['manifest']['sha256'][:12]}…, {m['manifest']['size']} bytes, "
        f"sequence {m['sequence']}"
    )


def status(agent: list[str]) -> dict[str, Any]:
    r = subprocess.run([*agent, "status", "--json"], env=ENV, capture_output=True, text=True, check=False)
    return json.loads(r.stdout) if r.stdout.strip() else {}


def wait_state(agent: list[str], version: str, state: str) -> None:
    def check() -> bool:
        s = status(agent)
        if state == "active":
            return (s.get("active") or {}).get("version") == version
        return (s.get("last_rejected") or {}).get("version") == version

    wait(f"{version} {state}", check)
    s = status(agent)
    if state == "rejected":
        print(f"  {version} rejected: {s['last_rejected']['reason']}")
    else:
        print(f"  {version} active on {s['device_id']}")


if __name__ == "__main__":
    raise SystemExit(main())
