"""Robot state -> observation vector, and raw policy action -> joint targets, as a deploy config says."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.go2.deploy import DeployConfig


@dataclass
class RobotState:
    """What the controller knows of the robot; joints in SDK motor order."""

    quat: np.ndarray  # IMU orientation (w, x, y, z)
    gyro: np.ndarray  # body-frame angular velocity
    q: np.ndarray
    dq: np.ndarray
    tick: int = 0
    lin_vel_world: np.ndarray = field(default_factory=lambda: np.zeros(3))  # from the state estimator
    remote: bytes = b""


def projected_gravity(quat: np.ndarray) -> np.ndarray:
    w, x, y, z = quat
    return np.array([2 * (-z * x + w * y), -2 * (z * y + w * x), 1 - 2 * (w * w + z * z)])


def world_to_body(quat: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate a world-frame vector into the body frame (inverse rotation of `quat`)."""
    w, x, y, z = quat
    u = np.array([-x, -y, -z])
    t = 2 * np.cross(u, v)
    return np.asarray(v + w * t + np.cross(u, t))


class Mapper:
    def __init__(self, cfg: DeployConfig) -> None:
        self.cfg = cfg

    def observation(self, s: RobotState, command: np.ndarray, last_action: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        parts = []
        for term in cfg.observations:
            parts.append(self._term(term, s, command, last_action) * cfg.obs_scales[term])
        obs = np.clip(np.concatenate(parts), -cfg.obs_clip, cfg.obs_clip)
        return obs.astype(np.float32).reshape(1, -1)

    def _term(self, term: str, s: RobotState, command: np.ndarray, last_action: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        if term == "ang_vel":
            return s.gyro
        if term == "gravity":
            return projected_gravity(s.quat)
        if term == "commands":
            return command
        if term == "lin_vel":
            return world_to_body(s.quat, s.lin_vel_world)
        if term == "dof_pos":
            return cfg.to_policy(s.q) - cfg.default_q
        if term == "dof_vel":
            return cfg.to_policy(s.dq)
        return last_action  # "actions"

    def fault(self, raw: np.ndarray) -> str | None:
        """Why a raw action must not reach the motors (non-finite, beyond the bound), or None."""
        if raw.shape != (12,):
            return f"the policy returned {raw.shape} values, not 12"
        if not np.isfinite(raw).all():
            return f"non-finite action ({int((~np.isfinite(raw)).sum())} of 12 values NaN/Inf)"
        worst = float(np.abs(raw).max())
        if worst > self.cfg.action_bound:
            return f"raw action {worst:.3g} beyond the bound {self.cfg.action_bound:g}"
        return None

    def targets(self, raw: np.ndarray) -> np.ndarray:
        """Joint targets in SDK motor order from a raw action (already checked by `fault`)."""
        cfg = self.cfg
        clipped = np.clip(raw, cfg.action_clip_low, cfg.action_clip_high)
        return cfg.to_motor(cfg.default_q + clipped * cfg.action_scale)

    def default_stance(self) -> np.ndarray:
        return self.cfg.to_motor(self.cfg.default_q)

    def gains(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kp, kd, torque limit in SDK motor order."""
        cfg = self.cfg
        return cfg.to_motor(cfg.kp), cfg.to_motor(cfg.kd), cfg.to_motor(cfg.torque_limit)
