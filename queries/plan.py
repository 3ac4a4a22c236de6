"""Compile a validated Query against a node's catalog into what the node computes.

A plan lists the integer vectors ("components") the node will release, each with its
sensitivity, fixed-point unit and rho, and the one SQL statement that computes them all
exactly in one scan of the view (plan_sql.Scan; built with sqlglot, so identifiers and
literals are quoted by a parser, never by string formatting).
Building a plan touches no data and spends no budget, so it is also the "explain" step.
What each measure needs is built in components.py and the SQL text in plan_sql.py; this
module combines them for a whole query. Measures map to components by role:

    count       -> n: persons                  mean            -> n: rows, s: sum
    count_rows  -> n: rows                     variance/stddev -> n: rows, s: sum, ss: sumsq
    sum         -> s: sum                      quantile/histogram -> h: bins over a public grid
    ratio       -> num, den: sum (or rows)

A component is named by what it computes (`sum:age`, `bins:los/61`...), not by the measure
that asked for it, so measures that need the same vector share one release and pay for it
once. Each measure's share of rho (by weight) is split over its components to minimise the
noise variance of the figure it produces (see `_split`), and a shared component receives the
sum of what its measures give it.

The rows per person a plan counts are the query's rows_per_person if set (at most the view's
max_rows_per_person, the custodian's cap; a higher one is refused here), else the view's; every
sensitivity scales with it and, below the view's cap, the SQL keeps at most that many rows per
person (plan_sql.Truncation, in the view's declared keep order).

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

from queries import mechanisms, plan_sql
from queries.components import Component, measure_components
from queries.errors import QueryError
from queries.schema import Catalog, ColumnType, ViewSpec
from queries.sensitivity import effective_cap
from queries.spec import Measure, Query, Statistic

# A release with more cells than this is refused: each cell costs noise and transfer.
MAX_CELLS = 20_000


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
    scan: plan_sql.Scan  # the one statement computing every component
    # The public values of each group_by column (filtered), in order: domain is their product,
    # the last column varying fastest.
    group_domains: tuple[tuple[str, ...], ...] = ()
    # Rows per person the plan counts: the query's rows_per_person, else the view's cap.
    rows_per_person: int = 1

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
        cap = self.view.max_rows_per_person
        if self.rows_per_person < cap:
            rows = (
                f"counting at most {self.rows_per_person} of each person's rows, the query's "
                f"rows_per_person: the first by {self.view.rank_column} of those that pass the "
                f"filters; the view keeps up to {cap}"
            )
        else:
            rows = f"at most {cap} row(s) per person"
        lines = [
            f"view {self.view.name} ({rows}); group by {groups}: "
            f"{len(self.domain)} public group(s)",
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
    cap = effective_cap(view, query.rows_per_person)
    truncation = (
        plan_sql.Truncation(cap=cap, rank_column=view.rank_column)
        if cap < view.max_rows_per_person and view.rank_column is not None
        else None
    )
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
        roles = measure_components(m, view, query.group_by, n_groups, cap)
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
        scan=plan_sql.scan(
            view.name,
            query.group_by,
            components,
            filters,
            truncation,
            whole=frozenset(c.name for c in view.columns if c.type is ColumnType.INTEGER),
        ),
        group_domains=tuple(domains),
        rows_per_person=cap,
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
