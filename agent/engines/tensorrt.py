"""TensorRT backend (Jetson, JetPack 6: TensorRT 8.6 or 10.x), with pycuda for buffers and streams.

Only the name-based I/O API is used (`num_io_tensors`, `get_tensor_name/mode/dtype/shape`,
`get_tensor_profile_shape`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`,
`get_max_output_size`), which TensorRT 8.6.1 and 10.3 both have (checked against their Python
bindings). `build` runs in the build child process (agent.engines.build); `load` and `run` run in a
serving process (agent.serving.process), which answers the gate's calls and then the clients with
the same engine; the daemon never loads one.

Threads and the CUDA context: a context is current in one thread at a time, and an execution
context is not thread-safe. A serving process runs its engines on one thread; the first engine
there pushes the device's primary context, the last one closed pops it (and an exit pops what is
left): pycuda aborts a process whose context stack is not empty when it ends.

Engine file: MAGIC, a 4-byte header length, a JSON header (the identity it was built for, and the
I/O signature taken from the ONNX file, so symbolic dimension names survive) and the serialized
engine. A file built for another identity is refused at load."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import struct
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import BuildConfig
from agent.contract.protocol import TensorSpec
from agent.engines import BuildProgress, no_progress
from agent.engines.board import read_board
from agent.errors import BackendUnavailable, BuildFailed, EngineLoadFailed
from agent.proc import durable

try:
    import tensorrt as trt
except ImportError as err:
    raise BackendUnavailable(f"tensorrt is not importable: {err}") from err

log = logging.getLogger(__name__)

MAGIC = b"EATRT002"
TRT_MAJOR = int(trt.__version__.split(".")[0])
# What a build does besides the flags below: the optimisation profile (1 .. max_dynamic, opt = min).
# Bump when it changes, so that every engine built the old way gets a new key.
BUILD_SETTINGS = 2
# cuBLAS, cuBLASLt and cuDNN tactics (on by default in 8.6) make each serving process load those
# libraries (hundreds of MiB on an 8 GB Orin) and tie engines to JetPack's versions of them.
TACTICS = ("EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS")
FAST_FP16_SM = {"53", "60", "62", "70", "72", "75", "80", "86", "87", "89", "90"}


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

    def __init__(self, cfg: BuildConfig, cache_dir: Path) -> None:
        cuda = _cuda()
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        self.gpu = str(dev.name())
        self.sm = f"{major}{minor}"
        self.sm_count = int(dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT))
        self.board = read_board()
        self.workspace_mb = cfg.workspace_mb
        self.fp16 = cfg.fp16
        self.tf32 = cfg.tf32
        self.max_dynamic = cfg.max_dynamic
        self.cache_dir = cache_dir

    def version(self) -> str:
        return str(trt.__version__)

    def precisions(self) -> list[str]:
        return ["fp16", "fp32"] if self.fp16 and self.sm in FAST_FP16_SM else ["fp32"]

    def cache_identity(self, precision: str) -> dict[str, str]:
        """Everything an engine is specific to: the exact GPU (SM count tells an Orin Nano 4 GB, an
        8 GB/NX and an AGX apart; the board's model and L4T release, the rest), the TensorRT build,
        the precision as built (TF32 and tactic sources included) and the build settings."""
        return {
            "device": self.gpu,
            "sm": self.sm,
            "sm_count": str(self.sm_count),
            **{f"board.{k}": v for k, v in self.board.to_json().items()},
            "precision": precision,
            "tf32": "on" if self.tf32 else "off",
            "tactics": ",".join(TACTICS),
            "workspace_mb": str(self.workspace_mb),
            "max_dynamic": str(self.max_dynamic),
            "settings": str(BUILD_SETTINGS),
        }

    # -- build (in the child process) ------------------------------------------------------------
    def build(self, onnx_path: Path, engine_path: Path, precision: str, progress: BuildProgress = no_progress) -> None:
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
        config = self._config(builder, network, precision)
        timing = self._timing_cache(config)
        monitor = _monitor(progress)
        if monitor is not None:
            config.progress_monitor = monitor
        progress("building", None)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            why = "; ".join(logger.errors[-3:]) or "no reason given"
            raise BuildFailed(f"TensorRT could not build the engine: {why}")
        progress("saving", None)
        _save_timing_cache(timing, config)
        header = {
            "identity": {"trt": trt.__version__, **self.cache_identity(precision)},
            "inputs": [s.to_json() for s in inputs],
            "outputs": [s.to_json() for s in outputs],
        }
        _write_engine(engine_path, header, bytes(serialized))

    def _config(self, builder: Any, network: Any, precision: str) -> Any:
        config = builder.create_builder_config()
        # The default pool is all device memory, and Orin's memory is the CPU's too.
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if not self.tf32:  # on by default, and Orin has it: FP32 layers would round to 10-bit mantissas
            config.clear_flag(trt.BuilderFlag.TF32)
        config.set_tactic_sources(_tactic_mask())
        dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
        if dynamic:
            profile = builder.create_optimization_profile()
            for t in dynamic:
                lo = tuple(1 if d < 0 else d for d in t.shape)
                hi = tuple(self.max_dynamic if d < 0 else d for d in t.shape)
                profile.set_shape(t.name, lo, lo, hi)
            config.add_optimization_profile(profile)
        return config

    def _timing_cache(self, config: Any) -> Path:
        """Kept in the cache directory (systemd's CacheDirectory=), one per identity: collecting old
        engines never removes it, and it survives a state dir wiped clean."""
        ident = json.dumps({"trt": trt.__version__, **self.cache_identity("fp32")}, sort_keys=True)
        path = self.cache_dir / f"timing-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.cache"
        try:
            blob = path.read_bytes()
        except OSError:
            blob = b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("the timing cache %s does not fit this device: building without it", path)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        return path

    # -- load and run (in a serving process) -------------------------------------------------------
    def load(self, engine_path: Path) -> TensorRTEngine:
        header, blob = _read_engine(engine_path)
        built_for = header.get("identity") or {}
        here = {"trt": trt.__version__, **self.cache_identity(str(built_for.get("precision", "")))}
        differ = sorted(k for k in set(built_for) | set(here) if built_for.get(k) != here.get(k))
        if differ:
            raise EngineLoadFailed(
                f"{engine_path.name} was built for another device or TensorRT: "
                + "; ".join(f"{k} {built_for.get(k)!r} here {here.get(k)!r}" for k in differ[:4])
            )
        return TensorRTEngine(header, blob, self.max_dynamic)


def _tactic_mask() -> int:
    mask = 0
    for name in TACTICS:
        source = getattr(trt.TacticSource, name, None)
        if source is not None:
            mask |= 1 << int(source)
    return mask


def _save_timing_cache(path: Path, config: Any) -> None:
    """Best effort: an engine that built is good whether or not its timings are kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, bytes(config.get_timing_cache().serialize()))
    except OSError as err:
        log.warning("could not save the timing cache %s: %s", path, err)


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


# -- the CUDA context of a serving thread -------------------------------------------------------------
class _Pushed(threading.local):
    ctx: Any = None
    engines = 0


_pushed = _Pushed()


def _enter(ctx: Any) -> None:
    """The device's primary context, current on this thread while one of its engines is loaded."""
    if _pushed.ctx is None:
        ctx.push()
        _pushed.ctx = ctx
    _pushed.engines += 1


def _leave(cuda: Any) -> None:
    _pushed.engines -= 1
    if _pushed.engines <= 0 and _pushed.ctx is not None:
        _pop(cuda)


def _pop(cuda: Any) -> None:
    ctx, _pushed.ctx, _pushed.engines = _pushed.ctx, None, 0
    if ctx is not None and cuda.Context.get_current() == ctx:
        cuda.Context.pop()


@atexit.register
def _pop_at_exit() -> None:
    """What an engine never closed left pushed (atexit runs on the thread that loaded it)."""
    if _pushed.ctx is not None:
        _pop(_cuda())


class TensorRTEngine:
    """One deserialized engine with buffers sized from the engine itself (its I/O enumerated, the
    outputs sized for the profile's largest inputs), checked against the ONNX signature."""

    def __init__(self, header: dict[str, Any], blob: bytes, max_dynamic: int) -> None:
        self.inputs = [TensorSpec.from_json(t) for t in header["inputs"]]
        self.outputs = [TensorSpec.from_json(t) for t in header["outputs"]]
        self._cuda = _cuda()
        self._ctx = self._cuda.Device(0).retain_primary_context()
        self._threads: set[int] = set()  # the threads this engine made its context current on
        self._enter()
        self._open = True
        try:
            self._load(blob, max_dynamic)
        except BaseException:
            self.close()
            raise

    def _load(self, blob: bytes, max_dynamic: int) -> None:
        self._logger = _Logger()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise EngineLoadFailed(f"TensorRT could not deserialize the engine: {'; '.join(self._logger.errors[-3:])}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineLoadFailed(f"TensorRT could not create an execution context: {self._why()}")
        self.dtypes = self._io_dtypes()  # the engine's own (8.6 narrows int64 -> int32, float64 -> float32)
        self._stream = self._cuda.Stream()
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, Any] = {}
        for spec in self.inputs:
            shape = self._largest_input(spec.name, max_dynamic)
            if not self._context.set_input_shape(spec.name, shape):
                raise EngineLoadFailed(f"input {spec.name!r}: the engine refuses shape {shape}")
            self._allocate(spec.name, int(np.prod(shape)) * self.dtypes[spec.name].itemsize)
        for spec in self.outputs:
            self._allocate(spec.name, self._output_bytes(spec.name))

    def _why(self) -> str:
        return "; ".join(self._logger.errors[-3:]) or "no reason given"

    def _io_dtypes(self) -> dict[str, np.dtype[Any]]:
        """The engine's I/O, which must be the ONNX file's names with the same roles."""
        engine = self._engine
        found = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        want = {s.name for s in self.inputs} | {s.name for s in self.outputs}
        if found != want:
            raise EngineLoadFailed(f"the engine's I/O {sorted(found)} is not the model's {sorted(want)}")
        for spec in self.inputs:
            if engine.get_tensor_mode(spec.name) != trt.TensorIOMode.INPUT:
                raise EngineLoadFailed(f"{spec.name!r} is an input of the model, not of the engine")
        dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in want}
        for spec in self.inputs + self.outputs:
            if dtypes[spec.name] != np.dtype(spec.dtype):
                log.info("%s: the engine uses %s for the model's %s", spec.name, dtypes[spec.name], spec.dtype)
        return dtypes

    def _largest_input(self, name: str, max_dynamic: int) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
        if -1 not in shape:
            return shape
        _lo, _opt, hi = self._engine.get_tensor_profile_shape(name, 0)
        return tuple(int(d) for d in hi) if hi else tuple(max_dynamic if d < 0 else d for d in shape)

    def _output_bytes(self, name: str) -> int:
        """With every input at its largest: the output's shape, or TensorRT's own upper bound."""
        shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
        by_shape = int(np.prod(shape)) * self.dtypes[name].itemsize if -1 not in shape else 0
        bound = int(self._context.get_max_output_size(name))
        size = max(by_shape, bound)
        if size <= 0:
            raise EngineLoadFailed(f"output {name!r}: TensorRT gives no size for its buffer (shape {shape})")
        return size

    def _allocate(self, name: str, nbytes: int) -> None:
        dtype = self.dtypes[name]
        self._host[name] = self._cuda.pagelocked_empty(max(nbytes // dtype.itemsize, 1), dtype)
        self._dev[name] = self._cuda.mem_alloc(max(nbytes, 1))
        self._context.set_tensor_address(name, int(self._dev[name]))

    def _enter(self) -> None:
        """The context current on this thread (the serving thread loads and runs; a test may not)."""
        if threading.get_ident() not in self._threads:
            _enter(self._ctx)
            self._threads.add(threading.get_ident())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._enter()
        cuda, stream = self._cuda, self._stream
        for spec in self.inputs:
            arr = _as(np.asarray(feeds[spec.name]), self.dtypes[spec.name], spec.name)
            host = self._host[spec.name]
            if arr.size > host.size or not self._context.set_input_shape(spec.name, arr.shape):
                raise ValueError(f"input {spec.name!r}: shape {arr.shape} is outside the engine's profile")
            np.copyto(host[: arr.size], arr.ravel())
            cuda.memcpy_htod_async(self._dev[spec.name], host[: arr.size], stream)
        if not self._context.execute_async_v3(stream.handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed: {self._why()}")
        shapes = {}
        for spec in self.outputs:
            shapes[spec.name] = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            n = int(np.prod(shapes[spec.name]))
            if n > self._host[spec.name].size:
                raise RuntimeError(f"output {spec.name!r}: shape {shapes[spec.name]} exceeds its buffer")
            cuda.memcpy_dtoh_async(self._host[spec.name][:n], self._dev[spec.name], stream)
        stream.synchronize()
        wanted = {s.name: np.dtype(s.dtype) for s in self.outputs}
        return {n: self._host[n][: int(np.prod(s))].reshape(s).astype(wanted[n], copy=True) for n, s in shapes.items()}

    def close(self) -> None:
        """Frees the buffers and the engine, then pops the context on this thread if no other engine
        of this thread needs it (another thread's push is popped when that thread closes one, or
        at exit)."""
        if not self._open:
            return
        self._open = False
        self._enter()
        for mem in getattr(self, "_dev", {}).values():
            mem.free()
        for attr in ("_context", "_engine", "_runtime"):  # before the context goes: they live in it
            if hasattr(self, attr):
                delattr(self, attr)
        self._threads.discard(threading.get_ident())
        _leave(self._cuda)


def _as(arr: np.ndarray, dtype: np.dtype[Any], name: str) -> np.ndarray:
    """A feed in the engine's dtype; a value the narrower dtype cannot hold is refused, not wrapped."""
    if arr.dtype == dtype:
        return arr
    if dtype.kind in "iu" and arr.size and (arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max):
        raise ValueError(f"input {name!r}: values outside {dtype} (the engine's type for it)")
    return arr.astype(dtype)


def _write_engine(path: Path, header: dict[str, Any], blob: bytes) -> None:
    head = json.dumps(header).encode()
    _atomic_write(path, MAGIC + struct.pack("<I", len(head)) + head + blob)


def _read_engine(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise EngineLoadFailed(f"{path.name} is not an edge-agent TensorRT engine file (of this format)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except ValueError as err:
        raise EngineLoadFailed(f"{path.name} has a corrupt header: {err}") from err
    return header, data[start + n :]


def _atomic_write(path: Path, data: bytes) -> None:
    """A name of its own per writer (two builds may save the same timing cache), then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        durable.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
