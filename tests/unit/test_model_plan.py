"""The model planner (queries/model_plan.py, model_checks.py, model_sql.py, sensitivity.py).

Refusals name the field; the SQL computes exactly what numpy computes from the rows by hand;
and, empirically with hypothesis, removing one person moves every released vector by at most
its claimed L2 sensitivity, for each family, with and without a region effect and an offset.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queries import mechanisms
from queries.errors import QueryError
from queries.model import Covariate, Family, ModelSpec
from queries.model_checks import check_coefficients
from queries.model_io import model_bytes, model_from_dict, model_from_json
from queries.model_plan import (
    DESIGN_CHECK_SHARE,
    EVALUATION_SHARE,
    EXPECTED_STEP_SHARE,
    SCORE_BINS,
    plan_model,
)
from queries.spec import Filter
from tests.unit._model_helpers import (
    BANDS,
    CATALOG,
    SEXES,
    Row,
    by_hand,
    random_rows,
    run,
    table,
)

REGIONS = ("a", "b", "c")


def _model(family: Family, **kw: object) -> ModelSpec:
    outcome = {Family.BINOMIAL: "died", Family.POISSON: "visits", Family.GAUSSIAN: "score"}
    base: dict[str, object] = {
        "view": "cases",
        "outcome": outcome[family],
        "family": family,
        "covariates": (Covariate("sex"), Covariate("band"), Covariate("age")),
        "rho": 1.0,
    }
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


# Every family, with and without a region effect (this node second of three) and an offset.
CASES = [
    (Family.BINOMIAL, {}),
    (Family.BINOMIAL, {"region": True}),
    (Family.POISSON, {}),
    (Family.POISSON, {"offset": "years", "region": True}),
    (Family.GAUSSIAN, {}),
    (Family.GAUSSIAN, {"region": True, "where": (Filter("band", ("a", "c", "d")),)}),
    # Gradient descent: a held-out fifth, rounds of gradient and loss, an evaluation step.
    (Family.BINOMIAL, {"solver": "gradient", "iterations": 3}),
    # Comparing units: per-level sums at the design check, and an expected step.
    (Family.BINOMIAL, {"covariates": (Covariate("band"), Covariate("age")), "compare_by": "sex"}),
    (
        Family.POISSON,
        {
            "offset": "years",
            "region": True,
            "compare_by": "died",
            "where": (Filter("died", ("yes", "no")),),
        },
    ),
]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"outcome": "nope"}, "no column 'nope'"),
        ({"outcome": "visits"}, "a binomial outcome is a yes/no category"),
        ({"event": "maybe"}, "event: 'maybe' is not a level"),
        ({"covariates": (Covariate("person_id"),)}, "cannot be a covariate"),
        ({"where": (Filter("age", ("1",)),)}, "where: cannot filter on 'age'"),
        ({"where": (Filter("sex", ("other",)),)}, "not in its public domain"),
        ({"offset": "years"}, "offset: a log offset is for Poisson"),
        ({"view": "cohort"}, "ad hoc cohort"),
    ],
)
def test_binomial_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(QueryError, match=field):
        plan_model(_model(Family.BINOMIAL, **change), CATALOG, node="b", regions=REGIONS)


@pytest.mark.parametrize(
    ("family", "change", "field"),
    [
        (Family.POISSON, {"outcome": "died"}, "is a category; a count"),
        (Family.POISSON, {"outcome": "score"}, "outcome_clamp: a Poisson outcome is a count"),
        (Family.POISSON, {"offset": "age"}, "positive lower bound"),
        (Family.POISSON, {"offset": "sex"}, "offset 'sex' is a category column"),
        (Family.GAUSSIAN, {"outcome_clamp": (50.0, 60.0)}, "does not overlap"),
        (Family.BINOMIAL, {"region": True}, "do not include this node"),
    ],
)
def test_other_refusals_name_the_field(
    family: Family, change: dict[str, object], field: str
) -> None:
    with pytest.raises(QueryError, match=field):
        plan_model(_model(family, **change), CATALOG, node="z", regions=REGIONS)


def test_rho_is_split_as_documented() -> None:
    plan = plan_model(_model(Family.BINOMIAL, iterations=4), CATALOG, node="b", regions=())
    rhos = [s.rho for s in plan.steps]
    assert rhos[0] == pytest.approx(DESIGN_CHECK_SHARE)
    assert rhos[1:] == pytest.approx([(1 - DESIGN_CHECK_SHARE) / 4] * 4)
    assert sum(rhos) == pytest.approx(1.0)
    for s in plan.steps:
        assert sum(v.rho for v in s.vectors) == pytest.approx(s.rho)


@pytest.mark.parametrize("rho", [1e-12, 1e-3, 1.0, 1e3])
def test_units_keep_sums_and_noise_within_64_bits(rho: float) -> None:
    """The unit coarsens as rho shrinks, so the exact sums plus 40 sigma stay in range."""
    plan = plan_model(_model(Family.POISSON, rho=rho), CATALOG, node="b", regions=())
    for s in plan.steps:
        for v in s.vectors:
            scale = mechanisms.scale_for_rho(v.rho, v.sensitivity)
            assert mechanisms.fits_int64(v.max_abs, scale), (s.step, v.name)
            assert v.entry_bound / v.unit < 2**52  # one row's value is exact in a double
    gradient = plan.step(1).vector("gradient")
    assert gradient.exponent == (-12 if rho >= 1e-3 else gradient.exponent)


def test_coefficients_are_checked() -> None:
    plan = plan_model(_model(Family.BINOMIAL), CATALOG, node="b", regions=())
    p = len(plan.columns)
    assert check_coefficients(plan, 1, [0.5] * p) == (0.5,) * p
    with pytest.raises(QueryError, match="coefficients: step 1 needs one per design column"):
        check_coefficients(plan, 1, [0.0])
    with pytest.raises(QueryError, match="must be finite"):
        check_coefficients(plan, 1, [math.inf] + [0.0] * (p - 1))
    with pytest.raises(QueryError, match="takes none"):
        check_coefficients(plan, 0, [0.0] * p)


def test_a_filtered_reference_level_and_the_region_terms() -> None:
    model = _model(Family.BINOMIAL, region=True, where=(Filter("sex", ("male", "unknown")),))
    plan = plan_model(model, CATALOG, node="b", regions=REGIONS)
    assert plan.columns[:2] == ("(intercept)", "sex[unknown]")
    assert [t.constant for t in plan.terms if t.kind == "region"] == [1.0, 0.0]
    # intercept, one sex level, one band level, age, this node's region
    assert plan.nonzero == 5
    assert "step 0, the design check" in plan.describe()


@pytest.mark.parametrize(("family", "kw"), CASES)
def test_sql_computes_what_numpy_computes(family: Family, kw: dict[str, object]) -> None:
    plan = plan_model(_model(family, **kw), CATALOG, node="b", regions=REGIONS)
    rows = random_rows(np.random.default_rng(5), 300)
    con = table(rows)
    rng = np.random.default_rng(6)
    # The Newton steps share one statement shape: the first, the last (an expected step).
    for k in sorted({0, 1, len(plan.steps) - 1}):
        b = (
            []
            if k == 0 or family is Family.GAUSSIAN
            else list(rng.normal(0, 0.5, len(plan.columns)))
        )
        if k == plan.model.evaluation_step:
            b += [-1.5, 1.0]  # the score histograms' range
        sql, hand = run(con, plan, k, b), by_hand(plan, rows, k, b)
        assert sql.keys() == hand.keys()
        for name in sql:
            # Float evaluation order may move a row's rounding by one unit (of 1e-12 here).
            diff = np.abs(np.asarray(sql[name]) - np.asarray(hand[name]))
            assert diff.max() <= len(rows), (k, name, diff.max())


def _l2(a: list[int], b: list[int]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


ROWS = st.tuples(
    st.integers(0, 4),
    st.sampled_from(SEXES),
    st.sampled_from(BANDS),
    st.sampled_from([-10.0, 0.0, 37.0, 100.0, 130.0]),
    st.sampled_from(["no", "yes"]),
    st.sampled_from([0.0, 3.0, 20.0, 40.0]),
    st.sampled_from([0.1, 0.5, 2.0, 10.0, 15.0]),
    st.sampled_from([-9.0, -5.0, 0.5, 5.0, 9.0]),
)


@pytest.mark.parametrize(("family", "kw"), CASES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(ROWS, min_size=1, max_size=10),
    removed=st.integers(0, 4),
    scale=st.sampled_from([0.0, 1.0, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_one_person_moves_each_vector_by_at_most_its_sensitivity(
    family: Family, kw: dict[str, object], data: list[Row], removed: int, scale: float, seed: int
) -> None:
    plan = plan_model(_model(family, **kw), CATALOG, node="b", regions=REGIONS)
    # A person has at most max_rows_per_person rows (the view enforces it).
    kept: dict[int, int] = {}
    rows = [
        r for r in data if kept.setdefault(r[0], 0) < 2 and not kept.update({r[0]: kept[r[0]] + 1})
    ]
    without = [r for r in rows if r[0] != removed]
    b = list(np.random.default_rng(seed).normal(0, 1, len(plan.columns)) * scale)
    whole, less = table(rows), table(without)
    for k in sorted({0, 1, len(plan.steps) - 1}):
        coefficients = b if k and family is not Family.GAUSSIAN else []
        if k == plan.model.evaluation_step:
            coefficients = [*b, -1.0, 2.0]
        a, c = run(whole, plan, k, coefficients), run(less, plan, k, coefficients)
        for v in plan.step(k).vectors:
            assert _l2(a[v.name], c[v.name]) <= v.sensitivity * (1 + 1e-12), (k, v.name)
            assert max(map(abs, a[v.name])) <= v.max_abs


def _comparing(**kw: object) -> ModelSpec:
    base: dict[str, object] = {
        "covariates": (Covariate("band"), Covariate("age")),
        "compare_by": "sex",
    }
    return _model(Family.BINOMIAL, **{**base, **kw})


def test_a_comparing_model_adds_per_unit_sums_and_an_expected_step() -> None:
    model = _comparing(iterations=4)
    assert model_from_json(model_bytes(model)) == model
    assert (model.steps, model.expected_step) == (6, 5)
    plan = plan_model(model, CATALOG, node="b", regions=())
    assert plan.units == SEXES
    rhos = [s.rho for s in plan.steps]
    assert rhos[0] == pytest.approx(DESIGN_CHECK_SHARE)
    assert rhos[-1] == pytest.approx(EXPECTED_STEP_SHARE)
    newton = (1 - DESIGN_CHECK_SHARE - EXPECTED_STEP_SHARE) / 4
    assert rhos[1:-1] == pytest.approx([newton] * 4)
    assert sum(rhos) == pytest.approx(1.0)
    design = plan.step(0)
    assert design.vector("unit_outcome").length == len(SEXES)
    assert design.vector("unit_outcome").rho == pytest.approx(DESIGN_CHECK_SHARE / 3)
    (residual,) = plan.step(5).vectors
    assert (residual.name, residual.length) == ("unit_residual", len(SEXES))
    # One row is at one level: a person's two rows move the vector by at most 2 |y - mu|.
    assert residual.sensitivity == 2 * round(1.0 / residual.unit)
    text = plan.describe()
    assert "step 5, the expected step" in text
    assert "units compared: the 3 level(s) of sex" in text
    filtered = plan_model(
        _comparing(where=(Filter("sex", ("male", "female")),)), CATALOG, node="b", regions=()
    )
    assert filtered.units == ("female", "male")  # the domain's order, kept by the filter


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"compare_by": "nope"}, "compare_by: view 'cases' has no column 'nope'"),
        (
            {"compare_by": "band", "covariates": (Covariate("age"),)},
            "compare_by: 'band' is not a public category of the person",
        ),
        (
            {"compare_by": "age", "covariates": (Covariate("band"),)},
            "not a public category of the person",
        ),
    ],
)
def test_comparing_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(QueryError, match=field):
        plan_model(_comparing(**change), CATALOG, node="b", regions=())


def test_a_comparing_spec_refuses_what_cannot_be_compared() -> None:
    with pytest.raises(QueryError, match="compare_by: 'band' is already in the model"):
        _comparing(compare_by="band")
    with pytest.raises(QueryError, match="compare_by: observed/expected compares counts"):
        _model(Family.GAUSSIAN, compare_by="sex", covariates=(Covariate("age"),))
    with pytest.raises(QueryError, match="compare_by must be a column name"):
        model_from_dict({**_comparing().to_dict(), "compare_by": 3})


def test_a_gradient_fit_holds_a_fifth_out_and_evaluates_on_it() -> None:
    model = _model(Family.BINOMIAL, solver="gradient", iterations=4)
    assert model_from_json(model_bytes(model)) == model
    assert (model.steps, model.evaluation_step, model.expected_step) == (6, 5, None)
    plan = plan_model(model, CATALOG, node="b", regions=())
    assert plan.split_column == "person_id"
    rhos = [s.rho for s in plan.steps]
    assert rhos[0] == pytest.approx(DESIGN_CHECK_SHARE)
    assert rhos[-1] == pytest.approx(EVALUATION_SHARE)
    assert rhos[1:-1] == pytest.approx([(1 - DESIGN_CHECK_SHARE - EVALUATION_SHARE) / 4] * 4)
    assert [v.name for v in plan.step(1).vectors] == ["gradient", "loss"]
    (hist,) = plan.step(5).vectors
    assert (hist.name, hist.length, hist.sensitivity) == ("score_hist", 2 * SCORE_BINS, 2.0)
    assert "step 5, the evaluation, on the held-out persons" in plan.describe()
    rows = random_rows(np.random.default_rng(9), 2000)
    con = table(rows)
    n_train = run(con, plan, 0)["counts"][0]
    held = run(con, plan, 5, [0.0] * len(plan.columns) + [-1.0, 1.0])["score_hist"]
    # Every complete row is in one part: the training n and the held-out histogram add up.
    assert n_train + sum(held) == len(rows)
    # About a fifth held out (2,000 persons, ~3,000 rows: 6 sd is about 0.04).
    assert abs(sum(held) / len(rows) - 0.2) < 0.045
    with pytest.raises(QueryError, match="solver: gradient descent trains binomial"):
        _model(Family.POISSON, solver="gradient")
    with pytest.raises(QueryError, match="solver must be one of"):
        _model(Family.BINOMIAL, solver="adam")
