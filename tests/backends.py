"""Helpers shared by the engine tests: a recorder for the provisioner's hooks, and the ONNX Runtime
backend as the next release would identify itself (a backend upgrade, as a TensorRT/JetPack upgrade
would be on a Jetson). Module-level so the spawned build child can unpickle them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.engines.provisioner import Hooks


class UpgradedOnnxRuntime(OnnxRuntimeBackend):
    def version(self) -> str:
        return super().version() + "+next"


@dataclass
class Recorder:
    stages: list[str] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cancel_reason: str | None = None

    def hooks(self) -> Hooks:
        return Hooks(
            stage=self.stages.append,
            progress=self.progress.append,
            notify=lambda kind, fields: self.events.append((kind, fields)),
            cancelled=lambda: self.cancel_reason,
        )

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    @property
    def builds(self) -> int:
        return self.kinds().count("engine_built")


class SegfaultingOnnxRuntime(OnnxRuntimeBackend):
    """A backend whose native code crashes mid-build, as a TensorRT bug or bad driver would."""

    def build(self, onnx_path: Any, engine_path: Any, precision: str = "fp32", progress: Any = None) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)


CRASH_MARK = b"#crash-at-load"


class MarksItsEngines(OnnxRuntimeBackend):
    """A builder whose engines carry a mark (a miscompiled engine, as another device's TensorRT
    bug would make): the hash in its record still matches its bytes."""

    def build(self, onnx_path: Any, engine_path: Any, precision: str = "fp32", progress: Any = None) -> None:
        super().build(onnx_path, engine_path, precision)
        with open(engine_path, "ab") as f:
            f.write(CRASH_MARK)


class CrashesOnMarkedEngines(OnnxRuntimeBackend):
    """A runtime that dies loading such an engine (SIGABRT, as a native crash would): the serving
    process ends, the daemon does not."""

    def load(self, engine_path: Any) -> Any:
        import os

        with open(engine_path, "rb") as f:
            if f.read().endswith(CRASH_MARK):
                os.abort()
        return super().load(engine_path)
