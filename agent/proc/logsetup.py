"""Logging for `agent run`: journald under systemd, stderr otherwise.

systemd sets JOURNAL_STREAM to the device:inode of the stream it connected to our stderr; when
that is still our stderr we log to the journal natively (systemd-python's JournalHandler keeps
the level as PRIORITY= and adds CODE_FILE/CODE_LINE), or, without systemd-python, write lines with
a `<N>` syslog priority prefix that journald parses. Anywhere else: timestamped stderr lines."""

from __future__ import annotations

import importlib
import logging
import os
import sys

FORCE_FALLBACK_ENV = "EDGE_AGENT_NOTIFY_FALLBACK"  # "1": skip systemd-python (tests both paths)
_QUIET = ("watchdog", "botocore", "boto3", "s3transfer", "urllib3")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines() or [""])


def under_journald() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return bool(stream) and f"{st.st_dev}" == dev and f"{st.st_ino}" == ino


def journal_handler() -> logging.Handler | None:
    if os.environ.get(FORCE_FALLBACK_ENV) == "1":
        return None
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER="edge-agent")
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler


def setup(level: str) -> str:
    """Configure the root logger; returns where logs go ("journal", "journal-stderr", "stderr")."""
    handler: logging.Handler | None = journal_handler() if under_journald() else None
    where = "journal"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if under_journald():
            handler.setFormatter(_PrefixFormatter("%(name)s: %(message)s"))
            where = "journal-stderr"
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            where = "stderr"
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries stay at WARNING even at log_level = "debug": watchdog logs every inotify event, and
    # the drop folder / config watcher sit beside the log file in many setups (a feedback loop).
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
    return where
