"""The inference socket's wire protocol (Unix stream socket), shared by the server and
`agent.client`. Little-endian, length-prefixed binary frames; see docs/protocol.md.

    frame    := u32 body_len | body
    request  := u8 kind (1 INFER, 2 INFO) | u32 request_id | [INFER: u16 count | tensor*count]
    response := u8 kind (0x81 RESULT, 0x82 INFO, 0xFF ERROR) | u32 request_id
                | u8 version_len | version (utf-8: the model version that answered)
                | RESULT: u16 count | tensor*count
                | INFO:   u32 json_len | json (utf-8)
                | ERROR:  u16 msg_len | msg (utf-8)
    tensor   := u8 name_len | name (utf-8) | u8 dtype | u8 ndim | u32 dim*ndim
                | data (C order, little-endian, prod(dims) * itemsize bytes)
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from agent.errors import ProtocolError

MAX_FRAME = 64 * 1024 * 1024
INFER, INFO = 1, 2
RESULT, INFO_REPLY, ERROR = 0x81, 0x82, 0xFF

DTYPE_CODES = ["float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool"]
_CODE_OF = {np.dtype(n): i for i, n in enumerate(DTYPE_CODES)}
_DTYPE_OF = [np.dtype(n).newbyteorder("<") for n in DTYPE_CODES]

_LEN = struct.Struct("<I")
_HEAD = struct.Struct("<BI")
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")


def pack_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    parts = [_U16.pack(len(tensors))]
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        head, wire_dtype = _tensor_head(name, a.dtype, a.shape)
        parts.append(head)
        parts.append(a.astype(wire_dtype, copy=False).tobytes())
    return b"".join(parts)


@functools.lru_cache(maxsize=256)
def _tensor_head(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, np.dtype]:
    """A tensor's header bytes; cached, since a controller sends the same shapes every call."""
    code = _CODE_OF.get(dtype.newbyteorder("="))  # the kind; astype fixes the byte order
    if code is None:
        raise ProtocolError(f"tensor {name!r}: dtype {dtype} is not supported on the wire")
    nb = name.encode()
    return _U8.pack(len(nb)) + nb + struct.pack(f"<BB{len(shape)}I", code, len(shape), *shape), _DTYPE_OF[code]


def unpack_tensors(buf: memoryview, off: int) -> dict[str, np.ndarray]:
    """ProtocolError on any malformed input (short, bad utf-8 name, shape/data mismatch)."""
    try:
        return _unpack_tensors(buf, off)
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"malformed tensors: {err}") from err


def _unpack_tensors(buf: memoryview, off: int) -> dict[str, np.ndarray]:
    (count,) = _U16.unpack_from(buf, off)
    off += 2
    out: dict[str, np.ndarray] = {}
    for _ in range(count):
        (nlen,) = _U8.unpack_from(buf, off)
        ndim = buf[off + 2 + nlen] if off + 2 + nlen < len(buf) else 0
        head_len = 3 + nlen + 4 * ndim
        name, dt, shape, n = _parse_head(bytes(buf[off : off + head_len]))
        off += head_len
        end = off + n * dt.itemsize
        if end > len(buf):
            raise ProtocolError(f"tensor {name!r}: frame too short for shape {shape}")
        out[name] = np.frombuffer(buf, dtype=dt, count=n, offset=off).reshape(shape)
        off = end
    return out


@functools.lru_cache(maxsize=256)
def _parse_head(head: bytes) -> tuple[str, np.dtype, tuple[int, ...], int]:
    nlen = head[0]
    try:
        name = head[1 : 1 + nlen].decode()
        code, ndim = struct.unpack_from("<BB", head, 1 + nlen)
        shape = struct.unpack_from(f"<{ndim}I", head, 3 + nlen)
    except (UnicodeDecodeError, struct.error) as err:
        raise ProtocolError(f"malformed tensor header: {err}") from err
    if code >= len(_DTYPE_OF):
        raise ProtocolError(f"tensor {name!r}: unknown dtype code {code}")
    return name, _DTYPE_OF[code], shape, int(np.prod(shape, dtype=np.int64)) if ndim else 1


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def request(kind: int, request_id: int, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    body = _HEAD.pack(kind, request_id)
    if kind == INFER:
        body += pack_tensors(tensors or {})
    return frame(body)


def response_head(kind: int, request_id: int, version: str) -> bytes:
    vb = version.encode()[:255]
    return _HEAD.pack(kind, request_id) + _U8.pack(len(vb)) + vb


def result(request_id: int, version: str, tensors: dict[str, np.ndarray]) -> bytes:
    return frame(response_head(RESULT, request_id, version) + pack_tensors(tensors))


def info(request_id: int, version: str, payload: bytes) -> bytes:
    return frame(response_head(INFO_REPLY, request_id, version) + _U32.pack(len(payload)) + payload)


def error(request_id: int, version: str, message: str) -> bytes:
    mb = message.encode()[:65535]
    return frame(response_head(ERROR, request_id, version) + _U16.pack(len(mb)) + mb)


def split_frames(buf: bytearray) -> list[bytes]:
    """Cut the complete frames off the front of `buf` (mutates it)."""
    frames = []
    off = 0
    while len(buf) - off >= 4:
        (n,) = _LEN.unpack_from(buf, off)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME} limit")
        if len(buf) - off - 4 < n:
            break
        frames.append(bytes(buf[off + 4 : off + 4 + n]))
        off += 4 + n
    del buf[:off]
    return frames


def parse_head(body: bytes) -> tuple[int, int]:
    if len(body) < _HEAD.size:
        raise ProtocolError("frame shorter than its header")
    kind, rid = _HEAD.unpack_from(body, 0)
    return kind, rid


def parse_response(body: bytes) -> tuple[int, int, str, memoryview, int]:
    """-> (kind, request_id, version, buffer, offset of the kind-specific part)."""
    kind, rid = parse_head(body)
    (vlen,) = _U8.unpack_from(body, _HEAD.size)
    start = _HEAD.size + 1
    version = body[start : start + vlen].decode()
    return kind, rid, version, memoryview(body), start + vlen
