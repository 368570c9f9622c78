"""sha256 of a file, read in 1 MiB blocks (hashlib releases the GIL for each block)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def sha256_file(path: Path, limit: int | None = None) -> hashlib._Hash:
    h = hashlib.sha256()
    remaining = limit if limit is not None else -1
    with path.open("rb") as f:
        while remaining != 0:
            block = f.read(BLOCK if remaining < 0 else min(BLOCK, remaining))
            if not block:
                break
            h.update(block)
            remaining -= len(block) if remaining > 0 else 0
    return h
