"""Interrupted time series and DiD (coordinator/learning/its.py, did.py): coverage of the
known step over repeated noisy runs, without processes.

Each run draws the monthly counts (Poisson around the known means) and adds DP noise of a
known variance (rounded Gaussian, as the discrete Gaussian is: variance sd^2 + 1/12 stated),
then fits. Over RUNS runs the share of 95% intervals holding the truth is Binomial(RUNS,
0.95) if the intervals are right; the bounds are 5 standard deviations of that share
(0.95 +- 0.0172 at 4,000 runs), so a correct method fails one time in 1.7 million (two-sided
normal tail at 5 sd: 5.7e-7).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.learning import did, its
from coordinator.local import synth
from queries.errors import ConfigError

RUNS = 4_000
NOMINAL = 0.95
TOLERANCE = 5 * math.sqrt(NOMINAL * (1 - NOMINAL) / RUNS)
TRUE_RATIO = synth.INTERVENTION.rate_ratio
MONTHS = its.month_range("2023-01", "2025-12")  # the synthetic regions' three years
T0 = synth.INTERVENTION.start_month


def _means(level: float, trend: float, ratio: float, season: float = 0.15) -> np.ndarray:
    """Monthly means: a trend and a season, the step making month T0 `ratio` of the baseline."""
    x = its.design(MONTHS, T0, seasonal=True)
    beta = np.array([level, trend, 0.0, 0.0, season * level, 0.5 * season * level])
    baseline = float(x[MONTHS.index(T0)] @ beta)
    beta[2] = (ratio - 1.0) * baseline
    out: np.ndarray = x @ beta
    return out


def _series(rng: np.random.Generator, means: np.ndarray, sd: float) -> its.Series:
    noisy = rng.poisson(means) + np.round(rng.normal(0.0, sd, means.shape[0]))
    variance = np.full(means.shape[0], sd * sd + 1 / 12)
    return its.Series("r", MONTHS, noisy.astype(np.float64), variance)


def _assert_nominal(covered: int) -> None:
    share = covered / RUNS
    assert abs(share - NOMINAL) <= TOLERANCE, (share, NOMINAL, TOLERANCE)


@pytest.mark.parametrize("sd", [1.0, 8.0])
def test_its_rate_ratio_covers_the_injected_step_at_the_nominal_rate(sd: float) -> None:
    # The injected change: INTERVENTION.rate_ratio (0.8) from its month, a baseline of about
    # 45 admissions a month with a trend and a season; DP noise sd 1 (rho large) and 8.
    means = _means(45.0, 0.3, TRUE_RATIO)
    rng = np.random.default_rng()
    covered_ratio = covered_step = 0
    true_step = float(means[MONTHS.index(T0)] - _means(45.0, 0.3, 1.0)[MONTHS.index(T0)])
    for _ in range(RUNS):
        f = its.fit(_series(rng, means, sd), T0)
        covered_ratio += f.rate_ratio.covers(TRUE_RATIO)
        covered_step += f.step.covers(true_step)
    _assert_nominal(covered_ratio)
    _assert_nominal(covered_step)


def test_did_covers_the_injected_effect_against_unchanged_controls() -> None:
    # Treated: the step; controls (two regions' sum, larger): the same relative trend and
    # season, no step. The ratio of rate ratios is then TRUE_RATIO, and the parallel-trends
    # check's interval holds 0 at its nominal rate.
    treated_means = _means(45.0, 0.3, TRUE_RATIO)
    control_means = _means(110.0, 110.0 / 45.0 * 0.3, 1.0)
    rng = np.random.default_rng()
    covered = parallel = 0
    for _ in range(RUNS):
        d = did.fit(_series(rng, treated_means, 8.0), _series(rng, control_means, 8.0 * 1.4), T0)
        covered += d.ratio_of_ratios.covers(TRUE_RATIO)
        parallel += d.parallel
    _assert_nominal(covered)
    _assert_nominal(parallel)


def test_the_parallel_trends_check_flags_diverging_controls() -> None:
    # Controls rising 2% of their level a month against a flat treated region, both about
    # 400 a month: the difference is about 7 standard errors, so the check sees it in all
    # but a vanishing share of runs (a miss in more than 1% of 500 runs fails).
    rng = np.random.default_rng()
    flagged = 0
    for _ in range(500):
        d = did.fit(
            _series(rng, _means(400.0, 0.0, TRUE_RATIO), 2.0),
            _series(rng, _means(400.0, 8.0, 1.0), 2.0),
            T0,
        )
        flagged += not d.parallel
    assert flagged >= 495


def test_exact_counts_recover_the_step() -> None:
    # No noise at all and no Poisson draw: the fit returns the injected figures exactly.
    means = _means(45.0, 0.3, TRUE_RATIO)
    f = its.fit(its.Series("r", MONTHS, means, np.zeros(len(MONTHS))), T0)
    assert f.rate_ratio.estimate == pytest.approx(TRUE_RATIO, rel=1e-9)
    assert f.coefficient("trend").estimate == pytest.approx(0.3, rel=1e-9)
    assert f.seasonal


def test_short_series_drop_the_season_and_refuse_too_few_months() -> None:
    months = its.month_range("2024-01", "2024-09")
    s = its.Series("r", months, np.full(9, 10.0), np.ones(9))
    assert not its.fit(s, "2024-04").seasonal
    with pytest.raises(ConfigError, match="at least 3 months on each side"):
        its.fit(s, "2024-08")
    with pytest.raises(ConfigError, match="not within the series"):
        its.fit(s, "2025-01")
    with pytest.raises(ConfigError, match="YYYY-MM"):
        its.month_index("2024-13")
