from __future__ import annotations

import json

import numpy as np
import pytest

from agent.contract.protocol import Announcement, Manifest, ObjectRef, TensorSpec, Topics, decode, encode
from agent.errors import ProtocolError
from agent.serving import wire

SHA = "ab" * 32


def manifest(**kw: object) -> Manifest:
    base = dict(
        version="v1",
        sha256=SHA,
        size=10,
        model=ObjectRef("b", "models/x.onnx"),
        inputs=[TensorSpec("obs", "float32", (1, 48))],
        outputs=[TensorSpec("actions", "float32", (1, 12))],
        created_at=1.0,
    )
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


def test_announcement_round_trip() -> None:
    ann = Announcement("walk", 7, 2.0, manifest(extra={"latency_budget_us": 900}))
    back = Announcement.from_json(decode(encode(ann.to_json()), "announcement"))
    assert back == ann and back.manifest.extra == {"latency_budget_us": 900}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"protocol": 2, "type": "announcement"}).encode(), "protocol version"),
        (json.dumps({"protocol": 1, "type": "status"}).encode(), "expected a announcement"),
    ],
)
def test_foreign_payloads_are_protocol_errors(payload: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode(payload, "announcement")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sha256": "xyz"}, "sha256"),
        ({"size": -1}, "size"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "x", "dtype": "complex64", "shape": [1]}]}, "dtype"),
    ],
)
def test_bad_manifests(change: dict[str, object], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        Manifest.from_json({**manifest().to_json(), **change})


def test_bad_sequence() -> None:
    d = Announcement("walk", 1, 0.0, manifest()).to_json()
    with pytest.raises(ProtocolError, match="sequence"):
        Announcement.from_json({**d, "sequence": "1"})


def test_topics() -> None:
    t = Topics("lab")
    assert t.announce("walk") == "lab/v1/channels/walk/announce"
    assert t.parse_device_topic(t.events("go2-1")) == ("go2-1", "events")
    with pytest.raises(ProtocolError):
        t.parse_device_topic("lab/v1/devices/go2-1/other")


def test_wire_round_trip_all_dtypes() -> None:
    tensors = {n: np.arange(6).reshape(2, 3).astype(n) for n in wire.DTYPE_CODES}
    tensors["big_endian"] = np.arange(3, dtype=">f4")
    body = wire.split_frames(bytearray(wire.request(wire.INFER, 9, tensors)))[0]
    assert wire.parse_head(body) == (wire.INFER, 9)
    back = wire.unpack_tensors(memoryview(body), 5)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(back[name], arr)
    assert back["big_endian"].dtype == np.dtype("<f4")


def test_wire_split_keeps_partial_frames() -> None:
    frame = wire.request(wire.INFO, 1)
    buf = bytearray(frame + frame[:3])
    assert len(wire.split_frames(buf)) == 1 and bytes(buf) == frame[:3]


def test_wire_rejects_oversized_and_short_frames() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.split_frames(bytearray(wire._LEN.pack(wire.MAX_FRAME + 1)))
    body = wire.split_frames(bytearray(wire.request(wire.INFER, 1, {"x": np.zeros(100, np.float32)})))[0]
    with pytest.raises(ProtocolError, match="too short"):
        wire.unpack_tensors(memoryview(body[:-8]), 5)
