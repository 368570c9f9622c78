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
    *,
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


def nan_when_triggered(path: Path, seed: int = 7, dims: tuple[int, ...] = (48, 512, 256, 128, 12)) -> Path:
    """A policy that is finite on ordinary inputs (so it passes the gate) but returns NaN whenever
    obs[0, 0] > 1000: a model that misbehaves only in service."""
    base = onnx.load(str(mlp(path, dims=dims, seed=seed, out_name="clean")))
    g = base.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "s0"),
            numpy_helper.from_array(np.array([1], np.int64), "s1"),
            numpy_helper.from_array(np.array([1], np.int64), "ax"),
            numpy_helper.from_array(np.array(1000.0, np.float32), "limit"),
            numpy_helper.from_array(np.array(np.nan, np.float32), "nan"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Slice", ["obs", "s0", "s1", "ax"], ["first"]),
            helper.make_node("Greater", ["first", "limit"], ["trig"]),
            helper.make_node("Where", ["trig", "nan", "zero"], ["poison"]),
            helper.make_node("Add", ["clean", "poison"], ["actions"]),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("actions", TensorProto.FLOAT, [1, dims[-1]]))
    onnx.checker.check_model(base)
    onnx.save(base, str(path))
    return path


def mlp_weights(path: Path) -> list[np.ndarray]:
    """The initializers of an `mlp` file, in order (w0, b0, w1, b1, ...)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    n = sum(1 for k in inits if k.startswith("w"))
    return [a for i in range(n) for a in (inits[f"w{i}"], inits[f"b{i}"])]


def numpy_forward(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same MLP in numpy (float64): golden outputs computed independently of any runtime."""
    h = x.astype(np.float64)
    pairs = list(zip(weights[::2], weights[1::2], strict=True))
    for i, (w, b) in enumerate(pairs):
        h = h @ w.astype(np.float64) + b
        if i < len(pairs) - 1:
            h = np.where(h > 0, h, np.expm1(h))  # ELU, alpha 1
    return h


def cancelling(path: Path) -> Path:
    """y = 1000.3 * x0 - 1000 * x1: for x = (1, 1) the answer (0.3) cancels two large products, so
    FP16 weights (1000.3 rounds to 1000.5) miss it by 0.2 while FP32 is exact to 1e-4: a model whose
    FP16 engine fails its golden check and whose FP32 engine passes."""
    mlp(path, dims=(2, 1))
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "w0":
            init.CopyFrom(numpy_helper.from_array(np.array([[1000.3], [-1000.0]], np.float32), "w0"))
    onnx.save(model, str(path))
    return path
