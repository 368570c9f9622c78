"""How much CPU each of the agent's processes gets, and where.

serving process   SCHED_FIFO at `serving_rt_priority` (below the Go2 controller's 80) where the
                  unit's LimitRTPRIO allows it, else nice -5; on `serving_cpus` when set
the daemon        the unit's Nice=-5; off the serving CPUs
background        downloads, ONNX checks, builds, a model loading or standing by: SCHED_BATCH at
                  nice 10 beside a SCHED_FIFO serving process, SCHED_IDLE beside a nice -5 one

Why the background class depends on the serving one: a fair-class serving process woken behind
fair-class work can wait a whole scheduler tick on a kernel without full preemption, and only
SCHED_IDLE work yields to it at once. But SCHED_IDLE can starve on a CPU that other work keeps
busy. A SCHED_FIFO serving process preempts every fair-class task anyway, so there the background
runs SCHED_BATCH at nice 10: it still gives way, and it finishes. The measurements behind this are
in docs/benchmarks.md ("Measurements behind the design")."""

from __future__ import annotations

import logging
import os
import resource
from typing import Any

log = logging.getLogger(__name__)

SERVING_NICE = -5
BACKGROUND_NICE = 10


class _Background:
    policy = os.SCHED_IDLE  # until the daemon knows its serving class (choose_background)


def fifo_allowed(priority: int) -> bool:
    """Whether this process may use SCHED_FIFO at `priority` (root, or RLIMIT_RTPRIO: the unit's
    LimitRTPRIO)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= priority


def choose_background(serving_rt_priority: int) -> str:
    """Pick the background class for this daemon's children (see the module's docstring); its name."""
    fifo = serving_rt_priority > 0 and fifo_allowed(serving_rt_priority)
    _Background.policy = os.SCHED_BATCH if fifo else os.SCHED_IDLE
    return background_name()


def background_name() -> str:
    return f"SCHED_BATCH nice {BACKGROUND_NICE}" if _Background.policy == os.SCHED_BATCH else "SCHED_IDLE"


def start_in_background(proc: Any) -> None:
    """Start a child process (multiprocessing, `spawn`) and move it to the background at once: the
    new interpreter is still starting, so every thread it creates inherits the class."""
    proc.start()
    to_background(proc.pid)


def to_background(tid: int) -> None:
    """The background class for a thread (a process's main thread: its pid)."""
    try:
        os.sched_setscheduler(tid, _Background.policy, os.sched_param(0))
    except OSError as err:
        log.debug("no %s for %d (%s)", background_name(), tid, err)
    renice(tid, BACKGROUND_NICE)


def to_serving(pid: int, rt_priority: int, cpus: set[int] | None) -> None:
    """Raise a serving process before it takes the clients: SCHED_FIFO when allowed, else nice -5,
    on the reserved CPUs if any. Its serving thread is its main thread (tid = pid); threads the
    runtime started while loading stay in the background."""
    if cpus:
        pin(pid, cpus)
    if rt_priority:
        try:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(rt_priority))
            return
        except OSError as err:  # allowed by the limit, refused anyway (a cgroup without an RT budget)
            log.info("serving process %d cannot run SCHED_FIFO %d (%s): nice %d", pid, rt_priority, err, SERVING_NICE)
            _Background.policy = os.SCHED_IDLE  # what yields at once to a fair-class serving process
    _fair(pid, SERVING_NICE)


def to_foreground(pid: int) -> None:
    """The daemon's own class and nice for a process (a candidate while the gate times it)."""
    _fair(pid, os.getpriority(os.PRIO_PROCESS, 0))


def _fair(pid: int, nice: int) -> None:
    """Out of the background class (needs the unit's LimitNICE, or CAP_SYS_NICE), at `nice`."""
    try:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except OSError as err:
        log.warning("%d stays in the background class (%s)", pid, err)
    renice(pid, nice)


def describe(pid: int) -> str:
    """The scheduling the kernel reports for a process, e.g. "SCHED_FIFO 70" or "nice -5"."""
    policy = os.sched_getscheduler(pid)
    if policy == os.SCHED_FIFO:
        return f"SCHED_FIFO {os.sched_getparam(pid).sched_priority}"
    names = {os.SCHED_BATCH: "SCHED_BATCH ", os.SCHED_IDLE: "SCHED_IDLE "}
    return f"{names.get(policy, '')}nice {os.getpriority(os.PRIO_PROCESS, pid)}"


def renice(tid: int, nice: int) -> None:
    """Set a thread's nice value; lowering it needs CAP_SYS_NICE or the unit's LimitNICE."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as err:
        log.info("%d keeps its CPU priority (%s)", tid, err)


def pin(tid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as err:
        log.warning("cannot pin %d to CPUs %s: %s", tid, sorted(cpus), err)


def pin_process(cpus: set[int]) -> None:
    """Every thread of this process (new threads and children inherit it from their creator)."""
    for tid in os.listdir("/proc/self/task"):
        pin(int(tid), cpus)
