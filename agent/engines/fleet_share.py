"""Fleet engine sharing through S3 (opt-in, `[share]` in the config).

Layout under `s3://<bucket>/<prefix><engine key>/`:

    <builder>.engine   the engine file, as the builder's agent wrote it
    <builder>.json     its EngineMeta: key, sha256, size, backend version, builder, build time
    lease              {"builder", "expires_at"}: who is building it now (a conditional put)

Trust: an engine is code for the GPU. An agent uses `<builder>.engine` only when `<builder>` is in
`share.trusted_builders` (or is itself), and only after its bytes hash to the sha256 in the
record. The builder's name is the object's path, so the trust rests on the bucket's write policy:
give each device write access to `<prefix>*/<its device_id>.*` and `<prefix>*/lease` only, so no
device can publish an engine under another's name. Engines from other builders are ignored with an
event, and the agent builds locally.

Two agents that need the same key at once: the first to create `lease` (PutObject with
If-None-Match: *, which S3 and moto's server honour) builds; the others wait for its record, up
to the lease's expiry, then build themselves."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from agent.config import ShareConfig
from agent.contract.digest import sha256_file
from agent.engines.cache import EngineMeta, write_sidecar
from agent.errors import ShareError
from agent.proc import durable

log = logging.getLogger(__name__)


LEASE_SETTLE_S = 0.2


@dataclass(frozen=True)
class Lease:
    ours: bool
    holder: str  # "" when unknown (the lease changed hands while we looked)
    expires_at: float


class EngineShare:
    def __init__(self, s3: Any, cfg: ShareConfig, device_id: str) -> None:
        self.s3 = s3
        self.cfg = cfg
        self.device_id = device_id

    def trusted(self, builder: str) -> bool:
        return builder == self.device_id or builder in self.cfg.trusted_builders

    def _key(self, engine_key: str, name: str) -> str:
        return f"{self.cfg.prefix}{engine_key}/{name}"

    # -- finding and fetching ------------------------------------------------------------------
    def records(self, key: str) -> dict[str, EngineMeta | str]:
        """Every builder's record for this key, or why it is not to be used."""
        found: dict[str, EngineMeta | str] = {}
        try:
            resp = self.s3.list_objects_v2(Bucket=self.cfg.bucket, Prefix=self._key(key, ""))
            for obj in resp.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if name.endswith(".json"):
                    builder = name[: -len(".json")]
                    found[builder] = self._record(key, builder) if self.trusted(builder) else "untrusted builder"
        except (BotoCoreError, ClientError) as err:
            raise ShareError(f"listing shared engines failed: {err}") from err
        return found

    def _record(self, key: str, builder: str) -> EngineMeta | str:
        body = self.s3.get_object(Bucket=self.cfg.bucket, Key=self._key(key, f"{builder}.json"))["Body"].read()
        try:
            meta = EngineMeta.from_json(json.loads(body))
        except (ValueError, KeyError, TypeError) as err:
            return f"unreadable record: {err}"
        return meta if meta.builder == builder else f"record names builder {meta.builder!r}"

    def download(self, key: str, meta: EngineMeta, dest: Path) -> str | None:
        """Fetch a trusted builder's engine into `dest` (+ sidecar); the problem, or None when sound."""
        if meta.key != key:
            return f"{meta.builder}'s record is for key {meta.key}"
        part = dest.with_name(dest.name + ".part")
        try:
            self.s3.download_file(self.cfg.bucket, self._key(key, f"{meta.builder}.engine"), str(part))
        except (BotoCoreError, ClientError) as err:
            part.unlink(missing_ok=True)
            return f"download of {meta.builder}'s engine failed: {err}"
        digest = sha256_file(part).hexdigest()
        if digest != meta.sha256 or part.stat().st_size != meta.size:
            part.unlink(missing_ok=True)
            return f"{meta.builder}'s engine hashes to {digest[:12]}…, its record says {meta.sha256[:12]}…"
        durable.fsync_file(part)
        durable.replace(part, dest)
        write_sidecar(dest, meta)
        return None

    def upload(self, key: str, engine: Path, meta: EngineMeta) -> None:
        """The engine first, the record last: a record always points at a complete engine."""
        try:
            self.s3.upload_file(str(engine), self.cfg.bucket, self._key(key, f"{self.device_id}.engine"))
            self.s3.put_object(
                Bucket=self.cfg.bucket,
                Key=self._key(key, f"{self.device_id}.json"),
                Body=json.dumps(meta.to_json()).encode(),
            )
        except (BotoCoreError, ClientError) as err:
            raise ShareError(f"upload of engine {key} failed: {err}") from err

    # -- the build lease -------------------------------------------------------------------------
    def acquire(self, key: str, hold_s: float) -> Lease:
        """Try to become the one builder of `key`; otherwise say who is."""
        body = json.dumps({"builder": self.device_id, "expires_at": time.time() + hold_s, "hold_s": hold_s}).encode()
        for _ in range(2):
            try:
                self.s3.put_object(Bucket=self.cfg.bucket, Key=self._key(key, "lease"), Body=body, IfNoneMatch="*")
                # Read it back after a moment: a store whose conditional put checks, then writes
                # (moto; some S3-compatible servers) can let two agents both "win"; the last writer
                # holds it. Real S3 refuses the second put and this read only confirms.
                time.sleep(LEASE_SETTLE_S)
                held = self._lease(key)
                if held is None or held.ours:
                    return Lease(True, self.device_id, time.time() + hold_s)
                return held
            except ClientError as err:
                if not _precondition_failed(err):
                    raise ShareError(f"taking the build lease failed: {err}") from err
            except BotoCoreError as err:
                raise ShareError(f"taking the build lease failed: {err}") from err
            held = self._lease(key)
            if held is None:
                continue  # released in between: try again
            if held.expires_at > time.time():
                return held
            log.info("build lease of %s expired (holder %s): taking it over", key, held.holder)
            self.release(key, force=True)
        return Lease(False, "", time.time() + self.cfg.poll_s)  # it kept changing hands: look again

    def _lease(self, key: str) -> Lease | None:
        try:
            got = self.s3.get_object(Bucket=self.cfg.bucket, Key=self._key(key, "lease"))
            d = json.loads(got["Body"].read())
            return Lease(str(d["builder"]) == self.device_id, str(d["builder"]), _expiry(got, d))
        except ClientError:
            return None  # released in between
        except (ValueError, KeyError, TypeError):
            return Lease(False, "?", 0.0)  # unreadable: treat as expired
        except BotoCoreError as err:
            raise ShareError(f"reading the build lease failed: {err}") from err

    def release(self, key: str, force: bool = False) -> None:
        try:
            held = None if force else self._lease(key)
            if force or (held is not None and held.ours):
                self.s3.delete_object(Bucket=self.cfg.bucket, Key=self._key(key, "lease"))
        except (BotoCoreError, ClientError, ShareError) as err:
            log.warning("could not release the build lease of %s: %s", key, err)


def _expiry(got: dict[str, Any], lease: dict[str, Any]) -> float:
    """When a lease expires, on this machine's clock. Its age is read on the store's clock (the
    object's LastModified against the response's Date), so that neither the holder's clock nor
    ours, stepped by hours, keeps a dead lease alive or ends a live one early. A lease from an
    agent before "hold_s" was written: its holder's expires_at."""
    try:
        served_at = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (served_at - got["LastModified"]).total_seconds()
        return time.time() + float(lease["hold_s"]) - max(age, 0.0)
    except (KeyError, TypeError, ValueError):
        return float(lease["expires_at"])


def _precondition_failed(err: ClientError) -> bool:
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
