"""The daemon as a system service: sd_notify (ready, status, watchdog, reload, stop), config reload,
the drop folder and socket permissions. The coordinator calls in at a few points (`started`,
`tick`, `stopping`, `reload`, `take_dropped`); everything here runs on the coordinator thread
except the file watcher, which only posts. What it needs of the daemon is `ServiceHost`."""

from __future__ import annotations

import collections
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.contract.protocol import Manifest, ObjectRef, TensorSpec, now
from agent.errors import AgentError
from agent.system.inbox import SETTLED_S, Drop, FileDropped, Intake, Watcher
from agent.system.notify import Notifier
from agent.system.peercred import Authority, secure_socket
from agent.system.reload import CONFIG_CHANGED, Outcome, Reloader, ReloadRequested

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopRequested:
    """SIGTERM or SIGINT."""


SignalEvent = StopRequested | ReloadRequested


class ServiceHost(Protocol):
    """What the service needs of the daemon."""

    def post(self, event: FileDropped | ReloadRequested) -> None:
        """Put an event on the coordinator's queue (any thread)."""

    def status(self) -> dict[str, Any]:
        """What `agent status --json` says."""

    def emit(self, kind: str, **fields: Any) -> None:
        """An event for the cloud."""

    def deploy_file(self, part: Path, version: str) -> None:
        """A local file into the pipeline (as `agent deploy`); AgentError when it is refused."""

    def reject_file(self, manifest: Manifest, origin: str, reason: str) -> None:
        """Record a dropped file that never became a candidate as a rejected model."""

    def apply_config(self, new: AgentConfig, key: str) -> None:
        """Put one changed, reloadable top-level key into effect."""


class Service:
    def __init__(self, cfg: AgentConfig, config_file: Path | None, host: ServiceHost) -> None:
        self.cfg = cfg
        self.host = host
        self.notifier = Notifier()
        self._rescan_at = 0.0
        self.reloader = Reloader(config_file, cfg, host.apply_config)
        inbox = cfg.inbox.path if cfg.inbox.enabled else None
        self.intake = Intake(inbox, cfg.state_dir / "incoming") if inbox else None
        self.watcher = Watcher(inbox, config_file, host.post) if inbox or config_file else None
        self._signalled: collections.deque[SignalEvent] = collections.deque()

    def install_signal_handlers(self) -> None:
        """A handler runs on the main thread between two bytecodes, possibly while that thread
        holds the event queue's lock inside get(): a put() there would deadlock. deque.append
        takes no lock; the coordinator drains the deque on every turn (at most a tick later)."""
        table: tuple[tuple[signal.Signals, SignalEvent], ...] = (
            (signal.SIGTERM, StopRequested()),
            (signal.SIGINT, StopRequested()),
            (signal.SIGHUP, ReloadRequested("SIGHUP")),
        )
        for sig, event in table:
            signal.signal(sig, lambda *_, e=event: self._signalled.append(e))

    def take_signals(self) -> list[SignalEvent]:
        taken = []
        while self._signalled:
            taken.append(self._signalled.popleft())
        return taken

    @staticmethod
    def authority(cfg: AgentConfig) -> Authority:
        return Authority(cfg.security.admin_group)

    # -- life --------------------------------------------------------------------------------------
    def started(self) -> None:
        """Serving: fix the sockets' group and mode, watch files, tell systemd we are ready."""
        for path in (self.cfg.socket, self.cfg.control_path):
            secure_socket(path, self.cfg.security.socket_group)
        if self.watcher is not None:
            self.watcher.start()
        self._scan_inbox()
        self._rescan_at = time.monotonic() + 2 * SETTLED_S  # files that were still settling
        self.notifier.ready(self.status_line())
        if self.notifier.enabled:
            log.info("notified systemd via %s (watchdog ping every %s s)", self.notifier.via, self.notifier.interval)

    def tick(self) -> None:
        self.notifier.tick(self.status_line)
        if self._rescan_at and time.monotonic() >= self._rescan_at:
            self._rescan_at = 0.0
            self._scan_inbox()

    def _scan_inbox(self) -> None:
        if self.intake is not None:
            for path in self.intake.existing():
                self.host.post(FileDropped(path))

    def stopping(self) -> None:
        self.notifier.stopping()
        if self.watcher is not None:
            self.watcher.stop()

    # -- reload ------------------------------------------------------------------------------------
    def reload(self, why: str) -> None:
        self.notifier.reloading()
        outcome = self.reloader.reload(why)
        if why != CONFIG_CHANGED or outcome.changed or not outcome.ok:
            self.host.emit("config_reload", ok=outcome.ok, reason=outcome.line(), trigger=why)
        self.notifier.ready(self.status_line())

    # -- the drop folder -----------------------------------------------------------------------
    def take_dropped(self, path: Path) -> None:
        if self.intake is None:
            return
        drop = self.intake.take(path)
        if drop is None:
            return
        log.info("inbox: %s dropped (version %s)", drop.name, drop.version)
        try:
            self.intake.verify(drop)
            self.host.deploy_file(drop.part, drop.version)
        except (AgentError, OSError) as err:
            drop.part.unlink(missing_ok=True)
            self._reject_drop(drop, str(err))

    def _reject_drop(self, drop: Drop, reason: str) -> None:
        ref = ObjectRef("local", f"inbox/{drop.name}")
        unknown = [TensorSpec("(not read)", "float32", ())]  # a manifest lists I/O; this file had none to read
        manifest = Manifest(drop.version, drop.actual_sha256, drop.size, ref, unknown, unknown, now())
        origin = f"dropped into the inbox as {drop.name}"
        self.host.reject_file(manifest, origin, reason if reason.startswith("inbox") else f"inbox: {reason}")

    # -- STATUS= -------------------------------------------------------------------------------
    def status_line(self) -> str:
        try:
            return status_line(self.host.status(), self.reloader.last)
        except Exception as err:  # the status must never stop the watchdog pings
            return f"running (status unavailable: {err})"


def status_line(s: dict[str, Any], reload: Outcome | None = None) -> str:
    """One line of what `agent status` says, for `systemctl status`."""
    a, p, r = s.get("active"), s.get("pending"), s.get("last_rejected")
    parts = [f"active {a['version']}" if a else "no active model", f"backend {s.get('backend')}"]
    parts.append("broker connected" if (s.get("broker") or {}).get("connected") else "broker offline")
    if p:
        parts.append(f"pending {p['version']}: {p['stage']}")
    if r:
        parts.append(f"last rejected {r['version']}: {r['reason']}")
    if reload is not None and not reload.ok:
        parts.append(reload.line())
    return "; ".join(parts)
