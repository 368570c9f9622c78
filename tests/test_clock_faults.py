"""Clock faults: the wall clock stepped forward and back by hours under a running daemon, as NTP or
an operator steps a robot's clock (tests/clockshift_shim.c, preloaded into the agent and its
children; the monotonic clock untouched). The watch window, telemetry intervals, timers and the
outbox run on monotonic time; announcements are judged by sequence; the order of the history
(`agent rollback`'s target, the models kept) by the database's own sequence, never by wall time."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.contract.mqtt_client import make_client
from agent.contract.protocol import Topics
from scripts.loopback.calling import CallingClient
from scripts.loopback.models import mlp
from tests.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration

SHIM = Path(__file__).with_name("clockshift_shim.c")
HOURS_3 = 3 * 3600
WINDOW_S = 3.0
INTERVAL_S = 1.0
# Telemetry every 1 s (the tests' default). Latency is not under test: the gate's budget and the watch's
# rollback factor are generous (CI once rolled v4 back for a p99 of 309 µs against 147 µs).
EXTRA = f"[watch]\nwindow_s = {WINDOW_S}\nkeep_models = 2\nlatency_factor = 10\n[gate]\nlatency_budget_us = 50000\n"


class WallClock:
    """The agent's wall clock: its offset from the real one, changed while it runs."""

    def __init__(self, tmp: Path) -> None:
        self.so = tmp / "clockshift.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(self.so), str(SHIM), "-ldl"], check=True)
        self.file = tmp / "offset"
        self.step_to(0)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.so), "CLOCKSHIFT_FILE": str(self.file)}

    def step_to(self, offset_s: int) -> None:
        data = struct.pack("=q", offset_s * 1_000_000_000)
        if self.file.exists():
            with self.file.open("r+b") as f:  # in place: the agent maps this page
                f.write(data)
        else:
            self.file.write_bytes(data)


class Heard:
    """What the cloud receives from the device: telemetry arrivals (on the test's monotonic
    clock) and events."""

    def __init__(self, fleet: Fleet, device: str) -> None:
        self.telemetry: list[float] = []
        self.events: list[dict[str, Any]] = []
        topics = Topics(fleet.prefix)
        self.topic_t, self.topic_e = topics.telemetry(device), topics.events(device)
        self.client = make_client(f"heard-{uuid.uuid4().hex[:6]}", fleet.broker.url)
        self.client.on_message = self._message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_connect = lambda c, *_a: c.subscribe([(self.topic_t, 1), (self.topic_e, 1)])
        self.client.connect("127.0.0.1", fleet.broker.port)
        self.client.loop_start()
        assert ready.wait(10), "the subscriber did not connect"

    def _message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == self.topic_t:
            self.telemetry.append(time.monotonic())
        else:
            self.events.append(json.loads(msg.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def swap_and_watch(
    fleet: Fleet, cfg: Path, model: Path, version: str, during: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Publish, wait until it serves, call `during` while it is watched: (what its watch had left
    when first seen, how long the test then saw it last). Monotonic clocks: the daemon's, the test's."""
    fleet.publish(model, version)
    deadline = time.monotonic() + 60
    while True:
        asked = time.monotonic()  # before the daemon answers: the watch cannot end earlier than this + left
        s = fleet.status(cfg)
        if (s.get("active") or {}).get("version") == version:
            break
        assert time.monotonic() < deadline, f"{version} not active: {s}"
        time.sleep(0.1)
    if s["watch"] is None:
        raise AssertionError(f"{version}: active without a watch: {s}")
    during()
    wait_for(lambda: fleet.status(cfg)["watch"] is None, 60, f"the end of {version}'s watch")
    return float(s["watch"]["remaining_s"]), time.monotonic() - asked


def test_the_wall_clock_stepped_by_hours_stalls_nothing_and_reorders_nothing(fleet: Fleet, tmp_path: Path) -> None:
    clock = WallClock(tmp_path)
    cfg = fleet.agent_config("clock-01", extra=EXTRA)
    heard = Heard(fleet, "clock-01")
    began = time.monotonic()
    models = [mlp(tmp_path / f"v{i}.onnx", seed=i) for i in range(6)]
    watches = {}
    try:
        fleet.start_agent(cfg, env=clock.env())
        swap_and_watch(fleet, cfg, models[1], "v1")
        with CallingClient(cfg.parent / "run" / "infer.sock", hz=200) as client:
            # Forward in v2's watch (a watch on wall time would end at once), back by six hours in
            # v3's (it would last six hours).
            watches["v2"] = swap_and_watch(fleet, cfg, models[2], "v2", lambda: clock.step_to(+HOURS_3))
            watches["v3"] = swap_and_watch(fleet, cfg, models[3], "v3", lambda: clock.step_to(-HOURS_3))
            watches["v4"] = swap_and_watch(fleet, cfg, models[4], "v4")
            watches["v5"] = swap_and_watch(fleet, cfg, models[5], "v5")
            # v4 and v5 were activated at earlier wall times than v3: the previous model is v4.
            out = fleet.agent(cfg, "rollback", check=False)
            assert out.returncode == 0 and "v4" in out.stdout, out.stdout + out.stderr
            status = fleet.wait_active(cfg, "v4")
            time.sleep(3 * INTERVAL_S)
        elapsed = time.monotonic() - began
        kept = {p.stem for p in (cfg.parent / "state" / "models").glob("*.onnx")}
        wait_for(lambda: fleet.status(cfg)["outbox"] == 0, 20, "the outbox drained")
    finally:
        heard.close()
    gaps = [b - a for a, b in zip(heard.telemetry, heard.telemetry[1:], strict=False)]
    ids = [e["id"] for e in heard.events]
    print(
        f"\nwatches {', '.join(f'{v} {left:.1f} s left, then {s:.2f} s' for v, (left, s) in watches.items())}; "
        f"uptime {status['uptime_s']} s of {elapsed:.1f}; telemetry gaps {min(gaps):.2f}-{max(gaps):.2f} s; "
        f"{len(ids)} events; client {len(client.answers)} answers, {client.failures} failures"
    )
    assert client.failures == 0 and client.longest_gap() < 1.0
    for version, (left, lasted) in watches.items():
        # Neither ended early (a watch on wall time ends at once after a step forward) nor stalled
        # (after a step back, it would wait six hours).
        assert 0 < left <= WINDOW_S and left - 0.1 <= lasted <= left + 5, (version, left, lasted)
    assert 0 <= status["uptime_s"] <= elapsed + 1
    # Telemetry kept its pace through both steps: no stall, no burst catching up.
    assert len(gaps) >= 10 and max(gaps) < 3 * INTERVAL_S and min(gaps) > 0.3 * INTERVAL_S, gaps
    assert len(ids) == len(set(ids)) and len(ids) > 0
    # keep_models = 2: the two that served last (v5, v4) are the ones on disk, not v3 and v2.
    sha = {f"v{i}": hashlib.sha256(m.read_bytes()).hexdigest() for i, m in enumerate(models)}
    assert kept == {sha["v4"], sha["v5"]}, {v: s in kept for v, s in sha.items()}
