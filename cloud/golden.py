"""Golden I/O for a model, written from a training job's arrays: the .npz layout the agent's gate
reads (inputs/<name>, outputs/<name>; the same number of samples, first axis, in each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import PublishError


def write_golden(path: str | Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Path:
    """`inputs` by the model's input names, `outputs` by its output names, each a batch of samples
    (the framework's outputs for those inputs). PublishError when the layout would be refused."""
    arrays = {f"inputs/{n}": np.asarray(a) for n, a in inputs.items()}
    arrays |= {f"outputs/{n}": np.asarray(a) for n, a in outputs.items()}
    if not inputs or not outputs:
        raise PublishError("a golden file needs at least one input and one output")
    if any(a.ndim == 0 for a in arrays.values()):
        raise PublishError("golden arrays need a first axis: one row per sample")
    if len({len(a) for a in arrays.values()}) != 1:
        raise PublishError("every golden array needs the same number of samples (first axis)")
    if any(a.dtype == object for a in arrays.values()):
        raise PublishError("golden arrays must be numeric (no Python objects)")
    path = Path(path)
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # a file object: numpy adds no .npz suffix
    return path
