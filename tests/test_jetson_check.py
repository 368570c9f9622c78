"""scripts/jetson-check runs the Jetson's verdict table anywhere with --backend onnxruntime (as CI
does), the TensorRT-only lines marked N/A, so that it cannot rot before it meets a Jetson."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.jetson_check import unit_properties

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "jetson-check"
UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edge-agent.service"


def table(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        name, status, *rest = line.split(maxsplit=2)
        rows[name] = (status, rest[0] if rest else "")
    return rows


def test_jetson_check_with_onnxruntime() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "onnxruntime", "--runs", "200", "--emulate-fp16"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = table(r.stdout)
    print(r.stdout)
    assert rows["backend"] == ("PASS", "onnxruntime " + rows["backend"][1].split(" ", 1)[1])
    for name in ("cuda_context", "timing_cache_reuse"):  # only a Jetson fills these
        assert rows[name][0] == "N/A"
    for name in ("build_fp32", "build_fp16", "accuracy_fp32", "accuracy_fp16", "engine_io", "dynamic_batch"):
        assert rows[name][0] == "PASS", rows[name]
    assert "in a child process (starting -> optimizing -> saving)" in rows["build_fp32"][1]
    assert "atol = rtol = 1e-05" in rows["accuracy_fp32"][1] and "atol = rtol = 0.01" in rows["accuracy_fp16"][1]
    assert rows["serving_path"][0] == "PASS" and "exit codes [0, 0]" in rows["serving_path"][1]
    assert rows["latency"][0] == "INFO" and "served during a build p99" in rows["latency"][1]
    assert rows["memory_per_process"][0] == "INFO" and "MiB per serving process" in rows["memory_per_process"][1]
    assert rows["sched_fifo"][0] in ("PASS", "WARN")  # FAIL only on a Jetson
    assert rows["verdict"][0] == "PASS"


def test_jetson_check_explains_a_missing_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is importable here: the check runs the real thing")
    except ImportError:
        pass
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "tensorrt"], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 2 and "backend tensorrt is not usable here: tensorrt is not importable" in r.stdout


def test_the_sandbox_is_the_units() -> None:
    props = unit_properties(UNIT.read_text())
    assert "User=edge-agent" in props and "SystemCallFilter=~@privileged" in props and "LimitRTPRIO=70" in props
    assert not any(p.startswith(("ExecStart", "Type", "WatchdogSec")) for p in props)
