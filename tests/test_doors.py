"""Every door answers in one line: a bad name is refused where it enters, with the rule, before
anything is uploaded, announced, written or activated; an unreachable or refusing service is one
line with a documented exit code, never a traceback. Against a real mosquitto and moto's S3
server; unreachable services are closed loopback ports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.contract.cli_errors import EXIT_UNREACHABLE, EXIT_USAGE
from agent.contract.protocol import NAME_RULE, Announcement, Manifest, Topics, encode
from agent.system.control import call
from cloud import config as fleet_config
from cloud.publish import send_retained
from scripts.loopback.services import bin_path, free_port, s3_env, write_fleet_config
from tests.conftest import Fleet, mlp, wait_for

BAD_NAMES = ["../../../tmp/evil", "a/b", "..", ".", "v" * 300, "v 1; rm -rf", "v1\nv2", "a/#", "-rf", ""]


def one_line_refusal(r: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    """The documented exit code, one line on stderr with `words`, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def fleet_cmd(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_path("fleet"), "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        env=env or {**os.environ, **s3_env()},
        timeout=120,
    )


def bucket_keys(fleet: Fleet) -> list[str]:
    listed = fleet.s3.client().list_objects_v2(Bucket=fleet.bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
@pytest.mark.parametrize("option", ["--version", "--channel"])
def test_publish_refuses_a_bad_name_before_uploading_anything(
    fleet: Fleet, tmp_path: Path, option: str, name: str
) -> None:
    model = mlp(tmp_path / "m.onnx")
    other = "--channel" if option == "--version" else "--version"
    r = fleet_cmd(fleet.fleet_cfg, "publish", str(model), other, "ok", f"{option}={name}")
    one_line_refusal(r, EXIT_USAGE, "is not a valid name" if name else "not a valid name")
    assert NAME_RULE in r.stderr
    assert bucket_keys(fleet) == []  # nothing uploaded, no manifest, no announcement record


def test_rollback_refuses_a_bad_name(fleet: Fleet) -> None:
    r = fleet_cmd(fleet.fleet_cfg, "rollback", "--channel", fleet.channel, "--to", "../../x")
    one_line_refusal(r, EXIT_USAGE, "is not a valid name")


def test_publish_with_the_s3_endpoint_down_is_one_line(fleet: Fleet, tmp_path: Path) -> None:
    cfg = write_fleet_config(
        tmp_path / "fleet.toml",
        broker=fleet.broker.url,
        s3=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        bucket=fleet.bucket,
        prefix=fleet.prefix,
        db=tmp_path / "fleet.db",
        client_id="c",
    )
    env = {**os.environ, **s3_env(), "AWS_MAX_ATTEMPTS": "1"}
    r = fleet_cmd(cfg, "publish", str(mlp(tmp_path / "m.onnx")), "--channel", "c", "--version", "v1", env=env)
    one_line_refusal(r, EXIT_UNREACHABLE, "the S3 endpoint does not answer")
    assert "s3.endpoint_url" in r.stderr


def test_publish_without_credentials_is_one_line(fleet: Fleet, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    r = fleet_cmd(
        fleet.fleet_cfg, "publish", str(mlp(tmp_path / "m.onnx")), "--channel", "c", "--version", "v1", env=env
    )
    one_line_refusal(r, EXIT_UNREACHABLE, "no S3 credentials")


def test_publish_with_the_broker_down_is_one_line(fleet: Fleet, tmp_path: Path) -> None:
    cfg = write_fleet_config(
        tmp_path / "fleet.toml",
        broker=f"mqtt://127.0.0.1:{free_port()}",
        s3=fleet.s3.url,
        bucket=fleet.bucket,
        prefix=fleet.prefix,
        db=tmp_path / "fleet.db",
        client_id="c",
    )
    r = fleet_cmd(cfg, "publish", str(mlp(tmp_path / "m.onnx")), "--channel", "c", "--version", "v1")
    one_line_refusal(r, EXIT_UNREACHABLE, "cannot reach the broker")


def test_publish_to_a_missing_bucket_is_one_line(fleet: Fleet, tmp_path: Path) -> None:
    cfg = write_fleet_config(
        tmp_path / "fleet.toml",
        broker=fleet.broker.url,
        s3=fleet.s3.url,
        bucket="no-such-bucket-here",
        prefix=fleet.prefix,
        db=tmp_path / "fleet.db",
        client_id="c",
    )
    r = fleet_cmd(cfg, "publish", str(mlp(tmp_path / "m.onnx")), "--channel", "c", "--version", "v1")
    one_line_refusal(r, EXIT_UNREACHABLE, "no-such-bucket-here")


def test_config_mistakes_are_one_line(tmp_path: Path) -> None:
    for args, words in (
        (["--config", str(tmp_path / "missing.toml"), "status"], "config file not found"),
        (["--config", str(tmp_path), "status"], "cannot read the config file"),
    ):
        r = subprocess.run([bin_path("fleet"), *args], capture_output=True, text=True, timeout=60)
        one_line_refusal(r, EXIT_USAGE, words)
        r = subprocess.run([bin_path("agent"), *args], capture_output=True, text=True, timeout=60)
        one_line_refusal(r, EXIT_USAGE, words)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [bin_path("fleet"), "status", "--config", str(tmp_path / "missing.toml"), "--debug"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_the_agent_refuses_bad_labels_at_every_door(fleet: Fleet, tmp_path: Path) -> None:
    """`agent deploy --version $'v1\\nv2'`, the same over the control socket, an announcement and a
    drop-folder sidecar with bad names: refused, nothing activated, the active model serves on."""
    fleet.start_collector()
    cfg = fleet.agent_config("go2-doors")
    fleet.start_agent(cfg)
    v1 = fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    model = mlp(tmp_path / "v2.onnx", seed=2)

    r = subprocess.run(
        [bin_path("agent"), "--config", str(cfg), "deploy", str(model), "--version", "v1\nv2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_refusal(r, EXIT_USAGE, "is not a valid name")

    reply = call(cfg.parent / "run" / "control.sock", {"cmd": "deploy", "version": "v1\nv2", "size": 0})
    assert not reply["ok"] and "is not a valid name" in reply["error"]
    reply = call(cfg.parent / "run" / "control.sock", {"cmd": "pin", "version": "../../v1"})
    assert not reply["ok"] and "is not a valid name" in reply["error"]

    topic = Topics(fleet.prefix).announce(fleet.channel)
    base: dict[str, Any] = v1["manifest"]
    for field, manifest, channel in (
        ("version", {**base, "version": "../../evil"}, fleet.channel),
        ("channel", base, "walk/#"),
    ):
        raw = Announcement(fleet.channel, v1["sequence"] + 10, 0.0, Manifest.from_json(base)).to_json()
        raw["manifest"], raw["channel"] = manifest, channel
        before = fleet.status(cfg)["ignored_payloads"]
        send_retained(fleet_config.load(fleet.fleet_cfg), topic, encode(raw))
        wait_for(lambda b=before: fleet.status(cfg)["ignored_payloads"] > b, 20, f"bad {field} ignored")
        assert "is not a valid name" in fleet.status(cfg)["last_ignored_payload"]

    inbox = cfg.parent / "state" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "drop.json").write_text(json.dumps({"version": "../up"}))
    (inbox / "drop.onnx").write_bytes(model.read_bytes())
    reason = fleet.wait_rejected(cfg, "drop")
    assert "version '../up' is not a valid name" in reason

    s = fleet.status(cfg)
    assert s["active"]["version"] == "v1" and s["pending"] is None
    history = json.loads(fleet.agent(cfg, "models", "--json").stdout)
    assert all("/" not in r["version"] and "\n" not in r["version"] for r in history)


def test_readme_lists_the_exit_codes_and_the_naming_rule() -> None:
    from agent.contract import cli_errors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = {int(m) for m in re.findall(r"^\| (\d+) \|", readme, flags=re.M)}
    codes = {0} | {v for k, v in vars(cli_errors).items() if k.startswith("EXIT_")}
    assert listed == codes
    assert "1 to 64 characters, letters,\ndigits, `.`, `_` and `-`, starting with a letter or a digit" in readme
