"""What must hold after any fault and a restart (issue 12), read from the outside: the state dir's
database and files, the processes, the collector's events, and a client's calls.

Each check returns the problems it found (empty: it holds), so that a test can print all of them."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from agent.coordinator.lifecycle import ALLOWED, ModelState
from agent.engines import cache
from scripts.loopback.calling import CallingClient  # noqa: F401  (re-exported for the tests)
from scripts.loopback.procs import descendants  # noqa: F401  (re-exported for the tests)

MARK_ENV = "EDGE_AGENT_TEST_MARK"  # set on the agents a test starts: their children inherit it


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_dir_problems(state: Path) -> list[str]:
    """The database is sound and tells one consistent story; no file is more than it says."""
    db = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
    try:
        problems = db_problems(db)
        problems += _file_problems(state, db)
    finally:
        db.close()
    return problems


def db_problems(db: sqlite3.Connection) -> list[str]:
    problems = []
    check = db.execute("PRAGMA integrity_check").fetchone()[0]
    if check != "ok":
        problems.append(f"integrity_check: {check}")
    active = db.execute("SELECT version FROM models WHERE state='active'").fetchall()
    if len(active) > 1:
        problems.append(f"{len(active)} active models: {active}")
    for mid, version, state in db.execute("SELECT id, version, state FROM models"):
        path = [
            ModelState(s) for (s,) in db.execute("SELECT state FROM transitions WHERE model_id=? ORDER BY id", (mid,))
        ]
        if not path or path[0] is not ModelState.ANNOUNCED or path[-1].value != state:
            problems.append(f"{version}: state {state} but transitions {[s.value for s in path]}")
        bad = [f"{a.value}->{b.value}" for a, b in itertools.pairwise(path) if b not in ALLOWED[a]]
        if bad:
            problems.append(f"{version}: illegal transitions {bad}")
    seqs = db.execute(
        "SELECT channel, sequence, COUNT(*) FROM models WHERE sequence IS NOT NULL AND source='channel'"
        " GROUP BY channel, sequence HAVING COUNT(*) > 1"
    ).fetchall()
    if seqs:
        problems.append(f"announcements recorded twice (channel, sequence, count): {seqs}")
    return problems


def _file_problems(state: Path, db: sqlite3.Connection) -> list[str]:
    problems = []
    for f in (state / "models").glob("*.onnx"):
        if sha256(f) != f.stem:
            problems.append(f"models/{f.name} does not hash to its name")
    goldens = {
        json.loads(m)["sha256"]: json.loads(m).get("golden_sha256")
        for (m,) in db.execute("SELECT manifest FROM models")
    }
    for f in (state / "golden").glob("*.npz"):
        want = goldens.get(f.stem)
        if want and sha256(f) != want:
            problems.append(f"golden/{f.name} does not hash to its manifest's golden_sha256")
    for f in (state / "engines").iterdir():
        if f.suffix in (".json", ".part") or not cache.sidecar_path(f).exists():
            continue  # an engine without its sidecar is never used: it is rebuilt
        why = cache.problem(f, f.name)
        if why:
            problems.append(f"engines/{f.name}: {why}")
    for version, sha in db.execute("SELECT version, sha256 FROM models WHERE state IN ('active', 'staged')"):
        if not (state / "models" / f"{sha}.onnx").exists():
            problems.append(f"{version} is active or staged without its model file")
    return problems


def model_transitions(state: Path) -> Counter[tuple[int, str]]:
    db = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
    try:
        return Counter((int(m), str(s)) for m, s in db.execute("SELECT model_id, state FROM transitions"))
    finally:
        db.close()


def outbox_size(state: Path) -> int:
    db = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


def event_problems(state: Path, events: list[dict[str, Any]]) -> list[str]:
    """Every transition reached the collector exactly once (duplicates QoS 1 may deliver carry the
    same id and are kept once), and nothing else did."""
    sent = Counter((int(e["model_id"]), str(e["state"])) for e in events if e.get("kind") == "model_state")
    recorded = model_transitions(state)
    problems = []
    if recorded - sent:
        problems.append(f"transitions without their event: {sorted((recorded - sent).elements())}")
    if sent - recorded:
        problems.append(f"events without their transition (or twice): {sorted((sent - recorded).elements())}")
    return problems


def marked_processes(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose environment carries this test's mark."""
    found = []
    needle = f"{MARK_ENV}={mark}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]))
        except OSError:
            continue  # gone, or a zombie
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
