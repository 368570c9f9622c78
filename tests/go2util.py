"""Helpers for the Go2 tests: the data folder (GO2_DATA, default ../shared/go2 beside the repo),
per-test DDS domains on loopback, model variants, and the simulator/controller processes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from scripts.loopback.services import bin_path
from tests.conftest import GO2_DIR, run, wait_for

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "agent" / "go2" / "presets"
_domains = itertools.count()


def need(ok: bool, why: str) -> None:
    """Skip on a developer machine; under CI a missing Go2 prerequisite fails the test."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI must have it)")
        pytest.skip(why)


def go2_data() -> Path:
    need((GO2_DIR / "policy" / "robot_lab.onnx").is_file(), f"no Go2 data at {GO2_DIR} (set GO2_DATA)")
    return GO2_DIR


def need_stack() -> None:
    for mod in ("mujoco", "cyclonedds", "unitree_sdk2py"):
        try:
            __import__(mod)
        except ImportError:
            need(False, f"{mod} is not installed (pip install 'edge-agent[go2]')")


def dds_domain() -> int:
    """A DDS domain of this test's own (cyclonedds' default port mapping allows 0..232)."""
    return 1 + (os.getpid() * 13 + next(_domains)) % 230


def go2_section(
    domain: int,
    data: Path,
    *,
    lockstep: bool = True,
    gate: bool = True,
    command: str = "[0.5, 0.0, 0.0]",
    hold_s: float = 0.5,
    extra: str = "",
) -> str:
    return (
        f'[go2]\ndomain = {domain}\ninterface = "lo"\nsimulated = true\nlockstep = {str(lockstep).lower()}\n'
        f"command = {command}\nhold_s = {hold_s}\n{extra}"
        f'[go2.sim_gate]\nenabled = {str(gate).lower()}\nmjcf = "{data / "mjcf" / "scene_flat.xml"}"\n'
    )


def variant(src: Path, dest: Path, tag: str, last_layer_scale: float = 1.0) -> Path:
    """The same policy with a different sha256 (doc string), or with its last layer scaled."""
    m = onnx.load(str(src))
    m.doc_string = f"variant {tag}"
    if last_layer_scale != 1.0:
        for init in m.graph.initializer:
            if init.name in ("actor.6.weight", "actor.6.bias"):
                arr = numpy_helper.to_array(init) * np.float32(last_layer_scale)
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(m, str(dest))
    return dest


def go2(cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([bin_path("agent"), "--config", str(cfg), "go2", *args], check)


def controller_status(cfg: Path) -> dict[str, Any]:
    r = go2(cfg, "status", "--json", check=False)
    if r.returncode != 0:
        return {}
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def arm(cfg: Path, timeout: float = 60) -> dict[str, Any]:
    def attempt() -> dict[str, Any] | None:
        r = go2(cfg, "arm", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    result: dict[str, Any] = wait_for(attempt, timeout, "the controller to accept `agent go2 arm`")
    return result


def wait_mode(cfg: Path, mode: str, timeout: float) -> dict[str, Any]:
    """The first event that put the controller in `mode`."""

    def check() -> dict[str, Any] | None:
        events = controller_status(cfg).get("events", [])
        hits = [e for e in events if e["kind"] == "mode" and e["mode"] == mode]
        return hits[0] if hits else None

    result: dict[str, Any] = wait_for(check, timeout, f"controller mode {mode}")
    return result


def read_trace(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_trace(path: Path, tick: int, timeout: float) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        rows = read_trace(path)
        return rows if rows and rows[-1]["tick"] >= tick else None

    result: list[dict[str, Any]] = wait_for(check, timeout, f"simulated tick {tick}")
    return result
