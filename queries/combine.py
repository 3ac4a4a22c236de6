"""Post-processing across nodes: per-region and pooled estimates with intervals.

Everything here is post-processing of DP releases, so it costs no budget. Nodes add
independent noise, so a pooled component's noise variance is the sum of the nodes'. Pooled
figures are computed from pooled components (sums of counts, sums, sums of squares and
histograms over the shared public grid), never by averaging regional estimates. Standard
errors use the delta method over the components' DP noise variances, plus the sampling
variance where the statistic has one (means, variances, quantiles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from queries import plan as plan_mod
from queries.results import NodeRelease
from queries.spec import Measure, Query, Statistic

POOLED = "All regions"
Z95 = 1.959963984540054  # two-sided 95% standard normal quantile

COUNT_LIKE = frozenset({Statistic.COUNT, Statistic.COUNT_ROWS, Statistic.HISTOGRAM})


@dataclass
class _Vector:
    """A component's values for one group, pooled or not, with its noise variance."""

    values: list[float]
    variance: float
    lower: list[float | None]
    upper: list[float | None]

    def add(self, other: _Vector) -> None:
        for i, v in enumerate(other.values):
            self.values[i] += v
        self.variance += other.variance


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


Components = dict[str, _Vector]


def _collect(
    query: Query, releases: Sequence[tuple[str, NodeRelease]]
) -> dict[tuple[str, tuple[str, ...]], Components]:
    out: dict[tuple[str, tuple[str, ...]], Components] = {}
    for region, release in releases:
        t = release.table
        groups = list(zip(*(t.column(c).to_pylist() for c in query.group_by), strict=True))
        if not query.group_by:
            groups = [()] * t.num_rows
        comps = t.column("component").to_pylist()
        values = t.column("value").to_pylist()
        lows = t.column("bin_lower").to_pylist()
        highs = t.column("bin_upper").to_pylist()
        for group, comp, value, lo, hi in zip(groups, comps, values, lows, highs, strict=True):
            key = (region, tuple(str(g) for g in group))
            vec = out.setdefault(key, {}).get(comp)
            if vec is None:
                vec = _Vector([], release.variance(comp), [], [])
                out[key][comp] = vec
            vec.values.append(float(value))
            vec.lower.append(lo)
            vec.upper.append(hi)
    return out


def _interval(est: float, var: float, z: float, *, nonneg: bool) -> tuple[float, float, float]:
    se = math.sqrt(max(var, 0.0))
    lo, hi = est - z * se, est + z * se
    if nonneg:
        # A count is never negative, so truncating the interval at 0 keeps its coverage.
        lo, hi = max(0.0, lo), max(0.0, hi)
    return se, lo, hi


def _scalar(c: Components, key: str) -> tuple[float, float]:
    vec = c[key]
    return vec.values[0], vec.variance


def _mean_like(m: Measure, c: Components, z: float) -> Figure:
    n, var_n = _scalar(c, f"{m.name}:rows")
    s, var_s = _scalar(c, f"{m.name}:sum")
    ss, var_ss = _scalar(c, f"{m.name}:sumsq")
    if n < 2:
        return Figure(None, None, None, None, approximate=True)
    sample_var = max(0.0, (ss - s * s / n) / (n - 1))
    if m.statistic is Statistic.MEAN:
        est = s / n
        # Delta method on s / n, plus the sampling variance of a mean.
        var = var_s / n**2 + s**2 * var_n / n**4 + sample_var / n
        se, lo, hi = _interval(est, var, z, nonneg=False)
        return Figure(est, se, lo, hi, approximate=True)
    # Sample variance v = (ss - s^2/n) / (n - 1): gradient over (n, s, ss).
    d_n = (s * s / (n * n) - sample_var) / (n - 1)
    d_s = -2 * s / (n * (n - 1))
    d_ss = 1 / (n - 1)
    var_v = d_n**2 * var_n + d_s**2 * var_s + d_ss**2 * var_ss + 2 * sample_var**2 / (n - 1)
    if m.statistic is Statistic.VARIANCE:
        se, lo, hi = _interval(sample_var, var_v, z, nonneg=True)
        return Figure(sample_var, se, lo, hi, approximate=True)
    sd = math.sqrt(sample_var)
    se_sd = math.sqrt(var_v) / (2 * sd) if sd > 0 else math.sqrt(math.sqrt(var_v))
    return Figure(sd, se_sd, max(0.0, sd - z * se_sd), sd + z * se_sd, approximate=True)


def _quantile_at(counts: list[float], edges: list[float], rank: float) -> float:
    # On a grid of one bin per whole value (integer columns), the quantile is that value;
    # on a continuous grid, interpolate linearly within the bin where the rank falls.
    discrete = all(float(e).is_integer() for e in edges) and all(
        edges[i + 1] - edges[i] == 1 for i in range(len(edges) - 1)
    )
    total = 0.0
    for i, h in enumerate(counts):
        if total + h >= rank and h > 0:
            if discrete:
                return edges[i]
            return edges[i] + (edges[i + 1] - edges[i]) * (rank - total) / h
        total += h
    return edges[-2] if discrete else edges[-1]


def _quantile(m: Measure, c: Components, z: float) -> Figure:
    vec = c[f"{m.name}:bins"]
    # Negative noisy counts are clipped to 0 so the CDF is monotone (post-processing).
    counts = [max(0.0, v) for v in vec.values]
    edges = [float(x or 0.0) for x in vec.lower] + [float(vec.upper[-1] or 0.0)]
    n = sum(counts)
    q = m.quantile or 0.5
    if n < 2:
        return Figure(None, None, None, None, approximate=True)
    est = _quantile_at(counts, edges, q * n)
    # Rank uncertainty: DP noise on the cumulative count up to the quantile's bin (each bin
    # adds its variance) and the binomial sampling variance of an order statistic.
    below = 0
    running = 0.0
    for h in counts:
        if running + h >= q * n:
            break
        running += h
        below += 1
    var_rank = (below + 1) * vec.variance + q * (1 - q) * n
    se_rank = math.sqrt(var_rank)
    lo = _quantile_at(counts, edges, max(0.0, q * n - z * se_rank))
    hi = _quantile_at(counts, edges, min(n, q * n + z * se_rank))
    return Figure(est, (hi - lo) / (2 * z), lo, hi, approximate=True)


def _ratio(m: Measure, c: Components, z: float) -> Figure:
    num_key = next(k for k in c if k.startswith(f"{m.name}.num:"))
    den_key = next(k for k in c if k.startswith(f"{m.name}.den:"))
    a, var_a = _scalar(c, num_key)
    b, var_b = _scalar(c, den_key)
    if b <= 0:
        return Figure(None, None, None, None, approximate=True)
    est = a / b
    var = var_a / b**2 + a**2 * var_b / b**4
    se, lo, hi = _interval(est, var, z, nonneg=False)
    return Figure(est, se, lo, hi, approximate=True)


def figures(m: Measure, c: Components, z: float = Z95) -> list[Figure]:
    """The output figures of one measure from its components (one per bin for histograms)."""
    stat = m.statistic
    if stat in {Statistic.COUNT, Statistic.COUNT_ROWS, Statistic.SUM}:
        key = next(k for k in c if plan_mod.component_measure(k) == m.name)
        est, var = _scalar(c, key)
        se, lo, hi = _interval(est, var, z, nonneg=stat is not Statistic.SUM)
        return [Figure(est, se, lo, hi)]
    if stat in {Statistic.MEAN, Statistic.VARIANCE, Statistic.STDDEV}:
        return [_mean_like(m, c, z)]
    if stat is Statistic.QUANTILE:
        return [_quantile(m, c, z)]
    if stat is Statistic.HISTOGRAM:
        vec = c[f"{m.name}:bins"]
        out = []
        for v, lo_edge, hi_edge in zip(vec.values, vec.lower, vec.upper, strict=True):
            se, lo, hi = _interval(v, vec.variance, z, nonneg=True)
            out.append(Figure(v, se, lo, hi, bin_lower=lo_edge, bin_upper=hi_edge))
        return out
    return [_ratio(m, c, z)]


def sample_size(m: Measure, c: Components) -> float | None:
    """The noisy number of rows behind a derived figure (None for plain counts and sums)."""
    if m.statistic in {Statistic.MEAN, Statistic.VARIANCE, Statistic.STDDEV}:
        return c[f"{m.name}:rows"].values[0]
    if m.statistic is Statistic.QUANTILE:
        return sum(max(0.0, v) for v in c[f"{m.name}:bins"].values)
    if m.statistic is Statistic.RATIO:
        den = next(k for k in c if k.startswith(f"{m.name}.den:"))
        return c[den].values[0] if den.endswith(":rows") else None
    return None


OUTPUT_SCHEMA_TAIL = [
    ("measure", pa.string()),
    ("statistic", pa.string()),
    ("bin_lower", pa.float64()),
    ("bin_upper", pa.float64()),
    ("estimate", pa.float64()),
    ("std_error", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("n", pa.float64()),
    ("approximate", pa.bool_()),
    ("partial", pa.bool_()),
    ("suppressed", pa.bool_()),
]


def combine(
    query: Query,
    releases: Sequence[tuple[str, NodeRelease]],
    *,
    partial: bool = False,
    z: float = Z95,
) -> pa.Table:
    """Long table of figures: each region's rows, then the pooled rows, per group and measure.

    Columns: region, group columns, measure, statistic, bin_lower, bin_upper, estimate,
    std_error, ci_low, ci_high, n (noisy rows behind a derived figure), approximate,
    partial (pooled rows when a node is missing), suppressed (set by release rules).
    """
    per_region = _collect(query, releases)
    pooled: dict[tuple[str, ...], Components] = {}
    order: list[tuple[str, ...]] = []
    for (_, group), comps in per_region.items():
        if group not in pooled:
            order.append(group)
            pooled[group] = {
                k: _Vector([0.0] * len(v.values), 0.0, list(v.lower), list(v.upper))
                for k, v in comps.items()
            }
        for k, v in comps.items():
            pooled[group][k].add(v)
    rows: dict[str, list[object]] = {
        name: [] for name in ("region", *query.group_by, *(n for n, _ in OUTPUT_SCHEMA_TAIL))
    }

    def emit(region: str, group: tuple[str, ...], comps: Components, is_partial: bool) -> None:
        for m in query.measures:
            n = sample_size(m, comps)
            for f in figures(m, comps, z):
                rows["region"].append(region)
                for col, value in zip(query.group_by, group, strict=True):
                    rows[col].append(value)
                rows["measure"].append(m.name)
                rows["statistic"].append(m.statistic.value)
                rows["bin_lower"].append(f.bin_lower)
                rows["bin_upper"].append(f.bin_upper)
                rows["estimate"].append(f.estimate)
                rows["std_error"].append(f.std_error)
                rows["ci_low"].append(f.ci_low)
                rows["ci_high"].append(f.ci_high)
                rows["n"].append(n)
                rows["approximate"].append(f.approximate)
                rows["partial"].append(is_partial)
                rows["suppressed"].append(False)

    for (region, group), comps in per_region.items():
        emit(region, group, comps, False)
    for group in order:
        emit(POOLED, group, pooled[group], partial)
    schema = pa.schema(
        [("region", pa.string())] + [(c, pa.string()) for c in query.group_by] + OUTPUT_SCHEMA_TAIL
    )
    return pa.table(rows, schema=schema)
