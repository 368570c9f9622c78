"""Power cuts during a deploy and a swap: the state dir as it would be after a cut at each fsync,
fdatasync and rename (tests/powercut.py has the model), an agent started on each, and the
invariants checked: the database is sound and consistent, the model its history says is active
serves within the bound and answers as that model does, and the cloud never heard of a transition
the device would not remember."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
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


def _durable_story(db_file: Path) -> tuple[list[str], str | None, Counter[tuple[int, str]]]:
    """(problems, active version, transitions) of a snapshot's database, read from a copy (SQLite
    recovers its WAL there, as the agent's first open does)."""
    db = sqlite3.connect(db_file)
    try:
        problems = db_problems(db)
        row = db.execute("SELECT version FROM models WHERE state='active' ORDER BY id DESC").fetchone()
        transitions = Counter((int(m), str(s)) for m, s in db.execute("SELECT model_id, state FROM transitions"))
    finally:
        db.close()
    return problems, (row[0] if row else None), transitions


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


def test_a_power_cut_at_any_sync_or_rename_leaves_a_state_that_serves(fleet: Fleet, tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-power")
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
    with PowerCuts(state, tmp_path / "powercut.sock", heard.seen) as cuts:
        agent = fleet.spawn(
            [bin_path("agent"), "--config", str(cfg), "run"],
            cfg.parent / "agent.log",
            cuts.env(shim),
        )
        fleet.publish(models["v2"], "v2")
        fleet.wait_active(cfg, "v2", timeout=120)
        wait_for(lambda: fleet.status(cfg)["outbox"] == 0, 20, "the outbox to drain")
        stop(agent)
        fleet.procs.remove(agent)
    heard.close()

    reference = {v: _answers(m) for v, m in models.items()}
    ops = Counter(c.split()[1] for c in cuts.calls if c.startswith("pre "))  # every cut, before its call
    slowest = 0.0
    for snap in cuts.snapshots:
        slowest = max(slowest, _restart_on(fleet, tmp_path, snap, cuts, reference))
    print(
        f"\npower cuts: {cuts.cuts} instants ({dict(ops)}), {len(cuts.snapshots)} distinct durable states; "
        f"an agent started on each served the model its history says within {slowest:.2f} s"
    )
    assert ops["fdatasync"] > 10 and ops["fsync"] > 4 and ops["rename"] >= 3  # SQLite's commits, the files


def _restart_on(fleet: Fleet, tmp_path: Path, snap: Snapshot, cuts: PowerCuts, reference: dict[str, Any]) -> float:
    where = tmp_path / "cut" / str(snap.index)
    cuts.write(snap, where / "state")
    probe = tmp_path / "cut" / f"{snap.index}.db"
    for suffix in ("", "-wal"):
        if (where / "state" / f"agent.db{suffix}").exists():
            shutil.copy(where / "state" / f"agent.db{suffix}", f"{probe}{suffix}")
    problems, active, transitions = _durable_story(probe)
    heard = Counter(snap.seen) - transitions
    assert not problems, f"cut before {snap.at}: {problems}"
    assert not heard, f"cut before {snap.at}: the cloud heard of transitions the device lost: {sorted(heard)}"
    assert active in ("v1", "v2"), f"cut before {snap.at}: active {active}"

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
        rollback = fleet.status(cfg)["last_rollback"]
    finally:
        stop(agent)
        fleet.procs.remove(agent)
    assert version == active, f"cut before {snap.at}: {version} served, the history says {active}"
    assert rollback is None, f"cut before {snap.at}: {active} did not come back from its stored engine: {rollback}"
    np.testing.assert_allclose(out, reference[version], rtol=1e-4, atol=1e-5, err_msg=f"cut before {snap.at}")
    return took
