"""A federated result as an SVG chart: bars with 95% interval whiskers, one panel per region.

The chart is hand-written SVG on purpose, not a plotting library's output: every element has a
semantic class (`panel`, `bar`, `whisker`, `suppressed`) and data attributes that the web UI
and its browser tests select by, every bar carries a `<title>` with its estimate and interval
that screen readers and hover tooltips show, and the whole chart is a string built in
under a millisecond (a 20-row result: about 0.3 ms) that sits inline in a notebook's HTML or a
dashboard page with nothing to fetch.
Every text from a result (region, group, measure) is escaped.

Axes are linear and include 0 and every estimate and interval end, so a bar's length is its
estimate and a negative estimate (possible after noise on a sum) is drawn left of the zero
line. Regions share one axis; the pooled panel ("All regions", last and highlighted) has its own
when its figures are totals (counts and sums add up over the regions) and the regions' axis
otherwise. A suppressed or withheld cell has no bar and no whisker, only a visible mark.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

from queries.combine import COUNT_LIKE, POOLED
from queries.errors import QueryError
from queries.present.cells import group_columns, group_label, number
from queries.spec import Statistic

if TYPE_CHECKING:
    from queries.results import FederatedResult

# Figures that are totals over the regions: the pooled panel gets its own axis.
_TOTALS = frozenset({*COUNT_LIKE, Statistic.SUM})

# Geometry, in pixels.
_MIN_PANEL = 220  # narrowest panel; fewer columns on a narrow chart
_TITLE_H = 24
_HEADER_H = 22
_ROW_H = 22
_BAR_H = 12
_AXIS_H = 26
_GAP = 12
_CHAR_W = 6.4  # average width of an 11px sans-serif character
_CAP_H = 4  # half height of a whisker's cap

# Colours: each text and mark has at least 4.5:1 contrast on white and on the pooled panel.
_BAR = "#3b5b92"
_BAR_POOLED = "#a64200"
_WHISKER = "#1a1a1a"
_MUTED = "#555555"
_POOLED_BG = "#fff3e6"
_GRID = "#d9d9d9"
_FONT = "font-family: system-ui, -apple-system, 'Segoe UI', sans-serif"


@dataclass(frozen=True)
class _Bar:
    group: str
    estimate: float | None
    low: float | None
    high: float | None
    partial: bool


@dataclass(frozen=True)
class _Axis:
    """A linear axis from lo to hi drawn between pixels x0 and x1, with its ticks."""

    lo: float
    hi: float
    ticks: tuple[float, ...]

    @classmethod
    def covering(cls, values: Sequence[float]) -> _Axis:
        """An axis that includes 0 and every value, with 3 to 6 round ticks."""
        lo, hi = min([0.0, *values]), max([0.0, *values])
        if hi - lo <= 0.0:
            hi = lo + 1.0
        step = round_step((hi - lo) / 4)
        first, last = math.floor(lo / step), math.ceil(hi / step)
        ticks = tuple(k * step for k in range(first, last + 1))
        return cls(lo=first * step, hi=last * step, ticks=ticks)

    def at(self, x: float, x0: float, x1: float) -> float:
        """The pixel of value x."""
        return x0 + (x - self.lo) / (self.hi - self.lo) * (x1 - x0)


def round_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least raw."""
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * power >= raw:
            return m * power
    return 10.0 * power


def _px(x: float) -> str:
    return f"{x:.1f}"


def _attr(text: object) -> str:
    return escape(str(text), quote=True)


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def _float(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return None if math.isnan(f) else f


def _panels(
    rows: list[dict[str, Any]], measure: str, groups: list[str]
) -> tuple[list[str], dict[str, list[_Bar]]]:
    """The regions in order (pooled last) and each one's bars for the measure."""
    regions: list[str] = []
    bars: dict[str, list[_Bar]] = {}
    for r in rows:
        if r["measure"] != measure:
            continue
        region = str(r["region"])
        if region not in bars:
            regions.append(region)
            bars[region] = []
        suppressed = bool(r.get("suppressed")) or _float(r["estimate"]) is None
        bars[region].append(
            _Bar(
                group=group_label(r, groups),
                estimate=None if suppressed else _float(r["estimate"]),
                low=None if suppressed else _float(r.get("ci_low")),
                high=None if suppressed else _float(r.get("ci_high")),
                partial=bool(r.get("partial")),
            )
        )
    ordered = [r for r in regions if r != POOLED] + [r for r in regions if r == POOLED]
    return ordered, bars


def _extent(bars: Sequence[_Bar]) -> list[float]:
    return [x for b in bars for x in (b.estimate, b.low, b.high) if x is not None]


def result_chart_svg(
    result: FederatedResult, *, measure: str | None = None, width: int = 720
) -> str:
    """One measure of a result as an inline SVG: per-region panels of bars with whiskers.

    measure: the measure to draw (default the first in result.table). One `rect.bar` per
    published estimate, one `line.whisker` per bar with both interval ends, and a
    `text.suppressed` mark for a suppressed or withheld cell; the pooled panel is last and
    has classes `panel pooled`.
    """
    rows = result.table.to_pylist()
    measures = list(dict.fromkeys(str(r["measure"]) for r in rows))
    if measure is None:
        measure = measures[0] if measures else ""
    elif measure not in measures:
        raise QueryError(
            f"measure {measure!r} is not in this result: give one of "
            + (", ".join(repr(m) for m in measures) or "(none: the result has no rows)")
        )
    statistic = next((str(r["statistic"]) for r in rows if r["measure"] == measure), "")
    regions, bars = _panels(rows, measure, group_columns(result.table))
    chart_id = f"chc-chart-{uuid.uuid4().hex[:10]}"
    title = f"{measure}: estimates with 95% intervals, by region" if measure else "No figures"
    shown = sum(b.estimate is not None for bs in bars.values() for b in bs)
    hidden = sum(b.estimate is None for bs in bars.values() for b in bs)
    desc = (
        f"{len(regions)} panels ({', '.join(regions)}); {shown} bars with their 95% intervals"
        f"{f'; {hidden} cells suppressed' if hidden else ''}"
        f"{'; partial result: some nodes did not answer' if result.partial else ''}."
        if regions
        else "The result has no rows to chart."
    )
    width = max(width, 240)
    columns = max(1, min(len(regions), width // _MIN_PANEL))
    panel_w = width / columns
    most = max((len(bs) for bs in bars.values()), default=0)
    panel_h = _HEADER_H + most * _ROW_H + _AXIS_H
    lines = math.ceil(len(regions) / columns) if regions else 0
    height = _TITLE_H + lines * (panel_h + _GAP) + 4
    labels = [b.group for bs in bars.values() for b in bs]
    label_w = min(panel_w * 0.4, max(40.0, max((len(s) for s in labels), default=3) * _CHAR_W + 8))
    regional = [x for r in regions if r != POOLED for x in _extent(bars[r])]
    pooled = _extent(bars.get(POOLED, []))
    own_axis = statistic in _TOTALS and bool(regional)
    shared = _Axis.covering(regional if own_axis else regional + pooled)
    pooled_axis = _Axis.covering(pooled) if own_axis and pooled else shared
    out = [
        f'<svg class="chc-chart" role="img" aria-labelledby="{chart_id}-title {chart_id}-desc" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-measure="{_attr(measure)}" '
        f'style="{_FONT}; font-size: 11px; max-width: 100%; height: auto">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(desc)}</desc>',
        f'<text class="chart-title" x="4" y="16" font-size="13" font-weight="600" '
        f'fill="#1a1a1a">{escape(title)}</text>',
    ]
    for i, region in enumerate(regions):
        x = (i % columns) * panel_w
        y = _TITLE_H + (i // columns) * (panel_h + _GAP)
        axis = pooled_axis if region == POOLED else shared
        out += _panel(region, bars[region], axis, x, y, panel_w, panel_h, label_w)
    out.append("</svg>")
    return "\n".join(out)


def _panel(
    region: str,
    bars: Sequence[_Bar],
    axis: _Axis,
    x: float,
    y: float,
    w: float,
    h: float,
    label_w: float,
) -> list[str]:
    """One region's panel: its name, a row per group, the zero line and the ticks."""
    pooled = region == POOLED
    x0, x1 = x + label_w + 6, x + w - 16
    top, bottom = y + _HEADER_H, y + h - _AXIS_H
    heading = region
    if pooled and any(b.partial for b in bars):
        heading += " (partial)"
    out = [
        f'<g class="panel{" pooled" if pooled else ""}" data-region="{_attr(region)}">',
    ]
    if pooled:
        out.append(
            f'<rect class="panel-bg" x="{_px(x + 1)}" y="{_px(y)}" width="{_px(w - 4)}" '
            f'height="{_px(h)}" rx="4" fill="{_POOLED_BG}" stroke="{_BAR_POOLED}"/>'
        )
    out.append(
        f'<text class="panel-title" x="{_px(x + 6)}" y="{_px(y + 15)}" font-size="12" '
        f'font-weight="{700 if pooled else 600}" fill="#1a1a1a">{escape(heading)}</text>'
    )
    for t in axis.ticks:
        tx = _px(axis.at(t, x0, x1))
        zero = t == 0.0
        out.append(
            f'<line class="{"zero" if zero else "tick"}" x1="{tx}" x2="{tx}" y1="{_px(top)}" '
            f'y2="{_px(bottom)}" stroke="{_MUTED if zero else _GRID}" '
            f'stroke-width="{1.2 if zero else 1}"/>'
        )
        out.append(
            f'<text class="tick-label" x="{tx}" y="{_px(bottom + 14)}" text-anchor="middle" '
            f'font-size="10" fill="{_MUTED}">{escape(number(t))}</text>'
        )
    chars = max(3, int((label_w - 4) / _CHAR_W))
    zero_x = axis.at(0.0, x0, x1)
    for j, b in enumerate(bars):
        cy = top + j * _ROW_H + _ROW_H / 2
        group = _attr(b.group)
        out.append(
            f'<text class="group-label" x="{_px(x0 - 6)}" y="{_px(cy + 4)}" text-anchor="end" '
            f'fill="#1a1a1a">{escape(_shorten(b.group, chars))}</text>'
        )
        where = f"{region}, {b.group}"
        if b.estimate is None:
            out.append(
                f'<text class="suppressed" data-group="{group}" x="{_px(zero_x + 4)}" '
                f'y="{_px(cy + 4)}" font-style="italic" fill="{_MUTED}">'
                f"<title>{escape(where)}: suppressed</title>suppressed</text>"
            )
            continue
        ex = axis.at(b.estimate, x0, x1)
        has_ci = b.low is not None and b.high is not None
        ci = f"95% CI {number(b.low)} to {number(b.high)}" if has_ci else "no interval"
        tip = f"{where}: {number(b.estimate)} ({ci})"
        out.append(
            f'<rect class="bar{" pooled" if pooled else ""}" data-group="{group}" '
            f'data-estimate="{b.estimate!r}" x="{_px(min(ex, zero_x))}" '
            f'y="{_px(cy - _BAR_H / 2)}" width="{_px(abs(ex - zero_x))}" height="{_BAR_H}" '
            f'fill="{_BAR_POOLED if pooled else _BAR}"><title>{escape(tip)}</title></rect>'
        )
        if b.low is not None and b.high is not None:
            lo, hi = axis.at(b.low, x0, x1), axis.at(b.high, x0, x1)
            out.append(
                f'<line class="whisker" data-group="{group}" x1="{_px(lo)}" x2="{_px(hi)}" '
                f'y1="{_px(cy)}" y2="{_px(cy)}" stroke="{_WHISKER}" stroke-width="1.5"/>'
            )
            for end in (lo, hi):
                out.append(
                    f'<line class="whisker-cap" x1="{_px(end)}" x2="{_px(end)}" '
                    f'y1="{_px(cy - _CAP_H)}" y2="{_px(cy + _CAP_H)}" stroke="{_WHISKER}" '
                    'stroke-width="1.5"/>'
                )
    out.append("</g>")
    return out
