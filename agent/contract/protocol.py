"""The wire contract shared by the agent and the cloud: topics, manifest, announcement, events,
telemetry and status payloads. Everything on MQTT is UTF-8 JSON with a `protocol` field."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ProtocolError

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "DTYPES",
    "NAME_RULE",
    "PROTOCOL_VERSION",
    "Announcement",
    "IntervalHistogram",
    "Manifest",
    "ObjectRef",
    "TensorSpec",
    "Topics",
    "check_name",
    "decode",
    "encode",
    "name_problem",
    "new_event",
    "now",
    "safe_name",
    "signature_diff",
    "telemetry_histograms",
]

PROTOCOL_VERSION = 1

# One rule for every name that travels or becomes part of a key, a topic or a path: versions,
# channels, device ids, groups, rollouts. Checked where a name enters (CLI, config, network, drop folder).
NAME_RULE = "1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or a digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_TOPIC_PREFIX = "edge"

# ONNX element types we accept, by the numpy dtype names used on the wire.
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool")


class Topics:
    """All topic names in one place. `prefix` lets several fleets (or tests) share a broker."""

    def __init__(self, prefix: str = DEFAULT_TOPIC_PREFIX) -> None:
        self.prefix = prefix.rstrip("/")

    def announce(self, channel: str) -> str:
        return f"{self.prefix}/v1/channels/{channel}/announce"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/v1/devices/{device_id}/status"

    def events(self, device_id: str) -> str:
        return f"{self.prefix}/v1/devices/{device_id}/events"

    def telemetry(self, device_id: str) -> str:
        return f"{self.prefix}/v1/devices/{device_id}/telemetry"

    def all_devices(self) -> str:
        return f"{self.prefix}/v1/devices/+/+"

    def parse_device_topic(self, topic: str) -> tuple[str, str]:
        """`<prefix>/v1/devices/<id>/<kind>` -> (id, kind)."""
        head = f"{self.prefix}/v1/devices/"
        if not topic.startswith(head):
            raise ProtocolError(f"not a device topic: {topic}")
        device_id, _, kind = topic[len(head) :].partition("/")
        if not device_id or kind not in ("status", "events", "telemetry"):
            raise ProtocolError(f"not a device topic: {topic}")
        return check_name("device_id", device_id), kind


def name_problem(what: str, value: object) -> str | None:
    """Why `value` is no valid name (NAME_RULE), in one line naming `what`; None when it is one."""
    if isinstance(value, str) and _NAME.fullmatch(value):
        return None
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{what} {shown} is not a valid name: use {NAME_RULE}"


def check_name(what: str, value: object) -> str:
    """`value` when it follows NAME_RULE; else ProtocolError (a payload read from the network)."""
    problem = name_problem(what, value)
    if problem:
        raise ProtocolError(problem)
    return str(value)


def safe_name(text: str) -> str:
    """A valid name made from `text` (a file name, say): other characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text)[:64]
    return name if _NAME.fullmatch(name) else ("m" + name)[:64]


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]  # str = symbolic dimension, None = unknown

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(d: Any) -> TensorSpec:
        obj = _obj(d, "tensor")
        name, dtype, shape = _str(obj, "name"), _str(obj, "dtype"), obj.get("shape")
        if dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, (int, str)) or s is None for s in shape):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of ints, names or nulls")
        return TensorSpec(name, dtype, tuple(shape))

    def concrete_shape(self, dynamic: int = 1) -> tuple[int, ...]:
        return tuple(s if isinstance(s, int) and s >= 0 else dynamic for s in self.shape)


def signature_diff(expected: list[TensorSpec], actual: list[TensorSpec], what: str) -> str | None:
    """A sentence saying how two I/O lists differ, or None when they match."""
    if expected == actual:
        return None
    return (
        f"{what} differ: expected {', '.join(_spec_str(s) for s in expected)}; "
        f"got {', '.join(_spec_str(s) for s in actual)}"
    )


def _spec_str(s: TensorSpec) -> str:
    dims = "x".join("?" if d is None else str(d) for d in s.shape)
    return f"{s.name}:{s.dtype}[{dims}]"


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key}

    @staticmethod
    def from_json(d: Any) -> ObjectRef:
        obj = _obj(d, "object reference")
        return ObjectRef(_str(obj, "bucket"), _str(obj, "key"))


@dataclass(frozen=True)
class Manifest:
    """What the cloud says about one model build. Content-addressed by sha256."""

    version: str
    sha256: str
    size: int
    model: ObjectRef
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    created_at: float
    golden: ObjectRef | None = None
    golden_sha256: str | None = None
    golden_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # later issues: tolerances, budgets, deploy config

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "model": self.model.to_json(),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "created_at": self.created_at,
            "golden": self.golden.to_json() if self.golden else None,
            "golden_sha256": self.golden_sha256,
            "golden_size": self.golden_size,
        }
        d.update(self.extra)
        return d

    @staticmethod
    def from_json(d: Any, check_names: bool = True) -> Manifest:
        """`check_names=False` only for records this device stored itself before the naming rule."""
        obj = _obj(d, "manifest")
        known = {
            "version",
            "sha256",
            "size",
            "model",
            "inputs",
            "outputs",
            "created_at",
            "golden",
            "golden_sha256",
            "golden_size",
        }
        sha = _str(obj, "sha256")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ProtocolError("manifest.sha256 must be 64 lowercase hex digits")
        size = obj.get("size")
        if not isinstance(size, int) or size < 0:
            raise ProtocolError("manifest.size must be a non-negative integer")
        golden = obj.get("golden")
        version = _str(obj, "version")
        if check_names:
            check_name("manifest.version", version)
        return Manifest(
            version=version,
            sha256=sha,
            size=size,
            model=ObjectRef.from_json(obj.get("model")),
            inputs=[TensorSpec.from_json(t) for t in _list(obj, "inputs")],
            outputs=[TensorSpec.from_json(t) for t in _list(obj, "outputs")],
            created_at=_num(obj, "created_at"),
            golden=ObjectRef.from_json(golden) if golden is not None else None,
            golden_sha256=obj.get("golden_sha256") if golden is not None else None,
            golden_size=obj.get("golden_size") if golden is not None else None,
            extra={k: v for k, v in obj.items() if k not in known},
        )


MAX_TARGETS = 10_000  # device ids one announcement may name


@dataclass(frozen=True)
class Announcement:
    """A channel's 'this is the model to run now'. `sequence` only grows per channel. `targets`,
    when given, names the only devices that act on it (a rollout's canaries); None means all."""

    channel: str
    sequence: int
    issued_at: float
    manifest: Manifest
    signature: dict[str, Any] | None = None  # filled by signed publishes (see the security issue)
    targets: tuple[str, ...] | None = None

    def targets_device(self, device_id: str) -> bool:
        return self.targets is None or device_id in self.targets

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "type": "announcement",
            "channel": self.channel,
            "sequence": self.sequence,
            "issued_at": self.issued_at,
            "manifest": self.manifest.to_json(),
        }
        if self.targets is not None:  # absent, not null: older agents' payloads stay as they were
            d["targets"] = list(self.targets)
        if self.signature is not None:
            d["signature"] = self.signature
        return d

    @staticmethod
    def from_json(d: Any) -> Announcement:
        obj = _obj(d, "announcement")
        _check_header(obj, "announcement")
        seq = obj.get("sequence")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ProtocolError("announcement.sequence must be a non-negative integer")
        return Announcement(
            channel=check_name("announcement.channel", _str(obj, "channel")),
            sequence=seq,
            issued_at=_num(obj, "issued_at"),
            manifest=Manifest.from_json(obj.get("manifest")),
            signature=obj.get("signature"),
            targets=_targets(obj.get("targets")),
        )


def _targets(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TARGETS:
        raise ProtocolError(f"announcement.targets must be a list of at most {MAX_TARGETS} device ids")
    return tuple(check_name("announcement.targets[]", t) for t in raw)


MAX_HDR_CHARS = 64 * 1024  # an interval's encoded histogram is a few hundred bytes


@dataclass(frozen=True)
class IntervalHistogram:
    """One entry of a telemetry message's `histograms`: the latency samples one model version
    served in the interval, in HdrHistogram's compressed encoding (base64 text)."""

    model_version: str | None
    channel: str | None
    count: int
    hdr: str
    start: float  # the interval's bounds, wall clock
    end: float


def telemetry_histograms(obj: dict[str, Any]) -> list[IntervalHistogram]:
    """The histograms of a decoded telemetry message; [] for a message from an older agent."""
    raw = obj.get("histograms")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ProtocolError("telemetry.histograms must be a list")
    end = _num(obj, "ts")
    start = float(obj["interval_start"]) if isinstance(obj.get("interval_start"), (int, float)) else None
    if start is None:
        start = end - _num(obj, "interval_s")
    return [_interval_histogram(_obj(h, "telemetry.histograms[]"), obj, start, end) for h in raw]


def _interval_histogram(h: dict[str, Any], msg: dict[str, Any], start: float, end: float) -> IntervalHistogram:
    hdr, count = h.get("hdr"), h.get("count")
    if not isinstance(hdr, str) or not 0 < len(hdr) <= MAX_HDR_CHARS:
        raise ProtocolError(f"telemetry.histograms[].hdr must be base64 text of at most {MAX_HDR_CHARS} characters")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ProtocolError("telemetry.histograms[].count must be a non-negative integer")
    version, channel = h.get("model_version"), h.get("channel", msg.get("channel"))
    return IntervalHistogram(
        model_version=None if version is None else check_name("telemetry.histograms[].model_version", version),
        channel=None if channel is None else check_name("telemetry.histograms[].channel", channel),
        count=count,
        hdr=hdr,
        start=start,
        end=end,
    )


def new_event(device_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A lifecycle event. `id` lets the collector drop the duplicates QoS 1 may deliver."""
    return {
        "protocol": PROTOCOL_VERSION,
        "type": "event",
        "id": uuid.uuid4().hex,
        "device_id": device_id,
        "kind": kind,
        "ts": now(),
        **fields,
    }


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def decode(raw: bytes, expected_type: str) -> dict[str, Any]:
    """Parse and check the header of a JSON payload; ProtocolError on anything foreign."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}") from err
    obj = _obj(obj, expected_type)
    _check_header(obj, expected_type)
    return obj


def _check_header(obj: dict[str, Any], expected_type: str) -> None:
    if obj.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('protocol')!r}")
    if obj.get("type") != expected_type:
        raise ProtocolError(f"expected a {expected_type}, got type {obj.get('type')!r}")


def _obj(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return d


def _str(obj: dict[str, Any], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise ProtocolError(f"{key} must be a non-empty string")
    return v


def _num(obj: dict[str, Any], key: str) -> float:
    v = obj.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ProtocolError(f"{key} must be a number")
    try:
        return float(v)
    except OverflowError as err:
        raise ProtocolError(f"{key} is out of range") from err


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    v = obj.get(key)
    if not isinstance(v, list) or not v:
        raise ProtocolError(f"{key} must be a non-empty list")
    return v
