"""Serving: the serving processes, their loop, the socket wire format, the swap, latency telemetry."""
