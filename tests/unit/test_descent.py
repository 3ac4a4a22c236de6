"""Gradient descent and the held-out AUC (coordinator/learning/descent.py) on exact sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata

from coordinator.learning.descent import (
    auc_from_histograms,
    auc_noise_sd,
    descend,
    held_out_auc,
)
from queries.model import Covariate, Family, ModelSpec, StepRelease
from queries.model_plan import SCORE_BINS


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    r = rankdata(s)
    n1 = y.sum()
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An intercept, a 3-level category (two indicators) and a number in [0, 1]."""
    level = rng.integers(0, 3, n)
    age = rng.uniform(0, 1, n)
    x = np.column_stack([np.ones(n), level == 1, level == 2, age]).astype(float)
    truth = np.array([-1.5, 0.6, 1.2, 1.5])
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ truth)))).astype(float)
    return x, y, truth


COLUMNS = ("(intercept)", "band[b]", "band[c]", "age")
MODEL = ModelSpec(
    view="v",
    outcome="died",
    family=Family.BINOMIAL,
    covariates=(Covariate("band"), Covariate("age")),
    rho=1.0,
    solver="gradient",
    iterations=30,
)


def _release(step: int, vectors: dict[str, list[float]]) -> StepRelease:
    return StepRelease(
        node="a",
        step=step,
        columns=COLUMNS,
        vectors={k: tuple(v) for k, v in vectors.items()},
        variances=dict.fromkeys(vectors, 0.0),
        rho=0.0,
    )


def test_descent_reaches_the_maximum_likelihood_ranking_on_exact_sums() -> None:
    x, y, truth = _data(np.random.default_rng(3), 20_000)
    counts = [len(y), float(x[:, 1].sum()), float(x[:, 2].sum()), 0.0]
    design = [_release(0, {"n": [len(y)], "level_counts": counts, "outcome_sum": [float(y.sum())]})]

    def ask(k: int, b: object) -> list[StepRelease]:
        mu = 1 / (1 + np.exp(-(x @ np.asarray(b))))
        loss = -(y * np.log(mu) + (1 - y) * np.log(1 - mu))
        return [_release(k, {"gradient": list(x.T @ (y - mu)), "loss": [float(loss.sum())]})]

    result = descend(MODEL, design, nonzero=3, ask=ask)
    assert result.columns == COLUMNS
    # The score range holds nearly every row's eta (4 sds of the level shares' spread).
    eta = x @ np.asarray(result.coefficients)
    low, high = result.score_range
    assert np.mean((eta >= low) & (eta <= high)) > 0.99
    losses = [r.loss for r in result.rounds]
    assert len(losses) == 30
    assert losses[-1] < losses[0]  # it learns
    # The ranking is as good as the true model's, to 0.005 (20,000 rows: the AUC's sampling
    # sd is about 0.004, but both are measured on the same rows, so the gap is far smaller).
    assert _auc(y, x @ np.asarray(result.coefficients)) > _auc(y, x @ truth) - 0.005


def test_auc_from_histograms_is_mann_whitney_with_ties_halved() -> None:
    rng = np.random.default_rng(8)
    y = (rng.random(5000) < 0.3).astype(float)
    eta = rng.normal(0, 1.5, 5000) + y
    low, high = -6.0, 4.0
    bins = np.clip(np.floor((eta - low) / ((high - low) / SCORE_BINS)), 0, SCORE_BINS - 1)
    events = [float(np.sum((y == 1) & (bins == j))) for j in range(SCORE_BINS)]
    others = [float(np.sum((y == 0) & (bins == j))) for j in range(SCORE_BINS)]
    # Mann-Whitney on the bin numbers themselves (midranks for ties) is the same statistic.
    assert auc_from_histograms(events, others) == pytest.approx(_auc(y, bins), abs=1e-12)
    # And binning in 30 bins of eta costs little against the unbinned scores.
    assert abs(auc_from_histograms(events, others) - _auc(y, eta)) < 0.005
    release = StepRelease("a", 7, COLUMNS, {"score_hist": (*events, *others)}, {}, 0.0)
    auc, sd, held = held_out_auc([release, release])
    assert sd == 0.0  # no noise variance stated
    assert auc == pytest.approx(auc_from_histograms(events, others))
    assert held == 10_000
    # No class means no AUC; noisy negative counts are used as they are (no clipping bias).
    assert math.isnan(auc_from_histograms([0.0, 0.0], [5.0, 1.0]))
    assert auc_from_histograms([-1.0, 3.0], [2.0, 0.0]) == pytest.approx(
        (3.0 * 2.0 + 0.5 * -1.0 * 2.0) / (2.0 * 2.0)
    )


def test_the_auc_noise_sd_matches_simulated_noise() -> None:
    """Noise of variance 9 on every bin of 30 + 30 counts, 20,000 draws: the simulated sd of
    the AUC is within 10% of the delta-method sd (its own sampling error is under 1%)."""
    rng = np.random.default_rng(12)
    events = rng.poisson(np.linspace(2, 60, SCORE_BINS)).astype(float)
    others = rng.poisson(np.linspace(90, 5, SCORE_BINS)).astype(float)
    noisy = [
        auc_from_histograms(
            (events + rng.normal(0, 3, SCORE_BINS)).tolist(),
            (others + rng.normal(0, 3, SCORE_BINS)).tolist(),
        )
        for _ in range(20_000)
    ]
    predicted = auc_noise_sd(events.tolist(), others.tolist(), 9.0)
    assert float(np.std(noisy)) == pytest.approx(predicted, rel=0.1)
