"""The controller walking the simulated Go2 over DDS with the robot_lab policy served by the agent,
through a hot swap; the sim gate and the safety layer on a policy that blows up. Real processes:
mosquitto, moto S3, `agent run`, `agent go2 sim --lockstep`, `agent go2 run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.loopback.services import bin_path
from tests.conftest import Fleet, wait_for
from tests.go2util import (
    PRESETS,
    arm,
    controller_status,
    dds_domain,
    go2_data,
    go2_section,
    need_stack,
    variant,
    wait_mode,
    wait_trace,
)

pytestmark = pytest.mark.integration

WALK_TICKS = 5000  # 10 s of simulated time at 500 Hz


def start_sim(fleet: Fleet, cfg: Path, data: Path, trace: Path, *extra: str, lockstep: bool = True) -> None:
    mode = ["--lockstep"] if lockstep else []
    fleet.spawn(
        [
            bin_path("agent"),
            "--config",
            str(cfg),
            "go2",
            "sim",
            "--mjcf",
            str(data / "mjcf" / "scene_flat.xml"),
            *mode,
            "--trace",
            str(trace),
            *extra,
        ],
        cfg.parent / "sim.log",
    )


def start_controller(fleet: Fleet, cfg: Path) -> None:
    fleet.spawn([bin_path("agent"), "--config", str(cfg), "go2", "run"], cfg.parent / "controller.log")


def test_walks_through_a_hot_swap(fleet: Fleet, tmp_path: Path) -> None:
    need_stack()
    data = go2_data()
    cfg = fleet.agent_config(extra=go2_section(dds_domain(), data))
    fleet.start_agent(cfg)
    deploy_cfg = str(PRESETS / "robot_lab.toml")
    v1 = variant(data / "policy" / "robot_lab.onnx", tmp_path / "v1.onnx", "v1")
    fleet.publish(v1, "v1", "--deploy-config", deploy_cfg)
    fleet.wait_active(cfg, "v1", timeout=120)

    trace = tmp_path / "trace.jsonl"
    start_sim(fleet, cfg, data, trace)
    start_controller(fleet, cfg)
    arm(cfg)
    walk = wait_mode(cfg, "walk", 120)
    t0 = walk["tick"]
    v2 = variant(data / "policy" / "robot_lab.onnx", tmp_path / "v2.onnx", "v2")
    fleet.publish(v2, "v2", "--deploy-config", deploy_cfg)

    rows = wait_trace(trace, t0 + WALK_TICKS, 600)
    status = controller_status(cfg)
    window = [r for r in rows if t0 <= r["tick"] <= t0 + WALK_TICKS]
    progress = window[-1]["x"] - window[0]["x"]
    min_height = min(r["z"] for r in window)
    swaps = [e for e in status["events"] if e["kind"] == "model"]
    modes = [e["mode"] for e in status["events"] if e["kind"] == "mode"]
    print(
        f"\nwalk: {progress:.2f} m forward in {(window[-1]['tick'] - window[0]['tick']) / 500:.1f} s simulated, "
        f"min base height {min_height:.3f} m; model versions {[(e['version'], e['tick'] - t0) for e in swaps]}"
    )
    assert progress > 2.5
    assert min_height >= 0.2
    assert [e["version"] for e in swaps][-2:] == ["v1", "v2"]
    assert t0 < swaps[-1]["tick"] < t0 + WALK_TICKS  # the swap landed mid-walk
    assert modes[-1] == "walk" and "damp" not in modes and "hold" not in modes
    assert status["model_version"] == "v2"


def test_blowup_rejected_by_the_sim_gate_and_damped_when_forced(fleet: Fleet, tmp_path: Path) -> None:
    need_stack()
    data = go2_data()
    cfg = fleet.agent_config(extra=go2_section(dds_domain(), data))
    fleet.start_agent(cfg)
    deploy_cfg = str(PRESETS / "robot_lab.toml")
    bad = variant(data / "policy" / "robot_lab.onnx", tmp_path / "bad.onnx", "blowup", last_layer_scale=1e6)
    fleet.publish(bad, "blowup", "--deploy-config", deploy_cfg)
    reason = fleet.wait_rejected(cfg, "blowup", timeout=120)
    shown = fleet.agent(cfg, "status").stdout
    print(f"\nrejected: {reason}")
    assert "sim gate" in reason and "beyond the bound 100" in reason and "after 0.00 s" in reason
    assert "sim gate" in shown and "beyond the bound" in shown  # the figures reach `agent status`

    out = fleet.agent(
        cfg,
        "deploy",
        str(bad),
        "--version",
        "blowup-forced",
        "--skip-check",
        "sim",
        "--deploy-config",
        deploy_cfg,
        "--wait",
        "120",
    ).stdout
    assert "blowup-forced: active" in out
    forced = next(m for m in json.loads(fleet.agent(cfg, "models", "--json").stdout) if m["version"] == "blowup-forced")
    assert forced["figures"]["gate"]["sim gate"]["forced"] == "sim"  # recorded as forced

    trace = tmp_path / "trace.jsonl"
    start_sim(fleet, cfg, data, trace)
    start_controller(fleet, cfg)
    arm(cfg)
    damp = wait_mode(cfg, "damp", 120)
    status = controller_status(cfg)
    print(f"controller: {damp['reason']}")
    assert "beyond the bound 100" in damp["reason"]
    assert [e["mode"] for e in status["events"] if e["kind"] == "mode"][-2:] == ["walk", "damp"]
    assert status["mode"] == "damp"


def test_deploy_config_that_does_not_fit_the_model(fleet: Fleet, tmp_path: Path) -> None:
    need_stack()
    data = go2_data()
    cfg = fleet.agent_config(extra=go2_section(dds_domain(), data))
    fleet.start_agent(cfg)
    model = data / "policy" / "robot_lab.onnx"
    r = fleet.fleet(
        "publish",
        str(model),
        "--channel",
        fleet.channel,
        "--deploy-config",
        str(PRESETS / "legged_gym.toml"),
        check=False,
    )
    assert r.returncode == 2 and "builds 48 observations; input 'obs' is [1, 45]" in r.stderr
    r = fleet.agent(cfg, "deploy", str(model), "--version", "nocfg", "--wait", "120", check=False)
    assert r.returncode == 1 and "no deploy config" in r.stdout


def test_when_idle_activation_waits_for_the_robot_to_stand_still(fleet: Fleet, tmp_path: Path) -> None:
    need_stack()
    data = go2_data()
    cfg = fleet.agent_config(extra=go2_section(dds_domain(), data, gate=False, extra='activation = "when-idle"\n'))
    fleet.start_agent(cfg)
    deploy_cfg = str(PRESETS / "robot_lab.toml")
    fleet.publish(
        variant(data / "policy" / "robot_lab.onnx", tmp_path / "v1.onnx", "v1"), "v1", "--deploy-config", deploy_cfg
    )
    fleet.wait_active(cfg, "v1", timeout=120)  # the first model: nothing to swap under
    start_sim(fleet, cfg, data, tmp_path / "trace.jsonl")
    start_controller(fleet, cfg)
    arm(cfg)
    wait_mode(cfg, "walk", 120)
    fleet.publish(
        variant(data / "policy" / "robot_lab.onnx", tmp_path / "v2.onnx", "v2"), "v2", "--deploy-config", deploy_cfg
    )
    waiting = wait_for(lambda: fleet.status(cfg).get("waiting_to_activate"), 120, "v2 parked")
    assert waiting["version"] == "v2" and "not idle" in waiting["reason"]
    assert fleet.status(cfg)["active"]["version"] == "v1"
    fleet.agent(cfg, "go2", "command", "0", "0", "0")
    fleet.wait_active(cfg, "v2", timeout=120)
    events = controller_status(cfg)["events"]
    stop_tick = next(e["tick"] for e in events if e["kind"] == "command")
    swap = [e for e in events if e["kind"] == "model"][-1]
    print(f"\nv2 activated {(swap['tick'] - stop_tick) / 500:.2f} s (simulated) after the stop command")
    assert swap["version"] == "v2" and swap["tick"] > stop_tick
