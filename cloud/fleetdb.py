"""The collector's SQLite store: device status, lifecycle events, latency telemetry and its history,
and staged rollouts (their queries: cloud/rolloutdb.py).

The latency history is plain SQL (portable types, no SQLite-only syntax): one row per telemetry
interval and model version ('raw'), merged per hour once older than the raw retention ('hour')."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.protocol import IntervalHistogram
from agent.contract.sqltx import Transactions
from agent.errors import AgentError, ConfigError
from cloud.pgconn import PgConnection, is_url

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT '{}',
  telemetry TEXT NOT NULL DEFAULT '{}', last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  id TEXT PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL,
  received REAL NOT NULL, payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, ts);
CREATE TABLE IF NOT EXISTS telemetry (
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, ts REAL NOT NULL, payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (ts);
CREATE TABLE IF NOT EXISTS latency (
  device_id TEXT NOT NULL, channel TEXT NOT NULL, version TEXT NOT NULL, resolution TEXT NOT NULL,
  start_ts DOUBLE PRECISION NOT NULL, end_ts DOUBLE PRECISION NOT NULL, calls BIGINT NOT NULL,
  hdr TEXT NOT NULL,
  PRIMARY KEY (device_id, channel, version, resolution, start_ts));
CREATE INDEX IF NOT EXISTS latency_by_end ON latency (end_ts);
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, channel TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
  previous_version TEXT, canaries TEXT NOT NULL, soak_s DOUBLE PRECISION NOT NULL, sign_key TEXT,
  state TEXT NOT NULL, reason TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  soak_until DOUBLE PRECISION, updated_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS rollouts_by_state ON rollouts (state);
"""

# PostgreSQL's spelling of the schema's two SQLite-only types (REAL is 4 bytes there: seconds since
# 1970 would lose their fraction).
_PG_TYPES = (("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY"), (" REAL ", " DOUBLE PRECISION "))
_PG_EXTRA = "CREATE UNIQUE INDEX IF NOT EXISTS telemetry_key ON telemetry (device_id, ts);"

RAW, HOUR = "raw", "hour"  # latency.resolution
_LATENCY_COLUMNS = "device_id, channel, version, resolution, start_ts, end_ts, calls, hdr"

# Each device's overview, in columns of its own (written with its status or telemetry) so that
# reading 10,000 devices decodes no JSON but the rare pending and rejected models.
_STATUS_COLUMNS = (
    "channel",
    "active_version",
    "backend",
    "backend_version",
    "agent_version",
    "pending",
    "last_rejected",
)  # TEXT; pending and last_rejected hold JSON
# From the newest telemetry (by its `ts`: a QoS 1 redelivery of an older one changes nothing).
_FIGURE_COLUMNS = ("latency_p50_us", "latency_p99_us", "latency_count", "telemetry_ts")
_OVERVIEW = ("device_id", "online", *_STATUS_COLUMNS, *_FIGURE_COLUMNS[:-1], "last_seen")
_NO_REPORT = ("{}", None, None, None, None)  # telemetry and _FIGURE_COLUMNS: none in this batch
_NEWER = (
    "excluded.telemetry_ts IS NOT NULL"
    " AND (devices.telemetry_ts IS NULL OR devices.telemetry_ts <= excluded.telemetry_ts)"
)
_TOUCH = " ON CONFLICT(device_id) DO UPDATE SET last_seen=excluded.last_seen, " + ", ".join(
    f"{c}=CASE WHEN {_NEWER} THEN excluded.{c} ELSE devices.{c} END" for c in ("telemetry", *_FIGURE_COLUMNS)
)
_STATUS_ROW = ("device_id", "last_seen", "online", "status", *_STATUS_COLUMNS)
_STATUS_UPSERT = " ON CONFLICT(device_id) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in _STATUS_ROW[2:])
_MAX_PARAMS = 900  # in one statement: under SQLite's smallest limit (999)
_COLUMN_TYPES = {"telemetry_ts": "DOUBLE PRECISION", **dict.fromkeys(_FIGURE_COLUMNS[:-1], "BIGINT")}  # else TEXT


@dataclass(frozen=True)
class LatencyRow:
    """One histogram of the history: a telemetry interval's ('raw') or an hour's merge ('hour').
    An unknown channel or version is ''."""

    device_id: str
    channel: str
    version: str
    resolution: str
    start: float
    end: float
    calls: int
    hdr: str  # HdrHistogram's compressed encoding, base64


class FleetDB:
    """`target`: an SQLite file, or a PostgreSQL URL (postgresql://user@host/db)."""

    def __init__(self, target: Path | str) -> None:
        if isinstance(target, str) and is_url(target):
            self._open_pg(target)
        else:
            self._open_sqlite(Path(target))

    def _open_sqlite(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db: Any = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise ConfigError(f"cannot open the collector database {path} ({err}): check [collector] db") from err
        try:
            self.db.execute("PRAGMA schema_version")  # reads the header: a foreign file fails here, unwritten
            _wal(self.db)
            self.db.executescript(_SCHEMA)
            self.transaction = Transactions(self.db)
            self._telemetry_key()
            self._overview_columns()
        except sqlite3.Error as err:
            self.db.close()
            raise ConfigError(f"{path} is not a collector database ({err}): check [collector] db") from err

    @classmethod
    def read_only(cls, path: Path) -> FleetDB:
        """A reader beside a writing collector (the database is in WAL mode): it never writes, nor
        creates the file; ConfigError when there is none."""
        self = cls.__new__(cls)
        try:
            self.db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self.db.execute("SELECT 1 FROM devices LIMIT 1")
        except sqlite3.Error as err:
            raise ConfigError(
                f"cannot read the collector database {path} ({err}): is `fleet collect` running?"
            ) from err
        self.transaction = Transactions(self.db)
        return self

    def _open_pg(self, url: str) -> None:
        shown = url.rsplit("@", maxsplit=1)[-1]  # no password in a message
        try:
            self.db = PgConnection(url)
        except Exception as err:  # psycopg's, or psycopg missing (the `cloud` extra)
            raise ConfigError(f"cannot open the collector database at {shown} ({err}): check [collector] db") from err
        schema = _SCHEMA
        for sqlite_type, pg_type in _PG_TYPES:
            schema = schema.replace(sqlite_type, pg_type)
        self.transaction = Transactions(self.db)
        try:
            self.db.execute("SELECT pg_advisory_lock(7411)")  # collectors start together: one at a time here
            self.db.executescript(schema + _PG_EXTRA)
            self._overview_columns()
            self.db.execute("SELECT pg_advisory_unlock(7411)")
        except self.db.Error as err:
            self.db.close()
            raise ConfigError(f"cannot create the collector's tables at {shown} ({err})") from err

    def close(self) -> None:
        self.db.close()

    def pipeline(self) -> AbstractContextManager[Any]:
        """Inside a transaction, for many writes: PostgreSQL's pipeline mode (SQLite has no round trips)."""
        return self.db.pipeline() if isinstance(self.db, PgConnection) else nullcontext()

    def _telemetry_key(self) -> None:
        """A telemetry message is stored once (QoS 1 may deliver it again): a database from before
        the unique key drops its duplicates first."""
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='telemetry_key'").fetchone():
            return
        with self.transaction():
            self.db.execute(
                "DELETE FROM telemetry WHERE id NOT IN (SELECT MIN(id) FROM telemetry GROUP BY device_id, ts)"
            )
            self.db.execute("CREATE UNIQUE INDEX telemetry_key ON telemetry (device_id, ts)")

    def _overview_columns(self) -> None:
        """The overview's columns, added to a database from before them and filled from each
        device's stored status and telemetry (new databases get them here too). Looked at inside
        the write transaction: two collectors opening one new database do this one after the other."""
        if not self._missing_columns():
            return
        with self.transaction():
            for column in self._missing_columns():
                self.db.execute(f"ALTER TABLE devices ADD COLUMN {column} {_COLUMN_TYPES.get(column, 'TEXT')}")
            for device_id, status, telemetry in self.db.execute(
                "SELECT device_id, status, telemetry FROM devices"
            ).fetchall():
                values = (*_status_overview(json.loads(status)), *_figures(json.loads(telemetry)), device_id)
                self.db.execute(
                    f"UPDATE devices SET {_assign((*_STATUS_COLUMNS, *_FIGURE_COLUMNS))} WHERE device_id=?", values
                )

    def _missing_columns(self) -> list[str]:
        cur = self.db.execute("SELECT * FROM devices LIMIT 0")
        have = {c[0] for c in cur.description}
        cur.close()  # an open statement would hold a read snapshot: another collector's write makes ours busy
        return [c for c in (*_STATUS_COLUMNS, *_FIGURE_COLUMNS) if c not in have]

    def put_status(self, device_id: str, status: dict[str, Any]) -> None:
        self.put_batch(statuses=[(device_id, status)])

    def put_event(self, device_id: str, event: dict[str, Any]) -> bool:
        """False for a duplicate (QoS 1 may deliver twice; events carry a unique id)."""
        return self.put_batch(events=[(device_id, event)]) == 1

    def put_telemetry(
        self, device_id: str, report: dict[str, Any], histograms: list[IntervalHistogram] | None = None
    ) -> None:
        """The report's summary (the histograms live in the latency history only)."""
        self.put_batch(reports=[(device_id, report, histograms or [])])

    def put_batch(
        self,
        statuses: Sequence[tuple[str, dict[str, Any]]] = (),
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        reports: Sequence[tuple[str, dict[str, Any], list[IntervalHistogram]]] = (),
    ) -> int:
        """Statuses, events and telemetry, in one transaction and a few statements for many
        messages; the number of events new to the database (the others were QoS 1 duplicates)."""
        with self.transaction():
            # Every device's row first, in one order: two collectors' batches lock rows alike
            # (PostgreSQL), so they queue rather than deadlock.
            self._touch(sorted({str(m[0]) for m in (*statuses, *events, *reports)}), _newest(reports))
            self._put_statuses(statuses)
            new = self._put_events(events)
            self._put_reports(reports)
        return new

    def _insert(self, head: str, rows: Sequence[tuple[Any, ...]], tail: str, count: bool = False) -> int:
        """`head VALUES (..),(..) tail` for `rows`, in as few statements as the parameter limit
        allows (one statement a row was PostgreSQL's bottleneck); with `count`, the rows changed."""
        changed = 0
        width = len(rows[0]) if rows else 1  # no rows: no statement
        step = max(1, _MAX_PARAMS // width)
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            marks = ",".join([f"({_marks(width)})"] * len(chunk))
            cur = self.db.execute(f"{head} VALUES {marks}{tail}", [v for row in chunk for v in row])
            if count:
                if isinstance(self.db, PgConnection):
                    self.db.sync()  # in a pipeline, the count is known once the results are in
                changed += int(cur.rowcount)
        return changed

    def _touch(self, device_ids: list[str], newest: dict[str, tuple[Any, ...]]) -> None:
        """Each device's last_seen, and its overview's figures from its newest telemetry."""
        now = time.time()
        rows = [(d, now, *newest.get(d, _NO_REPORT)) for d in device_ids]
        self._insert(
            f"INSERT INTO devices (device_id, last_seen, telemetry, {', '.join(_FIGURE_COLUMNS)})", rows, _TOUCH
        )

    def _put_statuses(self, statuses: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Each status merged into what its device said before (an "offline" status keeps the
        rest), in one read and one write for the batch."""
        ids = sorted({d for d, _ in statuses})
        merged: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), _MAX_PARAMS):
            part = ids[i : i + _MAX_PARAMS]
            cur = self.db.execute(
                f"SELECT device_id, status FROM devices WHERE device_id IN ({_marks(len(part))})", part
            )
            merged.update((d, json.loads(text)) for d, text in cur.fetchall())
        online: dict[str, int] = {}
        for device_id, status in statuses:
            merged.setdefault(device_id, {}).update(status)
            online[device_id] = 1 if status.get("online") else 0
        now = time.time()
        rows = [(d, now, online[d], json.dumps(merged[d]), *_status_overview(merged[d])) for d in ids]
        self._insert(f"INSERT INTO devices ({', '.join(_STATUS_ROW)})", rows, _STATUS_UPSERT)

    def _put_events(self, events: Sequence[tuple[str, dict[str, Any]]]) -> int:
        now = time.time()
        rows = [(str(e["id"]), d, str(e.get("kind", "")), float(e.get("ts", 0)), now, json.dumps(e)) for d, e in events]
        head = "INSERT INTO events (id, device_id, kind, ts, received, payload)"
        return self._insert(head, rows, " ON CONFLICT DO NOTHING", count=True)

    def _put_reports(self, reports: Sequence[tuple[str, dict[str, Any], list[IntervalHistogram]]]) -> None:
        rows, history = [], []
        for device_id, report, histograms in reports:
            rows.append((device_id, float(report.get("ts", 0)), _summary(report)))
            history += [
                (device_id, h.channel or "", h.model_version or "", RAW, h.start, h.end, h.count, h.hdr)
                for h in histograms
            ]
        self._insert("INSERT INTO telemetry (device_id, ts, payload)", rows, " ON CONFLICT DO NOTHING")
        self._insert(f"INSERT INTO latency ({_LATENCY_COLUMNS})", history, " ON CONFLICT DO NOTHING")

    def put_latency(self, row: LatencyRow, replace: bool) -> None:
        """Insert `row`; one with the same key is kept (a QoS 1 duplicate), or replaced."""
        key = (row.device_id, row.channel, row.version, row.resolution, row.start)
        with self.transaction():
            if replace:
                self.db.execute(
                    "DELETE FROM latency WHERE device_id=? AND channel=? AND version=? AND resolution=? AND start_ts=?",
                    key,
                )
            self.db.execute(
                f"INSERT INTO latency ({_LATENCY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (*key, row.end, row.calls, row.hdr),
            )

    def latency_rows(
        self,
        *,
        since: float | None = None,
        before: float | None = None,
        channel: str | None = None,
        version: str | None = None,
        device_id: str | None = None,
        resolution: str | None = None,
    ) -> list[LatencyRow]:
        """The history's rows that end after `since` and before `before`, oldest first."""
        where, args = _where(
            ("end_ts > ?", since),
            ("end_ts < ?", before),
            ("channel = ?", channel),
            ("version = ?", version),
            ("device_id = ?", device_id),
            ("resolution = ?", resolution),
        )
        rows = self.db.execute(f"SELECT {_LATENCY_COLUMNS} FROM latency{where} ORDER BY start_ts", args).fetchall()
        return [LatencyRow(*r) for r in rows]

    def delete_latency(self, resolution: str, before: float) -> int:
        cur = self.db.execute("DELETE FROM latency WHERE resolution=? AND end_ts < ?", (resolution, before))
        return int(cur.rowcount)

    def delete_telemetry(self, before: float) -> int:
        return int(self.db.execute("DELETE FROM telemetry WHERE ts < ?", (before,)).rowcount)

    def devices(self, device_id: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("device_id = ?", device_id))
        rows = self.db.execute(f"SELECT {', '.join(_OVERVIEW)} FROM devices{where} ORDER BY device_id", args)
        return [_device_row(r) for r in rows.fetchall()]

    def events(
        self, device_id: str | None = None, limit: int = 200, version: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` events (of `device_id`, about `version`), oldest first."""
        where, args = _where(("device_id = ?", device_id or None))
        cur = self.db.execute(f"SELECT payload, received FROM events{where} ORDER BY ts DESC", args)
        found: list[dict[str, Any]] = []
        for payload, received in cur:  # the version is inside the payload: filtered here, portably
            event = json.loads(payload)
            if version is None or event.get("version") == version:
                found.append({**event, "received": received})
                if len(found) >= limit:
                    break
        cur.close()
        return found[::-1]


def open_existing(target: Path | str) -> FleetDB:
    """The collector's database for a reader (`fleet status`...): an SQLite file must exist."""
    if not (isinstance(target, str) and is_url(target)) and not Path(target).exists():
        raise AgentError(f"no collector database at {target}: is `fleet collect` running?")
    return FleetDB(target)


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the conditions whose value is given, and its arguments."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in used), [value for _, value in used]


def _device_row(row: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(_OVERVIEW, row, strict=True))
    d["online"] = bool(d["online"])
    for key in ("pending", "last_rejected"):
        d[key] = None if d[key] is None else json.loads(d[key])
    return d


def _summary(report: dict[str, Any]) -> str:
    """A telemetry report without its histograms (they live in the latency history only)."""
    return json.dumps({k: v for k, v in report.items() if k != "histograms"})


def _newest(reports: Sequence[tuple[str, dict[str, Any], list[IntervalHistogram]]]) -> dict[str, tuple[Any, ...]]:
    """Per device, its newest report's summary and _FIGURE_COLUMNS."""
    newest: dict[str, tuple[Any, ...]] = {}
    for device_id, report, _h in reports:
        figures = _figures(report)
        if device_id not in newest or figures[-1] >= newest[device_id][-1]:
            newest[device_id] = (_summary(report), *figures)
    return newest


def _wal(db: sqlite3.Connection, wait_s: float = 10.0) -> None:
    """WAL mode. Switching takes the file for a moment and SQLite's busy timeout does not wait for
    it: two collectors opening one new database at once got "database is locked" (test_fleet_scale)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _assign(columns: tuple[str, ...]) -> str:
    return ", ".join(f"{c}=?" for c in columns)


def _status_overview(status: dict[str, Any]) -> tuple[str | None, ...]:
    """The _STATUS_COLUMNS of a device's (merged) status."""
    active = status.get("active") or {}
    values = (
        status.get("channel"),
        active.get("version") if isinstance(active, dict) else None,
        status.get("backend"),
        status.get("backend_version"),
        status.get("agent_version"),
    )
    pending, rejected = status.get("pending"), status.get("last_rejected")
    return (
        *(None if v is None else str(v) for v in values),
        None if pending is None else json.dumps(pending),
        None if rejected is None else json.dumps(rejected),
    )


def _figures(report: dict[str, Any]) -> tuple[float | None, ...]:
    """The _FIGURE_COLUMNS of a telemetry report."""
    values = (report.get("p50_us"), report.get("p99_us"), report.get("count"))
    figures = tuple(round(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values)
    return (*figures, float(report.get("ts", 0)))
