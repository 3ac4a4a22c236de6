"""The rules of the SQL subset: which constructs are allowed, refused, and how many arguments.

Parsing alone is not a safe boundary: sqlglot accepts far more than the planner implements,
silently drops extra arguments of some functions, and recurses on every parenthesis. So the
subset is written down here as data (an allow-list of node types, forbidden constructs with
the message to show, function arities), and the nesting and arities are checked on the
tokens before the parser runs. It is separate from the translation in sql.py, which walks a
statement these rules have already let through.
"""

from __future__ import annotations

import enum

from sqlglot import exp
from sqlglot.errors import TokenError
from sqlglot.tokenizer_core import TokenType
from sqlglot.tokens import Tokenizer

from queries.errors import QueryError

# Deeper nesting of parentheses than this is refused before parsing: no query of the subset
# needs more than a few levels, and the parser recurses on each one.
MAX_NESTING = 20

# Everything the planner implements, node type by node type. Anything else in the parsed
# statement (TABLESAMPLE, QUALIFY, casts, other functions...) is refused, never ignored.
ALLOWED: frozenset[type[exp.Expr]] = frozenset(
    {
        exp.Select,
        exp.From,
        exp.Table,
        exp.Identifier,
        exp.Column,
        exp.Alias,
        exp.Count,
        exp.Distinct,
        exp.Star,
        exp.Sum,
        exp.Avg,
        exp.Variance,
        exp.Stddev,
        exp.StddevSamp,
        exp.Median,
        exp.Quantile,
        exp.PercentileCont,
        exp.Anonymous,
        exp.Div,
        exp.Literal,
        exp.Neg,
        exp.Where,
        exp.And,
        exp.EQ,
        exp.In,
        exp.Paren,
        exp.Group,
    }
)
# Population variance and SD would be silently computed as the sample ones.
POPULATION: dict[type[exp.Expr], str] = {
    exp.VariancePop: "VAR_POP is not supported: use VARIANCE (the sample variance)",
    exp.StddevPop: "STDDEV_POP is not supported: use STDDEV (the sample standard deviation)",
}
# How many arguments each function of the subset takes. The parser drops extra arguments of
# some functions (QUANTILE(x, 0.5, 0.9) parses as QUANTILE(x, 0.5)), so they are counted on
# the tokens before parsing.
ARITY: dict[str, tuple[int, int]] = {
    "COUNT": (1, 1),
    "SUM": (1, 1),
    "AVG": (1, 1),
    "VARIANCE": (1, 1),
    "VAR_SAMP": (1, 1),
    "STDDEV": (1, 1),
    "STDDEV_SAMP": (1, 1),
    "MEDIAN": (1, 1),
    "QUANTILE": (2, 2),
    "QUANTILE_CONT": (2, 2),
    "PERCENTILE_CONT": (2, 2),
    "HISTOGRAM": (1, 2),
    "CLAMP": (3, 3),
}


class ArgumentKind(enum.Enum):
    """The literal a named table argument takes (sql_from.py reads it)."""

    INTEGER = "a whole number"
    INTEGERS = "a list of whole numbers"
    BOOLEAN = "true or false"
    STRING = "a quoted string"


# Named arguments of a view in FROM, e.g. visits(rows_per_person => 3) or cohort(conditions
# => [40481087]): the ones any view takes, and the cohort definition's (queries/cohort.py).
ANY_VIEW_ARGUMENTS: dict[str, ArgumentKind] = {"rows_per_person": ArgumentKind.INTEGER}
TABLE_ARGUMENTS: dict[str, ArgumentKind] = {
    **ANY_VIEW_ARGUMENTS,
    "conditions": ArgumentKind.INTEGERS,
    "descendants": ArgumentKind.BOOLEAN,
    "entry": ArgumentKind.STRING,
    "age_min": ArgumentKind.INTEGER,
    "age_max": ArgumentKind.INTEGER,
    "window_days": ArgumentKind.INTEGER,
}

FORBIDDEN: tuple[tuple[type[exp.Expr], str], ...] = (
    (exp.Join, "joins are not allowed: query one view at a time"),
    (exp.Subquery, "subqueries are not allowed: query one view directly"),
    (exp.Window, "window functions are not allowed"),
    (exp.With, "WITH (common table expressions) is not allowed"),
    (exp.Union, "UNION is not allowed: run separate queries"),
    (exp.Having, "HAVING is not allowed: filter on public columns in WHERE"),
    (exp.Order, "ORDER BY is not allowed: results come in the public order of the groups"),
    (exp.Limit, "LIMIT is not allowed: every public group is released"),
    (exp.Star, ""),  # allowed only inside COUNT(*), checked in sql.py
)


def check_tokens(sql: str) -> None:
    """Refuse deep nesting and wrong argument counts before the parser sees the text."""
    try:
        tokens = Tokenizer(dialect="duckdb").tokenize(sql)
    except (TokenError, ValueError) as exc:
        raise QueryError(f"SQL could not be read: {exc}") from None
    depth = 0
    # For each open parenthesis: the function it belongs to (or None) and its comma count.
    stack: list[tuple[str | None, int]] = []
    for i, tok in enumerate(tokens):
        if tok.token_type is TokenType.L_PAREN:
            depth += 1
            if depth > MAX_NESTING:
                raise QueryError(f"the SQL is nested too deeply (at most {MAX_NESTING} levels)")
            prev = tokens[i - 1].text.upper() if i > 0 else ""
            stack.append((prev if prev in ARITY else None, 0))
        elif tok.token_type is TokenType.COMMA and stack:
            func, commas = stack[-1]
            stack[-1] = (func, commas + 1)
        elif tok.token_type is TokenType.R_PAREN and stack:
            depth -= 1
            func, commas = stack.pop()
            empty = i > 0 and tokens[i - 1].token_type is TokenType.L_PAREN
            args = 0 if empty else commas + 1
            if func is not None:
                low, high = ARITY[func]
                if not low <= args <= high:
                    want = str(low) if low == high else f"{low} or {high}"
                    raise QueryError(
                        f"{func} takes {want} argument(s), got {args} (line {tok.line})"
                    )
