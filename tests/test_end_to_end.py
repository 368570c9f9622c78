"""The whole loop on real services: fleet publish -> MQTT -> S3 -> verified download -> engine ->
hot swap -> served inference -> events and latency back to the cloud."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Fleet, mlp, wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def served_by(fleet: Fleet, cfg: Path, requests: int) -> None:
    """Wait until the agent has answered `requests` calls in all."""
    wait_for(lambda: fleet.status(cfg)["requests"] >= requests, 30, f"{requests} requests served")


def start_load(fleet: Fleet, cfg: Path, hz: int = 250) -> tuple[subprocess.Popen[bytes], Path]:
    out = cfg.parent / f"load-{time.monotonic_ns()}.json"
    p = fleet.spawn(
        [
            sys.executable,
            str(ROOT / "scripts" / "load_client.py"),
            "--socket",
            str(cfg.parent / "run" / "infer.sock"),
            "--hz",
            str(hz),
            "--out",
            str(out),
        ],
        cfg.parent / "load.log",
    )
    return p, out


def stop_load(p: subprocess.Popen[bytes], out: Path) -> dict[str, object]:
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    result: dict[str, object] = json.loads(out.read_text())
    return result


def test_publish_swap_under_load_then_restart_without_download(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config("go2-01")
    agent = fleet.start_agent(cfg)
    v1, v2 = mlp(tmp_path / "v1.onnx", seed=1), mlp(tmp_path / "v2.onnx", seed=2)

    fleet.publish(v1, "v1")
    fleet.wait_active(cfg, "v1")
    load, out = start_load(fleet, cfg, hz=250)
    served_by(fleet, cfg, 200)  # the client calls v1 before the swap...
    fleet.publish(v2, "v2")
    fleet.wait_active(cfg, "v2")
    served_by(fleet, cfg, fleet.status(cfg)["requests"] + 200)  # ...and v2 after it
    # The cloud sees the device, what it runs and how fast: looked at while the client still calls,
    # since each telemetry message covers its own interval (one after the load would count 0 calls).
    row = wait_for(
        lambda: next(
            (
                r
                for r in json.loads(fleet.fleet("status", "--json").stdout)
                if r["active_version"] == "v2" and r["latency_count"]
            ),
            None,
        ),
        20,
        "fleet status",
    )
    seen = stop_load(load, out)

    assert seen["failed"] == 0, seen["failures"]
    assert seen["rate_hz"] >= 200, seen
    assert set(seen["versions"]) == {"v1", "v2"}, seen["versions"]  # type: ignore[arg-type]

    assert row["online"] is True and row["device_id"] == "go2-01"
    assert (
        row["backend"] == "onnxruntime" and row["latency_p50_us"] > 0 and row["latency_p99_us"] >= row["latency_p50_us"]
    )
    states = [(e["version"], e["state"]) for e in fleet.events("go2-01") if e["kind"] == "model_state"]
    for stage in ("announced", "downloading", "verified", "building", "validating", "staged", "active"):
        assert ("v2", stage) in states
    assert ("v1", "retired") in states

    # A clean stop shows offline; a restart brings v2 back without a download or a build.
    history_before = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    fleet.procs.remove(agent)
    assert agent.send_signal(signal.SIGTERM) is None and agent.wait(20) == 0
    wait_for(lambda: not json.loads(fleet.fleet("status", "--json").stdout)[0]["online"], 20, "offline in fleet status")
    r = fleet.agent(cfg, "status", check=False)
    assert r.returncode == 3 and "not running" in r.stdout

    fleet.start_agent(cfg)
    status = fleet.wait_active(cfg, "v2", timeout=10)
    assert status["pending"] is None
    history_after = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    assert [(m["version"], m["state"], m["updated_at"]) for m in history_after] == [
        (m["version"], m["state"], m["updated_at"]) for m in history_before
    ]
    log = (cfg.parent / "agent.log").read_text()
    assert log.count("-> downloading") == 2 and "restored active model v2" in log


def test_agent_status_human_output(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-02")
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "m.onnx"), "v1")
    fleet.wait_active(cfg, "v1")
    text = fleet.agent(cfg, "status").stdout
    assert "go2-02: running" in text and "active    v1" in text and "broker    connected" in text


def test_two_agents_with_one_device_id_are_reported_not_looped(fleet: Fleet, tmp_path: Path) -> None:
    first = fleet.agent_config("twin-a")
    second = fleet.agent_config("twin-b")
    for cfg in (first, second):  # two robots whose SD cards were cloned: one device_id
        cfg.write_text(
            cfg.read_text()
            .replace('device_id = "twin-a"', 'device_id = "twin"')
            .replace('device_id = "twin-b"', 'device_id = "twin"')
        )
    fleet.start_agent(first)
    wait_for(lambda: fleet.status(first)["broker"]["connected"], 20, "first connected")
    fleet.start_agent(second)

    def one_backed_off() -> tuple[Path, Path] | None:
        conflicted = [c for c in (first, second) if fleet.status(c)["broker"]["conflict"]]
        if len(conflicted) != 1:
            return None
        return conflicted[0], second if conflicted[0] == first else first

    loser, winner = wait_for(one_backed_off, 30, "one twin told of the other and backing off")
    status = fleet.status(loser)
    assert (
        not status["broker"]["connected"]
        and "another agent connected with this device_id" in status["broker"]["conflict"]
    )
    time.sleep(3)  # no ping-pong: the loser stays away instead of taking the session back
    assert fleet.status(winner)["broker"]["connected"] and not fleet.status(loser)["broker"]["connected"]
    assert fleet.status(winner)["broker"]["conflict"] is None
    assert "WARNING   another agent connected with this device_id" in fleet.agent(loser, "status").stdout
