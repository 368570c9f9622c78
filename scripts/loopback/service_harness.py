"""Helpers for the service tests: a real NOTIFY_SOCKET (datagram) listener and an offline agent."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .services import bin_path, free_port, s3_env, stop, write_agent_config


class NotifySocket:
    """What systemd does: a datagram socket the service writes `KEY=VALUE` lines to."""

    def __init__(self, where: Path | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if where is None:  # abstract namespace, written '@name' in NOTIFY_SOCKET
            name = f"edge-agent-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(where))
            self.address = str(where)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(msg)
        return msg

    def wait_for(self, key: str, timeout: float = 30.0, value: str = "1") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if msg is not None and msg.get(key) == value:
                return msg
        raise AssertionError(f"no {key}={value} within {timeout} s; got {self.messages[-10:]}")

    def collect(self, seconds: float) -> list[dict[str, str]]:
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if msg is not None:
                got.append(msg)
        return got

    def close(self) -> None:
        self.sock.close()


def offline_config(root: Path, extra: str = "", device_id: str = "go2-svc") -> Path:
    """An agent whose broker and S3 are not there: robots boot offline and must still be READY."""
    root.mkdir(parents=True, exist_ok=True)
    return write_agent_config(
        root / "agent.toml",
        broker=f"mqtt://127.0.0.1:{free_port()}",
        s3=f"http://127.0.0.1:{free_port()}",
        state_dir=root / "state",
        socket_path=root / "run" / "infer.sock",
        channel="walk",
        device_id=device_id,
        prefix=f"t{uuid.uuid4().hex[:8]}",
        extra=extra,
    )


@contextmanager
def agent_process(cfg: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = cfg.parent / "agent.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [bin_path("agent"), "--config", str(cfg), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **s3_env(), **env},
        )
    try:
        yield proc
    finally:
        stop(proc, timeout=5)


def agent_cli(
    cfg: Path, *args: str, user: int | None = None, groups: list[int] | None = None, gid: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_path("agent"), "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **s3_env()},
        user=user,
        group=gid,
        extra_groups=groups,
    )
