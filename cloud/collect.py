"""`fleet collect`: a persistent MQTT 5 session that stores what devices report. While it is down
(for less than the session expiry) the broker queues the QoS 1 messages it missed. It also drives
the staged rollouts (cloud/rollout_driver.py), once a second: their state is in the database, so a
restarted collector carries on where it stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from agent.contract.mqtt_client import client_for, host_port, session_properties
from agent.contract.protocol import Topics, decode, telemetry_histograms
from agent.errors import ProtocolError
from cloud.config import FleetConfig
from cloud.fleetdb import FleetDB
from cloud.latency import decode as decode_histogram
from cloud.retention import prune
from cloud.rollout_driver import Driver

log = logging.getLogger(__name__)

ROLLOUT_TICK_S = 1.0


class Collector:
    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.db = FleetDB(cfg.collector.db)
        self.lock = threading.Lock()  # one database connection: MQTT's thread stores, the main one prunes
        self.stop_event = threading.Event()
        m = cfg.mqtt
        self.client = client_for(m.client_id, m)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.ignored = 0
        self.rollouts = Driver(cfg, self.db, self.lock)

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
        next_prune = time.monotonic()
        while True:
            if time.monotonic() >= next_prune:
                self.prune()
                next_prune = time.monotonic() + self.cfg.collector.prune_every_s
            self.rollouts.tick()
            if self.stop_event.wait(ROLLOUT_TICK_S):
                break
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
        with self.lock:
            if kind == "status":
                self.db.put_status(device_id, decode(payload, "status"))
            elif kind == "events":
                self.db.put_event(device_id, decode(payload, "event"))
            else:
                report = decode(payload, "telemetry")
                histograms = telemetry_histograms(report)
                for h in histograms:
                    decode_histogram(h.hdr)  # a histogram no reader could merge is refused here
                self.db.put_telemetry(device_id, report, histograms)

    def prune(self) -> None:
        c = self.cfg.collector
        with self.lock:
            done = prune(self.db, time.time(), c.raw_s, c.hourly_s)
        if done.merged or done.hourly_deleted:
            log.info(
                "latency history: %d intervals merged into hours, %d hours deleted", done.merged, done.hourly_deleted
            )
