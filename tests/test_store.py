from __future__ import annotations

import json
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from agent.coordinator.lifecycle import IllegalTransition, ModelState
from agent.coordinator.reporter import Reporter
from agent.coordinator.store import CACHE_KIB, Store
from tests.test_protocol import manifest


def test_transitions_are_recorded_and_checked(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = store.add(manifest(), "walk", 3, "channel", "announced")
    for state in (
        ModelState.DOWNLOADING,
        ModelState.VERIFIED,
        ModelState.BUILDING,
        ModelState.VALIDATING,
        ModelState.STAGED,
        ModelState.ACTIVE,
    ):
        rec = store.set_state(rec, state, f"to {state.value}", step=state.value)
    assert store.active() == rec and rec.activated_at is not None and rec.figures["step"] == "active"
    with pytest.raises(IllegalTransition):
        store.set_state(rec, ModelState.DOWNLOADING, "no")
    reasons = [r[0] for r in store.db.execute("SELECT reason FROM transitions WHERE model_id=?", (rec.id,))]
    assert reasons[0] == "announced" and reasons[-1] == "to active" and len(reasons) == 7


def test_state_survives_reopen_and_readonly_readers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = store.add(manifest(), "walk", 3, "channel", "announced")
    store.set_state(rec, ModelState.REJECTED, "bad")
    store.set_mark("seq:walk", 3)
    store.close()
    again = Store(tmp_path, readonly=True)
    assert again.last_rejected() is not None and again.last_rejected().reason == "bad"  # type: ignore[union-attr]
    assert again.mark("seq:walk") == 3


def test_old_finished_models_without_files_are_forgotten(tmp_path: Path) -> None:
    """A robot that swaps every night for years keeps a bounded history: beyond the newest `keep`,
    finished models whose files are gone go, with their transitions; one still stored stays."""
    store = Store(tmp_path)
    recs = [store.add(manifest(version=f"v{i}", sha256=f"{i:064x}"), "walk", i, "channel", "x") for i in range(8)]
    for rec in recs[:6]:
        store.set_state(rec, ModelState.REJECTED, "bad")
    assert store.forget_old(keep=3, stored={recs[1].sha256}) == 4  # ids 1..5 are old; v1 is still stored
    left = [r.version for r in store.history()]
    assert left == ["v7", "v6", "v5", "v1"]
    orphans = store.db.execute("SELECT COUNT(*) FROM transitions WHERE model_id NOT IN (SELECT id FROM models)")
    assert orphans.fetchone()[0] == 0


def _served(store: Store, first: int, n: int) -> None:
    """n models through the whole lifecycle, each replacing the one before; every 10th is rejected."""
    store.db.execute("PRAGMA synchronous=OFF")  # thousands of commits; durability is not under test
    figures = {"gate": {c: {"passed": True, "reason": "", "p50_us": 19.5, "p99_us": 55.9} for c in "abcd"}}
    path = (ModelState.DOWNLOADING, ModelState.VERIFIED, ModelState.BUILDING, ModelState.VALIDATING)
    for i in range(first, first + n):
        rec = store.add(manifest(version=f"v{i}", sha256=f"{i:064x}"), "walk", i, "channel", "announced")
        if i % 10 == 5:
            store.set_state(rec, ModelState.REJECTED, "finite: NaN", **figures)
            continue
        for state in path:
            rec = store.set_state(rec, state, state.value)
        rec = store.set_state(store.set_state(rec, ModelState.STAGED, "gate", **figures), ModelState.ACTIVE, "swap")
        for old in store.in_state(ModelState.ACTIVE)[:-1]:
            store.set_state(old, ModelState.RETIRED, "replaced")


def test_what_every_swap_and_status_read_does_not_grow_with_the_history(tmp_path: Path) -> None:
    """The daemon's memory grew for as long as its history (500 models) did: each swap and each
    status parsed every record it asked for (whole manifests and figures), and glibc and pymalloc
    keep the highest such burst (docs/benchmarks.md, the soak). What they read now is the same
    size at 30 models and at 330, and SQLite's page cache is bounded."""
    store = Store(tmp_path)

    def peak() -> int:
        tracemalloc.start()
        try:
            store.entries(ModelState.ACTIVE, ModelState.ACTIVE, ModelState.RETIRED)[:3]  # collect_garbage
            store.last_rejected(), store.by_entry(ModelState.ROLLED_BACK, limit=1)  # the status
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _served(store, 0, 30)
    small = peak()
    _served(store, 30, 300)
    per_model = (peak() - small) / 300
    assert per_model < 400, per_model  # an id, a version and a sha256 (whole records: 4 KiB each)
    assert store.last_rejected().version == "v325"  # type: ignore[union-attr]
    assert [e.version for e in store.entries(ModelState.ACTIVE, ModelState.ACTIVE, ModelState.RETIRED)[:2]] == [
        "v329",
        "v328",
    ]
    assert store.db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB


def test_outbox_is_bounded_and_ordered(tmp_path: Path) -> None:
    store = Store(tmp_path)
    dropped = [store.outbox_put("t", str(i).encode(), max_rows=3) for i in range(5)]
    assert dropped == [0, 0, 0, 1, 1]
    rows = store.outbox_peek(10, set())
    assert [p for _, _, p in rows] == [b"2", b"3", b"4"]
    store.outbox_done(rows[0][0])
    assert store.outbox_peek(10, {rows[1][0]})[0][2] == b"4" and store.outbox_size() == 2


def test_deploy_wait_reads_staged_as_an_outcome_only_when_the_model_waits_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`agent deploy --wait`: right after the gate a model is staged for a moment before the swap
    (it returned "staged" there once on CI); staged with "waiting: …" (manual policy, pinned) is final."""
    from types import SimpleNamespace

    from agent.cli import _wait_outcome

    store = Store(tmp_path)
    rec = store.add(manifest(), "walk", 3, "local", "deployed")
    for state in (ModelState.VERIFIED, ModelState.BUILDING, ModelState.VALIDATING):
        rec = store.set_state(rec, state, state.value)
    rec = store.set_state(rec, ModelState.STAGED, "passed the gate")
    cfg: Any = SimpleNamespace(state_dir=tmp_path)
    assert _wait_outcome(cfg, rec.id, 0.3) == 1
    assert "still in progress" in capsys.readouterr().out
    store.set_state(rec, ModelState.STAGED, "waiting: activation policy is manual; `agent activate v1` to use it")
    assert _wait_outcome(cfg, rec.id, 5) == 0
    assert ": staged (waiting: activation policy is manual" in capsys.readouterr().out


def _fail_inserts_into(store: Store, table: str) -> None:
    """The next INSERT into `table` fails, as a full disk or a crash would stop it."""
    store.db.execute(f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'boom'); END")


def test_a_state_change_and_its_history_are_one_commit(tmp_path: Path) -> None:
    """The connection is in autocommit mode: without a transaction the UPDATE of the state
    would be committed alone when the history row fails."""
    store = Store(tmp_path)
    rec = store.add(manifest(), "walk", 3, "channel", "announced")
    _fail_inserts_into(store, "transitions")
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        store.set_state(rec, ModelState.DOWNLOADING, "s3://...")
    assert store.get(rec.id).state is ModelState.ANNOUNCED
    assert not store.db.in_transaction


def _reporter(tmp_path: Path, store: Store) -> Reporter:
    from agent.config import load
    from agent.delivery.mqtt_link import Link
    from agent.serving.telemetry import LatencyRecorder
    from scripts.loopback.services import write_agent_config

    cfg = load(
        write_agent_config(
            tmp_path / "agent.toml",
            broker="mqtt://127.0.0.1:1",
            s3="http://127.0.0.1:1",
            state_dir=tmp_path,
            socket_path=tmp_path / "infer.sock",
            channel="walk",
            device_id="go2-tx",
            prefix="t",
        )
    )
    link = Link(cfg.mqtt, cfg.device_id, "t/will", b"{}", lambda _e: None)  # never connected: events stay queued
    return Reporter(cfg=cfg, store=store, link=link, server=None, recorder=LatencyRecorder())  # type: ignore[arg-type]


def test_an_announcement_sequence_is_taken_only_with_its_record_and_event(tmp_path: Path) -> None:
    """A crash between taking the sequence and adding the record would lose the announcement for
    good (its redelivery reads as already handled)."""
    store = Store(tmp_path)
    reporter = _reporter(tmp_path, store)
    _fail_inserts_into(store, "models")
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        reporter.record(manifest(), "walk", 7, "channel", "announced", mark=("seq:walk", 7))
    assert store.mark("seq:walk") is None and store.outbox_size() == 0


def test_a_transition_and_its_event_are_one_commit(tmp_path: Path) -> None:
    store = Store(tmp_path)
    reporter = _reporter(tmp_path, store)
    rec = reporter.record(manifest(), "walk", 7, "channel", "announced", mark=("seq:walk", 7))
    assert store.mark("seq:walk") == 7 and store.outbox_size() == 1
    _fail_inserts_into(store, "outbox")
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        reporter.transition(rec, ModelState.DOWNLOADING, "s3://...")
    assert store.get(rec.id).state is ModelState.ANNOUNCED and store.outbox_size() == 1


def test_events_a_full_disk_refuses_wait_in_memory_and_keep_their_order(tmp_path: Path) -> None:
    store = Store(tmp_path)
    reporter = _reporter(tmp_path, store)
    store.db.execute(
        "CREATE TRIGGER full BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    reporter.emit("first", n=1)
    reporter.emit("second", n=2)
    assert len(reporter.unsaved) == 2 and store.outbox_size() == 0
    store.db.execute("DROP TRIGGER full")
    reporter.emit("third", n=3)
    kinds = [json.loads(p)["kind"] for _, _, p in store.outbox_peek(10, set())]
    assert kinds == ["first", "second", "third"] and not reporter.unsaved
