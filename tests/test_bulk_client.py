"""cloud/bulk_client.py against real mosquitto: every message arrives whole and in order, whatever
its size against the read buffer, through a restart of the broker (the buffer of the old socket is
dropped); over TLS in tests/test_mqtt_tls_acl.py."""

from __future__ import annotations

import queue
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.contract.mqtt_client import make_client
from cloud.bulk_client import READ_BYTES, BulkReadClient
from scripts.loopback.services import Mosquitto
from tests.conftest import wait_for

SIZES = (0, 1, 200, READ_BYTES - 10, READ_BYTES + 3, 3 * READ_BYTES + 7)  # a packet across buffers


def payloads(n: int, tag: str) -> list[bytes]:
    """`n` payloads of the sizes above in turn, each starting with its number."""
    return [f"{tag}:{i}:".encode() + bytes([i % 251]) * SIZES[i % len(SIZES)] for i in range(n)]


class Reader:
    def __init__(self, url: str, port: int, topic: str) -> None:
        self.got: queue.Queue[bytes] = queue.Queue()
        self.connects = 0
        self.subscribed = threading.Event()
        self.c = make_client(f"bulk-{uuid.uuid4().hex[:6]}", url, client_class=BulkReadClient, reconnect_max_s=1)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.on_message = lambda _c, _u, m: self.got.put(bytes(m.payload))
        self.topic = topic
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(10), "the reader did not subscribe"

    def _on_connect(self, c: mqtt.Client, *_a: object) -> None:
        self.connects += 1
        c.subscribe(self.topic, qos=1)

    def take(self, n: int) -> list[bytes]:
        return [self.got.get(timeout=20) for _ in range(n)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish_all(url: str, port: int, topic: str, msgs: list[bytes]) -> None:
    pub = make_client(f"pub-{uuid.uuid4().hex[:6]}", url)
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        infos = [pub.publish(topic, m, qos=1) for m in msgs]
        for info in infos:
            info.wait_for_publish(20)
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_every_message_whole_and_in_order_through_a_broker_restart(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=False)
    broker.start()
    topic = f"bulk/{uuid.uuid4().hex[:6]}"
    reader = Reader(broker.url, broker.port, topic)
    try:
        first = payloads(3000, "a")
        publish_all(broker.url, broker.port, topic, first)
        assert reader.take(len(first)) == first

        broker.stop()
        reader.subscribed.clear()
        broker.start()  # the same port; the reader reconnects on a new socket
        assert reader.subscribed.wait(30), "the reader did not come back"
        second = payloads(600, "b")
        publish_all(broker.url, broker.port, topic, second)
        assert reader.take(len(second)) == second
        wait_for(lambda: reader.got.empty(), 1, "no message twice")
        assert reader.connects == 2
    finally:
        reader.close()
        broker.stop()
