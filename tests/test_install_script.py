"""scripts/install-jetson.sh under ROOT= (no apt, users or systemctl): the tree it makes, and that
a second run changes nothing the operator owns."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from agent.config import load

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-jetson.sh"


def _install(root: Path, *args: str) -> str:
    r = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "ROOT": str(root)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_install_is_idempotent(tmp_path: Path) -> None:
    out = _install(tmp_path, "--channel", "trot", "--mqtt", "mqtts://broker.lab:8883")
    conf = tmp_path / "etc/edge-agent/agent.toml"
    assert "wrote" in out and conf.exists()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "var/lib/edge-agent/inbox").stat().st_mode) == 0o2770
    assert (tmp_path / "opt/edge-agent/venv/bin/python").exists()
    venv_cfg = (tmp_path / "opt/edge-agent/venv/pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in venv_cfg  # JetPack's tensorrt bindings
    unit = (tmp_path / "etc/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/opt/edge-agent/venv/bin/agent --config /etc/edge-agent/agent.toml run" in unit
    for doc in (line.split("=", 1)[1].split() for line in unit.splitlines() if line.startswith("Documentation=")):
        for url in doc:  # what the unit's Documentation= names was installed
            assert (tmp_path / url.removeprefix("file:///")).is_file(), url

    text = conf.read_text()
    assert 'channel = "trot"' in text and 'url = "mqtts://broker.lab:8883"' in text
    cfg = load(conf)  # the template is a valid config
    assert cfg.channel == "trot" and cfg.inbox.path == Path("/var/lib/edge-agent/inbox")

    conf.write_text(text.replace('"trot"', '"walk"'))  # the operator edits it
    out = _install(tmp_path, "--channel", "trot")
    assert "keeping" in out and 'channel = "walk"' in conf.read_text()


def test_the_jetson_install_builds_pycuda_and_keeps_onnx_runtime() -> None:
    """pycuda has no aarch64 wheel: it builds with nvcc, which sudo's secure_path drops (CUDA_ROOT
    and PATH are exported before pip); ONNX Runtime (the cpu extra) is installed too, so the agent
    serves when TensorRT, pycuda or the GPU is unusable, and jetson-check has its reference."""
    text = SCRIPT.read_text()
    assert "EXTRAS=${EXTRAS:-cpu,jetson,systemd}" in text
    assert "build-essential" in text and "python3-dev" in text
    export = text.index('export CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"')
    assert export < text.index('pip install -q --disable-pip-version-check --upgrade "$SRC[$EXTRAS]"')
    docker = (SCRIPT.parents[1] / "Dockerfile.jetson").read_text()
    assert "pkg-config libsystemd-dev" in docker and "import tensorrt, pycuda;" in docker  # no libcuda at build
