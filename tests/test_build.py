"""The build child process: started fresh, time limit, memory guard, kill from outside, crash,
cancellation. All through the real ONNX Runtime backend."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import agent.engines.build
from agent.engines.build import BuildConfig, BuildInfo, run_build
from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.errors import BuildFailed, Cancelled
from agent.proc.child import exit_reason
from tests.backends import SegfaultingOnnxRuntime
from tests.conftest import mlp


def never() -> str | None:
    return None


def test_build_runs_in_a_fresh_spawned_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent.engines.build.START_METHOD == "spawn"
    monkeypatch.setattr(agent.engines.build, "INHERITED_MARK", "parent")  # a forked child would see this
    seen: list[tuple[int, str, str]] = []
    engine = tmp_path / "engine"
    seconds = run_build(
        OnnxRuntimeBackend(),
        mlp(tmp_path / "m.onnx"),
        engine,
        BuildConfig(),
        precision="fp32",
        cancelled=never,
        on_progress=lambda i: seen.append((i.pid, i.stage, i.child_mark)),
    )
    assert engine.stat().st_size > 0 and seconds > 0
    pids = {pid for pid, _, _ in seen}
    assert len(pids) == 1 and os.getpid() not in pids
    assert [s for _, s, _ in seen][:1] == ["starting"] and "optimizing" in [s for _, s, _ in seen]
    assert seen[-1][2] == "fresh"


def test_time_limit_kills_the_build(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    with pytest.raises(BuildFailed, match=r"exceeded its time limit of 0\.05 s"):
        # A spawned interpreter importing ONNX Runtime takes far longer than 50 ms.
        run_build(
            OnnxRuntimeBackend(),
            mlp(tmp_path / "m.onnx"),
            engine,
            BuildConfig(time_limit_s=0.05),
            precision="fp32",
            cancelled=never,
            on_progress=lambda i: None,
        )
    assert not engine.exists() and not (tmp_path / "engine.part").exists()


def test_sigkill_from_outside_is_reported_as_likely_oom(tmp_path: Path) -> None:
    def kill_it(info: BuildInfo) -> None:
        if info.stage == "starting":
            os.kill(info.pid, signal.SIGKILL)

    with pytest.raises(BuildFailed, match=r"killed by signal 9 \(SIGKILL\), likely out of memory"):
        run_build(
            OnnxRuntimeBackend(),
            mlp(tmp_path / "m.onnx"),
            tmp_path / "engine",
            BuildConfig(),
            precision="fp32",
            cancelled=never,
            on_progress=kill_it,
        )


def test_memory_guard_kills_the_build(tmp_path: Path) -> None:
    cfg = BuildConfig(min_available_mb=10**9)  # more than any machine has: the guard fires at once
    with pytest.raises(BuildFailed, match=r"killed by the memory guard: \d+ MiB available"):
        run_build(
            OnnxRuntimeBackend(),
            mlp(tmp_path / "m.onnx"),
            tmp_path / "engine",
            cfg,
            precision="fp32",
            cancelled=never,
            on_progress=lambda i: None,
        )


def test_a_model_the_backend_cannot_build_is_rejected_with_its_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(BuildFailed, match="ONNX Runtime could not load the model"):
        run_build(
            OnnxRuntimeBackend(),
            bad,
            tmp_path / "engine",
            BuildConfig(),
            precision="fp32",
            cancelled=never,
            on_progress=lambda i: None,
        )


def test_cancellation_stops_the_build(tmp_path: Path) -> None:
    with pytest.raises(Cancelled, match="superseded by v2"):
        run_build(
            OnnxRuntimeBackend(),
            mlp(tmp_path / "m.onnx"),
            tmp_path / "engine",
            BuildConfig(),
            precision="fp32",
            cancelled=lambda: "superseded by v2",
            on_progress=lambda i: None,
        )


def test_a_crashing_build_is_reported_with_its_signal(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match=r"killed by signal 11 \(SIGSEGV\)$"):
        run_build(
            SegfaultingOnnxRuntime(),
            mlp(tmp_path / "m.onnx"),
            tmp_path / "engine",
            BuildConfig(),
            precision="fp32",
            cancelled=never,
            on_progress=lambda i: None,
        )


def test_exit_reasons_name_the_signal() -> None:
    assert exit_reason(-11, "the build process") == "the build process was killed by signal 11 (SIGSEGV)"
    assert exit_reason(3, "the build process") == "the build process exited with status 3 without a result"
