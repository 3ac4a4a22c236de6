"""Pooled noise with secure aggregation: as narrow as central DP, sqrt(k) narrower than per-node.

Simulated with OpenDP's discrete Gaussian (no other randomness): N = 4,000 pooled releases of
a count (sensitivity 1) at rho = 0.1 over k = 4 and k = 16 nodes, three ways:
- secure aggregation, t = k: each node adds a distributed share (queries.distributed_noise),
  the pooled noise is the sum of the k shares (divided by the public upscale);
- central DP: one trusted curator adds one discrete Gaussian at rho;
- per-node DP (today): every node adds full noise at rho, and the pooled count sums them.

Each bound is on a ratio of two independent sample standard deviations. For N draws of a
near-Gaussian variable (discrete Gaussians of scale >= 2 and their sums have kurtosis 3
to within 1e-10), log(sample sd) has standard error sqrt(1/(2(N-1))) = 0.0112, so a log-ratio
has standard error 0.0158. The 10% bound (|log 1.1| = 0.095) is 6.0 standard errors away from
the true ratio (1 to within 1e-8), a two-sided false failure of 2e-9; the 15% bound on the
sqrt(k) ratio (|log 1.15| = 0.140, against a lower edge of |log 0.85| = 0.163) is at least 8.8
standard errors away, a false failure below 1e-17; the check of the calibration's claimed
sd (one sample sd, 8.5 standard errors) below 1e-16. The six checks together fail by chance
with probability below 1e-8.
"""

from __future__ import annotations

import math
from statistics import pstdev

import pytest

from queries import distributed_noise, mechanisms

pytestmark = pytest.mark.stats

N = 4_000
RHO = 0.1


def _sum_of_draws(calibration: mechanisms.Calibration, k: int) -> list[int]:
    """N pooled noise values: the sum of k independent OpenDP draws at this calibration."""
    total = [0] * N
    for _ in range(k):
        draws = mechanisms.add_noise(calibration, [0] * N)
        total = [a + b for a, b in zip(total, draws, strict=True)]
    return total


@pytest.mark.parametrize("k", [4, 16])
def test_secure_aggregation_is_as_narrow_as_central_dp(k: int) -> None:
    cal = distributed_noise.calibrate_distributed(1.0, RHO, k, k)
    assert cal.rho_threshold <= RHO
    pooled_secagg = [v / cal.upscale for v in _sum_of_draws(cal.share, k)]
    central = mechanisms.calibrate(1.0, RHO)
    pooled_central = mechanisms.add_noise(central, [0] * N)
    pooled_per_node = _sum_of_draws(central, k)

    sd_secagg = pstdev(pooled_secagg)
    sd_central = pstdev(pooled_central)
    sd_per_node = pstdev(pooled_per_node)
    # Interval widths are proportional to these sds: within 10% of central DP's ...
    assert abs(math.log(sd_secagg / sd_central)) < math.log(1.10)
    # ... and about sqrt(k) narrower than per-node noise: within 15% of sqrt(k).
    assert abs(sd_per_node / sd_secagg / math.sqrt(k) - 1) < 0.15
    # The calibration's own claim, which Explain will show, agrees with the simulation.
    assert abs(math.log(sd_secagg / math.sqrt(cal.pooled_variance))) < math.log(1.10)
