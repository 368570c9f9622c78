"""edge-agent's cloud side (console script `fleet`): publish models, collect what devices report.

`from cloud import Fleet` is the Python API (cloud/api.py); it is imported on first use, so the
command line does not pay for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud.api import Fleet

__all__ = ["Fleet"]


def __getattr__(name: str) -> Any:
    if name == "Fleet":
        from cloud.api import Fleet

        return Fleet
    raise AttributeError(f"module 'cloud' has no attribute {name!r}")
