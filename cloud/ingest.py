"""The collector's writer: MQTT's thread only queues what arrives; one thread stores it in batches,
one transaction per batch, and only then acknowledges the QoS 1 messages (manual acks). A collector
killed in between has acknowledged nothing it had not committed: the broker delivers the rest again
to its persistent session, and the inserts are idempotent (events by id, telemetry and latency rows
by their natural key), so nothing is lost and nothing is stored twice."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.contract.protocol import IntervalHistogram, Topics, decode, telemetry_histograms
from agent.errors import ProtocolError
from cloud.fleetdb import FleetDB
from cloud.latency import decode as decode_histogram

log = logging.getLogger(__name__)

RETRY_S = 1.0  # a batch the database refused (locked by another writer, full disk) is tried again


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    mid: int
    qos: int


@dataclass(frozen=True)
class Parsed:
    """A checked message, ready to store: `kind` is status, events or telemetry."""

    device_id: str
    kind: str
    body: dict[str, Any]
    histograms: list[IntervalHistogram]


def parse(topics: Topics, topic: str, payload: bytes) -> Parsed:
    """ProtocolError (or KeyError, ValueError, TypeError) for anything the collector refuses."""
    device_id, kind = topics.parse_device_topic(topic)
    if kind == "status":
        return Parsed(device_id, kind, decode(payload, "status"), [])
    if kind == "events":
        event = decode(payload, "event")
        str(event["id"])  # an event without an id could not be deduplicated
        return Parsed(device_id, kind, event, [])
    report = decode(payload, "telemetry")
    histograms = telemetry_histograms(report)
    for h in histograms:
        decode_histogram(h.hdr)  # a histogram no reader could merge is refused here
    return Parsed(device_id, kind, report, histograms)


def store(db: FleetDB, parsed: list[Parsed]) -> Counter[str]:
    """Stores `parsed` in one transaction; how many of each kind, and the "duplicate" events (QoS 1
    delivered them twice)."""
    statuses = [(p.device_id, p.body) for p in parsed if p.kind == "status"]
    events = [(p.device_id, p.body) for p in parsed if p.kind == "events"]
    reports = [(p.device_id, p.body, p.histograms) for p in parsed if p.kind == "telemetry"]
    new = db.put_batch(statuses, events, reports)
    counts = Counter(status=len(statuses), events=new, duplicate=len(events) - new, telemetry=len(reports))
    return +counts  # the kinds there were


class BatchWriter:
    """Stores queued messages in batches of up to `max_batch`, or what came within `max_wait_s` of
    the batch's first message; `ack(mid, qos)` is called for each once its batch is committed."""

    def __init__(
        self,
        db: FleetDB,
        lock: threading.Lock,
        topics: Topics,
        ack: Callable[[int, int], object],
        *,
        max_batch: int = 500,
        max_wait_s: float = 0.1,
    ) -> None:
        self.db, self.lock, self.topics, self.ack = db, lock, topics, ack
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: queue.SimpleQueue[Received | None] = queue.SimpleQueue()
        self.stored: Counter[str] = Counter()  # by kind, and "duplicate" events
        self.ignored = self.batches = 0
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, msg: Received) -> None:
        self.queue.put(msg)

    def stop(self) -> None:
        """Store (and acknowledge) everything queued so far, then end the thread."""
        self.queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        done = False
        while not done:
            batch, done = self._next_batch()
            if batch:
                self._write(batch)

    def _next_batch(self) -> tuple[list[Received], bool]:
        first = self.queue.get()
        if first is None:
            return [], True
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                msg = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg is None:
                return batch, True
            batch.append(msg)
        return batch, False

    def _write(self, batch: list[Received]) -> None:
        parsed = [p for p in map(self._parse, batch) if p is not None]
        while True:
            try:
                with self.lock, self.db.transaction(), self.db.pipeline():
                    stored = store(self.db, parsed)
                break
            except Exception:  # sqlite3's or psycopg's: unacknowledged, so keep trying
                log.exception("storing a batch of %d messages failed; trying again in %.0f s", len(batch), RETRY_S)
                time.sleep(RETRY_S)
        for msg in batch:
            self.ack(msg.mid, msg.qos)
        self.stored.update(stored)
        self.batches += 1

    def _parse(self, msg: Received) -> Parsed | None:
        try:
            return parse(self.topics, msg.topic, msg.payload)
        except (ProtocolError, KeyError, ValueError, TypeError) as err:
            self.ignored += 1
            log.warning("ignored a payload on %s: %s", msg.topic, err)
            return None
