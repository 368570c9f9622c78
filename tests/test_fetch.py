"""The S3 download against moto's real HTTP server: ranged resume, ETag change, verification."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest

from agent.contract.protocol import ObjectRef
from agent.delivery.s3_fetch import Wanted, fetch, s3_client
from agent.errors import FetchError
from scripts.loopback.services import MotoS3

DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def bucket(s3: MotoS3) -> str:
    name = f"fetch-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    return name


def put(s3: MotoS3, bucket: str, data: bytes) -> ObjectRef:
    s3.client().put_object(Bucket=bucket, Key="m.onnx", Body=data)
    return ObjectRef(bucket, "m.onnx")


def get(s3: MotoS3, ref: ObjectRef, dest: Path, data: bytes, sha: str | None = None) -> list[int]:
    seen: list[int] = []
    want = Wanted(ref, dest, sha or hashlib.sha256(data).hexdigest(), len(data))
    fetch(s3_client(s3.url, "us-east-1"), want, reserve_bytes=0, progress=lambda done, _t: seen.append(done))
    return seen


def test_resumes_from_the_part_offset(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    ref = put(s3, bucket, DATA)
    dest = tmp_path / "m.onnx"
    etag = s3.client().head_object(Bucket=bucket, Key="m.onnx")["ETag"]
    dest.with_name("m.onnx.part").write_bytes(DATA[:300_000])
    dest.with_name("m.onnx.part.etag").write_text(etag)
    seen = get(s3, ref, dest, DATA)
    assert seen[0] > 300_000 and seen[-1] == len(DATA)  # only the rest came over the wire
    assert dest.read_bytes() == DATA and not dest.with_name("m.onnx.part").exists()


def test_changed_object_restarts_from_zero(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    dest = tmp_path / "m.onnx"
    dest.with_name("m.onnx.part").write_bytes(b"\0" * 300_000)  # from an older object version
    dest.with_name("m.onnx.part.etag").write_text('"an-old-etag"')
    new = DATA[::-1]
    get(s3, put(s3, bucket, new), dest, new)
    assert dest.read_bytes() == new


def test_if_match_guards_a_resume_against_a_replaced_object(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    ref = put(s3, bucket, DATA)
    c = s3.client()
    etag = c.head_object(Bucket=bucket, Key="m.onnx")["ETag"]
    put(s3, bucket, DATA[::-1])
    with pytest.raises(c.exceptions.ClientError, match="PreconditionFailed|412"):
        c.get_object(Bucket=bucket, Key=ref.key, Range="bytes=10-", IfMatch=etag)


def test_hash_mismatch_leaves_nothing(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    dest = tmp_path / "m.onnx"
    with pytest.raises(FetchError, match="sha256 mismatch"):
        get(s3, put(s3, bucket, DATA), dest, DATA, sha="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_disk_reserve(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not enough disk"):
        want = Wanted(put(s3, bucket, DATA), tmp_path / "m.onnx", "0" * 64, len(DATA))
        fetch(s3_client(s3.url, "us-east-1"), want, reserve_bytes=2**62, progress=lambda *_: None)


def test_a_download_cap_paces_the_transfer(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    data = DATA * 3
    ref = put(s3, bucket, data)
    t0 = time.monotonic()
    want = Wanted(ref, tmp_path / "m.onnx", hashlib.sha256(data).hexdigest(), len(data))
    fetch(s3_client(s3.url, "us-east-1"), want, reserve_bytes=0, progress=lambda _d, _t: None, max_mbps=10.0)
    took = time.monotonic() - t0
    assert (tmp_path / "m.onnx").read_bytes() == data
    assert took >= len(data) / 10e6, f"{len(data)} bytes at 10 MB/s took only {took:.2f} s"
