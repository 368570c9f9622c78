"""A controller's calls at a fixed rate on a thread of its own, as the Go2 makes them: for the tests'
fault checks and the soak. Counts answers (with the model version) and failures."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np

from agent.client import Policy
from agent.errors import AgentError


class CallingClient:
    """A controller calling at `hz` on its own thread, as the Go2 does: counts answers and
    failures, and the longest gap between two answers."""

    def __init__(self, socket_path: Path, hz: float = 200.0, width: int = 48) -> None:
        self.socket_path = socket_path
        self.period = 1.0 / hz
        self.obs = np.zeros((1, width), np.float32)
        self.answers: list[tuple[float, str]] = []  # (monotonic time, model version)
        self.failures = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CallingClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        policy = Policy(self.socket_path, timeout=0.5)
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                policy(self.obs)
                self.answers.append((time.monotonic(), policy.model_version))
            except (AgentError, OSError) as err:
                self.failures += 1
                self.last_error = str(err)
                policy.close()
            next_at = max(next_at + self.period, time.monotonic() - self.period)
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        policy.close()

    def answered_since(self, t: float) -> list[str]:
        return [v for at, v in self.answers if at >= t]

    def first_answer_after(self, t: float) -> float | None:
        return next((at for at, _ in self.answers if at >= t), None)

    def longest_gap(self, since: float = 0.0) -> float:
        times = [at for at, _ in self.answers if at >= since]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)
