"""The hub's GLM solver on exact statistics equals statsmodels on the same pooled data."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest
import statsmodels.api as sm

from coordinator.learning import glm
from coordinator.learning.fit import held_columns, solve
from queries.errors import DataError, QueryError
from queries.model import Covariate, Family, ModelSpec, StepRelease
from tests.unit._glm_helpers import Data, make_data, release

FAMILIES = {
    Family.BINOMIAL: sm.families.Binomial(),
    Family.POISSON: sm.families.Poisson(),
    Family.GAUSSIAN: sm.families.Gaussian(),
}


def _model(family: Family, *, iterations: int | None = None) -> ModelSpec:
    return ModelSpec(
        view="copd",
        outcome="y",
        family=family,
        covariates=(Covariate("band"), Covariate("age")),
        rho=1.0,
        iterations=None if family is Family.GAUSSIAN else iterations,
    )


def _split(data: Data, parts: int) -> list[Data]:
    """The persons dealt to `parts` nodes."""
    idx = np.array_split(np.arange(len(data.y)), parts)
    return [
        Data(
            data.columns,
            data.x[i],
            data.y[i],
            None if data.offset is None else data.offset[i],
        )
        for i in idx
    ]


def _fit_exact(data: Data, family: Family, iterations: int = 12, nodes: int = 3):  # type: ignore[no-untyped-def]
    parts = _split(data, nodes)
    names = [f"n{i}" for i in range(nodes)]

    def ask(step: int, beta: Sequence[float]) -> list[StepRelease]:
        return [release(d, family, step, beta, node=nm) for d, nm in zip(parts, names, strict=True)]

    design = [release(d, family, 0, (), node=nm) for d, nm in zip(parts, names, strict=True)]
    return solve(_model(family, iterations=iterations), design, names, ask)


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("offset", [False, True])
def test_exact_statistics_give_the_pooled_statsmodels_fit(family: Family, offset: bool) -> None:
    data = make_data(family, 4000, np.random.default_rng(13), offset=offset)
    solution = _fit_exact(data, family)
    reference = sm.GLM(data.y, data.x, family=FAMILIES[family], offset=data.offset).fit(
        tol=1e-12, maxiter=100
    )
    estimates = np.array([c.estimate for c in solution.coefficients])
    np.testing.assert_allclose(estimates, reference.params, rtol=0, atol=1e-6)
    # No noise: the DP-only standard errors are 0 and the total ones are statsmodels' own.
    np.testing.assert_allclose([c.dp_std_error for c in solution.coefficients], 0, atol=1e-12)
    np.testing.assert_allclose(
        [c.std_error for c in solution.coefficients], reference.bse, rtol=1e-6, atol=0
    )
    ci = np.array([(c.ci_low, c.ci_high) for c in solution.coefficients])
    np.testing.assert_allclose(ci, reference.conf_int(), rtol=0, atol=1e-6)
    assert solution.persons == len(data.y)
    assert not any(i.repaired for i in solution.iterations)
    if family is not Family.GAUSSIAN:
        assert solution.message.startswith("converged")
        assert solution.iterations[-1].max_change < 1e-6


def test_too_few_iterations_are_reported_as_not_converged() -> None:
    data = make_data(Family.POISSON, 2000, np.random.default_rng(5), offset=True)
    solution = _fit_exact(data, Family.POISSON, iterations=1)
    assert solution.message.startswith("not converged")
    assert "more iterations" in solution.message


def test_a_step_is_damped_so_no_linear_predictor_moves_by_more_than_the_cap() -> None:
    beta = np.zeros(3)
    # A Fisher information so small that the full step would move eta by 1000.
    stats = glm.Summed(
        step=1,
        columns=("(intercept)", "band[b]", "band[c]"),
        vectors={
            "gradient": np.array([1.0, 1.0, -2.0]),
            "hessian": np.array([1e-3, 0.0, 0.0, 1e-3, 0.0, 1e-3]),
        },
        variances={},
        nodes=("a",),
    )
    step = glm.newton(beta, stats, family=Family.POISSON)
    assert step.damped
    # One level of band at a time: the reach is |d_0| + max(|d_1|, |d_2|), not the sum.
    d = np.abs(step.change)
    assert d[0] + max(d[1], d[2]) == pytest.approx(glm.MAX_ETA_STEP[Family.POISSON])
    assert glm.reach(stats.columns, step.change) == pytest.approx(5.0)


def test_a_noisy_hessian_that_is_not_positive_definite_is_floored_and_reported() -> None:
    m = glm.symmetric(np.array([1.0, 2.0, 1.0]), 2)  # eigenvalues 3 and -1
    fixed, repaired = glm.repair(m, sd=0.5, what="Hessian")
    assert repaired
    values = np.linalg.eigvalsh(fixed)
    assert values[0] == pytest.approx(glm.EIGEN_FLOOR_SDS * np.sqrt(2) * 0.5)
    assert values[1] == pytest.approx(3.0)
    np.testing.assert_allclose(fixed, fixed.T)
    same, untouched = glm.repair(np.eye(2) * 100, sd=0.5, what="Hessian")
    assert not untouched
    np.testing.assert_array_equal(same, np.eye(2) * 100)


def test_an_exact_singular_design_is_refused_with_what_to_do() -> None:
    with pytest.raises(QueryError, match=r"singular.*drop or merge"):
        glm.repair(glm.symmetric(np.array([1.0, 1.0, 1.0]), 2), sd=0.0, what="Hessian")


def test_the_upper_triangle_is_row_major() -> None:
    m = glm.symmetric(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 3)
    np.testing.assert_array_equal(m, [[1, 2, 3], [2, 4, 5], [3, 5, 6]])


def test_noise_variances_add_across_nodes() -> None:
    a = StepRelease("a", 1, ("(intercept)",), {"gradient": (1.0,)}, {"gradient": 2.0}, 0.1)
    b = StepRelease("b", 1, ("(intercept)",), {"gradient": (3.0,)}, {"gradient": 5.0}, 0.1)
    summed = glm.sum_releases([a, b])
    assert summed.vectors["gradient"].tolist() == [4.0]
    assert summed.variances["gradient"] == 7.0


def test_nodes_that_disagree_on_the_design_are_refused_by_name() -> None:
    a = StepRelease("a", 1, ("(intercept)",), {"gradient": (1.0,)}, {}, 0.1)
    b = StepRelease("b", 1, ("(intercept)", "x"), {"gradient": (1.0, 2.0)}, {}, 0.1)
    with pytest.raises(DataError, match="node b has design columns"):
        glm.sum_releases([a, b])


def test_a_region_left_out_is_held_at_zero_and_the_rest_is_the_pooled_fit() -> None:
    # Three regions with a region effect; the first (the reference) is left out after the
    # design check, so the second becomes the reference and the third is fitted against it.
    rng = np.random.default_rng(17)
    base = make_data(Family.BINOMIAL, 3000, rng)
    region = rng.integers(0, 3, size=len(base.y))
    x = np.column_stack([base.x, region == 1, region == 2]).astype(float)
    columns = (*base.columns, "region[b]", "region[c]")
    parts = {
        name: Data(columns, x[region == i], base.y[region == i], None)
        for i, name in enumerate("abc")
    }

    def ask(step: int, beta: Sequence[float]) -> list[StepRelease]:
        return [release(parts[r], Family.BINOMIAL, step, beta, node=r) for r in "bc"]

    model = dataclasses.replace(_model(Family.BINOMIAL, iterations=10), region=True)
    design = [release(parts[r], Family.BINOMIAL, 0, (), node=r) for r in "bc"]
    solution = solve(model, design, ["b", "c"], ask, all_regions=["a", "b", "c"])
    assert [c.column for c in solution.coefficients] == [*base.columns, "region[c]"]
    assert "region[b]" in solution.message
    assert "reference is b" in solution.message
    kept = region > 0
    reference = sm.GLM(
        base.y[kept], x[kept][:, [0, 1, 2, 3, 5]], family=FAMILIES[Family.BINOMIAL]
    ).fit(tol=1e-12)
    estimates = np.array([c.estimate for c in solution.coefficients])
    np.testing.assert_allclose(estimates, reference.params, rtol=0, atol=1e-6)


def test_held_columns() -> None:
    columns = ("(intercept)", "sex[M]", "region[b]", "region[c]")
    assert held_columns(columns, "abc", "ac", True) == ("region[b]",)
    assert held_columns(columns, "abc", "bc", True) == ("region[b]",)
    assert held_columns(columns, "abc", "ac", False) == ()
    assert held_columns(columns, "abc", "abc", True) == ()


def test_a_poisson_fit_with_a_long_offset_converges_in_the_default_steps() -> None:
    # Person-days from 30 to 365: the start (log of the mean count) is off by about log(150),
    # which the exact re-centring of step 1 removes.
    rng = np.random.default_rng(21)
    data = make_data(Family.POISSON, 3000, rng, offset=True)
    days = np.log(rng.uniform(30, 365, size=len(data.y)))
    eta = data.x @ np.array([-6.0, 0.4, -0.3, 0.8]) + days
    data = Data(data.columns, data.x, rng.poisson(np.exp(eta)).astype(float), days)
    solution = _fit_exact(data, Family.POISSON, iterations=6)
    reference = sm.GLM(data.y, data.x, family=FAMILIES[Family.POISSON], offset=days).fit(tol=1e-12)
    estimates = np.array([c.estimate for c in solution.coefficients])
    np.testing.assert_allclose(estimates, reference.params, rtol=0, atol=1e-6)
    assert "re-centred" in solution.message


def test_recentring_is_exact_under_the_log_link() -> None:
    data = make_data(Family.POISSON, 500, np.random.default_rng(2), offset=True)
    beta = np.array([0.3, 0.1, -0.2, 0.5])
    stats = glm.sum_releases([release(data, Family.POISSON, 1, beta)])
    moved, shifted, _ = glm.recentre_poisson(beta, stats)
    direct = glm.sum_releases([release(data, Family.POISSON, 1, moved)])
    for name in ("gradient", "hessian"):
        np.testing.assert_allclose(
            shifted.vectors[name], direct.vectors[name], rtol=1e-10, atol=1e-9
        )
    assert abs(direct.vectors["gradient"][0]) < 1e-8  # the intercept's score is 0 there


def test_only_columns_on_a_direction_below_the_noise_are_weak() -> None:
    # Two collinear columns (their difference has curvature 0.5) and a well-determined third:
    # at noise sd 1 the floor is 2 sqrt(3) = 3.5, so the first two are weak and the third is
    # not; at sd 0.01 (floor 0.035) none is; with no noise none can be.
    h = np.array([[100.0, 99.75, 0.0], [99.75, 100.0, 0.0], [0.0, 0.0, 50.0]])
    assert glm.weak_columns(h, 1.0).tolist() == [True, True, False]
    assert glm.weak_columns(h, 0.01).tolist() == [False, False, False]
    assert glm.weak_columns(h, 0.0).tolist() == [False, False, False]
