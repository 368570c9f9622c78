"""Engine files with a sidecar: `<key>` and `<key>.json` (the key, the engine's sha256 and size,
who built it, with which backend version). An engine is used only when its sidecar names the key
asked for and its bytes hash to the sidecar's sha256: a corrupt, truncated, foreign or stale
engine file is detected and rebuilt, never loaded blindly. The key itself (engine_key) already
changes with the backend version, device, precision and build options."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.contract.digest import sha256_file
from agent.proc import durable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineMeta:
    key: str
    sha256: str
    size: int
    backend: str
    backend_version: str
    builder: str  # device_id of the agent that built it
    built_at: float
    build_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> EngineMeta:
        return EngineMeta(
            key=str(d["key"]),
            sha256=str(d["sha256"]),
            size=int(d["size"]),
            backend=str(d["backend"]),
            backend_version=str(d["backend_version"]),
            builder=str(d["builder"]),
            built_at=float(d["built_at"]),
            build_s=float(d["build_s"]),
        )


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def describe(engine_path: Path, key: str, *, backend: str, version: str, builder: str, build_s: float) -> EngineMeta:
    return EngineMeta(
        key=key,
        sha256=sha256_file(engine_path).hexdigest(),
        size=engine_path.stat().st_size,
        backend=backend,
        backend_version=version,
        builder=builder,
        built_at=time.time(),
        build_s=round(build_s, 3),
    )


def write_sidecar(engine_path: Path, meta: EngineMeta) -> None:
    durable.write_text(sidecar_path(engine_path), json.dumps(meta.to_json(), indent=1))


def read_sidecar(engine_path: Path) -> EngineMeta | None:
    try:
        return EngineMeta.from_json(json.loads(sidecar_path(engine_path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def problem(engine_path: Path, key: str) -> str | None:
    """Why this engine file must not be used for `key`; None when it is sound."""
    if not engine_path.exists():
        return "no engine file"
    meta = read_sidecar(engine_path)
    if meta is None:
        return "no readable sidecar"
    if meta.key != key:
        return f"sidecar is for key {meta.key}"
    size = engine_path.stat().st_size
    if size != meta.size:
        return f"engine is {size} bytes, sidecar says {meta.size}"
    digest = sha256_file(engine_path).hexdigest()
    if digest != meta.sha256:
        return f"engine hashes to {digest[:12]}…, sidecar says {meta.sha256[:12]}…"
    return None


def stale_or_damaged(engine_path: Path, stored_key: str, current_key: str) -> str | None:
    """For the active model at start-up: its recorded key must still be the one this backend
    computes (a TensorRT/JetPack upgrade changes it), and its file must pass `problem`."""
    if stored_key != current_key:
        return f"engine {stored_key} was built by another backend version or device (this one needs {current_key})"
    found = problem(engine_path, stored_key)
    return None if found is None else f"engine {stored_key} fails its check: {found}"


def discard(engine_path: Path) -> None:
    engine_path.unlink(missing_ok=True)
    sidecar_path(engine_path).unlink(missing_ok=True)
