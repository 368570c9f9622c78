"""Config reload (SIGHUP, `systemctl reload`, or the config file changing), on the coordinator
thread. Serving never stops: only the coordinator's settings change. A new config that does not
load keeps the old one running, and the reason is logged and reported."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load
from agent.errors import AgentError

log = logging.getLogger(__name__)

# Applied in place; any other change is reported as needing a restart.
RELOADABLE = ("log_level", "telemetry", "s3", "security", "disk_reserve_mb", "outbox_max_events")
CONFIG_CHANGED = "config file changed"


@dataclasses.dataclass(frozen=True)
class ReloadRequested:
    """SIGHUP (`systemctl reload`) or the config file changing."""

    why: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    ok: bool
    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    error: str = ""

    def line(self) -> str:
        if not self.ok:
            return f"config reload failed, keeping the running config: {self.error}"
        if not self.changed and not self.restart_needed:
            return "config reloaded: no change"
        text = f"config reloaded: {', '.join(self.changed) or 'nothing applied'}"
        if self.restart_needed:
            text += f"; {', '.join(self.restart_needed)} take effect after a restart"
        return text


class Reloader:
    def __init__(self, path: Path | None, current: AgentConfig, apply: Callable[[AgentConfig, str], None]) -> None:
        self.path = path
        self.current = current
        self.apply = apply  # (new config, key) -> None: puts one changed top-level key into effect
        self.digest = _digest(path)
        self.last: Outcome | None = None

    def reload(self, why: str) -> Outcome:
        if self.path is None:
            return self._done(Outcome(False, error="the agent was started without a config file"), why)
        digest = _digest(self.path)
        if why == CONFIG_CHANGED and digest == self.digest:
            return self._done(Outcome(True), why)
        try:
            new = load(self.path)
        except AgentError as err:
            return self._done(Outcome(False, error=str(err)), why)
        self.digest = digest
        changed = [k for k in _keys(self.current) if getattr(new, k) != getattr(self.current, k)]
        applied = tuple(k for k in changed if k in RELOADABLE)
        for key in applied:
            self.apply(new, key)
            setattr(self.current, key, getattr(new, key))
        return self._done(Outcome(True, applied, tuple(k for k in changed if k not in RELOADABLE)), why)

    def _done(self, outcome: Outcome, why: str) -> Outcome:
        self.last = outcome
        log.log(logging.INFO if outcome.ok else logging.ERROR, "%s (%s)", outcome.line(), why)
        return outcome


def _keys(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _digest(path: Path | None) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""
