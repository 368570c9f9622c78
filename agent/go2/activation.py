"""The `when-idle` activation policy: a staged model becomes active only while the Go2 controller
reports the robot not walking (passive, damped, or standing still with a zero command). With no
controller running, no policy drives the robot, so that counts as idle; a controller that is there
but does not answer does not."""

from __future__ import annotations

from pathlib import Path

from agent.errors import AgentError, DaemonNotRunning

QUERY_TIMEOUT_S = 0.5


class WhenIdle:
    def __init__(self, controller_socket: Path) -> None:
        self.socket = controller_socket

    def ready(self) -> tuple[bool, str]:
        """(may activate now, why not)."""
        from agent.system.control import call

        try:
            reply = call(self.socket, {"cmd": "status"}, timeout=QUERY_TIMEOUT_S)
        except DaemonNotRunning:
            return True, ""
        except (AgentError, OSError, ValueError) as err:
            return False, f"the Go2 controller does not answer: {err}"
        s = reply.get("status") or {}
        if s.get("idle"):
            return True, ""
        return False, f"the robot is not idle (controller mode {s.get('mode')}, command {s.get('command')})"
