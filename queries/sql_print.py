"""Printing a Query back as SQL, the inverse of parse_sql for what SQL can express.

The text is only ever parsed back by parse_sql, never executed; the round trip
parse_sql(to_sql(q), rho=q.rho) == q holds for every query it accepts, and a query SQL cannot
spell (weights, quantile grids, clamped ratios) is refused rather than printed differently.
It is separate from the parser because it needs none of the subset's rules; the FROM clause
(a view's table arguments) is printed by sql_from.source_sql, beside its parser.
"""

from __future__ import annotations

from queries.errors import QueryError
from queries.spec import Measure, Query, Statistic
from queries.sql_from import source_sql


def _q(name: str) -> str:
    # Identifiers are checked lower-case names; quoting keeps keywords such as "count" safe.
    return f'"{name}"'


def _arg_sql(column: str, clamp: tuple[float, float] | None) -> str:
    if clamp is None:
        return _q(column)
    return f"CLAMP({_q(column)}, {clamp[0]!r}, {clamp[1]!r})"


def _measure_sql(m: Measure) -> str:
    stat, col = m.statistic, m.column or ""
    if stat is Statistic.COUNT:
        body = "COUNT(DISTINCT person_id)"
    elif stat is Statistic.COUNT_ROWS:
        body = "COUNT(*)"
    elif stat is Statistic.QUANTILE:
        body = f"QUANTILE({_arg_sql(col, m.clamp)}, {m.quantile!r})"
    elif stat is Statistic.HISTOGRAM:
        bins = f", {m.bins}" if m.bins is not None else ""
        body = f"HISTOGRAM({_arg_sql(col, m.clamp)}{bins})"
    elif stat is Statistic.RATIO:
        num = f"SUM({_q(m.column)})" if m.column else "COUNT(*)"
        den = f"SUM({_q(m.denominator)})" if m.denominator else "COUNT(*)"
        body = f"{num} / {den}"
    else:
        func = {
            Statistic.SUM: "SUM",
            Statistic.MEAN: "AVG",
            Statistic.VARIANCE: "VARIANCE",
            Statistic.STDDEV: "STDDEV",
        }[stat]
        body = f"{func}({_arg_sql(col, m.clamp)})"
    return f"{body} AS {_q(m.name)}"


def to_sql(query: Query) -> str:
    """The SQL text of a query (rho travels beside it); parse_sql(to_sql(q), rho=q.rho) == q.

    Measure weights and quantile grids have no SQL spelling; queries using them are
    refused here so that the round trip never silently changes a query.
    """
    for m in query.measures:
        if m.weight != 1.0:
            raise QueryError(f"measure {m.name!r} has a weight, which SQL cannot express")
        if m.statistic is Statistic.QUANTILE and m.bins is not None:
            raise QueryError(f"measure {m.name!r} sets quantile bins, which SQL cannot express")
        if m.statistic is Statistic.RATIO and m.clamp is not None:
            raise QueryError(f"measure {m.name!r} clamps a ratio, which SQL cannot express")
    items = [*(_q(c) for c in query.group_by), *(_measure_sql(m) for m in query.measures)]
    # Never executed: this text is only ever parsed back by parse_sql.
    source = source_sql(query.view, query.rows_per_person, query.cohort)
    sql = f"SELECT {', '.join(items)} FROM {source}"  # noqa: S608
    if query.where:
        terms = []
        for f in query.where:
            values = ", ".join("'" + v.replace("'", "''") + "'" for v in f.values)
            terms.append(f"{_q(f.column)} IN ({values})")
        sql += " WHERE " + " AND ".join(terms)
    if query.group_by:
        sql += " GROUP BY " + ", ".join(_q(c) for c in query.group_by)
    return sql
