"""The SQL of a plan: DuckDB statements that compute its components exactly.

Statements are built as sqlglot trees, so identifiers and literals are quoted by a printer,
never by string formatting. One statement gives every non-binned component per group, and
one per binned component gives its counts per group and bin. It is separate from the planner
because it only renders components already checked; nothing here can refuse a query.

Under an analyst's lower cap (Truncation) every statement reads the same truncated rows: of
each person's rows that pass the filters, the `cap` first in the view's keep order (its rank
column), so that every component of a query counts the same rows (an AVG's count and sum, a
MEDIAN's histogram) and no person contributes more than `cap` rows to any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from queries.components import Component
from queries.sensitivity import Kind


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


def _rows(
    select: list[exp.Expr],
    view: str,
    filters: dict[str, tuple[str, ...]],
    truncation: Truncation | None,
) -> exp.Select:
    """SELECT `select` FROM the view's filtered rows, truncated per person if asked."""
    table = exp.to_table(view, quoted=True)
    if truncation is None:
        return _where(sqlglot.select(*select).from_(table), filters)
    # WHERE runs before the window, so the cap counts only rows that pass the filters: a
    # person's emergency visits are not crowded out by their other visits.
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
    """One row per group, one column per non-binned component (None if all are binned)."""
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
    """The rows of one binned component: group columns, bin index and count."""
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
    # The null test is outside the truncation, as COUNT(column) is: every component counts
    # the same truncated rows, each its own non-null values.
    stmt = _rows(select, view, filters, truncation).where(
        exp.Not(this=exp.Is(this=_col(c.column or ""), expression=exp.Null()))
    )
    stmt = stmt.group_by(*[_col(g) for g in group_by], exp.column("bin", quoted=True))
    return stmt.sql(dialect="duckdb")
