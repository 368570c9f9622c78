"""Read an ONNX file's validity and I/O signature (used by `fleet publish` and local deploys)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from agent.contract.protocol import DTYPES, TensorSpec
from agent.errors import RejectedModel


def check_onnx(path: Path) -> onnx.ModelProto:
    """onnx.checker on the file; RejectedModel('onnx', one line) when it is not a valid model."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError, OSError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RejectedModel("onnx", f"not a valid ONNX model: {first}") from err
    return model


def signature(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    outputs = [_spec(v) for v in model.graph.output]
    return inputs, outputs


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    t = v.type.tensor_type
    dtype = str(helper.tensor_dtype_to_np_dtype(t.elem_type))
    if dtype not in DTYPES:
        raise RejectedModel("onnx", f"tensor {v.name!r} has unsupported type {dtype}")
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(v.name, dtype, tuple(dims))
