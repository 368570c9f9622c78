"""What every child process of the daemon needs (builds, downloads, ONNX checks, serving
processes): death with the parent, a name in ps, why it ended, and the memory and OOM facts that
guard it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


def exit_reason(code: int, what: str) -> str:
    """Why a child ended, for a user: `what` names it."""
    if code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        hint = ", likely out of memory (the OOM killer)" if sig == signal.SIGKILL else ""
        return f"{what} was killed by signal {sig} ({name}){hint}"
    return f"{what} exited with status {code} without a result"


def available_mb() -> int | None:
    """MemAvailable from /proc/meminfo, in MiB; None where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def die_with_parent(name: str) -> None:
    """In a child: the kernel kills us when the daemon dies (even by SIGKILL), so no orphan keeps
    writing a .part or an engine that the next start is about to use. `name` shows in ps/top."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, name.encode()[:15])
    except (OSError, AttributeError) as err:  # not Linux
        log.debug("no parent-death signal: %s", err)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def protect_daemon() -> None:
    """Ask the OOM killer to spare the daemon (needs CAP_SYS_RESOURCE: systemd's OOMScoreAdjust
    does it for the service; this covers root runs)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-500")
    except OSError as err:
        log.debug("cannot lower the daemon's oom_score_adj: %s", err)
