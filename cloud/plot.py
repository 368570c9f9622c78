"""`fleet latency --plot`: p50 and p99 over time per version, as PNG or SVG (by the file's suffix).
matplotlib is the `cloud` extra's: imported here only, and its absence is one line."""

from __future__ import annotations

import datetime
from pathlib import Path

from agent.errors import AgentError
from cloud.latency import Percentiles

WIDTH_PX, HEIGHT_PX, DPI = 1200, 600, 100
FORMATS = (".png", ".svg")


def plot_latency(series: dict[str, list[tuple[float, Percentiles]]], out: Path, title: str) -> None:
    if out.suffix.lower() not in FORMATS:
        raise AgentError(f"--plot {out}: the file must end in .png or .svg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        raise AgentError("--plot needs matplotlib: pip install 'edge-agent[cloud]'") from None
    fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    try:
        for i, (version, points) in enumerate(series.items()):
            when = [mdates.date2num(datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)) for t, _ in points]
            colour = f"C{i % 10}"
            ax.plot(when, [p.p50_us for _, p in points], color=colour, marker=".", label=f"{version} p50")
            ax.plot(when, [p.p99_us for _, p in points], color=colour, linestyle="--", label=f"{version} p99")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        ax.set_ylabel("latency (µs)")
        ax.set_xlabel("time (UTC)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="upper left", fontsize="small")
        fig.savefig(out, dpi=DPI)  # no tight bbox: the image is WIDTH_PX x HEIGHT_PX
    finally:
        plt.close(fig)


def bin_seconds(span_s: float, bins: int = 60) -> float:
    """A slice of time that cuts `span_s` into about `bins` points, at least a minute."""
    return max(60.0, span_s / bins)
