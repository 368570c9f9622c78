"""Runs one engine build in a child process behind a handle: time limit, memory guard,
cancellation, progress. Serving never shares a process with a build.

The child is started fresh with multiprocessing's `spawn` (a new interpreter), never `fork`: a forked
child of a process that holds threads or a CUDA context cannot use CUDA and can deadlock. The
memory guard watches MemAvailable from the parent and kills the child (RLIMIT_AS would break CUDA,
which reserves a huge virtual address space); the child also asks the kernel's OOM killer to pick it
first (oom_score_adj 1000)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.config import BuildConfig
from agent.engines import Backend
from agent.errors import BuildFailed, Cancelled, DiskFull
from agent.proc import durable
from agent.proc.child import available_mb, die_with_parent, exit_reason
from agent.proc.sched import start_in_background

log = logging.getLogger(__name__)

_MP = multiprocessing.get_context("spawn")
START_METHOD = _MP.get_start_method()
POLL_S = 0.1
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
BUILD_PROCESS_NAME = "edge-build"
# Set by a parent before a build; a child started fresh sees the default. Tests use it to prove it.
INHERITED_MARK = "fresh"


# -- what the build child sends --------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    mark: str  # the child's INHERITED_MARK: "fresh" unless it inherited our memory


@dataclass(frozen=True)
class Stage:
    name: str
    fraction: float | None


@dataclass(frozen=True)
class Failure:
    reason: str
    no_space: bool = False  # the engine did not fit on the disk


@dataclass(frozen=True)
class Done:
    pass


ChildMessage = Started | Stage | Failure | Done


@dataclass
class BuildInfo:
    """What `agent status` shows of a running build."""

    pid: int
    stage: str
    fraction: float | None
    started: float
    child_mark: str = ""  # the child's INHERITED_MARK: "fresh" unless it inherited our memory
    no_space: bool = False  # the child failed for want of disk space

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "stage": self.stage,
            "percent": None if self.fraction is None else round(100 * self.fraction, 1),
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


OnProgress = Callable[[BuildInfo], None]


def run_build(
    backend: Backend,
    onnx_path: Path,
    engine_path: Path,
    cfg: BuildConfig,
    *,
    precision: str,
    cancelled: Callable[[], str | None],
    on_progress: OnProgress,
) -> float:
    """Build in a fresh child; returns the seconds it took. Raises BuildFailed or Cancelled."""
    recv, send = _MP.Pipe(duplex=False)
    proc = _MP.Process(
        target=_child,
        args=(backend, str(onnx_path), str(engine_path), precision, send),
        name="engine-build",
        daemon=True,
    )
    started = time.monotonic()
    start_in_background(proc)
    send.close()
    assert proc.pid is not None
    info = BuildInfo(proc.pid, "starting", None, started)
    on_progress(info)
    try:
        error = _watch(proc, recv, cfg, info, cancelled=cancelled, on_progress=on_progress)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        recv.close()
        _remove_parts(engine_path)
    if error is None and not engine_path.exists():
        error = "the build child exited without writing the engine"
    if error is not None:
        engine_path.unlink(missing_ok=True)
        if info.no_space or _short_of_space(engine_path.parent, onnx_path):
            raise DiskFull(f"no space left for the engine in {engine_path.parent}: {error}")
        raise BuildFailed(error)
    return time.monotonic() - started


def _short_of_space(folder: Path, onnx_path: Path) -> bool:
    """A failed build with less room left than the model takes is put down to the disk: ONNX
    Runtime reports ENOSPC as "Protobuf serialization failed", and an engine is about its model's
    size (or more) with either backend."""
    try:
        return shutil.disk_usage(folder).free < onnx_path.stat().st_size
    except OSError:
        return False


def _remove_parts(engine_path: Path) -> None:
    """What a killed child was writing (agent.engines.tensorrt names its own `.<key>.<pid>.<id>.part`)."""
    engine_path.with_name(engine_path.name + ".part").unlink(missing_ok=True)
    prefix = f".{engine_path.name}."  # a prefix test, not a glob: each glob pattern is compiled and cached
    for part in engine_path.parent.iterdir():
        if part.name.startswith(prefix) and part.name.endswith(".part"):
            part.unlink(missing_ok=True)


def _watch(
    proc: Any,
    recv: Connection,
    cfg: BuildConfig,
    info: BuildInfo,
    *,
    cancelled: Callable[[], str | None],
    on_progress: OnProgress,
) -> str | None:
    """Poll the child until it ends; returns the failure reason, or None on success."""
    error: str | None = None
    done, pipe_open = False, True
    while True:
        if not pipe_open:  # the child closed its end (it exited, or was killed): reap it
            proc.join(POLL_S)
            if not proc.is_alive():
                break
        elif recv.poll(POLL_S):
            try:
                error, done = _handle(recv.recv(), info, on_progress, error, done)
            except (EOFError, OSError):
                pipe_open = False
        limit = None if done else _over_limit(cfg, info, cancelled)
        if limit is not None:
            _kill(proc)
            return limit
    if error is not None:
        return error
    return None if done and proc.exitcode == 0 else exit_reason(int(proc.exitcode), "the build process")


def _over_limit(cfg: BuildConfig, info: BuildInfo, cancelled: Callable[[], str | None]) -> str | None:
    """Why the build must stop now (raises Cancelled for a cancellation), or None."""
    why = cancelled()
    if why:
        raise Cancelled(why)
    if time.monotonic() > info.started + cfg.time_limit_s:
        return f"the build exceeded its time limit of {cfg.time_limit_s:g} s (build.time_limit_s)"
    avail = available_mb()
    if avail is not None and avail < cfg.min_available_mb:
        return (
            f"killed by the memory guard: {avail} MiB available, below build.min_available_mb "
            f"({cfg.min_available_mb} MiB)"
        )
    return None


def _handle(
    msg: ChildMessage, info: BuildInfo, on_progress: OnProgress, error: str | None, done: bool
) -> tuple[str | None, bool]:
    match msg:
        case Started():
            info.child_mark = msg.mark
        case Stage():
            info.stage, info.fraction = msg.name, msg.fraction
            on_progress(info)
        case Failure():
            error, info.no_space = msg.reason, msg.no_space
        case Done():
            done = True
    return error, done


def _kill(proc: Any) -> None:
    proc.kill()
    proc.join(10)


def _child(backend: Backend, onnx_path: str, engine_path: str, precision: str, conn: Connection) -> None:
    """The build child's main: never returns an exception silently."""
    die_with_parent(BUILD_PROCESS_NAME)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # the OOM killer's first choice, not the daemon
    except OSError:
        pass
    conn.send(Started(INHERITED_MARK))

    lock = threading.Lock()  # TensorRT calls its progress monitor from several threads

    def progress(stage: str, fraction: float | None) -> None:
        with lock:
            conn.send(Stage(stage, fraction))

    try:
        backend.build(Path(onnx_path), Path(engine_path), precision, progress)
    except BaseException as err:  # everything goes back as the reason, then a non-zero exit
        conn.send(Failure(str(err) or type(err).__name__, no_space=durable.no_space(err)))
        conn.close()
        os._exit(1)
    conn.send(Done())
    conn.close()
