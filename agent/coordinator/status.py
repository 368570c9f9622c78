"""What `agent status` and the retained MQTT status topic say, built from the coordinator's state."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.contract.protocol import now
from agent.coordinator.lifecycle import ModelState

if TYPE_CHECKING:
    from agent.coordinator.daemon import Daemon


class StatusBuilder:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def build(self) -> dict[str, Any]:
        d = self.d
        d.server.drain(force=True)
        active = d.store.active()
        rejected = d.store.last_rejected()
        rolled = sorted(d.store.in_state(ModelState.ROLLED_BACK), key=lambda r: r.updated_at)
        staged = [
            r.version for r in d.store.in_state(ModelState.STAGED) if d.working is None or r.id != d.working.record_id
        ]
        watch = d.activation.watch
        minute = d.recorder.last_minute()
        conflict = d.link.conflict_until > time.time()
        return {
            "device_id": d.cfg.device_id,
            "state": "stopping" if d.stopping else "running",
            "pid": os.getpid(),
            "uptime_s": round(time.time() - d.started_at, 1),
            "agent_version": __version__,
            "channel": d.cfg.channel,
            "backend": d.backend.name,
            "backend_version": d.backend.version(),
            "broker": {
                "url": d.cfg.mqtt.url,
                "connected": d.link.connected,
                "conflict": (
                    "another agent connected with this device_id; backing off (give each robot its own device_id)"
                )
                if conflict
                else None,
            },
            "active": None
            if active is None
            else {
                "version": active.version,
                "sha256": active.sha256,
                "backend": d.backend.name,
                "activated_at": active.activated_at,
                "source": active.source,
            },
            "pending": self._pending(),
            "waiting_to_activate": self._parked(),
            "last_rejected": None
            if rejected is None
            else {
                "version": rejected.version,
                "reason": rejected.reason,
                "at": rejected.updated_at,
            },
            "last_rollback": None
            if not rolled
            else {
                "version": rolled[-1].version,
                "reason": rolled[-1].reason,
                "at": rolled[-1].updated_at,
            },
            "activation": d.cfg.activation,
            "staged": staged,
            "pinned": d.activation.pinned,
            "operator": None
            if d.activation.loading is None
            else {"cmd": d.activation.loading.cmd, "version": d.activation.loading.target.version},
            "deferred": (d.store.mark(f"deferred:{d.cfg.channel}") or {}).get("manifest", {}).get("version"),
            "watch": None if watch is None else watch.to_json(d.server.stats, d.cfg.watch.window_s),
            "latency_last_minute": {"count": minute.count, "p50_us": minute.p50_us, "p99_us": minute.p99_us},
            "clients": d.server.clients,
            "serving": d.server.serving_info(),
            "requests": d.server.requests,
            "request_errors": d.server.errors,
            "ignored_payloads": d.ignored_payloads,
            "last_ignored_payload": d.last_ignored or None,
            "outbox": d.store.outbox_size(),
        }

    def _pending(self) -> dict[str, Any] | None:
        d = self.d
        if d.working is None:
            return None
        rec = d.store.get(d.working.record_id)
        done, total = d.progress.get(rec.id, (0, rec.manifest.size))
        return {
            "version": rec.version,
            "stage": rec.state.value,
            "reason": rec.reason,
            "downloaded_bytes": done,
            "total_bytes": total,
            "queued": len(d.waiting),
            "build": d.build_progress.get(rec.id),  # pid, stage, percent, elapsed_s of a running build
        }

    def _parked(self) -> dict[str, Any] | None:
        """A staged model held back by the activation policy (go2 `when-idle`)."""
        parked = self.d.activation.parked
        if parked is None:
            return None
        return {"version": parked[1].version, "reason": self.d.activation.parked_why or "checking the controller"}

    def mqtt(self) -> dict[str, Any]:
        s = self.build()
        return {
            "protocol": 1,
            "type": "status",
            "online": True,
            "ts": now(),
            **{
                k: s[k]
                for k in (
                    "device_id",
                    "agent_version",
                    "channel",
                    "backend",
                    "backend_version",
                    "active",
                    "pending",
                    "last_rejected",
                    "uptime_s",
                )
            },
        }
