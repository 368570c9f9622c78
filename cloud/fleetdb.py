"""The collector's SQLite store: device status, lifecycle events, latency telemetry and its history,
and staged rollouts (their queries: cloud/rolloutdb.py).

The latency history is plain SQL (portable types, no SQLite-only syntax): one row per telemetry
interval and model version ('raw'), merged per hour once older than the raw retention ('hour')."""

from __future__ import annotations

import json
import sqlite3
import time
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
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
            self.transaction = Transactions(self.db)
            self._telemetry_key()
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
        try:
            self.db.executescript("SELECT pg_advisory_lock(7411);" + schema + _PG_EXTRA)  # collectors start together
            self.db.execute("SELECT pg_advisory_unlock(7411)")
        except self.db.Error as err:
            self.db.close()
            raise ConfigError(f"cannot create the collector's tables at {shown} ({err})") from err
        self.transaction = Transactions(self.db)

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

    def _touch(self, device_id: str) -> None:
        self.db.execute(
            "INSERT INTO devices (device_id, last_seen) VALUES (?, ?) ON CONFLICT(device_id)"
            " DO UPDATE SET last_seen=excluded.last_seen",
            (device_id, time.time()),
        )

    def put_status(self, device_id: str, status: dict[str, Any]) -> None:
        with self.transaction():
            self._touch(device_id)
            row = self.db.execute("SELECT status FROM devices WHERE device_id=?", (device_id,)).fetchone()
            merged = json.loads(row[0]) if row else {}
            merged.update(status)  # an "offline" status keeps what the device said before it left
            self.db.execute(
                "UPDATE devices SET online=?, status=? WHERE device_id=?",
                (1 if status.get("online") else 0, json.dumps(merged), device_id),
            )

    def put_event(self, device_id: str, event: dict[str, Any]) -> bool:
        """False for a duplicate (QoS 1 may deliver twice; events carry a unique id)."""
        with self.transaction():
            self._touch(device_id)
            cur = self.db.execute(
                "INSERT INTO events (id, device_id, kind, ts, received, payload) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT DO NOTHING",
                (
                    str(event["id"]),
                    device_id,
                    str(event.get("kind", "")),
                    float(event.get("ts", 0)),
                    time.time(),
                    json.dumps(event),
                ),
            )
        return cur.rowcount == 1

    def put_telemetry(
        self, device_id: str, report: dict[str, Any], histograms: list[IntervalHistogram] | None = None
    ) -> None:
        """The report's summary (the histograms live in the latency history only)."""
        summary = json.dumps({k: v for k, v in report.items() if k != "histograms"})
        with self.transaction():
            self._touch(device_id)
            self.db.execute(
                "INSERT INTO telemetry (device_id, ts, payload) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (device_id, float(report.get("ts", 0)), summary),
            )
            self.db.execute("UPDATE devices SET telemetry=? WHERE device_id=?", (summary, device_id))
            for h in histograms or ():
                row = LatencyRow(device_id, h.channel or "", h.model_version or "", RAW, h.start, h.end, h.count, h.hdr)
                self.put_latency(row, replace=False)

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
        rows = self.db.execute(
            f"SELECT device_id, online, status, telemetry, last_seen FROM devices{where} ORDER BY device_id", args
        ).fetchall()
        return [_device_row(*r) for r in rows]

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


def _device_row(device_id: str, online: int, status: str, telemetry: str, last_seen: float) -> dict[str, Any]:
    s, t = json.loads(status), json.loads(telemetry)
    active = s.get("active") or {}
    return {
        "device_id": device_id,
        "online": bool(online),
        "channel": s.get("channel"),
        "active_version": active.get("version"),
        "backend": s.get("backend"),
        "backend_version": s.get("backend_version"),
        "agent_version": s.get("agent_version"),
        "latency_p50_us": t.get("p50_us"),
        "latency_p99_us": t.get("p99_us"),
        "latency_count": t.get("count"),
        "pending": s.get("pending"),
        "last_rejected": s.get("last_rejected"),
        "last_seen": last_seen,
    }
