"""Precision that passes its own gate: FP16 first where the backend has it, judged with FP16's own
golden tolerances; an FP16 engine that misses the golden outputs is rebuilt in FP32 and the reason
recorded (history, `agent status`, `agent models`). On CI the FP16 engine is emulated through ONNX
Runtime (`[build] emulate_fp16`: weights rounded to FP16), with a real agent, mosquitto and moto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scripts.loopback.models import cancelling, mlp
from tests.conftest import Fleet
from tests.test_hot_swap import golden_for

FP16 = "[build]\nemulate_fp16 = true\n"


def ones_golden(out: Path) -> Path:
    """Inputs (1, 1), where 1000.3 x0 - 1000 x1 cancels to 0.3 (computed in float64 from the weights)."""
    x = np.ones((4, 1, 2), np.float32)
    y = (x.astype(np.float64) @ np.array([[np.float32(1000.3)], [-1000.0]])).astype(np.float32)
    np.savez(out, **{"inputs/obs": x, "outputs/actions": y})
    return out


def test_an_fp16_engine_that_misses_its_golden_outputs_is_rebuilt_in_fp32(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-fp16", extra=FP16)
    fleet.start_agent(cfg)
    model = cancelling(tmp_path / "cancel.onnx")
    fleet.publish(model, "v1", "--golden", str(ones_golden(tmp_path / "g.npz")))
    s = fleet.wait_active(cfg, "v1", timeout=60)
    assert s["active"]["precision"] == "fp32"
    note = s["active"]["precision_note"]
    assert note.startswith("fp16 engine failed its golden check (max abs error 0.2") and note.endswith(
        "rebuilt in fp32"
    )
    history = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    v1 = next(r for r in history if r["version"] == "v1")
    assert v1["figures"]["precision"] == "fp32" and v1["figures"]["gate"]["golden"]["max_abs_err"] < 1e-4
    assert v1["figures"]["fallback"]["gate"]["golden"]["passed"] is False  # the FP16 attempt's figures
    assert "fp32" in fleet.agent(cfg, "models").stdout
    assert "rebuilt in fp32" in fleet.agent(cfg, "status").stdout


def test_a_correct_fp16_engine_passes_with_fp16_tolerances(fleet: Fleet, tmp_path: Path) -> None:
    """An MLP policy in FP16 misses FP32's 1e-4 but is within FP16's 1e-2: it serves as FP16."""
    cfg = fleet.agent_config("go2-fp16ok", extra=FP16)
    fleet.start_agent(cfg)
    model = mlp(tmp_path / "m.onnx", seed=4)
    fleet.publish(model, "v1", "--golden", str(golden_for(model, tmp_path / "g.npz")))
    s = fleet.wait_active(cfg, "v1", timeout=60)
    assert s["active"]["precision"] == "fp16" and s["active"]["precision_note"] is None
    history = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    golden = next(r for r in history if r["version"] == "v1")["figures"]["gate"]["golden"]
    assert golden["passed"] and golden["atol"] == 1e-2 and golden["max_abs_err"] > 1e-6  # really rounded
