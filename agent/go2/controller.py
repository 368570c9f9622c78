"""`agent go2 run`: the Go2 controller. One loop (this module) owns the safety state and sends
LowCmd at the control rate (500 Hz) with the latest targets; the policy runs at 50 Hz on its own
thread (inference.py); `agent go2 arm|damp|status|command` reach it over a control socket.

Clock: on the robot the loop runs on a timer and a lowstate older than lowstate_timeout_s means
damping. In lockstep (a simulator in lockstep mode) the loop runs once per lowstate tick and echoes
the tick in LowCmd.reserve, so sim time, not wall time, drives everything and load changes nothing."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.go2 import dds, remote
from agent.go2.inference import Job, Outcome, PolicyThread, figures_us
from agent.go2.mapping import Mapper, RobotState
from agent.go2.safety import Mode, MotorCommand, Safety, TargetGuard, limit_torque
from agent.go2.settings import Go2Config
from agent.system.control import ControlRequest, ControlServer

log = logging.getLogger(__name__)

CONTROL_HZ = 500.0
DECIMATION = 10  # until a deploy config says otherwise
SLEEP_SLACK_S = 0.0002
VELOCITY_TIMEOUT_S = 0.1
PERIOD_WINDOW = 1000
STILL_DQ, STILL_GYRO = 0.5, 0.2  # rad/s: "standing still" for when-idle activation


class Controller:
    def __init__(self, cfg: Go2Config, agent_socket: Path, control_socket: Path) -> None:
        self.cfg = cfg
        self.safety = Safety(cfg)
        self.guard = TargetGuard(self.safety)
        self.policy = PolicyThread(agent_socket, timeout_s=cfg.lockstep_wait_s if cfg.lockstep else 1.0)
        self.requests: queue.Queue[ControlRequest[dict[str, Any]] | None] = queue.Queue()  # None: stop
        self.control = ControlServer(
            control_socket, control_socket.parent / "go2-incoming", self.requests.put, _as_sent
        )
        self.command = np.asarray(cfg.command if cfg.source == "config" else [0.0, 0.0, 0.0], np.float64)
        self.stopping = threading.Event()
        self.lowstate = dds.Latest()
        self.velocity = dds.Latest()  # rt/sportmodestate: only policies with a lin_vel term need it
        self.mapper: Mapper | None = None
        self.targets: np.ndarray | None = None
        self.tick = 0  # loop iterations
        self.job_seq = 0
        self.job_at = 0.0
        self.events: list[dict[str, Any]] = []  # mode changes and model versions, newest last
        self.snapshot: dict[str, Any] = {}
        self._last_state_tick = -1
        self._version_seen = ""  # the model version of the last event
        self._posted_arrival = -1  # which lowstate (by arrival) the last policy job was asked on
        self._arrival = 0  # the lowstate the current step runs on
        self._last_cmd: Any = None
        self._applied = 0
        self._periods = np.zeros(PERIOD_WINDOW)  # seconds between loop iterations (timer clock)
        self._last_iter = 0.0
        self._pending: queue.Queue[tuple[dict[str, Any], queue.Queue[dict[str, Any]]]] = queue.Queue()

    # -- life --------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        if not self.cfg.simulated:
            release_sport_service(self.cfg)
        bus = dds.Bus(self.cfg.domain, self.cfg.interface or None, reliable=self.cfg.lockstep)
        writer = bus.writer(dds.LOWCMD, bus.LowCmd)
        bus.reader(
            dds.SPORTSTATE,
            bus.SportState,
            lambda m: self.velocity.put((np.asarray(m.velocity, np.float64), time.monotonic())),
        )
        bus.reader(dds.LOWSTATE, bus.LowState, lambda m: self.lowstate.put((dds.read_lowstate(m), time.monotonic())))
        self.cmd_msg = bus.new_lowcmd()
        self.policy.start()
        self.control.start()
        threading.Thread(target=self._serve_requests, name="go2-control", daemon=True).start()
        log.info(
            "go2 controller up (domain %d, %s); passive until armed",
            self.cfg.domain,
            "lockstep" if self.cfg.lockstep else "500 Hz timer",
        )
        try:
            self._loop(writer)
        finally:
            self._shutdown(writer, bus)
        return 0

    def _shutdown(self, writer: Any, bus: dds.Bus) -> None:
        """A clean stop: damping for a moment (so the motors are not left on a stale target)."""
        self.safety.set(Mode.DAMP, "stopping (SIGTERM)", self._now())
        cmd = self.safety.damping()
        for _ in range(1 if self.cfg.lockstep else 25):
            writer.write(self._fill(cmd, self._last_state_tick))
            time.sleep(0.002)
        self.control.stop()
        self.policy.stop()
        self.requests.put(None)
        bus.close()
        log.info("go2 controller stopped")

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self, writer: Any) -> None:
        seen, next_at = 0, time.monotonic()
        while not self.stopping.is_set():
            if self.cfg.lockstep:
                value, count = self.lowstate.wait_newer(seen, 0.2)
                if count == seen:
                    continue
                seen = count
            else:
                next_at += 1.0 / CONTROL_HZ
                time.sleep(max(0.0, next_at - time.monotonic() - SLEEP_SLACK_S))
                if time.monotonic() - next_at > 0.1:
                    next_at = time.monotonic()  # far behind (suspended?): don't try to catch up
                value, seen = self.lowstate.snapshot()
            if value is None:
                continue
            self._record_period()
            state, received = value
            if self.cfg.lockstep and state.tick == self._last_state_tick:
                writer.write(self._last_cmd)  # the simulator asked again (its lockstep tick): same answer
                continue
            self._last_state_tick = state.tick
            writer.write(self._fill(self.step(state, received, seen), state.tick))

    def _record_period(self) -> None:
        t = time.monotonic()
        if self._last_iter:
            self._periods[self.tick % PERIOD_WINDOW] = t - self._last_iter
        self._last_iter = t

    def _loop_figures(self) -> dict[str, float]:
        """The loop's period over the last PERIOD_WINDOW iterations, in µs (wall time)."""
        figures = figures_us(self._periods)
        if figures:
            figures["over_2x"] = int((self._periods > 2 / CONTROL_HZ).sum())
        return figures

    def _now(self) -> float:
        """Seconds on the loop's clock: sim time in lockstep, wall time otherwise."""
        return self.tick / CONTROL_HZ if self.cfg.lockstep else time.monotonic()

    def step(self, state: RobotState, received: float, arrival: int) -> MotorCommand:
        """One control period on the latest lowstate, the `arrival`-th to come (freshness is by
        arrival: `tick` is 0 from Unitree's simulator and counts ms on the robot)."""
        self.tick += 1
        self._arrival = arrival
        now = self._now()
        self._drain_requests(state, now)
        if not self.cfg.lockstep and time.monotonic() - received > self.cfg.lowstate_timeout_s:
            self._to(
                Mode.DAMP,
                f"lowstate stale: none for {1000 * (time.monotonic() - received):.0f} ms "
                f"(timeout {1000 * self.cfg.lowstate_timeout_s:.0f} ms)",
                now,
            )
        if self.safety.mode != Mode.DAMP and self.safety.estop_pressed(state.remote):
            self._to(Mode.DAMP, "e-stop from the remote", now)
        if self.cfg.source == "remote" and self.mapper is not None:
            wanted = remote.target(state.remote, self.mapper.cfg.command_limits)
            self.command = remote.toward(self.command, wanted, 1.0 / CONTROL_HZ)
        mode = self.safety.mode
        if mode in (Mode.WALK, Mode.HOLD):
            self._policy_tick(state, now, arrival)
        return self._command(state, now)

    def _command(self, state: RobotState, now: float) -> MotorCommand:
        mode, mapper = self.safety.mode, self.mapper
        if mode in (Mode.PASSIVE, Mode.DAMP) or mapper is None:
            return self.safety.damping()
        kp, kd, limit = mapper.gains()
        if mode == Mode.SOFT_START:
            q_des, done = self.safety.soft_start(now, mapper.default_stance())
            if done:
                self._start_walk(state, now)
        elif mode == Mode.HOLD:
            q_des = mapper.default_stance()
            if now - self.safety.since >= self.cfg.hold_s:
                self._to(Mode.DAMP, f"no good action for {self.cfg.hold_s} s: {self.safety.reason}", now)
                return self.safety.damping()
        else:
            q_des = self.targets if self.targets is not None else mapper.default_stance()
        q_des = limit_torque(q_des, state.q, state.dq, kp=kp, kd=kd, limit=limit)
        z = np.zeros(12)
        return MotorCommand(q_des, z, z, kp, kd)

    def _start_walk(self, state: RobotState, now: float) -> None:
        self.policy.reset()
        self.targets = None
        self._to(Mode.WALK, "soft start done: the policy drives", now)
        self._post(state, now, self._arrival)

    def _policy_tick(self, state: RobotState, now: float, arrival: int) -> None:
        decimation = self.mapper.cfg.decimation if self.mapper else DECIMATION
        wait = self.cfg.lockstep_wait_s if self.cfg.lockstep else 0.0
        outcome = self.policy.take(self.job_seq, wait)
        if outcome is not None and outcome.seq == self.job_seq and outcome.seq > self._applied:
            self._applied = outcome.seq
            self._apply(outcome, now)
        elif outcome is None and self.job_seq and self._job_late(now):
            self._to(
                Mode.HOLD, f"inference timeout: no action {1000 * (now - self.job_at):.0f} ms after the request", now
            )
        if self.safety.mode in (Mode.WALK, Mode.HOLD) and self.tick % decimation == 0:
            self._post(state, now, arrival)
        self._check_policy_asked(now, decimation)

    def _check_policy_asked(self, now: float, decimation: int) -> None:
        """Walking on a policy that has not been asked for longer than its period plus its deadline
        is a fault: the robot would follow stale targets while everything says "walk"."""
        if self.safety.mode != Mode.WALK or not self.job_at:
            return
        deadline = self.mapper.cfg.inference_deadline_s if self.mapper else 0.05
        limit = decimation / CONTROL_HZ + deadline
        if now - self.job_at > limit:
            self._to(
                Mode.HOLD,
                f"the policy was not asked for {1000 * (now - self.job_at):.0f} ms (its period and deadline: "
                f"{1000 * limit:.0f} ms): no new lowstate",
                now,
            )

    def _job_late(self, now: float) -> bool:
        deadline = self.mapper.cfg.inference_deadline_s if self.mapper else 0.05
        return self.cfg.lockstep or now - self.job_at > deadline

    def _post(self, state: RobotState, now: float, arrival: int) -> None:
        if arrival == self._posted_arrival:
            # No lowstate since the last job (the timer loop reuses the latest): the policy would see
            # its own last action with a frozen state and can drift out of range within the stale
            # timeout. Keep the last targets until a new lowstate, the policy check holds or the
            # stale check damps.
            return
        if self.mapper is not None and "lin_vel" in self.mapper.cfg.observations:
            why = self._velocity_missing()
            if why:
                self._to(Mode.HOLD, why, now)
                return
            state.lin_vel_world = self.velocity.value[0]
        self._posted_arrival = arrival
        self.job_seq += 1
        self.job_at = now
        self.policy.post(Job(self.job_seq, state, self.command.copy()))

    def _apply(self, out: Outcome, now: float) -> None:
        if out.version and out.version != self._version_seen:  # a swap shows even when its first action is bad
            self._version_seen = out.version
            self._event("model", version=out.version, reason="the policy's active model")
        if out.kind == "inference":
            if self.safety.mode == Mode.WALK:
                self._to(Mode.HOLD, out.reason, now)
            return
        if out.kind == "fault":
            self._to(Mode.DAMP, out.reason, now)
            return
        assert out.targets is not None and out.mapper is not None
        self.mapper = out.mapper  # the deploy config of the model that answered
        targets, why = self.guard.check(out.targets)
        if why:
            self._to(Mode.DAMP, why, now)
            return
        self.targets = targets
        if self.safety.mode == Mode.HOLD:
            self._to(Mode.WALK, "good actions again", now)

    def _to(self, mode: Mode, reason: str, now: float) -> None:
        if self.safety.set(mode, reason, now):
            level = logging.WARNING if mode in (Mode.DAMP, Mode.HOLD) else logging.INFO
            log.log(level, "-> %s: %s", mode.value, reason)
            self._event("mode", mode=mode.value, reason=reason)

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"kind": kind, "tick": self._last_state_tick, "loop_tick": self.tick, **fields})
        del self.events[:-200]

    def _fill(self, cmd: MotorCommand, state_tick: int) -> Any:
        if self.cfg.lockstep:
            self.cmd_msg.reserve = max(state_tick, 0) & 0xFFFFFFFF  # the tick this command answers
        self._last_cmd = dds.fill_lowcmd(self.cmd_msg, cmd.q, cmd.dq, cmd.tau, kp=cmd.kp, kd=cmd.kd)
        return self._last_cmd

    # -- requests from the control socket (applied on the loop thread) -----------------------------
    def _serve_requests(self) -> None:
        while True:
            item = self.requests.get()
            if item is None:
                return
            req, reply = item.request, item.reply
            if req.get("cmd") == "status":
                reply.put({"ok": True, "status": self.status()})
                continue
            done: queue.Queue[dict[str, Any]] = queue.Queue(1)
            self._pending.put((req, done))
            try:
                reply.put(done.get(timeout=max(5.0, self.cfg.lockstep_wait_s)))
            except queue.Empty:
                reply.put({"ok": False, "error": "the control loop did not answer (no lowstate?)"})

    def _drain_requests(self, state: RobotState, now: float) -> None:
        while True:
            try:
                req, done = self._pending.get_nowait()
            except queue.Empty:
                break
            done.put(self._handle(req, state, now))
        self.snapshot = self._snapshot(state, now)

    def _handle(self, req: dict[str, Any], state: RobotState, now: float) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "arm":
            return self._arm(state, now)
        if cmd == "damp":
            self._to(Mode.DAMP, "damp requested (agent go2 damp)", now)
            return {"ok": True, "mode": self.safety.mode.value}
        if cmd == "command":
            if self.cfg.source == "remote":
                return {"ok": False, "error": 'the remote\'s sticks drive (go2.command_source = "remote")'}
            value = req.get("value")
            if not isinstance(value, list) or len(value) != 3:
                return {"ok": False, "error": "command: [vx, vy, wz]"}
            self.command = np.asarray(value, np.float64)
            self._event("command", value=self.command.tolist())
            return {"ok": True, "command": value}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _velocity_missing(self) -> str | None:
        value = self.velocity.value
        if value is None:
            return f"the policy needs base linear velocity (lin_vel): no {dds.SPORTSTATE} from a state estimator"
        if not self.cfg.lockstep and time.monotonic() - value[1] > VELOCITY_TIMEOUT_S:
            return f"base linear velocity ({dds.SPORTSTATE}) stale for {time.monotonic() - value[1]:.2f} s"
        return None

    def _arm(self, state: RobotState, now: float) -> dict[str, Any]:
        if self.safety.mode in (Mode.SOFT_START, Mode.WALK):
            return {"ok": True, "mode": self.safety.mode.value}
        why = self.policy.refresh()
        if not why and self.policy.mapper is not None and "lin_vel" in self.policy.mapper.cfg.observations:
            why = self._velocity_missing()
        if why:
            return {"ok": False, "error": f"not arming: {why}"}
        self.mapper = self.policy.mapper
        self._version_seen = self.policy.version
        self._event("model", version=self.policy.version, reason="armed")
        self._applied = self.job_seq  # job numbers only grow: an old outcome never answers a new request
        self.safety.arm(now, state.q)
        self._event("mode", mode=Mode.SOFT_START.value, reason=self.safety.reason)
        return {"ok": True, "mode": self.safety.mode.value, "model_version": self.policy.version}

    def _snapshot(self, state: RobotState, now: float) -> dict[str, Any]:
        return {
            "mode": self.safety.mode.value,
            "reason": self.safety.reason,
            "model_version": self.mapper and self.policy.version,
            "command": self.command.tolist(),
            "command_source": self.cfg.source,
            "state_tick": state.tick,
            "lowstate_arrivals": self._arrival,
            "targets_clipped": self.guard.clipped,
            "policy_asked_ms_ago": round(1000 * (now - self.job_at)) if self.job_at else None,
            "loop_tick": self.tick,
            "clock": "lockstep" if self.cfg.lockstep else "timer",
            "idle": self._idle(state),
        }

    def _idle(self, state: RobotState) -> bool:
        """Not walking: no policy in charge, or standing still on a zero command (when-idle activation)."""
        if self.safety.mode in (Mode.PASSIVE, Mode.DAMP):
            return True
        still = float(np.abs(state.dq).max()) < STILL_DQ and float(np.abs(state.gyro).max()) < STILL_GYRO
        return self.safety.mode == Mode.WALK and not self.command.any() and still

    def status(self) -> dict[str, Any]:
        """The loop's last snapshot; mode and lowstate count as of now (before any lowstate, too)."""
        return {
            **self.snapshot,
            "mode": self.safety.mode.value,
            "reason": self.safety.reason,
            "lowstate_arrivals": self.lowstate.count,
            "loop_period": self._loop_figures(),
            "inference": self.policy.round_trip_figures(),
            "events": list(self.events),
        }


def release_sport_service(cfg: Go2Config, tries: int = 5) -> None:
    """On the real robot the built-in sport service must let go before low-level control; if it
    does not answer or does not let go, the controller refuses to start."""

    try:
        from unitree_sdk2py.comm.motion_switcher.motion_switcher_client import MotionSwitcherClient
        from unitree_sdk2py.core.channel import ChannelFactoryInitialize
    except ImportError as err:
        raise AgentError("releasing the sport service needs unitree_sdk2py") from err
    ChannelFactoryInitialize(cfg.domain, cfg.interface or None)
    client = MotionSwitcherClient()
    client.SetTimeout(3.0)
    client.Init()
    for _ in range(tries):
        code, result = client.CheckMode()
        if code != 0:
            raise AgentError(
                f"the robot's motion switcher does not answer (code {code}) on domain {cfg.domain}: refusing to "
                "start low-level control (for a simulator set go2.simulated = true)"
            )
        if not (result or {}).get("name"):
            log.info("the sport service is released")
            return
        log.info("releasing the sport service (%s)", result.get("name"))
        code, _ = client.ReleaseMode()
        if code != 0:
            raise AgentError(
                f"the motion switcher refused to release {result.get('name')!r} (code {code}): refusing to start "
                "low-level control"
            )
        time.sleep(1.0)
    raise AgentError(f"the sport service did not let go after {tries} releases: refusing to start low-level control")


def _as_sent(request: dict[str, Any], _received: Path | None) -> dict[str, Any]:
    """The controller's requests (arm, damp, command, status) are read as they came."""
    return request
