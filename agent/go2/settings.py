"""The agent config's `[go2]` section: the controller's DDS link and safety, and the sim gate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.contract.tomlconf import positive
from agent.errors import ConfigError

ESTOP_KEYS = ("R1", "L1", "start", "select", "R2", "L2", "F1", "F2", "A", "B", "X", "Y", "up", "right", "down", "left")


@dataclass
class SimGateConfig:
    enabled: bool = False
    mjcf: Path | None = None  # e.g. <go2 data>/mjcf/scene_flat.xml
    duration_s: float = 10.0  # simulated seconds of walking
    settle_s: float = 1.0  # soft start to the default stance before the policy takes over
    command: list[float] = field(default_factory=lambda: [0.5, 0.0, 0.0])
    min_height_m: float = 0.2
    min_progress_m: float = 2.5  # forward (x) progress the policy must make in duration_s

    def check(self) -> None:
        if self.enabled and self.mjcf is None:
            raise ConfigError("go2.sim_gate.mjcf: needed when the sim gate is enabled")
        positive("go2.sim_gate.duration_s", self.duration_s)
        if len(self.command) != 3:
            raise ConfigError("go2.sim_gate.command: [vx, vy, wz]")


@dataclass
class Go2Config:
    domain: int = 0  # DDS domain: 0 on the real robot, commonly 1 for simulators
    interface: str = ""  # robot-facing NIC (e.g. eth0); "" lets cyclonedds choose; "lo" for a local simulator
    simulated: bool = False  # true: no sport service to release (a simulator on the other end)
    lockstep: bool = False  # the loop runs on lowstate ticks (simulator lockstep mode), not on a timer
    control_socket: Path | None = None  # default: go2.sock beside the agent's socket
    command: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # vx, vy, wz at start (source "config")
    # Where the velocity command comes from: "remote" (the sticks, agent.go2.remote), "config" (`command`,
    # then `agent go2 command`), "cli" (zero until `agent go2 command`). "": remote on the real robot,
    # config with `simulated = true`.
    command_source: Literal["", "remote", "config", "cli"] = ""
    soft_start_s: float = 2.0
    hold_s: float = 1.0  # after an inference error/timeout: stand this long, then damp
    damping_kd: float = 2.0
    lowstate_timeout_s: float = 0.1
    joint_margin_rad: float = 1.0  # a target past the joint range by more than this is a fault (a little is normal)
    estop_keys: list[str] = field(default_factory=lambda: ["B"])  # remote keys that together mean e-stop
    activation: Literal["immediate", "when-idle"] = "immediate"  # when-idle: swap only while the robot stands still
    lockstep_wait_s: float = 10.0  # lockstep: how long the loop waits for an answer before it counts a timeout
    sim_gate: SimGateConfig = field(default_factory=SimGateConfig)

    @property
    def source(self) -> str:
        return self.command_source or ("config" if self.simulated else "remote")

    def check(self) -> None:
        for key in ("soft_start_s", "hold_s", "damping_kd", "lowstate_timeout_s", "lockstep_wait_s"):
            positive(f"go2.{key}", getattr(self, key))
        bad = [k for k in self.estop_keys if k not in ESTOP_KEYS]
        if bad or not self.estop_keys:
            raise ConfigError(f"go2.estop_keys: a non-empty list of {', '.join(ESTOP_KEYS)}")
        if len(self.command) != 3:
            raise ConfigError("go2.command: [vx, vy, wz]")
