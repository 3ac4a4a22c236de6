"""The SQL of a plan: one DuckDB statement, one scan, that computes all its components exactly.

Statements are built as sqlglot trees, so identifiers and literals are quoted by a printer,
never by string formatting. It is separate from the planner because it only renders
components already checked; nothing here can refuse a query.

One scan (Scan): the view's rows are read once, and one aggregate groups them by the query's
groups and, for each binned component, by its bin as well (GROUPING SETS when there are
several). Counts, sums and sums of squares add up across bins, so they are read from the
first binned grouping and summed over its bins (the null bin included) by the engine; a
count of distinct persons does not (one person's rows fall in several bins), so a plan that
has one also groups by the groups alone, and every non-binned component is read there. The
expressions are the ones the planner used to run as one statement per binned component plus
one for the rest, so the integers are the same (tests/unit/test_one_scan.py checks it).

Under an analyst's lower cap (Truncation) the one scan reads the truncated rows: of each
person's rows that pass the filters, the `cap` first in the view's keep order (its rank
column), so that every component of a query counts the same rows (an AVG's count and sum, a
MEDIAN's histogram) and no person contributes more than `cap` rows to any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _component_expr(c: Component, weight: str | None = None) -> exp.Expr:
    """The aggregate of one non-binned component over rows, or over rows already counted
    by value (`weight` names the count column: see scan)."""
    if c.kind is Kind.PERSONS:
        return exp.Count(this=exp.Distinct(expressions=[_col("person_id")]))
    if c.kind is Kind.ROWS:
        if weight is None:
            return exp.Count(this=_col(c.column) if c.column else exp.Star())
        if c.column is None:
            return exp.Sum(this=_col(weight))
        # COUNT(column) counts the rows whose value is not NULL.
        missing = exp.Is(this=_col(c.column), expression=exp.Null())
        return exp.Sum(this=exp.If(this=missing, true=exp.Literal.number(0), false=_col(weight)))
    value = _clamped(c)
    if c.kind is Kind.SUMSQ:
        value = exp.Mul(this=value, expression=value.copy())
    scaled = exp.Div(this=value, expression=_num(10.0**c.exponent))
    rounded = exp.cast(exp.func("ROUND", exp.Paren(this=scaled)), "BIGINT")
    # Each row's rounded value, times the rows that hold it: the same integer sum.
    if weight is None:
        return exp.Sum(this=rounded)
    return exp.Sum(this=exp.Mul(this=_col(weight), expression=rounded))


def _where(stmt: exp.Select, filters: dict[str, tuple[str, ...]]) -> exp.Select:
    for column, values in filters.items():
        stmt = stmt.where(_col(column).isin(*[exp.Literal.string(v) for v in values]))
    return stmt


def _rows(
    select: list[exp.Expr],
    view: str,
    filters: dict[str, tuple[str, ...]],
    truncation: Truncation | None,
    *,
    extra: list[exp.Expr] | None = None,
) -> exp.Select:
    """SELECT `select` FROM the view's filtered rows, truncated per person if asked, with
    the `extra` columns computed on each row."""
    table = exp.to_table(view, quoted=True)
    if truncation is None:
        if not extra:
            return _where(sqlglot.select(*select).from_(table), filters)
        source = _where(sqlglot.select(exp.Star(), *extra).from_(table), filters)
        return sqlglot.select(*select).from_(source.subquery("filtered", copy=False))
    # WHERE runs before the window, so the cap counts only rows that pass the filters: a
    # person's emergency visits are not crowded out by their other visits.
    place = exp.Window(
        this=exp.RowNumber(),
        partition_by=[_col(truncation.person_column)],
        order=exp.Order(expressions=[exp.Ordered(this=_col(truncation.rank_column))]),
    )
    kept = _where(sqlglot.select(exp.Star(), *(extra or [])).from_(table), filters).qualify(
        exp.LTE(this=place, expression=exp.Literal.number(truncation.cap))
    )
    return sqlglot.select(*select).from_(kept.subquery("capped", copy=False))


# Names of the scan's own result columns: '#' is in no view column or component key.
COUNT_COLUMN = "#n"  # rows per group and bin, in a binned grouping
SET_COLUMN = "#set"  # GROUPING() of the bin columns, when there are several grouping sets
_WEIGHT = "#w"  # rows per group and value, when the rows are counted by value first


def bin_column(i: int) -> str:
    """The result column holding the bin index of the plan's i-th binned component."""
    return f"#bin{i}"


@dataclass(frozen=True)
class Scan:
    """The one statement computing every component of a plan, and where to read each."""

    sql: str
    binned: tuple[str, ...]  # keys of the binned components; the i-th bins by bin_column(i)
    # Where the non-binned components are: True if in a grouping by the groups alone (one row
    # per group); False if summed over the bins of the first binned grouping.
    totals: bool
    # GROUPING() value of each grouping set (binned ones in order, then the totals one) when
    # the statement has several, in SET_COLUMN; empty when it has one.
    sets: tuple[int, ...] = field(default=())

    def set_of(self, i: int | None) -> int | None:
        """The SET_COLUMN value of the i-th binned grouping (None: the totals), or None if the
        statement has a single grouping."""
        if not self.sets:
            return None
        return self.sets[len(self.binned) if i is None else i]


def _bin_index(c: Component) -> exp.Expr:
    """The bin of a row's value, NULL if the value is NULL (such rows are in no bin)."""
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
    # LEAST skips NULLs, so a NULL value would land in the last bin: keep it out of every bin.
    missing = exp.Is(this=_col(c.column or ""), expression=exp.Null())
    return exp.If(this=missing, true=exp.Null(), false=index)


def _counted_column(components: tuple[Component, ...], whole: frozenset[str]) -> str | None:
    """The column to count the rows by first, if the plan reads just one whole-number one.

    Every component but a count of distinct persons is then a function of the row's value
    of that column, summed over rows: counting the rows per (group, value) first and then
    summing count * f(value) over the few distinct values gives the same integers, and the
    clamps, roundings and bin indexes run once per distinct value instead of once per row.
    Whole-number columns have few distinct values (ages, lengths of stay); a float column
    could have one per row, so it is not counted first. The declared type only decides
    speed: the integers are the same whatever the values are.
    """
    if any(c.kind is Kind.PERSONS for c in components):
        return None  # distinct persons do not add up over values
    columns = {c.column for c in components if c.column is not None}
    if len(columns) != 1:
        return None
    (column,) = columns
    return column if column in whole else None


def scan(
    view: str,
    group_by: tuple[str, ...],
    components: tuple[Component, ...],
    filters: dict[str, tuple[str, ...]],
    truncation: Truncation | None = None,
    *,
    whole: frozenset[str] = frozenset(),
) -> Scan:
    """The one statement that computes every component of a plan, in one pass over the rows.

    Its rows: the group columns, a bin column per binned component (bin_column(i)), the row
    count COUNT_COLUMN if anything is binned, one column per non-binned component (named by
    its key) and, with several grouping sets, SET_COLUMN telling them apart. `whole` names
    the view's whole-number columns, which may be counted by value first (_counted_column).
    """
    binned = [c for c in components if c.kind is Kind.BINS]
    scalar = [c for c in components if c.kind is not Kind.BINS]
    counted = _counted_column(components, whole)
    weight = None if counted is None else _WEIGHT
    totals = not binned or any(c.kind is Kind.PERSONS for c in scalar)
    groups = [_col(g) for g in group_by]
    bins = [_col(bin_column(i)) for i in range(len(binned))]
    select: list[exp.Expr] = [_col(g) for g in group_by]
    select += [_col(bin_column(i)) for i in range(len(binned))]
    if binned:
        rows = exp.Count(this=exp.Star()) if weight is None else exp.Sum(this=_col(weight))
        select.append(exp.alias_(rows, COUNT_COLUMN, quoted=True))
    for c in scalar:
        select.append(exp.alias_(_component_expr(c, weight), c.key, quoted=True))
    # The bins are computed in the row source, so that every grouping set names them.
    extra = [exp.alias_(_bin_index(c), bin_column(i), quoted=True) for i, c in enumerate(binned)]
    if counted is None:
        stmt = _rows(select, view, filters, truncation, extra=extra)
    else:
        by_value = [*[_col(g) for g in group_by], _col(counted)]
        inner = _rows(
            [*by_value, exp.alias_(exp.Count(this=exp.Star()), _WEIGHT, quoted=True)],
            view,
            filters,
            truncation,
        ).group_by(*[e.copy() for e in by_value])
        source = sqlglot.select(exp.Star(), *extra).from_(inner.subquery("counted", copy=False))
        stmt = sqlglot.select(*select).from_(source.subquery("filtered", copy=False))
    grouping_sets: list[list[exp.Expr]] = [[*groups, b] for b in bins]
    if totals:
        grouping_sets.append(list(groups))
    sets: tuple[int, ...] = ()
    if len(grouping_sets) > 1:
        # GROUPING(b0, ..., bk-1) has a bit per bin column, the first the highest, set where the
        # column is rolled up: the i-th binned grouping rolls up every bin column but its own.
        full = (1 << len(bins)) - 1
        sets = tuple(full ^ (1 << (len(bins) - 1 - i)) for i in range(len(bins)))
        if totals:
            sets += (full,)
        stmt = stmt.select(
            exp.alias_(exp.func("GROUPING", *[b.copy() for b in bins]), SET_COLUMN, quoted=True)
        )
        stmt = stmt.group_by(
            exp.GroupingSets(expressions=[exp.Tuple(expressions=s) for s in grouping_sets])
        )
    elif grouping_sets and grouping_sets[0]:
        stmt = stmt.group_by(*grouping_sets[0])
    return Scan(
        sql=stmt.sql(dialect="duckdb"),
        binned=tuple(c.key for c in binned),
        totals=totals,
        sets=sets,
    )
