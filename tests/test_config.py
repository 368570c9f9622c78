from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from cloud import config as fleet_config

MINIMAL = 'channel = "walk"\nstate_dir = "/tmp/s"\nsocket = "/tmp/r/infer.sock"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.device_id  # serial number or hostname
    assert cfg.control_path == Path("/tmp/r/control.sock")
    assert cfg.backend == "auto" and cfg.telemetry.interval_s == 10.0 and cfg.mqtt.url.startswith("mqtt://")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + "colour = 1\n", "'colour'"),
        (MINIMAL + "[mqtt]\nurll = 'x'\n", "'mqtt.urll'"),
        (MINIMAL + 'backend = "cuda"\n', "backend"),
        (MINIMAL + "disk_reserve_mb = 'lots'\n", "disk_reserve_mb"),
        (MINIMAL + "[telemetry]\ninterval_s = 0\n", "telemetry.interval_s"),
        (MINIMAL + '[mqtt]\nurl = "http://broker"\n', "mqtt.url"),
        (MINIMAL + '[mqtt]\ncert_file = "/c.pem"\n', "mqtt.cert_file"),
        ('state_dir = "/s"\nsocket = "/r.sock"\n', "channel"),
        (MINIMAL.replace('"walk"', '"a/b"'), "channel"),
        ("channel = [", "not valid TOML"),
        (MINIMAL + "serving_cpus = [4096]\n", "serving_cpus"),
        (MINIMAL + "serving_rt_priority = 100\n", "serving_rt_priority"),
        (MINIMAL + "[s3]\nmax_download_mbps = -1\n", "s3.max_download_mbps"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        config.load(write(tmp_path, text))


def test_device_id_from_config_wins(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL + 'device_id = "go2-07"\n')).device_id == "go2-07"


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    assert config.config_path(None) == Path("/etc/edge-agent/agent.toml")
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "/x.toml")
    assert config.config_path(None) == Path("/x.toml")
    assert config.config_path("/y.toml") == Path("/y.toml")


def test_fleet_config_requires_bucket(tmp_path: Path) -> None:
    p = tmp_path / "fleet.toml"
    p.write_text('[s3]\nendpoint_url = "http://127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="s3.bucket"):
        fleet_config.load(p)
    p.write_text('[s3]\nbucket = "models"\n[collector]\ndb = "/tmp/f.db"\n')
    assert fleet_config.load(p).collector.database == Path("/tmp/f.db")
    p.write_text('[s3]\nbucket = "models"\n[collector]\ndb = "postgresql://fleet@db.lab:5432/fleet"\n')
    assert fleet_config.load(p).collector.database == "postgresql://fleet@db.lab:5432/fleet"


def test_cli_reports_config_errors_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    assert main(["--config", str(write(tmp_path, MINIMAL + "bogus = 1\n")), "status"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "X", "status", "--json"],
        ["status", "--config", "X", "--json"],
        ["status", "--json", "--config", "X"],
    ],
)
def test_agent_takes_global_options_before_and_after_the_subcommand(argv: list[str]) -> None:
    from agent.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.config, args.json) == ("X", True)


def test_global_options_reach_nested_subcommands_and_default_to_none() -> None:
    from agent.cli import _parser
    from cloud.cli import _parser as fleet_parser

    assert _parser().parse_args(["go2", "status", "--config", "G"]).config == "G"
    assert _parser().parse_args(["--config", "G", "go2", "status"]).config == "G"
    assert _parser().parse_args(["run"]).config is None
    assert fleet_parser().parse_args(["status", "--config", "F"]).config == "F"
    assert fleet_parser().parse_args(["--config", "F", "events", "--json"]).config == "F"
    assert fleet_parser().parse_args(["collect"]).config is None


def test_agent_run_config_after_the_subcommand_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`agent status --config X` talks to the daemon X configures (here: none is running)."""
    from agent.cli import main

    cfg = write(tmp_path, MINIMAL.replace("/tmp/r/", f"{tmp_path}/r/").replace("/tmp/s", f"{tmp_path}/s"))
    assert main(["status", "--config", str(cfg)]) == 3
    assert f"{tmp_path}/r/control.sock" in capsys.readouterr().out
