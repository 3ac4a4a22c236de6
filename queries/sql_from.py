"""The FROM clause of the SQL subset: one view, optionally with named table arguments.

    FROM persons
    FROM visits(rows_per_person => 3)
    FROM cohort(conditions => [40481087], descendants => true, age_min => 18)

sqlglot parses `name(arg => value, ...)` in FROM as a table-valued function (a Table around
an Anonymous of Kwargs; `:=` gives PropertyEQs). The arguments are read generically here, by
the kind of value each name takes (TABLE_ARGUMENTS in sql_rules.py), then given to the query
field they spell: `rows_per_person` on any view, the cohort definition's keys on the
reserved cohort view only. Values must be literals; nothing here is ever executed.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from queries.cohort import COHORT_KEYS, COHORT_VIEW, Cohort, cohort_from_dict
from queries.errors import QueryError
from queries.spec import check_identifier
from queries.sql_rules import ANY_VIEW_ARGUMENTS, TABLE_ARGUMENTS, ArgumentKind


@dataclass(frozen=True)
class Source:
    """What the FROM clause names: the view and the query fields its arguments set."""

    view: str
    rows_per_person: int | None = None
    cohort: Cohort | None = None
    # The table-function node, whose literal arguments the caller's allow-list skips.
    arguments: exp.Expr | None = None


def _text(e: exp.Expr) -> str:
    text = e.sql(dialect="duckdb")
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(e: exp.Expr, what: str) -> int:
    if isinstance(e, exp.Neg):
        return -_integer(e.this, what)
    digits = str(e.this) if isinstance(e, exp.Literal) and not e.is_string else ""
    # At most 19 digits: the largest id is a BIGINT, and int() of a huge literal is slow.
    if digits.isdigit() and len(digits) <= 19:
        return int(digits)
    raise QueryError(f"{what} takes a whole number, got {_text(e)!r}")


def _value(name: str, e: exp.Expr, kind: ArgumentKind) -> object:
    """The Python value of one literal argument of the kind its name takes."""
    what = f"table argument {name!r}"
    if kind is ArgumentKind.INTEGER:
        return _integer(e, what)
    if kind is ArgumentKind.BOOLEAN:
        if isinstance(e, exp.Boolean):
            return bool(e.this)
        raise QueryError(f"{what} takes true or false, got {_text(e)!r}")
    if kind is ArgumentKind.STRING:
        if isinstance(e, exp.Literal) and e.is_string:
            return str(e.this)
        raise QueryError(f"{what} takes a quoted string such as 'condition', got {_text(e)!r}")
    if not isinstance(e, exp.Array):
        raise QueryError(f"{what} takes a list of whole numbers in brackets, e.g. [40481087]")
    return [_integer(item, f"{what} (a list of whole numbers)") for item in e.expressions]


def _arguments(function: exp.Anonymous) -> dict[str, object]:
    """name => value for every argument of a table function, checked generically."""
    values: dict[str, object] = {}
    for arg in function.expressions:
        if isinstance(arg, exp.Kwarg | exp.PropertyEQ) and isinstance(
            arg.this, exp.Var | exp.Identifier
        ):
            name = str(arg.this.name).lower()
        else:
            raise QueryError(
                f"table arguments are named: write e.g. {COHORT_VIEW}(conditions => [40481087])"
                f" or visits(rows_per_person => 3), got {_text(arg)!r}"
            )
        kind = TABLE_ARGUMENTS.get(name)
        if kind is None:
            raise QueryError(f"unknown table argument {name!r}; known: {sorted(TABLE_ARGUMENTS)}")
        if name in values:
            raise QueryError(f"table argument {name!r} is given twice")
        values[name] = _value(name, arg.expression, kind)
    return values


def parse_source(stmt: exp.Select) -> Source:
    """The view a SELECT reads and the fields its table arguments set."""
    source = stmt.args.get("from") or stmt.args.get("from_")
    if source is None:
        raise QueryError("the query has no FROM; name the view, e.g. FROM persons")
    table = source.this
    if not isinstance(table, exp.Table) or table.args.get("db") or table.args.get("catalog"):
        raise QueryError("FROM must name one view of the node's catalog (no schemas)")
    if isinstance(table.this, exp.Identifier):
        return Source(view=check_identifier(table.name.lower(), "view"))
    function = table.this
    if not isinstance(function, exp.Anonymous):
        raise QueryError(
            "FROM must name one view of the node's catalog, optionally with named arguments "
            "such as visits(rows_per_person => 3)"
        )
    view = check_identifier(str(function.name).lower(), "view")
    values = _arguments(function)
    cohort_keys = {k: v for k, v in values.items() if k in COHORT_KEYS}
    if view != COHORT_VIEW and cohort_keys:
        raise QueryError(
            f"{sorted(cohort_keys)} define an ad hoc cohort: write FROM {COHORT_VIEW}(...); "
            f"view {view!r} takes only {sorted(ANY_VIEW_ARGUMENTS)}"
        )
    rows = values.get("rows_per_person")
    return Source(
        view=view,
        rows_per_person=rows if isinstance(rows, int) else None,
        cohort=cohort_from_dict(cohort_keys) if view == COHORT_VIEW else None,
        arguments=function,
    )


def source_sql(view: str, rows_per_person: int | None, cohort: Cohort | None) -> str:
    """The FROM text of a view and its arguments, which parse_source reads back."""
    args: list[str] = []
    if cohort is not None:
        for key, value in cohort.non_defaults().items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list):
                text = "[" + ", ".join(str(int(v)) for v in value) + "]"
            elif isinstance(value, str):
                text = "'" + value.replace("'", "''") + "'"
            else:
                text = str(int(value))
            args.append(f"{key} => {text}")
    if rows_per_person is not None:
        args.append(f"rows_per_person => {int(rows_per_person)}")
    # The cohort view's name is fixed and no keyword, so it reads best bare; other names are
    # quoted as everywhere else (a pathway may be called "order").
    name = COHORT_VIEW if view == COHORT_VIEW else f'"{view}"'
    return f"{name}({', '.join(args)})" if args else name
