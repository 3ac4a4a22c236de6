"""The SQL of a model fit's steps: DuckDB statements over one view, built as sqlglot trees.

Each statement returns one row of exact integer sums, one column per released entry that can
be other than 0 (an entry that is 0 on every row, such as the pair of two levels of one
category or another node's region indicator, is not computed: `entry_columns` says which
entries are released as an exact 0). The rows are the view's rows that pass the model's
filters and have every column of the model (complete cases); each row's design entries are in
[0, 1] (queries/model.py), and every per-row value is rounded to whole fixed-point units
before it is summed, so the sums are exact and no row adds more than the plan's bound.
A compare_by model's unit sums are taken per level of the compared column; that column is not
a model column, so a row without it is still fitted and counts at no level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sqlglot
from sqlglot import exp

from queries.model import Family
from queries.model_plan import (
    ETA_LIMIT,
    HOLDOUT_MODULUS,
    LOSS_CAP,
    SCORE_BINS,
    ModelPlan,
    StepPlan,
    Term,
)


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _num(value: float) -> exp.Expr:
    literal = exp.Literal.number(repr(float(value)))
    return (
        exp.Paren(this=exp.Neg(this=exp.Literal.number(repr(-float(value)))))
        if value < 0
        else literal
    )


def _clamp(name: str, lo: float, hi: float) -> exp.Expr:
    value = exp.cast(_col(name), "DOUBLE")
    return exp.func("LEAST", exp.func("GREATEST", value, _num(lo)), _num(hi))


def _indicator(column: str, level: str) -> exp.Expr:
    test = exp.EQ(this=_col(column), expression=exp.Literal.string(level))
    return exp.Case(ifs=[exp.If(this=test, true=_num(1.0))], default=_num(0.0))


def _term(t: Term) -> exp.Expr:
    if t.constant is not None:
        return _num(t.constant)
    if t.kind == "level":
        return _indicator(t.column or "", t.level or "")
    scaled = exp.Sub(this=_clamp(t.column or "", t.lower, t.upper), expression=_num(t.lower))
    return exp.Div(this=exp.Paren(this=scaled), expression=_num(t.upper - t.lower))


def _x(j: int) -> str:
    return f"x{j}"


def _held_out(plan: ModelPlan) -> exp.Expr:
    """Whether a row's person is held out: md5 of the identifier, modulo HOLDOUT_MODULUS.

    md5 (not DuckDB's hash) so the split is the same at every node and in every version.
    """
    text = exp.cast(_col(plan.split_column or ""), "VARCHAR")
    number = exp.func("md5_number", text)
    return exp.EQ(
        this=exp.Mod(this=number, expression=exp.Literal.number(HOLDOUT_MODULUS)),
        expression=exp.Literal.number(0),
    )


def _rows(plan: ModelPlan, part: str = "all") -> exp.Select:
    """x0..x{p-1}, y and (with an offset) the log offset t, per complete row of the part."""
    select: list[exp.Expr] = [
        exp.alias_(_term(t), _x(j), quoted=True) for j, t in enumerate(plan.terms)
    ]
    out = plan.outcome
    if out.event is not None:
        y = _indicator(out.column, out.event)
    else:
        y = _clamp(out.column, out.lower, out.upper)
    select.append(exp.alias_(y, "y", quoted=True))
    if plan.model.compare_by is not None:
        select.append(exp.alias_(_col(plan.model.compare_by), "unit", quoted=True))
    if plan.model.hidden and plan.split_column is not None:
        # A network's gradients are clipped per person: its rows carry the person.
        select.append(exp.alias_(_col(plan.split_column), "pid", quoted=True))
    needed = {out.column, *(t.column for t in plan.terms if t.column is not None)}
    if plan.offset is not None:
        name, lo, hi = plan.offset
        select.append(exp.alias_(exp.func("LN", _clamp(name, lo, hi)), "t", quoted=True))
        needed.add(name)
    stmt = sqlglot.select(*select).from_(exp.to_table(plan.view.name, quoted=True))
    for column, values in plan.filters:
        stmt = stmt.where(_col(column).isin(*[exp.Literal.string(v) for v in values]))
    for name in sorted(needed):
        stmt = stmt.where(exp.Not(this=exp.Is(this=_col(name), expression=exp.Null())))
    if part == "train":
        stmt = stmt.where(exp.Not(this=exp.Paren(this=_held_out(plan))))
    elif part == "holdout":
        stmt = stmt.where(_held_out(plan))
    return stmt


def _fixed(value: exp.Expr, exponent: int) -> exp.Expr:
    """SUM of the value rounded to whole units of 10**exponent (half away from zero)."""
    scaled = exp.Div(this=exp.Paren(this=value), expression=_num(10.0**exponent))
    return exp.Sum(this=exp.cast(exp.func("ROUND", scaled), "BIGINT"))


def _zero_pair(a: Term, b: Term) -> bool:
    """True if x_a * x_b is 0 on every row."""
    if a.constant == 0.0 or b.constant == 0.0:
        return True
    return a is not b and a.kind == b.kind == "level" and a.column == b.column


def triangle(p: int) -> list[tuple[int, int]]:
    """The (j, k), j <= k, of a p x p upper triangle, row-major."""
    return [(j, k) for j in range(p) for k in range(j, p)]


def entry_columns(plan: ModelPlan, step: StepPlan) -> dict[str, list[str | None]]:
    """Per vector, the SQL column of each entry, or None where the entry is 0 on every row."""
    terms = plan.terms
    p = len(terms)
    out: dict[str, list[str | None]] = {}
    for v in step.vectors:
        if v.name == "counts":
            levels = [j for j, t in enumerate(terms) if t.kind == "level"]
            out[v.name] = ["n", *(f"c{j}" for j in levels)]
        elif v.name in ("unit_outcome", "unit_residual"):
            letter = "u" if v.name == "unit_outcome" else "r"
            out[v.name] = [f"{letter}{i}" for i in range(v.length)]
        elif v.name == "score_hist":
            out[v.name] = [f"s{i}" for i in range(v.length)]
        elif v.name in ("outcome_sum", "yty", "n", "loss"):
            out[v.name] = [v.name]
        elif v.name in ("gradient", "xty"):
            out[v.name] = [None if terms[j].constant == 0.0 else f"g{j}" for j in range(p)]
        else:  # hessian, xtx
            out[v.name] = [
                None if _zero_pair(terms[j], terms[k]) else f"h{j}_{k}" for j, k in triangle(p)
            ]
    return out


def design_sql(plan: ModelPlan) -> str:
    """Step 0: n, each level's count and the outcome's sum."""
    step = plan.step(0)
    rows = _rows(plan, plan.part(0)).subquery("r", copy=False)
    select: list[exp.Expr] = [exp.alias_(exp.Count(this=exp.Star()), "n", quoted=True)]
    for j, t in enumerate(plan.terms):
        if t.kind == "level":
            count = exp.Sum(this=exp.cast(_col(_x(j)), "BIGINT"))
            select.append(exp.alias_(count, f"c{j}", quoted=True))
    outcome = step.vector("outcome_sum")
    total = (
        exp.Sum(this=exp.cast(_col("y"), "BIGINT"))
        if plan.family is Family.BINOMIAL
        else _fixed(_col("y"), outcome.exponent)
    )
    select.append(exp.alias_(total, "outcome_sum", quoted=True))
    if plan.units:
        binomial = plan.family is Family.BINOMIAL
        select += _per_unit(plan, step.vector("unit_outcome").exponent, _col("y"), "u", binomial)
    return sqlglot.select(*select).from_(rows).sql(dialect="duckdb")


def _per_unit(
    plan: ModelPlan, exponent: int, value: exp.Expr, letter: str, whole: bool
) -> list[exp.Expr]:
    """SUM of the value over the rows at each level of the compared column."""
    out: list[exp.Expr] = []
    for i, level in enumerate(plan.units):
        test = exp.EQ(this=_col("unit"), expression=exp.Literal.string(level))
        at = exp.Case(ifs=[exp.If(this=test, true=value.copy())], default=_num(0.0))
        total = exp.Sum(this=exp.cast(at, "BIGINT")) if whole else _fixed(at, exponent)
        out.append(exp.alias_(total, f"{letter}{i}", quoted=True))
    return out


def _products(
    plan: ModelPlan, step: StepPlan, first: str, second: str, weight: exp.Expr, residual: exp.Expr
) -> list[exp.Expr]:
    """The gradient-like (x_j r) and Hessian-like (w x_j x_k) sums of a step."""
    columns = entry_columns(plan, step)
    select: list[exp.Expr] = []
    g_unit, h_unit = step.vector(first).exponent, step.vector(second).exponent
    for j, name in enumerate(columns[first]):
        if name is not None:
            value = exp.Mul(this=_col(_x(j)), expression=residual.copy())
            select.append(exp.alias_(_fixed(value, g_unit), name, quoted=True))
    for (j, k), name in zip(triangle(len(plan.terms)), columns[second], strict=True):
        if name is not None:
            xx = exp.Mul(this=_col(_x(j)), expression=_col(_x(k)))
            value = exp.Mul(this=weight.copy(), expression=xx)
            select.append(exp.alias_(_fixed(value, h_unit), name, quoted=True))
    return select


def _eta(plan: ModelPlan, coefficients: Sequence[float]) -> exp.Expr:
    """x'b (+ the log offset), from checked coefficients."""
    if len(coefficients) != len(plan.terms) or not all(math.isfinite(b) for b in coefficients):
        raise ValueError("step SQL takes checked coefficients (model_plan.check_coefficients)")
    eta: exp.Expr = _num(0.0)
    for j, b in enumerate(coefficients):
        if b != 0.0:
            eta = exp.Add(this=eta, expression=exp.Mul(this=_num(b), expression=_col(_x(j))))
    if plan.offset is not None:
        eta = exp.Add(this=eta, expression=_col("t"))
    return eta


def _mu_rows(plan: ModelPlan, coefficients: Sequence[float], part: str = "all") -> exp.Select:
    """Each complete row's x, y (and unit) with mu, the inverse link at the coefficients."""
    eta = _eta(plan, coefficients)
    if plan.family is Family.BINOMIAL:
        bounded = exp.func("LEAST", exp.func("GREATEST", eta, _num(-ETA_LIMIT)), _num(ETA_LIMIT))
        mu: exp.Expr = exp.Div(
            this=_num(1.0),
            expression=exp.Paren(
                this=exp.Add(this=_num(1.0), expression=exp.func("EXP", exp.Neg(this=bounded)))
            ),
        )
    else:
        # Capped at the public mu_max (the outcome's upper bound), which bounds the weights.
        mu = exp.func("EXP", exp.func("LEAST", eta, _num(math.log(plan.mu_max))))
    kept: list[exp.Expr] = [_col(_x(j)) for j in range(len(plan.terms))]
    kept.append(_col("y"))
    if plan.units:
        kept.append(_col("unit"))
    return sqlglot.select(*kept, exp.alias_(mu, "mu", quoted=True)).from_(
        _rows(plan, part).subquery("r", copy=False)
    )


def _residual() -> exp.Expr:
    return exp.Paren(this=exp.Sub(this=_col("y"), expression=_col("mu")))


def newton_sql(plan: ModelPlan, step: int, coefficients: Sequence[float]) -> str:
    """A Newton step at the hub's coefficients: the gradient and the Hessian's triangle."""
    s = plan.step(step)
    inner = _mu_rows(plan, coefficients)
    if plan.family is Family.BINOMIAL:
        one_minus = exp.Paren(this=exp.Sub(this=_num(1.0), expression=_col("mu")))
        weight: exp.Expr = exp.Mul(this=_col("mu"), expression=one_minus)
    else:
        weight = _col("mu")
    select = _products(plan, s, "gradient", "hessian", weight, _residual())
    return sqlglot.select(*select).from_(inner.subquery("m", copy=False)).sql(dialect="duckdb")


def round_sql(plan: ModelPlan, step: int, coefficients: Sequence[float]) -> str:
    """A gradient-descent round on the training rows: the gradient and the capped loss."""
    s = plan.step(step)
    inner = _mu_rows(plan, coefficients, "train")
    select: list[exp.Expr] = []
    exponent = s.vector("gradient").exponent
    for j, name in enumerate(entry_columns(plan, s)["gradient"]):
        if name is not None:
            value = exp.Mul(this=_col(_x(j)), expression=_residual())
            select.append(exp.alias_(_fixed(value, exponent), name, quoted=True))
    # -(y ln mu + (1 - y) ln(1 - mu)), mu within 1e-13 of 0 or 1 at most (eta is clamped).
    one_minus = exp.Paren(this=exp.Sub(this=_num(1.0), expression=_col("mu")))
    log_lik = exp.Add(
        this=exp.Mul(this=_col("y"), expression=exp.func("LN", _col("mu"))),
        expression=exp.Mul(
            this=exp.Paren(this=exp.Sub(this=_num(1.0), expression=_col("y"))),
            expression=exp.func("LN", one_minus),
        ),
    )
    loss = exp.func("LEAST", exp.Neg(this=exp.Paren(this=log_lik)), _num(LOSS_CAP))
    select.append(exp.alias_(_fixed(loss, s.vector("loss").exponent), "loss", quoted=True))
    return sqlglot.select(*select).from_(inner.subquery("m", copy=False)).sql(dialect="duckdb")


def network_rows_sql(plan: ModelPlan, step: int) -> str:
    """A network's step reads its part's rows (person, x, y); the node computes in numpy."""
    return _rows(plan, plan.part(step)).sql(dialect="duckdb")


def score_bin(eta: exp.Expr, low: float, high: float) -> exp.Expr:
    """The histogram bin of eta: SCORE_BINS equal bins over [low, high], the ends closed."""
    width = (high - low) / SCORE_BINS
    raw = exp.func(
        "FLOOR", exp.Div(this=exp.Sub(this=eta, expression=_num(low)), expression=_num(width))
    )
    return exp.func("LEAST", exp.func("GREATEST", raw, _num(0.0)), _num(float(SCORE_BINS - 1)))


def evaluation_sql(plan: ModelPlan, coefficients: Sequence[float]) -> str:
    """The evaluation step: held-out rows counted by outcome (events first) and score bin.

    coefficients are the design's, then the bins' range of eta (low, high).
    """
    p = len(plan.terms)
    eta = _eta(plan, coefficients[:p])
    low, high = coefficients[p], coefficients[p + 1]
    inner = sqlglot.select(
        _col("y"), exp.alias_(score_bin(eta, low, high), "bin", quoted=True)
    ).from_(_rows(plan, "holdout").subquery("r", copy=False))
    select: list[exp.Expr] = []
    for i in range(2 * SCORE_BINS):
        event, bin_ = (1.0 if i < SCORE_BINS else 0.0), float(i % SCORE_BINS)
        test = exp.And(
            this=exp.EQ(this=_col("y"), expression=_num(event)),
            expression=exp.EQ(this=_col("bin"), expression=_num(bin_)),
        )
        at = exp.Case(
            ifs=[exp.If(this=test, true=exp.Literal.number(1))], default=exp.Literal.number(0)
        )
        select.append(exp.alias_(exp.Sum(this=at), f"s{i}", quoted=True))
    return sqlglot.select(*select).from_(inner.subquery("m", copy=False)).sql(dialect="duckdb")


def expected_sql(plan: ModelPlan, step: int, coefficients: Sequence[float]) -> str:
    """The expected step: sum of y - mu at each level of the compared column."""
    exponent = plan.step(step).vector("unit_residual").exponent
    select = _per_unit(plan, exponent, _residual(), "r", False)
    inner = _mu_rows(plan, coefficients)
    return sqlglot.select(*select).from_(inner.subquery("m", copy=False)).sql(dialect="duckdb")


def gaussian_sql(plan: ModelPlan) -> str:
    """A Gaussian fit's one step: X'X's triangle, X'y, y'y and n."""
    s = plan.step(1)
    select = _products(plan, s, "xty", "xtx", _num(1.0), _col("y"))
    yy = exp.Mul(this=_col("y"), expression=_col("y"))
    select.append(exp.alias_(_fixed(yy, s.vector("yty").exponent), "yty", quoted=True))
    select.append(exp.alias_(exp.Count(this=exp.Star()), "n", quoted=True))
    return (
        sqlglot.select(*select).from_(_rows(plan).subquery("r", copy=False)).sql(dialect="duckdb")
    )


def step_sql(plan: ModelPlan, step: int, coefficients: Sequence[float] = ()) -> str:
    """The statement of one step (coefficients checked by model_plan.check_coefficients)."""
    if step == 0:
        return design_sql(plan)
    if plan.family is Family.GAUSSIAN:
        return gaussian_sql(plan)
    if step == plan.model.expected_step:
        return expected_sql(plan, step, coefficients)
    if step == plan.model.evaluation_step:
        return evaluation_sql(plan, coefficients)
    if plan.model.solver == "gradient":
        return round_sql(plan, step, coefficients)
    return newton_sql(plan, step, coefficients)
