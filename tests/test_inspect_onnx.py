"""The ONNX check's child: kept between checks, replaced after a large file or a crash."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from agent.delivery import onnx_check as mod
from agent.errors import RejectedModel
from scripts.loopback.models import mlp


def test_the_child_is_reused_and_recycled_after_a_large_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp(tmp_path / "m.onnx")
    inputs, _ = mod.inspect_onnx(model)
    assert inputs[0].name == "obs"
    first = mod._CHECKER._proc.pid
    mod.inspect_onnx(model)
    assert mod._CHECKER._proc.pid == first  # no process start per check

    monkeypatch.setattr(mod, "RECYCLE_BYTES", model.stat().st_size - 1)
    mod.inspect_onnx(model)
    assert mod._CHECKER._proc is None  # it parsed a "large" file: its memory goes back


def test_a_bad_file_and_a_dead_child_are_reasons(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(RejectedModel) as err:
        mod.inspect_onnx(bad)
    assert err.value.stage == "onnx"
    alive = mod._CHECKER._proc
    assert alive is not None and alive.is_alive()  # a rejected file does not cost the child

    os.kill(alive.pid, signal.SIGKILL)
    alive.join(5)
    inputs, _ = mod.inspect_onnx(mlp(tmp_path / "m.onnx"))  # a new child takes over
    assert inputs and mod._CHECKER._proc.pid != alive.pid
