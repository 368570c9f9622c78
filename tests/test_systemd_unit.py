"""The unit file, checked by systemd itself: `systemd-analyze verify` and the offline security
exposure score (goal <= 3.5). The ExecStart binary must exist where verify runs, so the check
uses a copy of the unit pointing at this venv's `agent`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.loopback.services import bin_path

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edge-agent.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing (apt-get install systemd)")


def _local_unit(tmp_path: Path) -> Path:
    agent = Path(bin_path("agent")).resolve()
    assert agent.exists(), "install the package first: the unit's ExecStart must exist"
    text = UNIT.read_text().replace("/opt/edge-agent/venv/bin/agent", str(agent))
    out = tmp_path / "edge-agent.service"
    out.write_text(text)
    return out


def test_unit_has_what_the_issue_asks() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StartLimitBurst=",
        "User=edge-agent",
        "SupplementaryGroups=video render",
        "StateDirectory=",
        "RuntimeDirectory=",
        "ConfigurationDirectory=",
        "CacheDirectory=",
        "OOMScoreAdjust=-",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ):
        assert line in text, line
    # Both close the GPU's devices: PrivateDevices hides /dev/nvhost-*; ProtectClock implies a
    # DeviceAllow= (before systemd 253), which denies every device not listed.
    for setting in ("PrivateDevices", "ProtectClock", "DeviceAllow", "DevicePolicy"):
        assert not re.search(rf"^{setting}=", text, re.M), setting
    assert "notify-reload" not in text  # JetPack 6 has systemd 249


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _local_unit(tmp_path)
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "edge-agent.service" not in r.stderr, r.stderr  # no warning about our unit


def test_security_exposure(tmp_path: Path) -> None:
    unit = _local_unit(tmp_path)
    r = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    m = re.search(r"Overall exposure level for edge-agent.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security --offline=true: exposure {exposure}")
    assert exposure <= 3.5


def test_the_test_hooks_cannot_be_enabled_under_the_unit() -> None:
    """EDGE_AGENT_DEBUG_HANG (blocks the coordinator) and EDGE_AGENT_CRASH_AT (kills the daemon at
    a crash point) are removed after any Environment=."""
    from agent.proc.crashpoints import CRASH_ENV
    from agent.system.control import DEBUG_HANG_ENV

    lines = UNIT.read_text().splitlines()
    unset = [line.split("=", 1)[1].split() for line in lines if line.startswith("UnsetEnvironment=")]
    assert [DEBUG_HANG_ENV, CRASH_ENV] in unset


def test_the_socket_group_chown_is_allowed_by_the_system_call_filter() -> None:
    """@privileged includes @chown (systemd's own list, read here), so the socket's group change
    would get EPERM under `SystemCallFilter=~@privileged` alone; an allow line after it removes it."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze missing")
    privileged = subprocess.run([ANALYZE, "syscall-filter", "@privileged"], capture_output=True, text=True, check=True)
    assert "@chown" in privileged.stdout
    lines = UNIT.read_text().splitlines()
    assert lines.index("SystemCallFilter=@chown") > lines.index("SystemCallFilter=~@privileged")
