"""Inputs and timings that the gate and the serving processes both use: random feeds shaped
like a model's inputs, and each call's time measured where the engine runs."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import numpy as np

from agent.contract.protocol import TensorSpec
from agent.engines import Engine


def random_inputs(specs: list[TensorSpec], n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for s in specs:
            shape = s.concrete_shape()
            if s.dtype.startswith("float"):
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype == "bool":
                feed[s.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                feed[s.name] = rng.integers(0, 8, shape).astype(s.dtype)
        out.append(feed)
    return out


@runtime_checkable
class TimesItsCalls(Protocol):
    """An engine in another process (agent.serving.process.GateEngine): timed there, not across the pipe."""

    def time_calls(self, feed: dict[str, np.ndarray], calls: int) -> list[float]: ...


def time_calls(engine: Engine, feed: dict[str, np.ndarray], calls: int) -> list[float]:
    """Each of `calls` runs, in µs."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        engine.run(feed)
        times.append((time.perf_counter_ns() - t0) / 1000)
    return times


def timed(engine: Engine, feed: dict[str, np.ndarray], calls: int) -> tuple[float, float]:
    """p50 and p99 in µs over `calls` calls, timed where the engine runs."""
    if isinstance(engine, TimesItsCalls):
        times = np.asarray(engine.time_calls(feed, calls))
    else:
        times = np.asarray(time_calls(engine, feed, calls))
    p50, p99 = (round(float(np.percentile(times, q)), 1) for q in (50, 99))
    return p50, p99
