"""The state dir: model records, their transitions, per-channel sequence marks and the event
outbox, all in one SQLite database (each change is one transaction, so a crash at any moment
leaves a state the next start recovers from: `transaction()` groups a change with its event). Files live beside it:

    <state_dir>/agent.db
    <state_dir>/models/<sha256>.onnx      (+ .part while downloading)
    <state_dir>/engines/<engine key>      (+ .part while building)
    <state_dir>/golden/<sha256>.npz
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.contract.protocol import Manifest
from agent.contract.sqltx import Transactions
from agent.coordinator.lifecycle import ModelState, check_transition
from agent.proc import durable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  version TEXT NOT NULL, sha256 TEXT NOT NULL, channel TEXT NOT NULL, sequence INTEGER,
  source TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
  manifest TEXT NOT NULL, engine_key TEXT, figures TEXT NOT NULL DEFAULT '{}',
  created_at REAL NOT NULL, updated_at REAL NOT NULL, activated_at REAL);
CREATE TABLE IF NOT EXISTS transitions (
  id INTEGER PRIMARY KEY AUTOINCREMENT, model_id INTEGER NOT NULL,
  state TEXT NOT NULL, reason TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL);
"""

CACHE_KIB = 128  # SQLite's page cache per connection; the reads cost the same (docs/benchmarks.md)


@dataclass
class ModelRecord:
    id: int
    version: str
    sha256: str
    channel: str
    sequence: int | None
    source: str
    state: ModelState
    reason: str
    manifest: Manifest
    engine_key: str | None
    figures: dict[str, Any]
    created_at: float
    updated_at: float
    activated_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "sha256": self.sha256,
            "channel": self.channel,
            "sequence": self.sequence,
            "source": self.source,
            "state": self.state.value,
            "reason": self.reason,
            "engine_key": self.engine_key,
            "figures": self.figures,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "activated_at": self.activated_at,
        }


class Entry(NamedTuple):
    """A model record's identity, without its manifest and figures."""

    id: int
    version: str
    sha256: str


class Store:
    """Used by one thread (the coordinator) for writes; readers open their own Store."""

    def __init__(self, state_dir: Path, readonly: bool = False) -> None:
        self.dir = state_dir
        self.models_dir = state_dir / "models"
        self.engines_dir = state_dir / "engines"
        self.golden_dir = state_dir / "golden"
        if readonly:
            uri = f"file:{state_dir / 'agent.db'}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.transaction = Transactions(self.db)
            return
        for d in (self.models_dir, self.engines_dir, self.golden_dir):
            durable.makedirs(d)
        self.db = sqlite3.connect(state_dir / "agent.db", check_same_thread=False, isolation_level=None)
        # The queries scan whole tables: SQLite's default 2 MB page cache would fill with the history
        # (about 1 MB at the 500 models kept), the daemon's memory growing for hundreds of swaps.
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.transaction = Transactions(self.db)  # a change and its event in one commit

    def close(self) -> None:
        self.db.close()

    def model_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.onnx"

    def engine_path(self, key: str) -> Path:
        return self.engines_dir / key

    def golden_path(self, sha256: str) -> Path:
        return self.golden_dir / f"{sha256}.npz"

    # -- records ------------------------------------------------------------------------------
    def add(self, manifest: Manifest, channel: str, sequence: int | None, source: str, reason: str) -> ModelRecord:
        t = time.time()
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO models (version, sha256, channel, sequence, source, state, reason, manifest,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    manifest.version,
                    manifest.sha256,
                    channel,
                    sequence,
                    source,
                    ModelState.ANNOUNCED.value,
                    reason,
                    json.dumps(manifest.to_json()),
                    t,
                    t,
                ),
            )
            model_id = int(cur.lastrowid or 0)
            self.db.execute(
                "INSERT INTO transitions (model_id, state, reason, ts) VALUES (?,?,?,?)",
                (model_id, ModelState.ANNOUNCED.value, reason, t),
            )
        return self.get(model_id)

    def set_state(self, rec: ModelRecord, state: ModelState, reason: str, **figures: Any) -> ModelRecord:
        check_transition(rec.state, state)
        t = time.time()
        merged = {**rec.figures, **figures}
        activated = t if state is ModelState.ACTIVE else rec.activated_at
        with self.transaction():
            self.db.execute(
                "UPDATE models SET state=?, reason=?, figures=?, updated_at=?, activated_at=? WHERE id=?",
                (state.value, reason, json.dumps(merged), t, activated, rec.id),
            )
            self.db.execute(
                "INSERT INTO transitions (model_id, state, reason, ts) VALUES (?,?,?,?)",
                (rec.id, state.value, reason, t),
            )
        return self.get(rec.id)

    def set_engine_key(self, rec: ModelRecord, key: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE models SET engine_key=? WHERE id=?", (key, rec.id))
        rec.engine_key = key

    def get(self, model_id: int) -> ModelRecord:
        row = self.db.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
        if row is None:
            raise KeyError(model_id)
        return _record(row)

    def history(self, limit: int = 100) -> list[ModelRecord]:
        rows = self.db.execute("SELECT * FROM models ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]

    def in_state(self, *states: ModelState) -> list[ModelRecord]:
        marks = ",".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT * FROM models WHERE state IN ({marks}) ORDER BY id", [s.value for s in states]
        ).fetchall()
        return [_record(r) for r in rows]

    def active(self) -> ModelRecord | None:
        found = self.in_state(ModelState.ACTIVE)
        return found[-1] if found else None

    def last_rejected(self) -> ModelRecord | None:
        found = self.by_entry(ModelState.REJECTED, limit=1)
        return found[0] if found else None

    def by_version(self, version: str, *states: ModelState) -> list[ModelRecord]:
        """The records of `version` now in one of `states`, the newest first."""
        marks = ",".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT * FROM models WHERE version=? AND state IN ({marks}) ORDER BY id DESC",
            [version, *(s.value for s in states)],
        ).fetchall()
        return [_record(r) for r in rows]

    def by_entry(self, state: ModelState, *now_in: ModelState, limit: int = -1) -> list[ModelRecord]:
        """Models that entered `state` (and are now in one of `now_in`, default: still in it),
        the most recent entry first, `limit` of them at most (-1: all). Ordered by the transitions'
        own sequence, never by their wall time: the clock may have been stepped back between two."""
        return [_record(r) for r in self._by_entry("m.*", state, now_in, limit)]

    def entries(self, state: ModelState, *now_in: ModelState) -> list[Entry]:
        """`by_entry`'s models as id, version and sha256 only: what is asked on every swap and every
        status stays small however long the history (whole records, parsed, are a burst of objects
        that grows with it, and the allocators keep the highest burst)."""
        return [Entry(int(i), str(v), str(s)) for i, v, s in self._by_entry("m.id, m.version, m.sha256", state, now_in)]

    def _by_entry(self, columns: str, state: ModelState, now_in: tuple[ModelState, ...], limit: int = -1) -> list[Any]:
        states = now_in or (state,)
        marks = ",".join("?" * len(states))
        return self.db.execute(
            f"SELECT {columns} FROM models m JOIN (SELECT model_id, MAX(id) AS seq FROM transitions WHERE state=?"
            f" GROUP BY model_id) t ON t.model_id = m.id WHERE m.state IN ({marks}) ORDER BY t.seq DESC LIMIT ?",
            [state.value, *(s.value for s in states), limit],
        ).fetchall()

    # -- marks (per-channel last handled sequence, ...) -----------------------------------------
    def mark(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM marks WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_mark(self, key: str, value: Any) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO marks (key, value) VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )

    def forget_old(self, keep: int, stored: set[str]) -> int:
        """Forget the models beyond the newest `keep` whose story is over (retired, rejected, rolled
        back) and whose files are gone, with their transitions: the database stays bounded however
        many swaps a robot sees. Returns how many were forgotten."""
        over = (ModelState.RETIRED.value, ModelState.REJECTED.value, ModelState.ROLLED_BACK.value)
        rows = self.db.execute(
            "SELECT id, sha256 FROM models WHERE state IN (?,?,?) AND id <= (SELECT MAX(id) FROM models) - ?",
            (*over, keep),
        ).fetchall()
        ids = [(int(i),) for i, sha in rows if sha not in stored]
        if ids:
            with self.transaction():
                self.db.executemany("DELETE FROM transitions WHERE model_id=?", ids)
                self.db.executemany("DELETE FROM models WHERE id=?", ids)
        return len(ids)

    # -- outbox ----------------------------------------------------------------------------------
    def outbox_put(self, topic: str, payload: bytes, max_rows: int) -> int:
        """Queue a message; drops the oldest beyond `max_rows`. Returns how many were dropped."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO outbox (topic, payload, created) VALUES (?,?,?)", (topic, payload, time.time())
            )
            cur = self.db.execute("DELETE FROM outbox WHERE id <= (SELECT MAX(id) FROM outbox) - ?", (max_rows,))
        return cur.rowcount

    def outbox_peek(self, limit: int, exclude: set[int]) -> list[tuple[int, str, bytes]]:
        rows = self.db.execute(
            "SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit + len(exclude),)
        ).fetchall()
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows if r[0] not in exclude][:limit]

    def outbox_done(self, row_id: int) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM outbox WHERE id=?", (row_id,))

    def outbox_size(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def _record(row: tuple[Any, ...]) -> ModelRecord:
    (
        mid,
        version,
        sha,
        channel,
        seq,
        source,
        state,
        reason,
        manifest,
        engine_key,
        figures,
        created,
        updated,
        activated,
    ) = row
    return ModelRecord(
        mid,
        version,
        sha,
        channel,
        seq,
        source,
        ModelState(state),
        reason,
        Manifest.from_json(json.loads(manifest), check_names=False),
        engine_key,
        json.loads(figures),
        created,
        updated,
        activated,
    )
