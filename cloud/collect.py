"""`fleet collect`: a persistent MQTT 5 session that stores what devices report. While it is down
(for less than the session expiry) the broker queues the QoS 1 messages it missed."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import paho.mqtt.client as mqtt

from agent.contract.mqtt_client import client_for, host_port, session_properties
from agent.contract.protocol import Topics, decode
from agent.errors import ProtocolError
from cloud.config import FleetConfig
from cloud.fleetdb import FleetDB

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.db = FleetDB(cfg.collector.db)
        self.stop_event = threading.Event()
        m = cfg.mqtt
        self.client = client_for(m.client_id, m)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.ignored = 0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        host, port = host_port(self.cfg.mqtt.url)
        self.client.connect_async(
            host,
            port,
            keepalive=self.cfg.mqtt.keepalive_s,
            clean_start=False,
            properties=session_properties(self.cfg.mqtt.session_expiry_s),
        )
        self.client.loop_start()
        log.info("collecting from %s into %s", self.cfg.mqtt.url, self.cfg.collector.db)
        self.stop_event.wait()
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()
        return 0

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            return
        log.info("connected (session present: %s)", flags.session_present)
        client.subscribe(self.topics.all_devices(), qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.store(msg.topic, bytes(msg.payload))
        except (ProtocolError, KeyError, ValueError, TypeError) as err:
            self.ignored += 1
            log.warning("ignored a payload on %s: %s", msg.topic, err)

    def store(self, topic: str, payload: bytes) -> None:
        device_id, kind = self.topics.parse_device_topic(topic)
        if kind == "status":
            self.db.put_status(device_id, decode(payload, "status"))
        elif kind == "events":
            self.db.put_event(device_id, decode(payload, "event"))
        else:
            self.db.put_telemetry(device_id, decode(payload, "telemetry"))
