"""Funnel limits, the overdispersion estimator and O/E intervals (coordinator/learning)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from coordinator.learning import funnel
from coordinator.learning.compare import NO_ESTIMATE, flag, unit_ratio, z_score
from queries.fitted import NodeTotals


@pytest.mark.parametrize("expected", [0.7, 3.0, 10.0, 47.5, 100.0, 1000.0, 25_000.0])
@pytest.mark.parametrize("p", [0.001, 0.025, 0.975, 0.999])
def test_exact_limits_are_spiegelhalters_interpolated_poisson_quantiles(
    expected: float, p: float
) -> None:
    # Spiegelhalter (2005), appendix A.1.2: r_p the Poisson p quantile, alpha the share of
    # the step at r_p above p, limit (r_p - alpha) / E; here against scipy's Poisson.
    r = stats.poisson.ppf(p, expected)
    above, below = stats.poisson.cdf(r, expected), stats.poisson.cdf(r - 1, expected)
    alpha = (above - p) / (above - below)
    want = max(0.0, r - alpha) / expected
    assert funnel.poisson_limit(expected, p) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert (r - 1) / expected <= funnel.poisson_limit(expected, p) <= r / expected


def test_exact_limits_at_known_values() -> None:
    # E = 100: the 97.5% quantile of Poisson(100) is 120 (F(119) = 0.9718, F(120) = 0.9773),
    # so the limit interpolates to 1.196; the 0.1% one is 71 -> 0.70.
    assert funnel.poisson_limit(100.0, 0.975) == pytest.approx(1.1958, abs=1e-4)
    assert funnel.poisson_limit(100.0, 0.001) == pytest.approx(0.7007, abs=1e-4)
    # With little noise and many events the limits approach the normal 1 +- z sqrt(1/E).
    low, high = funnel.limits(10_000.0, 0.95)
    assert low == pytest.approx(1 - 1.96 / 100, abs=2e-4)
    assert high == pytest.approx(1 + 1.96 / 100, abs=2e-4)


@pytest.mark.parametrize(("expected", "variance"), [(5.0, 4.0), (100.0, 400.0), (900.0, 25.0)])
@pytest.mark.parametrize("p", [0.001, 0.025, 0.975, 0.999])
def test_dp_limits_are_quantiles_of_poisson_plus_gaussian(
    expected: float, variance: float, p: float
) -> None:
    limit = funnel.poisson_limit(expected, p, variance)
    k = np.arange(0, int(expected + 20 * math.sqrt(expected) + 50))
    cdf = np.sum(
        stats.poisson.pmf(k, expected)
        * stats.norm.cdf((limit * expected - k) / math.sqrt(variance))
    )
    assert cdf == pytest.approx(p, abs=1e-6)
    # The noise only widens the funnel.
    exact = funnel.poisson_limit(expected, p)
    assert (limit >= exact - 1e-9) if p > 0.5 else (limit <= exact + 1e-9)


def test_overdispersed_limits_are_normal_with_phi() -> None:
    low, high = funnel.limits(400.0, 0.998, dp_variance=100.0, phi=2.0)
    sd = math.sqrt(2.0 * (1 / 400 + 100 / 400**2))
    assert high - 1 == pytest.approx(stats.norm.ppf(0.999) * sd)
    assert 1 - low == pytest.approx(stats.norm.ppf(0.999) * sd)


def test_overdispersion_estimator_recovers_phi_on_simulated_units() -> None:
    rng = np.random.default_rng()  # unseeded: the bounds hold for any draw
    for phi in (1.0, 2.5):
        z = rng.normal(0.0, math.sqrt(phi), size=20_000)
        # Winsorising at the 10th/90th percentiles (+-1.2816 sd) keeps E[z_w^2] = phi * c,
        # c the clipped standard normal's second moment, computed here from the normal.
        q = stats.norm.ppf(0.9)
        inner = 1 - 2 * (q * stats.norm.pdf(q) + (1 - stats.norm.cdf(q)))
        c = inner + 2 * 0.1 * q**2
        estimate = funnel.overdispersion(z)
        # A clipped square lies in [0, 1.65 phi], so the sd of the mean of 20,000 is below
        # 0.006 * phi: 6 sd (a false failure of 2e-9) is 0.036 * phi.
        assert estimate == pytest.approx(phi * c, abs=0.036 * phi)
    # One wild unit moves the winsorised estimate little, the raw mean a lot.
    z = np.concatenate([rng.normal(size=99), [40.0]])
    assert funnel.overdispersion(z) < 2.0 < float(np.mean(z**2))


CASES = [
    # (E, true ratio, v1 of the outcome sum, v2 of the residual sum)
    (1000.0, 1.0, 10_000.0, 10_000.0),
    (30.0, 1.0, 1.0, 1.0),
    (100.0, 0.7, 400.0, 25.0),
    (100.0, 1.5, 25.0, 400.0),
]


@pytest.mark.parametrize(("expected", "ratio", "v1", "v2"), CASES)
def test_oe_intervals_cover_the_true_ratio_with_known_noise(
    expected: float, ratio: float, v1: float, v2: float
) -> None:
    rng = np.random.default_rng()  # unseeded
    draws = 20_000
    observed = rng.poisson(ratio * expected, size=draws)
    outcome = observed + rng.normal(0.0, math.sqrt(v1), size=draws)
    residual = observed - expected + rng.normal(0.0, math.sqrt(v2), size=draws)
    hits = 0
    for o, g in zip(outcome, residual, strict=True):
        u = unit_ratio(NodeTotals("a", float(o), v1, float(g), v2, 1))
        # A draw whose noisy E is not positive has no estimate, and its interval (0, inf)
        # covers: it says nothing, which is honest (about 1% of draws in the noisiest cases).
        hits += u.ci_low <= ratio <= u.ci_high
    coverage = hits / draws
    # Measured 0.943 to 0.964 (the log-scale delta method is approximate). The estimate's sd
    # is 0.0016 at 20,000 draws; 0.95 +- 0.02 is over 6 sd from anything in 0.935..0.965,
    # a false failure below 2e-9.
    assert 0.93 <= coverage <= 0.97


def test_a_noisy_expected_count_below_zero_is_reported_not_raised() -> None:
    # After the fit has charged, the data (here, the noise) must not turn into an error.
    u = unit_ratio(NodeTotals("thin", 3.0, 100.0, 40.0, 100.0, 1))
    assert u.flag == NO_ESTIMATE
    assert math.isnan(u.ratio)
    assert (u.ci_low, u.ci_high) == (0.0, math.inf)


def test_a_unit_far_above_the_funnel_is_flagged_and_one_on_it_is_not() -> None:
    high = unit_ratio(NodeTotals("worse", 1300.0, 100.0, 300.0, 100.0, 1))
    level = unit_ratio(NodeTotals("usual", 1000.0, 100.0, 5.0, 100.0, 1))
    assert flag(high, None) == "above 99.8%"
    assert z_score(high) > 3
    assert flag(level, None) == ""
    # A large phi pulls the worse unit back inside the 99.8% limits.
    assert flag(high, 25.0) != "above 99.8%"


def test_node_totals_cross_the_wire_and_impossible_ones_are_refused() -> None:
    from protocols import serde_fit
    from queries.errors import DataError
    from queries.fitted import FittedModel
    from queries.model import Family

    totals = (NodeTotals("nenc", 508.0, 0.25, -28.4, 0.5, 8),)
    fitted = FittedModel(
        "q", Family.BINOMIAL, "logit", (), (), (), False, 10, "", totals, (0.1, -0.2)
    )
    wire = serde_fit.fitted_to_proto(fitted)
    back = serde_fit.fitted_from_proto(wire)
    assert back.node_totals == totals
    assert back.totals_coefficients == (0.1, -0.2)
    wire.node_totals[0].residual_variance = -1.0
    with pytest.raises(DataError, match="nenc"):
        serde_fit.fitted_from_proto(wire)


def _release(node: str, step: int, units: tuple[str, ...], name: str, values: list[float]):  # type: ignore[no-untyped-def]
    from queries.model import StepRelease

    return StepRelease(
        node=node,
        step=step,
        columns=("(intercept)",),
        vectors={name: tuple(values)},
        variances={name: 2.0 if step == 0 else 3.0},
        rho=0.1,
        units=units,
    )


def test_units_are_summed_over_nodes_and_small_ones_suppressed() -> None:
    from coordinator.learning.units import unit_totals
    from queries.results import ReleaseRules

    design = [
        _release("a", 0, ("RTD", "other"), "unit_outcome", [120.0, 3.0]),
        _release("b", 0, ("RXL", "other"), "unit_outcome", [90.0, 4.0]),
    ]
    expected = [
        _release("a", 7, ("RTD", "other"), "unit_residual", [10.0, 1.0]),
        _release("b", 7, ("RXL", "other"), "unit_residual", [-5.0, 0.5]),
    ]
    totals = {t.unit: t for t in unit_totals(design, expected, ReleaseRules(suppress_below=8))}
    assert list(totals) == ["RTD", "other", "RXL"]  # in the nodes' order, each level once
    assert (totals["RTD"].outcome_sum, totals["RTD"].residual_sum) == (120.0, 10.0)
    assert totals["RTD"].nodes == ("a",)
    # 'other' is at both nodes: 3 + 4 = 7 events, below 8, so it is shown without figures.
    other = totals["other"]
    assert other.suppressed
    assert other.nodes == ("a", "b")
    assert math.isnan(other.outcome_sum)
    assert "fewer than 8" in other.reason
    # Not suppressed at 7: its sums and their variances add over the nodes.
    loose = {t.unit: t for t in unit_totals(design, expected, ReleaseRules(suppress_below=7))}
    assert (loose["other"].outcome_sum, loose["other"].residual_sum) == (7.0, 1.5)
    assert (loose["other"].outcome_variance, loose["other"].residual_variance) == (4.0, 6.0)


def test_a_suppressed_unit_is_named_without_figures_and_never_an_outlier() -> None:
    from coordinator.learning.compare import compare_units
    from coordinator.learning.result import FitResult
    from protocols import serde_fit
    from queries.fitted import FittedModel, UnitTotals
    from queries.model import Family

    units = (
        UnitTotals("RXL", 1300.0, 100.0, 300.0, 100.0, ("nwc",)),
        UnitTotals("RTD", 1000.0, 100.0, 5.0, 100.0, ("nenc",)),
        UnitTotals("none", *(math.nan,) * 4, ("nenc", "nwc"), True, "suppressed: few"),
    )
    fitted = FittedModel(
        "q", Family.BINOMIAL, "logit", (), (), (), False, 10, "", unit_totals=units,
        compare_by="care_site",
    )  # fmt: skip
    back = serde_fit.fitted_from_proto(serde_fit.fitted_to_proto(fitted))
    assert back.unit_totals[:2] == units[:2]
    assert back.unit_totals[2].suppressed
    assert back.compare_by == "care_site"
    result = compare_units(
        back.unit_totals, overdispersed=False, by="care_site", fit=FitResult.of(back)
    )
    assert result.outliers == ("RXL",)
    none = result.units[2]
    assert none.flag == "suppressed: few"
    assert math.isnan(none.ratio)
    (line,) = [r for r in result.summary().splitlines() if r.startswith("none ")]
    assert line.split()[1:5] == ["-"] * 4
    assert line.endswith("suppressed: few")
    assert math.isfinite(result.phi_estimate)  # from the scored units only
    assert result.to_dict()["units"][2]["ratio"] is None


def test_a_figure_option_names_one_format_or_both() -> None:
    from pathlib import Path

    from coordinator.learning.plot import figure_paths
    from queries.errors import ConfigError

    assert figure_paths(Path("out/f.svg")) == (Path("out/f.svg"),)
    assert figure_paths(Path("out/f")) == (Path("out/f.png"), Path("out/f.svg"))
    with pytest.raises(ConfigError, match=r"--plot f.pdf: give a file ending in .png or .svg"):
        figure_paths(Path("f.pdf"))
