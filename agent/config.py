"""The agent's one typed config (TOML). Unknown keys and bad values fail with the key's name."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from agent.contract.protocol import DEFAULT_TOPIC_PREFIX, name_problem, safe_name
from agent.contract.tomlconf import build, positive, read_toml
from agent.errors import ConfigError
from agent.go2.settings import Go2Config

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
    # Cap on the download rate in MB/s (0: none): leave a robot's Wi-Fi to teleoperation and
    # telemetry, and spread the kernel's network work so it does not crowd the serving process.
    max_download_mbps: float = 0.0

    def check(self) -> None:
        if self.max_download_mbps < 0:
            raise ConfigError(f"s3.max_download_mbps: must be >= 0 (0: no cap), got {self.max_download_mbps}")


@dataclass
class TelemetryConfig:
    interval_s: float = 10.0

    def check(self) -> None:
        positive("telemetry.interval_s", self.interval_s)


@dataclass
class GateConfig:
    """This channel's gate (a manifest's own values win)."""

    latency_budget_us: int = 2000
    latency_calls: int = 300

    def check(self) -> None:
        positive("gate.latency_budget_us", self.latency_budget_us)
        if self.latency_calls < 20:
            raise ConfigError("gate.latency_calls: must be >= 20 for a meaningful p99")


@dataclass
class WatchConfig:
    """The post-activation watch: roll back automatically on errors, NaN/Inf or a slower p99."""

    window_s: float = 60.0
    latency_factor: float = 2.0  # p99 worse than this x the previous model's -> rollback
    min_calls: int = 200  # latency is judged only on at least this many calls
    min_p99_us: int = 200  # ... and never below this floor (scheduler noise on tiny models)
    max_errors: int = 0
    keep_models: int = 3  # models (with engines) kept for an instant rollback

    def check(self) -> None:
        positive("watch.window_s", self.window_s)
        if self.latency_factor < 1:
            raise ConfigError("watch.latency_factor: must be >= 1")
        if self.keep_models < 2:
            raise ConfigError("watch.keep_models: must be >= 2 (the active one and one to roll back to)")


@dataclass
class SecurityConfig:
    # Ed25519 public keys (base64, from `fleet keygen`). When any is listed, an announcement must
    # carry a valid signature by one of them; more than one = key rotation.
    trusted_keys: list[str] = field(default_factory=list)
    admin_group: str = "edge-agent-admin"  # deploy/rollback/pin/activate need it (or root)
    socket_group: str | None = None  # chgrp the sockets (default: the service's primary group)

    def check(self) -> None:
        from agent.contract.signing import parse_public_key

        for i, key in enumerate(self.trusted_keys):
            parse_public_key(key, f"security.trusted_keys[{i}]")


@dataclass
class InboxConfig:
    enabled: bool = True
    path: Path | None = None  # default: <state_dir>/inbox


@dataclass
class BuildConfig:
    """[build] in the agent's config."""

    time_limit_s: float = 1800.0  # an Orin Nano builds a large model in minutes
    min_available_mb: int = 300  # the memory guard kills the build below this MemAvailable
    workspace_mb: int = 1024  # TensorRT's workspace pool cap
    fp16: bool = True  # TensorRT: try an FP16 engine first where the GPU has fast FP16; FP32 if its golden check fails
    tf32: bool = False  # TensorRT: allow TF32 in FP32 layers (off: "fp32" means FP32, matching fp32 tolerances)
    max_dynamic: int = 8  # the largest size a dynamic input dimension is built for (profile 1..max_dynamic)
    emulate_fp16: bool = False  # ONNX Runtime only: round weights to FP16, to exercise the FP16 path without a GPU

    def check(self) -> None:
        positive("build.time_limit_s", self.time_limit_s)
        positive("build.workspace_mb", self.workspace_mb)
        positive("build.max_dynamic", self.max_dynamic)
        if self.min_available_mb < 0:
            raise ConfigError("build.min_available_mb: must be >= 0")


@dataclass
class ShareConfig:
    """[share] in the agent's config."""

    enabled: bool = False
    bucket: str = ""
    prefix: str = "engines/"
    trusted_builders: list[str] = field(default_factory=list)  # device ids; this agent is always trusted
    upload: bool = True  # publish engines this agent built (after they pass the gate)
    poll_s: float = 1.0  # how often a waiting agent looks for the lease holder's engine

    def check(self) -> None:
        if self.enabled and not self.bucket:
            raise ConfigError("share.bucket: required when share.enabled = true")
        positive("share.poll_s", self.poll_s)


@dataclass
class AgentConfig:
    channel: str
    state_dir: Path
    socket: Path
    device_id: str = ""
    control_socket: Path | None = None  # default: control.sock beside `socket`
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    activation: Literal["auto", "manual"] = "auto"
    disk_reserve_mb: int = 256
    # SCHED_FIFO priority of the serving process, below the Go2 controller's 80: the controller
    # waits on it every period. 0: normal scheduling at nice -5.
    serving_rt_priority: int = 70
    # CPUs reserved for the serving process (e.g. [5] on an Orin Nano, the Go2 controller unit's
    # CPUAffinity= on the same): the daemon, downloads, checks, builds and a standby model run on the
    # others, so their kernel work never holds the serving CPU. Empty: no pinning.
    serving_cpus: list[int] = field(default_factory=list)
    # Serving processes and build children alive at once (each holds a CUDA context on a Jetson,
    # in the memory the CPU shares; docs/engines.md). A candidate that would pass it waits: for the
    # watch to end (its previous model is then unloaded), or for a build to finish. 0: no bound.
    serving_max_processes: int = 0
    outbox_max_events: int = 10000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    s3: S3Config = field(default_factory=S3Config)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    build: BuildConfig = field(default_factory=BuildConfig)  # engine builds (agent/engines/build.py)
    share: ShareConfig = field(default_factory=ShareConfig)  # fleet engine sharing (agent/engines/fleet_share.py)
    go2: Go2Config | None = None  # the Go2 controller and the sim gate (agent/go2)

    def check(self) -> None:
        problem = name_problem("channel", self.channel)
        if problem:
            raise ConfigError(problem)
        if self.disk_reserve_mb < 0:
            raise ConfigError("disk_reserve_mb: must be >= 0")
        positive("outbox_max_events", self.outbox_max_events)
        usable = os.sched_getaffinity(0)
        if self.serving_cpus and (not set(self.serving_cpus) <= usable or set(self.serving_cpus) == usable):
            raise ConfigError(
                f"serving_cpus: must be some of this machine's CPUs {sorted(usable)}, leaving at least one for "
                f"the rest, got {self.serving_cpus}"
            )
        if self.serving_max_processes == 1 or self.serving_max_processes < 0:
            raise ConfigError(
                "serving_max_processes: 0 (no bound) or at least 2 (the model in service and the next), "
                f"got {self.serving_max_processes}"
            )
        if not 0 <= self.serving_rt_priority <= 99:
            raise ConfigError(f"serving_rt_priority: must be 0 (no real-time) to 99, got {self.serving_rt_priority}")
        if not self.device_id:
            self.device_id = default_device_id()
        problem = name_problem("device_id", self.device_id)
        if problem:
            raise ConfigError(problem)
        if self.control_socket is None:
            self.control_socket = self.socket.parent / "control.sock"
        if self.inbox.path is None:
            self.inbox.path = self.state_dir / "inbox"

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
            return safe_name(serial)
    return safe_name(socket.gethostname())


def cache_dir(cfg: AgentConfig) -> Path:
    """Where what outlives engines is kept (TensorRT's timing cache, refused shared engines):
    systemd's CacheDirectory= ($CACHE_DIRECTORY), else <state_dir>/cache."""
    given = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(given) if given else cfg.state_dir / "cache"


def config_path(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value)
    return Path(os.environ.get("EDGE_AGENT_CONFIG") or DEFAULT_PATH)


def load(path: Path) -> AgentConfig:
    return build(AgentConfig, read_toml(path), "")
