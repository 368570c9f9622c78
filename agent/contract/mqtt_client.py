"""MQTT client set-up shared by the agent and the cloud: paho 2, MQTT 5, persistent sessions,
TLS/mTLS, capped reconnect backoff with jitter."""

from __future__ import annotations

import random
import ssl
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SESSION_TAKEN_OVER = 142  # MQTT 5 reason code: another client connected with our client id


def make_client(
    client_id: str,
    url: str,
    *,
    username: str | None = None,
    password_file: Path | None = None,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    reconnect_min_s: float = 0.5,
    reconnect_max_s: float = 30.0,
    client_class: type[mqtt.Client] = mqtt.Client,
) -> mqtt.Client:
    client = client_class(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    u = urlparse(url)
    if u.scheme == "mqtts" or ca_file is not None:
        client.tls_set(
            ca_certs=str(ca_file) if ca_file else None,
            certfile=str(cert_file) if cert_file else None,
            keyfile=str(key_file) if key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if username:
        password = password_file.read_text().strip() if password_file else None
        client.username_pw_set(username, password)
    jitter_backoff(client, reconnect_min_s, reconnect_max_s)
    return client


class MqttSettings(Protocol):
    """What the agent's and the fleet's [mqtt] sections both say about reaching the broker."""

    url: str
    username: str | None
    password_file: Path | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


def client_for(
    client_id: str,
    m: MqttSettings,
    reconnect_min_s: float = 0.5,
    reconnect_max_s: float = 30.0,
    client_class: type[mqtt.Client] = mqtt.Client,
) -> mqtt.Client:
    return make_client(
        client_id,
        m.url,
        username=m.username,
        password_file=m.password_file,
        ca_file=m.ca_file,
        cert_file=m.cert_file,
        key_file=m.key_file,
        reconnect_min_s=reconnect_min_s,
        reconnect_max_s=reconnect_max_s,
        client_class=client_class,
    )


def jitter_backoff(client: mqtt.Client, lo: float, hi: float) -> None:
    """paho doubles the delay up to a cap but adds no jitter; re-drawing the bounds on every
    disconnect keeps a fleet that lost its broker from reconnecting in lockstep."""
    # paho annotates the delays as int; it only sleeps on them, so float seconds work.
    low, high = lo * random.uniform(1.0, 2.0), hi * random.uniform(0.5, 1.0)
    client.reconnect_delay_set(min_delay=low, max_delay=high)  # type: ignore[arg-type]


def host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or (8883 if u.scheme == "mqtts" else 1883)


def session_properties(expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    return props
