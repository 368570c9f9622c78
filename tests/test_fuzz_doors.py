"""The doors, fuzzed (hypothesis, at least 1000 examples each, counted): `fleet publish`, `fleet
rollback`, `agent deploy`, `agent pin` and the config files of both, called as a user would type
them (names, paths, numbers) against a real mosquitto, moto's S3 server and a real agent. Every
outcome is success or one line on stderr with a documented non-zero exit code: never a traceback,
never a file outside the state dir, never an S3 key outside the bucket's layout."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main as agent_main
from cloud.cli import main as fleet_main
from scripts.loopback.models import mlp
from tests.conftest import Fleet
from tests.test_fuzz import FUZZ, Count, json_scalars, traversal

MINIMAL_AGENT_TOML = 'channel = "walk"\nstate_dir = "/tmp/edge-fuzz/s"\nsocket = "/tmp/edge-fuzz/r/infer.sock"\n'
DOCUMENTED = {0, 1, 2, 3, 4}  # agent.contract.cli_errors; 70 (a bug) and 130 are not acceptable here
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
LAYOUT = re.compile(
    rf"models/[0-9a-f]{{64}}\.onnx|golden/[0-9a-f]{{64}}\.npz|manifests/{NAME}/{NAME}\.json|channels/{NAME}/(latest|current)\.json"
)

valid_names = st.from_regex(r"\A[a-z][a-z0-9._-]{0,8}\Z")
names = valid_names | st.text(max_size=70) | traversal | st.sampled_from(["a/#", "v 1", "x\ny", "-rf", "." * 3])
numbers = st.integers(-(2**70), 2**70).map(str) | st.floats().map(str) | st.sampled_from(["nan", "inf", "1e400", ""])


def invoke(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process command line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's mistakes, --help
            code = int(stop.code or 0) if not isinstance(stop.code, str) else 2
    return code, out.getvalue(), err.getvalue()


def answered_well(code: int, out: str, err: str) -> None:
    assert code in DOCUMENTED, (code, out, err)
    assert "Traceback" not in out + err, err
    errors = err.strip().splitlines()
    assert len(errors) <= 1, err  # at most one line on stderr, whatever happened
    if code in (2, 4):  # a mistake, a service: that line says what and where to look
        assert errors and errors[0], (out, err)
    elif code != 0:  # no (1), not running (3): the command's own answer says so
        assert (out + err).strip(), (code, out, err)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Files a user might hand the doors: a model, a golden file, and things that are neither."""
    d = tmp_path / "inputs"
    d.mkdir()
    model = mlp(d / "tiny.onnx", dims=(4, 8, 2))
    np.savez(
        d / "golden.npz", **{"inputs/obs": np.zeros((2, 1, 4), np.float32), "outputs/actions": np.zeros((2, 1, 2))}
    )
    (d / "text.onnx").write_text("not a model")
    (d / "empty.onnx").write_bytes(b"")
    (d / "bad.npz").write_bytes(b"PK not an archive")
    return {
        "model": model,
        "golden": d / "golden.npz",
        "text": d / "text.onnx",
        "empty": d / "empty.onnx",
        "bad_npz": d / "bad.npz",
        "dir": d,
        "missing": d / "missing.onnx",
    }


def paths(inputs: dict[str, Path]) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(str(p) for p in inputs.values())) | traversal


def test_fuzz_fleet_publish_and_rollback(fleet: Fleet, inputs: dict[str, Path]) -> None:
    cfg = str(fleet.fleet_cfg)
    publish, rollback = Count("fleet publish"), Count("fleet rollback")

    typed = st.fixed_dictionaries(
        {"model": paths(inputs), "channel": names},
        optional={
            "--version": names,
            "--version=": names,  # the same option written with '='
            "--latency-budget-us": numbers,
            "--golden-atol": numbers,
            "--golden": paths(inputs),
        },
    )

    @FUZZ
    @given(typed)
    def run_publish(args: dict[str, str]) -> None:
        publish()
        argv = ["publish", args["model"], "--channel", args["channel"], "--config", cfg]
        for option, value in args.items():
            if option.endswith("="):
                argv.append(f"{option}{value}")
            elif option.startswith("--"):
                argv += [option, value]
        code, out, err = invoke(fleet_main, argv)
        answered_well(code, out, err)
        if code == 0:
            ann = json.loads(out)
            assert ann["channel"] == args["channel"] and re.fullmatch(NAME, ann["manifest"]["version"])

    @FUZZ
    @given(names, names)
    def run_rollback(channel: str, version: str) -> None:
        rollback()
        answered_well(*invoke(fleet_main, ["rollback", "--channel", channel, "--to", version, "--config", cfg]))

    run_publish()
    run_rollback()
    publish.report()
    rollback.report()
    keys = [o["Key"] for o in fleet.s3.client().list_objects_v2(Bucket=fleet.bucket).get("Contents", [])]
    assert keys and all(LAYOUT.fullmatch(k) for k in keys), [k for k in keys if not LAYOUT.fullmatch(k)]


def test_fuzz_agent_deploy_and_pin(fleet: Fleet, inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = fleet.agent_config("go2-fuzz", extra="[gate]\nlatency_budget_us = 100000\n")
    fleet.start_agent(cfg)
    deploy, pin = Count("agent deploy"), Count("agent pin")
    before = {p for p in tmp_path.rglob("*") if "state" not in p.parts}

    @FUZZ
    @given(paths(inputs), st.none() | names, st.sampled_from(["0", "0.2"]))
    def run_deploy(model: str, version: str | None, wait: str) -> None:
        deploy()
        argv = ["deploy", model, "--wait", wait, "--config", str(cfg)]
        argv += ["--version", version] if version is not None else []
        answered_well(*invoke(agent_main, argv))

    @FUZZ
    @given(names)
    def run_pin(version: str) -> None:
        pin()
        answered_well(*invoke(agent_main, ["pin", version, "--config", str(cfg)]))

    run_deploy()
    run_pin()
    answered_well(*invoke(agent_main, ["unpin", "--config", str(cfg)]))
    deploy.report()
    pin.report()
    state = cfg.parent / "state"
    outside = {p for p in tmp_path.rglob("*") if "state" not in p.parts} - before
    allowed = {cfg.parent / "run", *(cfg.parent / "run").iterdir(), cfg.parent / "agent.log"}
    assert outside <= allowed, sorted(outside - allowed)
    for p in state.rglob("*"):
        assert p.resolve().is_relative_to(state.resolve())
    history = json.loads(fleet.agent(cfg, "models", "--json", "--limit", "100000").stdout)
    assert all(re.fullmatch(NAME, r["version"]) for r in history)


def test_fuzz_config_files(tmp_path: Path) -> None:
    agent_count, fleet_count = Count("agent config files"), Count("fleet config files")
    keys = st.sampled_from(["channel", "device_id", "state_dir", "socket", "backend", "activation", "disk_reserve_mb"])
    values = json_scalars | names | traversal
    path = tmp_path / "agent.toml"

    @FUZZ
    @given(st.dictionaries(keys, values, max_size=3), st.text(max_size=30))
    def run_agent(changes: dict[str, object], junk: str) -> None:
        agent_count()
        lines = [ln for ln in MINIMAL_AGENT_TOML.splitlines() if ln.split(" =")[0] not in changes]
        lines += [f"{k} = {json.dumps(v)}" for k, v in changes.items()]
        path.write_text("\n".join(lines) + "\n" + junk)
        answered_well(*invoke(agent_main, ["status", "--config", str(path)]))

    fleet_path = tmp_path / "fleet.toml"

    @FUZZ
    @given(st.text(max_size=200) | names.map(lambda n: f'[s3]\nbucket = "{n}"\n[collector]\ndb = "{n}"\n'))
    def run_fleet(text: str) -> None:
        fleet_count()
        fleet_path.write_text(text)
        answered_well(*invoke(fleet_main, ["status", "--config", str(fleet_path)]))

    run_agent()
    run_fleet()
    agent_count.report()
    fleet_count.report()
