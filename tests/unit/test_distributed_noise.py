"""The distributed discrete Gaussian: share scales, both guarantees, refusals, OpenDP shares.

The accounting is Kairouz, Liu and Steinke 2021, Proposition 14 (queries/distributed_noise.py):
these tests check it against the formula written out by hand, against the central
calibration it must reduce to, and that the solved share scale is the smallest that works.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from queries import distributed_noise as dn
from queries import mechanisms
from queries.errors import QueryError


def test_one_share_is_the_central_discrete_gaussian() -> None:
    """t = 1: no sum, no penalty, the same scale as mechanisms.calibrate and no upscaling."""
    cal = dn.calibrate_distributed(2.0, 0.05, 5, 1)
    central = mechanisms.calibrate(2.0, 0.05)
    assert cal.upscale == 1
    assert cal.share_scale == pytest.approx(central.scale, rel=1e-8)
    assert cal.rho_threshold == pytest.approx(0.05, rel=1e-8)
    assert cal.rho_threshold <= 0.05
    # All five honest: five shares sum to five times the variance, a fifth of the rho.
    assert cal.rho_all_honest == pytest.approx(0.05 / 5, rel=1e-6)


def test_tau_and_rho_follow_kls21_proposition_14() -> None:
    """tau and rho written out by hand for 3 shares of scale 0.8 on a 10-cell query."""
    sigma, d, delta = 0.8, 10, 1.0
    tau = 10 * (math.exp(-2 * math.pi**2 * 0.64 / 2) + math.exp(-2 * math.pi**2 * 0.64 * 2 / 3))
    assert dn.kls_tau(sigma, 3) == pytest.approx(tau, rel=1e-12)
    assert dn.kls_tau(sigma, 1) == 0.0
    s = delta / (math.sqrt(3) * sigma)
    expected = min(s * s / 2 + tau * d, (s + math.sqrt(d) * tau) ** 2 / 2)
    assert dn.sum_rho(sigma, delta, 3, d) == pytest.approx(expected, rel=1e-12)
    assert dn.sum_rho(sigma, delta, 1, d) == pytest.approx(delta**2 / (2 * sigma**2))


@pytest.mark.parametrize(("k", "t", "d"), [(4, 4, 1), (16, 16, 1), (16, 8, 2250), (3, 2, 40)])
def test_share_scale_is_the_smallest_that_meets_the_target(k: int, t: int, d: int) -> None:
    """Without upscaling, small shares pay KLS21's penalty: sigma solves rho_t(sigma) = rho."""
    rho = 0.1
    cal = dn.calibrate_distributed(1.0, rho, k, t, dimension=d, upscale=1)
    assert cal.rho_threshold <= rho
    assert cal.rho_threshold == pytest.approx(rho, rel=1e-6)
    # A share one part in a million narrower would overspend.
    assert dn.sum_rho(cal.share_scale * (1 - 1e-6), 1.0, t, d) > rho
    # The ideal (penalty-free) share would be the central scale over sqrt(t); it is wider.
    assert cal.share_scale >= 1.0 / math.sqrt(2 * rho * t)
    assert cal.rho_all_honest <= cal.rho_threshold


def test_the_penalty_is_real_and_upscaling_removes_it() -> None:
    """A count at rho 0.1 over 16 nodes: 28% wider than central DP unscaled, 1e-8 scaled."""
    central_var = mechanisms.calibrate(1.0, 0.1).variance
    raw = dn.calibrate_distributed(1.0, 0.1, 16, 16, upscale=1)
    assert math.sqrt(raw.pooled_variance / central_var) > 1.2
    cal = dn.calibrate_distributed(1.0, 0.1, 16, 16)
    assert cal.upscale == 10
    assert math.sqrt(cal.pooled_variance / central_var) == pytest.approx(1.0, abs=1e-6)
    assert cal.pooled_variance == pytest.approx(16 * cal.share_variance / 100)


def test_fewer_honest_nodes_mean_wider_shares_and_both_guarantees() -> None:
    """t = k/2: each share is sqrt(2) wider than at t = k; with all honest, rho halves."""
    full = dn.calibrate_distributed(1.0, 0.1, 16, 16, upscale=100)
    half = dn.calibrate_distributed(1.0, 0.1, 16, 8, upscale=100)
    assert half.share_scale / full.share_scale == pytest.approx(math.sqrt(2), rel=1e-6)
    assert half.rho_threshold <= 0.1
    assert half.rho_all_honest == pytest.approx(0.05, rel=1e-6)


def test_share_scale_never_goes_below_one_half() -> None:
    cal = dn.calibrate_distributed(1.0, 100.0, 4, 4, upscale=1)
    assert cal.share_scale >= dn.MIN_SHARE_SCALE
    assert cal.rho_threshold < 100.0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"threshold": 5}, "between 1 and the number of nodes"),
        ({"threshold": 0}, "between 1 and the number of nodes"),
        ({"nodes": 0, "threshold": 1}, "nodes must be at least 1"),
        ({"rho": 0.0}, "rho must be positive"),
        ({"rho": -1.0}, "rho must be positive"),
        ({"rho": math.inf}, "rho must be positive"),
        ({"rho": 1e4}, "at most 1000"),
        ({"sensitivity": 0.0}, "sensitivity must be positive"),
        ({"dimension": 0}, "dimension must be at least 1"),
        ({"upscale": 0}, "upscale must be between"),
        ({"max_abs_per_node": 2.0**60}, "overflow the 64-bit ring"),
    ],
)
def test_refusals(kwargs: dict[str, Any], problem: str) -> None:
    args: dict[str, Any] = {"sensitivity": 1.0, "rho": 0.1, "nodes": 4, "threshold": 4}
    with pytest.raises(QueryError, match=problem):
        dn.calibrate_distributed(**(args | kwargs))


def test_a_bound_that_fits_is_accepted() -> None:
    cal = dn.calibrate_distributed(1.0, 0.1, 16, 16, max_abs_per_node=1e12)
    assert cal.upscale == 10


def test_shares_are_opendp_noise_on_the_scaled_values() -> None:
    """add_share scales by upscale then adds OpenDP noise; released_sum scales back."""
    cal = dn.calibrate_distributed(1.0, 0.1, 4, 4, dimension=3)
    assert cal.upscale == 10
    exact = [1_000_000, 0, -5]
    noisy = dn.add_share(cal, exact)
    assert len(noisy) == 3
    assert all(isinstance(v, int) for v in noisy)
    # Shares are within 40 sigma (probability of failure below exp(-800)).
    for v, x in zip(noisy, exact, strict=True):
        assert abs(v - 10 * x) < 40 * cal.share_scale
    assert dn.released_sum(cal, [15, -20]) == [1.5, -2.0]
    with pytest.raises(QueryError, match="calibration is for 3"):
        dn.add_share(cal, [1, 2])
