"""Memory on an 8 GB Orin Nano: every serving process and build child holds a CUDA context there.
`serving_max_processes` bounds how many live at once; a candidate that would pass the bound waits
for the watch to end (the previous model is then unloaded). Counted from /proc, around a real agent
(mosquitto, moto) with three publishes back to back; the same run without a bound passes it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from scripts.loopback.models import mlp
from tests.conftest import Fleet

COUNTED = ("edge-serve", "edge-build")  # the processes that hold a CUDA context on a Jetson
WATCH = "[watch]\nwindow_s = 3\n"


def children(pid: int) -> int:
    """The agent's children named edge-serve or edge-build (PR_SET_NAME), now."""
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        n += int(rest[1]) == pid and name in COUNTED
    return n


def three_publishes(fleet: Fleet, tmp_path: Path, bound: int) -> tuple[int, float]:
    """(the most CUDA processes seen at once, seconds between v2 and v3 becoming active)."""
    cfg = fleet.agent_config(f"go2-mem{bound}", extra=f"serving_max_processes = {bound}\n{WATCH}")
    agent = fleet.start_agent(cfg)
    most, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            most[0] = max(most[0], children(agent.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, name="proc-sampler")
    sampler.start()
    try:
        fleet.publish(mlp(tmp_path / f"v1-{bound}.onnx", seed=1), "v1")
        fleet.wait_active(cfg, "v1")
        fleet.publish(mlp(tmp_path / f"v2-{bound}.onnx", seed=2), "v2")
        t2 = time.monotonic()
        fleet.wait_active(cfg, "v2")
        fleet.publish(mlp(tmp_path / f"v3-{bound}.onnx", seed=3), "v3")  # during v2's watch
        fleet.wait_active(cfg, "v3", timeout=60)
        return most[0], time.monotonic() - t2
    finally:
        stop.set()
        sampler.join(5)


@pytest.mark.parametrize("bound", [2, 0])
def test_serving_max_processes_holds_a_candidate_until_the_watch_ends(fleet: Fleet, tmp_path: Path, bound: int) -> None:
    most, v2_to_v3 = three_publishes(fleet, tmp_path, bound)
    print(f"\nserving_max_processes = {bound}: at most {most} serving/build processes; v2 -> v3 {v2_to_v3:.1f} s")
    if bound:
        assert most <= bound
        assert v2_to_v3 >= 3.0  # v3 waited for v2's watch (3 s) to end
    else:
        assert most > 2  # without a bound the watch's previous model, the active one and v3 overlap
