#!/usr/bin/env python3
"""A fleet of simulated devices over real MQTT, for the tests and the collector's benchmark.

    python scripts/fleet_sim.py --url mqtt://127.0.0.1:1883 --prefix edge --devices 1000 --rate 2000 --seconds 30
    python scripts/fleet_sim.py --bench   # starts its own mosquitto and `fleet collect`, prints figures

Each device publishes its retained status once, then events (unique ids) and telemetry (HdrHistogram
encoded histograms, as the agent sends them) on its own topics, in the agent's message formats. The
devices share a few client connections (a real fleet has one per device; the broker's fan-in is not
what is measured here), so thousands of them cost a few sockets. Every payload's `ts` is the time
it was published: the benchmark reads the end-to-end lag from it."""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.contract.mqtt_client import host_port, make_client
from agent.contract.protocol import PROTOCOL_VERSION, Topics, encode, new_event
from agent.serving.telemetry import LatencyRecorder
from cloud.bulk_client import BulkReadClient

CHANNEL, VERSION = "walk", "v1"
EVENT_KINDS = ("announce_received", "model_fetched", "activated")


def sample_histograms(n: int = 8, seed: int = 11) -> list[list[dict[str, Any]]]:
    """A few intervals' `histograms` fields, recorded as the agent records calls (encoding them
    per message would measure hdrh, not the collector)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rec = LatencyRecorder()
        for us in rng.lognormal(np.log(400), 0.3, 200).astype(int):
            rec.record(int(us), VERSION)
        out.append(rec.take_interval().histograms(CHANNEL))
    return out


class Simulator:
    """`devices` devices named sim-00000…, spread over `connections` MQTT connections."""

    def __init__(self, url: str, prefix: str, devices: int, connections: int = 4, name: str = "sim") -> None:
        self.topics = Topics(prefix)
        self.ids = [f"{name}-{i:05d}" for i in range(devices)]
        self.histograms = sample_histograms()
        self.clients = [self._connect(url, f"{name}-{uuid.uuid4().hex[:8]}-{k}") for k in range(connections)]
        self.sent_events: list[str] = []
        self.sent = 0
        self.last: dict[int, mqtt.MQTTMessageInfo] = {}  # per connection (the broker acks in order)

    @staticmethod
    def _connect(url: str, client_id: str) -> mqtt.Client:
        client = make_client(client_id, url, client_class=BulkReadClient)  # reads the broker's acks in bulk
        client.max_inflight_messages_set(1000)
        connected = threading.Event()
        client.on_connect = lambda *_a: connected.set()
        host, port = host_port(url)
        client.connect(host, port)
        client.loop_start()
        if not connected.wait(10):
            raise RuntimeError(f"no connection to {url}")
        return client

    def _publish(self, i: int, topic: str, payload: bytes, retain: bool = False) -> None:
        k = i % len(self.clients)
        self.last[k] = self.clients[k].publish(topic, payload, qos=1, retain=retain)
        self.sent += 1

    def publish_status(self) -> None:
        for i, d in enumerate(self.ids):
            status = {
                "protocol": PROTOCOL_VERSION,
                "type": "status",
                "online": True,
                "ts": time.time(),
                "device_id": d,
                "agent_version": "sim",
                "channel": CHANNEL,
                "backend": "sim",
                "backend_version": "0",
                "active": {"version": VERSION},
            }
            self._publish(i, self.topics.status(d), encode(status), retain=True)

    def event(self, i: int) -> None:
        d = self.ids[i % len(self.ids)]
        e = new_event(d, EVENT_KINDS[i % len(EVENT_KINDS)], version=VERSION, channel=CHANNEL)
        self.sent_events.append(e["id"])
        self._publish(i, self.topics.events(d), encode(e))

    def telemetry(self, i: int) -> None:
        d = self.ids[i % len(self.ids)]
        now = time.time()
        histograms = self.histograms[i % len(self.histograms)]
        report = {
            "protocol": PROTOCOL_VERSION,
            "type": "telemetry",
            "device_id": d,
            "ts": now,
            "interval_s": 10.0,
            "interval_start": now - 10.0,
            "channel": CHANNEL,
            "model_version": VERSION,
            "count": 200,
            "p50_us": 400,
            "p90_us": 560,
            "p99_us": 700,
            "max_us": 900,
            "histograms": histograms,
        }
        self._publish(i, self.topics.telemetry(d), encode(report))

    def send_events(self, k: int) -> list[str]:
        """`k` events, spread over the devices; their ids."""
        start = len(self.sent_events)
        for i in range(k):
            self.event(i)
        return self.sent_events[start:]

    def run(self, rate: float, seconds: float, event_share: float = 0.2) -> float:
        """Events and telemetry at `rate` messages/s in all, for `seconds`; the rate achieved."""
        every = max(1, round(1 / event_share)) if event_share > 0 else 0
        t0 = time.monotonic()
        for n in itertools.count():
            due = t0 + n / rate
            now = time.monotonic()
            if now - t0 >= seconds:
                return n / (now - t0)
            if due > now:
                time.sleep(due - now)
            if every and n % every == 0:
                self.event(n)
            else:
                self.telemetry(n)
        raise AssertionError("unreachable")

    def flush(self, timeout: float = 60.0) -> None:
        """Until the broker has acknowledged everything published."""
        deadline = time.monotonic() + timeout
        for info in self.last.values():
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("the broker did not acknowledge everything")

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="mqtt://127.0.0.1:1883")
    p.add_argument("--prefix", default="edge")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--name", default="sim", help="device ids are NAME-00000...")
    p.add_argument("--rate", type=float, default=6000.0, help="messages per second, all devices together")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--bench", action="store_true", help="start mosquitto and collectors; print figures")
    args = p.parse_args()
    if args.bench:
        from scripts.fleet_bench import bench

        return bench(args.rate, args.seconds)
    sim = Simulator(args.url, args.prefix, args.devices, args.connections, args.name)
    sim.publish_status()
    print("running", flush=True)  # the benchmark's window starts here
    achieved = sim.run(args.rate, args.seconds)
    sim.flush()
    sim.close()
    print(f"sent {sim.sent} messages from {args.devices} devices at {achieved:.0f} messages/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
