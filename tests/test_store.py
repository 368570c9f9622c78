from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.coordinator.lifecycle import IllegalTransition, ModelState
from agent.coordinator.store import Store
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
