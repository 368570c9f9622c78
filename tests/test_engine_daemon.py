"""The engine stage through the whole agent (processes, real broker and S3): no rebuild on a second
start, failed builds rejected while serving continues, build progress in `agent status --json`,
and two agents sharing one engine through S3 with exactly one build."""

from __future__ import annotations

import hashlib
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
from agent.coordinator.store import Store
from agent.engines import cache, engine_key
from agent.engines.build import BUILD_PROCESS_NAME
from agent.engines.onnxruntime import OnnxRuntimeBackend
from scripts.loopback.services import stop
from tests.conftest import Fleet, mlp, wait_for

pytestmark = pytest.mark.integration


def models(fleet: Fleet, cfg: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    return result


def figures(fleet: Fleet, cfg: Path, version: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m["figures"] for m in models(fleet, cfg) if m["version"] == version)
    return found


def build_events(fleet: Fleet, device: str | None = None) -> list[dict[str, Any]]:
    return [e for e in fleet.events(device) if e["kind"] == "engine_built"]


def build_child(agent: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The pid of the agent's engine-build child (a spawned interpreter), as soon as it exists."""

    def find() -> int | None:
        for task in Path(f"/proc/{agent.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == BUILD_PROCESS_NAME:
                        return int(pid)
                except OSError:
                    continue
        return None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = find()
        if pid:
            return pid
        time.sleep(0.005)
    raise AssertionError("no build child appeared")


def serves(sock: Path, version: str) -> bool:
    with Policy(sock) as policy:
        out = policy(np.zeros((1, 48), np.float32))
        return out.shape == (1, 12) and policy.model_version == version


def test_second_start_builds_nothing(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config()
    agent = fleet.start_agent(cfg)
    model = mlp(tmp_path / "m.onnx")
    fleet.publish(model, "v1")
    fleet.wait_active(cfg, "v1")
    assert figures(fleet, cfg, "v1")["engine_source"] == "built"
    engines = sorted(p.name for p in (cfg.parent / "state" / "engines").iterdir())
    stop(agent)
    fleet.start_agent(cfg)
    fleet.wait_active(cfg, "v1")
    fleet.publish(model, "v1-again")  # same bytes, new version: the same engine key
    fleet.wait_active(cfg, "v1-again")
    assert figures(fleet, cfg, "v1-again")["engine_source"] == "cache"
    assert sorted(p.name for p in (cfg.parent / "state" / "engines").iterdir()) == engines
    wait_for(lambda: len([e for e in fleet.events() if e["kind"] == "model_state"]) >= 6, 20, "events")
    assert len(build_events(fleet)) == 1


def test_killed_build_is_rejected_while_serving_continues(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config()
    agent = fleet.start_agent(cfg)
    sock = cfg.parent / "run" / "infer.sock"
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    fleet.publish(mlp(tmp_path / "v2.onnx", seed=2), "v2")
    child = build_child(agent)
    os.kill(child, signal.SIGSTOP)  # hold the build still while we look at it
    pending = wait_for(lambda: (fleet.status(cfg).get("pending") or {}).get("build"), 20, "build in status")
    status = fleet.status(cfg)
    assert status["pending"]["version"] == "v2" and status["pending"]["stage"] == "building"
    assert pending["pid"] == child and pending["stage"] and pending["elapsed_s"] >= 0
    assert serves(sock, "v1")
    os.kill(child, signal.SIGKILL)
    reason = fleet.wait_rejected(cfg, "v2")
    assert reason.endswith("killed by signal 9 (SIGKILL), likely out of memory (the OOM killer)")
    assert fleet.status(cfg)["active"]["version"] == "v1" and serves(sock, "v1")
    progress = wait_for(
        lambda: [e for e in fleet.events() if e["kind"] == "build_progress" and e["pid"] == child], 20, "events"
    )
    assert progress[0]["stage"] == "starting"


def test_build_over_its_time_limit_is_rejected_while_serving_continues(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config()
    agent = fleet.start_agent(cfg)
    sock = cfg.parent / "run" / "infer.sock"
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    stop(agent)
    text = cfg.read_text().replace("[mqtt]", "[build]\ntime_limit_s = 0.05\n[mqtt]")
    cfg.write_text(text)  # a spawned interpreter alone takes longer than 50 ms
    fleet.start_agent(cfg)
    fleet.wait_active(cfg, "v1")
    fleet.publish(mlp(tmp_path / "v2.onnx", seed=2), "v2")
    reason = fleet.wait_rejected(cfg, "v2")
    assert "exceeded its time limit of 0.05 s" in reason
    assert fleet.status(cfg)["active"]["version"] == "v1" and serves(sock, "v1")


def test_two_agents_share_one_engine_through_s3(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    share = f'[share]\nenabled = true\nbucket = "{fleet.bucket}"\npoll_s = 0.2\n'
    cfgs = [
        fleet.agent_config(d, extra=share + f'trusted_builders = ["{o}"]\n')
        for d, o in (("go2-01", "go2-02"), ("go2-02", "go2-01"))
    ]
    for cfg in cfgs:
        fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "m.onnx"), "v1")
    for cfg in cfgs:
        fleet.wait_active(cfg, "v1")
    sources = sorted(figures(fleet, cfg, "v1")["engine_source"] for cfg in cfgs)
    assert sources == ["built", "shared"]
    wait_for(lambda: build_events(fleet), 20, "engine_built event")
    assert len(build_events(fleet)) == 1
    listed = fleet.s3.client().list_objects_v2(Bucket=fleet.bucket, Prefix="engines/").get("Contents", [])
    assert sorted(o["Key"].rsplit("/", 1)[-1].split(".")[-1] for o in listed) == ["engine", "json"]


def test_a_newer_model_cancels_the_build_it_supersedes(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config()
    agent = fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    child = build_child(agent)
    os.kill(child, signal.SIGSTOP)  # v1's build hangs
    wait_for(lambda: (fleet.status(cfg).get("pending") or {}).get("build"), 20, "build in status")
    fleet.publish(mlp(tmp_path / "v2.onnx", seed=2), "v2")
    assert fleet.wait_rejected(cfg, "v1") == "cancelled while building: superseded by v2"
    fleet.wait_active(cfg, "v2")
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_a_damaged_active_engine_is_rebuilt_at_start_never_loaded(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config()
    agent = fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "m.onnx"), "v1")
    fleet.wait_active(cfg, "v1")
    key = models(fleet, cfg)[0]["engine_key"]
    stop(agent)
    engine = cfg.parent / "state" / "engines" / key
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    fleet.start_agent(cfg)
    fleet.wait_active(cfg, "v1")
    history = models(fleet, cfg)
    assert [m["state"] for m in history] == ["active", "rolled_back"]
    assert "fails its check: engine hashes to" in history[1]["reason"]
    assert history[0]["figures"]["engine_source"] == "built" and history[0]["engine_key"] == key
    assert serves(cfg.parent / "run" / "infer.sock", "v1")


def test_an_engine_that_hashes_right_but_does_not_load_is_rebuilt_once(fleet: Fleet, tmp_path: Path) -> None:
    """A cached engine whose sidecar matches but whose bytes do not load (a runtime that changed
    under the same version string, a file written by a buggy builder) is built again, not trusted."""
    fleet.start_collector()
    cfg = fleet.agent_config()
    model = mlp(tmp_path / "v1.onnx")
    key = engine_key(hashlib.sha256(model.read_bytes()).hexdigest(), OnnxRuntimeBackend())
    engine = Store(cfg.parent / "state").engine_path(key)
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"not an engine")
    cache.write_sidecar(
        engine, cache.describe(engine, key, backend="onnxruntime", version="?", builder="go2-01", build_s=0.0)
    )
    fleet.start_agent(cfg)
    fleet.publish(model, "v1")
    fleet.wait_active(cfg, "v1")
    wait_for(lambda: build_events(fleet), 20, "engine_built event")
    assert [e["engine_key"] for e in build_events(fleet)] == [key]
    assert cache.problem(engine, key) is None and engine.read_bytes() != b"not an engine"
    log = (cfg.parent / "agent.log").read_text()
    assert f"engine {key} (cache) failed in its serving process (the engine does not load" in log
    assert "rebuilding it" in log
