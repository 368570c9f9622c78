"""`fleet`'s typed TOML config. Credentials are not here: boto3's standard chain supplies them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import check_mqtt_url
from agent.contract.protocol import DEFAULT_TOPIC_PREFIX, name_problem
from agent.contract.tomlconf import build, read_toml
from agent.errors import ConfigError
from cloud.duration import parse_duration

DEFAULT_PATH = Path("fleet.toml")


@dataclass
class FleetMqtt:
    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    client_id: str = "fleet-collector"
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 30
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def check(self) -> None:
        check_mqtt_url(self.url, "mqtt.url")


@dataclass
class FleetS3:
    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"

    def check(self) -> None:
        if not self.bucket:
            raise ConfigError("s3.bucket: must not be empty")


@dataclass
class FleetCollector:
    db: str = "fleet.db"  # an SQLite file, or postgresql://user@host/db (see `database`)
    raw_retention: str = "7d"  # each telemetry interval's histogram, as it came
    hourly_retention: str = "90d"  # then merged per device, version and hour
    prune_every: str = "10m"  # how often the collector merges and prunes
    batch_max: int = 500  # messages stored in one transaction, at most
    batch_wait: str = "0.1s"  # how long a batch waits for more messages after its first
    share_group: str | None = None  # collectors with the same group split telemetry and events

    def check(self) -> None:
        if not self.db:
            raise ConfigError("collector.db: must be an SQLite file or a postgresql:// URL")
        if self.batch_max < 1:
            raise ConfigError("collector.batch_max: must be at least 1")
        if self.share_group is not None and (problem := name_problem("collector.share_group", self.share_group)):
            raise ConfigError(problem)
        for key in ("raw_retention", "hourly_retention", "prune_every", "batch_wait"):
            try:
                parse_duration(getattr(self, key))
            except ValueError as err:
                raise ConfigError(f"collector.{key}: {err}") from None
        if self.hourly_s < self.raw_s:
            raise ConfigError("collector.hourly_retention: must not be shorter than collector.raw_retention")

    @property
    def raw_s(self) -> float:
        return parse_duration(self.raw_retention)

    @property
    def hourly_s(self) -> float:
        return parse_duration(self.hourly_retention)

    @property
    def database(self) -> Path | str:
        """The SQLite file (a Path), or the PostgreSQL URL as written."""
        return self.db if self.db.startswith(("postgresql://", "postgres://")) else Path(self.db)

    @property
    def batch_wait_s(self) -> float:
        return parse_duration(self.batch_wait)

    @property
    def prune_every_s(self) -> float:
        return parse_duration(self.prune_every)


@dataclass
class FleetServe:
    """`fleet serve`: the dashboard. Read-only unless a token is set; actions need the token."""

    listen: str = "127.0.0.1:8080"
    allow_remote: bool = False  # a non-loopback `listen` is refused unless this says so
    token: str | None = None
    token_file: Path | None = None
    sign_key: Path | None = None  # signs the announcements the dashboard's actions send

    def check(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ConfigError("serve.token and serve.token_file: set one of them, not both")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("serve.token: must be at least 16 characters")

    def secret(self) -> str | None:
        """The token, read from token_file when that is the one set; None: every action is refused."""
        if self.token_file is None:
            return self.token
        try:
            text = self.token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"serve.token_file: cannot read {self.token_file}: {err.strerror or err}") from err
        if len(text) < 16:
            raise ConfigError(f"serve.token_file: {self.token_file} must hold at least 16 characters")
        return text


@dataclass
class FleetConfig:
    s3: FleetS3
    mqtt: FleetMqtt = field(default_factory=FleetMqtt)
    collector: FleetCollector = field(default_factory=FleetCollector)
    serve: FleetServe = field(default_factory=FleetServe)
    device_groups: dict[str, list[str]] = field(default_factory=dict)  # name -> device ids (--target)

    def check(self) -> None:
        for group, devices in self.device_groups.items():
            problem = name_problem("device_groups: group", group) or next(
                filter(None, (name_problem(f"device_groups.{group}: device", d) for d in devices)), None
            )
            if problem:
                raise ConfigError(problem)


def config_path(cli_value: str | None) -> Path:
    return Path(cli_value or os.environ.get("FLEET_CONFIG") or DEFAULT_PATH)


def load(path: Path) -> FleetConfig:
    return build(FleetConfig, read_toml(path), "")
