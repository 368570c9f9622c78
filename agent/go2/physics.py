"""The Go2 in MuJoCo: sensors read as the robot's low-level state, motor commands applied as the
motors' PD law every physics step. Joints and actuators are mapped by name (the MJCF's qpos order
is FL, FR, RL, RR; the SDK's motor order is FR, FL, RR, RL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.go2.mapping import RobotState

MOTORS = [f"{leg}_{part}" for leg in ("FR", "FL", "RR", "RL") for part in ("hip", "thigh", "calf")]


class Go2Physics:
    def __init__(self, mjcf: Path, keyframe: str = "home") -> None:
        import mujoco

        self._mj = mujoco
        try:
            self.model = mujoco.MjModel.from_xml_path(str(mjcf))
        except ValueError as err:
            raise AgentError(f"{mjcf}: MuJoCo cannot load it: {err}") from err
        self.data = mujoco.MjData(self.model)
        self.keyframe = keyframe
        m = self.model
        self._act = np.array([m.actuator(n).id for n in MOTORS])
        self._ctrl_low = m.actuator_ctrlrange[self._act, 0]
        self._ctrl_high = m.actuator_ctrlrange[self._act, 1]
        self._q = np.array([m.sensor(f"{n}_pos").adr[0] for n in MOTORS])
        self._dq = np.array([m.sensor(f"{n}_vel").adr[0] for n in MOTORS])
        self._quat = m.sensor("imu_quat").adr[0]
        self._gyro = m.sensor("imu_gyro").adr[0]
        self._vel = m.sensor("frame_vel").adr[0]
        self.tick = 0
        self.reset()

    @property
    def dt(self) -> float:
        return float(self.model.opt.timestep)

    @property
    def time(self) -> float:
        return float(self.data.time)

    def reset(self) -> None:
        self._mj.mj_resetDataKeyframe(self.model, self.data, self.model.key(self.keyframe).id)
        self._mj.mj_forward(self.model, self.data)
        self.tick = 0

    def state(self) -> RobotState:
        s = self.data.sensordata
        return RobotState(
            quat=s[self._quat : self._quat + 4].copy(),
            gyro=s[self._gyro : self._gyro + 3].copy(),
            q=s[self._q].copy(),
            dq=s[self._dq].copy(),
            tick=self.tick,
            lin_vel_world=s[self._vel : self._vel + 3].copy(),
        )

    def step(self, q: np.ndarray, dq: np.ndarray, tau: np.ndarray, kp: np.ndarray, kd: np.ndarray) -> None:
        """One physics step under the motors' law tau_ff + kp(q_des - q) + kd(dq_des - dq)."""
        s = self.data.sensordata
        torque = tau + kp * (q - s[self._q]) + kd * (dq - s[self._dq])
        self.data.ctrl[self._act] = np.clip(torque, self._ctrl_low, self._ctrl_high)
        self._mj.mj_step(self.model, self.data)
        self.tick += 1

    @property
    def base_position(self) -> np.ndarray:
        return self.data.qpos[:3].copy()
