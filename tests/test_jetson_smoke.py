"""scripts/jetson-smoke runs the Jetson's engine path anywhere with --backend onnxruntime (as CI does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "jetson-smoke"


def test_jetson_smoke_with_onnxruntime() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "onnxruntime", "--runs", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert lines["backend"].startswith("backend    onnxruntime ")
    assert "in a child process (starting -> optimizing -> saving)" in lines["build"]
    assert lines["compare"].startswith("compare    PASS") and "atol 1e-05, rtol 1e-05" in lines["compare"]
    assert "p50" in lines["latency"]


def test_jetson_smoke_explains_a_missing_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is importable here: the smoke test runs the real thing")
    except ImportError:
        pass
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "tensorrt"], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 2 and "backend tensorrt is not usable here: tensorrt is not importable" in r.stdout
