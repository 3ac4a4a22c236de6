"""Statistical tests of the released noise: variance, centring and interval coverage.

DP noise cannot be seeded, so each test draws enough samples that its bounds fail by
chance less than once in a million runs; the rate is worked out in each docstring.
"""

from __future__ import annotations

import math
from statistics import NormalDist, fmean

from queries import combine, mechanisms

N = 40_000
# Two-sided normal quantile for a false-failure rate of 1e-6 per check.
Z_1E6 = NormalDist().inv_cdf(1 - 1e-6 / 2)  # about 4.89


def _draws(rho: float, sensitivity: float = 1.0) -> tuple[list[int], float]:
    cal = mechanisms.calibrate(sensitivity, rho)
    return list(mechanisms.add_noise(cal, [0] * N)), cal.scale


def test_noise_is_centred_and_has_the_claimed_variance() -> None:
    """Mean within Z*sigma/sqrt(N) of 0 and variance within Z*sigma^2*sqrt(2/N) of sigma^2.

    With N = 40,000 the sample mean and variance are normal to high accuracy; each bound is
    4.89 standard errors, so each check fails by chance with probability < 1e-6 (the discrete
    Gaussian's variance is sigma^2 minus a term below 1e-6 for sigma >= 2, CKS 2020).
    """
    for rho in (0.05, 0.005):
        xs, sigma = _draws(rho)
        mean = fmean(xs)
        var = fmean([(x - mean) ** 2 for x in xs])
        assert abs(mean) < Z_1E6 * sigma / math.sqrt(N)
        # Kurtosis of a Gaussian is 3, so Var(sample variance) = 2 sigma^4 / N.
        assert abs(var - sigma**2) < Z_1E6 * sigma**2 * math.sqrt(2 / N)


def test_noise_variance_scales_with_sensitivity() -> None:
    """Sensitivity 2 at the same rho doubles sigma; bound as above, false failure < 1e-6."""
    xs, sigma = _draws(0.05, sensitivity=2.0)
    var = fmean([x * x for x in xs])
    assert abs(var - sigma**2) < Z_1E6 * sigma**2 * math.sqrt(2 / N) + sigma**2 * 1e-3


def test_95_percent_intervals_cover_95_percent() -> None:
    """Coverage of the released 95% interval over N = 40,000 releases is within 95% +/- 2%.

    For a discrete Gaussian the exact coverage of +/- 1.96 sigma is 96.1% at sigma = 3.16
    (integers make the interval slightly conservative) and 94.8% at sigma = 31.6. The coverage
    estimate has standard error at most sqrt(0.96*0.04/N) = 0.00098, so either edge of the
    +/- 2% band is at least 9 standard errors away: a false failure is far rarer than 1e-6.
    """
    truth = 1000
    for rho in (0.05, 0.0005):
        cal = mechanisms.calibrate(1.0, rho)
        released = mechanisms.add_noise(cal, [truth] * N)
        se = math.sqrt(cal.variance)
        covered = sum(1 for v in released if v - combine.Z95 * se <= truth <= v + combine.Z95 * se)
        assert abs(covered / N - 0.95) < 0.02
