"""Power cuts during a deploy and a swap, and during a rollback (`agent rollback`, `fleet rollback`):
the state dir as it would be after a cut at each fsync, fdatasync and rename (tests/powercut.py has
the model), an agent started on each, and the invariants checked: the database is sound and
consistent, the model its history says is active (v1 or v2, never none) serves within the bound and
answers as that model does and is watched if its watch was running, and the cloud never heard of a
transition the device would not remember."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.client import Policy
from agent.contract.mqtt_client import make_client
from agent.contract.protocol import Topics
from agent.errors import AgentError
from scripts.loopback.services import bin_path, stop, write_agent_config
from tests.conftest import Fleet, mlp, wait_for
from tests.invariants import db_problems
from tests.powercut import PowerCuts, Snapshot, build_shim

pytestmark = pytest.mark.integration

RESTART_BOUND_S = 10.0
OBS = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 48)


class Heard:
    """The cloud's side: every model_state event the device published, as (model_id, state)."""

    def __init__(self, fleet: Fleet, device: str) -> None:
        self.seen: list[tuple[int, str]] = []
        self.client = make_client(f"heard-{uuid.uuid4().hex[:6]}", fleet.broker.url)
        self.client.on_message = self._message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        topic = Topics(fleet.prefix).events(device)
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", fleet.broker.port)
        self.client.loop_start()
        assert ready.wait(10), "the subscriber did not connect"

    def _message(self, _c: Any, _u: Any, msg: Any) -> None:
        event = json.loads(msg.payload)
        if event.get("kind") == "model_state":
            self.seen.append((int(event["model_id"]), str(event["state"])))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Story:
    """What a state dir's database says, read from a copy (SQLite recovers its WAL there, as the
    agent's first open does)."""

    problems: list[str]
    active: str | None
    transitions: Counter[tuple[int, str]]
    watched: bool  # the active model came from a deploy, not back from retired: its watch runs (window 1 h)

    @property
    def rolled_back(self) -> Counter[int]:
        return Counter({m: n for (m, s), n in self.transitions.items() if s == "rolled_back"})


def _durable_story(db_file: Path) -> Story:
    db = sqlite3.connect(db_file)
    try:
        problems = db_problems(db)
        row = db.execute("SELECT id, version FROM models WHERE state='active' ORDER BY id DESC").fetchone()
        transitions = Counter((int(m), str(s)) for m, s in db.execute("SELECT model_id, state FROM transitions"))
        came = db.execute(
            "SELECT state FROM transitions WHERE model_id=? ORDER BY id DESC LIMIT 1 OFFSET 1", (row[0] if row else -1,)
        ).fetchone()
    finally:
        db.close()
    return Story(problems, row[1] if row else None, transitions, came is not None and came[0] != "retired")


def _answers(model: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"obs": OBS})[0])


def _first_answer(socket_path: Path) -> tuple[str, np.ndarray]:
    def ask() -> tuple[str, np.ndarray] | None:
        try:
            with Policy(socket_path, timeout=0.5) as policy:
                out = policy(OBS)
                return policy.model_version, out
        except (AgentError, OSError):
            return None

    answer: tuple[str, np.ndarray] = wait_for(ask, RESTART_BOUND_S, "an answer from the restarted agent")
    return answer


# What the operator does once v2 is active: the way back to v1 (the cuts before it are the swap's).
ROLLBACKS: dict[str, Callable[[Fleet, Path], object]] = {
    "agent rollback": lambda fleet, cfg: fleet.agent(cfg, "rollback"),  # v1 still loaded: v2's watch runs
    "fleet rollback": lambda fleet, cfg: fleet.fleet("rollback", "--channel", fleet.channel, "--to", "v1"),
}


@pytest.mark.parametrize("then", ["swap", *ROLLBACKS])
def test_a_power_cut_at_any_sync_or_rename_leaves_a_state_that_serves(fleet: Fleet, tmp_path: Path, then: str) -> None:
    """swap: an agent is started on every cut of v2's deploy and swap; a rollback: v2 comes the same
    way, then the rollback to v1 is recorded too, and an agent is started on every cut of it."""
    cfg = fleet.agent_config("go2-power", extra="[watch]\nwindow_s = 3600\n")  # no watch ends in the run
    state = cfg.parent / "state"
    agent = fleet.start_agent(cfg)
    models = {"v1": mlp(tmp_path / "v1.onnx", seed=1), "v2": mlp(tmp_path / "v2.onnx", seed=2)}
    fleet.publish(models["v1"], "v1")
    fleet.wait_active(cfg, "v1", timeout=60)
    stop(agent)
    fleet.procs.remove(agent)
    os.sync()  # what is on disk before the run is durable

    heard = Heard(fleet, "go2-power")
    shim = build_shim(tmp_path)
    phase = "swap" if then == "swap" else "rollback"
    with PowerCuts(state, tmp_path / "powercut.sock", heard.seen) as cuts:
        cuts.phase = "swap"
        agent = fleet.spawn(
            [bin_path("agent"), "--config", str(cfg), "run"],
            cfg.parent / "agent.log",
            cuts.env(shim),
        )
        _until_settled(fleet, cfg, "v2", lambda: fleet.publish(models["v2"], "v2"))
        if then in ROLLBACKS:
            cuts.phase = "rollback"
            _until_settled(fleet, cfg, "v1", lambda: ROLLBACKS[then](fleet, cfg))
        stop(agent)
        fleet.procs.remove(agent)
    heard.close()

    reference = {v: _answers(m) for v, m in models.items()}
    ops = Counter(c.split()[1] for p, c in cuts.calls if p == phase and c.startswith("pre "))  # each cut
    snapshots = [snap for snap in cuts.snapshots if snap.phase == phase]
    restarts = [_restart_on(fleet, tmp_path, snap, cuts, reference) for snap in snapshots]
    print(
        f"\npower cuts during the {then}: {sum(ops.values())} instants ({dict(ops)}), {len(snapshots)} distinct "
        f"durable states (of {len(cuts.snapshots)} in the run); an agent started on each served the model its "
        f"history says within {max(took for took, _ in restarts):.2f} s"
    )
    if then == "swap":
        assert ops["fdatasync"] > 10 and ops["fsync"] > 4 and ops["rename"] >= 3  # SQLite's commits, the files
    assert {active for _, active in restarts} == {"v1", "v2"}, f"the cuts missed a side of the {then}"


def _until_settled(fleet: Fleet, cfg: Path, version: str, act: Callable[[], object]) -> None:
    act()
    fleet.wait_active(cfg, version, timeout=120)
    wait_for(lambda: fleet.status(cfg)["outbox"] == 0, 20, "the outbox to drain")


def _restart_on(
    fleet: Fleet, tmp_path: Path, snap: Snapshot, cuts: PowerCuts, reference: dict[str, Any]
) -> tuple[float, str]:
    """(restart -> first answer, the version the history says is active) on this snapshot."""
    where = tmp_path / "cut" / str(snap.index)
    cuts.write(snap, where / "state")
    probe = tmp_path / "cut" / f"{snap.index}.db"
    for suffix in ("", "-wal"):
        if (where / "state" / f"agent.db{suffix}").exists():
            shutil.copy(where / "state" / f"agent.db{suffix}", f"{probe}{suffix}")
    story = _durable_story(probe)
    heard = Counter(snap.seen) - story.transitions
    assert not story.problems, f"cut before {snap.at}: {story.problems}"
    assert not heard, f"cut before {snap.at}: the cloud heard of transitions the device lost: {sorted(heard)}"
    assert story.active in ("v1", "v2"), f"cut before {snap.at}: active {story.active}"

    cfg = write_agent_config(
        where / "agent.toml",
        broker=fleet.broker.url,
        s3=fleet.s3.url,
        state_dir=where / "state",
        socket_path=where / "run" / "infer.sock",
        channel=fleet.channel,
        device_id=f"cut-{snap.index}",
        prefix=fleet.prefix,
    )
    started = time.monotonic()
    agent = fleet.start_agent(cfg)
    try:
        version, out = _first_answer(where / "run" / "infer.sock")
        took = time.monotonic() - started
        status = fleet.status(cfg)
    finally:
        stop(agent)
        fleet.procs.remove(agent)
    after = _durable_story(where / "state" / "agent.db")
    assert version == story.active, f"cut before {snap.at}: {version} served, the history says {story.active}"
    assert after.rolled_back == story.rolled_back, (
        f"cut before {snap.at}: {story.active} did not come back from its stored engine: rolled back"
        f" {sorted((after.rolled_back - story.rolled_back).elements())}"
    )
    if status["active"]["version"] == version:  # not replaced yet (the channel's retained announcement)
        watched = (status["watch"] or {}).get("version")
        assert watched == (version if story.watched else None), (
            f"cut before {snap.at}: {version} active, the watch of {watched} runs (history: watched {story.watched})"
        )
    np.testing.assert_allclose(out, reference[version], rtol=1e-4, atol=1e-5, err_msg=f"cut before {snap.at}")
    return took, version
