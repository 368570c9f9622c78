"""`agent doctor`: is this machine ready to run the agent? Each check says ok / warn / fail, what it
found, and what to do about it. Exit code: 0 when nothing failed (warnings allowed), 1 otherwise."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.config import AgentConfig, cache_dir, load
from agent.errors import AgentError, BackendUnavailable
from agent.proc.child import available_mb
from agent.proc.sched import fifo_allowed

OK, WARN, FAIL = "ok", "warn", "fail"
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on every Jetson (L4T)
NET_TIMEOUT_S = 3.0


@dataclass
class Check:
    name: str
    status: str
    detail: str
    remedy: str = ""


def run_doctor(config_file: Path) -> list[Check]:
    try:
        cfg = load(config_file)
    except AgentError as err:
        return [Check("config", FAIL, f"{config_file}: {err}", "fix the key it names; see docs/configuration.md")]
    checks = [Check("config", OK, f"{config_file} is valid (backend = {cfg.backend!r})")]
    for probe in _probes():
        try:
            checks.extend(probe(cfg))
        except Exception as err:  # a broken probe is a finding, not a crash
            checks.append(Check(probe.__name__.lstrip("_"), FAIL, f"{type(err).__name__}: {err}"))
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def to_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}


def format_text(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status.upper():<4}] {c.name:<12} {c.detail}")
        if c.remedy and c.status != OK:
            lines.append(f"{'':19}-> {c.remedy}")
    return "\n".join(lines)


def _probes() -> list[Callable[[AgentConfig], list[Check]]]:
    return [_python, _tensorrt, _cuda, _backend, _power, _memory, _disk, _scheduling, _state_dir, _broker, _s3]


def is_jetson() -> bool:
    return TEGRA_RELEASE.exists()


# -- the GPU stack --------------------------------------------------------------------------------
def _python(_cfg: AgentConfig) -> list[Check]:
    v = sys.version_info
    ok = v >= (3, 10)
    return [
        Check(
            "python",
            OK if ok else FAIL,
            f"{platform.python_version()} on {platform.machine()}",
            "" if ok else "the agent needs Python >= 3.10 (JetPack 6 ships 3.10)",
        )
    ]


def _tensorrt(cfg: AgentConfig) -> list[Check]:
    try:
        import tensorrt as trt
    except ImportError as err:
        status = FAIL if cfg.backend == "tensorrt" else WARN if is_jetson() else OK
        where = "this is a Jetson" if is_jetson() else "not a Jetson"
        detail = f"not importable ({err}); {where}: backend {cfg.backend!r} serves with ONNX Runtime on the CPU"
        remedy = (
            "on JetPack 6: apt install python3-libnvinfer, and make the venv with --system-site-packages"
            if status != OK
            else ""
        )
        return [Check("tensorrt", status, detail if cfg.backend != "tensorrt" else f"not importable ({err})", remedy)]
    checks = [Check("tensorrt", OK, f"TensorRT {trt.__version__}")]
    checks.append(_dla(trt))
    return checks


def _dla(trt: Any) -> Check:
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        n = int(builder.num_DLA_cores)
    except Exception as err:  # no GPU: the builder does not start
        return Check("dla", WARN, f"cannot ask TensorRT: {err}")
    return Check("dla", OK, f"{n} DLA core(s)" + (" (Orin Nano has none; engines use the GPU)" if n == 0 else ""))


def _cuda(cfg: AgentConfig) -> list[Check]:
    try:
        import pycuda.driver as cuda
    except ImportError as err:
        status = FAIL if cfg.backend == "tensorrt" else (WARN if is_jetson() else OK)
        remedy = "pip install 'edge-agent[jetson]' (pycuda builds with nvcc from JetPack)"
        return [Check("pycuda", status, f"not importable ({err})", remedy if status != OK else "")]
    try:
        cuda.init()
        n = cuda.Device.count()
    except cuda.Error as err:
        remedy = "the service user needs the video and render groups; check /dev/nvhost-* and tegrastats"
        return [Check("gpu", FAIL, f"CUDA does not initialise: {err}", remedy)]
    if n == 0:
        return [Check("gpu", FAIL, "CUDA sees no GPU", "check the driver (JetPack) and device permissions")]
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    driver = cuda.get_driver_version()
    return [
        Check("pycuda", OK, f"pycuda with CUDA driver {driver // 1000}.{driver % 1000 // 10}"),
        Check("gpu", OK, f"{dev.name()} (compute capability {major}.{minor}, {dev.total_memory() >> 20} MiB)"),
    ]


def _backend(cfg: AgentConfig) -> list[Check]:
    from agent.engines import select_backend

    try:
        b = select_backend(cfg.backend, cfg.build, cache_dir(cfg))
    except BackendUnavailable as err:
        return [
            Check(
                "backend",
                FAIL,
                f"backend {cfg.backend!r} is not usable: {err}",
                'install what it names, or set backend = "auto"',
            )
        ]
    first = b.precisions()[0]
    ident = ", ".join(f"{k}={v}" for k, v in sorted(b.cache_identity(first).items()) if v)
    return [Check("backend", OK, f"{b.name} {b.version()}, precisions {'/'.join(b.precisions())} ({ident})")]


def _power(_cfg: AgentConfig) -> list[Check]:
    tool = shutil.which("nvpmodel")
    if tool is None:
        return [Check("power", OK if not is_jetson() else WARN, "nvpmodel not found: power mode not readable")]
    try:
        out = subprocess.run([tool, "-q"], check=False, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return [Check("power", WARN, f"nvpmodel -q failed: {err}")]
    mode = " ".join(out.split())
    return [
        Check(
            "power",
            OK,
            f"power mode: {mode}",
            "builds and latency depend on it: `sudo nvpmodel -m 0` for MAXN; `jetson_clocks` pins the clocks",
        )
    ]


# -- the machine ----------------------------------------------------------------------------------
def _memory(cfg: AgentConfig) -> list[Check]:
    avail = available_mb()
    if avail is None:
        return [Check("memory", WARN, "MemAvailable not readable: the build memory guard cannot work")]
    need = cfg.build.min_available_mb
    status = FAIL if avail < need else WARN if avail < 2 * need else OK
    return [
        Check(
            "memory",
            status,
            f"{avail} MiB available (builds are killed below {need} MiB)",
            "stop other memory users, add swap (zram), or lower build.workspace_mb",
        ),
        _peak(cfg, avail),
    ]


# A process with a CUDA context and TensorRT's runtime, on a Jetson: a planning figure until
# scripts/jetson-check measures it on the device (it prints the measured one).
ASSUMED_CUDA_PROCESS_MIB = 300


def _peak(cfg: AgentConfig, avail: int) -> Check:
    """The worst moment: the model in service, the previous one kept for the watch, the candidate
    and its build child (4), or serving_max_processes."""
    n = cfg.serving_max_processes or 4
    peak = n * ASSUMED_CUDA_PROCESS_MIB + cfg.build.workspace_mb
    bound = f"serving_max_processes = {cfg.serving_max_processes}" if cfg.serving_max_processes else "no bound: 4"
    line = (
        f"estimated peak {peak} MiB: {n} CUDA processes ({bound}) x ~{ASSUMED_CUDA_PROCESS_MIB} MiB (assumed; "
        f"scripts/jetson-check measures it) + build.workspace_mb {cfg.build.workspace_mb}"
    )
    status = WARN if is_jetson() and peak > avail else OK
    return Check("memory_peak", status, line, "set serving_max_processes = 3 (or 2), or lower build.workspace_mb")


def _scheduling(cfg: AgentConfig) -> list[Check]:
    """Whether this user may run the serving process SCHED_FIFO as configured (the unit's
    LimitRTPRIO, or root); otherwise it serves at nice -5 and a busy CPU can delay it by a tick."""
    where = f" on CPUs {cfg.serving_cpus}" if cfg.serving_cpus else ""
    if not cfg.serving_rt_priority:
        return [Check("scheduling", OK, f"serving process at nice -5{where} (serving_rt_priority = 0)")]
    if not fifo_allowed(cfg.serving_rt_priority):
        soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
        return [
            Check(
                "scheduling",
                WARN,
                f"SCHED_FIFO {cfg.serving_rt_priority} not allowed here (RLIMIT_RTPRIO {soft}): serving at nice -5",
                "run as the systemd unit (LimitRTPRIO=70), or lower serving_rt_priority",
            )
        ]
    return [Check("scheduling", OK, f"serving process SCHED_FIFO {cfg.serving_rt_priority}{where}")]


def _disk(cfg: AgentConfig) -> list[Check]:
    folder = _existing_parent(cfg.state_dir)
    free = shutil.disk_usage(folder).free >> 20
    need = cfg.disk_reserve_mb
    status = FAIL if free < need else WARN if free < need + 512 else OK
    return [
        Check(
            "disk",
            status,
            f"{free} MiB free on {folder} (disk_reserve_mb = {need})",
            "free space: old engines live in <state_dir>/engines; or lower disk_reserve_mb",
        )
    ]


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _state_dir(cfg: AgentConfig) -> list[Check]:
    d = cfg.state_dir
    probe = d if d.exists() else _existing_parent(d)  # the agent creates a missing state dir
    who = f"user {os.geteuid()}"
    remedy = f"create it and give it to the service user: sudo install -d -o <user> {d}"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".doctor-"):
            pass
    except OSError as err:
        return [Check("state_dir", FAIL, f"{probe} is not writable by {who}: {err.strerror or err}", remedy)]
    if probe != d:
        return [Check("state_dir", OK, f"{d} does not exist yet; {probe} is writable by {who}, the agent creates it")]
    return [Check("state_dir", OK, f"{d} is writable by {who}")]


# -- the network ----------------------------------------------------------------------------------
def _broker(cfg: AgentConfig) -> list[Check]:
    u = urlparse(cfg.mqtt.url)
    port = u.port or (8883 if u.scheme == "mqtts" else 1883)
    err = _tcp(u.hostname or "", port)
    if err:
        return [
            Check(
                "broker",
                FAIL,
                f"{cfg.mqtt.url} is not reachable: {err}",
                "check mqtt.url, the network, and that the broker runs (mosquitto)",
            )
        ]
    return [Check("broker", OK, f"{cfg.mqtt.url} accepts TCP connections")]


def _s3(cfg: AgentConfig) -> list[Check]:
    url = cfg.s3.endpoint_url or f"https://s3.{cfg.s3.region}.amazonaws.com"
    u = urlparse(url)
    err = _tcp(u.hostname or "", u.port or (443 if u.scheme == "https" else 80))
    if err:
        return [Check("s3", FAIL, f"{url} is not reachable: {err}", "check s3.endpoint_url and the network")]
    checks = [Check("s3", OK, f"{url} accepts TCP connections")]
    if cfg.share.enabled:
        checks.append(_share_bucket(cfg))
    return checks


def _share_bucket(cfg: AgentConfig) -> Check:
    from botocore.exceptions import BotoCoreError, ClientError

    from agent.delivery.s3_fetch import s3_client

    s3 = s3_client(cfg.s3.endpoint_url, cfg.s3.region, NET_TIMEOUT_S, NET_TIMEOUT_S)
    try:
        s3.head_bucket(Bucket=cfg.share.bucket)
    except (BotoCoreError, ClientError) as err:
        return Check(
            "share",
            FAIL,
            f"engine bucket {cfg.share.bucket!r}: {err}",
            "check share.bucket and this device's S3 credentials (see docs/engines.md: trust model)",
        )
    trusted = ", ".join(cfg.share.trusted_builders) or "none besides itself"
    return Check("share", OK, f"engine bucket {cfg.share.bucket!r} reachable; trusted builders: {trusted}")


def _tcp(host: str, port: int) -> str | None:
    try:
        with contextlib.closing(socket.create_connection((host, port), NET_TIMEOUT_S)):
            return None
    except OSError as err:
        return err.strerror or str(err)
