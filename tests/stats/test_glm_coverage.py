"""The DP-only 95% intervals of a fitted model cover the noiseless pooled fit at 95%.

Estimand: the fit the pooled data would give without noise (docs/statistics.md's census
figure, docs/models.md). The solver (coordinator/learning/fit.py) runs on exact statistics
computed in numpy from one generated dataset of 2,000 persons split over two nodes, to which
each draw adds Gaussian noise of a known variance per entry (the nodes' discrete Gaussian has
the same variance; what is tested here is the hub's arithmetic, not the mechanism). The noise
is chosen so that it matters (the DP-only standard error is 35-70% of the total) without
breaking the Hessian (no draw needs a repair at these settings; a repair only makes the
intervals wider).

False failures. DRAWS = 8,000 draws per family; each coefficient's coverage must be within
93-97%. With a true coverage anywhere in 94.5-95.5% (measured: 94-95.5% in 2,000-draw runs),
the sd of the observed rate is at most sqrt(0.95 * 0.05 / 8000) = 0.0025, so the band is at
least 6 sds away: a chance below 2e-9 per coefficient, below 3e-8 for the 12 checked here
(three families, four coefficients), well under one in a million.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from coordinator.learning.fit import Solution, solve
from queries.model import Covariate, Family, ModelSpec, StepRelease
from tests.unit._glm_helpers import Data, make_data, release

pytestmark = pytest.mark.stats

DRAWS = 8_000
# Per-entry noise variance of the summed statistics (each of the two nodes adds half).
NOISE: dict[Family, dict[str, float]] = {
    Family.BINOMIAL: {"gradient": 25.0, "hessian": 25.0},
    Family.POISSON: {"gradient": 25.0, "hessian": 100.0},
    Family.GAUSSIAN: {"xtx": 25.0, "xty": 25.0, "yty": 25.0, "n": 1.0},
}


def _halves(data: Data) -> list[Data]:
    cut = len(data.y) // 2
    return [
        Data(data.columns, data.x[s], data.y[s], None) for s in (slice(0, cut), slice(cut, None))
    ]


def _fit(
    family: Family, parts: list[Data], noise: dict[str, float], rng: np.random.Generator | None
) -> Solution:
    model = ModelSpec(
        view="v",
        outcome="y",
        family=family,
        covariates=(Covariate("band"), Covariate("age")),
        rho=1.0,
    )
    half = {k: v / 2 for k, v in noise.items()}

    def ask(step: int, beta: Sequence[float]) -> list[StepRelease]:
        return [
            release(d, family, step, beta, node=f"n{i}", variances=half, rng=rng)
            for i, d in enumerate(parts)
        ]

    design = [release(d, family, 0, (), node=f"n{i}") for i, d in enumerate(parts)]
    return solve(model, design, ["n0", "n1"], ask)


@pytest.mark.parametrize("family", list(Family))
def test_dp_only_intervals_cover_the_noiseless_pooled_fit(family: Family) -> None:
    parts = _halves(make_data(family, 2000, np.random.default_rng(7)))
    exact = np.array([c.estimate for c in _fit(family, parts, {}, None).coefficients])
    rng = np.random.default_rng()  # fresh draws each run: the bound above is for any seed
    covered = np.zeros(len(exact))
    repaired = 0
    for _ in range(DRAWS):
        s = _fit(family, parts, NOISE[family], rng)
        b = np.array([c.estimate for c in s.coefficients])
        se = np.array([c.dp_std_error for c in s.coefficients])
        covered += np.abs(b - exact) <= 1.959963984540054 * se
        repaired += any(i.repaired for i in s.iterations)
    rates = covered / DRAWS
    assert np.all((rates >= 0.93) & (rates <= 0.97)), f"{family}: coverage {rates}"
    # The setting is the one the docstring describes (a repair widens the intervals).
    assert repaired <= DRAWS // 100, f"{repaired} draws needed a repair"
