"""Real services on free loopback ports, for tests, the demo and the benchmarks: mosquitto, moto's
S3 server, and the agent/fleet processes. Every process is stopped by its id."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


class Mosquitto:
    """A broker on a fixed port (so it can be stopped and started again at the same address),
    with persistence so that stored sessions survive a restart (`persistence=False`: a restart
    forgets sessions, queued and retained messages, as mosquitto's default does)."""

    def __init__(self, workdir: Path, persistence: bool = True) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            # As root, mosquitto drops to user "mosquitto", which cannot write into a test's private
            # tmp dir (no log, no persistence): stay the user who started it.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence {str(persistence).lower()}\n"
            f"persistence_location {workdir}/\nmax_queued_messages 100000\nlog_dest file {workdir}/mosquitto.log\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class MotoS3:
    """moto's server mode: a real HTTP S3 endpoint (ranged and conditional GETs included)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = (workdir / "moto.log").open("wb")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, 30)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
        self.log.close()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")


def s3_env() -> dict[str, str]:
    """moto accepts any credentials; boto3's chain reads these from the environment."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def write_agent_config(
    path: Path,
    *,
    broker: str,
    s3: str,
    state_dir: Path,
    socket_path: Path,
    channel: str,
    device_id: str,
    prefix: str,
    interval_s: float = 1.0,
    extra: str = "",
) -> Path:
    path.write_text(
        f'device_id = "{device_id}"\nchannel = "{channel}"\nstate_dir = "{state_dir}"\n'
        f'socket = "{socket_path}"\nbackend = "onnxruntime"\n{extra}\n'
        f'[mqtt]\nurl = "{broker}"\ntopic_prefix = "{prefix}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n'
        f'[s3]\nendpoint_url = "{s3}"\nregion = "us-east-1"\n'
        f"[telemetry]\ninterval_s = {interval_s}\n"
    )
    return path


def write_fleet_config(
    path: Path, *, broker: str, s3: str, bucket: str, prefix: str, db: Path, client_id: str = "fleet-collector"
) -> Path:
    path.write_text(
        f'[mqtt]\nurl = "{broker}"\ntopic_prefix = "{prefix}"\nclient_id = "{client_id}"\n'
        f'[s3]\nbucket = "{bucket}"\nendpoint_url = "{s3}"\nregion = "us-east-1"\n'
        f'[collector]\ndb = "{db}"\n'
    )
    return path


def bin_path(name: str) -> str:
    """The console script installed beside this interpreter (agent, fleet)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc)
