"""Shared fixtures of the model planner tests: a view, a DuckDB table of it, and numpy sums.

The numpy side recomputes every released vector from the rows by hand (the design from the
spec's definitions in queries/model.py, not from queries/model_sql.py), rounding each row's
value to units half away from zero as DuckDB's ROUND does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import duckdb
import numpy as np

from queries.model import Family
from queries.model_plan import LOSS_CAP, SCORE_BINS, ModelPlan
from queries.model_sql import entry_columns, step_sql, triangle
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec

SEXES = ("female", "male", "unknown")
BANDS = ("a", "b", "c", "d")
CASES = ViewSpec(
    name="cases",
    description="up to two rows per person",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("sex", ColumnType.CATEGORY, domain=SEXES),
        ColumnSpec("band", ColumnType.CATEGORY, domain=BANDS, person_level=False),
        ColumnSpec("age", ColumnType.INTEGER, lower=0, upper=100),
        ColumnSpec("died", ColumnType.CATEGORY, domain=("no", "yes")),
        ColumnSpec("visits", ColumnType.INTEGER, lower=0, upper=20, person_level=False),
        ColumnSpec("years", ColumnType.FLOAT, lower=0.5, upper=10.0, person_level=False),
        ColumnSpec("score", ColumnType.FLOAT, lower=-5.0, upper=5.0, person_level=False),
    ),
    max_rows_per_person=2,
    max_persons=10_000,
)
CATALOG = Catalog(views=(CASES,))
ROW_COLUMNS = ("person_id", "sex", "band", "age", "died", "visits", "years", "score")
Row = tuple[int, str, str, float, str, float, float, float]


def table(rows: Sequence[Row]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding the rows as the view `cases`."""
    con = duckdb.connect(":memory:")
    con.execute(
        "CREATE TABLE cases (person_id BIGINT, sex VARCHAR, band VARCHAR, age DOUBLE, "
        "died VARCHAR, visits DOUBLE, years DOUBLE, score DOUBLE)"
    )
    if rows:
        con.executemany("INSERT INTO cases VALUES (?, ?, ?, ?, ?, ?, ?, ?)", list(rows))
    return con


def random_rows(rng: np.random.Generator, persons: int) -> list[Row]:
    """Rows for `persons` persons, one or two each, with values past the public bounds too."""
    rows: list[Row] = []
    for pid in range(persons):
        sex = str(rng.choice(SEXES))
        died = "yes" if rng.random() < 0.3 else "no"
        for _ in range(int(rng.integers(1, 3))):
            rows.append(
                (
                    pid,
                    sex,
                    str(rng.choice(BANDS)),
                    float(rng.integers(-5, 110)),
                    died,
                    float(rng.integers(0, 25)),
                    float(rng.uniform(0.1, 12.0)),
                    float(rng.normal(0, 3)),
                )
            )
    return rows


def run(
    con: duckdb.DuckDBPyConnection, plan: ModelPlan, k: int, b: Sequence[float] = ()
) -> dict[str, list[int]]:
    """The plan's exact vectors of step k, as the node reads them."""
    result = con.sql(step_sql(plan, k, b)).to_arrow_table()
    row = {name: result.column(name)[0].as_py() for name in result.column_names}
    return {
        v: [0 if c is None else int(row[c] or 0) for c in cols]
        for v, cols in entry_columns(plan, plan.step(k)).items()
    }


def _units(values: np.ndarray, exponent: int) -> np.ndarray:
    scaled = values / 10.0**exponent
    return np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)


def held_out(person: int) -> bool:
    """The hold-out rule of a gradient fit, by hand: md5 of the identifier's text, mod 5."""
    return int(hashlib.md5(str(person).encode()).hexdigest(), 16) % 5 == 0  # noqa: S324


def _in_part(plan: ModelPlan, k: int, person: int) -> bool:
    part = plan.part(k)
    return part == "all" or (part == "holdout") == held_out(person)


def design(
    plan: ModelPlan, rows: Sequence[Row], k: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X, y and the log offset of the complete rows of step k's part that pass the filters."""
    filters = dict(plan.filters)
    named = [dict(zip(ROW_COLUMNS, r, strict=True)) for r in rows]
    kept = [
        r
        for r, d in zip(rows, named, strict=True)
        if all(d[c] in v for c, v in filters.items()) and _in_part(plan, k, int(r[0]))
    ]
    x = np.zeros((len(kept), len(plan.columns)))
    y = np.zeros(len(kept))
    t = np.zeros(len(kept))
    for i, r in enumerate(kept):
        row = dict(zip(ROW_COLUMNS, r, strict=True))
        for j, name in enumerate(plan.columns):
            if name == "(intercept)":
                x[i, j] = 1.0
            elif name.startswith("region["):
                x[i, j] = 1.0 if name == f"region[{plan.node}]" else 0.0
            elif "[" in name:
                column, level = name[:-1].split("[")
                x[i, j] = 1.0 if row[column] == level else 0.0
            else:
                term = plan.terms[j]
                v = min(max(float(row[name]), term.lower), term.upper)
                x[i, j] = (v - term.lower) / (term.upper - term.lower)
        out = plan.outcome
        if out.event is not None:
            y[i] = 1.0 if row[out.column] == out.event else 0.0
        else:
            y[i] = min(max(float(row[out.column]), out.lower), out.upper)
        if plan.offset is not None:
            name, lo, hi = plan.offset
            t[i] = math.log(min(max(float(row[name]), lo), hi))
    return x, y, t


def _unit_levels(plan: ModelPlan, rows: Sequence[Row]) -> np.ndarray:
    """The compared column's value of each row design() keeps, in its order."""
    filters = dict(plan.filters)
    named = [dict(zip(ROW_COLUMNS, r, strict=True)) for r in rows]
    column = plan.model.compare_by or ""
    return np.array(
        [d[column] for d in named if all(d[c] in v for c, v in filters.items())], dtype=object
    )


def _per_unit(plan: ModelPlan, rows: Sequence[Row], values: np.ndarray, e: int) -> list[int]:
    at = _unit_levels(plan, rows)
    return [int(_units(np.where(at == level, values, 0.0), e).sum()) for level in plan.units]


def _mu(plan: ModelPlan, x: np.ndarray, t: np.ndarray, b: Sequence[float]) -> np.ndarray:
    eta = x @ np.asarray(b) + t
    if plan.family is Family.BINOMIAL:
        out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(eta, -30, 30)))
        return out
    return np.exp(np.minimum(eta, math.log(plan.mu_max)))


def by_hand(
    plan: ModelPlan, rows: Sequence[Row], k: int, b: Sequence[float] = ()
) -> dict[str, list[int]]:
    """Step k's exact vectors computed with numpy."""
    x, y, t = design(plan, rows, k)
    s = plan.step(k)
    p = len(plan.columns)
    tri = triangle(p)
    if k == 0:
        levels = [j for j, term in enumerate(plan.terms) if term.kind == "level"]
        counts = [len(y), *(int(x[:, j].sum()) for j in levels)]
        e = s.vector("outcome_sum").exponent
        total = int(y.sum()) if plan.family is Family.BINOMIAL else int(_units(y, e).sum())
        out0 = {"counts": counts, "outcome_sum": [total]}
        if plan.units:
            out0["unit_outcome"] = _per_unit(plan, rows, y, s.vector("unit_outcome").exponent)
        return out0
    if k == plan.model.evaluation_step:
        eta = x @ np.asarray(b[:p]) + t
        low, high = b[p], b[p + 1]  # the hub's range, after the coefficients
        bins = np.clip(np.floor((eta - low) / ((high - low) / SCORE_BINS)), 0, SCORE_BINS - 1)
        hist = [int(np.sum((y == 1) & (bins == j))) for j in range(SCORE_BINS)]
        hist += [int(np.sum((y == 0) & (bins == j))) for j in range(SCORE_BINS)]
        return {"score_hist": hist}
    if plan.model.solver == "gradient":
        mu = _mu(plan, x, t, b)
        e = s.vector("gradient").exponent
        loss = np.minimum(-(y * np.log(mu) + (1 - y) * np.log(1 - mu)), LOSS_CAP)
        return {
            "gradient": [int(_units(x[:, j] * (y - mu), e).sum()) for j in range(p)],
            "loss": [int(_units(loss, s.vector("loss").exponent).sum())],
        }
    if k == plan.model.expected_step:
        r = y - _mu(plan, x, t, b)
        return {"unit_residual": _per_unit(plan, rows, r, s.vector("unit_residual").exponent)}
    if plan.family is Family.GAUSSIAN:
        first, second, w, r = "xty", "xtx", np.ones(len(y)), y
    else:
        mu = _mu(plan, x, t, b)
        w = mu * (1 - mu) if plan.family is Family.BINOMIAL else mu
        first, second, r = "gradient", "hessian", y - mu
    eg, eh = s.vector(first).exponent, s.vector(second).exponent
    out = {
        first: [int(_units(x[:, j] * r, eg).sum()) for j in range(p)],
        second: [int(_units(w * x[:, j] * x[:, k2], eh).sum()) for j, k2 in tri],
    }
    if plan.family is Family.GAUSSIAN:
        out["yty"] = [int(_units(y * y, s.vector("yty").exponent).sum())]
        out["n"] = [len(y)]
    return out
