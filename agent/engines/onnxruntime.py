"""ONNX Runtime backend (CPU). Its "engine" is the model ONNX Runtime optimised and saved, so the
build stage, the cache and the swap run the same way here as with TensorRT."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from agent.contract.protocol import TensorSpec
from agent.engines import BuildProgress, no_progress
from agent.errors import BackendUnavailable, BuildFailed

try:
    import onnxruntime as ort
except ImportError as err:  # pragma: no cover - depends on the machine
    raise BackendUnavailable(f"onnxruntime is not installed: {err}") from err

# ONNX Runtime's type strings -> numpy dtype names used on the wire.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # A policy MLP is tiny: one thread avoids the thread pool's wake-up cost on every call and
    # keeps the other cores for the controller.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class OnnxRuntimeEngine:
    def __init__(self, path: Path, threads: int = 1) -> None:
        opts = _session_options(threads)
        # The file was optimised at build time; do not redo the work at every load.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        del self._session


def _spec(arg: ort.NodeArg) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    return TensorSpec(arg.name, dtype, tuple(arg.shape))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def version(self) -> str:
        return str(ort.__version__)

    def cache_identity(self) -> dict[str, str]:
        # Saved EXTENDED optimisations may use kernels for this CPU: key by machine too.
        return {"device": f"cpu-{platform.machine()}", "precision": "fp32", "opt": "extended"}

    def build(self, onnx_path: Path, engine_path: Path, progress: BuildProgress = no_progress) -> None:
        """Optimise and save. Writes a temporary file and renames it: no half-written engine."""
        tmp = engine_path.with_name(engine_path.name + ".part")
        opts = _session_options(1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(tmp)
        progress("optimizing", None)
        try:
            ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            raise BuildFailed(f"ONNX Runtime could not load the model: {err}") from err
        progress("saving", None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, engine_path)

    def load(self, engine_path: Path) -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(engine_path, self.threads)
