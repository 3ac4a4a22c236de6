"""Compile a validated Query against a node's catalog into what the node computes.

A plan lists the integer vectors ("components") the node will release, each with its
sensitivity, fixed-point unit and share of rho, and the SQL that computes them exactly
(built with sqlglot, so identifiers and literals are quoted by a parser, never by string
formatting). Building a plan touches no data and spends no budget, so it is also the
"explain" step. Measures map to components:

    count       -> persons                     mean/variance/stddev -> rows, sum, sumsq
    count_rows  -> rows                        quantile/histogram   -> bins over a public grid
    sum         -> sum                         ratio                -> sum (or rows) twice
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from protocols.errors import QueryError
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.sensitivity import Kind, sensitivity
from queries.spec import Measure, Query, Statistic

# A release with more cells than this is refused: each cell costs noise and transfer.
MAX_CELLS = 20_000
# Default grid for quantiles and histograms of float columns.
DEFAULT_FLOAT_BINS = 200
# Significant digits kept by fixed-point sums.
FIXED_POINT_DIGITS = 4


@dataclass(frozen=True)
class Component:
    """One integer vector the node releases (one value per group, or per group and bin)."""

    measure: str
    kind: Kind
    column: str | None
    lower: float | None  # clamping bounds (None for counts)
    upper: float | None
    exponent: int  # fixed-point unit is 10**exponent (0 for counts)
    sensitivity: float  # L2, in units
    weight: float  # share of the query's rho (relative)
    edges: tuple[float, ...] = ()  # bin edges for BINS (len = bins + 1)

    @property
    def key(self) -> str:
        """Name of the component on the wire, e.g. 'mean_los:sum'."""
        return f"{self.measure}:{self.kind.value}"

    @property
    def unit(self) -> float:
        """Value of one fixed-point unit."""
        return float(10.0**self.exponent)

    @property
    def bins(self) -> int:
        """Number of bins (0 if not binned)."""
        return max(0, len(self.edges) - 1)


@dataclass(frozen=True)
class Plan:
    """What a node runs for one query, and what it will cost."""

    query: Query
    view: ViewSpec
    group_by: tuple[str, ...]
    # Every public output group, in order: exact results are re-indexed onto it so that
    # absent groups are released as noisy zeros (their absence would leak).
    domain: tuple[tuple[str, ...], ...]
    components: tuple[Component, ...]
    scalar_sql: str | None  # one row per group, one column per non-binned component
    binned_sql: tuple[tuple[str, str], ...]  # (component key, SQL giving group, bin, n)

    @property
    def cells(self) -> int:
        """Number of released values."""
        n = len(self.domain)
        return sum(n * (c.bins or 1) for c in self.components)

    def rho_shares(self) -> dict[str, float]:
        """Each component's share of the query's rho (measure weights, then even split)."""
        total_weight = sum(m.weight for m in self.query.measures)
        per_measure = {
            m.name: self.query.rho * m.weight / total_weight for m in self.query.measures
        }
        counts: dict[str, int] = {}
        for c in self.components:
            owner = component_measure(c.key)
            counts[owner] = counts.get(owner, 0) + 1
        return {
            c.key: per_measure[component_measure(c.key)] / counts[component_measure(c.key)]
            for c in self.components
        }

    def describe(self) -> str:
        """A readable account of what the node will compute (no data involved)."""
        groups = ", ".join(self.group_by) or "(no grouping)"
        lines = [
            f"view {self.view.name} (at most {self.view.max_rows_per_person} row(s) per "
            f"person); group by {groups}: {len(self.domain)} public group(s)",
        ]
        for c in self.components:
            detail = f"column {c.column}" if c.column else ""
            if c.lower is not None and c.upper is not None:
                detail += f" clamped to [{c.lower:g}, {c.upper:g}]"
            if c.bins:
                detail += f", {c.bins} bins"
            if c.exponent:
                detail += f", fixed-point unit {c.unit:g}"
            lines.append(f"  {c.key}: {c.kind.value} {detail}; L2 sensitivity {c.sensitivity:g}")
        return "\n".join(lines)


def compile_query(query: Query, catalog: Catalog) -> Plan:
    """Check a query against the catalog and build its plan; raises QueryError if refused."""
    return _compile(query, catalog)


@functools.lru_cache(maxsize=512)
def _compile(query: Query, catalog: Catalog) -> Plan:
    view = catalog.view(query.view)
    filters = _filters(query, view)
    domains: list[tuple[str, ...]] = []
    for name in query.group_by:
        col = view.column(name)
        if col.type is not ColumnType.CATEGORY:
            raise QueryError(
                f"cannot group by {name!r}: it has no public domain; group by one of "
                f"{[c.name for c in view.columns if c.type is ColumnType.CATEGORY]}"
            )
        domains.append(filters.get(name, col.domain))
    n_groups = math.prod(len(d) for d in domains)
    components: list[Component] = []
    for m in query.measures:
        components.extend(_components(m, view, query.group_by, n_groups))
    plan = Plan(
        query=query,
        view=view,
        group_by=query.group_by,
        domain=tuple(itertools.product(*domains)),
        components=tuple(components),
        scalar_sql=_scalar_sql(view.name, query.group_by, components, filters),
        binned_sql=tuple(
            (c.key, _binned_sql(view.name, query.group_by, c, filters))
            for c in components
            if c.kind is Kind.BINS
        ),
    )
    if plan.cells > MAX_CELLS:
        raise QueryError(
            f"the query would release {plan.cells} values, more than the limit of "
            f"{MAX_CELLS}; group by fewer columns, filter them, or use fewer bins"
        )
    return plan


def _filters(query: Query, view: ViewSpec) -> dict[str, tuple[str, ...]]:
    filters: dict[str, tuple[str, ...]] = {}
    for f in query.where:
        col = view.column(f.column)
        if col.type is not ColumnType.CATEGORY:
            raise QueryError(
                f"cannot filter on {f.column!r}: only public category columns may be filtered "
                f"({', '.join(c.name for c in view.columns if c.type is ColumnType.CATEGORY)})"
            )
        bad = [v for v in f.values if v not in col.domain]
        if bad:
            raise QueryError(
                f"filter on {f.column!r} uses {bad}, not in its public domain {list(col.domain)}"
            )
        # Keep the declared order so that outputs are stable whatever order the analyst used.
        filters[f.column] = tuple(v for v in col.domain if v in f.values)
    return filters


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


def _components(
    m: Measure, view: ViewSpec, group_by: tuple[str, ...], n_groups: int
) -> list[Component]:
    def count(kind: Kind, column: str | None = None) -> Component:
        return Component(
            measure=m.name,
            kind=kind,
            column=column,
            lower=None,
            upper=None,
            exponent=0,
            sensitivity=sensitivity(kind, view, group_by, n_groups),
            weight=m.weight,
        )

    def total(kind: Kind, column: str) -> Component:
        col, lo, hi = _numeric(view, column, m)
        largest = max(lo * lo, hi * hi) if kind is Kind.SUMSQ else max(abs(lo), abs(hi))
        e = fixed_point_exponent(largest, integer=col.type is ColumnType.INTEGER)
        if kind is Kind.SUMSQ:
            bound = max(_units(lo * lo, e), _units(hi * hi, e))
        else:
            bound = max(abs(_units(lo, e)), abs(_units(hi, e)))
        return Component(
            measure=m.name,
            kind=kind,
            column=column,
            lower=lo,
            upper=hi,
            exponent=e,
            sensitivity=sensitivity(kind, view, group_by, n_groups, max_abs_units=bound),
            weight=m.weight,
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
            measure=m.name,
            kind=Kind.BINS,
            column=column,
            lower=lo,
            upper=hi,
            exponent=0,
            sensitivity=sensitivity(Kind.BINS, view, group_by, n_groups),
            weight=m.weight,
            edges=edges,
        )

    stat = m.statistic
    if stat is Statistic.COUNT:
        return [count(Kind.PERSONS)]
    if stat is Statistic.COUNT_ROWS:
        return [count(Kind.ROWS)]
    column = m.column or ""
    if stat is Statistic.SUM:
        return [total(Kind.SUM, column)]
    if stat in {Statistic.MEAN, Statistic.VARIANCE, Statistic.STDDEV}:
        # total() checks that the column is numeric and bounded.
        return [
            count(Kind.ROWS, column),
            total(Kind.SUM, column),
            total(Kind.SUMSQ, column),
        ]
    if stat in {Statistic.QUANTILE, Statistic.HISTOGRAM}:
        return [binned(column)]
    # RATIO: numerator and denominator are clamped sums, or row counts where a side is None.
    parts = []
    for side, name in (("num", m.column), ("den", m.denominator)):
        part = count(Kind.ROWS) if name is None else total(Kind.SUM, name)
        parts.append(_renamed(part, f"{m.name}.{side}"))
    return parts


def _renamed(c: Component, measure: str) -> Component:
    return Component(
        measure=measure,
        kind=c.kind,
        column=c.column,
        lower=c.lower,
        upper=c.upper,
        exponent=c.exponent,
        sensitivity=c.sensitivity,
        weight=c.weight,
        edges=c.edges,
    )


def component_measure(key: str) -> str:
    """The query measure a component key belongs to ('r.num:sum' -> 'r')."""
    return key.split(":", 1)[0].split(".", 1)[0]


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _num(value: float) -> exp.Expr:
    literal = exp.Literal.number(repr(float(value)))
    return exp.Neg(this=exp.Literal.number(repr(-float(value)))) if value < 0 else literal


def _clamped(c: Component) -> exp.Expr:
    lower = c.lower if c.lower is not None else 0.0
    upper = c.upper if c.upper is not None else 0.0
    inner = exp.func("GREATEST", exp.cast(_col(c.column or ""), "DOUBLE"), _num(lower))
    return exp.func("LEAST", inner, _num(upper))


def _component_expr(c: Component) -> exp.Expr:
    if c.kind is Kind.PERSONS:
        return exp.Count(this=exp.Distinct(expressions=[_col("person_id")]))
    if c.kind is Kind.ROWS:
        return exp.Count(this=_col(c.column) if c.column else exp.Star())
    value = _clamped(c)
    if c.kind is Kind.SUMSQ:
        value = exp.Mul(this=value, expression=value.copy())
    scaled = exp.Div(this=value, expression=_num(10.0**c.exponent))
    rounded = exp.cast(exp.func("ROUND", exp.Paren(this=scaled)), "BIGINT")
    return exp.Sum(this=rounded)


def _where(stmt: exp.Select, filters: dict[str, tuple[str, ...]]) -> exp.Select:
    for column, values in filters.items():
        stmt = stmt.where(_col(column).isin(*[exp.Literal.string(v) for v in values]))
    return stmt


def _scalar_sql(
    view: str,
    group_by: tuple[str, ...],
    components: list[Component],
    filters: dict[str, tuple[str, ...]],
) -> str | None:
    scalar = [c for c in components if c.kind is not Kind.BINS]
    if not scalar:
        return None
    select: list[exp.Expr] = [_col(c) for c in group_by]
    for c in scalar:
        select.append(exp.alias_(_component_expr(c), c.key, quoted=True))
    stmt = _where(sqlglot.select(*select).from_(exp.to_table(view, quoted=True)), filters)
    if group_by:
        stmt = stmt.group_by(*[_col(c) for c in group_by])
    return stmt.sql(dialect="duckdb")


def _binned_sql(
    view: str, group_by: tuple[str, ...], c: Component, filters: dict[str, tuple[str, ...]]
) -> str:
    lo, hi = c.edges[0], c.edges[-1]
    width = (hi - lo) / c.bins
    position = exp.Div(
        this=exp.Paren(this=exp.Sub(this=_clamped(c), expression=_num(lo))),
        expression=_num(width),
    )
    # The top edge belongs to the last bin, so clamp the index to bins - 1.
    index = exp.func(
        "LEAST", exp.cast(exp.func("FLOOR", position), "BIGINT"), exp.Literal.number(c.bins - 1)
    )
    select: list[exp.Expr] = [_col(g) for g in group_by]
    select += [exp.alias_(index, "bin", quoted=True), exp.alias_(exp.Count(this=exp.Star()), "n")]
    stmt = sqlglot.select(*select).from_(exp.to_table(view, quoted=True))
    stmt = _where(
        stmt.where(exp.Not(this=exp.Is(this=_col(c.column or ""), expression=exp.Null()))), filters
    )
    stmt = stmt.group_by(*[_col(g) for g in group_by], exp.column("bin", quoted=True))
    return stmt.sql(dialect="duckdb")
