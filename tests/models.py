"""Test models: Go2-sized policy MLPs written as ONNX with the onnx helper API."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(
    path: Path,
    dims: tuple[int, ...] = (48, 512, 256, 128, 12),
    seed: int = 0,
    nan: bool = False,
    in_name: str = "obs",
    out_name: str = "actions",
    pad_bytes: int = 0,
) -> Path:
    """A Go2-sized policy MLP (ELU) as ONNX. `nan` poisons a bias; `pad_bytes` adds an unused
    initializer to make a large file."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], in_name
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = np.zeros(b, np.float32)
        if nan and i == len(dims) - 2:
            bias[0] = np.nan
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        y = out_name if i == len(dims) - 2 else f"h{i}"
        mm = f"mm{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [mm]))
        if i == len(dims) - 2:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [y]))
        else:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Elu", [f"a{i}"], [y]))
        x = y
    if pad_bytes:
        inits.append(numpy_helper.from_array(rng.standard_normal(pad_bytes // 4).astype(np.float32), "pad"))
    graph = helper.make_graph(
        nodes,
        "policy",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [1, dims[0]])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [1, dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
