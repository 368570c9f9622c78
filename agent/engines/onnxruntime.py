"""ONNX Runtime backend (CPU). Its "engine" is the model ONNX Runtime optimised and saved, so the
build stage, the cache and the swap run the same way here as with TensorRT."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from agent.contract.protocol import TensorSpec
from agent.engines import BuildProgress, no_progress
from agent.engines.board import read_board
from agent.errors import BackendUnavailable, BuildFailed
from agent.proc import durable

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

    def __init__(self, threads: int = 1, emulate_fp16: bool = False) -> None:
        self.threads = threads
        self.emulate_fp16 = emulate_fp16
        self.board = read_board()

    def version(self) -> str:
        return str(ort.__version__)

    def precisions(self) -> list[str]:
        """FP32; FP16 first only when emulated (weights rounded to FP16: the gate's FP16 path,
        tolerances and FP32 fallback run on machines without a GPU)."""
        return ["fp16", "fp32"] if self.emulate_fp16 else ["fp32"]

    def cache_identity(self, precision: str) -> dict[str, str]:
        # Saved EXTENDED optimisations may use kernels for this CPU: key by machine and board too.
        return {
            "device": f"cpu-{platform.machine()}",
            "precision": precision,
            "opt": "extended",
            **{f"board.{k}": v for k, v in self.board.to_json().items()},
        }

    def build(
        self, onnx_path: Path, engine_path: Path, precision: str = "fp32", progress: BuildProgress = no_progress
    ) -> None:
        """Optimise and save. Writes a temporary file and renames it: no half-written engine."""
        tmp = engine_path.with_name(engine_path.name + ".part")
        opts = _session_options(1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(tmp)
        progress("optimizing", None)
        try:
            source = _rounded_to_fp16(onnx_path, tmp) if precision == "fp16" else str(onnx_path)
            ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            raise BuildFailed(f"ONNX Runtime could not load the model: {err}") from err
        finally:
            tmp.with_name(tmp.name + ".fp16.onnx").unlink(missing_ok=True)
        progress("saving", None)
        durable.fsync_file(tmp)
        durable.replace(tmp, engine_path)

    def load(self, engine_path: Path) -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(engine_path, self.threads)


def _rounded_to_fp16(onnx_path: Path, beside: Path) -> str:
    """A copy of the model whose float weights went through FP16 and back: an FP16 engine's
    rounding, with the model's own types and I/O. Returns its path (the caller removes it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            rounded = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(rounded, init.name))
    path = beside.with_name(beside.name + ".fp16.onnx")
    onnx.save(model, str(path))
    return str(path)
