"""Compile a validated Query against a node's catalog into what the node computes.

A plan lists the integer vectors ("components") the node will release, each with its
sensitivity, fixed-point unit and rho, and the SQL that computes them exactly (built with
sqlglot, so identifiers and literals are quoted by a parser, never by string formatting).
Building a plan touches no data and spends no budget, so it is also the "explain" step.
Measures map to components by role:

    count       -> n: persons                  mean            -> n: rows, s: sum
    count_rows  -> n: rows                     variance/stddev -> n: rows, s: sum, ss: sumsq
    sum         -> s: sum                      quantile/histogram -> h: bins over a public grid
    ratio       -> num, den: sum (or rows)

A component is named by what it computes (`sum:age`, `bins:los/61`...), not by the measure
that asked for it, so measures that need the same vector share one release and pay for it
once. Each measure's share of rho (by weight) is split over its components to minimise the
noise variance of the figure it produces (see `_split`), and a shared component receives the
sum of what its measures give it.

Everything that could fail later is refused here, from public bounds only: a plan whose exact
integers plus noise could leave the 64-bit range, too many cells, a grid that is too fine.
After a query has planned, nothing about the data can change its status or message.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from queries import mechanisms
from queries.errors import QueryError
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


@dataclass(frozen=True)
class MeasurePlan:
    """Which component plays which role in one measure."""

    measure: Measure
    roles: tuple[tuple[str, str], ...]  # (role, component key), e.g. ("n", "rows:age")

    def key(self, role: str) -> str:
        """The component key of one role."""
        return dict(self.roles)[role]


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
    measures: tuple[MeasurePlan, ...]
    rho: tuple[tuple[str, float], ...]  # (component key, rho), summing to query.rho
    scalar_sql: str | None  # one row per group, one column per non-binned component
    binned_sql: tuple[tuple[str, str], ...]  # (component key, SQL giving group, bin, n)

    @property
    def cells(self) -> int:
        """Number of released values."""
        return _cells(len(self.domain), self.components)

    def rho_shares(self) -> dict[str, float]:
        """Each component's rho (what its measures give it, summing to the query's rho)."""
        return dict(self.rho)

    def users(self, key: str) -> list[str]:
        """Names of the measures that use a component."""
        return _users(self.measures, key)

    def describe(self) -> str:
        """A readable account of what the node will compute (no data involved)."""
        groups = ", ".join(self.group_by) or "(no grouping)"
        lines = [
            f"view {self.view.name} (at most {self.view.max_rows_per_person} row(s) per "
            f"person); group by {groups}: {len(self.domain)} public group(s)",
        ]
        shares = self.rho_shares()
        for c in self.components:
            detail = f"column {c.column}" if c.column else ""
            if c.lower is not None and c.upper is not None:
                detail += f" clamped to [{c.lower:g}, {c.upper:g}]"
            if c.bins:
                detail += f", {c.bins} bins"
            if c.exponent:
                detail += f", fixed-point unit {c.unit:g}"
            rho = shares[c.key]
            lines.append(
                f"  {c.key}: {c.kind.value} {detail}; L2 sensitivity {c.sensitivity:g}; "
                f"rho {rho:.4g} ({100 * rho / self.query.rho:.0f}%) for "
                + ", ".join(self.users(c.key))
            )
        return "\n".join(lines)


def _users(measures: Sequence[MeasurePlan], key: str) -> list[str]:
    return [mp.measure.name for mp in measures if key in dict(mp.roles).values()]


def _cells(n_groups: int, components: tuple[Component, ...] | list[Component]) -> int:
    return sum(n_groups * (c.bins or 1) for c in components)


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
    unique: dict[str, Component] = {}
    measure_roles: list[tuple[Measure, dict[str, Component]]] = []
    for m in query.measures:
        roles = _components(m, view, query.group_by, n_groups)
        for c in roles.values():
            unique.setdefault(c.key, c)
        measure_roles.append((m, roles))
    components = tuple(unique.values())
    cells = _cells(n_groups, components)
    if cells > MAX_CELLS:
        raise QueryError(
            f"the query would release {cells} values, more than the limit of "
            f"{MAX_CELLS}; group by fewer columns, filter them, or use fewer bins"
        )
    total_weight = sum(m.weight for m in query.measures)
    rho: dict[str, float] = {c.key: 0.0 for c in components}
    measures: list[MeasurePlan] = []
    for m, roles in measure_roles:
        measure_rho = query.rho * m.weight / total_weight
        for key, fraction in _split(m, roles).items():
            rho[key] += measure_rho * fraction
        measures.append(
            MeasurePlan(measure=m, roles=tuple((role, c.key) for role, c in roles.items()))
        )
    for c in components:
        _check_range(c, rho[c.key], _users(measures, c.key))
    return Plan(
        query=query,
        view=view,
        group_by=query.group_by,
        domain=tuple(itertools.product(*domains)),
        components=components,
        measures=tuple(measures),
        rho=tuple(rho.items()),
        scalar_sql=_scalar_sql(view.name, query.group_by, components, filters),
        binned_sql=tuple(
            (c.key, _binned_sql(view.name, query.group_by, c, filters))
            for c in components
            if c.kind is Kind.BINS
        ),
    )


def _check_range(c: Component, rho: float, users: list[str]) -> None:
    """Refuse a component whose exact value plus noise could leave the 64-bit range."""
    try:
        scale = mechanisms.scale_for_rho(rho, c.sensitivity)
    except (ValueError, OverflowError):
        scale = math.inf
    if not mechanisms.fits_int64(c.max_abs, scale):
        raise QueryError(
            f"measure(s) {', '.join(repr(u) for u in users)}: {c.key} would get rho {rho:.3g}, "
            f"whose noise (sigma {scale:.3g} units) on values up to {c.max_abs:.3g} units could "
            "overflow a 64-bit integer; give the measure more rho (a larger weight or query "
            "rho) or narrower CLAMP bounds"
        )


def _split(m: Measure, roles: dict[str, Component]) -> dict[str, float]:
    """Fractions of one measure's rho per component, minimising its figure's noise variance.

    The figure's noise variance is about sum_k g_k^2 sigma_k^2 with sigma_k^2 = D_k^2 /
    (2 rho_k) (D_k the L2 sensitivity in natural units, g_k the figure's gradient in
    component k); minimising it subject to sum_k rho_k = rho gives rho_k proportional to
    g_k D_k (Lagrange). The gradients depend on the data, so they are taken at a public
    guess from the column's bounds: a mean of about the middle of the clamp range.
    """
    scale = {role: c.sensitivity * c.unit for role, c in roles.items()}
    guess = _typical(roles["s"]) if "s" in roles else 1.0
    stat = m.statistic
    if stat is Statistic.MEAN:
        # mean = s / n: d/ds = 1/n, d/dn = -mean/n.
        gradient = {"s": 1.0, "n": abs(guess)}
    elif stat in {Statistic.VARIANCE, Statistic.STDDEV}:
        # v = (ss - s^2/n)/(n - 1): d/dss ~ 1/n, d/ds ~ -2 mean/n, d/dn ~ (mean^2 - v)/n.
        gradient = {"ss": 1.0, "s": 2 * abs(guess), "n": guess * guess}
    elif stat is Statistic.RATIO:
        # r = num / den: d/dnum = 1/den, d/dden = -r/den.
        ratio = abs(_typical(roles["num"])) / max(abs(_typical(roles["den"])), 1e-12)
        gradient = {"num": 1.0, "den": ratio}
    else:
        gradient = dict.fromkeys(roles, 1.0)
    weights = {role: max(gradient[role] * scale[role], 1e-12) for role in roles}
    total = sum(weights.values())
    out: dict[str, float] = {}
    for role, c in roles.items():
        out[c.key] = out.get(c.key, 0.0) + weights[role] / total
    return out


def _typical(c: Component) -> float:
    """A public guess of a row's value: the middle of the clamp range (1 for a row count)."""
    if c.lower is None or c.upper is None:
        return 1.0
    if c.lower < 0 < c.upper:
        return max(abs(c.lower), abs(c.upper)) / 2
    return (c.lower + c.upper) / 2


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


def _components(
    m: Measure, view: ViewSpec, group_by: tuple[str, ...], n_groups: int
) -> dict[str, Component]:
    keys = role_keys(m)

    def count(role: str, kind: Kind, column: str | None = None) -> Component:
        return Component(
            key=keys[role],
            kind=kind,
            column=column,
            lower=None,
            upper=None,
            exponent=0,
            sensitivity=sensitivity(kind, view, group_by, n_groups),
            max_abs=view.max_persons if kind is Kind.PERSONS else view.max_rows,
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
            sensitivity=sensitivity(kind, view, group_by, n_groups, max_abs_units=bound),
            max_abs=view.max_rows * max(1, bound),
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
            sensitivity=sensitivity(Kind.BINS, view, group_by, n_groups),
            max_abs=view.max_rows,
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


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _num(value: float) -> exp.Expr:
    literal = exp.Literal.number(repr(float(value)))
    return exp.Neg(this=exp.Literal.number(repr(-float(value)))) if value < 0 else literal


def _clamped(c: Component) -> exp.Expr:
    lower = c.lower if c.lower is not None else 0.0
    upper = c.upper if c.upper is not None else 0.0
    value = exp.cast(_col(c.column or ""), "DOUBLE")
    clamped = exp.func("LEAST", exp.func("GREATEST", value, _num(lower)), _num(upper))
    # GREATEST skips NULLs, so a missing value would become the lower bound and be summed;
    # keep it NULL so that SUM ignores it, as the row count of the column does.
    return exp.If(
        this=exp.Is(this=value.copy(), expression=exp.Null()), true=exp.Null(), false=clamped
    )


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
    components: tuple[Component, ...],
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
