"""`scripts/jetson-check`: the verdict a lab admin gets after installing on a Jetson, one line per
check with PASS, FAIL, WARN, INFO or N/A and the reason. It exercises what only a Jetson can settle
(a real CUDA context, TensorRT's engines, the unit's sandbox, the GPU's device nodes, real-time
scheduling, memory per CUDA process) through the agent's own code paths: the build child, the
serving processes, the gate. `--backend onnxruntime` runs the same table on any machine (CI does),
the TensorRT-only lines marked N/A. Exit 0: no FAIL; 1: a FAIL; 2: the backend is not usable."""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PASS, FAIL, WARN, INFO, NA = "PASS", "FAIL", "WARN", "INFO", "N/A"
# The unit's settings that make its sandbox; --sandboxed runs the checks under them (systemd-run).
SANDBOX_KEYS = (
    "User", "Group", "SupplementaryGroups", "ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges",
    "CapabilityBoundingSet", "AmbientCapabilities", "RestrictNamespaces", "RestrictAddressFamilies",
    "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "LimitRTPRIO", "RestrictRealtime",
    "LockPersonality", "MemoryDenyWriteExecute", "ProtectKernelModules", "ProtectKernelTunables",
    "ProtectControlGroups", "DeviceAllow", "LimitNICE",
)  # fmt: skip
UNIT = Path("/etc/systemd/system/edge-agent.service")


@dataclass
class Line:
    name: str
    status: str
    detail: str


class Report:
    def __init__(self) -> None:
        self.lines: list[Line] = []

    def add(self, name: str, status: str, detail: str) -> None:
        line = Line(name, status, detail)
        self.lines.append(line)
        print(f"{line.name:<22} {line.status:<4}  {line.detail}", flush=True)

    def check(self, name: str, fn: Callable[[], tuple[str, str]]) -> None:
        """A check that raises is a FAIL with its reason, never a traceback."""
        try:
            status, detail = fn()
        except Exception as err:
            status, detail = FAIL, f"{type(err).__name__}: {err}"
        self.add(name, status, detail)

    @property
    def failed(self) -> bool:
        return any(line.status == FAIL for line in self.lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sandboxed:
        return _in_sandbox(args)
    from agent.config import BuildConfig
    from agent.engines import select_backend
    from agent.errors import BackendUnavailable

    cache = Path(tempfile.mkdtemp(prefix="jetson-check-cache-"))
    cfg = BuildConfig(workspace_mb=args.workspace_mb, fp16=not args.fp32, emulate_fp16=args.emulate_fp16)
    try:
        backend = select_backend(args.backend, cfg, cache)
    except BackendUnavailable as err:
        print(f"backend {args.backend} is not usable here: {err}")
        return 2
    report = Report()
    _facts(report, backend)
    with tempfile.TemporaryDirectory(prefix="jetson-check-") as tmp:
        Checks(report, backend, cfg, tmp=Path(tmp), cache=cache, args=args).run()
    shutil.rmtree(cache, ignore_errors=True)
    bad = [line.name for line in report.lines if line.status == FAIL]
    print(
        f"verdict                {'FAIL' if bad else 'PASS'}  {', '.join(bad) or 'every check passed or did not apply'}"
    )
    return 1 if bad else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetson-check", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime", "auto"], default="tensorrt")
    p.add_argument("--model", type=Path, help="ONNX file (default: a Go2-sized MLP)")
    p.add_argument("--samples", type=int, default=20, help="random inputs compared with ONNX Runtime")
    p.add_argument("--runs", type=int, default=2000, help="timed inference calls")
    p.add_argument("--fp32", action="store_true", help="TensorRT: FP32 only")
    p.add_argument("--emulate-fp16", action="store_true", help="ONNX Runtime: an emulated FP16 engine too")
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--sandboxed", action="store_true", help="run the checks inside the unit's sandbox (systemd-run)")
    return p


# -- facts about this machine ----------------------------------------------------------------------
def _facts(report: Report, backend: Any) -> None:
    from agent.engines.board import read_board

    b = read_board()
    report.add("board", INFO, b.model or f"not a Jetson ({platform.machine()}, no device tree)")
    report.add("l4t", INFO, b.l4t or "no /etc/nv_tegra_release")
    report.add("libnvinfer", INFO, b.nvinfer or "no libnvinfer package")
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("onnxruntime", "tensorrt", "pycuda"):
        versions[module] = _version(module)
    report.add("versions", INFO, ", ".join(f"{k} {v}" for k, v in versions.items()))
    ident = backend.cache_identity(backend.precisions()[0])
    gpu = f"{ident.get('device')} sm{ident.get('sm')}, {ident.get('sm_count')} SMs" if "sm" in ident else "none"
    report.add("gpu", INFO, gpu)
    report.add("power_mode", INFO, _nvpmodel())
    report.add("backend", PASS, f"{backend.name} {backend.version()}, precisions {'/'.join(backend.precisions())}")


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "importable"))
    except Exception as err:  # a broken install raises more than ImportError
        return f"not importable ({type(err).__name__})"


def _nvpmodel() -> str:
    tool = shutil.which("nvpmodel")
    if tool is None:
        return "nvpmodel not found"
    out = subprocess.run([tool, "-q"], capture_output=True, text=True, timeout=10, check=False).stdout
    return " ".join(out.split()) or "unknown"


# -- the checks -------------------------------------------------------------------------------------
class Checks:
    def __init__(
        self, report: Report, backend: Any, cfg: Any, *, tmp: Path, cache: Path, args: argparse.Namespace
    ) -> None:
        self.report, self.backend, self.cfg, self.tmp, self.cache, self.args = report, backend, cfg, tmp, cache, args
        self.trt = backend.name == "tensorrt"
        self.model = args.model or go2_mlp(tmp / "go2_mlp.onnx")
        self.engines: dict[str, Path] = {}

    def run(self) -> None:
        r, jetson = self.report, Path("/etc/nv_tegra_release").exists()
        r.check("cuda_context", self.cuda_context)
        r.check("gpu_device_nodes", lambda: self.device_nodes(jetson))
        r.check("sched_fifo", lambda: self.sched_fifo(jetson))
        for precision in self.backend.precisions():
            r.check(f"build_{precision}", functools.partial(self.build, precision))
            r.check(f"accuracy_{precision}", functools.partial(self.accuracy, precision))
        r.check("engine_io", self.engine_io)
        r.check("dynamic_batch", self.dynamic_batch)
        r.check("serving_path", self.serving_path)
        r.check("latency", self.latency)
        r.check("memory_per_process", self.memory)
        r.check("timing_cache_reuse", self.timing_cache)

    def cuda_context(self) -> tuple[str, str]:
        if not self.trt:
            return NA, "no CUDA here (TensorRT only)"
        import pycuda.driver as cuda

        ctx = cuda.Device(0).retain_primary_context()
        ctx.push()
        try:
            mem = cuda.mem_alloc(1 << 20)
            cuda.memcpy_htod(mem, np.zeros(1 << 18, np.float32))
            mem.free()
        finally:
            cuda.Context.pop()
        return PASS, "primary context pushed, 1 MiB allocated and copied, popped"

    def device_nodes(self, jetson: bool) -> tuple[str, str]:
        nodes = [Path("/dev/nvmap"), *sorted(Path("/dev").glob("nvhost-*"))[:3]]
        if not jetson:
            return NA, "not a Jetson"
        missing = [str(n) for n in nodes if not os.access(n, os.R_OK | os.W_OK)]
        if missing:
            return FAIL, f"no read/write access to {', '.join(missing)} (groups video and render; no PrivateDevices=)"
        return PASS, f"{', '.join(str(n) for n in nodes)} readable and writable"

    def sched_fifo(self, jetson: bool) -> tuple[str, str]:
        """A real sched_setscheduler on a child, as the serving process gets at the swap."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            os.sched_setscheduler(child.pid, os.SCHED_FIFO, os.sched_param(70))
            got = os.sched_getscheduler(child.pid)
            return (PASS, "SCHED_FIFO 70 set on a child") if got == os.SCHED_FIFO else (FAIL, f"policy {got}")
        except PermissionError as err:
            status = FAIL if jetson else WARN
            return status, f"SCHED_FIFO 70 refused ({err.strerror}): run under the unit (LimitRTPRIO=70) or as root"
        finally:
            child.kill()
            child.wait()

    def build(self, precision: str) -> tuple[str, str]:
        from agent.engines.build import run_build

        path = self.tmp / f"engine-{precision}"
        stages: list[str] = []
        seconds = run_build(
            self.backend,
            self.model,
            path,
            self.cfg,
            precision=precision,
            cancelled=lambda: None,
            on_progress=lambda info: stages.append(info.stage),
        )
        self.engines[precision] = path
        flow = " -> ".join(dict.fromkeys(stages))
        return PASS, f"{seconds:.2f} s in a child process ({flow}); engine {path.stat().st_size / 2**20:.1f} MiB"

    def accuracy(self, precision: str) -> tuple[str, str]:
        """Against ONNX Runtime on the same inputs, at polygraphy's tolerances (FP16: 1e-2)."""
        import onnxruntime as ort

        from agent.engines.probes import random_inputs

        if precision not in self.engines:
            return FAIL, "no engine (its build failed)"
        tol = 1e-2 if precision == "fp16" else 1e-5
        engine = self.backend.load(self.engines[precision])
        session = ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"])
        worst, bad = 0.0, 0
        try:
            for feed in random_inputs(engine.inputs, self.args.samples):
                want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
                for name, got in engine.run(feed).items():
                    worst = max(worst, float(np.abs(got - want[name]).max()))
                    bad += 0 if np.allclose(got, want[name], atol=tol, rtol=tol) else 1
        finally:
            engine.close()
        tf32 = ", TF32 off" if self.trt and precision == "fp32" and not self.cfg.tf32 else ""
        detail = f"max abs error {worst:.3g} over {self.args.samples} inputs (atol = rtol = {tol:g}{tf32})"
        return (PASS, detail) if bad == 0 else (FAIL, f"{bad} outputs out of tolerance; {detail}")

    def engine_io(self) -> tuple[str, str]:
        """The engine's own I/O against the ONNX file's (TensorRT 8.6 narrows int64 and float64)."""
        from agent.contract.onnx_signature import check_onnx, signature

        inputs, outputs = signature(check_onnx(self.model))
        engine = self.backend.load(next(iter(self.engines.values())))
        try:
            got = {s.name: s.dtype for s in engine.inputs + engine.outputs}
            want = {s.name: s.dtype for s in inputs + outputs}
            real = {k: str(v) for k, v in getattr(engine, "dtypes", {}).items()}
        finally:
            engine.close()
        if got.keys() != want.keys():
            return FAIL, f"engine I/O {sorted(got)} is not the model's {sorted(want)}"
        narrowed = {k: f"{want[k]} as {v}" for k, v in real.items() if v != want[k]}
        detail = f"{len(want)} tensors match the ONNX signature"
        return PASS, detail + (f"; the engine narrows {narrowed}" if narrowed else "")

    def dynamic_batch(self) -> tuple[str, str]:
        from agent.engines.build import run_build

        model = dynamic_copy(self.model, self.tmp / "dynamic.onnx")
        path = self.tmp / "engine-dynamic"
        precision = self.backend.precisions()[-1]
        run_build(
            self.backend, model, path, self.cfg, precision=precision, cancelled=lambda: None, on_progress=lambda _: None
        )
        engine = self.backend.load(path)
        try:
            width = engine.inputs[0].concrete_shape()[1:]
            for batch in range(1, self.cfg.max_dynamic + 1):
                out = engine.run({engine.inputs[0].name: np.ones((batch, *width), np.float32)})
                if next(iter(out.values())).shape[0] != batch:
                    return FAIL, f"batch {batch} came back with another batch size"
            if not self.trt:
                return PASS, f"batch 1..{self.cfg.max_dynamic} served (no profile to exceed in ONNX Runtime)"
            try:
                engine.run({engine.inputs[0].name: np.ones((self.cfg.max_dynamic + 1, *width), np.float32)})
            except ValueError as err:
                return PASS, f"batch 1..{self.cfg.max_dynamic} served; {self.cfg.max_dynamic + 1} refused: {err}"
            return FAIL, f"batch {self.cfg.max_dynamic + 1} was accepted beyond the profile"
        finally:
            engine.close()

    def serving_path(self) -> tuple[str, str]:
        """Serving processes as the daemon runs them: load, gate, unload to the spare, load a
        second engine there, stop. Each must exit 0 (pycuda aborts one that leaves a context pushed)."""
        from agent.coordinator.gate import GateContext, run_gate

        with self.server() as (server, _sock):
            first = server.load(self.engines_path(), "a", "sha-a", None)
            with server.gating(first) as engine:
                results = run_gate(engine, manifest_for(self.model), GateContext(latency_budget_us=10**9))
            server.swap_now(first)
            server.start()
            second = server.load(self.engines_path(), "b", "sha-b", None)
            server.swap(second)  # the first model's process becomes the spare
            workers = [first.worker, second.worker]
        codes = [w.proc.exitcode for w in workers]
        detail = f"gate {'/'.join(r.name for r in results)} passed; 2 models swapped; exit codes {codes}"
        return (PASS, detail) if all(c == 0 for c in codes) else (FAIL, detail)

    def latency(self) -> tuple[str, str]:
        """Direct (in process), served (through the socket), and served while a build runs."""
        from agent.client import Policy
        from agent.engines.build import run_build
        from agent.engines.probes import random_inputs

        engine = self.backend.load(self.engines_path())
        feed = random_inputs(engine.inputs, 1)[0]
        direct = timed(lambda: engine.run(feed), self.args.runs)
        engine.close()
        with self.server() as (server, sock):
            served_model = server.load(self.engines_path(), "a", "sha-a", None)
            server.swap_now(served_model)
            server.start()
            policy = Policy(sock)
            idle = timed(lambda: policy.infer(feed), self.args.runs)
            building = _in_background(
                lambda: run_build(
                    self.backend,
                    self.model,
                    self.tmp / "engine-busy",
                    self.cfg,
                    precision=self.backend.precisions()[-1],
                    cancelled=lambda: None,
                    on_progress=lambda _: None,
                )
            )
            during = timed(lambda: policy.infer(feed), self.args.runs, until=building)
            policy.close()
        ratio = during[1] / idle[1] if idle[1] else float("nan")
        detail = (
            f"direct p50/p99 {direct[0]:.0f}/{direct[1]:.0f} µs; served {idle[0]:.0f}/{idle[1]:.0f} µs; "
            f"served during a build p99 {during[1]:.0f} µs (x{ratio:.2f})"
        )
        return INFO, detail

    def memory(self) -> tuple[str, str]:
        """What one serving process costs with its model loaded: its PSS (shared pages split between
        the processes that share them), and MemAvailable's drop per process, which on a Jetson also
        holds what CUDA allocates in the memory the GPU shares with the CPU (not in any PSS)."""
        from agent.proc.child import available_mb

        before = available_mb()
        with self.server() as (server, _sock):
            models = [server.load(self.engines_path(), f"m{i}", f"sha-{i}", None) for i in range(3)]
            loaded = available_mb()
            pss = [pss_mib(m.worker.pid) for m in models]
            for m in models:
                server.release(m)
        each = ", ".join(f"{p:.0f}" for p in pss)
        drop = (
            f"; MemAvailable {before} -> {loaded} MiB with 3 loaded ({(before - loaded) / 3:.0f} per process)"
            if before and loaded
            else ""
        )
        return INFO, f"PSS {sum(pss) / 3:.0f} MiB per serving process ({each}){drop}"

    def timing_cache(self) -> tuple[str, str]:
        if not self.trt:
            return NA, "TensorRT only"
        from agent.engines.build import run_build

        caches = sorted(self.cache.glob("timing-*.cache"))
        if not caches:
            return FAIL, f"no timing cache in {self.cache} after the builds"
        t0 = time.monotonic()
        precision = self.backend.precisions()[0]
        run_build(
            self.backend,
            self.model,
            self.tmp / "engine-again",
            self.cfg,
            precision=precision,
            cancelled=lambda: None,
            on_progress=lambda _: None,
        )
        return PASS, f"{caches[0].name} reused: a second build took {time.monotonic() - t0:.2f} s"

    # -- helpers ---------------------------------------------------------------------------------
    def engines_path(self) -> Path:
        return self.engines[self.backend.precisions()[0]] if self.engines else self.tmp / "missing"

    @contextmanager
    def server(self) -> Iterator[tuple[Any, Path]]:
        from agent.serving.server import InferenceServer
        from agent.serving.telemetry import LatencyRecorder

        sock = self.tmp / f"infer-{time.monotonic_ns()}.sock"
        server = InferenceServer(sock, LatencyRecorder(), self.backend)
        try:
            yield server, sock
        finally:
            server.stop()


def pss_mib(pid: int) -> float:
    """A process's proportional set size (/proc/<pid>/smaps_rollup), in MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(call: Callable[[], object], runs: int, until: Callable[[], bool] | None = None) -> tuple[float, float]:
    """p50 and p99 in µs of `runs` calls (or of calls until `until()` says done, at least 50)."""
    for _ in range(20):
        call()
    times: list[float] = []
    while (len(times) < runs) if until is None else (len(times) < 50 or not until()):
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _in_background(work: Callable[[], object]) -> Callable[[], bool]:
    """Runs `work` on a thread; returns 'is it done?'."""
    import threading

    t = threading.Thread(target=work, name="jetson-check-build", daemon=True)
    t.start()
    return lambda: not t.is_alive()


def go2_mlp(path: Path, dims: tuple[int, ...] = (48, 512, 256, 128, 12)) -> Path:
    """A Go2-sized policy (48 observations -> 12 joint targets, ELU MLP) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "obs"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        last = i == len(dims) - 2
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], ["actions" if last else f"a{i}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Elu", [f"a{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "go2_policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, [1, dims[0]])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, [1, dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def dynamic_copy(path: Path, out: Path) -> Path:
    """The same model with a symbolic batch dimension on its inputs and outputs."""
    import onnx

    model = onnx.load(str(path))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, str(out))
    return out


def manifest_for(path: Path) -> Any:
    from agent.contract.digest import sha256_file
    from agent.contract.onnx_signature import check_onnx, signature
    from agent.contract.protocol import Manifest, ObjectRef

    inputs, outputs = signature(check_onnx(path))
    sha = sha256_file(path).hexdigest()
    return Manifest("check", sha, path.stat().st_size, ObjectRef("local", path.name), inputs, outputs, time.time())


# -- the unit's sandbox -------------------------------------------------------------------------------
def _in_sandbox(args: argparse.Namespace) -> int:
    """The same checks as the service runs: systemd-run with the installed unit's sandbox settings."""
    if shutil.which("systemd-run") is None or not Path("/run/systemd/system").exists():
        print("sandbox                N/A   no systemd here: run without --sandboxed")
        return 0
    props = unit_properties(UNIT.read_text() if UNIT.exists() else "")
    argv = [a for a in sys.argv[1:] if a != "--sandboxed"]
    cmd = ["systemd-run", "--wait", "--pipe", "--collect", "--quiet", *(f"--property={p}" for p in props)]
    print(f"sandbox                INFO  {len(props)} properties of {UNIT} (systemd-run)", flush=True)
    return subprocess.run([*cmd, sys.executable, "-m", "agent.jetson_check", *argv], check=False).returncode


def unit_properties(unit: str) -> list[str]:
    """The [Service] settings of the unit that make its sandbox, as systemd-run properties."""
    props, section = [], ""
    for raw in unit.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0]
            if key in SANDBOX_KEYS:
                props.append(line)
    return props


if __name__ == "__main__":
    sys.exit(main())
