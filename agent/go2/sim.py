"""`agent go2 sim --mjcf PATH`: a headless MuJoCo Go2 on the robot's DDS topics. It publishes
rt/lowstate from the model's sensors every physics step and applies each rt/lowcmd as the motors'
PD law every physics step. Where it matters to a controller it behaves like Unitree's own simulator
(unitree_mujoco's bridge): `tick` stays 0 in real time (`--count-ticks` counts it like the robot's
firmware), so a controller cannot lean on a convention the real counterparts do not share.

Real time: physics at its own timestep on a timer, the latest command applied.
Lockstep (tests): one physics step per command, and only for the command that answers the last
published tick (LowCmd.reserve), so a loaded machine slows the run but does not change it.
Commands with a wrong CRC are dropped, as the firmware does."""

from __future__ import annotations

import json
import logging
import signal
import struct
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.go2 import dds
from agent.go2.crc import lowcmd_crc
from agent.go2.physics import Go2Physics

log = logging.getLogger(__name__)

RESEND_S = 0.2  # lockstep: publish the same state again if no answer came (discovery, a lost sample)
TRACE_EVERY = 10  # ticks between trace lines


class Simulator:
    def __init__(
        self,
        mjcf: Path,
        domain: int,
        interface: str | None,
        lockstep: bool,
        *,
        trace: Path | None = None,
        duration_s: float | None = None,
        estop_at_s: float | None = None,
        sport_state: bool = False,
        count_ticks: bool = False,
        sticks: tuple[float, ...] | None = None,
    ) -> None:
        self.physics = Go2Physics(mjcf)
        self.lockstep = lockstep
        self.bus = dds.Bus(domain, interface, reliable=lockstep)
        self.duration_s = duration_s
        self.estop_at_s = estop_at_s
        self.sport_state = sport_state  # also publish the base velocity, as a state estimator would
        self.count_ticks = count_ticks or lockstep  # lockstep answers name the tick they answer
        self.sticks = sticks  # the remote's (lx, ly, rx, ry), held for the whole run
        self.commands = dds.Latest()
        self.bad_crc = 0
        self._trace: IO[str] | None = trace.open("a") if trace else None
        self.stopping = threading.Event()
        z = np.zeros(12)
        self._cmd: tuple[np.ndarray, ...] = (z, z, z, z, z)  # no command yet: no torque

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        writer = self.bus.writer(dds.LOWSTATE, self.bus.LowState)
        self._sport = self.bus.writer(dds.SPORTSTATE, self.bus.SportState) if self.sport_state else None
        self._sport_msg = self.bus.new_sportstate()
        self.bus.reader(dds.LOWCMD, self.bus.LowCmd, self._on_command)
        self._msg = self.bus.new_lowstate()
        log.info("go2 sim up (%s, dt %.4f s)", "lockstep" if self.lockstep else "real time", self.physics.dt)
        try:
            (self._run_lockstep if self.lockstep else self._run_realtime)(writer)
        finally:
            if self._trace:
                self._trace.close()
            self.bus.close()
        return 0

    def _on_command(self, msg: Any) -> None:
        """Like the firmware: a command whose CRC is wrong is dropped, silently on the robot, logged here."""
        if lowcmd_crc(msg) != msg.crc:
            self.bad_crc += 1
            if self.bad_crc in (1, 100, 10000):
                log.warning("dropped %d LowCmd with a wrong CRC (the robot drops them silently)", self.bad_crc)
            return
        self.commands.put((msg.reserve, dds.read_lowcmd(msg)))

    def _publish(self, writer: Any) -> None:
        s = self.physics.state()
        if not self.count_ticks:
            s.tick = 0  # as Unitree's bridge leaves it
        keys = 1 << 9 if self.estop_at_s is not None and self.physics.time >= self.estop_at_s else 0  # key B
        if keys or self.sticks:
            s.remote = remote_bytes(keys, self.sticks or (0.0, 0.0, 0.0, 0.0))
        if self._sport is not None:  # before the lowstate it goes with
            self._sport.write(dds.fill_sportstate(self._sport_msg, self.physics.base_position, s.lin_vel_world))
        writer.write(dds.fill_lowstate(self._msg, s))

    def _run_lockstep(self, writer: Any) -> None:
        seen = 0
        self._publish(writer)
        while not self._done():
            value, count = self.commands.wait_newer(seen, RESEND_S)
            if count == seen:
                self._publish(writer)  # nobody answered yet: say it again
                continue
            seen = count
            tick, cmd = value
            if tick != self.physics.tick:
                continue  # an answer to an older state
            self._step(cmd)
            self._publish(writer)

    def _run_realtime(self, writer: Any) -> None:
        next_at, seen = time.monotonic(), 0
        while not self._done():
            if self.commands.count != seen:
                seen = self.commands.count
                self._cmd = self.commands.value[1]
            self._step(self._cmd)
            self._publish(writer)
            next_at += self.physics.dt
            time.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > 0.1:
                next_at = time.monotonic()

    def _step(self, cmd: tuple[np.ndarray, ...]) -> None:
        q, dq, tau, kp, kd = cmd
        self.physics.step(q, dq, tau, kp, kd)
        if self._trace and self.physics.tick % TRACE_EVERY == 0:
            x, y, z = self.physics.base_position
            self._trace.write(
                json.dumps(
                    {
                        "tick": self.physics.tick,
                        "t": round(self.physics.time, 4),
                        "x": round(x, 4),
                        "y": round(y, 4),
                        "z": round(z, 4),
                    }
                )
                + "\n"
            )
            self._trace.flush()

    def _done(self) -> bool:
        return self.stopping.is_set() or (self.duration_s is not None and self.physics.time >= self.duration_s)


def remote_bytes(keys: int, sticks: tuple[float, ...]) -> bytes:
    """LowState.wireless_remote as the robot fills it (Unitree's bridge writes the same layout):
    head [0:2], keys [2:4] (u16 little-endian), lx [4:8], rx [8:12], ry [12:16], L2 [16:20],
    ly [20:24] (float32 little-endian)."""
    lx, ly, rx, ry = sticks
    raw = bytearray(40)
    struct.pack_into("<H", raw, 2, keys)
    struct.pack_into("<fff", raw, 4, lx, rx, ry)
    struct.pack_into("<f", raw, 20, ly)
    return bytes(raw)
