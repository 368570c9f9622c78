"""Latency history end to end on real services: an agent serves v1, then v2 published from Python
(the training job's API, with a golden file from its helper), telemetry flows through mosquitto,
`fleet collect` stores the histograms, and `fleet latency` / `fleet compare` read them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cloud import Fleet as FleetAPI
from cloud.golden import write_golden
from tests.conftest import Fleet, mlp, wait_for
from tests.test_end_to_end import start_load, stop_load
from tests.test_latency_history import png_size

pytestmark = pytest.mark.integration


def history(fleet: Fleet, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(fleet.fleet("latency", "--json", *args).stdout)
    return result


def calls(fleet: Fleet, version: str) -> int:
    return sum(v["calls"] for v in history(fleet)["versions"] if v["version"] == version)


def golden_for(model: Path, path: Path) -> Path:
    """What a training job does: sample inputs, its framework's outputs (here ONNX Runtime's)."""
    obs = np.random.default_rng(5).standard_normal((4, 1, 48)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    actions = np.stack([session.run(None, {"obs": o})[0] for o in obs])
    return write_golden(path, {"obs": obs}, {"actions": actions})


def test_latency_history_from_a_serving_agent(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config("go2-01")
    fleet.start_agent(cfg)
    v1, v2 = mlp(tmp_path / "v1.onnx", seed=1), mlp(tmp_path / "v2.onnx", seed=2)
    fleet.publish(v1, "v1")
    fleet.wait_active(cfg, "v1")
    load, out = start_load(fleet, cfg, hz=200)
    wait_for(lambda: calls(fleet, "v1") >= 200, 30, "v1's calls in fleet latency")

    ann = FleetAPI.from_config(fleet.fleet_cfg).publish(
        v2, channel=fleet.channel, version="v2", golden=golden_for(v2, tmp_path / "golden.npz")
    )
    assert ann.manifest.version == "v2" and ann.manifest.golden is not None and ann.channel == fleet.channel
    fleet.wait_active(cfg, "v2")
    wait_for(lambda: calls(fleet, "v2") >= 200, 30, "v2's calls in fleet latency")
    seen = stop_load(load, out)
    assert seen["failed"] == 0, seen
    # Every answered call is in the history once, under the version that answered it.
    served = fleet.status(cfg)["requests"]
    wait_for(lambda: calls(fleet, "v1") + calls(fleet, "v2") == served, 15, f"{served} calls in the history")
    gated = [e for e in fleet.events("go2-01") if e.get("version") == "v2" and e.get("state") == "staged"]
    assert "golden" in json.dumps(gated), gated  # the gate checked the helper's golden file

    report = history(fleet)
    assert [(v["channel"], v["version"]) for v in report["versions"]] == [(fleet.channel, "v1"), (fleet.channel, "v2")]
    for v in report["versions"]:
        (device,) = v["devices"]
        assert device["device_id"] == "go2-01" and device["calls"] == v["calls"]
        assert 0 < v["p50_us"] <= v["p90_us"] <= v["p99_us"] <= v["p999_us"] <= v["max_us"]
    assert [v["version"] for v in history(fleet, "--version", "v2")["versions"]] == ["v2"]
    assert history(fleet, "--device", "go2-99")["versions"] == []

    text = fleet.fleet("latency", "--channel", fleet.channel).stdout
    assert "P99.9 µs" in text and "(all)" in text and "go2-01" in text and " v2 " in text

    compared = json.loads(fleet.fleet("compare", "v1", "v2", "--json").stdout)
    (row,) = compared["devices"]
    assert row["device_id"] == "go2-01" and row["v1"]["calls"] == calls(fleet, "v1")
    assert row["ratio"]["p99_us"] == pytest.approx(row["v2"]["p99_us"] / row["v1"]["p99_us"])
    assert "ratio" in fleet.fleet("compare", "v1", "v2").stdout

    png = tmp_path / "latency.png"
    pytest.importorskip("matplotlib")
    fleet.fleet("latency", "--since", "1h", "--plot", str(png))
    assert png_size(png) == (1200, 600)

    bad = fleet.fleet("latency", "--since", "1 day", check=False)
    assert bad.returncode == 2 and "is not a duration" in bad.stderr
    missing = fleet.fleet("compare", "v1", "v9", check=False)
    assert missing.returncode != 0 and "no device ran both v1 and v9" in missing.stderr
