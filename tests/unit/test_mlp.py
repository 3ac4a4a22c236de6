"""The small network (queries/mlp.py): gradients, per-person clipping, and its sensitivity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queries import mlp
from queries.model import Covariate, Family, ModelSpec
from queries.model_plan import plan_model
from tests.unit._model_helpers import CATALOG

P, H = 4, 3


def _loglik(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    z = mlp.logits(theta, x, H)
    return float(np.sum(y * z - np.log1p(np.exp(z))))


def test_row_gradients_are_the_log_likelihoods_derivative() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (40, P))
    x[:, 0] = 1.0
    y = (rng.random(40) < 0.4).astype(float)
    theta = rng.normal(0, 0.7, mlp.count(P, H))
    grads, _ = mlp.row_gradients(theta, x, y, H)
    analytic = grads.sum(axis=0)
    numeric = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = 1e-6
        numeric[i] = (_loglik(theta + e, x, y) - _loglik(theta - e, x, y)) / 2e-6
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)
    assert len(mlp.names(("(intercept)", "a", "b", "c"), H)) == theta.size


@settings(max_examples=60, deadline=None)
@given(
    persons=st.lists(st.integers(0, 5), min_size=1, max_size=14),
    removed=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    clip=st.sampled_from([0.1, 1.0, 7.5]),
)
def test_one_person_moves_the_round_by_at_most_its_sensitivity(
    persons: list[int], removed: int, seed: int, clip: float
) -> None:
    rng = np.random.default_rng(seed)
    n = len(persons)
    x = rng.uniform(0, 1, (n, P))
    x[:, 0] = 1.0
    y = (rng.random(n) < 0.5).astype(float)
    theta = rng.normal(0, 3.0, mlp.count(P, H))  # large: gradients well above the clip
    ids = np.asarray(persons, dtype=np.int64)
    exponent = -6
    whole = mlp.clipped_sum_units(theta, x, y, ids, hidden=H, clip=clip, exponent=exponent)
    keep = ids != removed
    less = mlp.clipped_sum_units(
        theta, x[keep], y[keep], ids[keep], hidden=H, clip=clip, exponent=exponent
    )
    moved = math.sqrt(sum((a - b) ** 2 for a, b in zip(whole, less, strict=True)))
    assert moved <= mlp.clipped_sensitivity(clip, exponent, mlp.count(P, H))
    # Each person's clipped gradient has norm at most clip.
    grads, _ = mlp.row_gradients(theta, x, y, H)
    assert np.all(np.linalg.norm(mlp.clipped_person_sums(grads, ids, clip), axis=1) <= clip + 1e-9)


def test_a_network_plan_releases_clipped_gradients_and_takes_its_parameters() -> None:
    model = ModelSpec(
        view="cases",
        outcome="died",
        family=Family.BINOMIAL,
        covariates=(Covariate("sex"), Covariate("age")),
        rho=1.0,
        solver="gradient",
        iterations=3,
        hidden=H,
        clip=2.0,
    )
    plan = plan_model(model, CATALOG, node="b", regions=())
    p = len(plan.columns)
    assert plan.parameters == mlp.count(p, H)
    gradient = plan.step(1).vector("gradient")
    assert gradient.length == mlp.count(p, H)
    assert gradient.sensitivity == mlp.clipped_sensitivity(2.0, gradient.exponent, gradient.length)
    from queries.errors import QueryError
    from queries.model_checks import check_coefficients

    assert len(check_coefficients(plan, 1, [0.1] * plan.parameters)) == plan.parameters
    with pytest.raises(QueryError, match="network parameters"):
        check_coefficients(plan, 1, [0.1] * p)
    assert len(check_coefficients(plan, 4, [0.1] * plan.parameters + [-1.0, 1.0])) == (
        plan.parameters + 2
    )
    with pytest.raises(QueryError, match="hidden: a network is trained by gradient descent"):
        ModelSpec(
            view="cases", outcome="died", family=Family.BINOMIAL, covariates=(), rho=1.0, hidden=4
        )
