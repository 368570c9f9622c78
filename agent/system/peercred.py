"""Who is on the other end of a Unix socket (SO_PEERCRED, SO_PEERGROUPS), and may they do this?

Connecting at all needs the socket's group (mode 0660). Reading (status, models) is then allowed;
anything that changes what the robot runs needs root, the service's own user, or the admin group."""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

READ_ONLY = frozenset({"status", "models", "history"})
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid, frozenset({gid, *_peer_groups(conn)}))


def _peer_groups(conn: socket.socket) -> list[int]:
    size = 4 * 256
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
    except OSError:  # old kernel: the primary group only
        return []
    return list(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4]))


def group_id(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class Authority:
    def __init__(self, admin_group: str) -> None:
        self.admin_group = admin_group
        self.admin_gid = group_id(admin_group)
        if self.admin_gid is None:
            log.info("group %r does not exist: only root and the service user may deploy", admin_group)

    def refusal(self, peer: Peer, cmd: str) -> str | None:
        """None when `peer` may run `cmd`; else the sentence to answer with."""
        if cmd in READ_ONLY or peer.uid in (0, os.getuid()):
            return None
        if self.admin_gid is not None and self.admin_gid in peer.groups:
            return None
        return f"{cmd!r} needs root or membership of the group {self.admin_group!r} (uid {peer.uid} has neither)"


def secure_socket(path: Path, group: str | None) -> None:
    """Mode 0660, and the configured group when there is one."""
    gid = group_id(group)
    if group and gid is None:
        log.warning("socket group %r does not exist; %s keeps the service's group", group, path)
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except OSError as err:  # the service user must be a member of that group
            log.warning("cannot give %s to group %r: %s", path, group, err)
    os.chmod(path, 0o660)
