"""Calibration and accounting of the discrete Gaussian (no test depends on a noise draw)."""

from __future__ import annotations

import math

import pytest

from queries import mechanisms
from queries.sensitivity import histogram_sensitivity


def test_scale_spends_the_requested_rho() -> None:
    for rho in (1e-4, 0.01, 0.05, 0.5, 2.0):
        for sens in (1.0, 2.0, math.sqrt(3)):
            cal = mechanisms.calibrate(sens, rho)
            # zCDP of the Gaussian: rho = D^2 / (2 sigma^2) (Bun & Steinke 2016).
            assert cal.rho == pytest.approx(sens**2 / (2 * cal.scale**2), rel=1e-6)
            assert cal.rho <= rho
            assert cal.rho == pytest.approx(rho, rel=1e-6)
            assert cal.variance == pytest.approx(cal.scale**2)


def test_more_sensitivity_means_more_noise() -> None:
    assert mechanisms.calibrate(2.0, 0.1).scale == pytest.approx(
        2 * mechanisms.calibrate(1.0, 0.1).scale
    )


def test_histogram_sensitivity() -> None:
    assert histogram_sensitivity(max_groups_per_person=1) == 1.0
    assert histogram_sensitivity(max_groups_per_person=4) == 2.0
    assert histogram_sensitivity(max_groups_per_person=4, max_rows_per_group=3) == pytest.approx(
        6.0
    )
    with pytest.raises(ValueError, match="at least 1"):
        histogram_sensitivity(max_groups_per_person=0)


@pytest.mark.parametrize("rho", [0.0, -1.0, math.inf, math.nan])
def test_bad_rho_is_refused(rho: float) -> None:
    with pytest.raises(ValueError, match="rho"):
        mechanisms.calibrate(1.0, rho)


def test_rho_to_epsilon() -> None:
    # eps = rho + 2 sqrt(rho ln(1/delta)) (Bun & Steinke 2016, Prop. 1.3)
    assert mechanisms.rho_to_epsilon(0.5, 1e-6) == pytest.approx(
        0.5 + 2 * math.sqrt(0.5 * math.log(1e6))
    )
    assert mechanisms.rho_to_epsilon(0.0, 1e-6) == 0.0
    with pytest.raises(ValueError, match="delta"):
        mechanisms.rho_to_epsilon(0.1, 0.0)


def test_add_noise_returns_integers_of_the_same_length() -> None:
    cal = mechanisms.calibrate(1.0, 0.5)
    out = mechanisms.add_noise(cal, [5, 10, 0])
    assert len(out) == 3
    assert all(isinstance(v, int) for v in out)
    assert mechanisms.add_noise(cal, []) == ()
