"""SQL front end: the safe DP subset of SELECT, parsed with sqlglot into a Query.

Accepted:  SELECT <group columns and aggregates> FROM <view>[(<name> => <literal>, ...)]
           [WHERE <public column> = 'v' | IN ('a', 'b') [AND ...]] [GROUP BY <columns>]
Aggregates: COUNT(*), COUNT(DISTINCT person_id), SUM(x), AVG(x), VARIANCE(x), STDDEV(x),
MEDIAN(x), QUANTILE(x, q), HISTOGRAM(x[, bins]), and ratios such as SUM(a) / SUM(b) or
SUM(a) / COUNT(*). Any x may be CLAMP(column, lower, upper). Everything else is refused
with a message that says why and what to write instead; nothing is ever executed as given.
The subset's rules (allow-list, forbidden constructs, arities, nesting, table arguments) are
in sql_rules.py, the FROM clause with its named arguments (rows_per_person on any view, an ad
hoc cohort's definition on the cohort view) in sql_from.py, and printing a Query back as SQL
in sql_print.py.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from queries.errors import QueryError
from queries.spec import Filter, Measure, Query, Statistic, check_identifier
from queries.sql_from import parse_source
from queries.sql_rules import ALLOWED, FORBIDDEN, MAX_NESTING, POPULATION, check_tokens

# Queries longer than this are refused before parsing (a parser is no place for megabytes).
MAX_SQL_CHARS = 20_000


def _position(node: exp.Expr) -> str:
    # sqlglot records where some nodes (columns, identifiers) were parsed.
    meta = node.meta if hasattr(node, "meta") else {}
    line, col = meta.get("line"), meta.get("col")
    if line is None:
        return ""
    return f" (line {line}, column {col})"


def parse_sql(sql: str, *, rho: float) -> Query:
    """Parse one SELECT into a Query charged rho; raises QueryError on anything unsafe."""
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError(
            "the SQL is empty; write e.g. SELECT sex, COUNT(*) FROM persons GROUP BY sex"
        )
    if len(sql) > MAX_SQL_CHARS:
        raise QueryError(f"the SQL is longer than {MAX_SQL_CHARS} characters")
    check_tokens(sql)
    try:
        statements = sqlglot.parse(sql, dialect="duckdb")
    except ParseError as exc:
        err = exc.errors[0] if exc.errors else {}
        where = f" at line {err.get('line')}, column {err.get('col')}" if err else ""
        near = f" near {err.get('highlight')!r}" if err.get("highlight") else ""
        raise QueryError(f"SQL syntax error{where}{near}: {err.get('description', exc)}") from None
    except (TokenError, ValueError) as exc:
        raise QueryError(f"SQL could not be read: {exc}") from None
    except RecursionError:
        raise QueryError(f"the SQL is nested too deeply (at most {MAX_NESTING} levels)") from None
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise QueryError("give exactly one SELECT statement")
    stmt = statements[0]
    if not isinstance(stmt, exp.Select):
        got = stmt.key.upper() if stmt is not None else "nothing"
        raise QueryError(f"expected one SELECT statement; this parses as {got}")
    if any(isinstance(item, exp.Star) for item in stmt.expressions):
        raise QueryError("SELECT * is not allowed: only aggregates over public groups are released")
    for node in stmt.walk():
        for kind, message in FORBIDDEN:
            if isinstance(node, kind) and message:
                raise QueryError(message + _position(node))
        if type(node) in POPULATION:
            raise QueryError(POPULATION[type(node)] + _position(node))
    if stmt.args.get("distinct"):
        raise QueryError("SELECT DISTINCT is not allowed: group by public columns instead")
    source = parse_source(stmt)
    group_by = _group_by(stmt)
    measures: list[Measure] = []
    for item in stmt.expressions:
        alias = item.alias if isinstance(item, exp.Alias) else None
        body = item.unalias()
        if isinstance(body, exp.Column):
            name = _column_name(body)
            if name not in group_by:
                raise QueryError(
                    f"column {name!r} in SELECT must be in GROUP BY or inside an aggregate"
                    + _position(body)
                )
            if alias and alias != name:
                raise QueryError(f"group column {name!r} cannot be renamed")
            continue
        measures.append(_measure(body, alias, len(measures)))
    if not measures:
        raise QueryError("SELECT no aggregate; add e.g. COUNT(*)")
    names = [m.name for m in measures]
    if len(set(names)) != len(names):
        raise QueryError(f"two aggregates have the same name {names}; give them aliases with AS")
    filters = _filters(stmt.args.get("where"))
    # Last, so that the specific messages above come first: anything left that the planner
    # does not implement is refused rather than ignored.
    # The FROM clause's table arguments are literals parse_source has read and checked.
    for node in stmt.walk(prune=lambda n: n is source.arguments):
        if type(node) not in ALLOWED:
            raise QueryError(
                f"{_describe(node)} is not supported: the query would not run as written, so "
                "it is refused (write SELECT, aggregates, FROM one view, WHERE column = 'v' or "
                "IN (...) joined by AND, GROUP BY)" + _position(node)
            )
    return Query(
        view=source.view,
        rho=rho,
        measures=tuple(measures),
        group_by=group_by,
        where=filters,
        rows_per_person=source.rows_per_person,
        cohort=source.cohort,
    )


def _describe(node: exp.Expr) -> str:
    """A short name for a construct in an error message (never the whole query text)."""
    text = node.sql(dialect="duckdb")
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{node.key.upper()} ({text!r})"


def _column_name(col: exp.Column) -> str:
    if col.table:
        raise QueryError(f"qualified column {col.sql()!r}: write the bare column name")
    return check_identifier(col.name.lower(), "column")


def _group_by(stmt: exp.Select) -> tuple[str, ...]:
    group = stmt.args.get("group")
    if group is None:
        return ()
    names = []
    for e in group.expressions:
        if not isinstance(e, exp.Column):
            raise QueryError(f"GROUP BY takes column names, got {e.sql()!r}")
        names.append(_column_name(e))
    return tuple(names)


def _literal_string(e: exp.Expr) -> str:
    if isinstance(e, exp.Literal) and e.is_string:
        return str(e.this)
    if isinstance(e, exp.Literal):
        return str(e.this)
    raise QueryError(
        f"filters compare a column with literal values, got {e.sql()!r}" + _position(e)
    )


def _filters(where: exp.Where | None) -> tuple[Filter, ...]:
    if where is None:
        return ()
    terms: list[exp.Expr] = []

    def split(e: exp.Expr) -> None:
        if isinstance(e, exp.And):
            split(e.this)
            split(e.expression)
        elif isinstance(e, exp.Paren):
            split(e.this)
        else:
            terms.append(e)

    split(where.this)
    out: dict[str, list[str]] = {}
    for t in terms:
        if isinstance(t, exp.EQ) and isinstance(t.this, exp.Column):
            name, values = _column_name(t.this), [_literal_string(t.expression)]
        elif isinstance(t, exp.In) and isinstance(t.this, exp.Column) and not t.args.get("query"):
            name = _column_name(t.this)
            values = [_literal_string(v) for v in t.expressions]
        else:
            raise QueryError(
                f"WHERE supports only `column = 'value'` and `column IN (...)` joined by AND; "
                f"got {t.sql()!r}" + _position(t)
            )
        if name in out:
            raise QueryError(f"column {name!r} is filtered twice; use one IN (...) list")
        out[name] = values
    return tuple(Filter(column=k, values=tuple(v)) for k, v in out.items())


def _number(e: exp.Expr, what: str) -> float:
    if isinstance(e, exp.Neg):
        return -_number(e.this, what)
    if isinstance(e, exp.Literal) and not e.is_string:
        try:
            return float(e.this)
        except ValueError:
            pass
    raise QueryError(f"{what} must be a number, got {e.sql()!r}")


def _argument(e: exp.Expr) -> tuple[str, tuple[float, float] | None]:
    """A column, or CLAMP(column, lower, upper)."""
    if isinstance(e, exp.Column):
        return _column_name(e), None
    if isinstance(e, exp.Anonymous) and e.name.upper() == "CLAMP":
        args = e.expressions
        if len(args) != 3 or not isinstance(args[0], exp.Column):
            raise QueryError("CLAMP takes a column and two numbers: CLAMP(x, lower, upper)")
        bounds = (_number(args[1], "CLAMP lower bound"), _number(args[2], "CLAMP upper bound"))
        return _column_name(args[0]), bounds
    raise QueryError(
        f"aggregate arguments must be a column or CLAMP(column, lower, upper), got {e.sql()!r}"
    )


def _side(e: exp.Expr) -> tuple[str | None, tuple[float, float] | None]:
    """One side of a ratio: SUM(x) or COUNT(*)."""
    if isinstance(e, exp.Count) and isinstance(e.this, exp.Star):
        return None, None
    if isinstance(e, exp.Sum):
        return _argument(e.this)
    raise QueryError(f"a ratio divides SUM(x) or COUNT(*) by SUM(y) or COUNT(*), got {e.sql()!r}")


def _measure(e: exp.Expr, alias: str | None, index: int) -> Measure:
    name = check_identifier(alias.lower(), "alias") if alias else None

    def make(stat: Statistic, default: str, **kw: object) -> Measure:
        return Measure(statistic=stat, name=name or default, **kw)  # type: ignore[arg-type]

    if isinstance(e, exp.Count):
        arg = e.this
        if isinstance(arg, exp.Star):
            return make(Statistic.COUNT_ROWS, "count_rows" if index else "count")
        if isinstance(arg, exp.Distinct):
            cols = arg.expressions
            if (
                len(cols) == 1
                and isinstance(cols[0], exp.Column)
                and _column_name(cols[0]) == "person_id"
            ):
                return make(Statistic.COUNT, "persons")
            raise QueryError("COUNT(DISTINCT ...) is only allowed as COUNT(DISTINCT person_id)")
        raise QueryError("use COUNT(*) or COUNT(DISTINCT person_id)" + _position(e))
    simple: dict[type[exp.Expr], Statistic] = {
        exp.Sum: Statistic.SUM,
        exp.Avg: Statistic.MEAN,
        exp.Variance: Statistic.VARIANCE,
        exp.VariancePop: Statistic.VARIANCE,
        exp.Stddev: Statistic.STDDEV,
        exp.StddevSamp: Statistic.STDDEV,
        exp.StddevPop: Statistic.STDDEV,
    }
    for kind, stat in simple.items():
        if type(e) is kind:
            column, clamp = _argument(e.this)
            return make(stat, f"{stat.value}_{column}", column=column, clamp=clamp)
    if isinstance(e, exp.Median):
        column, clamp = _argument(e.this)
        return make(
            Statistic.QUANTILE, f"median_{column}", column=column, clamp=clamp, quantile=0.5
        )
    if isinstance(e, exp.Quantile | exp.PercentileCont):
        q_expr = e.args.get("quantile") or e.args.get("expression")
        if q_expr is None:
            raise QueryError("QUANTILE takes a column and a level: QUANTILE(x, 0.9)")
        q = _number(q_expr, "quantile level")
        if not 0 < q < 1:
            raise QueryError(
                f"the quantile level must be between 0 and 1 (exclusive), got {q:g}; "
                "e.g. QUANTILE(x, 0.9) for the 90th percentile"
            )
        column, clamp = _argument(e.this)
        label = f"q{round(q * 100):02d}_{column}"
        return make(Statistic.QUANTILE, label, column=column, clamp=clamp, quantile=q)
    if isinstance(e, exp.Anonymous) and e.name.upper() == "HISTOGRAM":
        args = e.expressions
        if not 1 <= len(args) <= 2:
            raise QueryError("HISTOGRAM takes a column and optionally a number of bins")
        column, clamp = _argument(args[0])
        bins = None
        if len(args) == 2:
            value = _number(args[1], "HISTOGRAM bins")
            if not value.is_integer():
                raise QueryError("HISTOGRAM bins must be a whole number")
            bins = int(value)
        return make(
            Statistic.HISTOGRAM, f"histogram_{column}", column=column, clamp=clamp, bins=bins
        )
    if isinstance(e, exp.Div):
        num, num_clamp = _side(e.this)
        den, den_clamp = _side(e.expression)
        if num_clamp is not None or den_clamp is not None:
            raise QueryError("a ratio uses the catalog's bounds; CLAMP is not allowed inside it")
        return make(
            Statistic.RATIO, f"ratio_{num or 'rows'}_{den or 'rows'}", column=num, denominator=den
        )
    raise QueryError(
        f"unsupported expression {e.sql()!r}: use COUNT(*), COUNT(DISTINCT person_id), SUM, "
        "AVG, VARIANCE, STDDEV, MEDIAN, QUANTILE, HISTOGRAM or a ratio of SUM/COUNT" + _position(e)
    )
