"""The validation gate, the post-activation watch, the operator's commands and activation policy,
on the real broker and S3 endpoint with the agent as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Policy
from scripts.loopback.models import mlp_weights, nan_when_triggered, numpy_forward
from tests.conftest import Fleet, bin_path, mlp, s3_env, wait_for
from tests.test_engine_daemon import build_child

pytestmark = pytest.mark.integration


def golden_for(path: Path, out: Path, weights: list[np.ndarray] | None = None, n: int = 16) -> Path:
    """Golden I/O computed with numpy from the weights, independently of the runtime under test."""
    w = weights if weights is not None else mlp_weights(path)
    x = np.random.default_rng(11).standard_normal((n, 1, w[0].shape[0])).astype(np.float32)
    y = np.stack([numpy_forward(w, xi) for xi in x]).astype(np.float32)
    np.savez(out, **{"inputs/obs": x, "outputs/actions": y})
    return out


def test_each_gate_check_rejects_its_model_with_the_figure(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config("go2-gate")
    fleet.start_agent(cfg)
    v1 = mlp(tmp_path / "v1.onnx", seed=1)
    fleet.publish(v1, "v1", "--golden", str(golden_for(v1, tmp_path / "g1.npz")))
    fleet.wait_active(cfg, "v1")
    gate = json.loads(fleet.agent(cfg, "models", "--json").stdout)[0]["figures"]["gate"]
    assert gate["golden"]["passed"] and gate["golden"]["max_abs_err"] < 1e-4 and gate["golden"]["samples"] == 16
    assert gate["latency"]["p99_us"] > 0 and gate["latency"]["budget_us"] == 2000

    # Weights 1e-3 away from the golden outputs' source.
    v2 = mlp(tmp_path / "v2.onnx", seed=2)
    drifted = [a + np.float32(1e-3) for a in mlp_weights(v2)]
    fleet.publish(v2, "v2", "--golden", str(golden_for(v2, tmp_path / "g2.npz", drifted)))
    reason = fleet.wait_rejected(cfg, "v2")
    err = float(reason.split("max abs error ")[1].split()[0])
    assert reason.startswith("validate: golden: mismatch") and err > 1e-3, reason

    # Slower than its budget.
    fleet.publish(mlp(tmp_path / "v3.onnx", seed=3), "v3", "--latency-budget-us", "1")
    reason = fleet.wait_rejected(cfg, "v3")
    assert "latency: p99" in reason and "exceeds the budget of 1 µs" in reason
    rejected = json.loads(fleet.agent(cfg, "models", "--json").stdout)[0]
    assert rejected["figures"]["gate"]["latency"]["p99_us"] > 1 and rejected["figures"]["gate"]["contract"]["passed"]

    def rejections() -> list[str]:
        return [e["reason"] for e in fleet.events("go2-gate") if e.get("state") == "rejected"]

    wait_for(lambda: len(rejections()) == 2, 20, "both rejections in fleet events")
    assert "max abs error" in rejections()[0] and "exceeds the budget of 1 µs" in rejections()[1]
    assert fleet.status(cfg)["active"]["version"] == "v1"


def test_nan_in_service_is_rolled_back_automatically(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-watch", extra="[watch]\nwindow_s = 60\n")
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    fleet.publish(nan_when_triggered(tmp_path / "v2.onnx"), "v2")
    status = fleet.wait_active(cfg, "v2")
    assert status["watch"]["version"] == "v2"

    obs = np.zeros((1, 48), np.float32)
    obs[0, 0] = 5000.0  # the trigger: the gate's inputs never had it
    with Policy(cfg.parent / "run" / "infer.sock") as policy:
        out = policy(obs)
        assert np.isnan(out).all() and policy.model_version == "v2"
        status = fleet.wait_active(cfg, "v1", timeout=10)
        assert policy(obs).tolist() != out.tolist() and policy.model_version == "v1"
    assert status["last_rollback"]["version"] == "v2"
    assert "post-activation watch: 1 responses with NaN/Inf" in status["last_rollback"]["reason"]
    assert "rolled back v2" in fleet.agent(cfg, "status").stdout


def test_a_crashed_serving_process_is_rolled_back_in_the_watch_and_restarted_after(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config("go2-crash", extra="[watch]\nwindow_s = 60\n")
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    fleet.publish(mlp(tmp_path / "v2.onnx", seed=2), "v2")
    status = fleet.wait_active(cfg, "v2")
    serving = status["serving"]
    crashed = serving["pid"]
    assert crashed and serving["cpus"] and serving["scheduling"].startswith(("SCHED_FIFO", "nice"))
    assert f"serving   process {crashed}, {serving['scheduling']}" in fleet.agent(cfg, "status").stdout
    os.kill(crashed, signal.SIGKILL)  # a runtime that segfaults takes its own process down
    status = fleet.wait_active(cfg, "v1", timeout=10)
    assert "the serving process was killed by signal 9" in status["last_rollback"]["reason"]
    assert status["serving"]["pid"] not in (crashed, None)
    with Policy(cfg.parent / "run" / "infer.sock") as policy:
        policy(np.zeros((1, 48), np.float32))
        assert policy.model_version == "v1"

    # Outside a watch there is nothing to roll back to: the same model comes back in a new process.
    running = fleet.status(cfg)["serving"]["pid"]
    os.kill(running, signal.SIGKILL)

    def new_process() -> dict[str, Any] | None:
        s = fleet.status(cfg)
        return s if s["serving"] and s["serving"]["pid"] != running else None

    restarted = wait_for(new_process, 15, "a new serving process")
    assert restarted["active"]["version"] == "v1"
    with Policy(cfg.parent / "run" / "infer.sock") as policy:
        policy(np.zeros((1, 48), np.float32))
        assert policy.model_version == "v1"
    wait_for(lambda: any(e["kind"] == "serving_restarted" for e in fleet.events("go2-crash")), 20, "the event")


def test_manual_policy_activate_rollback_pin_unpin(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-ops", extra='activation = "manual"\n')
    fleet.start_agent(cfg)
    r = fleet.agent(cfg, "rollback", check=False)
    assert r.returncode == 2 and "no previous model is stored" in r.stderr

    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    wait_for(lambda: fleet.status(cfg)["staged"] == ["v1"], 30, "v1 staged")
    assert fleet.status(cfg)["active"] is None
    fleet.agent(cfg, "activate", "v1")
    fleet.publish(mlp(tmp_path / "v2.onnx", seed=2), "v2")
    wait_for(lambda: fleet.status(cfg)["staged"] == ["v2"], 30, "v2 staged")
    assert fleet.status(cfg)["active"]["version"] == "v1"
    fleet.agent(cfg, "activate", "v2")
    assert fleet.status(cfg)["active"]["version"] == "v2"

    assert fleet.agent(cfg, "rollback").stdout.strip() == "active: v1"
    assert fleet.status(cfg)["last_rollback"]["reason"] == "rolled back by the operator (`agent rollback`)"

    r = fleet.agent(cfg, "pin", "v9", check=False)
    assert r.returncode == 2 and "no usable model 'v9'" in r.stderr and "stored: v1" in r.stderr
    fleet.agent(cfg, "pin", "v1")
    fleet.publish(mlp(tmp_path / "v3.onnx", seed=3), "v3")
    s = wait_for(lambda: (st := fleet.status(cfg))["deferred"] == "v3" and st, 30, "v3 deferred while pinned")
    assert s["pinned"] == "v1" and s["active"]["version"] == "v1" and s["pending"] is None and s["staged"] == []
    fleet.agent(cfg, "unpin")
    wait_for(lambda: fleet.status(cfg)["staged"] == ["v3"], 30, "v3 staged after unpin")
    assert fleet.status(cfg)["pinned"] is None


@pytest.mark.parametrize("newer_meanwhile", [False, True], ids=["completes", "newer-model-meanwhile"])
def test_a_rollback_that_must_build_its_engine_leaves_the_daemon_answering(
    fleet: Fleet, tmp_path: Path, newer_meanwhile: bool
) -> None:
    """`agent rollback` to a model whose engine is gone (a TensorRT upgrade changes every key) builds
    it first, off the coordinator: `agent status` answers meanwhile (and systemd's watchdog keeps
    being fed), a second operator command is told it is busy, and the rollback completes; unless a
    newer model became active meanwhile: then it is refused, and the newer one keeps serving."""
    cfg = fleet.agent_config("go2-opb", extra="[watch]\nwindow_s = 0.5\n")
    agent = fleet.start_agent(cfg)
    for i, v in enumerate(("v1", "v2"), 1):
        fleet.publish(mlp(tmp_path / f"{v}.onnx", seed=i), v)
        fleet.wait_active(cfg, v)
        wait_for(lambda: fleet.status(cfg)["watch"] is None, 20, "watch over")
    models = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    key = next(m["engine_key"] for m in models if m["version"] == "v1")
    engine = cfg.parent / "state" / "engines" / key
    engine.unlink()
    rollback = subprocess.Popen(
        [bin_path("agent"), "--config", str(cfg), "rollback"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **s3_env()},
    )
    try:
        child = build_child(agent)
        os.kill(child, signal.SIGSTOP)  # the build holds still: the daemon must not
        t0 = time.monotonic()
        status = fleet.status(cfg)
        assert time.monotonic() - t0 < 10 and status["active"]["version"] == "v2"
        assert status["operator"] == {"cmd": "rollback", "version": "v1"}
        assert "operator  `agent rollback`: loading v1" in fleet.agent(cfg, "status").stdout
        busy = fleet.agent(cfg, "activate", "v2", check=False)
        assert busy.returncode == 2 and "busy: `agent rollback` is loading v1" in busy.stderr
        assert rollback.poll() is None
        if newer_meanwhile:
            fleet.publish(mlp(tmp_path / "v3.onnx", seed=3), "v3")
            fleet.wait_active(cfg, "v3")
        os.kill(child, signal.SIGCONT)
        out, err = rollback.communicate(timeout=60)
    finally:
        if rollback.poll() is None:
            rollback.kill()
    if newer_meanwhile:
        assert rollback.returncode == 2 and "v3 became active while v1 loaded; run it again" in err
        status = fleet.status(cfg)
        assert status["active"]["version"] == "v3" and status["operator"] is None
        assert fleet.agent(cfg, "rollback").stdout.strip() == "active: v2"  # the model before v3
        return
    assert rollback.returncode == 0, err
    assert out.strip() == "active: v1" and fleet.status(cfg)["active"]["version"] == "v1"
    assert engine.exists()


def test_fleet_rollback_reaches_the_device_even_when_not_stored(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-frb", extra="[watch]\nwindow_s = 0.5\nkeep_models = 2\n")
    fleet.start_agent(cfg)
    shas = {}
    for i, v in enumerate(("v1", "v2", "v3"), 1):
        shas[v] = fleet.publish(mlp(tmp_path / f"{v}.onnx", seed=i), v)["manifest"]["sha256"]
        fleet.wait_active(cfg, v)
        wait_for(lambda: fleet.status(cfg)["watch"] is None, 20, "watch over")
    models = cfg.parent / "state" / "models"
    assert not (models / f"{shas['v1']}.onnx").exists() and (models / f"{shas['v2']}.onnx").exists()

    r = fleet.fleet("rollback", "--channel", fleet.channel, "--to", "v1")
    assert json.loads(r.stdout)["manifest"]["version"] == "v1"
    fleet.wait_active(cfg, "v1")
    log = (cfg.parent / "agent.log").read_text()
    assert log.count("model v1 -> downloading") == 2  # fetched again: it was no longer stored
    wait_for(lambda: fleet.status(cfg)["watch"] is None, 20, "watch over")  # v2's files are collected then
    assert not (models / f"{shas['v2']}.onnx").exists()

    fleet.fleet("rollback", "--channel", fleet.channel, "--to", "v2")
    fleet.wait_active(cfg, "v2")
    log = (cfg.parent / "agent.log").read_text()
    assert log.count("model v2 -> downloading") == 2 and log.count("model v2 -> building") >= 2  # all again
    r = fleet.fleet("rollback", "--channel", fleet.channel, "--to", "v7", check=False)
    assert r.returncode == 2 and "no version 'v7'" in r.stderr


def test_two_announcements_during_one_build_the_newer_wins(fleet: Fleet, tmp_path: Path) -> None:
    # A heavy model and many gate calls keep the first candidate busy for seconds.
    cfg = fleet.agent_config("go2-race", extra="[gate]\nlatency_calls = 6000\nlatency_budget_us = 1000000\n")
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "big.onnx", dims=(48, 2048, 2048, 12), seed=5), "big")
    wait_for(lambda: (fleet.status(cfg)["pending"] or {}).get("version") == "big", 30, "big in progress")
    fleet.publish(mlp(tmp_path / "a.onnx", seed=1), "a")
    fleet.publish(mlp(tmp_path / "b.onnx", seed=2), "b")
    fleet.wait_active(cfg, "b", timeout=120)
    history = {m["version"]: m for m in json.loads(fleet.agent(cfg, "models", "--json").stdout)}
    # a waited while big worked, or had its own build cancelled when b arrived: b wins either way.
    assert history["a"]["state"] == "rejected" and history["a"]["reason"].endswith("superseded by b")
    # big either finished (its gate was running) or had its build cancelled for the newer one.
    assert history["big"]["state"] == "retired" or "cancelled while building: superseded by" in history["big"]["reason"]
