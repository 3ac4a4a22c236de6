"""The statistical contract of the hub's 95% intervals: coverage of every estimator.

Estimand (a decision of the engine owner). Every interval describes the DP noise (and any
rounding) only, and covers the exact value the nodes' data would give without noise: the
census value. A region's data is the whole population of the region, so there is no sampling
term. The truth of each figure is the figure combine() computes from the exact components
with no noise: each region's NodeRelease built the same way, carrying the exact values.
test_noiseless_figure_is_the_census_aggregate checks that it is the aggregate DuckDB computes
directly (COUNT, SUM, AVG, VAR_SAMP, STDDEV_SAMP, SUM/SUM, SUM/COUNT(*), quantile_disc, bin
counts), to the tolerance of the node's fixed-point rounding.

Method (tests/stats/coverage_harness.py). Fixed, seeded data per region in a real DuckDB; the
exact components computed once with the real engine; each of DRAWS draws adds fresh OpenDP noise
to them with the node's calibrations, applies the node's default disclosure rules (groups below
8 withheld; counts rounded to 5 where their noise is finer than that), builds every region's
NodeRelease as NodeService does, and combines the regions with combine.combine. A figure covers
in a draw if ci_low <= truth <= ci_high. A figure with no estimate (None) does not cover unless
its interval has an infinite end (unbounded by design, e.g. a Fieller interval whose denominator
is within noise of zero); an interval with a None end does not cover. Failure messages count the
draws with no estimate, no interval and an infinite end.

Settings. Three regions each, one or two stays per person (the view's cap is 2):
- "small": 397, 601 and 803 stays per region, where the noise matters a lot;
- "large": 80,004, 99,998 and 120,001 stays per region.
Columns: age (integer, rounded normal in [0, 120]: symmetric), weight_change (float, normal
in [-20, 20]: symmetric, either sign), los (integer in [0, 60], most stays 0-3 days with a
long tail: skewness ~5, kurtosis ~40) and cost (float in [0, 2000], lognormal: skewness ~3,
kurtosis ~17). The variance and standard deviation of los are of CLAMP(los, 0, 20).
Each measure is charged its own rho (RHO_SMALL; the large setting a thousandth of it), chosen
for the noise, not as a budget. At small n, in the smallest region, a figure's noise sd is
12-17% of a count, 35-95% of a histogram bin, 3-5% of a sum, 4-15% of a mean, 8-23% of a
variance (4-12% of a standard deviation), 9-16% of a ratio, 5-50% of a quantile (4-6% of n
in rank); weight_change, whose mean is near 0, aside. At large n it is 2-3% of a count, 5-17%
of a bin, 0.5-2.6% of sums, means, ratios and standard deviations, 1.4-4% of a variance and
1-4% of a quantile. Every denominator is at least 10 noise sds from zero
(test_denominators_are_far_from_zero). Every count here has a noise sd above the node's
rounding step, so nodes do not round them (ReleaseRules.node_rounds,
test_counts_here_are_not_rounded_by_the_node); where a node does round (finer noise), the
interval is widened by the rounding's bound instead, tested in tests/stats/test_rounding.py.

Draws and false failures. If a figure's true coverage is 95%, the number of covering draws is
Binomial(DRAWS, 0.95). With DRAWS = 3,500 it falls outside [93%, 97%] with probability
1.1e-7 (computed exactly in test_the_number_of_draws_makes_false_failures_rare): a test of
one figure fails falsely with probability 1.1e-7, a histogram test (its 4 bins in one region)
below 4.6e-7, both rarer than one in a million (3,300 draws is the fewest, in hundreds, that
keeps a 4-bin test below one in a million, at 9.9e-7; 3,500 halves that). The union bound
over all 352 checked figures is 4.1e-5. The band leaves little room for an interval whose own
coverage is not 95%: at a true coverage of 94.8% or 95.3% the rate per figure is 2.0e-6 or
1.6e-7.

Quantiles. On integer grids (one bin per whole value: age, los) a quantile is a value of the
data, an atom: the estimate and both ends are whole values, and an interval that covers the
rank q * n 95% of the time covers the atom holding it at least as often, usually far more
(the atom absorbs the rank noise that stays inside it). Coverage near 100% is correct there,
so those tests assert only coverage >= 93% (false failure below 1.1e-7 at a true coverage of
95% or more). On continuous grids (weight_change, cost: equal bins, interpolated) the
estimand is the data's histogram on the grid, interpolated within its bin (docs/statistics.md),
its interval inverts the noisy cumulative count at each point, and it is checked against
[93%, 97%] like every other figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from protocols import serde
from queries import combine
from queries.components import role_keys
from queries.sensitivity import COUNT_KINDS, Kind
from queries.spec import Measure, Query, Statistic
from tests.stats import coverage_harness as h
from tests.stats import coverage_rates as cr

pytestmark = pytest.mark.stats

DRAWS = 3_500
LOW, HIGH = 0.93, 0.97
POOLED = combine.POOLED
S = Statistic

# Noise sd of every count and histogram bin at small n (rho = sensitivity^2 / (2 sd^2)): see
# test_count_noise_is_fine_enough_for_a_two_sided_check.
SIGMA_COUNT = 52.25
LARGE_RHO_FACTOR = 1e-3
_PERSONS = 1 / (2 * SIGMA_COUNT**2)  # L2 sensitivity 1
_ROWS = h.CAP**2 * _PERSONS  # L2 sensitivity CAP: rows and histogram bins
COLUMNS = ("age", "weight_change", "los", "cost")
# rho per measure at small n. The variance and standard deviation of a column share their
# components (n, sum, sum of squares), which therefore get the rho of both.
RHO_SMALL = {
    "sum": {"age": 0.07, "weight_change": 0.5, "los": 5.0, "cost": 0.4},
    "mean": {"age": 0.1, "weight_change": 0.5, "los": 0.9, "cost": 0.3},
    "spread": {"age": 1.25, "weight_change": 1.25, "los": 1.25, "cost": 1.25},
    "ratio": {"los_per_stay": 0.9, "cost_per_day": 4.0},
    "quantile": {"age": 0.025, "weight_change": 0.025, "los": 0.025, "cost": 0.025},
}
SPREAD_CLAMP: dict[str, tuple[float, float]] = {"los": (0.0, 20.0)}
# Quantile grids: integer columns one bin per whole value of the clamp range, floats equal bins.
QUANTILE_GRIDS: dict[str, tuple[int | None, tuple[float, float] | None]] = {
    "age": (None, (15.0, 90.0)),  # 76 unit bins
    "los": (None, (0.0, 20.0)),  # 21 unit bins
    "weight_change": (32, None),  # width 1.25
    "cost": (40, (0.0, 1000.0)),  # width 25
}
QUANTILES = (("p10", 0.1), ("median", 0.5), ("p90", 0.9))


def _queries(factor: float) -> tuple[Query, ...]:
    """The queries of a setting, each measure charged its rho times `factor`.

    Measures are grouped by kind so that no two measures of a query share a component unless
    they are meant to (a column's variance and standard deviation; a column's quantiles).
    """
    rho = RHO_SMALL

    def q(measures: list[tuple[Measure, float]]) -> Query:
        return h.query([(m, r * factor) for m, r in measures])

    counts = q(
        [
            (Measure(S.COUNT, "persons"), _PERSONS),
            (Measure(S.COUNT_ROWS, "stays"), _ROWS),
            (Measure(S.HISTOGRAM, "hist_age", column="age", bins=4, clamp=(20.0, 80.0)), _ROWS),
            (Measure(S.HISTOGRAM, "hist_los", column="los", clamp=(0.0, 3.0)), _ROWS),
            (Measure(S.HISTOGRAM, "hist_cost", column="cost", bins=4, clamp=(0.0, 400.0)), _ROWS),
        ]
    )
    sums = q([(Measure(S.SUM, f"sum_{c}", column=c), rho["sum"][c]) for c in COLUMNS])
    means = q([(Measure(S.MEAN, f"mean_{c}", column=c), rho["mean"][c]) for c in COLUMNS])
    spreads = q(
        [
            (Measure(stat, f"{name}_{c}", column=c, clamp=SPREAD_CLAMP.get(c)), rho["spread"][c])
            for c in COLUMNS
            for stat, name in ((S.VARIANCE, "var"), (S.STDDEV, "sd"))
        ]
    )
    # SUM(los) / COUNT(*) and SUM(cost) / SUM(los), apart: they would share SUM(los).
    per_stay = q([(Measure(S.RATIO, "los_per_stay", column="los"), rho["ratio"]["los_per_stay"])])
    per_day = Measure(S.RATIO, "cost_per_day", column="cost", denominator="los")
    quantiles = q(
        [
            (
                Measure(
                    S.QUANTILE,
                    f"{name}_{c}",
                    column=c,
                    quantile=level,
                    bins=QUANTILE_GRIDS[c][0],
                    clamp=QUANTILE_GRIDS[c][1],
                ),
                rho["quantile"][c],
            )
            for c in COLUMNS
            for name, level in QUANTILES
        ]
    )
    return (
        counts,
        sums,
        means,
        spreads,
        per_stay,
        q([(per_day, rho["ratio"][per_day.name])]),
        quantiles,
    )


SMALL = h.Setting("small", rows=(397, 601, 803), seed=20261201, queries=_queries(1.0))
LARGE = h.Setting(
    "large", rows=(80_004, 99_998, 120_001), seed=20261202, queries=_queries(LARGE_RHO_FACTOR)
)
SETTINGS = (SMALL, LARGE)


@dataclass(frozen=True)
class Case:
    """One measure in one region (or pooled) of one setting."""

    setting: h.Setting
    measure: Measure
    region: str

    @property
    def id(self) -> str:
        region = "pooled" if self.region == POOLED else self.region
        return f"{self.setting.name}-{self.measure.name}-{region}"


def _integer_quantile(m: Measure) -> bool:
    return m.statistic is S.QUANTILE and not h.continuous_quantile(m)


def _cases(chosen: Callable[[Measure], bool]) -> list[Case]:
    return [
        Case(s, m, region)
        for s in SETTINGS
        for m in s.measures()
        if chosen(m)
        for region in (*s.regions, POOLED)
    ]


TWO_SIDED = _cases(lambda m: not _integer_quantile(m))
INTEGER_QUANTILES = _cases(_integer_quantile)


def _report(case: Case, truth: str = h.NOISELESS) -> tuple[list[float], str]:
    """Coverage of each of a case's figures (of one truth), and a message naming them."""
    cov = cr.simulate(case.setting, case.measure.name, DRAWS)
    fig = cov.figures
    rows = fig.rows(case.measure.name, case.region)
    assert rows, f"no figure for {case.id}"
    rates = [float(cov.covered[truth][i]) / cov.draws for i in rows]
    parts = []
    for i, rate in zip(rows, rates, strict=True):
        where = "" if fig.bin_lower[i] is None else f"bin [{fig.bin_lower[i]:g}, "
        where += "" if fig.bin_upper[i] is None else f"{fig.bin_upper[i]:g}]: "
        value = cov.truths[truth][i]
        parts.append(f"{where}{rate:.2%} cover the {truth} value {value:.6g}")
    flags = (
        f"no estimate in {int(cov.no_estimate[rows].sum())} draws, no interval in "
        f"{int(cov.no_interval[rows].sum())}, an infinite end in {int(cov.unbounded[rows].sum())}"
    )
    region = "pooled" if case.region == POOLED else f"region {case.region}"
    message = (
        f"{case.measure.statistic.value} {case.measure.name!r}, {region}, {case.setting.name} "
        f"n, over {cov.draws} draws: " + "; ".join(parts) + f" ({flags})"
    )
    return rates, message


@pytest.mark.parametrize("case", TWO_SIDED, ids=[c.id for c in TWO_SIDED])
def test_95_percent_interval_covers_the_census_value_95_percent_of_the_time(case: Case) -> None:
    """Coverage over DRAWS = 3,500 releases is within [93%, 97%] for each figure.

    At a true coverage of 95% one figure falls outside the band with probability 1.1e-7
    (binomial, exact); a histogram case checks its 4 bins, so any case fails falsely with
    probability below 4.6e-7, rarer than one in a million.
    """
    rates, message = _report(case)
    assert all(LOW <= r <= HIGH for r in rates), message


@pytest.mark.parametrize("case", INTEGER_QUANTILES, ids=[c.id for c in INTEGER_QUANTILES])
def test_integer_quantile_interval_covers_at_least_95_percent(case: Case) -> None:
    """Coverage of a quantile on a grid of whole values is at least 93% over 3,500 draws.

    Only a lower bound: on atoms an interval valid for the rank covers the value more often
    than 95%, up to always (module docstring). At a true coverage of 95% or more the estimate
    falls below 93% with probability below 1.1e-7.
    """
    rates, message = _report(case)
    assert all(r >= LOW for r in rates), message


# --- what the coverage rates rest on ------------------------------------------------------


def test_the_number_of_draws_makes_false_failures_rare() -> None:
    """The rates stated in the docstrings, computed exactly from the binomial distribution."""
    per_figure = cr.binomial_outside(DRAWS, 0.95, LOW, HIGH)
    assert 1.1e-7 < per_figure < 1.15e-7
    # The fewest draws, in hundreds, keeping a 4-figure case below one in a million.
    assert 4 * cr.binomial_outside(3_200, 0.95, LOW, HIGH) > 1e-6
    assert 4 * cr.binomial_outside(3_300, 0.95, LOW, HIGH) < 1e-6
    assert 4 * per_figure < 4.6e-7 < 1e-6  # a histogram case checks 4 bins
    assert cr.binomial_below(DRAWS, 0.95, LOW) < per_figure
    figures = sum(
        len(cr.noiseless(c.setting, c.measure.name).rows(c.measure.name, c.region))
        for c in TWO_SIDED + INTEGER_QUANTILES
    )
    assert figures == 352
    assert figures * per_figure < 4.1e-5
    assert cr.binomial_outside(DRAWS, 0.948, LOW, HIGH) < 2.0e-6
    assert cr.binomial_outside(DRAWS, 0.953, LOW, HIGH) < 1.7e-7


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_counts_here_are_not_rounded_by_the_node(setting: h.Setting) -> None:
    """Every count and histogram figure here has a noise sd above the node's rounding step.

    Then the node does not round it (ReleaseRules.node_rounds: noise that coarse already
    hides the last digit), its error is the discrete Gaussian alone, and the two-sided band
    is fair to it. Rounded counts are tested in tests/stats/test_rounding.py. (Row counts
    that only feed a mean or a variance at small n are rounded, and those figures still cover
    within the band: the hub widens for the rounding's bound.)
    """
    for qi, region_plans in enumerate(cr.prepare(setting).plans):
        published = {
            key
            for m in setting.queries[qi].measures
            if m.statistic in combine.COUNT_LIKE
            for key in role_keys(m).values()
        }
        for _, rp in region_plans:
            for r in rp.releases:
                if r.component.key in published:
                    assert not h.RULES.node_rounds(math.sqrt(r.variance)), r.component.key


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_histogram_bins_are_never_empty(setting: h.Setting) -> None:
    """Every histogram bin holds at least 20 stays in every region.

    A count interval truncated at 0 covers a true 0 whenever the noise is below +1.96 sd,
    97.5% of the time; the two-sided band is for counts that are not 0.
    """
    for m in setting.measures():
        if m.statistic is S.HISTOGRAM:
            fig = cr.noiseless(setting, m.name)
            rows = [i for region in fig.regions(m.name).values() for i in region]
            assert len(rows) == 4 * (len(setting.regions) + 1), m.name
            assert all(fig.truth[i] >= 20 for i in rows), (m.name, fig.truth[rows])


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_denominators_are_far_from_zero(setting: h.Setting) -> None:
    """Every mean's, variance's and ratio's denominator is at least 10 noise sds from zero.

    So the noise is not overwhelming: a correct interval is bounded (a Fieller interval is
    unbounded only within z sds of zero) and no figure should lack an estimate.
    """
    plans = cr.prepare(setting).plans
    for qi, q in enumerate(setting.queries):
        for m in q.measures:
            if m.statistic in {S.MEAN, S.VARIANCE, S.STDDEV}:
                kind, column = Kind.ROWS, m.column
            elif m.statistic is S.RATIO:
                kind = Kind.ROWS if m.denominator is None else Kind.SUM
                column = m.denominator
            else:
                continue
            values, variances = [], []
            for _, rp in plans[qi]:
                (found,) = [
                    (rp.exact[r.component.key][0] * r.component.unit, r.variance)
                    for r in rp.releases
                    if r.component.kind is kind and r.component.column == column
                ]
                assert found[0] >= 10 * math.sqrt(found[1]), (m.name, found)
                values.append(found[0])
                variances.append(found[1])
            assert sum(values) >= 10 * math.sqrt(sum(variances)), m.name


def test_data_have_the_stated_shape() -> None:
    """Symmetric age and weight_change; skewed, heavy-tailed los and cost (large, pooled)."""
    runner = cr.prepare(LARGE).runners[POOLED]
    shape = {
        c: (
            runner.scalar(f"SELECT skewness({c}) FROM stays"),  # noqa: S608
            runner.scalar(f"SELECT kurtosis_pop({c}) + 3 FROM stays"),  # noqa: S608
        )
        for c in COLUMNS
    }
    assert abs(shape["age"][0]) < 0.1, shape
    assert abs(shape["weight_change"][0]) < 0.1, shape
    assert 4 < shape["los"][0] < 6, shape
    assert 30 < shape["los"][1] < 50, shape
    assert 2.5 < shape["cost"][0] < 4, shape
    assert 12 < shape["cost"][1] < 25, shape
    assert runner.scalar("SELECT AVG(CASE WHEN los <= 3 THEN 1.0 ELSE 0.0 END) FROM stays") > 0.8


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_the_harness_releases_are_the_node_s(setting: h.Setting) -> None:
    """The harness's release tables equal NodeService._release's on the same noise, and the
    hub's combine() gives the same figures after the releases' trip through protobuf.

    Besides two real draws, three made-up ones exercise the node's small-cell rule: every
    count at suppress_below (released), then below it, then all zero (the group withheld).
    """
    plans = cr.prepare(setting).plans
    for q, region_plans in zip(setting.queries, plans, strict=True):
        for _, rp in region_plans:
            real = h.draw_noisy(rp, 2)
            noisy = {}
            for r in rp.releases:
                c = r.component
                size = len(rp.exact[c.key])
                if c.kind in COUNT_KINDS:  # a total of exactly suppress_below, then less
                    at = [h.RULES.suppress_below] + [0] * (size - 1)
                    below = [h.RULES.suppress_below - 1] + [0] * (size - 1)
                else:
                    at = below = [12_345] * size
                rows = [real[c.key][0], real[c.key][1], at, below, [0] * size]
                noisy[c.key] = np.array(rows, dtype=np.int64)
            drawn = h.Draws(rp, noisy)
            counted = any(r.component.kind in COUNT_KINDS for r in rp.releases)
            assert drawn.withheld.tolist() == [False, False, False, counted, counted]
            for d in range(5):
                expected = rp.engine_table({k: v[d].tolist() for k, v in noisy.items()})
                assert drawn.table(d).equals(expected), (q.measures[0].name, d)
        sent = [
            (name, rp.release(h.Draws(rp, h.draw_noisy(rp, 1)).table(0)))
            for name, rp in region_plans
        ]
        received = [(name, serde.release_from_proto(serde.release_to_proto(r))) for name, r in sent]
        assert combine.combine(q, received).equals(combine.combine(q, sent))


# --- the truth is the census value ----------------------------------------------------------

SANITY = [
    (s, stat)
    for s in SETTINGS
    for stat in Statistic
    if any(m.statistic is stat for m in s.measures())
]


@pytest.mark.parametrize(
    ("setting", "statistic"), SANITY, ids=[f"{s.name}-{st.value}" for s, st in SANITY]
)
def test_noiseless_figure_is_the_census_aggregate(setting: h.Setting, statistic: Statistic) -> None:
    """combine() on exact releases gives DuckDB's own aggregate, per region and pooled.

    Tolerances are those of the node's fixed-point rounding (each row's value, or square, is
    rounded to the component's unit: at most half a unit per row); zero where the rounding is
    exact (counts, integer columns in units of 1, integer quantiles, histograms); one bin
    width for a quantile interpolated on a continuous grid.
    """
    runners = cr.prepare(setting).runners
    checked = 0
    for m in setting.measures():
        if m.statistic is not statistic:
            continue
        fig = cr.noiseless(setting, m.name)
        for region, runner in runners.items():
            rows = fig.rows(m.name, region)
            got = [float(fig.truth[i]) for i in rows]
            edges = [fig.bin_lower[i] for i in rows] + [fig.bin_upper[rows[-1]]]
            want, tolerance = cr.census(runner, setting, m, edges)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                slack = tolerance + 1e-9 * max(1.0, abs(w))
                assert abs(g - w) <= slack, (m.name, region, g, w, tolerance)
            checked += 1
    assert checked > 0
