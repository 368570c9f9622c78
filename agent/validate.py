"""The gate before activation. Each check returns its figures; the first failure rejects."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.engines import Engine
from agent.errors import RejectedModel
from agent.protocol import Manifest, TensorSpec, signature_diff

DEFAULT_ATOL, DEFAULT_RTOL = 1e-4, 1e-3  # FP32 against the training framework's outputs
DEFAULT_BUDGET_US = 2000
LATENCY_CALLS = 200
RANDOM_SAMPLES = 8


# A behavioural check (the Go2 sim rollout, agent/go2/simgate.py): (engine, manifest, skipped check
# names) -> figures; it raises RejectedModel with its figures in the reason.
BehaviourCheck = Callable[[Engine, Manifest, frozenset[str]], dict[str, Any]]


@dataclass
class GateResult:
    figures: dict[str, Any] = field(default_factory=dict)


def run_gate(
    engine: Engine,
    manifest: Manifest,
    active: list[TensorSpec] | None,
    active_outputs: list[TensorSpec] | None,
    golden: Path | None,
    behaviour: BehaviourCheck | None = None,
    skip: frozenset[str] = frozenset(),
) -> GateResult:
    result = GateResult()
    check_contract(engine, manifest, active, active_outputs)
    samples = random_inputs(engine.inputs, RANDOM_SAMPLES)
    if golden is not None:
        ins, outs = load_golden(golden, engine.inputs, engine.outputs)
        result.figures["golden_max_abs_err"] = check_golden(engine, manifest, ins, outs)
        samples = ins + samples
    check_finite(engine, samples)
    result.figures.update(check_latency(engine, samples[0], manifest))
    if behaviour is not None:
        result.figures.update(behaviour(engine, manifest, skip))
    return result


def check_contract(
    engine: Engine, manifest: Manifest, active_in: list[TensorSpec] | None, active_out: list[TensorSpec] | None
) -> None:
    for what, got, want in (("inputs", engine.inputs, manifest.inputs), ("outputs", engine.outputs, manifest.outputs)):
        diff = signature_diff(want, got, f"{what} of the engine and the manifest")
        if diff:
            raise RejectedModel("validate", diff)
    if active_in is not None and active_out is not None:
        for what, got, want in (("inputs", engine.inputs, active_in), ("outputs", engine.outputs, active_out)):
            diff = signature_diff(want, got, f"I/O signature differs from the active model's: {what}")
            if diff:
                raise RejectedModel("validate", diff)


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


def load_golden(
    path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Golden file: .npz with `inputs/<name>` and `outputs/<name>`, each stacked on a leading
    sample axis (N, *tensor shape). See README "Golden I/O"."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:
        raise RejectedModel("validate", f"golden file is not a readable .npz: {err}") from err
    missing = [
        f"{p}/{s.name}"
        for p, specs in (("inputs", inputs), ("outputs", outputs))
        for s in specs
        if f"{p}/{s.name}" not in arrays
    ]
    if missing:
        raise RejectedModel("validate", f"golden file lacks {', '.join(missing)}")
    n = len(arrays[f"inputs/{inputs[0].name}"])
    ins = [{s.name: arrays[f"inputs/{s.name}"][i].astype(s.dtype) for s in inputs} for i in range(n)]
    outs = [{s.name: arrays[f"outputs/{s.name}"][i] for s in outputs} for i in range(n)]
    return ins, outs


def check_golden(
    engine: Engine, manifest: Manifest, ins: list[dict[str, np.ndarray]], outs: list[dict[str, np.ndarray]]
) -> float:
    atol = float(manifest.extra.get("golden_atol", DEFAULT_ATOL))
    rtol = float(manifest.extra.get("golden_rtol", DEFAULT_RTOL))
    worst = 0.0
    for i, (feed, want) in enumerate(zip(ins, outs, strict=True)):
        got = engine.run(feed)
        for name, expected in want.items():
            err = np.abs(got[name].astype(np.float64) - expected.astype(np.float64))
            worst = max(worst, float(err.max(initial=0.0)))
            if not np.allclose(got[name], expected, atol=atol, rtol=rtol):
                raise RejectedModel(
                    "validate",
                    f"golden I/O mismatch on sample {i}, output {name!r}: "
                    f"max abs error {float(err.max()):.3g} > atol {atol:g} + rtol {rtol:g}",
                )
    return worst


def check_finite(engine: Engine, samples: list[dict[str, np.ndarray]]) -> None:
    for i, feed in enumerate(samples):
        for name, arr in engine.run(feed).items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise RejectedModel(
                    "validate", f"output {name!r} has {bad} non-finite values (NaN/Inf) on sample input {i}"
                )


def check_latency(engine: Engine, feed: dict[str, np.ndarray], manifest: Manifest) -> dict[str, Any]:
    """Warm up, then p99 over LATENCY_CALLS calls against the budget (manifest, else 2 ms)."""
    budget = int(manifest.extra.get("latency_budget_us", DEFAULT_BUDGET_US))
    for _ in range(20):
        engine.run(feed)
    times = np.empty(LATENCY_CALLS)
    for i in range(LATENCY_CALLS):
        t0 = time.perf_counter_ns()
        engine.run(feed)
        times[i] = (time.perf_counter_ns() - t0) / 1000
    p50, p99 = (float(np.percentile(times, q)) for q in (50, 99))
    if p99 > budget:
        raise RejectedModel("validate", f"latency p99 {p99:.0f} µs exceeds the budget of {budget} µs")
    return {"gate_p50_us": round(p50, 1), "gate_p99_us": round(p99, 1), "latency_budget_us": budget}
