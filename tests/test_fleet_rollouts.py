"""Staged rollouts end to end on real services: three agents on one channel, `fleet collect`
driving the rollouts. A canary that rejects the model, or activates it and rolls it back (its
watch, or `agent rollback`), halts the rollout and nobody else downloads it; a clean canary is
promoted after its soak, also by a collector restarted mid-soak; `fleet halt` and `fleet promote`
by hand; a device group as the canaries, from the Python API; a rollout superseded by a newer
publish to the whole channel never promotes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Policy
from cloud import Fleet as FleetAPI
from cloud.config import load
from cloud.publish import current_version, latest_announcement
from scripts.loopback.models import nan_when_triggered
from scripts.loopback.services import stop
from tests.conftest import Fleet, mlp, wait_for

pytestmark = pytest.mark.integration

DEVICES = ("go2-01", "go2-02", "go2-03")
SMALL = (48, 64, 12)


def three_on_v1(fleet: Fleet, tmp_path: Path, extra: str = "") -> dict[str, Path]:
    """The collector, three agents, and v1 active on all of them."""
    fleet.start_collector()
    cfgs = {d: fleet.agent_config(d, extra) for d in DEVICES}
    for cfg in cfgs.values():
        fleet.start_agent(cfg)
    fleet.publish(mlp(tmp_path / "v1.onnx", SMALL, seed=1), "v1")
    for cfg in cfgs.values():
        fleet.wait_active(cfg, "v1")
    return cfgs


def rollouts(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(fleet.fleet("rollouts", "--json").stdout)}


def wait_state(fleet: Fleet, rollout: str, state: str, timeout: float = 30) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        last.update(rollouts(fleet).get(rollout) or {})
        return dict(last) if last.get("state") == state else None

    try:
        result: dict[str, Any] = wait_for(check, timeout, f"{rollout} {state}")
    except AssertionError as err:  # say where it stuck
        raise AssertionError(f"{err}; last seen: {last.get('state')}: {last.get('reason')}") from None
    return result


def model_events(fleet: Fleet, device: str, version: str) -> list[dict[str, Any]]:
    return [e for e in fleet.events(device) if e["kind"] == "model_state" and e.get("version") == version]


def assert_never_received(fleet: Fleet, cfg: Path, device: str, version: str) -> None:
    """Not downloaded, not recorded, not active: only the not_targeted event names it."""
    assert model_events(fleet, device, version) == []
    status = fleet.status(cfg)
    assert status["active"]["version"] != version and (status["last_rejected"] or {}).get("version") != version
    assert [e["version"] for e in fleet.events(device) if e["kind"] == "not_targeted"].count(version) == 1


def test_a_canary_that_rejects_halts_the_rollout(fleet: Fleet, tmp_path: Path) -> None:
    cfgs = three_on_v1(fleet, tmp_path)
    out = fleet.publish(mlp(tmp_path / "v2.onnx", SMALL, seed=2, nan=True), "v2", "--canary", "go2-01", "--soak", "2s")
    assert out["rollout"] == f"{fleet.channel}-v2" and out["targets"] == ["go2-01"]
    fleet.wait_rejected(cfgs["go2-01"], "v2")
    halted = wait_state(fleet, out["rollout"], "halted")
    assert halted["reason"].startswith("canary go2-01 rejected: "), halted
    assert halted["reason"].endswith("; canaries told to roll back to v1"), halted
    assert halted["observed"]["go2-01"]["failed"].startswith("rejected: ")
    gate_reason = fleet.status(cfgs["go2-01"])["last_rejected"]["reason"]
    assert gate_reason in halted["reason"]
    text = fleet.fleet("rollouts").stdout
    assert "halted" in text and "canary go2-01 rejected" in text

    # The canaries' rollback (targeted at go2-01) reaches the others only as one more not_targeted.
    wait_for(lambda: len([e for e in fleet.events("go2-02") if e["kind"] == "not_targeted"]) == 2, 15, "rollback")
    fleet.wait_active(cfgs["go2-01"], "v1")
    for device in ("go2-02", "go2-03"):
        assert_never_received(fleet, cfgs[device], device, "v2")
        assert fleet.status(cfgs[device])["active"]["version"] == "v1"
        (skipped,) = [e for e in fleet.events(device) if e["kind"] == "not_targeted" and e["version"] == "v2"]
        assert "for 1 other device(s) only" in skipped["reason"]
        assert not [p for p in (tmp_path / device).rglob("*") if out["manifest"]["sha256"] in p.name]


@pytest.mark.parametrize("by", ["watch", "operator"])
def test_a_canary_that_rolls_back_halts_the_rollout(fleet: Fleet, tmp_path: Path, by: str) -> None:
    """The canary activates v2 and rolls it back during the soak: its watch (v2 passes the gate,
    finite on the gate's inputs, and returns NaN in service on obs[0, 0] > 1000) or by hand."""
    cfgs = three_on_v1(fleet, tmp_path, extra="[watch]\nwindow_s = 600\n")  # the watch outlasts the test
    v2 = nan_when_triggered(tmp_path / "v2.onnx", seed=2, dims=SMALL)
    out = fleet.publish(v2, "v2", "--canary", "go2-01", "--soak", "1h")  # no promotion before the rollback
    rollout = out["rollout"]
    status = fleet.wait_active(cfgs["go2-01"], "v2")
    assert status["watch"]["version"] == "v2"
    soaking = wait_for(lambda: (r := rollouts(fleet)[rollout])["soak_until"] and r, 15, "the soak to start")
    assert soaking["state"] == "canary"
    assert soaking["observed"]["go2-01"] == {"active": True, "failed": None, "left": None}

    if by == "watch":
        why = "post-activation watch: 1 responses with NaN/Inf outputs in service"
        obs = np.zeros((1, SMALL[0]), np.float32)
        obs[0, 0] = 5000.0  # what the robot sends in service, never among the gate's inputs
        with Policy(cfgs["go2-01"].parent / "run" / "infer.sock") as policy:
            assert np.isnan(policy(obs)).all() and policy.model_version == "v2"
            fleet.wait_active(cfgs["go2-01"], "v1", timeout=15)  # the watch rolled v2 back
            assert np.isfinite(policy(obs)).all() and policy.model_version == "v1"
    else:
        why = "rolled back by the operator (`agent rollback`)"
        fleet.agent(cfgs["go2-01"], "rollback")

    halted = wait_state(fleet, rollout, "halted")
    assert halted["reason"] == f"canary go2-01 rolled_back: {why}; canaries told to roll back to v1", halted
    assert halted["observed"]["go2-01"] == {"active": False, "failed": f"rolled_back: {why}", "left": None}
    text = fleet.fleet("rollouts").stdout
    assert "halted" in text and "canary go2-01 rolled_back" in text
    canary = fleet.status(cfgs["go2-01"])
    assert canary["active"]["version"] == "v1" and canary["last_rollback"]["version"] == "v2"
    assert canary["last_rollback"]["reason"].endswith(why)

    # The halt's announcement (v1, targeted at go2-01) reaches the others as one more not_targeted;
    # the canary, back on v1 already, handles it (today: v1 through the gate again) and stays on v1.
    wait_for(lambda: len([e for e in fleet.events("go2-02") if e["kind"] == "not_targeted"]) == 2, 15, "rollback")
    wait_for(lambda: [e["state"] for e in model_events(fleet, "go2-01", "v1")].count("announced") == 2, 15, "v1 again")
    wait_for(lambda: fleet.status(cfgs["go2-01"])["pending"] is None, 20, "the canary to be done with it")
    assert fleet.status(cfgs["go2-01"])["active"]["version"] == "v1"
    for device in ("go2-02", "go2-03"):
        assert_never_received(fleet, cfgs[device], device, "v2")
        assert fleet.status(cfgs[device])["active"]["version"] == "v1"
    assert current_version(load(fleet.fleet_cfg), fleet.channel) == "v1"
    assert rollouts(fleet)[rollout]["state"] == "halted"


def test_a_canary_moved_off_the_model_by_hand_keeps_it_from_promotion(fleet: Fleet, tmp_path: Path) -> None:
    """`agent activate v1` on the canary mid-soak retires v2 there (not a rollback): the rollout
    waits for the canary to run v2 again instead of promoting a model no canary runs."""
    cfgs = three_on_v1(fleet, tmp_path)
    out = fleet.publish(mlp(tmp_path / "v2.onnx", SMALL, seed=2), "v2", "--canary", "go2-01", "--soak", "15s")
    rollout = out["rollout"]
    fleet.wait_active(cfgs["go2-01"], "v2")
    soaking = wait_for(lambda: (r := rollouts(fleet)[rollout])["soak_until"] and r, 15, "the soak to start")
    fleet.agent(cfgs["go2-01"], "activate", "v1")
    assert fleet.status(cfgs["go2-01"])["active"]["version"] == "v1"
    time.sleep(max(0.0, soaking["soak_until"] - time.time()) + 3)  # the collector ticks every second

    waiting = rollouts(fleet)[rollout]
    assert waiting["state"] == "canary", waiting
    assert waiting["reason"] == "waiting for go2-01 to activate v2 (go2-01 left it: retired: replaced by v1)"
    assert waiting["observed"]["go2-01"] == {"active": False, "failed": None, "left": "retired: replaced by v1"}
    (row,) = [line.split() for line in fleet.fleet("rollouts").stdout.splitlines() if line.startswith(rollout)]
    assert row[3:5] == ["canary", "go2-01"]  # neither * (runs it) nor ! (failed)
    for device in ("go2-02", "go2-03"):
        assert model_events(fleet, device, "v2") == []
        assert fleet.status(cfgs[device])["active"]["version"] == "v1"
    assert current_version(load(fleet.fleet_cfg), fleet.channel) == "v1"


def test_a_clean_canary_is_promoted_after_its_soak_across_a_collector_restart(fleet: Fleet, tmp_path: Path) -> None:
    cfgs = three_on_v1(fleet, tmp_path)
    out = fleet.publish(mlp(tmp_path / "v2.onnx", SMALL, seed=2), "v2", "--canary", "go2-02", "--soak", "4s")
    rollout = out["rollout"]
    fleet.wait_active(cfgs["go2-02"], "v2")
    soaking = wait_for(lambda: (r := rollouts(fleet)[rollout])["soak_until"] and r, 15, "the soak to start")
    assert soaking["state"] == "canary" and soaking["reason"].startswith("every canary runs v2: soaking 4 s")

    assert fleet.collector is not None
    stop(fleet.collector)  # mid-soak; the deadline is in the database
    time.sleep(max(0.0, soaking["soak_until"] - time.time()) + 1)
    assert rollouts(fleet)[rollout]["state"] == "canary"  # nobody drives it while the collector is down
    for device in ("go2-01", "go2-03"):
        assert fleet.status(cfgs[device])["active"]["version"] == "v1"
    fleet.start_collector()
    promoted = wait_state(fleet, rollout, "promoted")
    assert promoted["updated_at"] >= soaking["soak_until"]
    assert "without a rejection or rollback" in promoted["reason"]
    for cfg in cfgs.values():
        fleet.wait_active(cfg, "v2")
    assert_never_received_before_promotion(fleet, "go2-01", promoted["updated_at"])


def test_a_newer_publish_to_the_channel_supersedes_a_soaking_rollout(fleet: Fleet, tmp_path: Path) -> None:
    """v3 to the whole channel while v2 soaks on its canary: the v2 rollout ends superseded (in the
    database: a restarted collector leaves it so), is not promoted after its soak, and every device
    ends on v3."""
    cfgs = three_on_v1(fleet, tmp_path)
    out = fleet.publish(mlp(tmp_path / "v2.onnx", SMALL, seed=2), "v2", "--canary", "go2-01", "--soak", "8s")
    rollout = out["rollout"]
    fleet.wait_active(cfgs["go2-01"], "v2")
    soaking = wait_for(lambda: (r := rollouts(fleet)[rollout])["soak_until"] and r, 15, "the soak to start")
    assert soaking["state"] == "canary"

    v3 = fleet.publish(mlp(tmp_path / "v3.onnx", SMALL, seed=3), "v3")  # no --canary: the whole channel
    superseded = wait_state(fleet, rollout, "superseded", timeout=10)
    assert superseded["reason"] == f"superseded by v3 (announcement {v3['sequence']} to the whole channel)"
    assert superseded["updated_at"] < soaking["soak_until"]  # it ended while soaking
    text = fleet.fleet("rollouts").stdout
    assert "superseded" in text and f"superseded by v3 (announcement {v3['sequence']}" in text

    assert fleet.collector is not None
    stop(fleet.collector)
    fleet.start_collector()
    time.sleep(max(0.0, soaking["soak_until"] - time.time()) + 3)  # past the soak: the collector ticks every second
    after = rollouts(fleet)[rollout]
    assert {**after, "observed": None} == {**superseded, "observed": None}  # the row untouched since
    for cfg in cfgs.values():
        fleet.wait_active(cfg, "v3")
    for device in ("go2-02", "go2-03"):
        assert model_events(fleet, device, "v2") == []  # v2 never reached them
    cfg = load(fleet.fleet_cfg)
    assert current_version(cfg, fleet.channel) == "v3"
    last = latest_announcement(cfg, fleet.channel) or {}
    assert last["sequence"] == v3["sequence"] and "targets" not in last  # nothing announced after v3


def test_a_new_rollout_supersedes_the_older_one_on_its_channel(fleet: Fleet, tmp_path: Path) -> None:
    """v3 staged on go2-02 while v2 soaks on go2-01: without the supersede, v2's soak would end
    with v2 announced to the whole channel, over v3's canary. `fleet promote` of v2 says why not."""
    cfgs = three_on_v1(fleet, tmp_path)
    v2 = fleet.publish(mlp(tmp_path / "v2.onnx", SMALL, seed=2), "v2", "--canary", "go2-01", "--soak", "6s")
    fleet.wait_active(cfgs["go2-01"], "v2")
    soaking = wait_for(lambda: (r := rollouts(fleet)[v2["rollout"]])["soak_until"] and r, 15, "the soak to start")
    v3 = fleet.publish(mlp(tmp_path / "v3.onnx", SMALL, seed=3), "v3", "--canary", "go2-02", "--soak", "1h")
    superseded = wait_state(fleet, v2["rollout"], "superseded", timeout=5)
    assert superseded["reason"] == f"superseded by v3 (announcement {v3['sequence']} to go2-02)"
    fleet.wait_active(cfgs["go2-02"], "v3")

    time.sleep(max(0.0, soaking["soak_until"] - time.time()) + 3)
    now = rollouts(fleet)
    assert now[v2["rollout"]]["state"] == "superseded" and now[v3["rollout"]]["state"] == "canary"
    assert model_events(fleet, "go2-03", "v2") == [] and fleet.status(cfgs["go2-03"])["active"]["version"] == "v1"
    assert fleet.status(cfgs["go2-02"])["active"]["version"] == "v3"
    late = fleet.fleet("promote", v2["rollout"], check=False)
    assert late.returncode != 0 and f"is superseded, not canary ({superseded['reason']})" in late.stderr
    fleet.fleet("promote", v3["rollout"])
    for cfg in cfgs.values():
        fleet.wait_active(cfg, "v3")


def assert_never_received_before_promotion(fleet: Fleet, device: str, promoted_at: float) -> None:
    first = min(e["received"] for e in model_events(fleet, device, "v2"))
    assert first >= promoted_at - 1, (first, promoted_at)


def test_halt_and_promote_by_hand_and_a_device_group(fleet: Fleet, tmp_path: Path) -> None:
    cfgs = three_on_v1(fleet, tmp_path)
    fleet.fleet_cfg.write_text(fleet.fleet_cfg.read_text() + '[device_groups]\nlab-a = ["go2-01", "go2-02"]\n')
    out = fleet.publish(mlp(tmp_path / "v2.onnx", SMALL, seed=2), "v2", "--canary", "go2-01", "--soak", "1h")
    fleet.wait_active(cfgs["go2-01"], "v2")
    halted = fleet.fleet("halt", out["rollout"]).stdout
    assert "halted by hand (fleet halt); canaries told to roll back to v1" in halted
    fleet.wait_active(cfgs["go2-01"], "v1")
    assert rollouts(fleet)[out["rollout"]]["state"] == "halted"
    again = fleet.fleet("promote", out["rollout"], check=False)
    assert again.returncode != 0 and "is halted, not canary" in again.stderr

    api = FleetAPI.from_config(fleet.fleet_cfg)
    ann = api.publish(mlp(tmp_path / "v3.onnx", SMALL, seed=3), channel=fleet.channel, version="v3", target="lab-a")
    assert ann.targets == ("go2-01", "go2-02") and api.rollout == f"{fleet.channel}-v3"
    for device in ("go2-01", "go2-02"):
        fleet.wait_active(cfgs[device], "v3")
    assert rollouts(fleet)[api.rollout]["soak_s"] == 600  # the default soak: no promotion yet
    assert fleet.status(cfgs["go2-03"])["active"]["version"] == "v1"
    assert "promoted by hand (fleet promote)" in fleet.fleet("promote", api.rollout).stdout
    fleet.wait_active(cfgs["go2-03"], "v3")
    missing = fleet.fleet("halt", "walk-v9", check=False)
    assert missing.returncode != 0 and "no rollout 'walk-v9'" in missing.stderr
    v4 = str(mlp(tmp_path / "v4.onnx", SMALL, seed=4))
    unknown = fleet.fleet("publish", v4, "--channel", fleet.channel, "--target", "x", check=False)
    assert unknown.returncode != 0 and "no device group 'x'" in unknown.stderr and "lab-a" in unknown.stderr
