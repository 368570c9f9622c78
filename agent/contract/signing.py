"""Signed announcements: Ed25519 over the RFC 8785 canonical JSON of the announcement (channel,
sequence, issued_at and the whole manifest; everything but the `signature` field itself).

    "signature": {"alg": "ed25519", "key_id": "<16 hex>", "value": "<base64 of 64 bytes>"}

Signing the channel and the sequence is what stops replays: an old signed announcement has a
lower sequence than the one the agent last handled, and one from another channel names that
channel. Keys: `fleet keygen` writes a PKCS#8 PEM private key and prints the base64 raw public key
that goes into the agent's `security.trusted_keys`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import AgentError, ConfigError, SignatureRejected

ALG = "ed25519"


def canonical(announcement: dict[str, Any]) -> bytes:
    body = {k: v for k, v in announcement.items() if k != "signature"}
    try:
        return rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as err:
        raise SignatureRejected(f"signature: the announcement has no canonical JSON form: {err}") from err


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_b64(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as err:
        raise ConfigError(f"{where}: not a base64 Ed25519 public key (32 bytes; see `fleet keygen`)") from err


# -- the publisher's side ------------------------------------------------------------------------
def generate(path: Path) -> Ed25519PublicKey:
    """Write a new private key to `path` (mode 0600, refusing to overwrite) and return its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        with open(path, "xb", opener=_open_private) as out:
            out.write(pem)
    except FileExistsError as err:
        raise AgentError(f"{path} exists: not overwriting a key") from err
    return key.public_key()


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise AgentError(f"{path}: cannot read the signing key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise AgentError(f"{path}: not an Ed25519 private key")
    return key


def sign(announcement: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    value = key.sign(canonical(announcement))
    return {"alg": ALG, "key_id": key_id(key.public_key()), "value": base64.b64encode(value).decode()}


# -- the agent's side ----------------------------------------------------------------------------
class Trust:
    """The trusted keys. With none configured, announcements need no signature (the default)."""

    def __init__(self, keys: list[str]) -> None:
        parsed = [parse_public_key(k, f"security.trusted_keys[{i}]") for i, k in enumerate(keys)]
        self.keys = {key_id(k): k for k in parsed}

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def check(self, announcement: dict[str, Any]) -> None:
        """SignatureRejected with the reason, or None when the announcement may be acted on."""
        if not self.keys:
            return
        sig = announcement.get("signature")
        if sig is None:
            raise SignatureRejected("signature: unsigned announcement, and this agent requires one")
        if not isinstance(sig, dict) or sig.get("alg") != ALG:
            raise SignatureRejected(f"signature: must be an object with alg {ALG!r}")
        key = self.keys.get(str(sig.get("key_id")))
        if key is None:
            raise SignatureRejected(f"signature: key {str(sig.get('key_id'))[:32]!r} is not trusted here")
        try:
            value = base64.b64decode(str(sig.get("value")), validate=True)
            key.verify(value, canonical(announcement))
        except (binascii.Error, ValueError, InvalidSignature) as err:
            raise SignatureRejected(f"signature: does not verify with key {sig['key_id']} (forged or altered)") from err
