"""The gate before activation. Each check returns a CheckResult with its figures; all of them are
recorded, and the first failure rejects the model with its figure in the reason.

Checks, in order: I/O contract (vs the manifest and the active model), golden I/O (when the manifest
carries it), finite outputs (golden and random inputs), latency budget (p99 of warm calls), then
behavioural checks that other parts register (the Go2 simulator rollout)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.protocol import Manifest, TensorSpec, signature_diff
from agent.engines import Engine
from agent.engines.probes import random_inputs, timed
from agent.errors import RejectedModel

TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2)}  # (atol, rtol) against training outputs
DEFAULT_BUDGET_US = 2000
RANDOM_SAMPLES = 8


@dataclass
class CheckResult:
    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, **self.figures}


# A behavioural check (the Go2 sim rollout, agent/go2/simgate.py): (engine, manifest, checks the
# operator forced it past) -> figures; it raises RejectedModel with its figures in the reason.
BehaviouralCheck = Callable[[Engine, Manifest, frozenset[str]], dict[str, Any]]


@dataclass
class GateContext:
    active_inputs: list[TensorSpec] | None = None
    active_outputs: list[TensorSpec] | None = None
    golden: Path | None = None
    precision: str = "fp32"
    latency_budget_us: int = DEFAULT_BUDGET_US  # the channel's; the manifest's wins
    latency_calls: int = 300
    behavioural: list[BehaviouralCheck] = field(default_factory=list)
    skip: frozenset[str] = frozenset()  # forced past these checks (recorded as such)


def run_gate(engine: Engine, manifest: Manifest, ctx: GateContext) -> list[CheckResult]:
    """Every check's result, in order; raises RejectedModel (with every
    result so far as its figures) at the first failure."""
    results: list[CheckResult] = []

    def record(result: CheckResult | None) -> None:
        if result is None:
            return
        if result.name in ctx.skip and not result.passed:
            result = CheckResult(result.name, True, {**result.figures, "forced": True}, f"forced: {result.reason}")
        results.append(result)
        if not result.passed:
            checks = {r.name: r.to_json() for r in results}
            raise RejectedModel("validate", f"{result.name}: {result.reason}", {"gate": checks})

    record(check_contract(engine, manifest, ctx))
    samples = random_inputs(engine.inputs, RANDOM_SAMPLES)
    if ctx.golden is not None:
        ins, outs = load_golden(ctx.golden, engine.inputs, engine.outputs)
        record(check_golden(engine, manifest, ins, outs, ctx.precision))
        samples = ins + samples
    record(check_finite(engine, samples))
    record(check_latency(engine, samples[0], manifest, ctx))
    for check in ctx.behavioural:
        record(run_behavioural(check, engine, manifest, ctx.skip))
    return results


def run_behavioural(check: BehaviouralCheck, engine: Engine, manifest: Manifest, skip: frozenset[str]) -> CheckResult:
    try:
        figures = check(engine, manifest, skip)
    except RejectedModel as err:
        name = err.stage if err.stage != "validate" else "behaviour"
        return CheckResult(name, False, {}, err.reason)
    return CheckResult(str(figures.pop("check", "behaviour")), True, figures)


def check_contract(engine: Engine, manifest: Manifest, ctx: GateContext) -> CheckResult:
    pairs = [
        ("inputs of the engine and the manifest", engine.inputs, manifest.inputs),
        ("outputs of the engine and the manifest", engine.outputs, manifest.outputs),
    ]
    if ctx.active_inputs is not None and ctx.active_outputs is not None:
        pairs += [
            ("I/O signature differs from the active model's: inputs", engine.inputs, ctx.active_inputs),
            ("I/O signature differs from the active model's: outputs", engine.outputs, ctx.active_outputs),
        ]
    for what, got, want in pairs:
        diff = signature_diff(want, got, what)
        if diff:
            return CheckResult("contract", False, {}, diff)
    return CheckResult("contract", True, {"inputs": len(engine.inputs), "outputs": len(engine.outputs)})


def load_golden(
    path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Golden file: .npz with `inputs/<name>` and `outputs/<name>`, each stacked on a leading
    sample axis (N, *tensor shape). See docs/how-it-works.md, "Golden I/O"."""
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
    engine: Engine,
    manifest: Manifest,
    ins: list[dict[str, np.ndarray]],
    outs: list[dict[str, np.ndarray]],
    precision: str,
) -> CheckResult:
    default_atol, default_rtol = TOLERANCES.get(precision, TOLERANCES["fp32"])
    atol = float(manifest.extra.get("golden_atol", default_atol))
    rtol = float(manifest.extra.get("golden_rtol", default_rtol))
    worst, failure = 0.0, ""
    for i, (feed, want) in enumerate(zip(ins, outs, strict=True)):
        got = engine.run(feed)
        for name, expected in want.items():
            a, b = got[name].astype(np.float64), expected.astype(np.float64)
            worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
            if not failure and not np.allclose(a, b, atol=atol, rtol=rtol):
                failure = f"mismatch on sample {i}, output {name!r}"
    figures = {"max_abs_err": float(f"{worst:.3g}"), "atol": atol, "rtol": rtol, "samples": len(ins)}
    if failure:
        return CheckResult(
            "golden", False, figures, f"{failure}: max abs error {worst:.3g} exceeds atol {atol:g} + rtol {rtol:g}"
        )
    return CheckResult("golden", True, figures)


def check_finite(engine: Engine, samples: list[dict[str, np.ndarray]]) -> CheckResult:
    for i, feed in enumerate(samples):
        for name, arr in engine.run(feed).items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                return CheckResult(
                    "finite",
                    False,
                    {"samples": len(samples), "nonfinite": bad},
                    f"output {name!r} has {bad} non-finite values (NaN/Inf) on sample input {i}",
                )
    return CheckResult("finite", True, {"samples": len(samples)})


def check_latency(engine: Engine, feed: dict[str, np.ndarray], manifest: Manifest, ctx: GateContext) -> CheckResult:
    """Warm up, then p99 over `latency_calls` calls against the budget (manifest, else the channel's).
    A run over budget is measured once more: one preemption on a busy host can lift the p99 of a
    few hundred calls, a slow model fails both runs. The better run's figures are reported."""
    budget = int(manifest.extra.get("latency_budget_us", ctx.latency_budget_us))
    for _ in range(20):
        engine.run(feed)
    p50, p99 = timed(engine, feed, ctx.latency_calls)
    runs = 1
    if p99 > budget:
        p50, p99 = min((p50, p99), timed(engine, feed, ctx.latency_calls), key=lambda r: r[1])
        runs = 2
    figures = {"p50_us": p50, "p99_us": p99, "budget_us": budget, "calls": ctx.latency_calls, "runs": runs}
    if p99 > budget:
        return CheckResult("latency", False, figures, f"p99 {p99:.0f} µs exceeds the budget of {budget} µs")
    return CheckResult("latency", True, figures)
