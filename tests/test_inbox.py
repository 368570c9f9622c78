"""The drop folder with a running agent: picked up on close-after-write or move-into only; a
truncated or altered copy is rejected with a reason and never activated."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.system.inbox import Intake
from scripts.loopback.service_harness import agent_cli, agent_process, offline_config
from tests.conftest import mlp, wait_for


def _status(cfg: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(agent_cli(cfg, "status", "--json").stdout)
    return result


def _wait_active(cfg: Path, version: str) -> dict[str, Any]:
    return wait_for(
        lambda: (_status(cfg).get("active") or {}).get("version") == version and _status(cfg), 30, f"{version} active"
    )


def _wait_rejected(cfg: Path, version: str) -> str:
    def check() -> str | None:
        r = _status(cfg).get("last_rejected") or {}
        return r["reason"] if r.get("version") == version else None

    return wait_for(check, 30, f"{version} rejected")


@pytest.mark.integration
def test_drop_folder(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    inbox = tmp_path / "state" / "inbox"
    good = mlp(tmp_path / "good.onnx", seed=1).read_bytes()
    other = mlp(tmp_path / "other.onnx", seed=2).read_bytes()
    with agent_process(cfg, {}):
        wait_for(inbox.is_dir, 20, "the inbox")

        # Written slowly, like scp: nothing happens until the writer closes the file.
        with (inbox / "slow.onnx").open("wb") as f:
            f.write(good[: len(good) // 2])
            f.flush()
            time.sleep(1.5)
            assert (inbox / "slow.onnx").exists() and _status(cfg)["pending"] is None
            f.write(good[len(good) // 2 :])
        s = _wait_active(cfg, "slow")
        assert s["active"]["source"] == "local" and not (inbox / "slow.onnx").exists()

        # An interrupted copy also closes: the ONNX parse rejects it.
        (inbox / "cut.onnx").write_bytes(other[: len(other) // 3])
        assert "not a valid ONNX model" in _wait_rejected(cfg, "cut")

        # Same length, one weight changed: still valid ONNX, but the sidecar hash says no.
        altered = bytearray(other)
        altered[-100] ^= 0xFF
        (inbox / "flip.onnx.sha256").write_text(f"{hashlib.sha256(other).hexdigest()}  flip.onnx\n")
        (inbox / "flip.onnx").write_bytes(bytes(altered))
        assert "does not match its sidecar" in _wait_rejected(cfg, "flip")
        assert _status(cfg)["active"]["version"] == "slow"  # neither was activated

        # Moved in (rsync, mv), with a manifest sidecar naming the version.
        (inbox / "m.json").write_text(json.dumps({"version": "moved-v2", "sha256": hashlib.sha256(other).hexdigest()}))
        outside = tmp_path / "m.onnx"
        outside.write_bytes(other)
        outside.rename(inbox / "m.onnx")
        _wait_active(cfg, "moved-v2")
        assert sorted(p.name for p in inbox.iterdir()) == []


@pytest.mark.integration
def test_files_dropped_while_stopped_are_checked_at_start(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    inbox = tmp_path / "state" / "inbox"
    inbox.mkdir(parents=True)
    model = mlp(tmp_path / "m.onnx", seed=3).read_bytes()
    (inbox / "early.onnx").write_bytes(model)
    (inbox / "broken.onnx").write_bytes(model[:100])
    with agent_process(cfg, {}):
        _wait_active(cfg, "early")
        assert "not a valid ONNX model" in _wait_rejected(cfg, "broken")


def test_a_file_from_before_the_clock_was_stepped_back_is_taken(tmp_path: Path) -> None:
    """Dropped, then the wall clock stepped back three hours: its modification time lies in the
    future, and it is not "still being written" for three hours."""
    inbox, incoming = tmp_path / "inbox", tmp_path / "incoming"
    inbox.mkdir()
    incoming.mkdir()
    fresh, future = mlp(inbox / "fresh.onnx"), mlp(inbox / "future.onnx", seed=1)
    later = time.time() + 3 * 3600
    os.utime(future, (later, later))
    assert Intake(inbox, incoming).existing(settled_s=2.0) == [future]  # fresh.onnx may still be written
    assert fresh.exists()
