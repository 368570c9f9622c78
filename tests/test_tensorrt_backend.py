"""agent.engines.tensorrt's own logic, in CI, against stand-ins for TensorRT and pycuda (tests/
standin_trt.py): the CUDA context pushed once per thread and popped when the last engine closes or
at exit; TF32 and the cuBLAS/cuDNN tactic sources off; the timing cache in the cache directory;
buffers sized from the engine's own I/O; TensorRT 8.6's int64 -> int32 narrowing; an engine built
for another device refused. What only a Jetson settles is in scripts/jetson-check."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from agent.config import BuildConfig
from agent.contract.protocol import TensorSpec
from agent.errors import EngineLoadFailed
from scripts.loopback.models import mlp
from tests import standin_trt
from tests.standin_trt import Builder, BuilderFlag, FakeContext, TacticSource


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModuleType]:
    """agent.engines.tensorrt imported against the stand-ins, on a simulated Orin board."""
    board = tmp_path / "board"
    (board / "proc/device-tree").mkdir(parents=True)
    (board / "proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit\0")
    (board / "etc").mkdir()
    (board / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
    monkeypatch.setenv("EDGE_AGENT_PLATFORM_ROOT", str(board))
    pycuda = ModuleType("pycuda")
    driver = standin_trt.pycuda_driver()
    pycuda.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", standin_trt.tensorrt())
    monkeypatch.delitem(sys.modules, "agent.engines.tensorrt", raising=False)
    FakeContext.stack.clear()
    standin_trt.SM_COUNT[0] = 8
    module = importlib.import_module("agent.engines.tensorrt")
    yield module
    module._pop_at_exit()  # nothing may be left for the real atexit
    sys.modules.pop("agent.engines.tensorrt", None)


def backend(trt: ModuleType, tmp_path: Path, **build: Any) -> Any:
    return trt.TensorRTBackend(BuildConfig(**build), tmp_path / "cache")


def engine_file(trt: ModuleType, b: Any, path: Path, io: list[dict[str, Any]], precision: str = "fp32") -> Path:
    """An engine file as the backend writes it, around a stand-in engine description."""
    spec = {"inputs": [t for t in io if t["mode"] == "in"], "outputs": [t for t in io if t["mode"] == "out"]}
    header = {
        "identity": {"trt": "10.3.0", **b.cache_identity(precision)},
        **{
            k: [
                TensorSpec(t["name"], t.get("model_dtype", t.get("dtype", "float32")), tuple(t["declared"])).to_json()
                for t in v
            ]
            for k, v in spec.items()
        },
    }
    trt._write_engine(path, header, json.dumps({"io": io}).encode())
    return path


MLP_IO = [
    {"name": "obs", "mode": "in", "shape": [-1, 48], "profile": [[1, 48], [1, 48], [8, 48]], "declared": ["batch", 48]},
    {"name": "actions", "mode": "out", "shape": [-1, 48], "declared": ["batch", 48]},
]


def test_the_context_is_pushed_once_per_thread_and_popped_with_the_last_engine(trt: ModuleType, tmp_path: Path) -> None:
    b = backend(trt, tmp_path)
    first = b.load(engine_file(trt, b, tmp_path / "a", MLP_IO))
    second = b.load(engine_file(trt, b, tmp_path / "b", MLP_IO))
    assert len(FakeContext.stack) == 1  # pushed by the first engine, shared by the second
    first.close()
    assert len(FakeContext.stack) == 1
    second.close()
    assert FakeContext.stack == []  # pycuda would abort a process that exits with it pushed
    second.close()  # twice changes nothing
    assert FakeContext.stack == []


def test_an_engine_never_closed_is_popped_at_exit(trt: ModuleType, tmp_path: Path) -> None:
    b = backend(trt, tmp_path)
    b.load(engine_file(trt, b, tmp_path / "a", MLP_IO))
    assert len(FakeContext.stack) == 1
    trt._pop_at_exit()
    assert FakeContext.stack == []


def test_a_load_that_fails_pops_what_it_pushed(trt: ModuleType, tmp_path: Path) -> None:
    b = backend(trt, tmp_path)
    path = engine_file(trt, b, tmp_path / "a", MLP_IO)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"io"', b'"fail_context": true, "io"'))
    with pytest.raises(EngineLoadFailed, match="could not create an execution context"):
        b.load(path)
    assert FakeContext.stack == []


def test_outputs_are_sized_from_the_engine_for_the_largest_inputs(trt: ModuleType, tmp_path: Path) -> None:
    """The header (from ONNX) says batch x 48; the engine's profile allows batch 1..8: batch 8 fits."""
    b = backend(trt, tmp_path)
    engine = b.load(engine_file(trt, b, tmp_path / "a", MLP_IO))
    x = np.arange(8 * 48, dtype=np.float32).reshape(8, 48)
    np.testing.assert_array_equal(engine.run({"obs": x})["actions"], x * 2)
    np.testing.assert_array_equal(engine.run({"obs": x[:1]})["actions"], x[:1] * 2)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.run({"obs": np.zeros((9, 48), np.float32)})
    engine.close()


def test_an_output_without_a_known_size_refuses_the_engine(trt: ModuleType, tmp_path: Path) -> None:
    io = [dict(MLP_IO[0]), {"name": "actions", "mode": "out", "shape": [-1, -1], "declared": ["a", "b"]}]
    b = backend(trt, tmp_path)
    with pytest.raises(EngineLoadFailed, match="no size for its buffer"):
        b.load(engine_file(trt, b, tmp_path / "a", io))
    io[1]["max_bytes"] = 8 * 48 * 4  # TensorRT's own upper bound (get_max_output_size) is enough
    b.load(engine_file(trt, b, tmp_path / "b", io)).close()
    assert FakeContext.stack == []


def test_the_engines_io_must_be_the_models(trt: ModuleType, tmp_path: Path) -> None:
    b = backend(trt, tmp_path)
    path = engine_file(trt, b, tmp_path / "a", MLP_IO)
    header, blob = trt._read_engine(path)
    header["outputs"].append(TensorSpec("extra", "float32", (1,)).to_json())
    trt._write_engine(path, header, blob)
    with pytest.raises(EngineLoadFailed, match="is not the model's"):
        b.load(path)


def test_int64_narrowed_by_tensorrt_8_6_is_cast_back(trt: ModuleType, tmp_path: Path) -> None:
    """onnx-tensorrt 8.x makes int64 tensors int32: feeds are cast (a value int32 cannot hold is
    refused, not wrapped) and outputs come back as the model's int64."""
    io = [
        {"name": "idx", "mode": "in", "dtype": "int32", "model_dtype": "int64", "shape": [1, 4], "declared": [1, 4]},
        {"name": "out", "mode": "out", "dtype": "int32", "model_dtype": "int64", "shape": [1, 4], "declared": [1, 4]},
    ]
    b = backend(trt, tmp_path)
    engine = b.load(engine_file(trt, b, tmp_path / "a", io))
    assert engine.dtypes["idx"] == np.int32
    got = engine.run({"idx": np.array([[1, 2, 3, 4]], np.int64)})["out"]
    assert got.dtype == np.int64 and got.tolist() == [[2, 4, 6, 8]]
    with pytest.raises(ValueError, match="values outside int32"):
        engine.run({"idx": np.array([[2**40, 0, 0, 0]], np.int64)})
    engine.close()


def test_an_engine_built_for_another_orin_is_refused(trt: ModuleType, tmp_path: Path) -> None:
    """`cuDeviceGetName` says "Orin" on every module: the SM count tells a Nano 8 GB from an AGX."""
    b = backend(trt, tmp_path)
    path = engine_file(trt, b, tmp_path / "a", MLP_IO)
    standin_trt.SM_COUNT[0] = 16  # an AGX Orin
    agx = backend(trt, tmp_path)
    assert agx.cache_identity("fp32") != b.cache_identity("fp32")
    with pytest.raises(EngineLoadFailed, match="sm_count '8' here '16'"):
        agx.load(path)


def test_fp32_builds_clear_tf32_and_leave_cublas_and_cudnn_out(trt: ModuleType, tmp_path: Path) -> None:
    onnx_path = mlp(tmp_path / "m.onnx")
    b = backend(trt, tmp_path)
    assert b.precisions() == ["fp16", "fp32"]  # sm 8.7 has fast FP16
    b.build(onnx_path, tmp_path / "e32", "fp32")
    config = Builder.last_config
    assert config is not None and BuilderFlag.TF32 not in config.flags and BuilderFlag.FP16 not in config.flags
    allowed = {TacticSource.EDGE_MASK_CONVOLUTIONS, TacticSource.JIT_CONVOLUTIONS}
    assert config.tactics == sum(1 << int(t) for t in allowed)
    b.build(onnx_path, tmp_path / "e16", "fp16")
    assert Builder.last_config is not None and BuilderFlag.FP16 in Builder.last_config.flags
    with_tf32 = backend(trt, tmp_path, tf32=True)
    with_tf32.build(onnx_path, tmp_path / "t32", "fp32")
    assert Builder.last_config is not None and BuilderFlag.TF32 in Builder.last_config.flags
    assert with_tf32.cache_identity("fp32") != b.cache_identity("fp32") != b.cache_identity("fp16")
    assert backend(trt, tmp_path, fp16=False).precisions() == ["fp32"]


def test_the_timing_cache_lives_in_the_cache_dir_and_saving_it_may_fail(trt: ModuleType, tmp_path: Path) -> None:
    onnx_path = mlp(tmp_path / "m.onnx")
    engines = tmp_path / "engines"
    engines.mkdir()
    b = backend(trt, tmp_path)
    b.build(onnx_path, engines / "key1", "fp32")
    caches = list((tmp_path / "cache").glob("timing-*.cache"))
    assert len(caches) == 1 and caches[0].read_bytes() == b"timings+"
    b.build(onnx_path, engines / "key2", "fp32")  # the second build starts from the first's timings
    assert caches[0].read_bytes() == b"timings++"
    assert sorted(p.name for p in engines.iterdir()) == ["key1", "key2"]  # nothing else, no .part
    blocked = trt.TensorRTBackend(BuildConfig(), tmp_path / "m.onnx" / "not-a-dir")
    blocked.build(onnx_path, engines / "key3", "fp32")  # the engine is good without saved timings
    assert (engines / "key3").exists()
