"""A full disk: the state dir on a small tmpfs the test mounts, filled during a download, during an
engine write and during SQLite's writes. The daemon says why in `agent status`, keeps serving,
frees its partial files, and carries on by itself once space returns."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.loopback.models import mlp
from tests.conftest import Fleet, wait_for
from tests.invariants import CallingClient, state_dir_problems

pytestmark = pytest.mark.integration

SPACE_BACK_S = 60  # the candidate's next try (every 10 s), its download and build


@pytest.fixture
def small_disk(tmp_path: Path, fleet: Fleet) -> Iterator[Path]:
    """A 64 MiB tmpfs at tmp_path/disk (needs root, as CI has); the agents stop before it goes."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        fleet.close()
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all but `leave` bytes of the filesystem with one file."""
    ballast = disk / "ballast"
    with ballast.open("ab") as f:
        while (free := shutil.disk_usage(disk).free) > leave:
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError:
                break
    return ballast


def device(fleet: Fleet, disk: Path, name: str, max_download_mbps: float = 0) -> Path:
    """An agent whose state dir is on `disk`, with no disk reserve (the disk is the test's)."""
    cfg = fleet.agent_config(name)
    text = cfg.read_text().replace(str(cfg.parent / "state"), str(disk / "state"))
    text = text.replace("[s3]\n", f"[s3]\nmax_download_mbps = {max_download_mbps}\n")
    cfg.write_text(f"disk_reserve_mb = 0\n{text}")
    return cfg


def disk_problem(fleet: Fleet, cfg: Path) -> str | None:
    problem: str | None = fleet.status(cfg)["disk"]["problem"]
    return problem


def parts(state: Path) -> list[str]:
    return [p.name for d in ("models", "engines", "golden") for p in (state / d).glob("*.part*")]


def _back(fleet: Fleet, cfg: Path, ballast: Path, client: CallingClient) -> None:
    """Space returns: the candidate goes through by itself; the client never failed."""
    ballast.unlink()
    fleet.wait_active(cfg, "v2", timeout=SPACE_BACK_S)
    assert disk_problem(fleet, cfg) is None
    assert client.failures == 0, client.last_error
    assert not state_dir_problems(_state(cfg))


def _state(cfg: Path) -> Path:
    for line in cfg.read_text().splitlines():
        if line.startswith("state_dir"):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    raise AssertionError("no state_dir in the config")


def test_a_disk_full_during_a_download(fleet: Fleet, small_disk: Path, tmp_path: Path) -> None:
    cfg = device(fleet, small_disk, "go2-disk-dl", max_download_mbps=8)
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    state = _state(cfg)
    with CallingClient(cfg.parent / "run" / "infer.sock") as client:
        fleet.publish(mlp(tmp_path / "v2.onnx", seed=2, pad_bytes=32 << 20), "v2")
        wait_for(lambda: any(p.endswith(".onnx.part") for p in parts(state)), 30, "the download under way")
        time.sleep(0.5)
        ballast = fill(small_disk)
        problem = wait_for(lambda: disk_problem(fleet, cfg), 30, "the disk problem in agent status")
        print(f"\ndownload: {problem}")
        assert "v2 waits for disk space" in problem and "no space left" in problem.lower()
        assert fleet.status(cfg)["active"]["version"] == "v1"
        assert not parts(state), parts(state)
        _back(fleet, cfg, ballast, client)


def test_a_disk_full_during_an_engine_write(fleet: Fleet, small_disk: Path, tmp_path: Path) -> None:
    cfg = device(fleet, small_disk, "go2-disk-build")
    cfg.write_text(cfg.read_text() + "\n[gate]\nlatency_budget_us = 100000\n")  # a big model, a slow CPU
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    state = _state(cfg)
    big = mlp(tmp_path / "v2.onnx", dims=(48, 2048, 2048, 12), seed=2)  # a 16 MiB model, a 16 MiB engine
    with CallingClient(cfg.parent / "run" / "infer.sock") as client:
        ballast = fill(small_disk, leave=big.stat().st_size + (6 << 20))  # room for the model, not its engine
        fleet.publish(big, "v2")
        problem = wait_for(lambda: disk_problem(fleet, cfg), 60, "the disk problem in agent status")
        print(f"\nengine write: {problem}")
        assert "v2 waits for disk space" in problem and "engine" in problem
        assert fleet.status(cfg)["active"]["version"] == "v1"
        assert not parts(state), parts(state)
        _back(fleet, cfg, ballast, client)


def test_a_disk_full_for_sqlite(fleet: Fleet, small_disk: Path, tmp_path: Path) -> None:
    cfg = device(fleet, small_disk, "go2-disk-db")
    fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    with CallingClient(cfg.parent / "run" / "infer.sock") as client:
        ballast = fill(small_disk)
        fleet.publish(mlp(tmp_path / "v2.onnx", seed=2), "v2")
        problem = wait_for(lambda: disk_problem(fleet, cfg), 30, "the disk problem in agent status")
        print(f"\nsqlite: {problem}")
        assert "disk is full" in problem or "no space left" in problem.lower()
        assert fleet.status(cfg)["active"]["version"] == "v1"
        _back(fleet, cfg, ballast, client)
