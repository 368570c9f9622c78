"""The controller's policy thread: builds the observation, asks the agent (agent.client), checks the
action. The 500 Hz loop posts a job and never waits for it (except in lockstep, where sim time
stands still while it waits). When the agent's model version changes, the thread fetches the new
model's deploy config, so a swap can change scales, gains and joint order."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.client import Policy
from agent.errors import AgentError, InferenceError
from agent.go2 import deploy
from agent.go2.mapping import Mapper, RobotState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    seq: int
    state: RobotState
    command: np.ndarray


@dataclass(frozen=True)
class Outcome:
    seq: int
    kind: str  # "ok", "inference" (error or no answer: hold, then damp), "fault" (bad action/config: damp)
    reason: str = ""
    targets: np.ndarray | None = None
    mapper: Mapper | None = None
    version: str = ""


class PolicyThread:
    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        self.policy = Policy(socket_path, timeout=timeout_s)
        self.mapper: Mapper | None = None
        self.version = ""
        self.last_action = np.zeros(12)
        self._input = ""
        self.round_trips = np.zeros(500)  # seconds per inference call through the agent, last 500
        self._calls = 0
        self._cond = threading.Condition()
        self._job: Job | None = None
        self._outcome: Outcome | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="go2-policy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5)
        self.policy.close()

    def post(self, job: Job) -> None:
        with self._cond:
            self._job = job
            self._cond.notify_all()

    def take(self, seq: int, wait_s: float = 0.0) -> Outcome | None:
        """The outcome of job `seq` once there (waiting up to wait_s), else None."""
        with self._cond:
            self._cond.wait_for(lambda: self._outcome is not None and self._outcome.seq >= seq, wait_s)
            out = self._outcome
            return out if out is not None and out.seq >= seq else None

    def reset(self) -> None:
        """Before a (re)start of walking: the previous action is zero."""
        self.last_action = np.zeros(12)

    def refresh(self) -> str | None:
        """Fetch the active model and its deploy config; the reason when the controller cannot serve it."""
        try:
            info = self.policy.info()
        except (AgentError, OSError) as err:
            return f"the agent does not answer: {err}"
        try:
            cfg = deploy.from_manifest_extra(info)
        except AgentError as err:
            return f"model {info.get('version')}: bad deploy config: {err}"
        if cfg is None:
            return f"model {info.get('version')} has no deploy config (fleet publish --deploy-config)"
        from agent.contract.protocol import TensorSpec

        why = cfg.check_io(
            [TensorSpec.from_json(t) for t in info["inputs"]], [TensorSpec.from_json(t) for t in info["outputs"]]
        )
        if why:
            return f"model {info.get('version')}: {why}"
        if self.mapper is not None and self.mapper.cfg.source != cfg.source:
            log.info("model %s brings a new deploy config", info.get("version"))
        self.mapper, self.version = Mapper(cfg), str(info["version"])
        self._input = cfg.input_name or str(info["inputs"][0]["name"])
        return None

    def round_trip_figures(self) -> dict[str, float]:
        """Inference round trips through the agent's socket, in µs (what the deadline is up against)."""
        return figures_us(self.round_trips)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._job is not None)
                if self._stop:
                    return
                job, self._job = self._job, None
            assert job is not None
            outcome = self._step(job)
            with self._cond:
                self._outcome = outcome
                self._cond.notify_all()

    def _step(self, job: Job) -> Outcome:
        if self.mapper is None:
            why = self.refresh()
            if why:
                return Outcome(job.seq, "inference", why)
        try:
            raw = self._infer(job)
            if self.policy.model_version != self.version:  # swapped: this model may want other inputs
                why = self.refresh()
                if why:
                    return Outcome(job.seq, "fault", why)
                raw = self._infer(job)
        except (InferenceError, AgentError, OSError, ValueError) as err:
            return Outcome(job.seq, "inference", f"inference failed: {err}")
        assert self.mapper is not None
        why = self.mapper.fault(raw)
        if why:
            return Outcome(job.seq, "fault", why, version=self.version)
        self.last_action = raw
        return Outcome(job.seq, "ok", targets=self.mapper.targets(raw), mapper=self.mapper, version=self.version)

    def _infer(self, job: Job) -> np.ndarray:
        assert self.mapper is not None
        cfg = self.mapper.cfg
        obs = self.mapper.observation(job.state, job.command, self.last_action)
        t0 = time.perf_counter()
        out = self.policy.infer({self._input: obs})
        self.round_trips[self._calls % len(self.round_trips)] = time.perf_counter() - t0
        self._calls += 1
        (arr,) = [v for k, v in out.items() if cfg.output_name in (None, k)][:1]
        return np.asarray(arr, np.float64).reshape(-1)


def figures_us(seconds: np.ndarray) -> dict[str, float]:
    """p50, p99 and max in µs of the recorded (non-zero) durations in seconds; {} before any."""
    us = seconds[seconds > 0] * 1e6
    if not len(us):
        return {}
    return {
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "max_us": round(float(us.max()), 1),
    }
