"""Durations as people write them in the config and on the command line: 90s, 10m, 24h, 7d, 2w."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds; ValueError naming the accepted forms."""
    m = _DURATION.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration (a positive number and one of s, m, h, d, w: 90s, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]
