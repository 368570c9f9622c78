"""Every usable backend passes the same tests. TensorRT is usable only where `tensorrt` imports AND
a CUDA device answers (pycuda): elsewhere its tests skip with the reason."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.contract.onnx_signature import check_onnx, signature
from agent.engines import Backend, Engine, engine_key
from agent.engines.build import BuildConfig, run_build
from agent.errors import BackendUnavailable, BuildFailed
from tests.conftest import mlp

# Polygraphy compares against ONNX Runtime with atol = rtol = 1e-5; FP16 engines need looser ones.
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2}


def make_backend(name: str) -> Backend:
    if name == "tensorrt":
        from agent.engines.tensorrt import TensorRTBackend

        return TensorRTBackend(BuildConfig(), Path(tempfile.mkdtemp(prefix="trt-cache-")))
    from agent.engines.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


@pytest.fixture(params=["onnxruntime", "tensorrt"])
def backend(request: pytest.FixtureRequest) -> Backend:
    try:
        return make_backend(request.param)
    except BackendUnavailable as err:
        pytest.skip(f"{request.param} is not usable here: {err}")


def build(backend: Backend, onnx_path: Path, tmp_path: Path) -> Path:
    engine = tmp_path / "engine"
    precision = backend.precisions()[0]
    run_build(
        backend,
        onnx_path,
        engine,
        BuildConfig(),
        precision=precision,
        cancelled=lambda: None,
        on_progress=lambda _: None,
    )
    return engine


def dynamic_batch(path: Path) -> Path:
    """The same MLP with a symbolic batch dimension on its input and output."""
    model = onnx.load(str(path))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    out = path.with_name("dynamic.onnx")
    onnx.save(model, str(out))
    return out


def reference(onnx_path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


def assert_close(backend: Backend, got: np.ndarray, want: np.ndarray) -> None:
    tol = TOLERANCE[backend.precisions()[0]]
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_engine_has_the_onnx_signature(backend: Backend, tmp_path: Path) -> None:
    onnx_path = mlp(tmp_path / "m.onnx")
    engine = backend.load(build(backend, onnx_path, tmp_path))
    try:
        assert (engine.inputs, engine.outputs) == signature(check_onnx(onnx_path))
    finally:
        engine.close()


def test_outputs_match_onnxruntime(backend: Backend, tmp_path: Path) -> None:
    onnx_path = mlp(tmp_path / "m.onnx", seed=3)
    engine = backend.load(build(backend, onnx_path, tmp_path))
    try:
        for i in range(5):
            feed = {"obs": np.random.default_rng(i).standard_normal((1, 48)).astype(np.float32)}
            assert_close(backend, engine.run(feed)["actions"], reference(onnx_path, feed))
    finally:
        engine.close()


def test_dynamic_batch_dimension(backend: Backend, tmp_path: Path) -> None:
    onnx_path = dynamic_batch(mlp(tmp_path / "m.onnx"))
    engine = backend.load(build(backend, onnx_path, tmp_path))
    try:
        assert engine.inputs[0].shape == ("batch", 48)
        for n in (1, 4):
            feed = {"obs": np.random.default_rng(n).standard_normal((n, 48)).astype(np.float32)}
            got = engine.run(feed)["actions"]
            assert got.shape == (n, 12)
            assert_close(backend, got, reference(onnx_path, feed))
    finally:
        engine.close()


def test_runs_and_closes_on_another_thread(backend: Backend, tmp_path: Path) -> None:
    """An engine loaded on one thread runs and closes on another (the CUDA context follows)."""
    onnx_path = mlp(tmp_path / "m.onnx")
    engine: Engine = backend.load(build(backend, onnx_path, tmp_path))
    feed = {"obs": np.ones((1, 48), np.float32)}
    first = engine.run(feed)["actions"]
    result: list[np.ndarray] = []

    def serve() -> None:
        result.append(engine.run(feed)["actions"])
        engine.close()

    t = threading.Thread(target=serve)
    t.start()
    t.join(30)
    assert len(result) == 1
    np.testing.assert_array_equal(result[0], first)


def test_unbuildable_model_is_rejected_with_the_backends_message(backend: Backend, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model")
    with pytest.raises(BuildFailed) as err:
        build(backend, bad, tmp_path)
    assert err.value.stage == "build" and len(err.value.reason) > 10


def test_engine_key_follows_version_and_identity(backend: Backend) -> None:
    sha = "ab" * 32
    assert engine_key(sha, backend) == engine_key(sha, make_backend(backend.name))  # stable across instances
    assert engine_key(sha, backend) != engine_key("cd" * 32, backend)
    assert backend.name in engine_key(sha, backend)
    assert backend.version() and all(backend.cache_identity(p)["precision"] == p for p in backend.precisions())
    assert all(p in TOLERANCE for p in backend.precisions())


def test_auto_falls_back_to_onnx_runtime_where_tensorrt_is_unusable(tmp_path: Path) -> None:
    """The Jetson install carries ONNX Runtime for this: no TensorRT, pycuda or GPU -> still serving."""
    from agent.engines import select_backend

    try:
        make_backend("tensorrt")
        pytest.skip("TensorRT is usable here")
    except BackendUnavailable:
        pass
    assert select_backend("auto", BuildConfig(), tmp_path).name == "onnxruntime"
    with pytest.raises(BackendUnavailable, match="tensorrt is not importable"):
        select_backend("tensorrt", BuildConfig(), tmp_path)
