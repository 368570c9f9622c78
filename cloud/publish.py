"""`fleet publish`: check the ONNX, upload it content-addressed, write the manifest, announce.

S3 layout (one bucket):
    models/<sha256>.onnx                    the model bytes
    golden/<sha256>.npz                     golden I/O for that model, when given
    manifests/<channel>/<version>.json      the manifest
    channels/<channel>/latest.json          the last announcement (its sequence is the floor
                                            for the next one)
    channels/<channel>/current.json         the last announcement to the whole channel (no
                                            targets): what a halted rollout rolls back to
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from botocore.exceptions import ClientError

from agent.contract.digest import sha256_file
from agent.contract.mqtt_client import client_for, host_port
from agent.contract.onnx_signature import check_onnx, signature
from agent.contract.protocol import Announcement, Manifest, ObjectRef, Topics, encode, name_problem
from agent.delivery.s3_fetch import s3_client
from agent.errors import AgentError, PublishError, RejectedModel, Unreachable
from cloud.config import FleetConfig


def publish(
    cfg: FleetConfig,
    model: Path,
    *,
    channel: str,
    version: str | None = None,
    golden: Path | None = None,
    extra: dict[str, Any] | None = None,
    sign_key: Path | None = None,
    targets: list[str] | None = None,
) -> Announcement:
    """Upload and announce; with `targets`, only those devices act on it (a rollout's canaries)."""
    _check_names(channel=channel, version=version)
    for device in targets or ():
        _check_names(device=device)
    try:
        proto = check_onnx(model)
    except RejectedModel as err:
        raise PublishError(f"{model}: {err.reason}") from err
    inputs, outputs = signature(proto)
    if golden is not None:
        check_golden_file(golden, [s.name for s in inputs], [s.name for s in outputs])
    s3 = s3_client(cfg.s3.endpoint_url, cfg.s3.region)
    sha = sha256_file(model).hexdigest()
    size = model.stat().st_size
    bucket = cfg.s3.bucket
    model_ref = ObjectRef(bucket, f"models/{sha}.onnx")
    _upload(s3, model, model_ref)
    golden_ref, golden_sha, golden_size = None, None, None
    if golden is not None:
        golden_ref = ObjectRef(bucket, f"golden/{sha}.npz")
        golden_sha, golden_size = sha256_file(golden).hexdigest(), golden.stat().st_size
        _upload(s3, golden, golden_ref)
    created = time.time()
    manifest = Manifest(
        version=version or time.strftime("%Y%m%d-%H%M%S", time.gmtime(created)),
        sha256=sha,
        size=size,
        model=model_ref,
        inputs=inputs,
        outputs=outputs,
        created_at=created,
        golden=golden_ref,
        golden_sha256=golden_sha,
        golden_size=golden_size,
        extra=extra or {},
    )
    s3.put_object(
        Bucket=bucket,
        Key=f"manifests/{channel}/{manifest.version}.json",
        Body=json.dumps(manifest.to_json(), indent=2).encode(),
        ContentType="application/json",
    )
    return announce(cfg, s3, channel, manifest, sign_key=sign_key, targets=targets)


def announce(
    cfg: FleetConfig,
    s3: Any,
    channel: str,
    manifest: Manifest,
    *,
    sign_key: Path | None = None,
    targets: list[str] | None = None,
) -> Announcement:
    """Sequence = max(last + 1, now in ms): grows even if the channel record were lost."""
    latest_key = f"channels/{channel}/latest.json"
    last = _read_json(s3, cfg.s3.bucket, latest_key)
    last_seq = int(last["sequence"]) if last else -1
    ann = Announcement(
        channel=channel,
        sequence=max(last_seq + 1, int(time.time() * 1000)),
        issued_at=time.time(),
        manifest=manifest,
        targets=None if targets is None else tuple(targets),
    )
    if sign_key is not None:
        from agent.contract.signing import load_private, sign

        ann = dataclasses.replace(ann, signature=sign(ann.to_json(), load_private(sign_key)))
    payload = encode(ann.to_json())
    s3.put_object(Bucket=cfg.s3.bucket, Key=latest_key, Body=payload, ContentType="application/json")
    if targets is None:
        s3.put_object(Bucket=cfg.s3.bucket, Key=_current_key(channel), Body=payload, ContentType="application/json")
    send_retained(cfg, Topics(cfg.mqtt.topic_prefix).announce(channel), payload)
    return ann


def send_retained(cfg: FleetConfig, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    m = cfg.mqtt
    client = client_for(f"fleet-publish-{hashlib.sha256(topic.encode()).hexdigest()[:8]}-{time.time_ns()}", m)
    host, port = host_port(m.url)
    try:
        client.connect(host, port, keepalive=m.keepalive_s)
    except OSError as err:
        raise Unreachable(
            f"cannot reach the broker at {m.url}: {err} (check mqtt.url and that the broker runs)"
        ) from err
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise PublishError(f"the broker did not acknowledge the announcement within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


def check_golden_file(path: Path, inputs: list[str], outputs: list[str]) -> None:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            lengths = {len(z[n]) for n in names}
    except Exception as err:
        raise PublishError(f"{path}: not a readable .npz: {err}") from err
    want = [f"inputs/{n}" for n in inputs] + [f"outputs/{n}" for n in outputs]
    missing = [n for n in want if n not in names]
    if missing:
        raise PublishError(f"{path}: golden file lacks {', '.join(missing)} (see docs/how-it-works.md, Golden I/O)")
    if len(lengths) != 1:
        raise PublishError(f"{path}: every golden array needs the same number of samples (first axis)")


def deploy_config_extra(path: Path, model: Path) -> dict[str, Any]:
    """The manifest field for a Go2 deploy config, checked against the model's I/O first."""
    from agent.go2.deploy import MANIFEST_KEY, load

    try:
        dc = load(path)
        inputs, outputs = signature(check_onnx(model))
    except (AgentError, RejectedModel) as err:
        raise PublishError(f"{path}: {err}") from err
    why = dc.check_io(inputs, outputs)
    if why:
        raise PublishError(f"{path} does not fit {model.name}: {why}")
    return {MANIFEST_KEY: dc.source}


def _check_names(**names: str | None) -> None:
    """Before anything is uploaded or announced: each name follows the one rule (NAME_RULE)."""
    for what, value in names.items():
        problem = None if value is None else name_problem(what, value)
        if problem:
            raise PublishError(problem)


def _upload(s3: Any, path: Path, ref: ObjectRef) -> None:
    try:
        s3.upload_file(str(path), ref.bucket, ref.key)
    except (ClientError, OSError) as err:
        raise PublishError(f"upload to s3://{ref.bucket}/{ref.key} failed: {err}") from err


def _read_json(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise PublishError(f"s3://{bucket}/{key}: {err}") from err
    result: dict[str, Any] = json.loads(body)
    return result


def _current_key(channel: str) -> str:
    return f"channels/{channel}/current.json"


def latest_announcement(cfg: FleetConfig, channel: str, s3: Any = None) -> dict[str, Any] | None:
    """The channel's last announcement, to anyone (its JSON; None before the first). `s3`: a
    client to reuse (making one costs about 0.1 s of CPU)."""
    s3 = s3 or s3_client(cfg.s3.endpoint_url, cfg.s3.region)
    return _read_json(s3, cfg.s3.bucket, f"channels/{channel}/latest.json")


def current_version(cfg: FleetConfig, channel: str) -> str | None:
    """The version last announced to the whole channel (None before the first)."""
    s3 = s3_client(cfg.s3.endpoint_url, cfg.s3.region)
    data = _read_json(s3, cfg.s3.bucket, _current_key(channel))
    if data is None:  # published before current.json existed: latest.json, when it targets all
        data = _read_json(s3, cfg.s3.bucket, f"channels/{channel}/latest.json")
        if data is not None and data.get("targets") is not None:
            return None
    return None if data is None else str(data["manifest"]["version"])


def rollback(cfg: FleetConfig, channel: str, version: str, sign_key: Path | None = None) -> Announcement:
    """Announce an earlier version again, with a new sequence number: every device follows it,
    downloading it again where it no longer stores it."""
    return announce_version(cfg, channel, version, sign_key)


def announce_version(
    cfg: FleetConfig,
    channel: str,
    version: str,
    sign_key: Path | None = None,
    targets: list[str] | None = None,
) -> Announcement:
    """Announce a version published on `channel` again, with a new sequence number, to every
    device or only `targets` (a rollout's promotion, or its canaries' rollback)."""
    _check_names(channel=channel, version=version)
    s3 = s3_client(cfg.s3.endpoint_url, cfg.s3.region)
    data = _read_json(s3, cfg.s3.bucket, f"manifests/{channel}/{version}.json")
    if data is None:
        raise PublishError(f"no version {version!r} was published on channel {channel!r}")
    return announce(cfg, s3, channel, Manifest.from_json(data), sign_key=sign_key, targets=targets)
