"""Handing freed heap back to the kernel.

glibc keeps what Python frees in its arenas (one per thread that allocated) for reuse; a daemon
whose every swap churns buffers on pool threads sees its RSS creep though nothing leaks. The
soak (scripts/soak.py) measures the difference; see docs/benchmarks.md."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_free_memory() -> bool:
    """malloc_trim(0) where glibc has it: True when memory went back to the kernel."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
