"""The scheduling classes the agent gives its processes (agent.proc.sched), as the kernel reports them."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.proc import sched
from agent.serving.pipe import Identity
from agent.serving.process import ServingProcess
from tests.conftest import mlp

ROOT = os.geteuid() == 0


@pytest.fixture
def background_class() -> Iterator[None]:
    yield
    sched.choose_background(0)  # the default for the rest of this test process


def _sleeper() -> None:
    time.sleep(30)


def _in_background() -> tuple[int, int]:
    proc = multiprocessing.get_context("spawn").Process(target=_sleeper, daemon=True)
    sched.start_in_background(proc)
    assert proc.pid is not None
    try:
        return os.sched_getscheduler(proc.pid), os.getpriority(os.PRIO_PROCESS, proc.pid)
    finally:
        proc.kill()
        proc.join(5)


@pytest.mark.skipif(not ROOT, reason="SCHED_FIFO needs root or RLIMIT_RTPRIO")
def test_beside_a_fifo_serving_process_the_background_is_batch_not_idle(background_class: None) -> None:
    assert sched.choose_background(70) == "SCHED_BATCH nice 10"
    assert _in_background() == (os.SCHED_BATCH, sched.BACKGROUND_NICE)


def test_beside_a_fair_class_serving_process_the_background_is_idle(background_class: None) -> None:
    assert sched.choose_background(0) == "SCHED_IDLE"
    assert _in_background()[0] == os.SCHED_IDLE


def test_an_engine_less_serving_process_starts_at_the_daemons_priority(tmp_path: Path) -> None:
    """It is needed at once (start-up: "no active model yet"); a background one can starve for
    minutes on a CPU that other work keeps busy."""
    backend = OnnxRuntimeBackend()
    empty = ServingProcess(backend, None, Identity("", "", backend.name))
    engine = tmp_path / "m.engine"
    backend.build(mlp(tmp_path / "m.onnx"), engine)
    loading = ServingProcess(backend, engine, Identity("m", "sha-m", backend.name))
    try:
        assert os.sched_getscheduler(empty.pid) == os.sched_getscheduler(0)
        assert sched.describe(empty.pid) == sched.describe(os.getpid())
        assert os.sched_getscheduler(loading.pid) == os.SCHED_IDLE
        assert sched.describe(loading.pid) == f"SCHED_IDLE nice {sched.BACKGROUND_NICE}"
    finally:
        empty.close()
        loading.close()
