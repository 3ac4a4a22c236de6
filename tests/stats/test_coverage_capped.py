"""Coverage at an analyst's lower cap: rows_per_person = 1 on the two-stays-per-person view.

Estimand. At a lower cap a figure estimates the truncated census: the exact value on the rows
the cap keeps (each person's first stay by the view's rank column), not on every row; the
bias of the truncation is the analyst's choice (docs/statistics.md, "Analyst-chosen caps"),
and the interval covers the noise only. test_the_truth_is_the_truncated_census checks that the
truth of every figure is DuckDB's own aggregate on the kept rows, and differs from the full
census where it should (30% of persons have a second stay, which the cap leaves out).

Method and false failures: those of tests/stats/test_coverage.py (same harness, noise and
rules; DRAWS = 3,500 draws, band [93%, 97%]): a figure fails falsely with probability 1.1e-7,
a 4-bin histogram case below 4.6e-7; the union bound over the 40 figures here is 4.4e-6.
The stays count's noise sd is 16-19% of it in the smallest region (tested below).
"""

from __future__ import annotations

import dataclasses
import math

import pyarrow.compute as pc
import pytest

from queries import combine, plan
from queries.spec import Measure, Query, Statistic
from tests.stats import coverage_harness as h
from tests.stats import coverage_rates as cr
from tests.stats.test_coverage import DRAWS, HIGH, LOW, SIGMA_COUNT

pytestmark = pytest.mark.stats

S = Statistic
POOLED = combine.POOLED
# At cap 1 every count has L2 sensitivity 1: this rho gives the same sd as test_coverage's.
_COUNT = 1 / (2 * SIGMA_COUNT**2)


def _capped(measures: list[tuple[Measure, float]]) -> Query:
    return dataclasses.replace(h.query(measures), rows_per_person=1)


CAPPED = h.Setting(
    "capped",
    rows=(397, 601, 803),
    seed=20261203,
    queries=(
        _capped(
            [
                (Measure(S.COUNT_ROWS, "stays"), _COUNT),
                (Measure(S.HISTOGRAM, "hist_los", column="los", clamp=(0.0, 3.0)), _COUNT),
            ]
        ),
        _capped([(Measure(S.SUM, "sum_cost", column="cost"), 0.1)]),
        _capped(
            [
                (Measure(S.MEAN, "mean_los", column="los"), 0.25),
                (Measure(S.MEAN, "mean_cost", column="cost"), 0.1),
            ]
        ),
        _capped([(Measure(S.VARIANCE, "var_los", column="los", clamp=(0.0, 20.0)), 0.3)]),
        _capped(
            [
                (
                    Measure(
                        S.QUANTILE,
                        "median_cost",
                        column="cost",
                        quantile=0.5,
                        bins=40,
                        clamp=(0.0, 1000.0),
                    ),
                    0.01,
                )
            ]
        ),
    ),
)
CASES = [(m, region) for m in CAPPED.measures() for region in (*CAPPED.regions, POOLED)]


def test_the_plans_count_one_stay_per_person() -> None:
    """Every component's sensitivity is half what it is at the view's cap of 2 (but the
    persons count's, 1 at any cap: a person is in the one group once)."""
    for q, region_plans in zip(CAPPED.queries, cr.prepare(CAPPED).plans, strict=True):
        full = {
            c.key: c.sensitivity
            for c in plan.compile_query(
                dataclasses.replace(q, rows_per_person=None), h.CATALOG
            ).components
        }
        for _, rp in region_plans:
            assert rp.compiled.rows_per_person == 1
            for r in rp.releases:
                assert r.component.sensitivity == full[r.component.key] / 2, r.component.key


@pytest.mark.parametrize(("measure", "region"), CASES, ids=[f"{m.name}-{r}" for m, r in CASES])
def test_95_percent_interval_covers_the_truncated_census_value(
    measure: Measure, region: str
) -> None:
    """Coverage over DRAWS = 3,500 releases is within [93%, 97%] for each figure (a false
    failure has probability 1.1e-7 per figure at a true coverage of 95%)."""
    cov = cr.simulate(CAPPED, measure.name, DRAWS)
    rows = cov.figures.rows(measure.name, region)
    assert rows
    rates = [float(cov.covered[h.NOISELESS][i]) / cov.draws for i in rows]
    assert all(LOW <= r <= HIGH for r in rates), (measure.name, region, rates)


def test_the_truth_is_the_truncated_census() -> None:
    """combine() on exact releases at cap 1 gives DuckDB's aggregate on each person's first
    stay (to the node's fixed-point rounding), per region and pooled; the stays count is
    well below the full census count."""
    prepared = cr.prepare(CAPPED)
    kept = {
        region: h.Runner([t.filter(pc.less_equal(t[h.RANK], 1))])
        for region, t in prepared.tables.items()
    }
    kept[POOLED] = h.Runner(
        [t.filter(pc.less_equal(t[h.RANK], 1)) for t in prepared.tables.values()]
    )
    for m in CAPPED.measures():
        fig = cr.noiseless(CAPPED, m.name)
        for region, runner in kept.items():
            rows = fig.rows(m.name, region)
            got = [float(fig.truth[i]) for i in rows]
            edges = [fig.bin_lower[i] for i in rows] + [fig.bin_upper[rows[-1]]]
            want, tolerance = cr.census(runner, CAPPED, m, edges)
            for g, w in zip(got, want, strict=True):
                assert abs(g - w) <= tolerance + 1e-9 * max(1.0, abs(w)), (m.name, region, g, w)
    stays = cr.noiseless(CAPPED, "stays")
    for region, runner in prepared.runners.items():
        (i,) = stays.rows("stays", region)
        full = runner.scalar("SELECT COUNT(*) FROM stays")
        # 30% of persons have a second stay: the full count is ~1.3 times the kept one.
        assert full - stays.truth[i] > 0.15 * full, region
        assert stays.truth[i] == runner.scalar("SELECT COUNT(DISTINCT person_id) FROM stays")


def test_the_noise_here_is_as_stated() -> None:
    """The noise sds the module docstring states, in the smallest region (r1)."""
    fig = {m.name: cr.noiseless(CAPPED, m.name) for m in CAPPED.measures()}
    (stays,) = fig["stays"].rows("stays", "r1")
    assert 0.15 < SIGMA_COUNT / fig["stays"].truth[stays] < 0.19
    assert math.isclose(1 / math.sqrt(2 * _COUNT), SIGMA_COUNT)
