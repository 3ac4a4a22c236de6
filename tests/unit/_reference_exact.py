"""The exact path as it was before one-scan plans (issue 16): the reference for equality tests.

A frozen copy of the old `node.engine.exact_values` and of the SQL builders it ran (one
statement for the non-binned components, one more per binned component), kept only so that
tests can check that the one-scan plan gives the very same integers. It reads a plan's public
parts (view, group_by, domain, components, filters, rows per person) and builds its own SQL,
so nothing here depends on how the current planner renders its statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import sqlglot
from sqlglot import exp

from queries.components import Component
from queries.plan import Plan
from queries.sensitivity import Kind


class Runner(Protocol):
    """Anything that runs SQL over the analysis views (node.engine.SqlRunner)."""

    def query(self, sql: str) -> pa.Table:
        """Run one statement and return its result."""
        ...


@dataclass(frozen=True)
class Truncation:
    """Keep at most `cap` rows per person: those with the smallest `rank_column` values."""

    cap: int
    rank_column: str
    person_column: str = "person_id"


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


def _rows(
    select: list[exp.Expr],
    view: str,
    filters: dict[str, tuple[str, ...]],
    truncation: Truncation | None,
) -> exp.Select:
    table = exp.to_table(view, quoted=True)
    if truncation is None:
        return _where(sqlglot.select(*select).from_(table), filters)
    place = exp.Window(
        this=exp.RowNumber(),
        partition_by=[_col(truncation.person_column)],
        order=exp.Order(expressions=[exp.Ordered(this=_col(truncation.rank_column))]),
    )
    kept = _where(sqlglot.select(exp.Star()).from_(table), filters).qualify(
        exp.LTE(this=place, expression=exp.Literal.number(truncation.cap))
    )
    return sqlglot.select(*select).from_(kept.subquery("capped", copy=False))


def scalar_sql(
    view: str,
    group_by: tuple[str, ...],
    components: tuple[Component, ...],
    filters: dict[str, tuple[str, ...]],
    truncation: Truncation | None = None,
) -> str | None:
    """The old statement: one row per group, one column per non-binned component."""
    scalar = [c for c in components if c.kind is not Kind.BINS]
    if not scalar:
        return None
    select: list[exp.Expr] = [_col(c) for c in group_by]
    for c in scalar:
        select.append(exp.alias_(_component_expr(c), c.key, quoted=True))
    stmt = _rows(select, view, filters, truncation)
    if group_by:
        stmt = stmt.group_by(*[_col(c) for c in group_by])
    return stmt.sql(dialect="duckdb")


def binned_sql(
    view: str,
    group_by: tuple[str, ...],
    c: Component,
    filters: dict[str, tuple[str, ...]],
    truncation: Truncation | None = None,
) -> str:
    """The old statement of one binned component: group columns, bin index and count."""
    lo, hi = c.edges[0], c.edges[-1]
    width = (hi - lo) / c.bins
    position = exp.Div(
        this=exp.Paren(this=exp.Sub(this=_clamped(c), expression=_num(lo))),
        expression=_num(width),
    )
    index = exp.func(
        "LEAST", exp.cast(exp.func("FLOOR", position), "BIGINT"), exp.Literal.number(c.bins - 1)
    )
    select: list[exp.Expr] = [_col(g) for g in group_by]
    select += [exp.alias_(index, "bin", quoted=True), exp.alias_(exp.Count(this=exp.Star()), "n")]
    stmt = _rows(select, view, filters, truncation).where(
        exp.Not(this=exp.Is(this=_col(c.column or ""), expression=exp.Null()))
    )
    stmt = stmt.group_by(*[_col(g) for g in group_by], exp.column("bin", quoted=True))
    return stmt.sql(dialect="duckdb")


def _filters(compiled: Plan) -> dict[str, tuple[str, ...]]:
    # As the planner orders them: the declared domain order of each filtered column.
    out: dict[str, tuple[str, ...]] = {}
    for f in compiled.query.where:
        domain = compiled.view.column(f.column).domain
        out[f.column] = tuple(v for v in domain if v in f.values)
    return out


def _truncation(compiled: Plan) -> Truncation | None:
    view = compiled.view
    if compiled.rows_per_person < view.max_rows_per_person and view.rank_column is not None:
        return Truncation(cap=compiled.rows_per_person, rank_column=view.rank_column)
    return None


def _keys(table: pa.Table, group_by: tuple[str, ...]) -> list[tuple[str, ...]]:
    columns = [table.column(c).to_pylist() for c in group_by]
    return [tuple(str(col[i]) for col in columns) for i in range(table.num_rows)]


def exact_values(compiled: Plan, store: Runner) -> dict[str, list[int]]:
    """The old exact path: per component, one integer per group (times bins), on the domain."""
    filters, truncation = _filters(compiled), _truncation(compiled)
    view, group_by = compiled.view.name, compiled.group_by
    index: dict[tuple[str, ...], int] = {group: i for i, group in enumerate(compiled.domain)}
    n = len(compiled.domain)
    values: dict[str, list[int]] = {}
    scalar = [c for c in compiled.components if c.kind is not Kind.BINS]
    sql = scalar_sql(view, group_by, compiled.components, filters, truncation)
    if sql is not None:
        table = store.query(sql)
        keys = _keys(table, group_by)
        for c in scalar:
            out = [0] * n
            for group, v in zip(keys, table.column(c.key).to_pylist(), strict=True):
                i = index.get(group)
                if i is not None and v is not None:
                    out[i] = int(v)
            values[c.key] = out
    for c in compiled.components:
        if c.kind is not Kind.BINS:
            continue
        out = [0] * (n * c.bins)
        table = store.query(binned_sql(view, group_by, c, filters, truncation))
        groups = _keys(table, group_by)
        for group, b, count in zip(
            groups, table.column("bin").to_pylist(), table.column("n").to_pylist(), strict=True
        ):
            i = index.get(group)
            if i is not None and b is not None and 0 <= b < c.bins:
                out[i * c.bins + int(b)] = int(count)
        values[c.key] = out
    return values
