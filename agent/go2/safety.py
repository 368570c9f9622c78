"""The safety layer: which command reaches the motors in each mode. Pure logic, owned by the
controller's loop thread.

passive    at boot and after a stop: damping only (kp = 0, kd > 0); nothing moves until `arm`
soft_start interpolate from where the joints are to the default stance
walk       the policy's targets
hold       after an inference error or timeout: PD to the default stance, for hold_s
damp       latched (e-stop, stale lowstate, a bad action, hold expired): kp = 0, kd > 0 until re-armed
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from agent.go2.settings import ESTOP_KEYS, Go2Config

# Go2 joint ranges (rad) in SDK motor order FR, FL, RR, RL x hip, thigh, calf (from the MJCF).
_FRONT = [(-1.0472, 1.0472), (-1.5708, 3.4907), (-2.7227, -0.83776)]
_BACK = [(-1.0472, 1.0472), (-0.5236, 4.5379), (-2.7227, -0.83776)]
JOINT_LOW = np.array([lo for lo, _ in _FRONT * 2 + _BACK * 2])
JOINT_HIGH = np.array([hi for _, hi in _FRONT * 2 + _BACK * 2])


class Mode(str, enum.Enum):
    PASSIVE = "passive"
    SOFT_START = "soft_start"
    WALK = "walk"
    HOLD = "hold"
    DAMP = "damp"


@dataclass
class MotorCommand:
    q: np.ndarray
    dq: np.ndarray
    tau: np.ndarray
    kp: np.ndarray
    kd: np.ndarray


class Safety:
    def __init__(self, cfg: Go2Config) -> None:
        self.cfg = cfg
        self.mode = Mode.PASSIVE
        self.reason = "waiting for `agent go2 arm`"
        self.since = 0.0
        self._start_q = np.zeros(12)
        self._estop_mask = sum(1 << ESTOP_KEYS.index(k) for k in cfg.estop_keys)

    def set(self, mode: Mode, reason: str, now: float) -> bool:
        """Change mode; False when already there (no new event)."""
        if mode == self.mode:
            return False
        self.mode, self.reason, self.since = mode, reason, now
        return True

    def arm(self, now: float, q: np.ndarray) -> None:
        self._start_q = q.copy()
        self.set(Mode.SOFT_START, "armed: moving to the default stance", now)

    def estop_pressed(self, remote: bytes) -> bool:
        if len(remote) < 4:
            return False
        keys = remote[2] | remote[3] << 8
        return keys & self._estop_mask == self._estop_mask

    def target_fault(self, targets: np.ndarray) -> str | None:
        m = self.cfg.joint_margin_rad
        over = np.maximum(targets - (JOINT_HIGH + m), (JOINT_LOW - m) - targets)
        worst = int(np.argmax(over))
        if over[worst] > 0:
            return f"target {targets[worst]:.3f} rad for motor {worst} outside its range by more than {m} rad"
        return None

    def clip_targets(self, targets: np.ndarray) -> tuple[np.ndarray, str | None]:
        """Targets held within the joint range plus the margin, and why, when some were not.
        One such action is a stumble a walking policy recovers from (measured on Unitree's
        simulator: calf targets up to 1.1 rad past the range, then normal walking); damping
        there would drop the dog. `TargetGuard` damps when it goes on."""
        why = self.target_fault(targets)
        m = self.cfg.joint_margin_rad
        return np.clip(targets, JOINT_LOW - m, JOINT_HIGH + m), why

    def damping(self) -> MotorCommand:
        z = np.zeros(12)
        return MotorCommand(z, z, z, z, np.full(12, self.cfg.damping_kd))

    def soft_start(self, now: float, stance: np.ndarray) -> tuple[np.ndarray, bool]:
        """Interpolated target and whether the soft start is over."""
        a = min(1.0, (now - self.since) / self.cfg.soft_start_s)
        return self._start_q + (stance - self._start_q) * a, a >= 1.0


class TargetGuard:
    """Out-of-range targets are clipped; on `limit` policy steps in a row they are a fault (damping)."""

    def __init__(self, safety: Safety, limit: int = 3) -> None:
        self.safety = safety
        self.limit = limit
        self.run = 0  # consecutive policy steps with a target clipped
        self.clipped = 0  # in all

    def check(self, targets: np.ndarray) -> tuple[np.ndarray, str | None]:
        """(the targets to use, a fault reason when the policy keeps asking beyond the range)."""
        clipped, why = self.safety.clip_targets(targets)
        if why is None:
            self.run = 0
            return clipped, None
        self.run += 1
        self.clipped += 1
        if self.run >= self.limit:
            return clipped, f"{why}, {self.run} policy steps in a row"
        return clipped, None


def limit_torque(
    q_des: np.ndarray, q: np.ndarray, dq: np.ndarray, *, kp: np.ndarray, kd: np.ndarray, limit: np.ndarray
) -> np.ndarray:
    """Move q_des so that the motors' PD torque kp(q_des - q) - kd·dq stays within ±limit."""
    tau = np.clip(kp * (q_des - q) - kd * dq, -limit, limit)
    safe_kp = np.where(kp > 0, kp, 1.0)
    return np.where(kp > 0, q + (tau + kd * dq) / safe_kp, q_des)
