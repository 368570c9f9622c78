"""Fleet engine sharing through a real S3 endpoint (moto's server): one build for two agents that
need the same engine at once; untrusted builders and bad hashes ignored with an event."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from agent.coordinator.store import Store
from agent.engines import cache, engine_key
from agent.engines.build import BuildConfig
from agent.engines.fleet_share import EngineShare, ShareConfig
from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.engines.provisioner import Obtained, Provisioner
from scripts.loopback.services import MotoS3
from tests.backends import Recorder
from tests.conftest import mlp


def agent(root: Path, s3: MotoS3, bucket: str, device: str, trusted: list[str]) -> Provisioner:
    share = EngineShare(s3.client(), ShareConfig(True, bucket, "engines/", trusted, poll_s=0.2), device)
    return Provisioner(
        engines_dir=Store(root / device).engines_dir,
        backend=OnnxRuntimeBackend(),
        cfg=BuildConfig(),
        share=share,
        device_id=device,
    )


def keys(s3: MotoS3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def test_two_agents_starting_together_build_once(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    path = mlp(tmp_path / "m.onnx")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    agents = {d: agent(tmp_path, s3, bucket, d, ["go2-01", "go2-02"]) for d in ("go2-01", "go2-02")}
    recorders = {d: Recorder() for d in agents}
    results: dict[str, Obtained] = {}
    barrier = threading.Barrier(2)

    def start(device: str) -> None:
        barrier.wait()
        got = agents[device].obtain(sha, path, recorders[device].hooks())
        agents[device].settle(got.key, passed=True)  # the gate passed: share it, free the lease
        results[device] = got

    threads = [threading.Thread(target=start, args=(d,)) for d in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.source for r in results.values()) == ["built", "shared"]
    assert sum(r.builds for r in recorders.values()) == 1
    builder = next(d for d, r in results.items() if r.source == "built")
    key = engine_key(sha, OnnxRuntimeBackend())
    assert keys(s3, bucket) == [f"engines/{key}/{builder}.engine", f"engines/{key}/{builder}.json"]  # lease freed
    waiter = next(d for d in agents if d != builder)
    assert any(s.startswith(f"waiting for {builder}") for s in recorders[waiter].stages)
    assert cache.problem(results[waiter].path, key) is None


def publish_foreign(tmp_path: Path, s3: MotoS3, bucket: str, builder: str, **override: Any) -> tuple[str, Path]:
    """Another agent's engine, built for real, published under `builder` (with `override` in its record)."""
    path = mlp(tmp_path / "m.onnx")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    other = agent(tmp_path / "other", s3, bucket, builder, [])
    got = other.obtain(sha, path, Recorder().hooks())
    other.settle(got.key, passed=False)  # frees its build lease; the record below is the share
    meta = cache.read_sidecar(got.path)
    assert meta is not None
    client = s3.client()
    client.upload_file(str(got.path), bucket, f"engines/{got.key}/{builder}.engine")
    record = {**meta.to_json(), **override}
    client.put_object(Bucket=bucket, Key=f"engines/{got.key}/{builder}.json", Body=json.dumps(record).encode())
    return sha, path


def test_an_untrusted_builder_is_ignored_with_an_event(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    sha, path = publish_foreign(tmp_path, s3, bucket, "stranger")
    rec = Recorder()
    got = agent(tmp_path, s3, bucket, "go2-01", ["go2-02"]).obtain(sha, path, rec.hooks())
    assert got.source == "built" and rec.builds == 1
    assert (
        "shared_engine_ignored",
        {"engine_key": got.key, "builder": "stranger", "reason": "untrusted builder"},
    ) in rec.events


def test_a_shared_engine_whose_hash_does_not_match_is_ignored(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    sha, path = publish_foreign(tmp_path, s3, bucket, "go2-02", sha256="0" * 64)
    rec = Recorder()
    got = agent(tmp_path, s3, bucket, "go2-01", ["go2-02"]).obtain(sha, path, rec.hooks())
    assert got.source == "built" and rec.builds == 1
    ignored = [f for k, f in rec.events if k == "shared_engine_ignored"]
    assert len(ignored) == 1 and "its record says 000000000000" in ignored[0]["reason"]


def test_a_trusted_shared_engine_is_used_without_building(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    sha, path = publish_foreign(tmp_path, s3, bucket, "go2-02")
    rec = Recorder()
    got = agent(tmp_path, s3, bucket, "go2-01", ["go2-02"]).obtain(sha, path, rec.hooks())
    assert (got.source, rec.builds) == ("shared", 0)
    assert OnnxRuntimeBackend().load(got.path).inputs[0].name == "obs"


def test_an_expired_lease_is_taken_over(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    share = EngineShare(s3.client(), ShareConfig(True, bucket), "go2-01")
    assert share.acquire("k", -1).ours  # a holder that died: its lease has expired
    other = EngineShare(s3.client(), ShareConfig(True, bucket), "go2-02")
    lease = other.acquire("k", 60)
    assert lease.ours and lease.holder == "go2-02"
    assert not share.acquire("k", 60).ours


def test_a_lease_ages_on_the_stores_clock_not_on_the_holders(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    """A holder whose clock ran three hours ahead wrote an expiry three hours off: its 1 s lease
    still ends after 1 s, judged by the object's age on the store's clock."""
    key = ShareConfig(True, bucket).prefix + "k/lease"
    ahead = {"builder": "go2-02", "expires_at": time.time() + 3 * 3600, "hold_s": 1}
    s3.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(ahead).encode())
    share = EngineShare(s3.client(), ShareConfig(True, bucket), "go2-01")
    held = share.acquire("k", 60)
    assert not held.ours and held.holder == "go2-02" and held.expires_at < time.time() + 2
    time.sleep(2.2)  # the store's Date header has 1 s resolution
    assert share.acquire("k", 60).ours


class _LookedTooEarly(EngineShare):
    """An agent whose first look came just before the builder shared its engine and let go."""

    looks = 0

    def records(self, key: str) -> dict[str, cache.EngineMeta | str]:
        self.looks += 1
        return {} if self.looks == 1 else super().records(key)


def test_an_engine_shared_between_the_look_and_the_lease_is_used(tmp_path: Path, s3: MotoS3, bucket: str) -> None:
    sha, path = publish_foreign(tmp_path, s3, bucket, "go2-02")
    share = _LookedTooEarly(s3.client(), ShareConfig(True, bucket, "engines/", ["go2-02"]), "go2-01")
    rec = Recorder()
    got = Provisioner(
        engines_dir=Store(tmp_path / "go2-01").engines_dir,
        backend=OnnxRuntimeBackend(),
        cfg=BuildConfig(),
        share=share,
        device_id="go2-01",
    ).obtain(sha, path, rec.hooks())
    assert (got.source, rec.builds, share.looks) == ("shared", 0, 2)
    assert f"engines/{got.key}/lease" not in keys(s3, bucket)  # the lease it took is freed


def test_two_threads_that_need_the_same_engine_build_it_once(tmp_path: Path) -> None:
    """The pipeline and an operator command (`agent rollback`) on one agent: one build, one cache hit."""
    path = mlp(tmp_path / "m.onnx")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    provisioner = Provisioner(
        engines_dir=Store(tmp_path / "go2-01").engines_dir,
        backend=OnnxRuntimeBackend(),
        cfg=BuildConfig(),
        share=None,
        device_id="go2-01",
    )
    recorders = [Recorder(), Recorder()]
    sources: list[str] = []
    barrier = threading.Barrier(2)

    def need(rec: Recorder) -> None:
        barrier.wait()
        sources.append(provisioner.obtain(sha, path, rec.hooks()).source)

    threads = [threading.Thread(target=need, args=(r,)) for r in recorders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(sources) == ["built", "cache"] and sum(r.builds for r in recorders) == 1
