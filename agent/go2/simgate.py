"""The sim-in-the-loop gate: before a locomotion policy drives a dog, the agent rolls it out in
MuJoCo on the device (the candidate engine itself, the deploy config from its manifest) and rejects
it if the base falls or forward progress misses its target. The figures go into the reason.

It also rejects a model whose deploy config the controller cannot serve, even when the rollout is
skipped (`agent deploy --skip-check sim`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.contract.protocol import Manifest
from agent.engines import Engine
from agent.errors import AgentError, RejectedModel
from agent.go2 import deploy
from agent.go2.deploy import DeployConfig
from agent.go2.mapping import Mapper
from agent.go2.safety import Safety, TargetGuard, limit_torque
from agent.go2.settings import Go2Config

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    progress_m: float  # x displacement of the base while the policy drove
    min_height_m: float
    seconds: float  # simulated seconds the policy drove before the end (or the fall / fault)
    fault: str = ""
    fell: bool = False


LIN_VEL_NOTE = (
    "base linear velocity (lin_vel): the simulator gives it; on the robot a state estimator must publish "
    "rt/sportmodestate (the sport service that does is released for low-level control): it will not arm without"
)


class Go2Gate:
    """validate.run_gate's behavioural hook: (engine, manifest, skipped checks) -> figures."""

    def __init__(self, cfg: Go2Config) -> None:
        self.cfg = cfg

    def __call__(self, engine: Engine, manifest: Manifest, skip: frozenset[str]) -> dict[str, Any]:
        dc = self._deploy_config(engine, manifest)
        if "sim" in skip:
            return {"check": "sim gate", "forced": "sim"}
        g = self.cfg.sim_gate
        if not g.enabled:
            return {"check": "sim gate", "disabled": True}
        r = rollout(engine, dc, self.cfg, np.asarray(g.command, np.float64))
        figures: dict[str, Any] = {
            "check": "sim gate",
            "sim_progress_m": round(float(r.progress_m), 3),
            "sim_min_height_m": round(r.min_height_m, 3),
            "sim_seconds": round(r.seconds, 2),
        }
        if "lin_vel" in dc.observations:
            figures["needs"] = LIN_VEL_NOTE
        what = f"command {g.command} for {g.duration_s:g} s simulated"
        if r.fault:
            raise RejectedModel("sim gate", f"{r.fault} after {r.seconds:.2f} s ({what})")
        if r.fell:
            raise RejectedModel(
                "sim gate",
                f"the base fell to {r.min_height_m:.3f} m (threshold {g.min_height_m:g} m) "
                f"after {r.seconds:.2f} s; forward progress {r.progress_m:.2f} m ({what})",
            )
        if r.progress_m < g.min_progress_m:
            raise RejectedModel(
                "sim gate",
                f"forward progress {r.progress_m:.2f} m misses the target "
                f"{g.min_progress_m:g} m; min base height {r.min_height_m:.3f} m ({what})",
            )
        log.info("sim gate passed: %s", figures)
        return figures

    def _deploy_config(self, engine: Engine, manifest: Manifest) -> DeployConfig:
        try:
            dc = deploy.from_manifest_extra(manifest.extra)
        except AgentError as err:
            raise RejectedModel("validate", f"bad deploy config: {err}") from err
        if dc is None:
            raise RejectedModel(
                "validate",
                "no deploy config: the Go2 controller cannot serve this model (fleet publish --deploy-config FILE)",
            )
        why = dc.check_io(engine.inputs, engine.outputs)
        if why:
            raise RejectedModel("validate", f"deploy config does not match the model: {why}")
        return dc


def rollout(engine: Engine, dc: DeployConfig, cfg: Go2Config, command: np.ndarray) -> Rollout:
    """Soft start to the default stance (settle_s), then the policy for duration_s, both simulated."""
    from agent.go2.physics import Go2Physics

    g = cfg.sim_gate
    assert g.mjcf is not None
    ph, mapper, guard = Go2Physics(g.mjcf), Mapper(dc), TargetGuard(Safety(cfg))
    kp, kd, limit = mapper.gains()
    z = np.zeros(12)
    start, stance = ph.state().q, mapper.default_stance()
    settle = round(g.settle_s / ph.dt)
    for i in range(settle):
        s = ph.state()
        q_des = start + (stance - start) * min(1.0, (i + 1) / settle)
        ph.step(limit_torque(q_des, s.q, s.dq, kp=kp, kd=kd, limit=limit), z, z, kp, kd)
    x0, min_h = ph.base_position[0], float(ph.base_position[2])
    steps_per_action = max(1, round(1.0 / (dc.policy_hz * ph.dt)))
    in_name = dc.input_name or engine.inputs[0].name
    out_name = dc.output_name or engine.outputs[0].name
    last, q_des = np.zeros(12), stance
    for i in range(round(g.duration_s / ph.dt)):
        s = ph.state()
        if i % steps_per_action == 0:
            raw = np.asarray(engine.run({in_name: mapper.observation(s, command, last)})[out_name], np.float64)
            raw = raw.reshape(-1)
            fault = mapper.fault(raw)
            if fault is None:
                q_des, fault = guard.check(mapper.targets(raw))
            if fault:
                return Rollout(float(ph.base_position[0] - x0), min_h, i * ph.dt, fault=fault)
            last = raw
        ph.step(limit_torque(q_des, s.q, s.dq, kp=kp, kd=kd, limit=limit), z, z, kp, kd)
        min_h = min(min_h, float(ph.base_position[2]))
        if min_h < g.min_height_m:
            return Rollout(float(ph.base_position[0] - x0), min_h, (i + 1) * ph.dt, fell=True)
    return Rollout(float(ph.base_position[0] - x0), min_h, g.duration_s)
