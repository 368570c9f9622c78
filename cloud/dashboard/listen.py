"""Where `fleet serve` listens: HOST:PORT, loopback unless the config allows more."""

from __future__ import annotations

import ipaddress

from agent.errors import ConfigError


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080', 'localhost:8080' -> (host, port); ConfigError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_listen(value: str, allow_remote: bool) -> tuple[str, int]:
    """The address to bind; a non-loopback one only with [serve] allow_remote = true (the pages have
    no login and no TLS: put a reverse proxy with both in front before opening them up)."""
    host, port = parse_listen(value)
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"listen address {value!r} is not loopback: the dashboard binds to loopback unless "
            "[serve] allow_remote = true is set in the fleet config"
        )
    return host, port
