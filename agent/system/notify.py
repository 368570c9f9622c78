"""sd_notify for Type=notify units: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

systemd-python's `systemd.daemon.notify` is used where it imports; otherwise the same datagram is
written to $NOTIFY_SOCKET directly (a path, or an abstract socket spelled with a leading '@').
Outside systemd (no NOTIFY_SOCKET) every call is a no-op. The watchdog is fed from the
coordinator's own loop (`Notifier.tick`), so a hung coordinator stops the pings and systemd
restarts the process."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from agent.proc.logsetup import FORCE_FALLBACK_ENV

log = logging.getLogger(__name__)

STATUS_MIN_INTERVAL_S = 1.0  # STATUS= at most this often, and only when the line changed


def _systemd_sender() -> Callable[[str], bool] | None:
    if os.environ.get(FORCE_FALLBACK_ENV) == "1":
        return None
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None

    def send(state: str) -> bool:
        return bool(daemon.notify(state))

    return send


def socket_address(addr: str) -> str:
    """'@name' is an abstract socket: the kernel wants a leading NUL byte instead."""
    return "\0" + addr[1:] if addr.startswith("@") else addr


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        self.interval = watchdog_interval(env) if self.address else None
        self.library = _systemd_sender() if self.address else None
        self.via = "none" if self.address is None else ("systemd-python" if self.library else "socket")
        self._next_ping = 0.0
        self._last_status = ""
        self._next_status = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        message = "\n".join(fields)
        try:
            if self.library is not None:
                self.library(message)
            else:
                self._send_raw(message.encode())
        except OSError as err:  # systemd going away must never take the agent down
            log.debug("sd_notify(%s) failed: %s", message.replace("\n", " "), err)

    def _send_raw(self, data: bytes) -> None:
        assert self.address is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(data, socket_address(self.address))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={_one_line(status)}")
        self._ping(time.monotonic())

    def reloading(self) -> None:
        # MONOTONIC_USEC is what systemd >= 253 wants with RELOADING=1; 249 ignores it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def status(self, line: str) -> None:
        self._last_status = line
        self.send(f"STATUS={_one_line(line)}")

    def tick(self, status: Callable[[], str]) -> None:
        """Called by the coordinator loop on every turn: the watchdog ping, and STATUS when changed."""
        if self.address is None:
            return
        t = time.monotonic()
        self._ping(t)
        if t >= self._next_status:
            self._next_status = t + STATUS_MIN_INTERVAL_S
            line = status()
            if line != self._last_status:
                self.status(line)

    def _ping(self, t: float) -> None:
        if self.interval is not None and t >= self._next_ping:
            self._next_ping = t + self.interval
            self.send("WATCHDOG=1")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]
