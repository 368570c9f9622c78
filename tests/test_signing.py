"""Signed announcements end to end: `fleet keygen`, `fleet publish --sign-key`, an agent that
trusts two keys (rotation), and what it does with unsigned, forged, untrusted and replayed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.contract.protocol import Topics, encode
from agent.contract.signing import Trust, canonical, sign
from agent.errors import SignatureRejected
from cloud.config import load as load_fleet
from cloud.publish import send_retained
from tests.conftest import Fleet, mlp, wait_for


def _keygen(fleet: Fleet, name: str) -> tuple[Path, str]:
    key = fleet.root / name
    fleet.fleet("keygen", str(key))
    return key, (fleet.root / f"{name}.pub").read_text().strip()


def _send_raw(fleet: Fleet, announcement: dict) -> None:
    cfg = load_fleet(fleet.fleet_cfg)
    send_retained(cfg, Topics(fleet.prefix).announce(fleet.channel), encode(announcement))


@pytest.mark.integration
def test_signed_announcements(fleet: Fleet) -> None:
    k1, pub1 = _keygen(fleet, "k1")
    k2, pub2 = _keygen(fleet, "k2")
    k3, _ = _keygen(fleet, "k3")  # not trusted
    cfg = fleet.agent_config(extra=f'[security]\ntrusted_keys = ["{pub1}", "{pub2}"]\n')
    fleet.start_collector()
    fleet.start_agent(cfg)
    models = [mlp(fleet.root / f"m{i}.onnx", seed=i) for i in range(4)]

    fleet.publish(models[0], "v-unsigned")
    assert "unsigned announcement" in fleet.wait_rejected(cfg, "v-unsigned")

    signed = fleet.publish(models[1], "v-k1", "--sign-key", str(k1))
    assert signed["signature"]["alg"] == "ed25519"
    fleet.wait_active(cfg, "v-k1")

    forged = {"protocol": 1, "type": "announcement", **signed}
    forged["sequence"] += 1000
    forged["manifest"] = {**forged["manifest"], "version": "v-forged"}
    _send_raw(fleet, forged)
    assert "does not verify" in fleet.wait_rejected(cfg, "v-forged")

    fleet.publish(models[2], "v-k3", "--sign-key", str(k3))
    assert "is not trusted here" in fleet.wait_rejected(cfg, "v-k3")

    fleet.publish(models[3], "v-k2", "--sign-key", str(k2))  # the rotated key
    fleet.wait_active(cfg, "v-k2")

    # A replay of the older, validly signed announcement: the signature covers the sequence, so
    # it cannot be renumbered, and its own sequence is older than the last one handled.
    _send_raw(fleet, {"protocol": 1, "type": "announcement", **signed})
    assert "stale announcement" in fleet.wait_rejected(cfg, "v-k1")
    assert fleet.status(cfg)["active"]["version"] == "v-k2"

    def rejected_events() -> list[str] | None:
        reasons = [e.get("reason", "") for e in fleet.events() if e.get("state") == "rejected"]
        return reasons if len(reasons) >= 4 else None

    reasons = wait_for(rejected_events, 20, "rejection events at the collector")
    assert any(r.startswith("signature: unsigned") for r in reasons)
    assert any("does not verify" in r for r in reasons)


def test_signature_covers_channel_sequence_and_manifest(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.contract.signing import public_b64

    key = Ed25519PrivateKey.generate()
    trust = Trust([public_b64(key.public_key())])
    ann = {
        "protocol": 1,
        "type": "announcement",
        "channel": "walk",
        "sequence": 5,
        "issued_at": 1.5,
        "manifest": {"version": "v1", "sha256": "0" * 64, "size": 3, "inputs": [], "created_at": 2.0},
    }
    ann["signature"] = sign(ann, key)
    trust.check(ann)
    # key order and whitespace do not matter (RFC 8785)...
    trust.check(json.loads(json.dumps(dict(reversed(list(ann.items()))), indent=3)))
    # ...but every field does
    for field, value in (("channel", "run"), ("sequence", 6), ("issued_at", 1.25)):
        with pytest.raises(SignatureRejected, match="does not verify"):
            trust.check({**ann, field: value})
    with pytest.raises(SignatureRejected, match="does not verify"):
        trust.check({**ann, "manifest": {**ann["manifest"], "size": 4}})
    assert canonical(ann) == canonical({k: v for k, v in ann.items() if k != "signature"})
