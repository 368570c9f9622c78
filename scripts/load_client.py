#!/usr/bin/env python3
"""A controller-shaped client: calls the agent at a fixed rate and writes what it saw as JSON.

    python scripts/load_client.py --socket /run/edge-agent/infer.sock --hz 500 --out result.json

Runs until --seconds pass or SIGTERM/SIGINT. Every failed call is counted with its error; a "miss"
is a round trip over --deadline-ms. Used by the tests, the demo and the benchmarks."""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np

from agent.client import Policy
from agent.errors import InferenceError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--hz", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--deadline-ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--nice", type=int, default=0, help="CPU priority, as a controller would run (needs root below 0)")
    p.add_argument("--warmup-s", type=float, default=0.0, help="calls in the first seconds are not counted")
    p.add_argument("--cpu", type=int, help="run on this CPU only (as the controller unit's CPUAffinity=)")
    p.add_argument("--fifo", type=int, default=0, help="SCHED_FIFO priority, as the Go2 controller's unit runs it")
    args = p.parse_args()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.fifo:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.fifo))
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    result = run(
        args.socket, args.hz, args.seconds, deadline_s=args.deadline_ms / 1000, stop=stop, warmup_s=args.warmup_s
    )
    tmp = args.out.with_suffix(".part")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(args.out)
    return 0


def run(
    socket_path: str, hz: float, seconds: float, *, deadline_s: float, stop: dict[str, bool], warmup_s: float = 0.0
) -> dict[str, object]:
    policy = Policy(socket_path)
    spec = policy.info()["inputs"][0]
    gc.freeze()  # like the agent: what exists now is never walked by a full collection in the loop
    shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
    obs = np.random.default_rng(0).standard_normal(shape).astype(spec["dtype"])
    period = 1.0 / hz
    rtts: list[float] = []
    done_at: list[float] = []
    missed_at: list[float] = []  # wall clock, to line up with the agent's log
    failures: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    start = next_t = time.perf_counter()
    counted_from = start + warmup_s
    while not stop["now"] and time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        try:
            policy.infer({spec["name"]: obs})
            t1 = time.perf_counter()
            if t0 < counted_from:
                next_t = _pace(next_t, period)
                continue
            rtts.append(t1 - t0)
            done_at.append(t1)
            if t1 - t0 > deadline_s and len(missed_at) < 200:
                missed_at.append(time.time())
            versions[policy.model_version] += 1
        except (InferenceError, OSError) as err:
            failures[f"{type(err).__name__}: {err}"] += 1
        next_t = _pace(next_t, period)
    result = summarize(
        rtts, done_at, failures, versions, elapsed=time.perf_counter() - counted_from, deadline_s=deadline_s
    )
    result["missed_at"] = [round(t, 4) for t in missed_at]
    if len(done_at) > 1:  # wall clock of the largest gap's end, to line up with the agent's log
        end = int(np.argmax(np.diff(done_at))) + 1
        result["max_gap_at"] = round(time.time() - (time.perf_counter() - done_at[end]), 4)
    return result


def _pace(next_t: float, period: float) -> float:
    """Sleep until the next period starts; returns its start."""
    next_t += period
    delay = next_t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
        return next_t
    return time.perf_counter()  # fell behind: don't burst to catch up


def summarize(
    rtts: list[float],
    done_at: list[float],
    failures: Counter[str],
    versions: Counter[str],
    *,
    elapsed: float,
    deadline_s: float,
) -> dict[str, object]:
    r = np.array(rtts) * 1e6 if rtts else np.zeros(1)
    gaps = np.diff(np.array(done_at)) * 1e3 if len(done_at) > 1 else np.zeros(1)
    return {
        "calls": len(rtts) + sum(failures.values()),
        "ok": len(rtts),
        "failed": sum(failures.values()),
        "failures": dict(failures.most_common(10)),
        "versions": dict(versions),
        "rate_hz": round(len(rtts) / elapsed, 1) if elapsed else 0.0,
        "p50_us": round(float(np.percentile(r, 50)), 1),
        "p99_us": round(float(np.percentile(r, 99)), 1),
        "max_us": round(float(r.max()), 1),
        "misses": int((r > deadline_s * 1e6).sum()),
        "max_gap_ms": round(float(gaps.max()), 3),
    }


if __name__ == "__main__":
    raise SystemExit(main())
