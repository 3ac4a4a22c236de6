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
from collections.abc import Sequence
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


# Vectorised forms of the estimators above, for many cells at once (the hub pools hundreds of
# nodes). They compute the same figures with the same floating-point operations, element by
# element; an undefined figure (None above) is NaN here. Inputs are arrays with one entry per
# cell; a bound that is NaN is absent (None above).


@dataclass(frozen=True)
class Figures:
    """Many figures at once, one per cell; NaN where a figure is undefined."""

    estimate: np.ndarray
    std_error: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    approximate: bool = False

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray], approximate: bool) -> Figures:
        """Figures from (estimate, std_error, ci_low, ci_high)."""
        estimate, std_error, ci_low, ci_high = arrays
        return cls(estimate, std_error, ci_low, ci_high, approximate)


def _clip_all(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """_clip element by element; a NaN bound is no bound (NaN in x stays NaN)."""
    x = np.where(np.isnan(lo), x, np.maximum(lo, x))
    return np.where(np.isnan(hi), x, np.minimum(hi, x))


def totals(
    value: np.ndarray, variance: np.ndarray, lo: np.ndarray, hi: np.ndarray, z: float = Z95
) -> Figures:
    """`total` for many cells."""
    se = np.sqrt(np.maximum(variance, 0.0))
    return Figures(
        _clip_all(value, lo, hi),
        np.broadcast_to(se, np.shape(value)).astype(np.float64),
        _clip_all(value - z * se, lo, hi),
        _clip_all(value + z * se, lo, hi),
    )


def ratios(
    a: np.ndarray,
    var_a: np.ndarray,
    b: np.ndarray,
    var_b: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    z: float = Z95,
) -> Figures:
    """`ratio` for many cells (Fieller's interval, clipped into [lo, hi])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        est = _clip_all(a / b, lo, hi)
        qa = b * b - z * z * var_b
        qb = a * b
        qc = a * a - z * z * var_a
        unbounded = qa <= 0
        root = np.sqrt(np.maximum(qb * qb - qa * qc, 0.0))
        ci_lo = np.where(unbounded, lo, _clip_all((qb - root) / qa, lo, hi))
        ci_hi = np.where(unbounded, hi, _clip_all((qb + root) / qa, lo, hi))
    se = (ci_hi - ci_lo) / (2 * z)  # NaN where an end is absent
    none = ~(b > 0)
    return Figures.of([np.where(none, np.nan, x) for x in (est, se, ci_lo, ci_hi)], True)


def variances(
    n: np.ndarray,
    var_n: np.ndarray,
    s: np.ndarray,
    var_s: np.ndarray,
    ss: np.ndarray,
    var_ss: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    sd: bool,
    z: float = Z95,
) -> Figures:
    """`variance` for many cells (delta method; the square root of its ends for sd)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (ss - s * s / n) / (n - 1)
        d_n = (s * s / (n * n) - v) / (n - 1)
        d_s = -2 * s / (n * (n - 1))
        d_ss = 1 / (n - 1)
        se = np.sqrt(d_n * d_n * var_n + d_s * d_s * var_s + d_ss * d_ss * var_ss)
        width = hi - lo
        top = width * width / 4 * n / (n - 1)
        zero = np.zeros_like(top)
        est = _clip_all(v, zero, top)
        ci_lo = _clip_all(v - z * se, zero, top)
        ci_hi = _clip_all(v + z * se, zero, top)
        if sd:
            root_lo, root_hi = np.sqrt(ci_lo), np.sqrt(ci_hi)
            est, se, ci_lo, ci_hi = np.sqrt(est), (root_hi - root_lo) / (2 * z), root_lo, root_hi
    none = ~(n >= 2)
    return Figures.of([np.where(none, np.nan, x) for x in (est, se, ci_lo, ci_hi)], True)


def _level_set_start(
    cumulative: np.ndarray, suffix: np.ndarray, largest: np.ndarray, rank: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first index whose isotonic fit reaches `rank`, and whether that is sure.

    For the least-squares non-decreasing fit f of y, {i : f_i >= r} is the largest upper set
    [t, B) maximising sum_{i >= t} (y_i - r), so its start is the first maximiser of
    G(t) = (S_B - S_t) - r (B - t), S the prefix sums of y (`suffix` is S_B - S_t, rows x
    B + 1; `largest` is max |y| per row). Where several t come within rounding of the
    maximum (block means within rounding of r), the pool-adjacent-violators fit in floating
    point may fall on either side, so the row is unsure and computed with `quantile`
    instead; unless every y between the first and last of them equals r exactly, as when a
    cumulative count lands on the rank: those are blocks of one, fitted exactly.
    """
    bins = cumulative.shape[1]
    remaining = np.arange(bins, -1, -1, dtype=np.float64)  # B - t
    g = np.multiply(rank[:, None], remaining)
    np.subtract(suffix, g, out=g)
    best = g.max(axis=1)
    scale = largest + np.abs(rank) + 1.0
    near = g >= (best - 1e-13 * bins * bins * scale)[:, None]
    first = np.argmax(near, axis=1)
    sure = np.count_nonzero(near, axis=1) == 1
    tied = np.flatnonzero(~sure)
    if tied.size:
        last = bins - np.argmax(near[tied, ::-1], axis=1)
        t = np.arange(bins + 1)[None, :]
        span = (t >= first[tied, None]) & (t <= last[:, None])
        inside = span[:, :-1] & (t[:, :-1] < last[:, None])
        exact = ~(inside & (cumulative[tied] != rank[tied, None])).any(axis=1)
        sure[tied] = (near[tied] == span).all(axis=1) & exact
    return first, sure & (first < bins)


def _mean_ending_at(prefix: np.ndarray, end: np.ndarray) -> np.ndarray:
    """max over a <= end of mean(y[a..end]): the fit at the end of a block (per row)."""
    rows, width = prefix.shape
    a = np.arange(width - 1, dtype=np.int64)[None, :]
    e = end[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        means = (prefix[np.arange(rows), end + 1][:, None] - prefix[:, :-1]) / (e + 1 - a)
    out: np.ndarray = np.where(a <= e, means, -np.inf).max(axis=1)
    return out


def _mean_starting_at(prefix: np.ndarray, start: np.ndarray) -> np.ndarray:
    """min over b >= start of mean(y[start..b]): the fit at the start of a block (per row)."""
    rows, width = prefix.shape
    b = np.arange(width - 1, dtype=np.int64)[None, :]
    s = start[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        means = (prefix[:, 1:] - prefix[np.arange(rows), start][:, None]) / (b + 1 - s)
    out: np.ndarray = np.where(b >= s, means, np.inf).min(axis=1)
    return out


# Cells per block in `quantiles`: a block's arrays (cells x bins, a few of them) stay in the
# processor's cache while every quantile of the histograms is computed from them.
_BLOCK = 256


def quantiles(
    counts: np.ndarray,
    bin_variance: np.ndarray,
    edges: np.ndarray,
    qs: Sequence[float],
    *,
    discrete: np.ndarray,
    z: float = Z95,
) -> list[Figures]:
    """`quantile` for many histograms at once: counts (cells x bins), edges (cells x bins+1).

    Every q in `qs` is computed from the same histograms (a median and a p90 share one
    noisy bins component), so the cumulative counts and their prefix sums are computed once
    per block of cells. The isotonic fit is not built: its level set at the rank and the two
    fitted values either side of it are found from prefix sums (see _level_set_start). Rows
    where that could disagree with the fit in floating point (ties within rounding) go
    through `quantile`.
    """
    rows, bins = counts.shape
    out = [[np.full(rows, np.nan) for _ in range(4)] for _ in qs]
    # The noise sd of C_j - qN is sigma sqrt((1 - q)^2 (j + 1) + q^2 (B - 1 - j)): computed
    # once per distinct variance (a node's is the same in all its cells), then looked up.
    sigma2, which = np.unique(np.maximum(bin_variance, 0.0), return_inverse=True)
    index = np.arange(bins, dtype=np.float64)
    limits = []
    for q in qs:
        sd = np.sqrt(sigma2[:, None] * ((1 - q) ** 2 * (index + 1) + q * q * (bins - 1 - index)))
        limits.append((z * sd, z * np.sqrt(sigma2 * q * q * bins)))
    which = which.reshape(-1)
    for lo in range(0, rows, _BLOCK):
        hi = min(rows, lo + _BLOCK)
        mine = which[lo:hi]
        found = _quantile_block(
            counts[lo:hi],
            bin_variance[lo:hi],
            edges[lo:hi],
            qs,
            [(zsd[mine], first[mine]) for zsd, first in limits],
            discrete[lo:hi],
            z,
        )
        for figures, block in zip(out, found, strict=True):
            for whole, part in zip(figures, block, strict=True):
                whole[lo:hi] = part
    return [Figures.of(figures, True) for figures in out]


def _quantile_block(
    counts: np.ndarray,
    bin_variance: np.ndarray,
    edges: np.ndarray,
    qs: Sequence[float],
    limits: Sequence[tuple[np.ndarray, np.ndarray]],
    discrete: np.ndarray,
    z: float,
) -> list[list[np.ndarray]]:
    """`quantiles` for one block of cells: (estimate, std_error, ci_low, ci_high) per q.

    `limits`: per q, z sd of C_j - qN per cell and bin, and z sd of -qN (before bin 0).
    """
    rows, bins = counts.shape
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    n = counts.sum(axis=1)
    sigma2 = np.maximum(bin_variance, 0.0)
    cumulative = np.cumsum(counts, axis=1)
    prefix = np.zeros((rows, bins + 1))
    np.cumsum(cumulative, axis=1, out=prefix[:, 1:])
    suffix = prefix[:, -1:] - prefix
    largest = np.abs(cumulative).max(axis=1)
    defined = n >= 1
    at = np.arange(rows)
    lo_edge, hi_edge = edges[:, 0], edges[:, -1]
    cont = ~discrete
    found = []
    for q, (zsd, zsd_before) in zip(qs, limits, strict=True):
        rank = q * n
        start, sure = _level_set_start(cumulative, suffix, largest, rank)
        sure &= defined & (rank > 0) & (rank <= n)
        j = np.minimum(start, bins - 1)
        est = edges[at, j]
        if cont.any():
            below = np.where(
                j > 0, np.clip(_mean_ending_at(prefix, np.maximum(j - 1, 0)), 0.0, n), 0.0
            )
            fitted_j = np.clip(_mean_starting_at(prefix, j), 0.0, n)
            step = fitted_j - below
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(
                    step <= 0, 0.0, np.minimum(np.maximum((rank - below) / step, 0.0), 1.0)
                )
            est = np.where(cont, edges[at, j] + frac * (edges[at, j + 1] - edges[at, j]), est)
        # The test inversion: keep bin i unless C_i - qN < -z sd_i or C_{i-1} - qN > z sd_{i-1}.
        d = cumulative - rank[:, None]
        kept = d >= -zsd
        kept[:, 1:] &= d[:, :-1] <= zsd[:, :-1]
        kept[:, 0] &= -rank <= zsd_before
        any_kept = kept.any(axis=1)
        first = np.where(any_kept, np.argmax(kept, axis=1), j)
        last = np.where(any_kept, bins - 1 - np.argmax(kept[:, ::-1], axis=1), j)
        ci_lo, ci_hi, top = edges[at, first], edges[at, last], edges[:, -2]
        if cont.any():
            ends = _continuous_intervals(cumulative, counts, sigma2, edges, q, n, z)
            ci_lo = np.where(cont, np.where(np.isnan(ends[0]), est, ends[0]), ci_lo)
            ci_hi = np.where(cont, np.where(np.isnan(ends[1]), est, ends[1]), ci_hi)
            top = np.where(cont, hi_edge, top)
        ci_lo, ci_hi = np.minimum(ci_lo, est), np.maximum(ci_hi, est)
        figures = [
            np.where(sure, x, np.nan)
            for x in (
                _clip_all(est, lo_edge, top),
                (ci_hi - ci_lo) / (2 * z),
                ci_lo,
                np.minimum(ci_hi, top),
            )
        ]
        for i in np.flatnonzero(defined & ~sure).tolist():
            one = quantile(
                counts[i], float(bin_variance[i]), edges[i], q, discrete=bool(discrete[i]), z=z
            )
            for o, v in zip(
                figures, (one.estimate, one.std_error, one.ci_low, one.ci_high), strict=True
            ):
                o[i] = np.nan if v is None else v
        found.append(figures)
    return found


def _continuous_intervals(
    cumulative: np.ndarray,
    counts: np.ndarray,
    sigma2: np.ndarray,
    edges: np.ndarray,
    q: float,
    n: np.ndarray,
    z: float,
) -> tuple[np.ndarray, np.ndarray]:
    """`_continuous_interval` for many rows: the hull's ends, NaN where it is empty."""
    rows, bins = counts.shape
    index = np.arange(bins, dtype=np.float64)
    a = np.concatenate((np.zeros((rows, 1)), cumulative[:, :-1]), axis=1) - (q * n)[:, None]
    b = counts
    z2s = (z * z * sigma2)[:, None]
    qa = b * b - z2s
    qb = 2 * (a * b + z2s * q)
    qc = a * a - z2s * ((1 - q) ** 2 * index + q * q * (bins - 1 - index) + q * q)
    low = np.minimum(qc, qa + qb + qc)
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(qa > 0, -qb / (2 * qa), -1.0)
        inner = (vertex > 0) & (vertex < 1)
        low = np.where(inner, np.minimum(low, qc - qb * qb / (4 * np.where(qa > 0, qa, 1.0))), low)
        # _solve_unit on every bin: the ends are among 0, 1 and the roots.
        disc = qb * qb - 4 * qa * qc
        root = np.sqrt(np.where(disc >= 0, disc, 0.0))
        quadratic = (qa != 0) & (disc >= 0)
        linear = (qa == 0) & (qb != 0)
        r1 = np.where(quadratic, (-qb - root) / (2 * qa), np.where(linear, -qc / qb, np.nan))
        r2 = np.where(quadratic, (-qb + root) / (2 * qa), np.nan)
        slack = 1e-9 * (np.abs(qa) + np.abs(qb) + np.abs(qc))
        lo_f = np.full((rows, bins), np.inf)
        hi_f = np.full((rows, bins), -np.inf)
        for f in (np.zeros((rows, bins)), np.ones((rows, bins)), r1, r2):
            inside = (f >= 0) & (f <= 1) & ((qa * f + qb) * f + qc <= slack)
            lo_f = np.where(inside, np.minimum(lo_f, f), lo_f)
            hi_f = np.where(inside, np.maximum(hi_f, f), hi_f)
    solved = (low <= 0) & np.isfinite(lo_f)
    width = edges[:, 1:] - edges[:, :-1]
    left = np.where(solved, edges[:, :-1] + lo_f * width, np.inf).min(axis=1)
    right = np.where(solved, edges[:, :-1] + hi_f * width, -np.inf).max(axis=1)
    found = solved.any(axis=1)
    return np.where(found, left, np.nan), np.where(found, right, np.nan)
