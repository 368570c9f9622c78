"""mosquitto with TLS, client certificates and the example per-device ACLs (cloud/broker/): a
device can neither announce a model nor write another device's topics. A subscriber never gets
those messages, and the MQTT 5 PUBACK says 0x87 "not authorized". The agent itself connects over
mTLS (mqtts://, ca/cert/key in its config) and its retained status arrives."""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.contract.mqtt_client import make_client
from cloud.bulk_client import BulkReadClient
from scripts.loopback.service_harness import agent_process
from scripts.loopback.services import MOSQUITTO, free_port, stop, wait_port, write_agent_config
from tests.certs import TestPKI
from tests.conftest import wait_for
from tests.test_bulk_client import payloads

BROKER_DIR = Path(__file__).resolve().parents[1] / "cloud" / "broker"
NOT_AUTHORIZED = 0x87


@dataclass
class TlsBroker:
    port: int
    pki: TestPKI
    prefix: str

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    pki = TestPKI(tmp_path / "pki")
    server_cert, server_key = pki.issue("localhost", server=True)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    port = free_port()
    acl = tmp_path / "acl.conf"
    acl.write_text((BROKER_DIR / "acl.conf").read_text().replace("edge/v1/", f"{prefix}/v1/"))
    conf = (BROKER_DIR / "mosquitto.conf").read_text()
    for old, new in (
        ("listener 8883", f"listener {port} 127.0.0.1"),
        ("/etc/mosquitto/certs/ca.pem", str(pki.ca)),
        ("/etc/mosquitto/certs/server.pem", str(server_cert)),
        ("/etc/mosquitto/certs/server.key", str(server_key)),
        ("/etc/mosquitto/acl.conf", str(acl)),
        ("persistence true", "persistence false"),
    ):
        assert old in conf
        conf = conf.replace(old, new)
    (tmp_path / "mosquitto.conf").write_text(
        conf
        + f"log_dest file {tmp_path}/mosquitto.log\n"
        # root: keep reading the test's private files
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield TlsBroker(port, pki, prefix)
    finally:
        stop(proc)


class Client:
    """A connected MQTT 5 client with a certificate; records PUBACK reason codes and messages."""

    def __init__(self, broker: TlsBroker, cn: str, client_class: type[mqtt.Client] = mqtt.Client) -> None:
        cert, key = broker.pki.issue(cn)
        self.c = make_client(
            f"{cn}-{uuid.uuid4().hex[:6]}",
            broker.url,
            ca_file=broker.pki.ca,
            cert_file=cert,
            key_file=key,
            client_class=client_class,
        )
        self.acks: dict[int, int] = {}
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.ready = threading.Event()
        self.subscribed = threading.Event()
        self.c.on_connect = lambda *a: self.ready.set()
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_publish = self._on_publish
        self.c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert self.ready.wait(10), f"{cn} did not connect"

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        self.acks[mid] = int(rc.value)

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.c.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.acks, 10, f"PUBACK for {topic}")
        return self.acks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.integration
def test_device_acls_over_mtls(tls_broker: TlsBroker) -> None:
    p = tls_broker.prefix
    collector = Client(tls_broker, "fleet-collector")
    device = Client(tls_broker, "go2-01")
    publisher = Client(tls_broker, "fleet-publisher")
    try:
        collector.c.subscribe([(f"{p}/v1/devices/+/+", 1), (f"{p}/v1/channels/+/announce", 1)])
        assert collector.subscribed.wait(10)

        denied = {
            f"{p}/v1/channels/walk/announce": b'{"forged": "announcement"}',
            f"{p}/v1/devices/go2-02/status": b'{"pretending": "to be go2-02"}',
            f"{p}/v1/devices/go2-02/events": b"{}",
        }
        for topic, payload in denied.items():
            assert device.publish(topic, payload) == NOT_AUTHORIZED, topic
        assert device.publish(f"{p}/v1/devices/go2-01/telemetry", b'{"own": 1}') == 0
        assert publisher.publish(f"{p}/v1/channels/walk/announce", b'{"real": 1}') == 0

        # Messages from one client arrive in order: once the allowed ones are in, the denied ones
        # would have been delivered before them.
        got = [collector.messages.get(timeout=10) for _ in range(2)]
        assert got == [
            (f"{p}/v1/devices/go2-01/telemetry", b'{"own": 1}'),
            (f"{p}/v1/channels/walk/announce", b'{"real": 1}'),
        ]
        assert collector.messages.empty()
    finally:
        for c in (collector, device, publisher):
            c.close()


@pytest.mark.integration
def test_the_collectors_bulk_reader_over_tls(tls_broker: TlsBroker) -> None:
    """TLS keeps decrypted bytes of its own: the bulk reader must drain them, not wait on select()."""
    topic = f"{tls_broker.prefix}/v1/devices/go2-01/telemetry"
    collector = Client(tls_broker, "fleet-collector", client_class=BulkReadClient)
    device = Client(tls_broker, "go2-01")
    try:
        collector.c.subscribe(topic, qos=1)
        assert collector.subscribed.wait(10)
        sent = payloads(1200, "tls")
        infos = [device.c.publish(topic, m, qos=1) for m in sent]
        wait_for(lambda: all(i.mid in device.acks for i in infos), 30, "every PUBACK")
        got = [collector.messages.get(timeout=20) for _ in sent]
        assert [payload for _t, payload in got] == sent
    finally:
        collector.close()
        device.close()


def test_no_certificate_no_connection(tls_broker: TlsBroker) -> None:
    """Without a client certificate the TLS session is torn down before any MQTT is spoken."""
    ctx = ssl.create_default_context(cafile=str(tls_broker.pki.ca))
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"\x10\x00")  # the start of a CONNECT packet
                data = s.recv(16)
        except TimeoutError:
            raise AssertionError("the broker kept a connection without a client certificate") from None
        except (ssl.SSLError, ConnectionResetError) as err:
            data, reason = b"", str(err)
        else:
            reason = "closed"
    assert data == b"", reason


@pytest.mark.integration
def test_agent_over_mtls(tmp_path: Path, tls_broker: TlsBroker) -> None:
    p = tls_broker.prefix
    cert, key = tls_broker.pki.issue("go2-07")
    collector = Client(tls_broker, "fleet-collector")
    try:
        collector.c.subscribe(f"{p}/v1/devices/+/status", 1)
        assert collector.subscribed.wait(10)
        d = tmp_path / "agent"
        d.mkdir()
        cfg = write_agent_config(
            d / "agent.toml",
            broker=tls_broker.url,
            s3=f"http://127.0.0.1:{free_port()}",
            state_dir=d / "state",
            socket_path=d / "run" / "infer.sock",
            channel="walk",
            device_id="go2-07",
            prefix=p,
        )
        tls = f'[mqtt]\nca_file = "{tls_broker.pki.ca}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        cfg.write_text(cfg.read_text().replace("[mqtt]\n", tls))
        with agent_process(cfg, {}):
            topic, payload = collector.messages.get(timeout=30)
            assert topic == f"{p}/v1/devices/go2-07/status"
            assert json.loads(payload)["online"] is True
    finally:
        collector.close()
