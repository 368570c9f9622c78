"""The Go2's low-level DDS interface (rt/lowstate, rt/lowcmd) through the official message types
(unitree_sdk2py) on cyclonedds. Both the controller and the simulator use this module.

Discovery is configured exactly as Unitree's SDK configures it (`ChannelFactoryInitialize(domain,
interface)`, unitree_sdk2py/core/channel_config.py): the interface by name, multicast "default", no
peers; no interface: cyclonedds chooses. So the controller and `agent go2 sim` discover, and are
discovered by, every program built on unitree_sdk2py (Unitree's simulator, the robot's services),
whichever starts first. Tests keep apart by domain, one each. CYCLONEDDS_URI, when set, replaces
this configuration entirely (cyclonedds reads it)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.go2.crc import lowcmd_crc
from agent.go2.mapping import RobotState

LOWSTATE, LOWCMD = "rt/lowstate", "rt/lowcmd"
SPORTSTATE = "rt/sportmodestate"  # a state estimator's base velocity (world frame), for lin_vel policies
HEAD = (0xFE, 0xEF)
LEVEL_LOW = 0xFF
MODE_SERVO = 0x01
POS_STOP, VEL_STOP = 2.146e9, 16000.0  # what unused motors get
NUM_MOTORS = 20


def _types() -> Any:
    try:
        from unitree_sdk2py.idl import default
        from unitree_sdk2py.idl.unitree_go.msg.dds_ import LowCmd_, LowState_, SportModeState_
    except ImportError as err:
        raise AgentError(
            "the Go2 DDS interface needs unitree_sdk2py and cyclonedds (pip install 'edge-agent[go2]')"
        ) from err
    return LowCmd_, LowState_, SportModeState_, default


URI_ENV = "CYCLONEDDS_URI"


def cyclonedds_config(interface: str | None) -> str | None:
    """unitree_sdk2py's own configuration for `interface`; None when CYCLONEDDS_URI is set."""
    if os.environ.get(URI_ENV):
        return None
    if interface in (None, ""):
        nic = '<NetworkInterface autodetermine="true" priority="default" multicast="default"/>'
    else:
        nic = f'<NetworkInterface name="{interface}" priority="default" multicast="default"/>'
    return f'<CycloneDDS><Domain Id="any"><General><Interfaces>{nic}</Interfaces></General></Domain></CycloneDDS>'


class Bus:
    """One DDS participant on a domain, with readers and writers for the low-level topics."""

    def __init__(self, domain: int, interface: str | None, reliable: bool = False) -> None:
        from cyclonedds.core import DDSException, Policy, Qos
        from cyclonedds.domain import Domain, DomainParticipant
        from cyclonedds.util import duration

        self.LowCmd, self.LowState, self.SportState, self._default = _types()
        self._domain: Any = None
        # DDSException: already set up in this process (unitree_sdk2py's ChannelFactory, for the sport service)
        config = cyclonedds_config(interface)
        with contextlib.suppress(DDSException):
            self._domain = Domain(domain, config) if config is not None else Domain(domain)
        self.participant = DomainParticipant(domain)
        policies: list[Any] = [Policy.History.KeepLast(1)]
        if reliable:  # lockstep: every command and state must arrive
            policies.append(Policy.Reliability.Reliable(duration(seconds=1)))
        self.qos = Qos(*policies)
        self._keep: list[Any] = []

    def writer(self, topic: str, kind: type) -> Any:
        from cyclonedds.pub import DataWriter
        from cyclonedds.topic import Topic

        w: Any = DataWriter(self.participant, Topic(self.participant, topic, kind), self.qos)
        self._keep.append(w)
        return w

    def reader(self, topic: str, kind: type, on_sample: Callable[[Any], None]) -> Any:
        from cyclonedds.core import Listener
        from cyclonedds.sub import DataReader
        from cyclonedds.topic import Topic

        def on_data(reader: Any) -> None:
            for sample in reader.take(8):
                if isinstance(sample, kind):
                    on_sample(sample)

        topic_: Any = Topic(self.participant, topic, kind)
        r: Any = DataReader(self.participant, topic_, self.qos, Listener(on_data_available=on_data))
        self._keep.append(r)
        return r

    def new_lowcmd(self) -> Any:
        cmd = self._default.unitree_go_msg_dds__LowCmd_()
        cmd.head = list(HEAD)
        cmd.level_flag = LEVEL_LOW
        cmd.gpio = 0
        for i in range(NUM_MOTORS):
            m = cmd.motor_cmd[i]
            m.mode, m.q, m.dq, m.tau, m.kp, m.kd = MODE_SERVO, POS_STOP, VEL_STOP, 0.0, 0.0, 0.0
        return cmd

    def new_lowstate(self) -> Any:
        return self._default.unitree_go_msg_dds__LowState_()

    def new_sportstate(self) -> Any:
        return self._default.unitree_go_msg_dds__SportModeState_()

    def close(self) -> None:
        self._keep.clear()
        del self.participant


def fill_lowcmd(cmd: Any, q: np.ndarray, dq: np.ndarray, tau: np.ndarray, *, kp: np.ndarray, kd: np.ndarray) -> Any:
    for i in range(12):
        m = cmd.motor_cmd[i]
        m.q, m.dq, m.tau, m.kp, m.kd = float(q[i]), float(dq[i]), float(tau[i]), float(kp[i]), float(kd[i])
    cmd.crc = lowcmd_crc(cmd)
    return cmd


def read_lowcmd(cmd: Any) -> tuple[np.ndarray, ...]:
    """q, dq, tau, kp, kd of the 12 leg motors."""
    rows = np.array([(m.q, m.dq, m.tau, m.kp, m.kd) for m in cmd.motor_cmd[:12]], np.float64)
    return tuple(rows.T)


def fill_lowstate(msg: Any, s: RobotState) -> Any:
    msg.head = list(HEAD)
    msg.level_flag = LEVEL_LOW
    msg.tick = s.tick & 0xFFFFFFFF
    imu = msg.imu_state
    imu.quaternion = [float(v) for v in s.quat]
    imu.gyroscope = [float(v) for v in s.gyro]
    for i in range(12):
        m = msg.motor_state[i]
        m.mode, m.q, m.dq = MODE_SERVO, float(s.q[i]), float(s.dq[i])
    if s.remote:
        msg.wireless_remote = list(s.remote.ljust(40, b"\0")[:40])
    return msg


def read_lowstate(msg: Any) -> RobotState:
    motors = np.array([(m.q, m.dq) for m in msg.motor_state[:12]], np.float64)
    return RobotState(
        quat=np.asarray(msg.imu_state.quaternion, np.float64),
        gyro=np.asarray(msg.imu_state.gyroscope, np.float64),
        q=motors[:, 0],
        dq=motors[:, 1],
        tick=int(msg.tick),
        remote=bytes(msg.wireless_remote),
    )


def fill_sportstate(msg: Any, position: np.ndarray, velocity: np.ndarray) -> Any:
    msg.position = [float(v) for v in position]
    msg.velocity = [float(v) for v in velocity]
    return msg


class Latest:
    """The newest sample of a topic and how many have arrived: a sample is new because it arrived
    (`count` grew), never because a field in it changed (Unitree's simulator leaves `tick` at 0)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.value: Any = None
        self.count = 0

    def put(self, value: Any) -> None:
        with self.cond:
            self.value = value
            self.count += 1
            self.cond.notify_all()

    def snapshot(self) -> tuple[Any, int]:
        with self.cond:
            return self.value, self.count

    def wait_newer(self, seen: int, timeout: float) -> tuple[Any, int]:
        with self.cond:
            self.cond.wait_for(lambda: self.count > seen, timeout)
            return self.value, self.count
