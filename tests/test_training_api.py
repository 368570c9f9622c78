"""The training job's side without services: the golden-file helper against the gate's reader,
and the Python API's refusals (the end-to-end publish is in tests/test_fleet_latency.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.contract.protocol import TensorSpec
from agent.coordinator.gate import load_golden
from agent.errors import ConfigError, PublishError
from cloud import Fleet
from cloud.golden import write_golden
from cloud.publish import check_golden_file
from tests.conftest import mlp


def test_write_golden_is_what_the_gate_reads(tmp_path: Path) -> None:
    obs = np.arange(3 * 48, dtype=np.float32).reshape(3, 1, 48)
    actions = np.ones((3, 1, 12), np.float32)
    path = write_golden(tmp_path / "golden.npz", {"obs": obs}, {"actions": actions})
    assert path == tmp_path / "golden.npz" and path.exists()
    check_golden_file(path, ["obs"], ["actions"])  # what `fleet publish --golden` checks
    ins, outs = load_golden(path, [TensorSpec("obs", "float32", (1, 48))], [TensorSpec("actions", "float32", (1, 12))])
    assert len(ins) == len(outs) == 3
    np.testing.assert_array_equal(ins[2]["obs"], obs[2])
    np.testing.assert_array_equal(outs[0]["actions"], actions[0])


def test_write_golden_keeps_the_name_it_is_given(tmp_path: Path) -> None:
    path = write_golden(tmp_path / "golden", {"obs": np.zeros((1, 4))}, {"a": np.zeros((1, 2))})
    assert path.exists() and not (tmp_path / "golden.npz").exists()


@pytest.mark.parametrize(
    ("inputs", "outputs", "why"),
    [
        ({"obs": np.zeros((3, 4))}, {"a": np.zeros((2, 2))}, "same number of samples"),
        ({}, {"a": np.zeros((2, 2))}, "at least one input"),
        ({"obs": np.float32(1)}, {"a": np.zeros((1, 2))}, "first axis"),
        ({"obs": np.array([object()])}, {"a": np.zeros((1, 2))}, "numeric"),
    ],
)
def test_write_golden_refuses_a_layout_the_gate_would(
    tmp_path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], why: str
) -> None:
    with pytest.raises(PublishError, match=why):
        write_golden(tmp_path / "g.npz", inputs, outputs)
    assert not (tmp_path / "g.npz").exists()


def test_fleet_api_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        Fleet.from_config(tmp_path / "missing.toml")
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('[s3]\nbucket = "b"\nendpoint_url = "http://127.0.0.1:9"\n[mqtt]\nurl = "mqtt://127.0.0.1:9"\n')
    fleet = Fleet.from_config(cfg)
    model = mlp(tmp_path / "m.onnx")
    with pytest.raises(PublishError, match="version"):  # before anything is uploaded or announced
        fleet.publish(model, channel="walk", version="bad/name")
    with pytest.raises(PublishError, match="golden file lacks inputs/obs"):
        fleet.publish(
            model,
            channel="walk",
            golden=write_golden(tmp_path / "g.npz", {"x": np.zeros((1, 2))}, {"actions": np.zeros((1, 12))}),
        )
