"""The remote's sticks as the velocity command (`[go2] command_source = "remote"`). The robot fills
LowState.wireless_remote (Unitree's simulator writes the same layout, unitree_sdk2py_bridge.py):
keys u16 at [2:4], then float32 little-endian lx [4:8], rx [8:12], ry [12:16], ly [20:24], each -1..1.
Left stick forward/back and sideways, right stick left/right turns. A dead band keeps a resting
stick at zero, the deploy config's `command_limits` scale the full stick, and a rate limit keeps a
jerked stick from being a step in the command the policy sees."""

from __future__ import annotations

import struct

import numpy as np

DEAD_BAND = 0.08
RATE_LIMIT = np.array([1.0, 1.0, 2.0])  # the command changes by at most this per second (m/s², m/s², rad/s²)


def sticks(remote: bytes) -> tuple[float, float, float, float]:
    """(lx, ly, rx, ry) from LowState.wireless_remote; zeros when there is none (no remote)."""
    if len(remote) < 24:
        return 0.0, 0.0, 0.0, 0.0
    lx, rx, ry = struct.unpack_from("<fff", remote, 4)
    (ly,) = struct.unpack_from("<f", remote, 20)
    return lx, ly, rx, ry


def target(remote: bytes, limits: np.ndarray) -> np.ndarray:
    """The command the sticks ask for: vx from ly, vy from -lx, wz from -rx, within `limits`."""
    lx, ly, rx, _ry = sticks(remote)
    raw = np.array([ly, -lx, -rx], np.float64)
    raw = np.where(np.isfinite(raw), raw, 0.0)  # a garbled message is a resting stick
    live = np.where(np.abs(raw) < DEAD_BAND, 0.0, (np.abs(raw) - DEAD_BAND) / (1 - DEAD_BAND) * np.sign(raw))
    return np.clip(live, -1.0, 1.0) * limits


def toward(current: np.ndarray, wanted: np.ndarray, dt: float) -> np.ndarray:
    """One control period's step from `current` toward `wanted`, no faster than RATE_LIMIT."""
    step = RATE_LIMIT * dt
    return current + np.clip(wanted - current, -step, step)
