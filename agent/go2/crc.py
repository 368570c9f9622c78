"""The LowCmd CRC the Go2 firmware checks (it silently drops a command whose CRC is wrong).

CRC-32, poly 0x04C11DB7, init 0xFFFFFFFF, MSB-first, no reflection, no final XOR, over the packed
message's 32-bit little-endian words, the crc word excluded. Feeding each word MSB-first is the
same as running the byte-wise CRC over the word's bytes in big-endian order, so a 256-entry table
does it."""

from __future__ import annotations

import struct
from typing import Any

POLY = 0x04C11DB7
# unitree_sdk2py's packing of LowCmd_ (4-byte aligned, little-endian, 812 bytes).
LOWCMD_FORMAT = struct.Struct("<4B4IH2x" + "B3x5f3I" * 20 + "4B" + "55Bx2I")


def _table() -> tuple[int, ...]:
    out = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ POLY) if crc & 0x80000000 else (crc << 1)
        out.append(crc & 0xFFFFFFFF)
    return tuple(out)


_TABLE = _table()


def crc32_words(data: bytes) -> int:
    """CRC over `data` read as little-endian 32-bit words (len(data) % 4 == 0)."""
    if len(data) % 4:
        raise ValueError("the CRC runs over whole 32-bit words")
    swapped = bytearray(data)
    swapped[0::4], swapped[1::4], swapped[2::4], swapped[3::4] = data[3::4], data[2::4], data[1::4], data[0::4]
    crc, table = 0xFFFFFFFF, _TABLE
    for b in swapped:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


def pack_lowcmd(cmd: Any) -> bytes:
    """The packed LowCmd_ (crc field included, as the firmware lays it out)."""
    values: list[Any] = [*cmd.head, cmd.level_flag, cmd.frame_reserve, *cmd.sn, *cmd.version, cmd.bandwidth]
    for m in cmd.motor_cmd:
        values += [m.mode, m.q, m.dq, m.tau, m.kp, m.kd, *m.reserve]
    values += [cmd.bms_cmd.off, *cmd.bms_cmd.reserve, *cmd.wireless_remote, *cmd.led, *cmd.fan]
    values += [cmd.gpio, cmd.reserve, cmd.crc]
    return LOWCMD_FORMAT.pack(*values)


def lowcmd_crc(cmd: Any) -> int:
    """The CRC to put in `cmd.crc` (a unitree_go LowCmd_)."""
    return crc32_words(pack_lowcmd(cmd)[:-4])
