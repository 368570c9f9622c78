"""Transactions for SQLite connections in autocommit mode (`isolation_level=None`), where
`with connection:` groups nothing: each statement is its own commit, and a crash between two of
them leaves half a change. Used by the agent's state dir and the collector's database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Connection(Protocol):
    """What Transactions needs: sqlite3's connection, or cloud/pgconn.py's adapter."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...


class Transactions:
    """`with tx():` is one commit for everything inside; nested uses join the outer one."""

    def __init__(self, db: Connection) -> None:
        self.db = db
        self._depth = 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0
