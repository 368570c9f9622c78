"""A policy's deploy config: which observation terms in which order, their scales, the joint order,
default stance, action scale, gains, clips, limits and rates. It travels with the model (manifest
field `deploy_config`, set by `fleet publish --deploy-config FILE`), so a swap can change it.

Joint order: `joint_order[i]` is the Unitree SDK motor index (FR, FL, RR, RL x hip, thigh, calf)
of the policy's joint i. Per-joint values (default_q, action_scale, kp, kd, torque_limit, clips)
are in the policy's joint order and may be given as 1 value, 3 (one leg, repeated) or 12."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.protocol import TensorSpec
from agent.errors import ConfigError

NUM_JOINTS = 12
TERM_SIZES = {"lin_vel": 3, "ang_vel": 3, "gravity": 3, "commands": 3, "dof_pos": 12, "dof_vel": 12, "actions": 12}
MANIFEST_KEY = "deploy_config"


@dataclass(frozen=True)
class DeployConfig:
    observations: tuple[str, ...]
    obs_scales: dict[str, np.ndarray]  # term -> scale (broadcast over the term)
    obs_clip: float
    joint_order: np.ndarray  # policy joint i -> SDK motor index
    default_q: np.ndarray  # policy order
    action_scale: np.ndarray
    action_clip_low: np.ndarray
    action_clip_high: np.ndarray
    action_bound: float  # |raw action| beyond this is a fault (damping), not something to clip
    kp: np.ndarray
    kd: np.ndarray
    torque_limit: np.ndarray
    policy_hz: float
    control_hz: float
    inference_deadline_s: float
    command_limits: np.ndarray  # |vx|, |vy|, |wz| the policy was trained for: the remote's full stick
    input_name: str | None
    output_name: str | None
    source: dict[str, Any]  # what it was built from (goes into the manifest as is)

    @property
    def num_obs(self) -> int:
        return sum(TERM_SIZES[t] for t in self.observations)

    @property
    def decimation(self) -> int:
        return round(self.control_hz / self.policy_hz)

    def to_motor(self, policy_values: np.ndarray) -> np.ndarray:
        out = np.zeros(NUM_JOINTS, policy_values.dtype)
        out[self.joint_order] = policy_values
        return out

    def to_policy(self, motor_values: np.ndarray) -> np.ndarray:
        return motor_values[self.joint_order]

    def check_io(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
        """Why the controller cannot serve a model with this I/O under this config, or None."""
        ins = [s for s in inputs if self.input_name in (None, s.name)]
        outs = [s for s in outputs if self.output_name in (None, s.name)]
        if len(ins) != 1 or len(outs) != 1:
            return (
                f"the deploy config needs one observation input and one action output; the model has inputs "
                f"{[s.name for s in inputs]} and outputs {[s.name for s in outputs]}"
            )
        if ins[0].shape[-1:] != (self.num_obs,):
            shape = list(ins[0].shape)
            return f"the deploy config builds {self.num_obs} observations; input {ins[0].name!r} is {shape}"
        if outs[0].shape[-1:] != (NUM_JOINTS,):
            return f"the deploy config drives {NUM_JOINTS} joints; output {outs[0].name!r} is {list(outs[0].shape)}"
        return None


def load(path: Path) -> DeployConfig:
    """A deploy config file: TOML, or JSON when the name ends in .json."""
    if path.suffix == ".json":
        try:
            return from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: {err}") from err
    from agent.contract.tomlconf import read_toml

    return from_dict(read_toml(path))


def from_dict(d: dict[str, Any]) -> DeployConfig:
    known = {
        "observations", "obs_scales", "obs_clip", "joint_order", "default_q", "action_scale", "action_clip",
        "action_bound", "kp", "kd", "torque_limit", "policy_hz", "control_hz", "inference_deadline_s",
        "command_limits", "input", "output", "name",
    }  # fmt: skip
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"deploy config: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    terms = tuple(_req(d, "observations"))
    for t in terms:
        if t not in TERM_SIZES:
            raise ConfigError(f"deploy config: observations: unknown term {t!r} (known: {', '.join(TERM_SIZES)})")
    clip = d.get("action_clip", 100.0)
    low, high = (clip, clip) if not isinstance(clip, list) or len(clip) != 2 else clip
    cfg = DeployConfig(
        observations=terms,
        obs_scales=_scales(d.get("obs_scales", {}), terms),
        obs_clip=_pos(d, "obs_clip", 100.0),
        joint_order=_joint_order(d.get("joint_order", list(range(NUM_JOINTS)))),
        default_q=_per_joint(d, "default_q", None),
        action_scale=_per_joint(d, "action_scale", None),
        action_clip_low=-np.abs(_per_joint({"v": low}, "v", None)),
        action_clip_high=np.abs(_per_joint({"v": high}, "v", None)),
        action_bound=_pos(d, "action_bound", 100.0),
        kp=_per_joint(d, "kp", None),
        kd=_per_joint(d, "kd", None),
        torque_limit=_per_joint(d, "torque_limit", 23.5),
        policy_hz=_pos(d, "policy_hz", 50.0),
        control_hz=_pos(d, "control_hz", 500.0),
        inference_deadline_s=_pos(d, "inference_deadline_s", 0.05),
        command_limits=_limits(d.get("command_limits", [1.0, 0.5, 1.0])),
        input_name=d.get("input"),
        output_name=d.get("output"),
        source=dict(d),
    )
    if abs(cfg.control_hz / cfg.policy_hz - cfg.decimation) > 1e-6:
        raise ConfigError("deploy config: control_hz must be a whole multiple of policy_hz")
    return cfg


def from_manifest_extra(extra: dict[str, Any]) -> DeployConfig | None:
    raw = extra.get(MANIFEST_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"manifest.{MANIFEST_KEY} must be an object")
    return from_dict(raw)


def _limits(v: Any) -> np.ndarray:
    ok = isinstance(v, list) and len(v) == 3
    ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)
    if not ok:
        raise ConfigError(f"deploy config: command_limits must be three positive numbers [vx, vy, wz], got {v!r}")
    return np.asarray(v, np.float64)


def _req(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ConfigError(f"deploy config: missing key {key!r}")
    return d[key]


def _pos(d: dict[str, Any], key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"deploy config: {key} must be a positive number, got {v!r}")
    return float(v)


def _floats(key: str, v: Any) -> np.ndarray:
    vals = v if isinstance(v, list) else [v]
    if not vals or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
        raise ConfigError(f"deploy config: {key} must be a number or a list of numbers")
    arr = np.asarray(vals, np.float64)
    if not np.isfinite(arr).all():
        raise ConfigError(f"deploy config: {key} has non-finite values")
    return arr


def _per_joint(d: dict[str, Any], key: str, default: float | None) -> np.ndarray:
    v = _req(d, key) if default is None else d.get(key, default)
    arr = _floats(key, v)
    if len(arr) in (1, 3):
        return np.tile(arr, NUM_JOINTS // len(arr))
    if len(arr) != NUM_JOINTS:
        raise ConfigError(f"deploy config: {key} needs 1, 3 or {NUM_JOINTS} values, got {len(arr)}")
    return arr


def _scales(d: Any, terms: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not isinstance(d, dict):
        raise ConfigError("deploy config: obs_scales must be a table of term = scale")
    out = {}
    for t in terms:
        arr = _floats(f"obs_scales.{t}", d.get(t, 1.0))
        if len(arr) not in (1, TERM_SIZES[t]):
            raise ConfigError(f"deploy config: obs_scales.{t} needs 1 or {TERM_SIZES[t]} values")
        out[t] = arr
    extra = sorted(set(d) - set(terms))
    if extra:
        raise ConfigError(f"deploy config: obs_scales.{extra[0]} is not one of the observation terms")
    return out


def _joint_order(v: Any) -> np.ndarray:
    if not isinstance(v, list) or sorted(v) != list(range(NUM_JOINTS)):
        raise ConfigError(f"deploy config: joint_order must be a permutation of 0..{NUM_JOINTS - 1}")
    return np.asarray(v, np.intp)
