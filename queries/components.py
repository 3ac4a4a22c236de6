"""Components: the integer vectors a node releases, and which ones each measure needs.

A measure maps to one to three components by role (n, s, ss, h, num, den; see plan.py), each
with its clamping bounds, fixed-point unit, L2 sensitivity and public bound on a cell, all
from the catalog's public bounds and the measure alone. It is separate from the planner,
which combines the measures of a query, shares their components and splits rho among them:
what one measure needs does not depend on the others (role_keys not even on the catalog, so
the hub can find a measure's components without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from queries.errors import QueryError
from queries.schema import ColumnSpec, ColumnType, ViewSpec
from queries.sensitivity import Kind, sensitivity
from queries.spec import Measure, Statistic

# Default grid for quantiles and histograms of float columns.
DEFAULT_FLOAT_BINS = 200
# Significant digits kept by fixed-point sums.
FIXED_POINT_DIGITS = 4


@dataclass(frozen=True)
class Component:
    """One integer vector the node releases (one value per group, or per group and bin)."""

    key: str  # what it computes, e.g. 'sum:age' or 'bins:los/61'; its name on the wire
    kind: Kind
    column: str | None
    lower: float | None  # clamping bounds (None for counts)
    upper: float | None
    exponent: int  # fixed-point unit is 10**exponent (0 for counts)
    sensitivity: float  # L2, in units
    max_abs: int  # public bound on |exact value| of one cell, in units
    edges: tuple[float, ...] = ()  # bin edges for BINS (len = bins + 1)

    @property
    def unit(self) -> float:
        """Value of one fixed-point unit."""
        return float(10.0**self.exponent)

    @property
    def bins(self) -> int:
        """Number of bins (0 if not binned)."""
        return max(0, len(self.edges) - 1)


def _numeric(view: ViewSpec, name: str, measure: Measure) -> tuple[ColumnSpec, float, float]:
    col = view.column(name)
    if col.type not in {ColumnType.INTEGER, ColumnType.FLOAT}:
        raise QueryError(
            f"measure {measure.name!r}: column {name!r} is not numeric; numeric columns of "
            f"{view.name!r}: {[c.name for c in view.columns if c.bounded]}"
        )
    if not col.bounded or col.lower is None or col.upper is None:
        raise QueryError(
            f"measure {measure.name!r}: column {name!r} has no public bounds; "
            f"use CLAMP({name}, lower, upper)"
        )
    lo, hi = col.lower, col.upper
    fractional = measure.clamp is not None and not all(float(b).is_integer() for b in measure.clamp)
    if fractional and col.type is ColumnType.INTEGER:
        # Integer columns are summed in whole units, so a fractional bound would be rounded
        # row by row (CLAMP(age, 0, 0.4) would sum to 0): refuse it.
        raise QueryError(
            f"measure {measure.name!r}: {name!r} is a whole-number column, so its CLAMP "
            f"bounds must be whole numbers, got {list(measure.clamp or ())}"
        )
    if measure.clamp is not None:
        lo, hi = max(lo, measure.clamp[0]), min(hi, measure.clamp[1])
        if lo >= hi:
            raise QueryError(
                f"measure {measure.name!r}: clamp {measure.clamp} does not overlap the public "
                f"bounds [{col.lower:g}, {col.upper:g}] of {name!r}"
            )
    return col, lo, hi


def fixed_point_exponent(largest: float, *, integer: bool) -> int:
    """Exponent e of the unit 10**e keeping FIXED_POINT_DIGITS significant digits."""
    if largest <= 0:
        return 0
    e = math.floor(math.log10(largest)) - FIXED_POINT_DIGITS + 1
    return max(0, e) if integer else e


def _units(value: float, exponent: int) -> int:
    # Same rounding as DuckDB's ROUND (half away from zero) so bounds match the SQL.
    scaled = value / 10.0**exponent
    return int(math.copysign(math.floor(abs(scaled) + 0.5), scaled))


def _clamp_tag(m: Measure) -> str:
    return "" if m.clamp is None else f"@{m.clamp[0]!r},{m.clamp[1]!r}"


def role_keys(m: Measure) -> dict[str, str]:
    """The component key of each role of a measure (derivable from the query alone, so the
    hub finds a measure's components without the node's catalog)."""
    col, tag = m.column or "", _clamp_tag(m)
    stat = m.statistic
    if stat is Statistic.COUNT:
        return {"n": "persons"}
    if stat is Statistic.COUNT_ROWS:
        return {"n": "rows"}
    if stat is Statistic.SUM:
        return {"s": f"sum:{col}{tag}"}
    if stat is Statistic.MEAN:
        return {"n": f"rows:{col}", "s": f"sum:{col}{tag}"}
    if stat in {Statistic.VARIANCE, Statistic.STDDEV}:
        return {"n": f"rows:{col}", "s": f"sum:{col}{tag}", "ss": f"sumsq:{col}{tag}"}
    if stat in {Statistic.QUANTILE, Statistic.HISTOGRAM}:
        # The default grid follows from the column and clamp; an explicit one is named.
        return {"h": f"bins:{col}{tag}" + ("" if m.bins is None else f"/{m.bins}")}
    return {
        "num": "rows" if m.column is None else f"sum:{m.column}{tag}",
        "den": "rows" if m.denominator is None else f"sum:{m.denominator}{tag}",
    }


def measure_components(
    m: Measure, view: ViewSpec, group_by: tuple[str, ...], n_groups: int, cap: int | None = None
) -> dict[str, Component]:
    """The component of each role of a measure, checked against the view's public bounds.

    `cap` is the rows per person the query counts (sensitivity.effective_cap; the view's if
    None): sensitivities and the public bounds on cells scale with it.
    """
    keys = role_keys(m)
    rows = view.max_persons * (view.max_rows_per_person if cap is None else cap)

    def count(role: str, kind: Kind, column: str | None = None) -> Component:
        return Component(
            key=keys[role],
            kind=kind,
            column=column,
            lower=None,
            upper=None,
            exponent=0,
            sensitivity=sensitivity(kind, view, group_by, n_groups, cap=cap),
            max_abs=view.max_persons if kind is Kind.PERSONS else rows,
        )

    def total(role: str, kind: Kind, column: str) -> Component:
        col, lo, hi = _numeric(view, column, m)
        largest = max(lo * lo, hi * hi) if kind is Kind.SUMSQ else max(abs(lo), abs(hi))
        e = fixed_point_exponent(largest, integer=col.type is ColumnType.INTEGER)
        if kind is Kind.SUMSQ:
            bound = max(_units(lo * lo, e), _units(hi * hi, e))
        else:
            bound = max(abs(_units(lo, e)), abs(_units(hi, e)))
        return Component(
            key=keys[role],
            kind=kind,
            column=column,
            lower=lo,
            upper=hi,
            exponent=e,
            sensitivity=sensitivity(kind, view, group_by, n_groups, max_abs_units=bound, cap=cap),
            max_abs=rows * max(1, bound),
        )

    def binned(column: str) -> Component:
        col, lo, hi = _numeric(view, column, m)
        if m.bins is not None:
            bins = m.bins
        elif col.type is ColumnType.INTEGER and hi - lo < 1000:
            bins = int(hi - lo) + 1  # one bin per whole value
        else:
            bins = DEFAULT_FLOAT_BINS
        if col.type is ColumnType.INTEGER and m.bins is None:
            edges = tuple(lo + i for i in range(bins + 1))  # [v, v + 1) holds the value v
        else:
            width = (hi - lo) / bins
            edges = (*(lo + i * width for i in range(bins)), hi)
        return Component(
            key=keys["h"],
            kind=Kind.BINS,
            column=column,
            lower=lo,
            upper=hi,
            exponent=0,
            sensitivity=sensitivity(Kind.BINS, view, group_by, n_groups, cap=cap),
            max_abs=rows,
            edges=edges,
        )

    stat = m.statistic
    if stat is Statistic.COUNT:
        return {"n": count("n", Kind.PERSONS)}
    if stat is Statistic.COUNT_ROWS:
        return {"n": count("n", Kind.ROWS)}
    column = m.column or ""
    if stat is Statistic.SUM:
        return {"s": total("s", Kind.SUM, column)}
    if stat is Statistic.MEAN:
        # total() checks that the column is numeric and bounded.
        return {"n": count("n", Kind.ROWS, column), "s": total("s", Kind.SUM, column)}
    if stat in {Statistic.VARIANCE, Statistic.STDDEV}:
        return {
            "n": count("n", Kind.ROWS, column),
            "s": total("s", Kind.SUM, column),
            "ss": total("ss", Kind.SUMSQ, column),
        }
    if stat in {Statistic.QUANTILE, Statistic.HISTOGRAM}:
        return {"h": binned(column)}
    # RATIO: numerator and denominator are clamped sums, or row counts where a side is None.
    return {
        "num": count("num", Kind.ROWS) if m.column is None else total("num", Kind.SUM, m.column),
        "den": (
            count("den", Kind.ROWS)
            if m.denominator is None
            else total("den", Kind.SUM, m.denominator)
        ),
    }
