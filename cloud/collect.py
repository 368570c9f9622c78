"""`fleet collect`: a persistent MQTT 5 session that stores what devices report. While it is down
(for less than the session expiry) the broker queues the QoS 1 messages it missed. It also drives
the staged rollouts (cloud/rollout_driver.py), once a second: their state is in the database, so a
restarted collector carries on where it stopped.

MQTT's thread only queues; cloud/ingest.py's writer stores in batches and acknowledges after the
commit. With `[collector] share_group`, several collectors split telemetry and events between them
(MQTT 5 shared subscriptions), while each still receives every device's retained status."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from agent.contract.mqtt_client import client_for, host_port, session_properties
from agent.contract.protocol import Topics
from cloud.bulk_client import BulkReadClient
from cloud.config import FleetConfig
from cloud.fleetdb import FleetDB
from cloud.ingest import BatchWriter, Received, parse
from cloud.ingest import store as store_parsed
from cloud.retention import prune
from cloud.rollout_driver import Driver

log = logging.getLogger(__name__)

ROLLOUT_TICK_S = 1.0
RECEIVE_MAXIMUM = 65535  # QoS 1 messages in flight to us: they wait for their batch's commit to be acked


class Collector:
    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.db = FleetDB(cfg.collector.database)
        self.lock = threading.Lock()  # one database connection: the writer stores, the main thread prunes
        self.stop_event = threading.Event()
        self.subscribed = threading.Event()
        self.closing = False  # set once stopping: what arrives after is left unacked, for the next session
        m = cfg.mqtt
        self.client = client_for(m.client_id, m, client_class=BulkReadClient)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        c = cfg.collector
        self.writer = BatchWriter(
            self.db, self.lock, self.topics, self.client.ack, max_batch=c.batch_max, max_wait_s=c.batch_wait_s
        )
        self.rollouts = Driver(cfg, self.db, self.lock)

    @property
    def ignored(self) -> int:
        return self.writer.ignored

    def run(self, handle_signals: bool = True) -> int:
        if handle_signals:  # SIGTERM: a clean stop, which stores what was queued
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        host, port = host_port(self.cfg.mqtt.url)
        props = session_properties(self.cfg.mqtt.session_expiry_s)
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.writer.start()
        self.client.connect_async(host, port, keepalive=self.cfg.mqtt.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()
        log.info("collecting from %s into %s", self.cfg.mqtt.url, self.cfg.collector.db.rsplit("@", maxsplit=1)[-1])
        next_prune = time.monotonic()
        while True:
            if time.monotonic() >= next_prune:
                self.prune()
                next_prune = time.monotonic() + self.cfg.collector.prune_every_s
            self.rollouts.tick()
            if self.stop_event.wait(ROLLOUT_TICK_S):
                break
        self.closing = True
        self.writer.stop()  # stores and acknowledges what was queued
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.writer.stored.items()))
        log.info("stopped; stored: %s; ignored: %d", counts or "nothing", self.writer.ignored)
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()
        return 0

    def subscriptions(self) -> list[str]:
        """Status from every device to each collector (retained: each needs the whole fleet's);
        telemetry and events shared within `share_group`, when set."""
        share = self.cfg.collector.share_group
        topics = [self.topics.status("+")]
        for kind in (self.topics.events("+"), self.topics.telemetry("+")):
            topics.append(f"$share/{share}/{kind}" if share else kind)
        return topics

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            return
        log.info("connected (session present: %s)", flags.session_present)
        client.subscribe([(t, 1) for t in self.subscriptions()])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not self.closing:
            self.writer.put(Received(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    def store(self, topic: str, payload: bytes) -> None:
        """One message, stored at once (ProtocolError for a refused one): for tests and tools."""
        parsed = parse(self.topics, topic, payload)
        with self.lock:
            store_parsed(self.db, [parsed])

    def prune(self) -> None:
        c = self.cfg.collector
        with self.lock:
            done = prune(self.db, time.time(), c.raw_s, c.hourly_s)
        if done.merged or done.hourly_deleted:
            log.info(
                "latency history: %d intervals merged into hours, %d hours deleted", done.merged, done.hourly_deleted
            )
