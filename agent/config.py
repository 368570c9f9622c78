"""The agent's one typed config (TOML). Unknown keys and bad values fail with the key's name."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from agent.errors import ConfigError
from agent.go2.settings import Go2Config
from agent.protocol import DEFAULT_TOPIC_PREFIX
from agent.tomlconf import build, positive, read_toml

DEFAULT_PATH = Path("/etc/edge-agent/agent.toml")
SERIAL_PATHS = (Path("/proc/device-tree/serial-number"), Path("/sys/firmware/devicetree/base/serial-number"))


@dataclass
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"  # mqtts:// for TLS
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate for mTLS
    key_file: Path | None = None

    def check(self) -> None:
        check_mqtt_url(self.url, "mqtt.url")
        positive("mqtt.keepalive_s", self.keepalive_s)
        positive("mqtt.reconnect_min_s", self.reconnect_min_s)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("mqtt.reconnect_max_s: must be >= mqtt.reconnect_min_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("mqtt.cert_file and mqtt.key_file: give both or neither")


@dataclass
class S3Config:
    endpoint_url: str | None = None  # None: AWS itself; else any S3-compatible endpoint
    region: str = "us-east-1"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0


@dataclass
class TelemetryConfig:
    interval_s: float = 10.0

    def check(self) -> None:
        positive("telemetry.interval_s", self.interval_s)


@dataclass
class AgentConfig:
    channel: str
    state_dir: Path
    socket: Path
    device_id: str = ""
    control_socket: Path | None = None  # default: control.sock beside `socket`
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    disk_reserve_mb: int = 256
    outbox_max_events: int = 10000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    s3: S3Config = field(default_factory=S3Config)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    go2: Go2Config | None = None  # the Go2 controller and the sim gate (agent/go2)

    def check(self) -> None:
        if not self.channel or "/" in self.channel or "+" in self.channel or "#" in self.channel:
            raise ConfigError(f"channel: must be a non-empty name without / + #, got {self.channel!r}")
        if self.disk_reserve_mb < 0:
            raise ConfigError("disk_reserve_mb: must be >= 0")
        positive("outbox_max_events", self.outbox_max_events)
        if not self.device_id:
            self.device_id = default_device_id()
        if "/" in self.device_id or "+" in self.device_id or "#" in self.device_id:
            raise ConfigError(f"device_id: must not contain / + #, got {self.device_id!r}")
        if self.control_socket is None:
            self.control_socket = self.socket.parent / "control.sock"

    @property
    def control_path(self) -> Path:
        assert self.control_socket is not None  # set by check()
        return self.control_socket


def check_mqtt_url(url: str, key: str) -> None:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"{key}: must look like mqtt://host:1883 or mqtts://host:8883, got {url!r}")


def default_device_id() -> str:
    """The board's serial number where the device tree has one (cloned SD images share hostnames)."""
    for p in SERIAL_PATHS:
        try:
            serial = p.read_bytes().rstrip(b"\0\n").decode("ascii", "replace").strip()
        except OSError:
            continue
        if serial:
            return serial
    return socket.gethostname()


def config_path(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value)
    return Path(os.environ.get("EDGE_AGENT_CONFIG") or DEFAULT_PATH)


def load(path: Path) -> AgentConfig:
    return build(AgentConfig, read_toml(path), "")
