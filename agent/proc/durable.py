"""Files that survive a power cut: a file's bytes are synced before its name points at them, and
the name (a rename, a new file) is synced through its directory before anything relies on it.
Without the directory's sync a cut can undo the rename after the database recorded what it
brought (tests/test_power_cut.py found an active model whose engine was gone that way)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

NO_SPACE_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")


def no_space(err: BaseException) -> bool:
    """An error that means a full filesystem: ENOSPC/EDQUOT, SQLite's "disk is full", or a
    library's message that carries the same (ONNX Runtime, TensorRT)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return any(t in text for t in NO_SPACE_TEXT)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace(synced: Path, dest: Path) -> None:
    """Rename a file whose bytes are already synced, and sync the rename."""
    os.replace(synced, dest)
    fsync_dir(dest.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Write through a unique temporary name, sync, rename, sync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def makedirs(folder: Path) -> None:
    """mkdir -p whose new entries are synced (a state dir's first start)."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)
