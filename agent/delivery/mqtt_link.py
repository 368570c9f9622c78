"""The agent's MQTT session. Callbacks run on paho's thread and only enqueue for the coordinator."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import MqttConfig
from agent.contract.mqtt_client import SESSION_TAKEN_OVER, client_for, host_port, jitter_backoff, session_properties

log = logging.getLogger(__name__)

CONFLICT_BACKOFF_S = 300.0
FLAP_UPTIME_S, FLAP_WINDOW_S, FLAP_COUNT = 5.0, 30.0, 3  # 3 sessions under 5 s within 30 s = a twin


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class MessageArrived:
    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class Published:
    """The broker acknowledged message `mid` (QoS 1)."""

    mid: int


LinkEvent = Connected | Disconnected | MessageArrived | Published


class Link:
    """Posts a LinkEvent for each connect, disconnect, message and acknowledgement (paho's
    thread; `post` only enqueues for the coordinator)."""

    def __init__(
        self,
        cfg: MqttConfig,
        device_id: str,
        will_topic: str,
        will_payload: bytes,
        post: Callable[[LinkEvent], None],
    ) -> None:
        self.cfg = cfg
        self.post = post
        self.connected = False
        self.conflict_until = 0.0
        self.device_id = device_id
        self._connected_at = 0.0
        self._short_sessions: deque[float] = deque(maxlen=FLAP_COUNT)
        self.client = client_for(f"edge-agent-{device_id}", cfg, cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.client.will_set(will_topic, will_payload, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def start(self) -> None:
        host, port = host_port(self.cfg.url)
        # connect_async: robots boot offline; the loop keeps trying in the background.
        self.client.connect_async(
            host,
            port,
            keepalive=self.cfg.keepalive_s,
            clean_start=False,
            properties=session_properties(self.cfg.session_expiry_s),
        )
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Returns the message id, or None when not connected (the caller keeps the message)."""
        if not self.connected:
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def stop(self, topic: str, payload: bytes, timeout: float = 2.0) -> None:
        """Clean stop: publish the retained offline status ourselves (no will is sent on a clean
        disconnect), wait for it briefly, then disconnect."""
        if self.connected:
            info = self.client.publish(topic, payload, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            return
        self.connected = True
        self._connected_at = time.monotonic()
        self.post(Connected(bool(flags.session_present)))

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected = False
        jitter_backoff(client, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        if rc == SESSION_TAKEN_OVER or self._flapping():
            # Another agent uses our device_id (the broker hands it our session). Reconnecting at once
            # would kick it off in turn, and the two would loop; back off for minutes (jittered, so
            # twins drift apart) and say so in the status.
            self.conflict_until = time.monotonic() + CONFLICT_BACKOFF_S
            jitter_backoff(client, CONFLICT_BACKOFF_S, 2 * CONFLICT_BACKOFF_S)
            log.error(
                "the broker keeps handing this session to another client: is device_id %r used by "
                "two agents? Backing off for %.0f s",
                self.device_id,
                CONFLICT_BACKOFF_S,
            )
        self.post(Disconnected(str(rc)))

    def _flapping(self) -> bool:
        """Sessions that end right after they start, again and again: mosquitto closes a taken-over
        session without telling why, so this is how a twin shows itself."""
        now = time.monotonic()
        if self._connected_at and now - self._connected_at < FLAP_UPTIME_S:
            self._short_sessions.append(now)
        return sum(1 for t in self._short_sessions if now - t < FLAP_WINDOW_S) >= FLAP_COUNT

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.post(MessageArrived(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        self.post(Published(mid))
