"""`agent doctor --json` against real endpoints: a machine without TensorRT, an unreachable broker,
an unreachable S3 endpoint, a state dir the agent's user cannot write, an invalid config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from scripts.loopback.services import Mosquitto, MotoS3, bin_path, free_port, s3_env, write_agent_config


def config(folder: Path, broker: str, s3: str, extra: str = "") -> Path:
    return write_agent_config(
        folder / "agent.toml",
        broker=broker,
        s3=s3,
        state_dir=folder / "state",
        socket_path=folder / "run" / "infer.sock",
        channel="walk",
        device_id="go2-01",
        prefix="doctor",
        extra=extra,
    )


def doctor(cfg: Path, prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, dict[str, Any]]]:
    r = subprocess.run(
        [*prefix, bin_path("agent"), "--config", str(cfg), "doctor", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_env()},
        timeout=60,
        check=False,
    )
    report = json.loads(r.stdout)
    assert report["ok"] == (r.returncode == 0)
    return r.returncode, {c["name"]: c for c in report["checks"]}


def test_a_machine_without_tensorrt_is_explained(tmp_path: Path, broker: Mosquitto, s3: MotoS3) -> None:
    pytest.importorskip("agent.engines.onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is importable here")
    except ImportError:
        pass
    cfg = config(tmp_path, broker.url, s3.url)
    cfg.write_text(cfg.read_text().replace('backend = "onnxruntime"', 'backend = "auto"'))
    code, checks = doctor(cfg)
    assert code == 0, checks
    trt = checks["tensorrt"]
    assert trt["status"] in ("ok", "warn") and "not importable" in trt["detail"]
    assert "backend 'auto' serves with ONNX Runtime" in trt["detail"]
    assert checks["backend"]["detail"].startswith("onnxruntime ")
    assert {checks[n]["status"] for n in ("broker", "s3", "state_dir", "config")} == {"ok"}

    cfg.write_text(cfg.read_text().replace('backend = "auto"', 'backend = "tensorrt"'))
    code, checks = doctor(cfg)
    assert code == 1
    assert checks["tensorrt"]["status"] == "fail" and "python3-libnvinfer" in checks["tensorrt"]["remedy"]
    assert checks["backend"]["status"] == "fail" and "not usable" in checks["backend"]["detail"]


def test_unreachable_broker(tmp_path: Path, s3: MotoS3) -> None:
    code, checks = doctor(config(tmp_path, f"mqtt://127.0.0.1:{free_port()}", s3.url))
    assert code == 1
    assert checks["broker"]["status"] == "fail" and "not reachable" in checks["broker"]["detail"]
    assert checks["broker"]["remedy"] and checks["s3"]["status"] == "ok"


def test_unreachable_s3(tmp_path: Path, broker: Mosquitto) -> None:
    code, checks = doctor(config(tmp_path, broker.url, f"http://127.0.0.1:{free_port()}"))
    assert code == 1
    assert checks["s3"]["status"] == "fail" and "not reachable" in checks["s3"]["detail"]
    assert checks["broker"]["status"] == "ok"


def test_share_bucket_missing(tmp_path: Path, broker: Mosquitto, s3: MotoS3) -> None:
    code, checks = doctor(config(tmp_path, broker.url, s3.url, '[share]\nenabled = true\nbucket = "no-such-bucket"\n'))
    assert code == 1 and checks["share"]["status"] == "fail" and "no-such-bucket" in checks["share"]["detail"]


def test_state_dir_not_writable(tmp_path: Path, broker: Mosquitto, s3: MotoS3) -> None:
    cfg = config(tmp_path, broker.url, s3.url)
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root ignores file modes through CAP_DAC_OVERRIDE: drop it, as a service user has none
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and util-linux's setpriv is missing")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    try:
        code, checks = doctor(cfg, prefix)
    finally:
        state.chmod(0o755)
    assert code == 1
    found = checks["state_dir"]
    assert found["status"] == "fail" and f"{state} is not writable by user" in found["detail"]
    assert "install -d -o" in found["remedy"]


def test_invalid_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('channel = "walk"\nstate_dir = "/tmp/x"\nsocket = "/tmp/x.sock"\n[build]\ntime_limit = 5\n')
    code, checks = doctor(cfg)
    assert code == 1 and list(checks) == ["config"]
    assert "unknown key 'build.time_limit'" in checks["config"]["detail"]


def test_scheduling_says_when_sched_fifo_is_not_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import config as agent_config
    from agent.system import doctor as doc

    cfg = agent_config.load(config(tmp_path, "mqtt://127.0.0.1:1", "http://127.0.0.1:1"))
    monkeypatch.setattr(doc.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(doc.resource, "getrlimit", lambda _r: (0, 0))
    (check,) = doc._scheduling(cfg)
    assert check.status == doc.WARN and "SCHED_FIFO 70 not allowed" in check.detail and "LimitRTPRIO" in check.remedy
    monkeypatch.setattr(doc.resource, "getrlimit", lambda _r: (70, 70))
    assert doc._scheduling(cfg)[0].status == doc.OK
