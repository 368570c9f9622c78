"""Resumable, verified, atomic S3 download.

Bytes land in `<dest>.part`, hashed while streaming; `<dest>.part.etag` remembers which object
version they came from. A restart resumes with a ranged GET that requires the same ETag (IfMatch)
and starts again from 0 if the object changed. `dest` appears only once its sha256 matches."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from agent.contract.digest import sha256_file
from agent.contract.protocol import ObjectRef
from agent.errors import DiskFull, FetchError
from agent.proc import durable

log = logging.getLogger(__name__)

CHUNK = 1 << 16
ATTEMPTS = 5  # tries in a row that bring no new byte (a flaky link that makes progress goes on)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Wanted:
    """An object to download: where it is, where it goes, what it must be."""

    ref: ObjectRef
    dest: Path
    sha256: str
    size: int


def fetch(s3: Any, want: Wanted, *, reserve_bytes: int, progress: Progress, max_mbps: float = 0.0) -> None:
    """Download `want.ref` to `want.dest`, verified against its sha256 and size, at most `max_mbps`
    MB/s (0: no cap). Raises FetchError."""
    ref, dest, sha256, size = want.ref, want.dest, want.sha256, want.size
    if dest.exists() and sha256_file(dest).hexdigest() == sha256:
        return
    part, etag_file = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.etag")
    _check_disk(dest.parent, size - (part.stat().st_size if part.exists() else 0), reserve_bytes)
    etag = _head(s3, ref, size)
    if not etag_file.exists() or etag_file.read_text() != etag:
        part.unlink(missing_ok=True)  # no record of its source, or the object changed: start over
        etag_file.write_text(etag)
    elif part.exists():
        log.info("resuming s3://%s/%s from byte %d of %d", ref.bucket, ref.key, part.stat().st_size, size)
    hasher = hashlib.sha256()
    attempt, had = 0, -1
    while True:
        have = part.stat().st_size if part.exists() else 0
        attempt = 1 if have > had else attempt + 1  # only tries that brought nothing count
        had = have
        try:
            hasher = sha256_file(part) if part.exists() else hashlib.sha256()  # what is already there
            _stream(s3, want, part, etag, hasher=hasher, progress=progress, max_mbps=max_mbps)
            break
        except (BotoCoreError, ClientError, OSError) as err:
            if durable.no_space(err):
                part.unlink(missing_ok=True)  # frees what it took; the next try starts over
                etag_file.unlink(missing_ok=True)
                raise DiskFull(f"no space left for s3://{ref.bucket}/{ref.key} in {dest.parent}: {err}") from err
            if _is_precondition_failed(err):
                log.info("%s changed since the .part was started: downloading from 0", ref.key)
                part.unlink(missing_ok=True)
                etag = _head(s3, ref, size)
                etag_file.write_text(etag)
            elif attempt >= ATTEMPTS:
                raise FetchError(f"s3://{ref.bucket}/{ref.key}: {err}") from err
            log.warning("download of %s interrupted (%s); retry %d/%d", ref.key, err, attempt, ATTEMPTS)
            time.sleep(min(8.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.5))
    _finish(part, etag_file, want, hasher.hexdigest())


def _head(s3: Any, ref: ObjectRef, size: int) -> str:
    try:
        head = s3.head_object(Bucket=ref.bucket, Key=ref.key)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FetchError(f"s3://{ref.bucket}/{ref.key} does not exist") from err
        raise FetchError(f"s3://{ref.bucket}/{ref.key}: {err}") from err
    except BotoCoreError as err:
        raise FetchError(f"s3://{ref.bucket}/{ref.key}: {err}") from err
    if head["ContentLength"] != size:
        raise FetchError(f"s3://{ref.bucket}/{ref.key} is {head['ContentLength']} bytes, the manifest says {size}")
    return str(head["ETag"])


def _check_disk(folder: Path, needed: int, reserve: int) -> None:
    """DiskFull when the bytes do not fit now (they may later); FetchError when they never can."""
    usage = shutil.disk_usage(folder)
    if needed + reserve > usage.total:
        raise FetchError(
            f"not enough disk: {needed / 2**20:.1f} MiB needed and {reserve / 2**20:.0f} MiB must stay free "
            f"(disk_reserve_mb), the filesystem of {folder} holds {usage.total / 2**20:.0f} MiB"
        )
    if usage.free - needed < reserve:
        raise DiskFull(
            f"not enough disk in {folder} now: {needed / 2**20:.1f} MiB needed, {usage.free / 2**20:.1f} MiB free, "
            f"{reserve / 2**20:.0f} MiB must stay free (disk_reserve_mb)"
        )


def _stream(
    s3: Any, want: Wanted, part: Path, etag: str, *, hasher: hashlib._Hash, progress: Progress, max_mbps: float
) -> None:
    ref, size = want.ref, want.size
    offset = part.stat().st_size if part.exists() else 0
    if offset >= size:
        return
    resp = s3.get_object(Bucket=ref.bucket, Key=ref.key, Range=f"bytes={offset}-", IfMatch=etag)
    body = resp["Body"]
    done = offset
    pace = _Pace(max_mbps)
    try:
        with part.open("ab") as f:
            for chunk in body.iter_chunks(CHUNK):
                f.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                progress(done, size)
                pace.took(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    finally:
        body.close()
    if done < size:
        raise OSError(f"connection closed after {done} of {size} bytes")


class _Pace:
    """Sleeps so that the bytes taken so far arrive no faster than `mbps` MB/s (0: never sleeps)."""

    def __init__(self, mbps: float) -> None:
        self.rate = mbps * 1e6
        self.start = time.monotonic()
        self.taken = 0

    def took(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.taken += n
        ahead = self.taken / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def _finish(part: Path, etag_file: Path, want: Wanted, digest: str) -> None:
    dest, sha256, size = want.dest, want.sha256, want.size
    got = part.stat().st_size
    if got != size:
        part.unlink(missing_ok=True)
        raise FetchError(f"truncated: got {got} of {size} bytes")
    if digest != sha256:
        part.unlink(missing_ok=True)
        etag_file.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch: the manifest says {sha256[:12]}…, the bytes hash to {digest[:12]}…")
    durable.replace(part, dest)
    etag_file.unlink(missing_ok=True)


def _is_precondition_failed(err: Exception) -> bool:
    if not isinstance(err, ClientError):
        return False
    return err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def s3_client(endpoint_url: str | None, region: str, connect_timeout: float = 5, read_timeout: float = 30) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(
        connect_timeout=connect_timeout, read_timeout=read_timeout, retries={"max_attempts": 3, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
