"""Point estimates and 95% intervals from noisy components: post-processing, no budget.

What every interval covers (the estimand): the value the nodes' data would give exactly,
without noise: the census figure of the regions' records, computed on the public grid and in
the fixed-point units the node uses. Each region's data is its whole population, so the
uncertainty is the DP noise (and the rounding a node applies), not sampling; sampling models
belong to the learning work, which states its own.

The noise is a discrete Gaussian per released integer, independent across components, cells
and nodes, with a reported variance (an upper bound, Canonne-Kamath-Steinke 2020). Intervals:

- counts, sums, histogram bins: estimate +- z sd, truncated to the public range;
- means and ratios: Fieller's interval for a ratio of two independent normal estimates,
  {r : (a - r b)^2 <= z^2 (var_a + r^2 var_b)} (Fieller 1954), exact for Gaussian noise, and
  unbounded when the denominator is within noise of zero (then the public range is shown);
- variances: the delta method on (n, sum, sum of squares); standard deviations: the square
  root of the variance interval's ends (a monotone map keeps coverage);
- quantiles: test inversion on the raw noisy cumulative counts (never clipped): a value is in
  the interval if its cumulative count is within z sd of q times the noisy total, with sd from
  the noise of the bins below and above it. The estimate comes from an isotonic (monotone)
  fit of the same cumulative counts.

Every estimate and interval is finally clipped into the public range of its statistic (a mean
into its column's clamp bounds, a variance into [0, (hi - lo)^2 / 4 * n / (n - 1)]): the truth
is always inside, so clipping never lowers coverage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


@dataclass(frozen=True)
class Figure:
    """One output value with its uncertainty and flags."""

    estimate: float | None
    std_error: float | None
    ci_low: float | None
    ci_high: float | None
    approximate: bool = False
    bin_lower: float | None = None
    bin_upper: float | None = None


NONE = Figure(None, None, None, None, approximate=True)


def _clip(x: float, lo: float | None, hi: float | None) -> float:
    if lo is not None:
        x = max(lo, x)
    if hi is not None:
        x = min(hi, x)
    return x


def total(
    value: float, variance: float, lo: float | None, hi: float | None, z: float = Z95
) -> Figure:
    """A count or sum: estimate +- z sd, all clipped into [lo, hi] (None: unbounded)."""
    se = math.sqrt(max(variance, 0.0))
    return Figure(
        _clip(value, lo, hi), se, _clip(value - z * se, lo, hi), _clip(value + z * se, lo, hi)
    )


def ratio(
    a: float,
    var_a: float,
    b: float,
    var_b: float,
    lo: float | None,
    hi: float | None,
    z: float = Z95,
) -> Figure:
    """a / b with Fieller's interval, clipped into the ratio's public range [lo, hi]."""
    if b <= 0:
        return NONE
    est = _clip(a / b, lo, hi)
    # (a - r b)^2 <= z^2 (var_a + r^2 var_b)  <=>  A r^2 - 2 B r + C <= 0.
    qa = b * b - z * z * var_b
    qb = a * b
    qc = a * a - z * z * var_a
    unbounded = qa <= 0
    if unbounded:
        # The denominator is within noise of zero: the set is unbounded (or everything), so
        # only the public range can be stated.
        ci_lo, ci_hi = lo, hi
    else:
        root = math.sqrt(max(qb * qb - qa * qc, 0.0))
        ci_lo, ci_hi = _clip((qb - root) / qa, lo, hi), _clip((qb + root) / qa, lo, hi)
    se = None
    if ci_lo is not None and ci_hi is not None:
        se = (ci_hi - ci_lo) / (2 * z)
    return Figure(est, se, ci_lo, ci_hi, approximate=True)


def variance(
    n: float,
    var_n: float,
    s: float,
    var_s: float,
    ss: float,
    var_ss: float,
    lo: float,
    hi: float,
    *,
    sd: bool,
    z: float = Z95,
) -> Figure:
    """The sample variance (or its square root) from noisy (n, sum, sum of squares)."""
    if n < 2:
        return NONE
    v = (ss - s * s / n) / (n - 1)
    d_n = (s * s / (n * n) - v) / (n - 1)
    d_s = -2 * s / (n * (n - 1))
    d_ss = 1 / (n - 1)
    se = math.sqrt(d_n**2 * var_n + d_s**2 * var_s + d_ss**2 * var_ss)
    # Popoviciu: a sample variance of values in [lo, hi] is at most (hi - lo)^2 / 4 * n / (n-1).
    top = (hi - lo) ** 2 / 4 * n / (n - 1)
    est, ci_lo, ci_hi = _clip(v, 0, top), _clip(v - z * se, 0, top), _clip(v + z * se, 0, top)
    if not sd:
        return Figure(est, se, ci_lo, ci_hi, approximate=True)
    root_lo, root_hi = math.sqrt(ci_lo), math.sqrt(ci_hi)
    return Figure(math.sqrt(est), (root_hi - root_lo) / (2 * z), root_lo, root_hi, True)


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators).

    Hand-written because it is twenty lines and scipy is not a dependency.
    """
    means: list[float] = []
    sizes: list[int] = []
    for value in y.tolist():
        means.append(value)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            size = sizes[-2] + sizes[-1]
            mean = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / size
            means[-2:] = [mean]
            sizes[-2:] = [size]
    return np.repeat(np.asarray(means), np.asarray(sizes))


def quantile(
    counts: np.ndarray,
    bin_variance: float,
    edges: np.ndarray,
    q: float,
    *,
    discrete: bool,
    z: float = Z95,
) -> Figure:
    """The q-quantile of a noisy histogram over a public grid (see the module docstring).

    `discrete`: one bin per whole value ([v, v + 1) holds v), so the quantile is a value;
    otherwise the grid is continuous and the quantile is interpolated within its bin.
    """
    bins = counts.size
    n = float(counts.sum())
    if n < 1:
        return NONE
    sigma2 = max(bin_variance, 0.0)
    lo_edge, hi_edge = float(edges[0]), float(edges[-1])
    cumulative = np.cumsum(counts)
    fitted = np.clip(_isotonic(cumulative), 0.0, n)
    rank = q * n
    j = min(int(np.searchsorted(fitted, rank, side="left")), bins - 1)
    if discrete:
        est = float(edges[j])
    else:
        below = float(fitted[j - 1]) if j > 0 else 0.0
        step = float(fitted[j]) - below
        frac = 0.0 if step <= 0 else min(max((rank - below) / step, 0.0), 1.0)
        est = float(edges[j] + frac * (edges[j + 1] - edges[j]))
    index = np.arange(bins, dtype=np.float64)
    # On a grid of values, the quantile is v_j iff C_{j-1} < q N <= C_j (exact counts). Keep
    # v_j unless one of two one-sided tests (each at 2.5%) on the raw noisy cumulative counts
    # rejects that: the true value is kept with probability at least 95%, more on atoms. The
    # noise variance of C_j - q N (noisy total) is sigma^2 ((1 - q)^2 (j + 1) + q^2 (B-1-j)).
    d = cumulative - rank
    sd = np.sqrt(sigma2 * ((1 - q) ** 2 * (index + 1) + q * q * (bins - 1 - index)))
    d_prev = np.concatenate(([-rank], d[:-1]))
    sd_prev = np.concatenate(([math.sqrt(sigma2 * q * q * bins)], sd[:-1]))
    kept = np.flatnonzero((d >= -z * sd) & (d_prev <= z * sd_prev))
    first, last = (int(kept[0]), int(kept[-1])) if kept.size else (j, j)
    if discrete:
        ci_lo, ci_hi, top = float(edges[first]), float(edges[last]), float(edges[-2])
    else:
        top = hi_edge
        ends = _continuous_interval(cumulative, counts, sigma2, edges, q, n, z)
        ci_lo, ci_hi = ends if ends is not None else (est, est)
    ci_lo, ci_hi = min(ci_lo, est), max(ci_hi, est)
    return Figure(_clip(est, lo_edge, top), (ci_hi - ci_lo) / (2 * z), ci_lo, min(ci_hi, top), True)


def _continuous_interval(
    cumulative: np.ndarray,
    counts: np.ndarray,
    sigma2: float,
    edges: np.ndarray,
    q: float,
    n: float,
    z: float,
) -> tuple[float, float] | None:
    """Hull of {x : |D(x)| <= z sd(x)} on a continuous grid, solved exactly bin by bin.

    The estimand is the quantile of the data's histogram on the grid, interpolated linearly
    within its bin, so its cumulative count at x = e_j + f w_j is C_{j-1} + f h_j and
    D(x) = a + b f with a = C_{j-1} - q N, b = h_j (noisy). D's noise variance is
    sigma^2 (A + (f - q)^2) with A = (1 - q)^2 j + q^2 (bins - 1 - j); at the estimand D's
    exact part is zero, so it is kept with probability 95%. The condition is quadratic in f:
    (b^2 - z^2 s) f^2 + 2 (a b + z^2 s q) f + (a^2 - z^2 s (A + q^2)) <= 0, s = sigma^2.
    """
    bins = counts.size
    index = np.arange(bins, dtype=np.float64)
    a = np.concatenate(([0.0], cumulative[:-1])) - q * n
    b = counts.astype(np.float64)
    z2s = z * z * sigma2
    qa = b * b - z2s
    qb = 2 * (a * b + z2s * q)
    qc = a * a - z2s * ((1 - q) ** 2 * index + q * q * (bins - 1 - index) + q * q)
    # Only bins where the quadratic can be <= 0 somewhere in [0, 1] need solving: at f = 0,
    # at f = 1, or at an interior vertex.
    low = np.minimum(qc, qa + qb + qc)
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(qa > 0, -qb / (2 * qa), -1.0)
    inner = (vertex > 0) & (vertex < 1)
    low = np.where(inner, np.minimum(low, qc - qb * qb / (4 * np.where(qa > 0, qa, 1.0))), low)
    found: list[tuple[float, float]] = []
    for j in np.flatnonzero(low <= 0).tolist():
        ends = _solve_unit(float(qa[j]), float(qb[j]), float(qc[j]))
        if ends is not None:
            width = float(edges[j + 1] - edges[j])
            found.append((float(edges[j]) + ends[0] * width, float(edges[j]) + ends[1] * width))
    if not found:
        return None
    return min(f[0] for f in found), max(f[1] for f in found)


def _solve_unit(qa: float, qb: float, qc: float) -> tuple[float, float] | None:
    """The hull of {f in [0, 1] : qa f^2 + qb f + qc <= 0}, or None if it is empty."""
    candidates = [0.0, 1.0]
    if qa != 0:
        disc = qb * qb - 4 * qa * qc
        if disc >= 0:
            root = math.sqrt(disc)
            candidates += [(-qb - root) / (2 * qa), (-qb + root) / (2 * qa)]
    elif qb != 0:
        candidates.append(-qc / qb)
    # The set's ends are among 0, 1 and the roots; allow for rounding at a root.
    slack = 1e-9 * (abs(qa) + abs(qb) + abs(qc))
    inside = [f for f in candidates if 0 <= f <= 1 and (qa * f + qb) * f + qc <= slack]
    if not inside:
        return None
    return min(inside), max(inside)
