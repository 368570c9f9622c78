"""The daemon as a system service: sd_notify (ready, status, watchdog, reload, stop), config reload,
the drop folder, signed-announcement checks and socket permissions. The coordinator calls in at a
few points (`started`, `tick`, `stopping`, `dispatch`, `rejects`); everything here runs on the
coordinator thread except the file watcher, which only enqueues."""

from __future__ import annotations

import collections
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.contract.protocol import Announcement, Manifest, ObjectRef, TensorSpec, now
from agent.contract.signing import SignatureRejected, Trust
from agent.coordinator.lifecycle import ModelState
from agent.errors import AgentError
from agent.system.inbox import SETTLED_S, Drop, Intake, Watcher
from agent.system.notify import Notifier
from agent.system.peercred import Authority, secure_socket
from agent.system.reload import Reloader

if TYPE_CHECKING:
    from agent.coordinator.daemon import Daemon

log = logging.getLogger(__name__)


class Service:
    KINDS = frozenset({"reload", "inbox", "debug-hang"})

    def __init__(self, daemon: Daemon, config_file: Path | None) -> None:
        self.d = daemon
        cfg = daemon.cfg
        self.notifier = Notifier()
        self._rescan_at = 0.0
        self.trust = Trust(cfg.security.trusted_keys)
        self.reloader = Reloader(config_file, cfg, self._apply)
        inbox = cfg.inbox.path if cfg.inbox.enabled else None
        self.intake = Intake(inbox, cfg.state_dir / "incoming") if inbox else None
        self.watcher = Watcher(inbox, config_file, daemon.events) if inbox or config_file else None
        self._signalled: collections.deque[tuple[Any, ...]] = collections.deque()

    def install_signal_handlers(self) -> None:
        """A handler runs on the main thread between two bytecodes, possibly while that thread
        holds the event queue's lock inside get(): a put() there would deadlock. deque.append
        takes no lock; the coordinator drains the deque on every turn (at most TICK_S later)."""
        table = ((signal.SIGTERM, ("stop",)), (signal.SIGINT, ("stop",)), (signal.SIGHUP, ("reload", "SIGHUP")))
        for sig, event in table:
            signal.signal(sig, lambda *_, e=event: self._signalled.append(e))

    def take_signals(self) -> list[tuple[Any, ...]]:
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
        for path in (self.d.cfg.socket, self.d.cfg.control_path):
            secure_socket(path, self.d.cfg.security.socket_group)
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
                self.d.events.put(("inbox", str(path)))

    def stopping(self) -> None:
        self.notifier.stopping()
        if self.watcher is not None:
            self.watcher.stop()

    def dispatch(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "reload":
            self._reload(str(event[1]))
        elif kind == "inbox":
            self._take(Path(event[1]))
        elif kind == "debug-hang":
            log.warning("debug-hang: blocking the coordinator for %.0f s", event[1])
            time.sleep(float(event[1]))

    # -- reload ------------------------------------------------------------------------------------
    def _reload(self, why: str) -> None:
        self.notifier.reloading()
        outcome = self.reloader.reload(why)
        if why != "config file changed" or outcome.changed or not outcome.ok:
            self.d.emit("config_reload", ok=outcome.ok, reason=outcome.line(), trigger=why)
        self.notifier.ready(self.status_line())

    def _apply(self, new: AgentConfig, key: str) -> None:
        d = self.d
        if key == "log_level":
            logging.getLogger().setLevel(new.log_level.upper())
        elif key == "telemetry":
            d._next_telemetry = time.monotonic() + new.telemetry.interval_s
        elif key == "s3":
            d._s3 = None  # the next download makes a client with the new settings
        elif key == "security":
            self.trust = Trust(new.security.trusted_keys)
            d.control.authority = self.authority(new)
        elif key == "disk_reserve_mb":
            d.pipeline.reserve_bytes = new.disk_reserve_mb * 2**20

    # -- signed announcements ------------------------------------------------------------------
    def rejects(self, raw: dict[str, Any], ann: Announcement) -> bool:
        """True when the announcement's signature is required and missing or wrong; it is then
        recorded as a rejected model (status and event), and its sequence is not taken."""
        try:
            self.trust.check(raw)
        except SignatureRejected as err:
            rec = self.d.store.add(ann.manifest, ann.channel, ann.sequence, "channel", "announced")
            self.d.transition(rec, ModelState.REJECTED, str(err))
            return True
        return False

    # -- the drop folder -----------------------------------------------------------------------
    def _take(self, path: Path) -> None:
        assert self.intake is not None
        drop = self.intake.take(path)
        if drop is None:
            return
        log.info("inbox: %s dropped (version %s)", drop.name, drop.version)
        try:
            self.intake.verify(drop)
            self.d._deploy(drop.part, drop.version)
        except (AgentError, OSError) as err:
            drop.part.unlink(missing_ok=True)
            self._reject_drop(drop, str(err))

    def _reject_drop(self, drop: Drop, reason: str) -> None:
        ref = ObjectRef("local", f"inbox/{drop.name}")
        unknown = [TensorSpec("(not read)", "float32", ())]  # a manifest lists I/O; this file had none to read
        manifest = Manifest(drop.version, drop.actual_sha256, drop.size, ref, unknown, unknown, now())
        rec = self.d.store.add(manifest, self.d.cfg.channel, None, "local", f"dropped into the inbox as {drop.name}")
        self.d.transition(rec, ModelState.REJECTED, reason if reason.startswith("inbox") else f"inbox: {reason}")

    # -- STATUS= -------------------------------------------------------------------------------
    def status_line(self) -> str:
        try:
            return status_line(self.d.status.build(), self.reloader.last)
        except Exception as err:  # the status must never stop the watchdog pings
            return f"running (status unavailable: {err})"


def status_line(s: dict[str, Any], reload: Any = None) -> str:
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
