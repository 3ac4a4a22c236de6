"""Plan a model fit at one node: its design, what each step releases, and what each costs.

A model (queries/model.py) is checked against the node's catalog and turned into a fixed
sequence of steps, from public information only (the spec, the view's public bounds, the
regions the hub sends): the design's terms, the per-row values (queries/model_sql.py renders
them as DuckDB SQL), and for every step the integer vectors it releases, each with its
fixed-point unit, L2 sensitivity (queries/sensitivity.py) and share of rho. Nothing here can
depend on data, so the plan is also what Explain shows.

Shares of rho. The design check gets DESIGN_CHECK_SHARE of the model's rho (stated in
Explain), a model comparing units (compare_by) gives its expected step EXPECTED_STEP_SHARE,
and the Newton steps share the rest equally. Within a step the vectors split its rho by
the fixed weights of STEP_WEIGHTS: equal halves for the design check's counts and outcome
sum and for a Newton step's gradient and Hessian (the gradient fixes where the fit settles,
the Hessian how fast it gets there and its standard errors: both are needed early, and an
even split keeps each step's cost easy to read; a compare_by model's per-unit outcome sums
take a third of the design check); a Gaussian fit's one step gives X'X and X'y
three eighths each and y'y and n one eighth (n is also X'X's intercept entry).

Fixed point. Each vector is a sum of per-row values, each rounded to a whole number of units
10**e as the query engine does. e is the finest power of ten (at least 1e-12, and keeping
each row's value below 2^52 units, so doubles hold it exactly) for which the public bound on
the exact sum plus NOISE_TAIL_SIGMAS of noise stays within 2^61: far finer than the 4 digits
of a query, because a fit must match the pooled fit to 1e-6 at a large rho.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from queries import mechanisms, mlp
from queries.cohort import check_view
from queries.errors import QueryError
from queries.model import INTERCEPT, Family, ModelSpec, design_columns
from queries.model_checks import (
    Outcome,
    bounds,
    check_compare_by,
    check_filters,
    check_offset,
    check_outcome,
    check_regions,
)
from queries.schema import Catalog, ColumnType, ViewSpec
from queries.sensitivity import model_row_factor, model_sensitivity

DESIGN_CHECK_SHARE = 0.05
# Gradient descent (solver "gradient"): the evaluation step's share, the rounds' weights, the
# held-out share of persons (by a hash of their identifier), the cap on a row's training loss
# (nats; its sensitivity), and the score histograms' bins of the linear predictor eta: equal
# bins over a range the hub sends with the coefficients (coordinator/learning/descent.py
# sets it from the design check's noisy means), the ends closed.
EVALUATION_SHARE = 0.1
HOLDOUT_MODULUS = 5  # md5_number(person) % 5 == 0: a fifth of the persons held out
LOSS_CAP = 10.0
SCORE_BINS = 30
# The expected step fixes each unit's E, whose noise is most of an O/E ratio's DP noise; the
# coefficients it is evaluated at come from the Newton steps, which keep the larger part.
EXPECTED_STEP_SHARE = 0.2
STEP_WEIGHTS: dict[str, dict[str, float]] = {
    "design": {"counts": 1.0, "outcome_sum": 1.0},
    "design_units": {"counts": 1.0, "outcome_sum": 1.0, "unit_outcome": 1.0},
    # The gradient steers the fit; the loss is only reported.
    "round": {"gradient": 4.0, "loss": 1.0},
    "newton": {"gradient": 1.0, "hessian": 1.0},
    "gaussian": {"xtx": 3.0, "xty": 3.0, "yty": 1.0, "n": 1.0},
}
# A logistic eta is clamped to +-ETA_LIMIT before the inverse link: exp() stays finite, and
# mu moves by less than 1e-13 (1 / (1 + e^30)).
ETA_LIMIT = 30.0
MIN_EXPONENT = -12
_SUM_LIMIT = 2.0**61
_ROW_LIMIT = 2.0**52


@dataclass(frozen=True)
class Term:
    """One design column and how a row's value is made (always in [0, 1])."""

    name: str
    kind: str  # "intercept", "level", "numeric" or "region"
    column: str | None = None  # the view's column (level, numeric)
    level: str | None = None  # a level's value
    lower: float = 0.0  # a numeric column's clamp bounds, scaled to [0, 1]
    upper: float = 1.0
    constant: float | None = None  # the intercept's 1, a region's 1 here or 0 elsewhere


@dataclass(frozen=True)
class VectorPlan:
    """One integer vector a step releases."""

    name: str
    length: int
    exponent: int  # fixed-point unit 10**exponent (0 for counts)
    entry_bound: float  # the largest |value| one row adds to an entry, natural units
    sensitivity: float  # L2 under adding or removing one person, in units
    max_abs: int  # public bound on |exact entry|, in units
    rho: float  # this vector's share of its step's rho

    @property
    def unit(self) -> float:
        """The value of one fixed-point unit."""
        return float(10.0**self.exponent)


@dataclass(frozen=True)
class StepPlan:
    """What one step releases, and its share of the model's rho."""

    step: int
    rho: float
    vectors: tuple[VectorPlan, ...]

    def vector(self, name: str) -> VectorPlan:
        """The named vector."""
        return next(v for v in self.vectors if v.name == name)


@dataclass(frozen=True)
class ModelPlan:
    """A model fit as one node computes it."""

    model: ModelSpec
    view: ViewSpec
    node: str
    regions: tuple[str, ...]
    columns: tuple[str, ...]
    terms: tuple[Term, ...]
    outcome: Outcome
    offset: tuple[str, float, float] | None  # (column, lower, upper), lower > 0
    filters: tuple[tuple[str, tuple[str, ...]], ...]
    rows_per_person: int
    nonzero: int  # the most design entries a row can have that are not 0 (q)
    steps: tuple[StepPlan, ...]
    # The compared column's levels (compare_by), in the order of the unit vectors.
    units: tuple[str, ...] = ()
    # The person identifier a gradient fit holds persons out by (None: no hold-out).
    split_column: str | None = None
    # How many numbers the hub sends at a step after the design check: the design's
    # coefficients, or a network's parameters (queries/mlp.py).
    parameters: int = 0

    def part(self, k: int) -> str:
        """Which rows step k reads: "all", "train" or "holdout" (solver gradient)."""
        if self.split_column is None:
            return "all"
        return "holdout" if k == self.model.evaluation_step else "train"

    @property
    def family(self) -> Family:
        """The model's family."""
        return self.model.family

    @property
    def mu_max(self) -> float:
        """Public cap on a Poisson mean (the outcome's upper bound), which bounds weights."""
        return self.outcome.upper

    def step(self, k: int) -> StepPlan:
        """Step k (0: the design check)."""
        return self.steps[k]

    def cells(self) -> int:
        """Values released over the whole fit."""
        return sum(v.length for s in self.steps for v in s.vectors)

    def describe(self) -> str:
        """The fit in words: design, rows, and every step's vectors and cost (no data)."""
        from queries.model_describe import describe_plan  # text only; kept apart

        return describe_plan(self)


def _units(value: float, exponent: int) -> int:
    # DuckDB's ROUND (half away from zero), as the SQL rounds each row's value.
    scaled = value / 10.0**exponent
    return int(math.copysign(math.floor(abs(scaled) + 0.5), scaled))


def _terms(
    model: ModelSpec, view: ViewSpec, columns: tuple[str, ...], node: str, regions: Sequence[str]
) -> tuple[Term, ...]:
    """Each design column's term; the region columns are the last len(regions) - 1."""
    terms = [Term(INTERCEPT, "intercept", constant=1.0)]
    by_name = {c.column: c for c in model.covariates}
    n_region = len(regions) - 1 if model.region else 0
    for name in columns[1 : len(columns) - n_region]:
        column, _, rest = name.partition("[")
        if rest:
            terms.append(Term(name, "level", column=column, level=rest[:-1]))
        else:
            lo, hi = bounds(view, column, by_name[column].clamp, "covariate")
            terms.append(Term(name, "numeric", column=column, lower=lo, upper=hi))
    for region in regions[1:] if model.region else ():
        here = 1.0 if region == node else 0.0
        terms.append(Term(f"region[{region}]", "region", constant=here))
    return tuple(terms)


def _exponent(bound: float, rows: int, sensitivity_rows: float, rho: float) -> int:
    """The finest unit 10**e whose sums and noise stay within 2^61 (module docstring)."""
    reach = bound * (rows + mechanisms.NOISE_TAIL_SIGMAS * sensitivity_rows / math.sqrt(2 * rho))
    e = math.ceil(math.log10(reach / _SUM_LIMIT))
    return max(e, math.ceil(math.log10(bound / _ROW_LIMIT)), MIN_EXPONENT)


def _vector(
    name: str, length: int, bound: float, shape: tuple[int, int, int, int], rho: float, count: bool
) -> VectorPlan:
    """A vector whose rows each add at most `bound` to an entry (sensitivity.py)."""
    q, k_cat, c, rows = shape
    factor = model_row_factor(name, nonzero=q, categories=k_cat)
    e = 0 if count else _exponent(bound, rows, c * factor, rho)
    units = _units(bound, e)
    sens = model_sensitivity(c, factor, units)
    plan = VectorPlan(
        name=name,
        length=length,
        exponent=e,
        entry_bound=bound,
        sensitivity=sens,
        max_abs=rows * max(1, units),
        rho=rho,
    )
    scale = mechanisms.scale_for_rho(rho, sens)
    if not mechanisms.fits_int64(plan.max_abs, scale):
        raise QueryError(
            f"rho: the model's rho gives {name} only {rho:.3g}, whose noise (sigma {scale:.3g} "
            "units) could overflow a 64-bit integer; give the model more rho"
        )
    return plan


def _shares(kind: str, rho: float) -> dict[str, float]:
    weights = STEP_WEIGHTS[kind]
    return {k: rho * w / sum(weights.values()) for k, w in weights.items()}


def _clipped_vector(length: int, clip: float, persons: int, rho: float) -> VectorPlan:
    """A network's round: the sum over persons of their gradients clipped to `clip` (L2)."""
    e = _exponent(clip, persons, 1.0, rho)
    sens = mlp.clipped_sensitivity(clip, e, length)
    plan = VectorPlan(
        name="gradient",
        length=length,
        exponent=e,
        entry_bound=clip,
        sensitivity=sens,
        max_abs=persons * (_units(clip, e) + 1),
        rho=rho,
    )
    if not mechanisms.fits_int64(plan.max_abs, mechanisms.scale_for_rho(rho, sens)):
        raise QueryError(
            f"rho: the model's rho gives each round's gradient only {rho:.3g}, whose noise "
            "could overflow a 64-bit integer; give the model more rho"
        )
    return plan


def _steps(
    model: ModelSpec,
    p: int,
    levels: int,
    outcome: Outcome,
    shape: tuple[int, int, int, int],
    units: int,
    persons: int = 0,
) -> tuple[StepPlan, ...]:
    design_rho = model.rho * DESIGN_CHECK_SHARE
    expected_rho = model.rho * EXPECTED_STEP_SHARE if units else 0.0
    if model.solver == "gradient":
        expected_rho = model.rho * EVALUATION_SHARE
    newton_rho = (model.rho - design_rho - expected_rho) / model.newton_steps
    d = _shares("design_units" if units else "design", design_rho)
    binomial = model.family is Family.BINOMIAL
    design_vectors = [
        _vector("counts", 1 + levels, 1.0, shape, d["counts"], True),
        _vector("outcome_sum", 1, outcome.largest, shape, d["outcome_sum"], binomial),
    ]
    if units:
        design_vectors.append(
            _vector("unit_outcome", units, outcome.largest, shape, d["unit_outcome"], binomial)
        )
    design = StepPlan(step=0, rho=design_rho, vectors=tuple(design_vectors))
    triangle = p * (p + 1) // 2
    if model.family is Family.GAUSSIAN:
        g = _shares("gaussian", newton_rho)
        y = outcome.largest
        step = StepPlan(
            step=1,
            rho=newton_rho,
            vectors=(
                _vector("xtx", triangle, 1.0, shape, g["xtx"], False),
                _vector("xty", p, y, shape, g["xty"], False),
                _vector("yty", 1, y * y, shape, g["yty"], False),
                _vector("n", 1, 1.0, shape, g["n"], True),
            ),
        )
        return (design, step)
    # |y - mu| and the weight: binomial 1 and 1/4; a Poisson mean is capped at the outcome's
    # upper bound Y (the mean of a count clamped to [0, Y] is at most Y), so both are <= Y.
    residual = 1.0 if binomial else outcome.upper
    weight = 0.25 if binomial else outcome.upper
    if model.solver == "gradient":
        r = _shares("round", newton_rho)
        gradient = (
            _clipped_vector(mlp.count(p, model.hidden), model.clip, persons, r["gradient"])
            if model.hidden
            else _vector("gradient", p, residual, shape, r["gradient"], False)
        )
        rounds = [
            StepPlan(
                step=k,
                rho=newton_rho,
                vectors=(gradient, _vector("loss", 1, LOSS_CAP, shape, r["loss"], False)),
            )
            for k in range(1, model.newton_steps + 1)
        ]
        hist = _vector("score_hist", 2 * SCORE_BINS, 1.0, shape, expected_rho, True)
        evaluation = StepPlan(step=model.newton_steps + 1, rho=expected_rho, vectors=(hist,))
        return (design, *rounds, evaluation)
    n = _shares("newton", newton_rho)
    gradient = _vector("gradient", p, residual, shape, n["gradient"], False)
    hessian = _vector("hessian", triangle, weight, shape, n["hessian"], False)
    newton = [
        StepPlan(step=k, rho=newton_rho, vectors=(gradient, hessian))
        for k in range(1, model.newton_steps + 1)
    ]
    if units:
        unit_residual = _vector("unit_residual", units, residual, shape, expected_rho, False)
        newton.append(
            StepPlan(step=model.newton_steps + 1, rho=expected_rho, vectors=(unit_residual,))
        )
    return (design, *newton)


def plan_model(
    model: ModelSpec, catalog: Catalog, *, node: str, regions: Sequence[str]
) -> ModelPlan:
    """Check a model against the catalog and plan its fit here; QueryError names the field."""
    check_view(model.view, model.cohort)
    view = catalog.view(model.view)
    filters = check_filters(model, view)
    regions = check_regions(model, node, regions)
    columns = design_columns(model, view, regions)
    outcome = check_outcome(model, view, filters)
    offset = check_offset(model, view)
    units = check_compare_by(model, view, filters)
    terms = _terms(model, view, columns, node, regions)
    c = view.max_rows_per_person
    rows = view.max_rows
    k_cat = sum(1 for cv in model.covariates if view.column(cv.column).type is ColumnType.CATEGORY)
    numeric = sum(1 for t in terms if t.kind == "numeric")
    here = 1 if any(t.kind == "region" and t.constant for t in terms) else 0
    q = 1 + numeric + k_cat + here
    levels = sum(1 for t in terms if t.kind == "level")
    shape = (q, k_cat, c, rows)
    steps = _steps(model, len(columns), levels, outcome, shape, len(units), view.max_persons)
    return ModelPlan(
        model=model,
        view=view,
        node=node,
        regions=regions,
        columns=columns,
        terms=terms,
        outcome=outcome,
        offset=offset,
        filters=tuple(filters.items()),
        rows_per_person=c,
        nonzero=q,
        steps=steps,
        units=units,
        split_column=_split_column(model, view),
        parameters=mlp.count(len(columns), model.hidden) if model.hidden else len(columns),
    )


def _split_column(model: ModelSpec, view: ViewSpec) -> str | None:
    """A gradient fit's person identifier, which decides who is held out."""
    if model.solver != "gradient":
        return None
    for col in view.columns:
        if col.type is ColumnType.IDENTIFIER:
            return col.name
    raise QueryError(
        f"solver: view {view.name!r} has no person identifier, so no persons can be held out "
        "for the evaluation; train on a person-level view"
    )
