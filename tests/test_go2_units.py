"""The Go2 pieces without processes: the LowCmd CRC against unitree_sdk2py's reference, the deploy
configs (robot_lab's 45 observations, a legged_gym-style 48 with FL-FR-RL-RR order), the
observation/action mapping and the safety arithmetic."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.contract.protocol import TensorSpec
from agent.errors import ConfigError
from agent.go2 import deploy
from agent.go2.crc import crc32_words
from agent.go2.mapping import Mapper, RobotState, projected_gravity, world_to_body
from agent.go2.safety import JOINT_HIGH, Safety, TargetGuard, limit_torque
from agent.go2.settings import Go2Config
from tests.go2util import PRESETS, go2_data, need_stack


def _reference() -> object:
    need_stack()
    from unitree_sdk2py.utils.crc import CRC

    return CRC()


def _crc_from_the_definition(words: list[int]) -> int:
    """CRC-32 as ../shared/go2/README.md defines it: poly 0x04C11DB7, init 0xFFFFFFFF, MSB-first over
    each 32-bit word, no reflection, no final XOR."""
    crc = 0xFFFFFFFF
    for word in words:
        for bit in range(31, -1, -1):
            top = (crc >> 31) ^ ((word >> bit) & 1)
            crc = ((crc << 1) & 0xFFFFFFFF) ^ (0x04C11DB7 if top else 0)
    return crc


def test_crc_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 202):
        words = [int(w) for w in rng.integers(0, 2**32, n, dtype=np.uint64)]
        assert crc32_words(struct.pack(f"<{n}I", *words)) == _crc_from_the_definition(words)


def test_crc_matches_the_reference_algorithm() -> None:
    ref = _reference()
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 202):
        words = [int(w) for w in rng.integers(0, 2**32, n, dtype=np.uint64)]
        data = struct.pack(f"<{n}I", *words)
        assert crc32_words(data) == ref._crc_py(words) == ref._crc_ctypes(words)  # type: ignore[attr-defined]


def test_lowcmd_crc_matches_the_sdk() -> None:
    ref = _reference()
    from unitree_sdk2py.idl.default import unitree_go_msg_dds__LowCmd_

    from agent.go2 import dds

    rng = np.random.default_rng(2)
    cmd = unitree_go_msg_dds__LowCmd_()
    for _ in range(20):
        q, dq, tau, kp, kd = rng.standard_normal((5, 12))
        cmd.reserve = int(rng.integers(0, 2**32))
        cmd.head = [0xFE, 0xEF]
        dds.fill_lowcmd(cmd, q, dq, tau, kp=np.abs(kp) * 20, kd=np.abs(kd))  # sets cmd.crc
        assert cmd.crc == ref.Crc(cmd)  # type: ignore[attr-defined]


def test_robot_lab_config_is_expressible() -> None:
    data = go2_data()
    cfg = deploy.load(PRESETS / "robot_lab.toml")
    assert cfg.num_obs == 45 and cfg.decimation == 10
    assert cfg.default_q.tolist() == [0.0, 0.8, -1.5] * 4
    assert cfg.action_scale.tolist() == [0.125, 0.25, 0.25] * 4
    import onnx

    from agent.contract.onnx_signature import signature

    ins, outs = signature(onnx.load(str(data / "policy" / "robot_lab.onnx")))
    assert cfg.check_io(ins, outs) is None


def test_legged_gym_config_maps_fl_fr_rl_rr() -> None:
    cfg = deploy.load(PRESETS / "legged_gym.toml")
    assert cfg.num_obs == 48
    motor = np.arange(12.0)  # SDK order FR, FL, RR, RL
    policy = cfg.to_policy(motor)
    assert policy.tolist() == [3, 4, 5, 0, 1, 2, 9, 10, 11, 6, 7, 8]  # FL, FR, RL, RR
    assert np.array_equal(cfg.to_motor(policy), motor)
    stance = Mapper(cfg).default_stance()  # FL hip +0.1 lands on SDK motor 3
    assert stance[3] == pytest.approx(0.1) and stance[0] == pytest.approx(-0.1) and stance[7] == pytest.approx(1.0)
    spec = [TensorSpec("obs", "float32", (1, 45))], [TensorSpec("actions", "float32", (1, 12))]
    assert "48 observations" in (cfg.check_io(*spec) or "")


def test_observation_layout_and_scales() -> None:
    cfg = deploy.load(PRESETS / "legged_gym.toml")
    s = RobotState(
        quat=np.array([1.0, 0, 0, 0]),
        gyro=np.array([1.0, 2, 3]),
        q=np.arange(12.0),
        dq=np.ones(12),
        lin_vel_world=np.array([0.5, 0, 0]),
    )
    obs = Mapper(cfg).observation(s, np.array([1.0, 0, 0]), np.full(12, 7.0))[0]
    assert obs.shape == (48,)
    assert obs[:3].tolist() == [1.0, 0, 0]  # lin_vel x 2
    assert obs[3:6].tolist() == [0.25, 0.5, 0.75]  # gyro x 0.25
    assert obs[6:9].tolist() == [0, 0, -1]  # upright: gravity straight down in the body frame
    assert obs[9:12].tolist() == [2.0, 0, 0]  # commands x [2, 2, 0.25]
    assert obs[12] == pytest.approx(3 - 0.1)  # FL hip = SDK motor 3, minus its default
    assert obs[-1] == 7.0


def test_projected_gravity_and_frames() -> None:
    assert projected_gravity(np.array([1.0, 0, 0, 0])).tolist() == [0, 0, -1]
    pitched = np.array([np.cos(0.1), 0, np.sin(0.1), 0])  # nose down 0.2 rad: gravity tips forward
    assert projected_gravity(pitched) == pytest.approx([np.sin(0.2), 0, -np.cos(0.2)])
    yaw90 = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    assert world_to_body(yaw90, np.array([1.0, 0, 0])) == pytest.approx([0, -1, 0])


def test_bad_actions_and_targets_are_faults() -> None:
    m = Mapper(deploy.load(PRESETS / "robot_lab.toml"))
    assert m.fault(np.zeros(12)) is None
    assert "non-finite" in (m.fault(np.array([np.nan] + [0.0] * 11)) or "")
    assert "beyond the bound 100" in (m.fault(np.full(12, 1e6)) or "")
    safety = Safety(Go2Config())
    assert safety.target_fault(m.default_stance()) is None
    far = m.default_stance()
    far[2] = 1.0  # a calf target 1.8 rad past its range
    assert "motor 2 outside its range" in (safety.target_fault(far) or "")


def test_torque_limit_moves_the_target() -> None:
    q_des = limit_torque(
        np.full(12, 10.0),
        np.zeros(12),
        np.zeros(12),
        kp=np.full(12, 20.0),
        kd=np.full(12, 0.5),
        limit=np.full(12, 23.5),
    )
    assert q_des == pytest.approx(np.full(12, 23.5 / 20.0))


def test_estop_keys() -> None:
    safety = Safety(Go2Config(estop_keys=["L2", "B"]))
    assert not safety.estop_pressed(bytes([0, 0, 0, 2]))  # B alone
    assert safety.estop_pressed(bytes([0, 0, 1 << 5, 2]))  # L2 + B


def test_deploy_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('observations = ["ang_vel", "height_scan"]\ndefault_q = 0.0\naction_scale = 0.25\nkp = 20\nkd = 1\n')
    with pytest.raises(ConfigError, match="unknown term 'height_scan'"):
        deploy.load(bad)
    bad.write_text('observations = ["ang_vel"]\ndefault_q = [0.0, 0.8]\naction_scale = 0.25\nkp = 20\nkd = 1\n')
    with pytest.raises(ConfigError, match="default_q needs 1, 3 or 12 values"):
        deploy.load(bad)


def _walking_controller(tmp_path: Path, **cfg: Any) -> Any:
    from agent.go2.controller import Controller
    from agent.go2.safety import Mode

    c = Controller(Go2Config(**cfg), tmp_path / "infer.sock", tmp_path / "go2.sock")
    c.mapper = Mapper(deploy.load(PRESETS / "robot_lab.toml"))
    c.safety.set(Mode.WALK, "walking", 0.0)
    return c


def _standing(c: Any, tick: int = 0, remote: bytes = b"") -> RobotState:
    return RobotState(
        quat=np.array([1.0, 0, 0, 0]),
        gyro=np.zeros(3),
        q=c.mapper.default_stance(),
        dq=np.zeros(12),
        tick=tick,
        remote=remote,
    )


def test_a_frozen_lowstate_feeds_the_policy_no_new_job(tmp_path: Path) -> None:
    """Between the last lowstate and the stale timeout the timer loop reuses the latest state; the
    policy must not be asked again on it (its own last action fed back on a frozen state drifts)."""
    from agent.go2.safety import Mode

    c = _walking_controller(tmp_path)
    decimation = c.mapper.cfg.decimation
    state = _standing(c, tick=7)
    for _ in range(3 * decimation):
        c.step(state, time.monotonic(), 1)
    assert c.job_seq == 1
    for _ in range(decimation):
        c.step(state, time.monotonic(), 2)
    assert c.job_seq == 2
    assert c.safety.mode == Mode.WALK


def test_freshness_is_by_arrival_not_by_tick(tmp_path: Path) -> None:
    """Unitree's simulator leaves LowState.tick at 0: every lowstate that arrives is new, and the
    policy is asked on each policy period; a walk whose policy is not asked for longer than its
    period and deadline holds (no silent walk on stale targets)."""
    from agent.go2.safety import Mode

    c = _walking_controller(tmp_path)
    decimation = c.mapper.cfg.decimation
    arrival = 0
    for _ in range(5 * decimation):
        arrival += 1
        c.step(_standing(c, tick=0), time.monotonic(), arrival)
    assert c.job_seq == 5  # one job per policy period, all on tick 0
    from agent.go2.inference import Outcome

    # The last job was answered (the policy is fine), but no lowstate has come for a second.
    c.policy._outcome = Outcome(c.job_seq, "ok", targets=c.mapper.default_stance(), mapper=c.mapper, version="v1")
    c.job_at = time.monotonic() - 1.0
    c.step(_standing(c, tick=0), time.monotonic(), arrival)
    assert c.safety.mode == Mode.HOLD and "the policy was not asked for" in c.safety.reason


def unitree_remote(lx: float, ly: float, rx: float, ry: float, keys: int = 0) -> bytes:
    """wireless_remote as Unitree's bridge fills it (unitree_sdk2py_bridge.py PublishLowState):
    keys in [2:4], struct.pack("f") of lx, rx, ry, ly into [4:8], [8:12], [12:16], [20:24]."""
    raw = bytearray(40)
    raw[2], raw[3] = keys & 0xFF, keys >> 8
    for at, v in ((4, lx), (8, rx), (12, ry), (20, ly)):
        raw[at : at + 4] = struct.pack("f", v)
    return bytes(raw)


def test_the_sticks_drive_the_command(tmp_path: Path) -> None:
    from agent.go2 import remote
    from agent.go2.safety import Mode

    assert remote.sticks(unitree_remote(0.1, 0.2, 0.3, 0.4)) == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert remote.sticks(b"") == (0.0, 0.0, 0.0, 0.0)  # no remote: resting sticks
    limits = np.array([1.0, 0.5, 1.0])
    assert remote.target(unitree_remote(0.05, -0.05, 0.07, 0), limits).tolist() == [0, 0, 0]  # the dead band
    full = remote.target(unitree_remote(-1.0, 1.0, 1.0, 0), limits)
    assert full == pytest.approx([1.0, 0.5, -1.0])  # ly forward, lx left -> +vy, rx right -> turn right
    assert remote.target(unitree_remote(float("nan"), 5.0, 0, 0), limits) == pytest.approx([1.0, 0, 0])

    c = _walking_controller(tmp_path, simulated=False)  # on the robot the remote drives by default
    assert c.cfg.source == "remote" and c.command.tolist() == [0, 0, 0]
    forward = unitree_remote(0.0, 1.0, 0.0, 0.0)
    for n in range(1, 501):
        c.step(_standing(c, remote=forward), time.monotonic(), n)
        if n == 100:
            assert c.command[0] == pytest.approx(100 * remote.RATE_LIMIT[0] / 500)  # ramps, no step
    assert c.command == pytest.approx([1.0, 0.0, 0.0])  # the deploy config's limit after a second
    refused = c._handle({"cmd": "command", "value": [0.2, 0, 0]}, _standing(c), 0.0)
    assert not refused["ok"] and "remote" in refused["error"]
    estop = unitree_remote(0.0, 1.0, 0.0, 0.0, keys=1 << 9)  # B held while pushing forward
    c.step(_standing(c, remote=estop), time.monotonic(), 501)
    assert c.safety.mode == Mode.DAMP and "e-stop" in c.safety.reason


def test_an_out_of_range_target_is_clipped_and_damps_only_when_it_persists() -> None:
    m = Mapper(deploy.load(PRESETS / "robot_lab.toml"))
    guard = TargetGuard(Safety(Go2Config()))
    far = m.default_stance()
    far[2] = 0.3  # a calf target 1.14 rad past its range: a stumble's action
    for _ in range(2):
        used, why = guard.check(far)
        assert why is None and used[2] == pytest.approx(JOINT_HIGH[2] + 1.0)
    used, why = guard.check(m.default_stance())
    assert why is None and guard.run == 0
    for _ in range(2):
        guard.check(far)
    _, why = guard.check(far)
    assert why is not None and "3 policy steps in a row" in why


def test_a_lin_vel_policy_sees_body_frame_velocity_on_a_yawed_robot() -> None:
    """rt/sportmodestate's velocity is in the world frame; the observation is in the body frame."""
    m = Mapper(deploy.load(PRESETS / "legged_gym.toml"))
    assert m.cfg.observations[0] == "lin_vel"
    yaw90 = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])  # facing +y
    s = RobotState(quat=yaw90, gyro=np.zeros(3), q=m.default_stance(), dq=np.zeros(12), tick=0)
    s.lin_vel_world = np.array([0.0, 1.0, 0.0])  # moving along +y in the world: forward for this robot
    obs = m.observation(s, np.zeros(3), np.zeros(12))
    scale = float(np.asarray(m.cfg.obs_scales["lin_vel"]).ravel()[0])
    assert obs.ravel()[:3] == pytest.approx([scale, 0.0, 0.0], abs=1e-6)
