"""Stand-ins for TensorRT's and pycuda's Python modules, for what cannot exist on these machines (no
GPU, no TensorRT): just enough of their documented API (names checked against TensorRT 8.6.1 and
10.3.0's bindings and pycuda's wrapper) to run agent.engines.tensorrt's own logic in CI: the CUDA
context stack, the builder flags and tactic sources, the timing cache, I/O enumeration and buffer
sizing, dtype narrowing. They record what they are asked; they do not infer anything. The
"engine" they build is a JSON description whose outputs are each input times two."""

from __future__ import annotations

import enum
import json
import types
from typing import Any

import numpy as np


# -- pycuda.driver ----------------------------------------------------------------------------------
class CudaError(Exception):
    pass


class FakeContext:
    stack: list[FakeContext] = []  # the calling process's context stack (one thread in these tests)

    def push(self) -> None:
        FakeContext.stack.append(self)

    @staticmethod
    def pop() -> None:
        if not FakeContext.stack:
            raise CudaError("cuCtxPopCurrent failed: the context stack is empty")
        FakeContext.stack.pop()

    @staticmethod
    def get_current() -> FakeContext | None:
        return FakeContext.stack[-1] if FakeContext.stack else None


_PRIMARY = FakeContext()
MEMORY: dict[int, np.ndarray] = {}  # device allocations by address


class FakeDevice:
    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal

    @staticmethod
    def count() -> int:
        return 1

    def compute_capability(self) -> tuple[int, int]:
        return (8, 7)

    def name(self) -> str:
        return "Orin"

    def get_attribute(self, attr: str) -> int:
        assert attr == "MULTIPROCESSOR_COUNT"
        return SM_COUNT[0]

    def retain_primary_context(self) -> FakeContext:
        return _PRIMARY


SM_COUNT = [8]  # an Orin Nano 8 GB / NX; a test may change it


class DeviceMem:
    def __init__(self, nbytes: int) -> None:
        self.address = 0x1000 + len(MEMORY) * 0x10000
        MEMORY[self.address] = np.zeros(nbytes, np.uint8)
        self.freed = False

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        assert _PRIMARY in FakeContext.stack, "memory freed with no context current"
        self.freed = True


class Stream:
    handle = 1

    def synchronize(self) -> None:
        pass


def memcpy_htod_async(dev: DeviceMem, host: np.ndarray, _stream: Stream) -> None:
    raw = host.view(np.uint8).ravel()
    MEMORY[int(dev)][: raw.size] = raw


def memcpy_dtoh_async(host: np.ndarray, dev: DeviceMem, _stream: Stream) -> None:
    raw = host.view(np.uint8).reshape(-1)
    raw[:] = MEMORY[int(dev)][: raw.size]


def pycuda_driver() -> types.ModuleType:
    m = types.ModuleType("pycuda.driver")
    m.Error = CudaError  # type: ignore[attr-defined]
    m.init = lambda: None  # type: ignore[attr-defined]
    m.Device = FakeDevice  # type: ignore[attr-defined]
    m.Context = FakeContext  # type: ignore[attr-defined]
    m.device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT="MULTIPROCESSOR_COUNT")  # type: ignore[attr-defined]
    m.Stream = Stream  # type: ignore[attr-defined]
    m.pagelocked_empty = lambda count, dtype: np.empty(count, dtype)  # type: ignore[attr-defined]
    m.mem_alloc = DeviceMem  # type: ignore[attr-defined]
    m.memcpy_htod_async = memcpy_htod_async  # type: ignore[attr-defined]
    m.memcpy_dtoh_async = memcpy_dtoh_async  # type: ignore[attr-defined]
    return m


# -- tensorrt ---------------------------------------------------------------------------------------
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 4


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}
_FROM = {"float32": DataType.FLOAT, "float16": DataType.HALF, "int32": DataType.INT32, "int64": DataType.INT64}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    TF32 = 6


class TacticSource(enum.IntEnum):
    CUBLAS = 0
    CUBLAS_LT = 1
    CUDNN = 2
    EDGE_MASK_CONVOLUTIONS = 3
    JIT_CONVOLUTIONS = 4


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class Network:
    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.num_inputs = 0

    def get_input(self, i: int) -> Tensor:
        return self.inputs[i]


class Parser:
    num_errors = 0

    def __init__(self, network: Network, _logger: Any) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        from agent.contract.onnx_signature import check_onnx, signature

        inputs, _ = signature(check_onnx(__import__("pathlib").Path(path)))
        self.network.inputs = [Tensor(s.name, tuple(d if isinstance(d, int) else -1 for d in s.shape)) for s in inputs]
        self.network.num_inputs = len(inputs)
        return True


class TimingCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob or b"timings"

    def serialize(self) -> bytes:
        return self.blob + b"+"


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[tuple[int, ...]]] = {}

    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self.shapes[name] = [lo, opt, hi]


class BuilderConfig:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # TF32 is on by default, as in TensorRT
        self.tactics = (1 << 5) - 1  # every source, as in 8.6
        self.timing: TimingCache | None = None
        self.profiles: list[Profile] = []
        self.pool: dict[Any, int] = {}

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool[pool] = size

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def set_tactic_sources(self, mask: int) -> bool:
        self.tactics = mask
        return True

    def create_timing_cache(self, blob: bytes) -> TimingCache:
        return TimingCache(blob)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.timing = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        assert self.timing is not None
        return self.timing

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    platform_has_fast_fp16 = True
    last_config: BuilderConfig | None = None

    def __init__(self, _logger: Any) -> None:
        pass

    def create_network(self, _flags: int) -> Network:
        return Network()

    def create_builder_config(self) -> BuilderConfig:
        Builder.last_config = BuilderConfig()
        return Builder.last_config

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
        profile = config.profiles[0].shapes if config.profiles else {}
        io = [
            {"name": t.name, "mode": "in", "shape": list(t.shape), "profile": profile.get(t.name)}
            for t in network.inputs
        ]
        return json.dumps({"io": io, "flags": sorted(int(f) for f in config.flags), "tactics": config.tactics}).encode()


class Engine:
    """From a test's JSON description: {"io": [{name, mode in/out, dtype, shape, profile}]}."""

    def __init__(self, desc: dict[str, Any]) -> None:
        self.io = {t["name"]: t for t in desc["io"]}
        self.num_io_tensors = len(self.io)
        self.fail_context = bool(desc.get("fail_context"))

    def get_tensor_name(self, i: int) -> str:
        return list(self.io)[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self.io[name]["mode"] == "in" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return _FROM[self.io[name].get("dtype", "float32")]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.io[name]["shape"])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert profile == 0
        return [tuple(s) for s in self.io[name]["profile"]]

    def create_execution_context(self) -> ExecutionContext | None:
        return None if self.fail_context else ExecutionContext(self)


class ExecutionContext:
    """Outputs take the first input's leading dimension (a batch); each output = first input x 2."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        t = self.engine.io[name]
        lo, _opt, hi = t.get("profile") or (t["shape"], t["shape"], t["shape"])
        if len(shape) != len(hi) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        t = self.engine.io[name]
        if t["mode"] == "in":
            return self.shapes.get(name, tuple(t["shape"]))
        first = next(n for n, v in self.engine.io.items() if v["mode"] == "in")
        batch = self.shapes.get(first, (-1,))[0]
        return (batch, *t["shape"][1:]) if -1 in t["shape"] else tuple(t["shape"])

    def get_max_output_size(self, name: str) -> int:
        return int(self.engine.io[name].get("max_bytes", -1))

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, _stream: int) -> bool:
        first = next(n for n, v in self.engine.io.items() if v["mode"] == "in")
        x_dtype = _NP[_FROM[self.engine.io[first].get("dtype", "float32")]]
        n = int(np.prod(self.shapes[first]))
        x = MEMORY[self.addresses[first]].view(x_dtype)[:n]
        for name, t in self.engine.io.items():
            if t["mode"] == "out":
                out = MEMORY[self.addresses[name]].view(_NP[_FROM[t.get("dtype", "float32")]])
                out[:n] = (x * 2).astype(out.dtype)
        return True


class Runtime:
    def __init__(self, _logger: Any) -> None:
        pass

    def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
        try:
            return Engine(json.loads(blob))
        except ValueError:
            return None


def tensorrt(version: str = "10.3.0") -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    for name, value in {
        "ILogger": ILogger,
        "Builder": Builder,
        "OnnxParser": Parser,
        "Runtime": Runtime,
        "BuilderFlag": BuilderFlag,
        "TacticSource": TacticSource,
        "TensorIOMode": TensorIOMode,
        "DataType": DataType,
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        "NetworkDefinitionCreationFlag": types.SimpleNamespace(EXPLICIT_BATCH=0),
        "nptype": lambda dt: _NP[DataType(dt)],
    }.items():
        setattr(m, name, value)
    return m
