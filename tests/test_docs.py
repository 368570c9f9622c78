"""Every TOML example in README loads: a user who copies one gets no unknown-key error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import config
from cloud import config as fleet_config

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
MINIMAL = 'channel = "walk"\nstate_dir = "/tmp/s"\nsocket = "/tmp/r/infer.sock"\n'


def test_readme_has_toml_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_toml_example_loads(block: str, tmp_path: Path) -> None:
    p = tmp_path / "example.toml"
    if "[collector]" in block:
        p.write_text(block)
        fleet_config.load(p)
        return
    # A fragment of an agent config: complete it with the required keys the fragment lacks.
    needed = "".join(line + "\n" for line in MINIMAL.splitlines() if line.split(" =")[0] + " =" not in block)
    p.write_text(needed + block)
    config.load(p)


def test_install_template_loads_once_filled_in(tmp_path: Path) -> None:
    """systemd/agent.toml.example, as scripts/install-jetson.sh writes it."""
    template = (Path(__file__).resolve().parents[1] / "systemd" / "agent.toml.example").read_text()
    p = tmp_path / "agent.toml"
    p.write_text(template.replace("@CHANNEL@", "go2-walk").replace("@MQTT_URL@", "mqtts://broker.lab:8883"))
    cfg = config.load(p)
    assert cfg.state_dir == Path("/var/lib/edge-agent") and cfg.socket.name == "infer.sock"
