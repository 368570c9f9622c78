"""TensorRT backend (Jetson, JetPack 6: TensorRT 8.6 or 10.x), with pycuda for buffers and streams.

Only the name-based I/O API is used (`num_io_tensors`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`), which TensorRT 8.6 and 10.x both have. `build` runs in the build child process
(agent.engines.build); `load` and `run` run in a serving process (agent.serving.process), which answers the gate's
calls and then the clients with the same engine; the daemon never loads one.

Threads: a CUDA context is current in one thread at a time, and an execution context is not
thread-safe. The agent runs an engine on one thread only (the one thread of a serving process,
which also answers the gate's calls), so each engine makes the device's primary context
current on the calling thread the first time that thread uses it, and leaves it there: no push/pop
per call.

Engine file: MAGIC, a 4-byte header length, a JSON header (TensorRT version, I/O signature taken
from the ONNX file, so symbolic dimension names survive) and the serialized engine."""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.protocol import TensorSpec
from agent.engines import BuildProgress, no_progress
from agent.errors import BackendUnavailable, BuildFailed, EngineLoadFailed

try:
    import tensorrt as trt
except ImportError as err:
    raise BackendUnavailable(f"tensorrt is not importable: {err}") from err

log = logging.getLogger(__name__)

MAGIC = b"EATRT001"
TRT_MAJOR = int(trt.__version__.split(".")[0])
_bound = threading.local()  # which CUDA context each thread has made current


def _cuda() -> Any:
    """pycuda's driver module, initialised; BackendUnavailable when pycuda or a GPU is missing."""
    try:
        import pycuda.driver as cuda
    except ImportError as err:
        raise BackendUnavailable(f"pycuda is not importable: {err}") from err
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise BackendUnavailable("CUDA sees no GPU")
    except cuda.Error as err:
        raise BackendUnavailable(f"CUDA does not initialise: {err}") from err
    return cuda


class _Logger(trt.ILogger):
    """TensorRT's messages into our log; the last errors are kept for the rejection reason."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self.errors: list[str] = []

    def log(self, severity: Any, msg: str) -> None:
        if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
            self.errors.append(msg)
            log.error("tensorrt: %s", msg)
        elif severity == trt.ILogger.Severity.WARNING:
            log.warning("tensorrt: %s", msg)
        else:
            log.debug("tensorrt: %s", msg)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, workspace_mb: int = 1024, fp16: bool = True, max_dynamic: int = 8) -> None:
        cuda = _cuda()
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        self.gpu = str(dev.name())
        self.sm = f"{major}{minor}"
        self.workspace_mb = workspace_mb
        self.fp16 = fp16
        self.max_dynamic = max_dynamic

    def version(self) -> str:
        return str(trt.__version__)

    def cache_identity(self) -> dict[str, str]:
        return {
            "device": self.gpu,
            "sm": self.sm,
            "precision": "fp16" if self.fp16 else "fp32",
            "workspace_mb": str(self.workspace_mb),
            "max_dynamic": str(self.max_dynamic),
        }

    # -- build (in the child process) ------------------------------------------------------------
    def build(self, onnx_path: Path, engine_path: Path, progress: BuildProgress = no_progress) -> None:
        from agent.contract.onnx_signature import check_onnx, signature

        inputs, outputs = signature(check_onnx(onnx_path))
        logger = _Logger()
        builder = trt.Builder(logger)
        flags = 0 if TRT_MAJOR >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        progress("parsing", None)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            msgs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
            raise BuildFailed(f"TensorRT's ONNX parser: {'; '.join(msgs) or 'failed'}")
        config = self._config(builder, network)
        timing = engine_path.parent / f"timing-{trt.__version__}-sm{self.sm}.cache"
        cache = config.create_timing_cache(timing.read_bytes() if timing.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        monitor = _monitor(progress)
        if monitor is not None:
            config.progress_monitor = monitor
        progress("building", None)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            why = "; ".join(logger.errors[-3:]) or "no reason given"
            raise BuildFailed(f"TensorRT could not build the engine: {why}")
        progress("saving", None)
        _atomic_write(timing, bytes(config.get_timing_cache().serialize()))
        header = {
            "trt": trt.__version__,
            "sm": self.sm,
            "inputs": [s.to_json() for s in inputs],
            "outputs": [s.to_json() for s in outputs],
        }
        _write_engine(engine_path, header, bytes(serialized))

    def _config(self, builder: Any, network: Any) -> Any:
        config = builder.create_builder_config()
        # The default pool is all device memory, and Orin's memory is the CPU's too.
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        if self.fp16 and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
        if dynamic:
            profile = builder.create_optimization_profile()
            for t in dynamic:
                lo = tuple(1 if d < 0 else d for d in t.shape)
                hi = tuple(self.max_dynamic if d < 0 else d for d in t.shape)
                profile.set_shape(t.name, lo, lo, hi)
            config.add_optimization_profile(profile)
        return config

    # -- load and run (in the daemon) --------------------------------------------------------------
    def load(self, engine_path: Path) -> TensorRTEngine:
        header, blob = _read_engine(engine_path)
        if header.get("trt") != trt.__version__ or header.get("sm") != self.sm:
            raise EngineLoadFailed(
                f"{engine_path.name} was built by TensorRT {header.get('trt')} for sm{header.get('sm')}, "
                f"this is TensorRT {trt.__version__} on sm{self.sm}"
            )
        return TensorRTEngine(header, blob, self.max_dynamic)


def _monitor(progress: BuildProgress) -> Any:
    """TensorRT 10's progress monitor, reporting the top-level phase; None on 8.6."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = max(num_steps, 1)
            if parent_phase is None:
                progress(phase_name, 0.0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if len(self.steps) == 1:  # only the top-level phase is worth a message
                progress(phase_name, (step + 1) / self.steps[phase_name])
            return True  # never cancel from here: the parent kills the child instead

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

    return Monitor()


class TensorRTEngine:
    def __init__(self, header: dict[str, Any], blob: bytes, max_dynamic: int) -> None:
        self.inputs = [TensorSpec.from_json(t) for t in header["inputs"]]
        self.outputs = [TensorSpec.from_json(t) for t in header["outputs"]]
        self._cuda = _cuda()
        self._ctx = self._cuda.Device(0).retain_primary_context()
        self._bind()
        self._logger = _Logger()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise EngineLoadFailed(f"TensorRT could not deserialize the engine: {'; '.join(self._logger.errors[-3:])}")
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda.Stream()
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, Any] = {}
        for spec in self.inputs + self.outputs:
            self._allocate(spec, max_dynamic)

    def _allocate(self, spec: TensorSpec, max_dynamic: int) -> None:
        dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(spec.name)))
        count = int(np.prod(spec.concrete_shape(max_dynamic)))
        self._host[spec.name] = self._cuda.pagelocked_empty(count, dtype)
        self._dev[spec.name] = self._cuda.mem_alloc(max(count * dtype.itemsize, 1))
        self._context.set_tensor_address(spec.name, int(self._dev[spec.name]))

    def _bind(self) -> None:
        if getattr(_bound, "ctx", None) is not self._ctx:
            self._ctx.push()
            _bound.ctx = self._ctx

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._bind()
        cuda, stream = self._cuda, self._stream
        for spec in self.inputs:
            arr = np.asarray(feeds[spec.name], dtype=self._host[spec.name].dtype)
            self._context.set_input_shape(spec.name, arr.shape)
            host = self._host[spec.name][: arr.size]
            np.copyto(host, arr.ravel())
            cuda.memcpy_htod_async(self._dev[spec.name], host, stream)
        if not self._context.execute_async_v3(stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        shapes = {}
        for spec in self.outputs:
            shapes[spec.name] = tuple(self._context.get_tensor_shape(spec.name))
            host = self._host[spec.name][: int(np.prod(shapes[spec.name]))]
            cuda.memcpy_dtoh_async(host, self._dev[spec.name], stream)
        stream.synchronize()
        return {n: self._host[n][: int(np.prod(s))].reshape(s).copy() for n, s in shapes.items()}

    def close(self) -> None:
        self._bind()
        for mem in self._dev.values():
            mem.free()
        self._dev.clear()
        del self._context, self._engine, self._runtime


def _write_engine(path: Path, header: dict[str, Any], blob: bytes) -> None:
    head = json.dumps(header).encode()
    _atomic_write(path, MAGIC + struct.pack("<I", len(head)) + head + blob)


def _read_engine(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise EngineLoadFailed(f"{path.name} is not an edge-agent TensorRT engine file")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except ValueError as err:
        raise EngineLoadFailed(f"{path.name} has a corrupt header: {err}") from err
    return header, data[start + n :]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
