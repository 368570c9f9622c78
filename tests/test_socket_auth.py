"""Socket authorisation with real users: the sockets are 0660 in the service's group; a member may
ask for status, only root or the admin group may deploy (SO_PEERCRED + SO_PEERGROUPS); anyone
else cannot connect at all. Needs root (to run the clients as other users)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.loopback.service_harness import agent_cli, agent_process, offline_config
from tests.conftest import mlp, wait_for


def _groups_exist(*names: str) -> bool:
    try:
        for n in names:
            grp.getgrnam(n)
    except KeyError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as other users: needs root"),
    pytest.mark.skipif(not _groups_exist("nogroup", "staff"), reason="needs Debian's groups nogroup and staff"),
]

SERVICE_GROUP = "nogroup"  # stands in for edge-agent: members may read status and infer
ADMIN_GROUP = "staff"  # stands in for edge-agent-admin
NOBODY = 65534
STRANGER = 4242  # a uid/gid in no group at all


@pytest.fixture
def public_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svc-auth-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def ask_as(
    uid: int, gid: int, groups: list[int], control: Path, request: dict[str, Any], *, payload: Path | None = None
) -> dict[str, Any]:
    """A real process with these credentials (root drops them after importing: the interpreter
    lives under /root here) talking to the control socket."""
    script = (
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "from agent.system.control import call\n"
        "from agent.errors import AgentError\n"
        f"os.setgroups({groups!r}); os.setgid({gid}); os.setuid({uid})\n"
        "try:\n"
        f"    payload = {str(payload) if payload else None!r}\n"
        f"    reply = call(Path({str(control)!r}), json.loads(sys.argv[1]), payload and Path(payload))\n"
        "except AgentError as err:\n"
        "    reply = {'ok': False, 'error': str(err), 'exception': type(err).__name__}\n"
        "print(json.dumps(reply))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(request)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


@pytest.mark.integration
def test_status_for_the_group_deploy_for_admins(tmp_path: Path, public_dir: Path) -> None:
    service_gid, admin_gid = grp.getgrnam(SERVICE_GROUP).gr_gid, grp.getgrnam(ADMIN_GROUP).gr_gid
    (public_dir / "run").mkdir(mode=0o755)
    cfg = offline_config(
        tmp_path,
        extra=f'socket = "{public_dir}/run/infer.sock"\n'
        f'[security]\nsocket_group = "{SERVICE_GROUP}"\n'
        f'admin_group = "{ADMIN_GROUP}"\n',
    )
    cfg.write_text(cfg.read_text().replace(f'socket = "{tmp_path}/run/infer.sock"\n', ""))
    model = mlp(public_dir / "policy.onnx")
    model.chmod(0o644)
    control = public_dir / "run" / "control.sock"
    deploy = {"cmd": "deploy", "version": "by-admin", "size": model.stat().st_size}

    with agent_process(cfg, {}):
        wait_for(lambda: control.exists() and control.stat().st_gid == service_gid, 20, "control socket")
        for sock in (control, public_dir / "run" / "infer.sock"):
            st = sock.stat()
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == service_gid

        member = ask_as(NOBODY, service_gid, [], control, {"cmd": "status"})
        assert member["ok"] and member["status"]["state"] == "running"

        denied = ask_as(NOBODY, service_gid, [], control, deploy, payload=model)
        assert not denied["ok"] and denied.get("denied")
        assert f"'deploy' needs root or membership of the group '{ADMIN_GROUP}'" in denied["error"]

        admin = ask_as(NOBODY, service_gid, [admin_gid], control, deploy, payload=model)
        assert admin["ok"] and admin["version"] == "by-admin", admin

        stranger = ask_as(STRANGER, STRANGER, [], control, {"cmd": "status"})
        assert stranger["exception"] == "DaemonNotRunning" and "no permission" in stranger["error"]

        def active() -> bool:
            s = agent_cli(cfg, "status", "--json")
            return '"version": "by-admin"' in s.stdout and '"source": "local"' in s.stdout

        wait_for(active, 30, "the admin's deploy active, recorded source=local")
