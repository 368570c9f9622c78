"""Staged rollouts without services: the decision function, what the canaries' events say, the
canary draw, device targeting in the announcement (signed like the rest), the rollouts table
across a reopen, and device groups in the fleet config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent.contract.protocol import Announcement, decode, encode
from agent.contract.signing import Trust, generate, load_private, public_b64, sign
from agent.errors import ConfigError, ProtocolError, PublishError, SignatureRejected
from cloud.config import load
from cloud.fleetdb import FleetDB
from cloud.rollout_driver import choose_canaries
from cloud.rolloutdb import CANARY, HALTING, PROMOTED, PROMOTING, Rollout, RolloutDB
from cloud.rollouts import STALE_S, Action, Observed, decide, observe, pick_canaries, supersedable
from tests.test_protocol import manifest

SHA = "ab" * 32
T0 = 1_000_000.0


def rollout(**kw: Any) -> Rollout:
    base: dict[str, Any] = {
        "id": "walk-v2",
        "channel": "walk",
        "version": "v2",
        "sha256": SHA,
        "previous_version": "v1",
        "canaries": ("a", "b"),
        "soak_s": 10.0,
        "sign_key": None,
        "state": CANARY,
        "reason": "announced to a, b",
        "created_at": T0,
        "soak_until": None,
        "updated_at": T0,
    }
    base.update(kw)
    return Rollout(**base)


ACTIVE, IDLE = Observed(active=True), Observed()


def test_waits_for_every_canary_then_soaks_then_promotes() -> None:
    r = rollout()
    waiting = decide(r, {"a": ACTIVE, "b": IDLE}, T0 + 5)
    assert waiting.kind == "wait" and "waiting for b" in waiting.reason
    assert decide(r, {"a": ACTIVE}, T0 + 5).kind == "wait"  # nothing heard from b yet
    soak = decide(r, {"a": ACTIVE, "b": ACTIVE}, T0 + 7)
    assert soak.kind == "soak" and soak.until == T0 + 17
    soaking = dataclasses.replace(r, soak_until=T0 + 17)
    still = decide(soaking, {"a": ACTIVE, "b": ACTIVE}, T0 + 16.9)
    assert still.kind == "wait" and still.reason == "soaking until 1970-01-12 13:46:57 UTC"
    promote = decide(soaking, {"a": ACTIVE, "b": ACTIVE}, T0 + 17)
    assert promote.kind == "promote" and "v2" in promote.reason


@pytest.mark.parametrize("soak_until", [None, T0 + 17])
def test_a_failed_canary_halts_at_once_even_while_soaking(soak_until: float | None) -> None:
    r = rollout(soak_until=soak_until)
    failed = Observed(failed="rejected: gate: outputs contain NaN")
    action = decide(r, {"a": ACTIVE, "b": failed}, T0 + 100)
    assert action.kind == "halt" and action.reason == "canary b rejected: gate: outputs contain NaN"


def test_finished_and_interrupted_rollouts() -> None:
    seen = {"a": ACTIVE, "b": ACTIVE}
    assert decide(rollout(state=PROMOTED), seen, T0 + 1e6).kind == "none"
    assert decide(rollout(state=PROMOTING), seen, T0 + STALE_S - 1).kind == "none"  # another process at it
    assert decide(rollout(state=HALTING), seen, T0 + STALE_S + 1).kind == "redo"  # that process died


def ann(version: str, sha: str, sequence: int, targets: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"sequence": sequence, "manifest": {"version": version, "sha256": sha}}
    return out if targets is None else {**out, "targets": targets}


def test_a_newer_announcement_on_the_channel_supersedes_the_rollout() -> None:
    """Any announcement that is not one of the rollout's own: a publish or rollback to the whole
    channel, another rollout's canaries. It wins over a promotion or a halt that is due."""
    seen, failed = {"a": ACTIVE, "b": ACTIVE}, {"a": ACTIVE, "b": Observed(failed="rejected: NaN")}
    soaked = rollout(soak_until=T0 + 17)
    ours = ann("v2", SHA, 5, ["b", "a"])  # the canaries', in any order
    assert decide(soaked, seen, T0 + 20, ours).kind == "promote"
    assert decide(soaked, failed, T0 + 20, ours).kind == "halt"
    v3 = ann("v3", "cd" * 32, 7)
    for canaries in (seen, failed, {}):
        action = decide(soaked, canaries, T0 + 20, v3)
        assert action == Action("supersede", "superseded by v3 (announcement 7 to the whole channel)")
    newer = {
        "v2 to everyone": ann("v2", SHA, 6),  # a plain publish (or rollback) of the same model
        "v1 rolled back to": ann("v1", "ef" * 32, 6),
        "v3 to another canary": ann("v3", "cd" * 32, 6, ["c"]),
        "v2 to other canaries": ann("v2", SHA, 6, ["a"]),
    }
    for what, latest in newer.items():
        assert decide(soaked, seen, T0 + 20, latest).kind == "supersede", what
    assert decide(soaked, seen, T0 + 20, None).kind == "promote"  # no announcement known: S3 emptied

    # An interrupted promotion or halt: its own announcement done or not, it is finished; after
    # anyone else's, superseded. One still in progress elsewhere is left alone.
    stale = T0 + STALE_S + 1
    promoting, halting = rollout(state=PROMOTING), rollout(state=HALTING)
    for latest in (ours, ann("v2", SHA, 6)):
        assert decide(promoting, seen, stale, latest).kind == "redo"
    for latest in (ours, ann("v1", "ef" * 32, 6, ["a", "b"])):
        assert decide(halting, failed, stale, latest).kind == "redo"
    assert decide(promoting, seen, stale, ann("v1", "ef" * 32, 6, ["a", "b"])).kind == "supersede"
    assert decide(halting, failed, stale, ann("v2", SHA, 6)).kind == "supersede"
    assert decide(promoting, seen, T0 + 1, v3).kind == "none" and not supersedable(promoting, T0 + 1)
    assert decide(rollout(state=PROMOTED), seen, T0 + 1e6, v3).kind == "none"


def ev(device: str, state: str, sha: str = SHA, reason: str = "") -> dict[str, Any]:
    return {"device_id": device, "kind": "model_state", "sha256": sha, "state": state, "reason": reason}


def test_observe_reads_events_and_status() -> None:
    r = rollout(canaries=("a", "b", "c"))
    events = [
        ev("a", "downloading"),
        ev("a", "active"),
        ev("b", "active"),
        ev("b", "rolled_back", reason="watch: p99 over budget"),
        ev("b", "active"),  # a failure sticks: a later event does not clear it
        ev("c", "rejected", sha="cd" * 32),  # another model
        ev("x", "rejected"),  # not a canary
    ]
    seen = observe(r, events, {"c": SHA})
    assert seen == {
        "a": ACTIVE,
        "b": Observed(failed="rolled_back: watch: p99 over budget"),
        "c": ACTIVE,  # its status says it runs the model
    }


def test_a_canary_moved_off_the_model_no_longer_runs_it() -> None:
    """`agent activate v1` on a canary retires v2 there: not a failure, but no promotion either."""
    r = rollout(canaries=("a", "b"), soak_until=T0 + 17)
    events = [ev("a", "active"), ev("b", "active"), ev("a", "retired", reason="replaced by v1")]
    seen = observe(r, events, {"a": "cd" * 32, "b": SHA})
    assert seen == {"a": Observed(left="retired: replaced by v1"), "b": ACTIVE}
    action = decide(r, seen, T0 + 100)  # past the soak's deadline
    assert action.kind == "wait"
    assert action.reason == "waiting for a to activate v2 (a left it: retired: replaced by v1)"
    assert observe(r, [*events, ev("a", "active")], {})["a"] == ACTIVE  # back on it
    # The same model recorded again (announced anew): the new record active, the first one retired.
    again = [ev("a", "active"), ev("a", "active"), ev("a", "retired", reason="replaced by v2")]
    assert observe(r, again, {"a": SHA})["a"] == ACTIVE


def test_pick_canaries() -> None:
    devices = [f"go2-{i:02d}" for i in range(10)]
    two = pick_canaries(devices, 0.2, "v2")
    assert len(two) == 2 and set(two) <= set(devices) and two == pick_canaries(reversed(devices), 0.2, "v2")
    assert len(pick_canaries(devices, 0.01, "v2")) == 1 and len(pick_canaries(devices, 1.0, "v2")) == 10
    assert {tuple(pick_canaries(devices, 0.2, f"v{i}")) for i in range(20)} != {tuple(two)}  # drawn per version
    assert pick_canaries([], 0.5, "v2") == []
    with pytest.raises(ValueError, match="fraction"):
        pick_canaries(devices, 1.5, "v2")


def test_targets_in_the_announcement(tmp_path: Path) -> None:
    ann = Announcement("walk", 7, 2.0, manifest(), targets=("go2-01", "go2-02"))
    back = Announcement.from_json(decode(encode(ann.to_json()), "announcement"))
    assert back == ann and back.targets_device("go2-01") and not back.targets_device("go2-03")
    everyone = Announcement("walk", 8, 2.0, manifest())
    assert "targets" not in everyone.to_json() and everyone.targets_device("go2-03")
    for bad in ("go2-01", ["../x"], [1]):
        with pytest.raises(ProtocolError, match="targets"):
            Announcement.from_json({**ann.to_json(), "targets": bad})
    # The signature covers the targets: widening them breaks it.
    public = generate(tmp_path / "k")
    signed = {**ann.to_json(), "signature": sign(ann.to_json(), load_private(tmp_path / "k"))}
    trust = Trust([public_b64(public)])
    trust.check(signed)
    with pytest.raises(SignatureRejected, match="does not verify"):
        trust.check({**signed, "targets": ["go2-01", "go2-02", "go2-03"]})
    with pytest.raises(SignatureRejected, match="does not verify"):
        trust.check({k: v for k, v in signed.items() if k != "targets"})


def test_rollouts_table_survives_a_reopen(tmp_path: Path) -> None:
    db = FleetDB(tmp_path / "fleet.db")
    rdb = RolloutDB(db)
    r = rollout()
    rdb.add(r)
    assert rdb.free_id("walk-v2") == "walk-v2-2"
    rdb.set_soak_until(r.id, T0 + 17, "soaking")
    assert rdb.claim(r, PROMOTING, "soaked", T0 + 20)
    assert not rdb.claim(r, HALTING, "too late", T0 + 21)  # read before the promotion: refused
    db.close()
    rdb = RolloutDB(FleetDB(tmp_path / "fleet.db"))
    (back,) = rdb.all(open_only=True)
    assert back == dataclasses.replace(r, state=PROMOTING, reason="soaked", soak_until=T0 + 17, updated_at=T0 + 20)
    assert rdb.claim(back, PROMOTED, "done", T0 + 22) and rdb.all(open_only=True) == []
    rdb.fleet.close()


def test_device_groups_in_the_fleet_config(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[s3]\nbucket = "b"\n[device_groups]\nlab-a = ["go2-01", "go2-02"]\n')
    assert load(path).device_groups == {"lab-a": ["go2-01", "go2-02"]}
    path.write_text('[s3]\nbucket = "b"\n[device_groups]\nlab-a = ["go2 01"]\n')
    with pytest.raises(ConfigError, match="device_groups.lab-a: device 'go2 01'"):
        load(path)
    path.write_text('[s3]\nbucket = "b"\n[device_groups]\nlab-a = "go2-01"\n')
    with pytest.raises(ConfigError, match="device_groups.lab-a: must be a list"):
        load(path)


def test_choose_canaries(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[s3]\nbucket = "b"\n[device_groups]\nlab-a = ["go2-01", "go2-02"]\nlab-b = ["go2-09"]\n')
    cfg = load(path)
    db = FleetDB(tmp_path / "fleet.db")
    for i in range(10):
        db.put_status(f"go2-{i:02d}", {"online": True, "channel": "walk" if i < 9 else "run"})

    def choose(**kw: Any) -> list[str]:
        return choose_canaries(cfg, db, "walk", "v2", **{"canary": None, "fraction": None, "target": None, **kw})

    assert choose(canary=["go2-05"]) == ["go2-05"]
    assert choose(target=["lab-a", "lab-b"]) == ["go2-01", "go2-02", "go2-09"]
    assert choose(target=["lab-a"], canary=["go2-05"]) == ["go2-01", "go2-02", "go2-05"]
    drawn = choose(fraction=0.2)  # of the 9 devices on walk
    assert len(drawn) == 2 and all(d != "go2-09" for d in drawn)
    assert len(choose(target=["lab-a"], fraction=0.5)) == 1
    with pytest.raises(PublishError, match="no device group 'lab-c'.*known: lab-a, lab-b"):
        choose(target=["lab-c"])
    db.close()
    empty = FleetDB(tmp_path / "empty.db")
    with pytest.raises(PublishError, match="no device known on channel 'walk'"):
        choose_canaries(cfg, empty, "walk", "v2", canary=None, fraction=0.5, target=None)
    empty.close()
