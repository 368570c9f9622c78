"""The engine cache: zero builds for a key already built, a rebuild when the backend version changes,
corrupt and foreign engine files detected and rebuilt, never loaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.coordinator.store import Store
from agent.engines import cache, engine_key
from agent.engines.build import BuildConfig
from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.engines.provisioner import Provisioner
from tests.backends import Recorder, UpgradedOnnxRuntime
from tests.conftest import mlp


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, Path]:
    path = mlp(tmp_path / "m.onnx")
    return hashlib.sha256(path.read_bytes()).hexdigest(), path


def provisioner(state: Path, backend: OnnxRuntimeBackend | None = None) -> Provisioner:
    return Provisioner(
        engines_dir=Store(state).engines_dir,
        backend=backend or OnnxRuntimeBackend(),
        cfg=BuildConfig(),
        share=None,
        device_id="go2-01",
    )


def test_second_start_builds_nothing(tmp_path: Path, model: tuple[str, Path]) -> None:
    sha, path = model
    first, second = Recorder(), Recorder()
    got = provisioner(tmp_path / "state").obtain(sha, path, first.hooks())
    assert got.source == "built" and first.builds == 1 and first.progress
    again = provisioner(tmp_path / "state").obtain(sha, path, second.hooks())  # a new process would do this
    assert (again.source, again.key, second.builds, second.progress) == ("cache", got.key, 0, [])
    assert second.stages == [f"engine cache hit ({got.key})"]
    meta = cache.read_sidecar(got.path)
    assert meta is not None and meta.builder == "go2-01" and meta.backend_version == OnnxRuntimeBackend().version()


def test_a_backend_upgrade_rebuilds(tmp_path: Path, model: tuple[str, Path]) -> None:
    sha, path = model
    old = provisioner(tmp_path / "state").obtain(sha, path, Recorder().hooks())
    rec = Recorder()
    new = provisioner(tmp_path / "state", UpgradedOnnxRuntime()).obtain(sha, path, rec.hooks())
    assert new.key != old.key and new.source == "built" and rec.builds == 1
    assert engine_key(sha, UpgradedOnnxRuntime()) == new.key
    assert old.path.exists()  # the old engine stays for the old version (garbage collection is the store's job)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "foreign sidecar", "no sidecar"])
def test_a_damaged_engine_is_rebuilt_not_loaded(tmp_path: Path, model: tuple[str, Path], damage: str) -> None:
    sha, path = model
    got = provisioner(tmp_path / "state").obtain(sha, path, Recorder().hooks())
    data = got.path.read_bytes()
    sidecar = cache.sidecar_path(got.path)
    if damage == "flip a byte":
        got.path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        got.path.write_bytes(data[: len(data) // 2])
    elif damage == "foreign sidecar":
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "key": "another-key"}))
    else:
        sidecar.unlink()
    assert cache.problem(got.path, got.key) is not None
    rec = Recorder()
    again = provisioner(tmp_path / "state").obtain(sha, path, rec.hooks())
    assert again.source == "built" and rec.builds == 1
    assert rec.kinds()[0] == "engine_discarded"
    assert cache.problem(again.path, again.key) is None
    assert OnnxRuntimeBackend().load(again.path).outputs[0].name == "actions"
