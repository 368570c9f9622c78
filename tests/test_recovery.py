"""Crashes and outages lose nothing: a SIGKILLed download resumes from its .part offset, and events
made while the broker is down arrive once it is back."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.loopback.services import Mosquitto, MotoS3
from tests.conftest import Fleet, mlp, wait_for

pytestmark = pytest.mark.integration


def test_sigkill_mid_download_resumes_from_part_offset(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-kill")
    agent = fleet.start_agent(cfg)
    big = mlp(tmp_path / "big.onnx", seed=5, pad_bytes=200 * 2**20)
    size = big.stat().st_size
    sha = fleet.publish(big, "big")["manifest"]["sha256"]
    part = cfg.parent / "state" / "models" / f"{sha}.onnx.part"

    def part_size() -> int:
        return part.stat().st_size if part.exists() else 0

    wait_for(lambda: part_size() > size // 10, 60, "a tenth of the download")
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    fleet.procs.remove(agent)
    offset = part_size()
    assert 0 < offset < size, (offset, size)

    fleet.start_agent(cfg)
    fleet.wait_active(cfg, "big", timeout=120)
    log = (cfg.parent / "agent.log").read_text()
    resumed = re.search(r"resuming s3://\S+ from byte (\d+) of (\d+)", log)
    assert resumed is not None, log[-2000:]
    assert int(resumed.group(1)) >= offset and int(resumed.group(2)) == size
    assert not part.exists()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "own-broker")
    m.start()
    yield m
    m.stop()


def test_events_made_while_the_broker_is_down_arrive_after_it_returns(
    tmp_path: Path, own_broker: Mosquitto, s3: MotoS3
) -> None:
    fleet = Fleet(tmp_path, own_broker, s3)
    try:
        fleet.start_collector()
        cfg = fleet.agent_config("go2-outage")
        fleet.start_agent(cfg)
        fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
        fleet.wait_active(cfg, "v1")
        wait_for(lambda: any(e.get("state") == "active" for e in fleet.events("go2-outage")), 20, "v1 event")

        own_broker.stop()
        wait_for(lambda: not fleet.status(cfg)["broker"]["connected"], 20, "agent sees the broker gone")
        fleet.agent(cfg, "deploy", str(mlp(tmp_path / "v2.onnx", seed=2)), "--version", "offline-v2")
        fleet.wait_active(cfg, "offline-v2")
        assert fleet.status(cfg)["outbox"] > 0
        assert not any(e.get("version") == "offline-v2" for e in fleet.events("go2-outage"))

        own_broker.start()
        wait_for(
            lambda: any(
                e.get("version") == "offline-v2" and e.get("state") == "active" for e in fleet.events("go2-outage")
            ),
            60,
            "the offline events in fleet events",
        )
        states = [
            e["state"]
            for e in fleet.events("go2-outage")
            if e.get("version") == "offline-v2" and e["kind"] == "model_state"
        ]
        assert states == ["announced", "verified", "building", "validating", "staged", "active"]
        assert all(
            e["source"] == "local"
            for e in fleet.events("go2-outage")
            if e.get("version") == "offline-v2" and e["kind"] == "model_state"
        )
        wait_for(lambda: fleet.status(cfg)["outbox"] == 0, 20, "outbox drained")
        rows = json.loads(fleet.fleet("status", "--json").stdout)
        assert rows[0]["active_version"] == "offline-v2"
    finally:
        fleet.close()
