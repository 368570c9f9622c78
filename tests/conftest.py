"""Fixtures: real mosquitto and moto S3 servers on free loopback ports, unique topic prefixes and
channels per test, and a harness that runs `agent` and `fleet` as processes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.loopback.models import mlp  # noqa: F401  (re-exported for the tests)
from scripts.loopback.postgres import PostgreSQL
from scripts.loopback.services import (
    Mosquitto,
    MotoS3,
    bin_path,
    s3_env,
    stop,
    write_agent_config,
    write_fleet_config,
)

GO2_DIR = Path(os.environ.get("GO2_DATA", Path(__file__).resolve().parents[2] / "shared" / "go2"))
SERVICE_FIXTURES = frozenset({"broker", "s3", "fleet", "postgres"})  # real mosquitto, S3 (moto), agents, PostgreSQL


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts real services is an integration test, marked or not: `scripts/test
    --quick` (-m "not integration") leaves it out."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    os.environ.update(s3_env())
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQL]:
    """Debian's PostgreSQL server, in a temp dir on a free port; each test makes its database."""
    server = PostgreSQL()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: MotoS3) -> str:
    """A bucket of this test's own on the session's S3 server."""
    name = f"engines-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    return name


class Fleet:
    """One test's world: a bucket, a topic prefix, a channel, a collector and agents."""

    def __init__(self, root: Path, broker: Mosquitto, s3: MotoS3) -> None:
        self.root = root
        self.broker = broker
        self.s3 = s3
        tag = uuid.uuid4().hex[:8]
        self.prefix = f"t{tag}"
        self.channel = "walk"
        self.bucket = f"models-{tag}"
        s3.client().create_bucket(Bucket=self.bucket)
        self.fleet_cfg = write_fleet_config(
            root / "fleet.toml",
            broker=broker.url,
            s3=s3.url,
            bucket=self.bucket,
            prefix=self.prefix,
            db=root / "fleet.db",
            client_id=f"collector-{tag}",
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.collector: subprocess.Popen[bytes] | None = None

    def agent_config(self, device_id: str = "go2-01", extra: str = "") -> Path:
        d = self.root / device_id
        d.mkdir(exist_ok=True)
        return write_agent_config(
            d / "agent.toml",
            broker=self.broker.url,
            s3=self.s3.url,
            state_dir=d / "state",
            socket_path=d / "run" / "infer.sock",
            channel=self.channel,
            device_id=device_id,
            prefix=self.prefix,
            extra=extra,
        )

    def spawn(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            p = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **s3_env(), **(env or {})}
            )
        self.procs.append(p)
        return p

    def start_collector(self) -> subprocess.Popen[bytes]:
        self.collector = self.spawn(
            [bin_path("fleet"), "--config", str(self.fleet_cfg), "collect"], self.root / "collector.log"
        )
        return self.collector

    def start_agent(self, cfg: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        control = cfg.parent / "run" / "control.sock"
        control.unlink(missing_ok=True)  # left by a killed agent: wait for this one's
        p = self.spawn([bin_path("agent"), "--config", str(cfg), "run"], cfg.parent / "agent.log", env)
        wait_for(lambda: (cfg.parent / "run" / "control.sock").exists(), 20, "agent control socket")
        return p

    def fleet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([bin_path("fleet"), "--config", str(self.fleet_cfg), *args], check)

    def agent(self, cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([bin_path("agent"), "--config", str(cfg), *args], check)

    def publish(self, model: Path, version: str, *extra: str) -> dict[str, Any]:
        out = self.fleet("publish", str(model), "--channel", self.channel, "--version", version, *extra)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def status(self, cfg: Path) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.agent(cfg, "status", "--json", check=False).stdout)
        return result

    def wait_active(self, cfg: Path, version: str, timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            s = self.status(cfg)
            return s if (s.get("active") or {}).get("version") == version else None

        return wait_for(check, timeout, f"{version} active")

    def wait_rejected(self, cfg: Path, version: str, timeout: float = 30) -> str:
        def check() -> str | None:
            r = self.status(cfg).get("last_rejected") or {}
            return r["reason"] if r.get("version") == version else None

        return wait_for(check, timeout, f"{version} rejected")

    def events(self, device: str | None = None) -> list[dict[str, Any]]:
        args = ["events", "--json"] + (["--device", device] if device else [])
        result: list[dict[str, Any]] = json.loads(self.fleet(*args).stdout)
        return result

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)


def run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **s3_env()}, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto, s3: MotoS3) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker, s3)
    yield f
    f.close()
