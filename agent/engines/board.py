"""What, on this machine, an engine is built for: the board (device-tree model and compatible
string), the L4T release and the exact libnvinfer package. `cuDeviceGetName` says "Orin" on every
Orin module and `tensorrt.__version__` lacks the build number, so neither tells an Orin Nano from an
AGX, nor one JetPack patch release from another; engines are specific to the exact GPU and
TensorRT build, so these facts go into every engine key and header.

`EDGE_AGENT_PLATFORM_ROOT` reads them under another root (a test's simulated board); by default, `/`."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT_ENV = "EDGE_AGENT_PLATFORM_ROOT"
NVINFER_PACKAGES = ("libnvinfer10", "libnvinfer8")


@dataclass(frozen=True)
class Board:
    model: str  # /proc/device-tree/model: "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    compatible: str  # /proc/device-tree/compatible: "nvidia,p3768-0000+p3767-0005,nvidia,p3767-0005,nvidia,tegra234"
    l4t: str  # /etc/nv_tegra_release, e.g. "R36.4.0"
    nvinfer: str  # the libnvinfer package's full version, e.g. "10.3.0.30-1+cuda12.5"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def read_board(root: Path | None = None) -> Board:
    """The facts that exist here; '' for each one this machine lacks (a PC has no device tree)."""
    root = root or Path(os.environ.get(ROOT_ENV) or "/")
    return Board(
        model=_text(root / "proc/device-tree/model"),
        compatible=",".join(p for p in _text(root / "proc/device-tree/compatible").split("\0") if p),
        l4t=_l4t(_text(root / "etc/nv_tegra_release")),
        nvinfer=_package_version(root / "var/lib/dpkg/status", NVINFER_PACKAGES),
    )


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace").strip().rstrip("\0")
    except OSError:
        return ""


def _l4t(release: str) -> str:
    """'# R36 (release), REVISION: 4.0, GCID: ...' -> 'R36.4.0'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    return f"R{m.group(1)}.{m.group(2)}" if m else release[:64]


def _package_version(status: Path, names: tuple[str, ...]) -> str:
    """The installed version of the first of `names` in dpkg's status file (no subprocess)."""
    try:
        text = status.read_text(errors="replace")
    except OSError:
        return ""
    found: dict[str, str] = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") in names and "installed" in fields.get("Status", ""):
            found[fields["Package"]] = fields.get("Version", "")
    return next((f"{n}={found[n]}" for n in names if n in found), "")
