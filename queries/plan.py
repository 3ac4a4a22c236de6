"""Compile a validated Query against a node's catalog into what the node computes.

The plan holds the exact-aggregate SQL (built with sqlglot so identifiers and literals are
quoted by a parser, never by string formatting), the public output domain, and the
sensitivity that calibrates the noise. Building a plan touches no data and spends no budget,
so it doubles as the "explain" step.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from protocols.errors import QueryError
from queries import mechanisms
from queries.schema import Catalog, ColumnType, ViewSpec
from queries.spec import Query, Statistic

# A release with more cells than this is refused: each cell costs noise and transfer.
MAX_GROUPS = 10_000


@dataclass(frozen=True)
class Plan:
    """What a node runs for one query, and what it will cost."""

    query: Query
    view: ViewSpec
    sql: str
    group_by: tuple[str, ...]
    # Every public output group, in order: exact results are re-indexed onto it so that
    # absent groups are released as noisy zeros (their absence would leak).
    domain: tuple[tuple[str, ...], ...]
    sensitivity: float

    @property
    def sensitivity_per_measure(self) -> float:
        """L2 sensitivity of each measure's vector on its own (rho is split across measures)."""
        return self.sensitivity

    def describe(self) -> str:
        """A readable account of what the node will compute (no data involved)."""
        groups = ", ".join(self.group_by) or "(no grouping)"
        return (
            f"view {self.view.name}; group by {groups} over {len(self.domain)} public "
            f"group(s); measures {', '.join(m.name for m in self.query.measures)}; "
            f"L2 sensitivity {self.sensitivity:g} per measure; exact SQL: {self.sql}"
        )

    @property
    def cells(self) -> int:
        """Number of released values."""
        return len(self.domain) * len(self.query.measures)


def compile_query(query: Query, catalog: Catalog) -> Plan:
    """Check a query against the catalog and build its plan; raises QueryError if refused."""
    view = catalog.view(query.view)
    domains: list[tuple[str, ...]] = []
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
    for name in query.group_by:
        col = view.column(name)
        if col.type is not ColumnType.CATEGORY:
            raise QueryError(
                f"cannot group by {name!r}: it has no public domain; group by one of "
                f"{[c.name for c in view.columns if c.type is ColumnType.CATEGORY]}"
            )
        domains.append(filters.get(name, col.domain))
    n_groups = math.prod(len(d) for d in domains)
    if n_groups * len(query.measures) > MAX_GROUPS:
        raise QueryError(
            f"the query would release {n_groups * len(query.measures)} values, more than the "
            f"limit of {MAX_GROUPS}; group by fewer columns or filter them"
        )
    for m in query.measures:
        if m.statistic is not Statistic.COUNT:  # pragma: no cover - only COUNT exists yet
            raise QueryError(f"statistic {m.statistic.value!r} is not supported by this node")
    return Plan(
        query=query,
        view=view,
        sql=_count_sql(
            query.view,
            query.group_by,
            tuple(m.name for m in query.measures),
            tuple(filters.items()),
        ),
        group_by=query.group_by,
        domain=tuple(itertools.product(*domains)),
        sensitivity=count_sensitivity(query, view),
    )


def count_sensitivity(query: Query, view: ViewSpec) -> float:
    """L2 sensitivity of a grouped distinct-person count under adding or removing one person.

    Each person is counted at most once per group. If every group column is constant per
    person, a person lands in one group; otherwise in at most max_rows_per_person groups.
    Each measure is noised separately with its share of rho, so this is per measure.
    """
    person_level = all(view.column(c).person_level for c in query.group_by)
    groups = 1 if person_level else view.max_rows_per_person
    return mechanisms.histogram_sensitivity(max_groups_per_person=groups)


# Generating SQL with sqlglot takes ~1 ms; the same shapes recur, so remember them.
@functools.lru_cache(maxsize=1024)
def _count_sql(
    view: str,
    group_by: tuple[str, ...],
    measures: tuple[str, ...],
    filters: tuple[tuple[str, tuple[str, ...]], ...],
) -> str:
    select: list[exp.Expr] = [exp.column(c, quoted=True) for c in group_by]
    for name in measures:
        count = exp.Count(this=exp.Distinct(expressions=[exp.column("person_id", quoted=True)]))
        select.append(exp.alias_(count, name, quoted=True))
    stmt = sqlglot.select(*select).from_(exp.to_table(view, quoted=True))
    for column, values in filters:
        stmt = stmt.where(
            exp.column(column, quoted=True).isin(*[exp.Literal.string(v) for v in values])
        )
    if group_by:
        stmt = stmt.group_by(*[exp.column(c, quoted=True) for c in group_by])
    return stmt.sql(dialect="duckdb")
