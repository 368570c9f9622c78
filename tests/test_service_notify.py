"""The sd_notify protocol, for real: a NOTIFY_SOCKET datagram socket, `agent run` with
WATCHDOG_USEC, and every message systemd would see, through systemd-python and without it."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.system.control import call
from scripts.loopback.service_harness import NotifySocket, agent_process, offline_config

WATCHDOG_USEC = 1_000_000  # systemd would then expect a ping at least every second; we send every 0.5 s


def _has_systemd_python() -> bool:
    try:
        from systemd import daemon  # noqa: F401
    except ImportError:
        return False
    return True


PATHS = [
    pytest.param(
        {},
        "file",
        id="systemd-python",
        marks=pytest.mark.skipif(
            not _has_systemd_python(), reason="systemd-python is not installed (apt libsystemd-dev pkg-config)"
        ),
    ),
    pytest.param({"EDGE_AGENT_NOTIFY_FALLBACK": "1"}, "file", id="socket-fallback"),
    pytest.param({"EDGE_AGENT_NOTIFY_FALLBACK": "1"}, "abstract", id="socket-fallback-abstract"),
]


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nsock") as d:  # short: AF_UNIX paths are <= 107 bytes
        yield Path(d)


@pytest.mark.integration
@pytest.mark.parametrize(("env", "kind"), PATHS)
def test_ready_status_watchdog_reload_stopping(
    tmp_path: Path, notify_dir: Path, env: dict[str, str], kind: str
) -> None:
    ns = NotifySocket(notify_dir / "notify" if kind == "file" else None)
    cfg = offline_config(tmp_path)
    try:
        env = {**env, "NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with agent_process(cfg, env) as proc:
            ready = ns.wait_for("READY")
            # READY came although neither the broker nor S3 is reachable, with a status line.
            assert "no active model" in ready["STATUS"] and "broker offline" in ready["STATUS"]
            assert call(cfg.parent / "run" / "control.sock", {"cmd": "status"})["ok"]

            pings = [m for m in ns.collect(2.5) if m.get("WATCHDOG") == "1"]
            print(f"{len(pings)} WATCHDOG=1 pings in 2.5 s with WATCHDOG_USEC={WATCHDOG_USEC}")
            assert len(pings) >= 3

            proc.send_signal(signal.SIGHUP)
            reloading = ns.wait_for("RELOADING")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            again = ns.wait_for("READY")
            assert "config reload failed" not in again["STATUS"]

            proc.send_signal(signal.SIGTERM)
            ns.wait_for("STOPPING")
            assert proc.wait(15) == 0
        log = (cfg.parent / "agent.log").read_text()
        via = "systemd-python" if "EDGE_AGENT_NOTIFY_FALLBACK" not in env else "socket"
        assert f"notified systemd via {via}" in log
    finally:
        ns.close()


class _Served:
    def __init__(self) -> None:
        self.calls = 0
        self.errors: list[str] = []


@contextmanager
def _serving_during(cfg: Path) -> Iterator[_Served]:
    """Deploy a model through the drop folder, then run inferences on one connection until the
    block ends (errors after the agent is stopped are expected: read them before)."""
    import threading

    import numpy as np

    from agent.client import Policy
    from tests.conftest import mlp, wait_for

    served = _Served()
    inbox = cfg.parent / "state" / "inbox"
    wait_for(inbox.is_dir, 20, "the inbox")
    model = mlp(cfg.parent / "m.onnx")
    model.rename(inbox / "served.onnx")
    control = cfg.parent / "run" / "control.sock"
    wait_for(control.exists, 20, "the control socket")
    wait_for(
        lambda: (call(control, {"cmd": "status"})["status"]["active"] or {}).get("version") == "served",
        30,
        "the model active",
    )
    stop = threading.Event()
    policy = Policy(cfg.parent / "run" / "infer.sock")
    x = np.zeros((1, 48), np.float32)
    policy(x)
    first = policy._sock

    def loop() -> None:
        while not stop.is_set():
            try:
                policy(x)
                if policy._sock is not first:
                    served.errors.append("reconnected")
                served.calls += 1
            except Exception as err:
                served.errors.append(repr(err))
                return

    t = threading.Thread(target=loop, name="controller")
    t.start()
    try:
        yield served
    finally:
        stop.set()
        t.join(5)
        policy.close()


@pytest.mark.integration
def test_invalid_config_reload_keeps_the_old_one(tmp_path: Path, notify_dir: Path) -> None:
    ns = NotifySocket(notify_dir / "notify")
    cfg = offline_config(tmp_path)
    good = cfg.read_text()
    try:
        env = {"NOTIFY_SOCKET": ns.address, "EDGE_AGENT_NOTIFY_FALLBACK": "1"}
        with agent_process(cfg, env) as proc, _serving_during(cfg) as served:
            ns.wait_for("READY")
            cfg.write_text("bogus_key = 1\n" + good)  # the file watch reloads, like SIGHUP
            ns.wait_for("RELOADING")
            failed = ns.wait_for("READY")
            assert "config reload failed, keeping the running config: unknown key 'bogus_key'" in failed["STATUS"]
            status = call(cfg.parent / "run" / "control.sock", {"cmd": "status"})
            assert status["ok"] and status["status"]["state"] == "running"

            cfg.write_text(good.replace('backend = "onnxruntime"', 'backend = "onnxruntime"\nlog_level = "debug"'))
            ns.wait_for("RELOADING")
            ok = ns.wait_for("READY")
            assert "config reload failed" not in ok["STATUS"]
            calls_before_stop, errors_before_stop = served.calls, list(served.errors)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        log = (cfg.parent / "agent.log").read_text()
        assert "config reloaded: log_level" in log
        # The controller's connection saw both reloads without an error or a reconnect.
        print(f"{calls_before_stop} inferences on one connection across two reloads")
        assert calls_before_stop > 0 and errors_before_stop == []
    finally:
        ns.close()


@pytest.mark.integration
def test_hung_coordinator_stops_the_watchdog(tmp_path: Path, notify_dir: Path) -> None:
    """`debug-hang` (enabled only by EDGE_AGENT_DEBUG_HANG=1) blocks the coordinator thread in a
    sleep: the pings must stop, while the other threads (control, serving) still run."""
    ns = NotifySocket(notify_dir / "notify")
    cfg = offline_config(tmp_path)
    try:
        env = {
            "NOTIFY_SOCKET": ns.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "EDGE_AGENT_NOTIFY_FALLBACK": "1",
            "EDGE_AGENT_DEBUG_HANG": "1",
        }
        with agent_process(cfg, env) as proc:
            ns.wait_for("READY")
            assert len([m for m in ns.collect(1.5) if m.get("WATCHDOG") == "1"]) >= 2
            reply = call(cfg.parent / "run" / "control.sock", {"cmd": "debug-hang", "seconds": 60})
            assert reply == {"ok": True}
            ns.collect(0.6)  # at most one ping already on its way
            quiet = ns.collect(3.0)
            assert [m for m in quiet if m.get("WATCHDOG") == "1"] == []
            assert proc.poll() is None  # alive but hung: exactly the case systemd must restart
            proc.kill()
            proc.wait(5)
    finally:
        ns.close()


def test_outside_systemd_nothing_is_sent(tmp_path: Path) -> None:
    from agent.system.notify import Notifier

    n = Notifier({})
    assert not n.enabled and n.interval is None
    n.ready("x")
    n.tick(lambda: json.dumps({}))  # no socket, no error


def test_watchdog_pid_for_another_process_is_ignored() -> None:
    from agent.system.notify import watchdog_interval

    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    time.sleep(0)


@pytest.mark.integration
def test_logs_to_journald_stream_with_priorities(tmp_path: Path) -> None:
    """Under systemd, stderr is journald's stream (JOURNAL_STREAM names it): without
    systemd-python the agent writes `<N>` priority prefixes, which journald turns into levels."""
    import os

    cfg = offline_config(tmp_path)
    log = cfg.parent / "agent.log"
    log.touch()
    st = os.stat(log)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "EDGE_AGENT_NOTIFY_FALLBACK": "1"}
    with agent_process(cfg, env) as proc:
        from tests.conftest import wait_for

        wait_for(lambda: "serving on" in log.read_text(), 20, "the agent serving")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("<6>agent.coordinator.daemon: agent ") for line in lines), lines[:5]
    assert all(line.startswith("<") for line in lines if line), lines


def test_journal_handler_with_systemd_python() -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    from agent.proc.logsetup import journal_handler

    handler = journal_handler()
    assert handler is not None and type(handler).__name__ == "JournalHandler"
