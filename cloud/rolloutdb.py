"""Staged rollouts in the collector's database (the `rollouts` table of cloud/fleetdb.py): plain
portable SQL. A state change is claimed with a conditional UPDATE, so that of two processes
deciding at once (the collector and `fleet halt`), one acts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cloud.fleetdb import FleetDB

# Rollout.state
CANARY = "canary"  # announced to the canaries only; waiting for them, then soaking
PROMOTING, PROMOTED = "promoting", "promoted"  # announced to the whole channel
HALTING, HALTED = "halting", "halted"  # canaries told to roll back
SUPERSEDED = "superseded"  # a newer announcement on its channel came first: it never acts again
OPEN = (CANARY, PROMOTING, HALTING)

_COLUMNS = (
    "id, channel, version, sha256, previous_version, canaries, soak_s, sign_key, state, reason,"
    " created_at, soak_until, updated_at"
)


@dataclass(frozen=True)
class Rollout:
    id: str
    channel: str
    version: str
    sha256: str
    previous_version: str | None  # what the channel ran before: the canaries' rollback target
    canaries: tuple[str, ...]
    soak_s: float
    sign_key: str | None  # the path of the key that signed the canaries' announcement
    state: str
    reason: str
    created_at: float  # wall clock, the collector's
    soak_until: float | None  # wall clock; set once every canary runs the version
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _row(r: tuple[Any, ...]) -> Rollout:
    values = list(r)
    values[5] = tuple(json.loads(values[5]))
    return Rollout(*values)


class RolloutDB:
    def __init__(self, db: FleetDB) -> None:
        self.fleet = db
        self.db = db.db

    def add(self, r: Rollout) -> None:
        values = list(r.__dict__.values())
        values[5] = json.dumps(list(r.canaries))
        with self.fleet.transaction():
            self.db.execute(f"INSERT INTO rollouts ({_COLUMNS}) VALUES ({','.join('?' * 13)})", values)

    def free_id(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`... whichever no rollout has."""
        taken = {r[0] for r in self.db.execute("SELECT id FROM rollouts WHERE id LIKE ?", (base + "%",))}
        n = 1
        while (candidate := base if n == 1 else f"{base[:60]}-{n}") in taken:
            n += 1
        return candidate

    def get(self, rollout_id: str) -> Rollout | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        return None if row is None else _row(row)

    def all(self, open_only: bool = False) -> list[Rollout]:
        where = f" WHERE state IN ({','.join('?' * len(OPEN))})" if open_only else ""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM rollouts{where} ORDER BY created_at", OPEN if open_only else ()
        ).fetchall()
        return [_row(r) for r in rows]

    def claim(self, r: Rollout, state: str, reason: str, now: float) -> bool:
        """Move `r` from the state (and update time) it was read with to `state`; False when
        another process changed it meanwhile."""
        with self.fleet.transaction():
            cur = self.db.execute(
                "UPDATE rollouts SET state=?, reason=?, updated_at=? WHERE id=? AND state=? AND updated_at=?",
                (state, reason, now, r.id, r.state, r.updated_at),
            )
        return cur.rowcount == 1

    def set_reason(self, rollout_id: str, reason: str) -> None:
        with self.fleet.transaction():
            self.db.execute("UPDATE rollouts SET reason=? WHERE id=?", (reason, rollout_id))

    def set_soak_until(self, rollout_id: str, until: float, reason: str) -> None:
        with self.fleet.transaction():
            self.db.execute(
                "UPDATE rollouts SET soak_until=?, reason=? WHERE id=? AND soak_until IS NULL",
                (until, reason, rollout_id),
            )

    def events_of(self, devices: tuple[str, ...], received_after: float) -> list[dict[str, Any]]:
        """The devices' model events stored since `received_after` (the collector's clock), oldest first."""
        if not devices:
            return []
        marks = ",".join("?" * len(devices))
        rows = self.db.execute(
            f"SELECT payload FROM events WHERE kind='model_state' AND received >= ? AND device_id IN ({marks})"
            " ORDER BY ts",
            (received_after, *devices),
        ).fetchall()
        return [json.loads(p) for (p,) in rows]

    def active_of(self, devices: tuple[str, ...]) -> dict[str, str | None]:
        """Each device's active sha256, from its last status."""
        if not devices:
            return {}
        marks = ",".join("?" * len(devices))
        rows = self.db.execute(f"SELECT device_id, status FROM devices WHERE device_id IN ({marks})", devices)
        return {d: (json.loads(s).get("active") or {}).get("sha256") for d, s in rows.fetchall()}
