"""paho's client, reading every packet the socket holds per wake-up.

paho's loop_read() sizes its reads by the QoS 2 and outgoing messages in flight, so a QoS 1
subscriber reads one packet per select(): at thousands of messages a second that select(), and the
GIL hand-over around each system call, cost the collector more than parsing and storing did
(59 against 35 µs of CPU a message, draining a queued session). This reads until the socket has
nothing left, up to a bound that keeps pings and writes going under a flood."""

from __future__ import annotations

import paho.mqtt.client as mqtt

MAX_PACKETS = 1000  # a read burst; then the loop writes (acks, pings) before reading on


class BulkReadClient(mqtt.Client):
    def loop_read(self, max_packets: int = MAX_PACKETS) -> mqtt.MQTTErrorCode:
        # paho's own checks and calls, looped: `_packet_read` returns MQTT_ERR_AGAIN once the
        # socket (or TLS's buffer) is empty.
        for _ in range(max(max_packets, 1)):
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                break
            if rc > 0:
                return self._loop_rc_handle(rc)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
