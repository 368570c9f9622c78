"""Charts as inline SVG, drawn on the server: no script, nothing fetched by the browser."""

from __future__ import annotations

import time
from collections.abc import Sequence

from markupsafe import Markup, escape

from cloud.latency import Percentiles

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _path(points: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(points))


def sparkline(points: Sequence[tuple[float, int]], width: int = 120, height: int = 24) -> Markup:
    """A line of values over time, scaled to its own range; empty when there is nothing to draw."""
    if not points:
        return Markup("")
    t0, t1 = points[0][0], points[-1][0]
    top = max(v for _, v in points) or 1
    span = (t1 - t0) or 1.0
    xy = [((t - t0) / span * (width - 2) + 1, height - 1 - v / top * (height - 2)) for t, v in points]
    if len(xy) == 1:
        xy.append((width - 1, xy[0][1]))
    return Markup(
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"<title>p99 per minute, last hour (max {top} µs)</title>"
        f'<path d="{_path(xy)}" fill="none" stroke="#1f77b4" stroke-width="1.5"/></svg>'
    )


def latency_chart(series: dict[str, list[tuple[float, Percentiles]]], width: int = 900, height: int = 300) -> Markup:
    """p50 (solid) and p99 (dashed) over time per version, with the axes' extremes labelled."""
    points = [(t, p) for pts in series.values() for t, p in pts]
    if not points:
        return Markup('<p class="none">no latency history in this window</p>')
    left, right, top_pad, bottom = 60, 10, 10, 40
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    top = max(p.p99_us for _, p in points) or 1
    span = (t1 - t0) or 1.0

    def xy(t: float, v: int) -> tuple[float, float]:
        x = left + (t - t0) / span * (width - left - right)
        return x, height - bottom - v / top * (height - top_pad - bottom)

    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top_pad + 10}" text-anchor="end">{top} µs</text>',
        f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>',
        f'<text x="{left}" y="{height - bottom + 16}">{_clock(t0)}</text>',
        f'<text x="{width - right}" y="{height - bottom + 16}" text-anchor="end">{_clock(t1)} UTC</text>',
    ]
    for i, (version, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        for field, dash in (("p50_us", ""), ("p99_us", ' stroke-dasharray="5,3"')):
            line = [xy(t, getattr(p, field)) for t, p in pts]
            if len(line) == 1:
                line.append((line[0][0] + 2, line[0][1]))
            parts.append(
                f'<path class="series" data-version="{escape(version)}" data-field="{field}" d="{_path(line)}" '
                f'fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
            )
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in line[: len(pts)])
        parts.append(
            f'<text x="{left + 8 + 150 * i}" y="{height - 6}" fill="{colour}">{escape(version)} p50 — / p99 - -</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _clock(t: float) -> str:
    return time.strftime("%m-%d %H:%M", time.gmtime(t))
