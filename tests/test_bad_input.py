"""Bad input gets a clear reason and loses nothing: each case is rejected, shows in `agent status`
and in `fleet events`, and the active model keeps serving a client that never sees a failure."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from agent.contract.protocol import Announcement, Manifest, Topics, encode
from agent.delivery.s3_fetch import s3_client
from cloud import config as fleet_config
from cloud.publish import announce, send_retained
from tests.conftest import Fleet, mlp, wait_for
from tests.test_end_to_end import start_load, stop_load

pytestmark = pytest.mark.integration


def crafted(fleet: Fleet, base: dict[str, Any], **changes: Any) -> Announcement:
    cfg = fleet_config.load(fleet.fleet_cfg)
    manifest = Manifest.from_json({**base, **changes})
    return announce(cfg, s3_client(cfg.s3.endpoint_url, cfg.s3.region), fleet.channel, manifest)


def upload(fleet: Fleet, key: str, data: bytes) -> dict[str, str]:
    fleet.s3.client().put_object(Bucket=fleet.bucket, Key=key, Body=data)
    return {"bucket": fleet.bucket, "key": key}


def rejected_everywhere(fleet: Fleet, cfg: Path, version: str, words: str) -> None:
    reason = fleet.wait_rejected(cfg, version)
    assert words in reason, reason
    wait_for(
        lambda: any(
            e.get("version") == version and e.get("state") == "rejected" and words in e["reason"]
            for e in fleet.events("go2-bad")
        ),
        20,
        f"{version} rejected in fleet events",
    )


def test_each_bad_input_is_rejected_and_v2_keeps_serving(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_collector()
    cfg = fleet.agent_config("go2-bad")
    fleet.start_agent(cfg)
    v1 = fleet.publish(mlp(tmp_path / "v1.onnx", seed=1), "v1")
    fleet.wait_active(cfg, "v1")
    v2_path = mlp(tmp_path / "v2.onnx", seed=2)
    v2 = fleet.publish(v2_path, "v2")
    fleet.wait_active(cfg, "v2")
    load, out = start_load(fleet, cfg, hz=200)
    base = v2["manifest"]

    # Malformed or foreign MQTT payloads: logged, counted, ignored, reported.
    topic = Topics(fleet.prefix).announce(fleet.channel)
    send_retained(fleet_config.load(fleet.fleet_cfg), topic, b"\xff not json")
    wait_for(lambda: fleet.status(cfg)["ignored_payloads"] >= 1, 20, "ignored payload counted")
    assert "not JSON" in fleet.status(cfg)["last_ignored_payload"]
    wait_for(lambda: any(e["kind"] == "payload_ignored" for e in fleet.events("go2-bad")), 20, "payload event")

    # An announcement older than the last handled one.
    old = Announcement.from_json(
        {
            "protocol": 1,
            "type": "announcement",
            "channel": fleet.channel,
            "sequence": v1["sequence"],
            "issued_at": 0,
            "manifest": {**base, "version": "replayed"},
        }
    )
    send_retained(fleet_config.load(fleet.fleet_cfg), topic, encode(old.to_json()))
    rejected_everywhere(fleet, cfg, "replayed", "stale announcement")

    # A manifest whose sha256 does not match the bytes.
    crafted(fleet, base, version="bad-sha", sha256=hashlib.sha256(b"other").hexdigest())
    rejected_everywhere(fleet, cfg, "bad-sha", "sha256 mismatch")

    # A missing S3 object; a truncated one.
    # (Each names bytes this device does not hold yet: a model it already has is not downloaded again.)
    v3 = mlp(tmp_path / "v3.onnx", seed=4).read_bytes()
    v3_sha = hashlib.sha256(v3).hexdigest()
    crafted(fleet, base, version="missing", sha256=v3_sha, model={"bucket": fleet.bucket, "key": "models/nope.onnx"})
    rejected_everywhere(fleet, cfg, "missing", "does not exist")
    crafted(
        fleet,
        base,
        version="truncated",
        sha256=v3_sha,
        size=len(v3),
        model=upload(fleet, "models/trunc.onnx", v3[: len(v3) // 2]),
    )
    rejected_everywhere(fleet, cfg, "truncated", "the manifest says")

    # Not enough disk for what the manifest announces.
    crafted(fleet, base, version="huge", sha256=v3_sha, size=2**50)
    rejected_everywhere(fleet, cfg, "huge", "not enough disk")

    # Bytes that match their manifest but are no ONNX model.
    junk = b"\x08\x07garbage" * 1000
    crafted(
        fleet,
        base,
        version="junk",
        sha256=hashlib.sha256(junk).hexdigest(),
        size=len(junk),
        model=upload(fleet, "models/junk.onnx", junk),
    )
    rejected_everywhere(fleet, cfg, "junk", "not a valid ONNX model")

    # A model whose I/O signature differs from the active one; one that returns NaN.
    fleet.publish(mlp(tmp_path / "narrow.onnx", dims=(45, 64, 12)), "narrow")
    rejected_everywhere(fleet, cfg, "narrow", "differs from the active model")
    fleet.publish(mlp(tmp_path / "nan.onnx", seed=3, nan=True), "nan")
    rejected_everywhere(fleet, cfg, "nan", "non-finite")

    seen = stop_load(load, out)
    assert seen["failed"] == 0, seen["failures"]
    assert seen["versions"] == {"v2": seen["ok"]}
    assert fleet.status(cfg)["active"]["version"] == "v2"


def test_publish_refuses_an_invalid_onnx(fleet: Fleet, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not a model")
    r = fleet.fleet("publish", str(bad), "--channel", fleet.channel, check=False)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "not a valid ONNX model" in r.stderr
    assert "Contents" not in fleet.s3.client().list_objects_v2(Bucket=fleet.bucket)
