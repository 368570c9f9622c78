"""Crash points: named moments on a model's path where a test SIGKILLs the daemon, so that the
restart's recovery is checked at exactly that moment, not at whatever moment a sleep lands on.

`EDGE_AGENT_CRASH_AT=<point>` (tests only; the unit unsets it) makes `reached(point)` kill the
calling process at once, as a power cut or the OOM killer would: no cleanup, no flush;
`<point>#<n>` kills the n-th time it is reached. Unset, a crash point costs one dictionary lookup.
The points:

    recorded:<state>   right after a model's transition to <state> is committed (with its event)
    download:early     the first progress of a model's download (a .part on disk)
    download:late      a download past 80 %
    build:running      a build child is running
    hand-over          a swap's hand-over is in flight between two serving processes
    rollback:swapped   the watch's rollback has swapped back, before it is recorded
"""

from __future__ import annotations

import os
import signal
import sys
import threading

CRASH_ENV = "EDGE_AGENT_CRASH_AT"


def armed() -> str | None:
    """The point this process dies at, or None (the production case)."""
    return os.environ.get(CRASH_ENV) or None


_seen: dict[str, int] = {}  # how often each armed point was reached
_lock = threading.Lock()


def reached(point: str) -> None:
    want = os.environ.get(CRASH_ENV)
    if not point or not want or want.split("#")[0] != point:
        return
    with _lock:
        _seen[point] = count = _seen.get(point, 0) + 1
    if want not in (point, f"{point}#{count}"):
        return
    sys.stderr.write(f"crash point {point}: SIGKILL (test hook {CRASH_ENV})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
