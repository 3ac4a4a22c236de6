"""The Models page's figures as inline SVG: a forest plot of a fit, a funnel plot of a comparison.

Hand-written SVG, as queries/present/chart.py draws query results, rather than
coordinator/learning/plot.py's matplotlib figures: every element has a semantic class and
data attributes (`g.term[data-term]`, `g.unit[data-unit][data-flag]`) that the page's tests
select by, every point has a `<title>` with its figures for screen readers and tooltips, the
figure is drawn from the stored JSON of a fit or comparison (so a History entry re-draws
exactly what was shown, with no model object), and it costs no matplotlib import, no font
cache and no file. The statistics are not redone here: the funnel's control limits come
from coordinator/learning/funnel.limits, the same function that flags the units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html import escape
from typing import Any

from coordinator.learning import funnel
from coordinator.ui.models import unit_flag
from queries.model import INTERCEPT
from queries.present.chart import round_step

_FONT = "font-family: system-ui, -apple-system, 'Segoe UI', sans-serif"
# Colours with at least 4.5:1 contrast on white.
_INK = "#1a1a1a"
_MUTED = "#555555"
_GRID = "#d9d9d9"
_POINT = "#3b5b92"
_FLAGGED = "#b00020"
_CHAR_W = 6.4  # average width of an 11px sans-serif character
# A coefficient's axis stops at +-12 (a ratio of e^12 ~ 160,000): past that a noisy fit's
# interval would squash every other row to a dot; the tooltip still gives its figures.
_MAX_COEF = 12.0
# Ratios the forest's log axis may mark.
_RATIO_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _attr(text: object) -> str:
    return escape(str(text), quote=True)


def _px(x: float) -> str:
    return f"{x:.1f}"


def _num(x: Any) -> float | None:
    """A finite float, or None (stored JSON has nulls where a figure was not finite)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _g(x: float) -> str:
    return f"{x:.3g}"


def _linear_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A range covering lo..hi with round ends, and its 3 to 6 ticks."""
    if hi - lo <= 0:
        hi = lo + 1.0
    step = round_step((hi - lo) / 4)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return first * step, last * step, [k * step for k in range(first, last + 1)]


@dataclass(frozen=True)
class _Term:
    name: str
    estimate: float  # on the coefficient scale (log ratio for binomial and Poisson)
    low: float | None
    high: float | None


def _terms(record: Mapping[str, Any]) -> list[_Term]:
    out = []
    for c in record["fit"]["coefficients"]:
        estimate = _num(c["estimate"])
        if c["column"] == INTERCEPT or estimate is None:
            continue
        low, high = _num(c["ci_low"]), _num(c["ci_high"])
        if low is None or high is None:
            low = high = None
        out.append(_Term(str(c["column"]), estimate, low, high))
    return out


def forest_svg(record: Mapping[str, Any], *, width: int = 720) -> str:
    """A fit's coefficients but the intercept, each with its 95% interval (DP noise and
    sampling), as in coordinator/learning/plot.forest_plot: ratios on a log axis around 1
    for binomial and Poisson models, coefficients around 0 for Gaussian ones."""
    ratio_name = str(record.get("ratio_name") or "")
    fit = record["fit"]
    terms = _terms(record)
    title = f"{fit['family']} model, {fit['persons']} persons: " + (
        f"{ratio_name}s with 95% intervals" if ratio_name else "coefficients with 95% intervals"
    )
    label_w = min(width * 0.4, max(60.0, max((len(t.name) for t in terms), default=4) * _CHAR_W))
    row_h, top = 26, 34
    height = top + max(1, len(terms)) * row_h + 48
    x0, x1 = label_w + 16, width - 24
    out = [
        f'<svg class="chc-forest" id="forest-plot" role="img" '
        f'aria-labelledby="forest-title forest-desc" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'style="{_FONT}; font-size: 11px; max-width: 100%; height: auto">',
        f'<title id="forest-title">{escape(title)}</title>',
        f'<desc id="forest-desc">{len(terms)} terms, each with its estimate and 95% interval'
        f"{' on a log scale' if ratio_name else ''}; the dashed line is no effect.</desc>",
        f'<text class="chart-title" x="4" y="16" font-size="13" font-weight="600" '
        f'fill="{_INK}">{escape(title)}</text>',
    ]
    if not terms:
        out.append(
            f'<text class="empty" x="4" y="{top + 16}" fill="{_MUTED}">The model has no '
            "coefficient but the intercept: nothing to plot.</text></svg>"
        )
        return "\n".join(out)
    values = [0.0] + [v for t in terms for v in (t.estimate, t.low, t.high) if v is not None]
    lo = max(-_MAX_COEF, min(values))
    hi = min(_MAX_COEF, max(values))
    if ratio_name:
        lo, hi, ticks = _log_ticks(lo, hi)
    else:
        lo, hi, ticks = _linear_ticks(lo, hi)

    def at(v: float) -> float:
        return x0 + (min(hi, max(lo, v)) - lo) / (hi - lo) * (x1 - x0)

    bottom = top + len(terms) * row_h
    for t in ticks:
        tx = _px(at(t))
        label = _g(math.exp(t)) if ratio_name else _g(t)
        out.append(
            f'<line class="tick" x1="{tx}" x2="{tx}" y1="{top}" y2="{bottom}" '
            f'stroke="{_GRID}"/><text class="tick-label" x="{tx}" y="{bottom + 14}" '
            f'text-anchor="middle" font-size="10" fill="{_MUTED}">{escape(label)}</text>'
        )
    ref = _px(at(0.0))
    out.append(
        f'<line class="reference" x1="{ref}" x2="{ref}" y1="{top - 4}" y2="{bottom}" '
        f'stroke="{_MUTED}" stroke-dasharray="4 3"/>'
    )
    axis = f"{ratio_name or 'coefficient'} (95% CI: DP noise and sampling)"
    if ratio_name:
        axis += ", log scale"
    out.append(
        f'<text class="axis-label" x="{_px((x0 + x1) / 2)}" y="{bottom + 32}" '
        f'text-anchor="middle" fill="{_INK}">{escape(axis)}</text>'
    )
    for j, term in enumerate(terms):
        cy = top + j * row_h + row_h / 2
        out += _forest_row(term, cy, at, ratio_name, x0)
    out.append("</svg>")
    return "\n".join(out)


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Ticks of a ratio's log axis: round ratios (..., 0.5, 1, 2, 5, ...) within lo..hi."""
    candidates = sorted({math.log(r) for r in _RATIO_TICKS} | {-math.log(r) for r in _RATIO_TICKS})
    span = max(hi - lo, 0.2)
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    ticks = [t for t in candidates if lo <= t <= hi]
    # A narrow interval may hold one round ratio or none: widen to the round ones beside it,
    # so the axis always reads at three marks or more.
    below = [t for t in candidates if t < lo]
    above = [t for t in candidates if t > hi]
    while len(ticks) < 3 and (below or above):
        # The nearer of the next round ratios below and above the range.
        if below and (not above or lo - below[-1] <= above[0] - hi):
            ticks.insert(0, below.pop())
        else:
            ticks.append(above.pop(0))
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    while len(ticks) > 7:
        ticks = ticks[::2] if 0.0 in ticks[::2] else ticks[1::2]
    return lo, hi, ticks


def _forest_row(
    t: _Term, cy: float, at: Callable[[float], float], ratio_name: str, x0: float
) -> list[str]:
    def shown(v: float) -> str:
        return _g(math.exp(v)) if ratio_name else _g(v)

    what = ratio_name or "coefficient"
    ci = "no interval: its noise could not be estimated"
    if t.low is not None and t.high is not None:
        ci = f"95% CI {shown(t.low)} to {shown(t.high)}"
    tip = f"{t.name}: {what} {shown(t.estimate)} ({ci})"
    out = [
        f'<g class="term" data-term="{_attr(t.name)}">',
        f"<title>{escape(tip)}</title>",
        f'<text class="term-label" x="{_px(x0 - 8)}" y="{_px(cy + 4)}" text-anchor="end" '
        f'fill="{_INK}">{escape(t.name)}</text>',
    ]
    if t.low is not None and t.high is not None:
        out.append(
            f'<line class="ci" x1="{_px(at(t.low))}" x2="{_px(at(t.high))}" y1="{_px(cy)}" '
            f'y2="{_px(cy)}" stroke="{_INK}" stroke-width="1.5"/>'
        )
    cx = at(t.estimate)
    out.append(
        f'<rect class="point" x="{_px(cx - 4)}" y="{_px(cy - 4)}" width="8" height="8" '
        f'fill="{_POINT}"/>'
    )
    out.append("</g>")
    return out


@dataclass(frozen=True)
class _Unit:
    name: str
    expected: float
    ratio: float
    flagged: bool
    flag: str
    low: float | None
    high: float | None


def _units(record: Mapping[str, Any]) -> tuple[list[_Unit], list[float]]:
    units, variances = [], []
    for u in record["comparison"]["units"]:
        e, r = _num(u["expected"]), _num(u["ratio"])
        if e is None or r is None or e <= 0:
            continue  # suppressed or without an estimate: in the table, not on the funnel
        flag = str(u.get("flag") or "")
        units.append(
            _Unit(str(u["unit"]), e, r, bool(flag), flag, _num(u["ci_low"]), _num(u["ci_high"]))
        )
        variances.append(_num(u["residual_variance"]) or 0.0)
    return units, variances


def funnel_svg(record: Mapping[str, Any], *, width: int = 720, height: int = 440) -> str:
    """Each unit's O/E against its expected count E, inside the 95% and 99.8% limits."""
    comparison = record["comparison"]
    units, variances = _units(record)
    by = str(comparison["by"])
    title = f"O/E by {by}, adjusted for {record.get('adjustment') or 'nothing'}"
    out = [
        f'<svg class="chc-funnel" id="funnel-plot" role="img" '
        f'aria-labelledby="funnel-title funnel-desc" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'style="{_FONT}; font-size: 11px; max-width: 100%; height: auto">',
        f'<title id="funnel-title">{escape(title)}</title>',
        f'<desc id="funnel-desc">{len(units)} units, observed/expected against the expected '
        "count, with the 95% (dashed) and 99.8% (dotted) control limits around 1.</desc>",
        f'<text class="chart-title" x="4" y="16" font-size="13" font-weight="600" '
        f'fill="{_INK}">{escape(title)}</text>',
    ]
    if not units:
        out.append(
            f'<text class="empty" x="4" y="40" fill="{_MUTED}">No unit has a ratio to plot '
            "(every one suppressed or without an estimate).</text></svg>"
        )
        return "\n".join(out)
    phi = _num(comparison.get("phi"))
    dp_variance = sorted(variances)[len(variances) // 2]  # as Comparison.plot
    es = [u.expected for u in units]
    grid_lo, grid_hi = max(1.0, min(es) * 0.3), max(es) * 1.3
    grid = [grid_lo + (grid_hi - grid_lo) * k / 47 for k in range(48)]
    bounds = {
        level: [funnel.limits(e, level, dp_variance, phi) for e in grid] for level in funnel.LEVELS
    }
    median_e = sorted(es)[len(es) // 2]
    top_limit = funnel.limits(median_e, funnel.LEVELS[-1], dp_variance, phi)[1]
    y_hi = max(max(u.ratio for u in units), top_limit, 1.5) * 1.15
    _, y_hi, y_ticks = _linear_ticks(0.0, y_hi)
    x_lo, x_hi, x_ticks = _linear_ticks(0.0, grid_hi)
    left, right, top, bottom = 56.0, width - 150.0, 30.0, height - 46.0

    def x(e: float) -> float:
        return left + (e - x_lo) / (x_hi - x_lo) * (right - left)

    def y(r: float) -> float:
        return bottom - (min(y_hi, max(0.0, r)) / y_hi) * (bottom - top)

    for t in x_ticks:
        out.append(
            f'<line class="tick" x1="{_px(x(t))}" x2="{_px(x(t))}" y1="{top}" y2="{bottom}" '
            f'stroke="{_GRID}"/><text class="tick-label" x="{_px(x(t))}" y="{bottom + 14}" '
            f'text-anchor="middle" font-size="10" fill="{_MUTED}">{escape(_g(t))}</text>'
        )
    for t in y_ticks:
        out.append(
            f'<line class="tick" x1="{left}" x2="{right}" y1="{_px(y(t))}" y2="{_px(y(t))}" '
            f'stroke="{_GRID}"/><text class="tick-label" x="{left - 6}" y="{_px(y(t) + 3)}" '
            f'text-anchor="end" font-size="10" fill="{_MUTED}">{escape(_g(t))}</text>'
        )
    out.append(
        f'<line class="target" x1="{left}" x2="{right}" y1="{_px(y(1.0))}" y2="{_px(y(1.0))}" '
        f'stroke="{_MUTED}" stroke-width="1.2"/>'
    )
    for level, dash in zip(funnel.LEVELS, ("6 4", "2 3"), strict=True):
        name = f"{100 * level:g}"
        for side in (0, 1):
            points = " ".join(
                f"{_px(x(e))},{_px(y(b[side]))}" for e, b in zip(grid, bounds[level], strict=True)
            )
            out.append(
                f'<polyline class="limit" data-level="{name}" points="{points}" fill="none" '
                f'stroke="{_INK}" stroke-dasharray="{dash}" stroke-width="1"/>'
            )
    out += _legend(right + 12, top + 8)
    out.append(
        f'<text class="axis-label" x="{_px((left + right) / 2)}" y="{height - 10}" '
        f'text-anchor="middle" fill="{_INK}">expected count E</text>'
        f'<text class="axis-label" x="14" y="{_px((top + bottom) / 2)}" text-anchor="middle" '
        f'fill="{_INK}" transform="rotate(-90 14 {_px((top + bottom) / 2)})">'
        "observed / expected</text>"
    )
    label_all = len(units) <= funnel.MAX_LABELLED
    for u in units:
        out += _funnel_point(u, x(u.expected), y(u.ratio), label=label_all or u.flagged)
    out.append("</svg>")
    return "\n".join(out)


def _legend(lx: float, ly: float) -> list[str]:
    rows = (
        ("limit", "6 4", "95% limits"),
        ("limit", "2 3", "99.8% limits"),
    )
    out = []
    for i, (_, dash, text) in enumerate(rows):
        yy = ly + i * 18
        out.append(
            f'<line x1="{_px(lx)}" x2="{_px(lx + 24)}" y1="{_px(yy)}" y2="{_px(yy)}" '
            f'stroke="{_INK}" stroke-dasharray="{dash}"/><text x="{_px(lx + 30)}" '
            f'y="{_px(yy + 4)}" fill="{_INK}">{text}</text>'
        )
    for i, (colour, text) in enumerate(((_POINT, "within"), (_FLAGGED, "outside 95%"))):
        yy = ly + (i + 2) * 18
        out.append(
            f'<circle cx="{_px(lx + 12)}" cy="{_px(yy)}" r="4.5" fill="{colour}"/>'
            f'<text x="{_px(lx + 30)}" y="{_px(yy + 4)}" fill="{_INK}">{text}</text>'
        )
    return out


def _funnel_point(u: _Unit, cx: float, cy: float, *, label: bool) -> list[str]:
    ci = ""
    if u.low is not None and u.high is not None:
        ci = f", 95% CI {u.low:.3f} to {u.high:.3f}"
    tip = f"{u.name}: O/E {u.ratio:.3f}{ci}, expected {u.expected:.1f}; " + (
        u.flag if u.flag else "within the limits"
    )
    out = [
        f'<g class="unit" data-unit="{_attr(u.name)}" '
        f'data-flag="{_attr(unit_flag(u.flag, u.ratio))}">',
        f"<title>{escape(tip)}</title>",
        f'<circle cx="{_px(cx)}" cy="{_px(cy)}" r="4.5" '
        f'fill="{_FLAGGED if u.flagged else _POINT}"/>',
    ]
    if label:
        out.append(
            f'<text class="unit-label" x="{_px(cx + 7)}" y="{_px(cy - 5)}" '
            f'fill="{_INK}">{escape(u.name)}</text>'
        )
    out.append("</g>")
    return out
