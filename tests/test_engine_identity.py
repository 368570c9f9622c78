"""An engine key that tells devices apart, and an engine that fails on this device rebuilt here:
simulated boards (EDGE_AGENT_PLATFORM_ROOT) through the ONNX Runtime backend, fleet sharing
through moto's S3 server, real serving processes."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from agent.config import S3Config
from agent.contract.onnx_signature import check_onnx, signature
from agent.contract.protocol import Manifest, ObjectRef
from agent.coordinator.gate import GateContext
from agent.coordinator.pipeline import Candidate, Pipeline, StageReached
from agent.coordinator.store import Store
from agent.engines import engine_key
from agent.engines.board import read_board
from agent.engines.build import BuildConfig
from agent.engines.fleet_share import EngineShare, ShareConfig
from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.engines.provisioner import Provisioner
from agent.serving.server import InferenceServer
from agent.serving.telemetry import LatencyRecorder
from scripts.loopback.services import MotoS3
from tests.backends import CrashesOnMarkedEngines, MarksItsEngines, Recorder
from tests.conftest import mlp

NANO = (
    "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
    "nvidia,p3767-0005",
    "R36 4.0",
    "10.3.0.30-1+cuda12.5",
)
AGX = ("NVIDIA Jetson AGX Orin Developer Kit", "nvidia,p3701-0005", "R36 4.0", "10.3.0.30-1+cuda12.5")


def board(root: Path, model: str, compatible: str, l4t: str, nvinfer: str) -> Path:
    """A simulated board: device tree, L4T release and dpkg's record of libnvinfer."""
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text(model + "\0")
    (root / "proc/device-tree/compatible").write_bytes(compatible.replace(",", "\0").encode() + b"\0")
    (root / "etc").mkdir()
    major, rev = l4t.split()
    (root / "etc/nv_tegra_release").write_text(
        f"# {major} (release), REVISION: {rev}, GCID: 38968081, BOARD: generic\n"
    )
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        f"Package: libnvinfer10\nStatus: install ok installed\nVersion: {nvinfer}\n\nPackage: other\nVersion: 1\n"
    )
    return root


def on(
    monkeypatch: pytest.MonkeyPatch, root: Path, backend: type[OnnxRuntimeBackend] = OnnxRuntimeBackend
) -> OnnxRuntimeBackend:
    monkeypatch.setenv("EDGE_AGENT_PLATFORM_ROOT", str(root))
    return backend()


def test_the_board_is_read_and_keys_tell_boards_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nano = board(tmp_path / "nano", *NANO)
    got = read_board(nano)
    assert (got.model, got.compatible, got.l4t, got.nvinfer) == (NANO[0], NANO[1], "R36.4.0", f"libnvinfer10={NANO[3]}")
    sha = "ab" * 32
    keys = {
        engine_key(sha, on(monkeypatch, nano)),
        engine_key(sha, on(monkeypatch, board(tmp_path / "agx", *AGX))),
        engine_key(sha, on(monkeypatch, board(tmp_path / "jp", NANO[0], NANO[1], "R36 3.0", NANO[3]))),
        engine_key(sha, on(monkeypatch, board(tmp_path / "trt", *NANO[:3], "10.3.0.31-1+cuda12.5"))),
    }
    assert len(keys) == 4  # model, L4T release, the libnvinfer build: each makes its own engine
    assert engine_key(sha, on(monkeypatch, nano)) in keys  # and the same board the same key


def provisioner(root: Path, s3: MotoS3, bucket: str, device: str, backend: OnnxRuntimeBackend) -> Provisioner:
    share = EngineShare(
        s3.client(), ShareConfig(True, bucket, "engines/", ["go2-01", "go2-02", "go2-03"], poll_s=0.2), device
    )
    return Provisioner(
        engines_dir=Store(root / device).engines_dir,
        backend=backend,
        cfg=BuildConfig(),
        share=share,
        device_id=device,
        refused_file=root / device / "cache" / "refused.json",
    )


def test_an_engine_shared_by_another_kind_of_board_is_never_used(
    tmp_path: Path,
    s3: MotoS3,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = mlp(tmp_path / "m.onnx")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    nano, agx = board(tmp_path / "nano", *NANO), board(tmp_path / "agx", *AGX)
    builder = provisioner(tmp_path, s3, bucket, "go2-01", on(monkeypatch, nano))
    built = builder.obtain(sha, path, Recorder().hooks())
    builder.settle(built.key, passed=True)  # shared after its gate
    twin = provisioner(tmp_path, s3, bucket, "go2-02", on(monkeypatch, nano)).obtain(sha, path, Recorder().hooks())
    assert (twin.source, twin.key) == ("shared", built.key)
    other = provisioner(tmp_path, s3, bucket, "go2-03", on(monkeypatch, agx)).obtain(sha, path, Recorder().hooks())
    assert other.source == "built" and other.key != built.key


def test_a_shared_engine_that_crashes_its_serving_process_is_rebuilt_here_and_refused_after(
    tmp_path: Path,
    s3: MotoS3,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another device's engine for the same key passes its hash check but crashes the runtime at
    load here: the model is not rejected; its engine is rebuilt here, and that shared engine is
    never fetched again for this key (also after a restart)."""
    model = mlp(tmp_path / "m.onnx")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    nano = board(tmp_path / "nano", *NANO)
    bad = provisioner(tmp_path, s3, bucket, "go2-01", on(monkeypatch, nano, MarksItsEngines))
    shared = bad.obtain(sha, model, Recorder().hooks())
    bad.settle(shared.key, passed=True)

    backend = on(monkeypatch, nano, CrashesOnMarkedEngines)
    engines = provisioner(tmp_path, s3, bucket, "go2-02", backend)
    store = Store(tmp_path / "go2-02")
    store.model_path(sha).write_bytes(model.read_bytes())
    server = InferenceServer(tmp_path / "run" / "infer.sock", LatencyRecorder(), backend)
    posted: list[object] = []
    pipeline = Pipeline(
        store=store, serving=server, engines=engines, s3=S3Config(), reserve_bytes=0, post=posted.append
    )
    inputs, outputs = signature(check_onnx(model))
    manifest = Manifest("v1", sha, model.stat().st_size, ObjectRef("local", "m.onnx"), inputs, outputs, time.time())
    try:
        served = pipeline.prepare(Candidate(1, manifest, "local"), GateContext())
        server.release(served)
    finally:
        server.stop()
    reasons = [e.reason for e in posted if isinstance(e, StageReached)]
    assert any(r.startswith("the shared engine failed: ") and r.endswith("rebuilding") for r in reasons), reasons
    assert shared.key in engines.refused
    again = provisioner(tmp_path, s3, bucket, "go2-02", backend)  # a restart: the refusal is on disk
    (tmp_path / "go2-02" / "engines" / shared.key).unlink()
    rec = Recorder()
    assert again.obtain(sha, model, rec.hooks()).source == "built" and "shared_engine_ignored" not in rec.kinds()
