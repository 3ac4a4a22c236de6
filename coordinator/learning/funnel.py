"""Funnel plots (Spiegelhalter 2005): control limits for an O/E ratio against E, and drawing.

Under the null a unit's observed count is Poisson with mean its expected count E, and the
noisy ratio's numerator carries the DP noise of the residual sum too (compare.py): to first
order O_hat/E_hat - 1 = (O - E + e)/E with e ~ N(0, v), v the residual sum's noise variance.
The limits are then quantiles of Poisson(E) + N(0, v), divided by E: without DP noise (v = 0)
Spiegelhalter's exact Poisson limits with his interpolation between integers (Statistics in
Medicine 24:1185, appendix A.1.2); with it, the continuous convolution's quantiles.
With overdispersion, the limits are the normal approximation 1 +- z_p sqrt(phi V0), V0 the
null variance of the ratio, phi the winsorised mean of squared z-scores (Spiegelhalter,
Quality and Safety in Health Care 14:347, 2005), applied only when phi > 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

# The two-sided levels of the funnel: 95% and 99.8% (Spiegelhalter's "2 and 3 sigma").
LEVELS = (0.95, 0.998)
WINSOR = 0.10  # each tail's share replaced by its percentile in the phi estimator
_NORMAL = NormalDist()
_ERF = np.vectorize(math.erf, otypes=[float])


def null_variance(expected: float, dp_variance: float) -> float:
    """V0: the ratio's variance under the null, Poisson sampling plus the DP noise."""
    return 1.0 / expected + dp_variance / expected**2


def _support(expected: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts k and their Poisson(E) probabilities, where all but 1e-30 of the mass is."""
    spread = 12.0 * math.sqrt(expected) + 30.0
    k = np.arange(max(0, math.floor(expected - spread)), math.ceil(expected + spread) + 1)
    lgamma = np.array([math.lgamma(x + 1.0) for x in k])
    return k.astype(float), np.exp(k * math.log(expected) - expected - lgamma)


def _exact_poisson(expected: float, p: float) -> float:
    k, pmf = _support(expected)
    cdf = np.cumsum(pmf)
    i = int(np.searchsorted(cdf, p))  # the p quantile r_p: the first k with F(k) >= p
    above = float(cdf[i])
    below = float(cdf[i - 1]) if i > 0 else 0.0
    alpha = (above - p) / (above - below) if above > below else 0.0
    return max(0.0, float(k[i]) - alpha) / expected


def _convolved(expected: float, p: float, dp_variance: float) -> float:
    sd = math.sqrt(dp_variance)
    k, pmf = _support(expected)

    def cdf(x: float) -> float:
        return float(np.sum(pmf * 0.5 * (1.0 + _ERF((x - k) / (sd * math.sqrt(2.0))))))

    low, high = k[0] - 12.0 * sd - 1.0, k[-1] + 12.0 * sd + 1.0
    while high - low > 1e-7 * max(1.0, expected):  # bisection: the CDF is increasing
        mid = (low + high) / 2.0
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return float(low + high) / 2.0 / expected


def poisson_limit(expected: float, p: float, dp_variance: float = 0.0) -> float:
    """The p quantile of the null ratio at expected count E (exact Poisson, DP convolved)."""
    if not expected > 0 or not 0 < p < 1 or dp_variance < 0:
        raise ValueError("need expected > 0, 0 < p < 1 and a variance >= 0")
    if dp_variance == 0:
        return _exact_poisson(expected, p)
    return _convolved(expected, p, dp_variance)


def normal_limit(expected: float, p: float, dp_variance: float = 0.0, phi: float = 1.0) -> float:
    """The normal approximation's p limit: 1 + z_p sqrt(phi V0)."""
    z = _NORMAL.inv_cdf(p)
    return 1.0 + z * math.sqrt(phi * null_variance(expected, dp_variance))


def limits(
    expected: float, level: float, dp_variance: float = 0.0, phi: float | None = None
) -> tuple[float, float]:
    """(lower, upper) at a two-sided level; phi given: the overdispersed normal limits."""
    tail = (1.0 - level) / 2.0
    if phi is not None:
        return (
            normal_limit(expected, tail, dp_variance, phi),
            normal_limit(expected, 1 - tail, dp_variance, phi),
        )
    return (
        poisson_limit(expected, tail, dp_variance),
        poisson_limit(expected, 1 - tail, dp_variance),
    )


def overdispersion(z: Sequence[float]) -> float:
    """phi: the mean of squared z-scores winsorised at their 10th and 90th percentiles."""
    values = np.asarray(z, dtype=float)
    if values.size == 0:
        raise ValueError("no z-scores")
    low, high = np.percentile(values, [100 * WINSOR, 100 * (1 - WINSOR)])
    return float(np.mean(np.clip(values, low, high) ** 2))


# Above this many points only the flagged ones are named on the plot.
MAX_LABELLED = 8


def draw(
    points: Sequence[tuple[str, float, float]],
    path: Path,
    *,
    dp_variance: float,
    phi: float | None,
    title: str,
    flagged: frozenset[str] = frozenset(),
) -> Path:
    """Draw (name, E, O/E) points and the limits to PNG or SVG (by suffix).

    The flagged units are drawn in red and named; the others are named only when there are
    few enough points for the names to be read (a funnel of 25 trusts is a cloud).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"{path}: give a file ending in .png or .svg")
    es = [e for _, e, _ in points]
    top = max(es) * 1.3
    grid = np.linspace(max(1.0, min(es) * 0.3), top, 60)
    fig: Any
    fig, ax = plt.subplots(figsize=(7, 5))
    for level, style in zip(LEVELS, ("--", ":"), strict=True):
        bounds = np.array([limits(float(e), level, dp_variance, phi) for e in grid])
        label = f"{100 * level:g}% limits"
        # A ratio of counts is never below 0: the normal limits' tail is cut there.
        ax.plot(grid, np.maximum(bounds[:, 0], 0.0), "k" + style, linewidth=1, label=label)
        ax.plot(grid, bounds[:, 1], "k" + style, linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=1)
    label_all = len(points) <= MAX_LABELLED
    for name, e, ratio in points:
        hot = name in flagged
        ax.plot([e], [ratio], "o", color="tab:red" if hot else "tab:blue")
        if hot or label_all:
            ax.annotate(name, (e, ratio), textcoords="offset points", xytext=(5, 4))
    ratios = [r for _, _, r in points]
    median_e = float(np.median(es))
    high = limits(median_e, LEVELS[-1], dp_variance, phi)[1]
    ax.set_ylim(0.0, max(max(ratios), high, 1.5) * 1.15)
    ax.set_xlabel("expected count E")
    ax.set_ylabel("observed / expected")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
