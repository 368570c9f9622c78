"""PostgreSQL for the collector's database, behind the few methods of sqlite3's connection that
cloud/fleetdb.py and cloud/rolloutdb.py use: the same SQL, with sqlite3's `?` placeholders turned
into psycopg's `%s`. A thin adapter, not an ORM: the SQL stays portable by hand (ON CONFLICT,
DOUBLE PRECISION, no SQLite-only syntax), and the schema's few differences are in fleetdb.py."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: str) -> bool:
    return target.startswith(URL_SCHEMES)


def _pg(sql: str) -> str:
    """sqlite3's SQL for psycopg: `%` escaped, `?` as `%s`, no SQLite-only BEGIN mode."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return "BEGIN" if sql.strip() == "BEGIN IMMEDIATE" else sql


class PgConnection:
    """Autocommit, as the SQLite connection is: agent.contract.sqltx.Transactions opens and
    closes the transactions (BEGIN ... COMMIT) itself."""

    Error: type[Exception]

    def __init__(self, url: str) -> None:
        import psycopg  # the `cloud` extra; only a PostgreSQL database needs it

        self.Error = psycopg.Error
        self._idle = psycopg.pq.TransactionStatus.IDLE
        self.conn = psycopg.connect(url, autocommit=True)
        self._pipeline: Any = None

    def execute(self, sql: str, args: Iterable[Any] = (), /) -> Any:
        cur = self.conn.cursor()
        cur.execute(_pg(sql), tuple(args))  # our SQL: built from constants, values passed apart
        return cur

    def executescript(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self.execute(statement)

    @contextmanager
    def pipeline(self) -> Iterator[Any]:
        """Statements sent without waiting for each result (one round trip, not one each) until a
        result is read, `sync()` or the block ends: the collector's batches."""
        with self.conn.pipeline() as p:
            self._pipeline = p
            try:
                yield p
            finally:
                self._pipeline = None

    def sync(self) -> None:
        """In a pipeline: wait for the results sent so far (a cursor's rowcount is known after)."""
        if self._pipeline is not None:
            self._pipeline.sync()

    @property
    def in_transaction(self) -> bool:
        return bool(self.conn.info.transaction_status != self._idle)

    def close(self) -> None:
        self.conn.close()
