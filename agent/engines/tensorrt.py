"""TensorRT backend (Jetson). Filled in by the TensorRT issue; until then it reports unavailable
so `backend = "auto"` falls back to ONNX Runtime."""

from __future__ import annotations

from agent.engines import BackendUnavailable

try:
    import tensorrt  # noqa: F401
except ImportError as err:
    raise BackendUnavailable(f"tensorrt is not importable: {err}") from err


class TensorRTBackend:
    def __init__(self) -> None:
        raise BackendUnavailable("the TensorRT backend is not built yet (see the TensorRT issue)")
