"""Inference backends behind one interface. Imports are guarded so every machine without a GPU
still runs the whole product on the ONNX Runtime backend."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.config import BuildConfig
from agent.contract.protocol import TensorSpec
from agent.errors import BackendUnavailable

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


# Build progress: (stage name, fraction done in [0, 1] or None when the stage has no measure).
BuildProgress = Callable[[str, "float | None"], None]


def no_progress(_stage: str, _fraction: float | None) -> None:
    pass


class Engine(Protocol):
    """A loaded, runnable model. `run` is called from one thread at a time (the gate's, or a serving process's)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Turns an ONNX file into an engine file (`build`), and an engine file into an Engine (`load`).
    An engine is built for one precision; `precisions` lists those a build tries, in order (FP16
    first where the hardware has fast FP16; FP32, with TF32 off, as the fallback whose outputs match
    the training framework's)."""

    name: str

    def version(self) -> str: ...

    def precisions(self) -> list[str]: ...

    def cache_identity(self, precision: str) -> dict[str, str]:
        """What, besides the model's sha256, makes an engine file valid: board, GPU, runtime build,
        precision and the build settings."""
        ...

    def build(self, onnx_path: Path, engine_path: Path, precision: str, progress: BuildProgress = no_progress) -> None:
        """Runs in the build child process (agent.engines.build); writes `engine_path` atomically."""
        ...

    def load(self, engine_path: Path) -> Engine: ...


def engine_key(model_sha256: str, backend: Backend, precision: str | None = None) -> str:
    """Engine cache key: the model, the backend and its version, and its identity for `precision`
    (the backend's first by default). The precision is readable in the key (key_precision)."""
    precision = precision or backend.precisions()[0]
    ident = {
        "model": model_sha256,
        "backend": backend.name,
        "version": backend.version(),
        **backend.cache_identity(precision),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{model_sha256[:16]}-{backend.name}-{precision}-{digest[:16]}"


def key_precision(key: str | None) -> str | None:
    """The precision an engine key was made for; None for a key of another format."""
    parts = (key or "").split("-")
    return parts[2] if len(parts) == 4 and parts[2] in PRECISIONS else None


PRECISIONS = ("fp16", "fp32")


def select_backend(choice: str, cfg: BuildConfig, cache_dir: Path) -> Backend:
    """`auto` takes TensorRT where it imports and a GPU answers, else ONNX Runtime. `cache_dir`
    keeps what outlives engines (TensorRT's timing cache)."""
    if choice in ("tensorrt", "auto"):
        try:
            from agent.engines.tensorrt import TensorRTBackend

            return TensorRTBackend(cfg, cache_dir)
        except BackendUnavailable as err:
            if choice == "tensorrt":
                raise
            log.info("TensorRT is not usable here (%s): using ONNX Runtime", err)
    from agent.engines.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(emulate_fp16=cfg.emulate_fp16)
