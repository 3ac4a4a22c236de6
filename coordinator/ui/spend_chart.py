"""Spend over time as an inline SVG: one step line per analyst (or view), hand-written.

The same style as queries/present/chart.py: semantic classes the page's CSS and the browser
tests read (`g.series[data-series]`, `circle.point`), a <title> on every point so a hover or
a screen reader gives the figure, and a <title>/<desc> for the whole chart.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from xml.sax.saxutils import escape, quoteattr

from coordinator.ui.audit import Spend

# Okabe & Ito: distinguishable with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 36, 64


def _key(s: Spend, by: str) -> str:
    return s.analyst if by == "analyst" else s.view


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def spend_svg(spend: Sequence[Spend], by: str, *, width: int = 720, height: int = 280) -> str:
    """Cumulative rho released over time per `by` ("analyst" or "view"), summed over nodes.

    Each point is one released charge at one node; its <title> names the node, the entry and
    the running total.
    """
    chart_id = f"chc-spend-{uuid.uuid4().hex[:10]}"
    title = f"Privacy budget released over time by {by} (zCDP rho, summed over nodes)"
    series = sorted({_key(s, by) for s in spend})
    if not spend:
        desc = "No released charges in the ledgers yet."
    else:
        desc = (
            f"{len(series)} line(s) ({', '.join(series)}) from {_when(spend[0].time)} to "
            f"{_when(spend[-1].time)}; {len(spend)} released charges."
        )
    out = [
        f'<svg class="chc-spend" data-by={quoteattr(by)} role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(desc)}</desc>',
        f'<text class="chart-title" x="4" y="18" font-size="13" font-weight="600" '
        f'fill="#1a1a1a">{escape(title)}</text>',
    ]
    if not spend:
        out.append(
            f'<text class="empty" x="{_LEFT}" y="{_TOP + 30}" fill="#333">{escape(desc)}</text>'
        )
        out.append("</svg>")
        return "\n".join(out)
    totals: dict[str, float] = {}
    points: dict[str, list[tuple[Spend, float]]] = {k: [] for k in series}
    for s in spend:
        k = _key(s, by)
        totals[k] = totals.get(k, 0.0) + s.rho
        points[k].append((s, totals[k]))
    top = max(totals.values()) or 1.0
    t0, t1 = spend[0].time.timestamp(), spend[-1].time.timestamp()
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def x_of(t: datetime) -> float:
        return _LEFT + (plot_w / 2 if t1 == t0 else (t.timestamp() - t0) / (t1 - t0) * plot_w)

    def y_of(v: float) -> float:
        return _TOP + plot_h - v / top * plot_h

    base = _TOP + plot_h
    out.append(
        f'<g class="axis"><line x1="{_LEFT}" y1="{base}" x2="{_LEFT + plot_w}" y2="{base}" '
        f'stroke="#555"/><line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}" stroke="#555"/>'
    )
    for frac in (0.0, 0.5, 1.0):
        y = y_of(top * frac)
        out.append(
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
            f'font-size="11" fill="#333">{top * frac:.3g}</text>'
        )
    for t, anchor in ((spend[0].time, "start"), (spend[-1].time, "end")):
        out.append(
            f'<text class="tick" x="{x_of(t):.1f}" y="{base + 16}" text-anchor="{anchor}" '
            f'font-size="11" fill="#333">{escape(_when(t))} UTC</text>'
        )
    out.append("</g>")
    for i, k in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        steps: list[str] = []
        previous = 0.0
        for s, total in points[k]:
            x = x_of(s.time)
            steps.append(f"{'M' if not steps else 'L'}{x:.1f},{y_of(previous):.1f}")
            steps.append(f"L{x:.1f},{y_of(total):.1f}")
            previous = total
        steps.append(f"L{_LEFT + plot_w:.1f},{y_of(previous):.1f}")
        out.append(f'<g class="series" data-series={quoteattr(k)}>')
        out.append(
            f'<path class="line" d="{" ".join(steps)}" fill="none" stroke="{colour}" '
            'stroke-width="2"/>'
        )
        for s, total in points[k]:
            label = (
                f"{k}, {_when(s.time)} UTC at {s.node} (entry {s.entry}): rho {s.rho:.4g}, "
                f"{total:.4g} in all"
            )
            out.append(
                f'<circle class="point" cx="{x_of(s.time):.1f}" cy="{y_of(total):.1f}" r="3" '
                f'fill="{colour}"><title>{escape(label)}</title></circle>'
            )
        out.append("</g>")
        lx = _LEFT + (i % 4) * (plot_w / 4)
        ly = height - 22 + (i // 4) * 14
        out.append(
            f'<g class="legend"><rect x="{lx:.1f}" y="{ly - 9}" width="10" height="10" '
            f'fill="{colour}"/><text x="{lx + 14:.1f}" y="{ly}" font-size="11" fill="#1a1a1a">'
            f"{escape(k[:40])}: {totals[k]:.4g}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out)
