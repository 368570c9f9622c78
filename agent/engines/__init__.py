"""Inference backends behind one interface. Imports are guarded so every machine without a GPU
still runs the whole product on the ONNX Runtime backend."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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
    """Turns an ONNX file into an engine file (`build`), and an engine file into an Engine (`load`)."""

    name: str

    def version(self) -> str: ...

    def cache_identity(self) -> dict[str, str]:
        """What, besides the model's sha256, makes an engine file valid: device, precision, options."""
        ...

    def build(self, onnx_path: Path, engine_path: Path, progress: BuildProgress = no_progress) -> None:
        """Runs in the build child process (agent.engines.build); writes `engine_path` atomically."""
        ...

    def load(self, engine_path: Path) -> Engine: ...


def engine_key(model_sha256: str, backend: Backend) -> str:
    """Engine cache key: model + backend and its version + device + precision + build options."""
    ident = {"model": model_sha256, "backend": backend.name, "version": backend.version(), **backend.cache_identity()}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{model_sha256[:16]}-{backend.name}-{digest[:16]}"


def select_backend(choice: str, workspace_mb: int = 1024, fp16: bool = True) -> Backend:
    """`auto` takes TensorRT where it imports and a GPU answers, else ONNX Runtime."""
    if choice in ("tensorrt", "auto"):
        try:
            from agent.engines.tensorrt import TensorRTBackend

            return TensorRTBackend(workspace_mb=workspace_mb, fp16=fp16)
        except BackendUnavailable as err:
            if choice == "tensorrt":
                raise
            log.info("TensorRT is not usable here (%s): using ONNX Runtime", err)
    from agent.engines.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()
