"""Interrupted time series: segmented regression of DP monthly counts (docs/learning.md).

The model of a monthly count y_t, with t in months and t0 the intervention's first month:

    E[y_t] = b0 + b1 (t - t0) + b2 D_t + b3 D_t (t - t0) + seasonal(t),  D_t = [t >= t0]

with one pair of month-of-year harmonics (sin, cos of 2 pi m / 12) when the series spans at
least SEASONAL_MONTHS. It is fitted by weighted least squares with each month's variance
known: the DP noise variance the node reported plus the Poisson variance of the count (the
fitted mean, iterated from the count; both are independent across months). The covariance
of the coefficients is then (X' W X)^-1, so the 95% intervals cover sampling and DP noise.
b2 is the step (level change) at t0; the rate ratio is (c + b2) / c, with c = b0 +
seasonal(t0) the level the pre-intervention segment predicts for t0, its interval Fieller's
(a ratio of two correlated normal estimates; its std_error is the delta method's, of the log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from queries.errors import ConfigError

Z95 = 1.959963984540054
SEASONAL_MONTHS = 24  # two full years: enough to tell a season from a trend
MIN_SEGMENT_MONTHS = 3  # months needed on each side of the intervention
_POISSON_FLOOR = 0.5  # a month's Poisson variance is at least this (a fitted mean near 0)
_ITERATIONS = 4

Floats = NDArray[np.float64]


def month_index(month: str) -> int:
    """Months since year 0 of "YYYY-MM" (raises ConfigError naming the value)."""
    try:
        year, mon = (int(p) for p in month.split("-"))
    except ValueError:
        raise ConfigError(f"month {month[:20]!r} must look like YYYY-MM") from None
    if not 1 <= mon <= 12 or len(month) != 7:
        raise ConfigError(f"month {month[:20]!r} must look like YYYY-MM")
    return year * 12 + mon - 1


def month_name(index: int) -> str:
    """The "YYYY-MM" of a month_index."""
    return f"{index // 12}-{index % 12 + 1:02d}"


def month_range(first: str, last: str) -> tuple[str, ...]:
    """Every month from first to last, inclusive."""
    lo, hi = month_index(first), month_index(last)
    if hi < lo:
        raise ConfigError(f"months: {first} is after {last}")
    return tuple(month_name(i) for i in range(lo, hi + 1))


@dataclass(frozen=True)
class Series:
    """A monthly series of noisy counts and each month's DP noise variance."""

    label: str
    months: tuple[str, ...]
    counts: Floats
    noise_variance: Floats

    def __add__(self, other: Series) -> Series:
        if other.months != self.months:
            raise ConfigError("series to add must cover the same months")
        return Series(
            f"{self.label}+{other.label}",
            self.months,
            self.counts + other.counts,
            self.noise_variance + other.noise_variance,
        )


@dataclass(frozen=True)
class Estimate:
    """A figure with its standard error and 95% interval."""

    name: str
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float

    def covers(self, truth: float) -> bool:
        """Whether the interval holds truth."""
        return self.ci_low <= truth <= self.ci_high

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "estimate": self.estimate,
            "std_error": self.std_error,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
        }


def normal(name: str, estimate: float, se: float) -> Estimate:
    """A normal 95% interval."""
    return Estimate(name, estimate, se, estimate - Z95 * se, estimate + Z95 * se)


def log_normal(name: str, log_estimate: float, se: float) -> Estimate:
    """A ratio with its interval from a normal one on the log scale (std_error: of the log)."""
    return Estimate(
        name,
        math.exp(log_estimate),
        se,
        math.exp(log_estimate - Z95 * se),
        math.exp(log_estimate + Z95 * se),
    )


def fieller(n: float, d: float, v_n: float, c_nd: float, v_d: float) -> tuple[float, float]:
    """Fieller's 95% interval for n / d of two correlated normal estimates; (nan, nan) when
    the denominator is not clearly away from 0 (the interval is then unbounded). Unlike the
    delta method it keeps its coverage when the denominator is noisy."""
    z2 = Z95 * Z95
    qa = d * d - z2 * v_d
    qb = n * d - z2 * c_nd
    qc = n * n - z2 * v_n
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return math.nan, math.nan
    root = math.sqrt(disc)
    return (qb - root) / qa, (qb + root) / qa


@dataclass(frozen=True)
class ItsFit:
    """A fitted segmented regression and its estimates."""

    series: Series
    intervention: str
    names: tuple[str, ...]
    beta: Floats
    cov: Floats
    design: Floats
    fitted: Floats
    counterfactual: Floats  # the pre-intervention segment carried on (with the season)
    variance: Floats  # each month's variance used as its weight's inverse
    dispersion: float  # Pearson chi-square / df: about 1 if the variances are right
    seasonal: bool

    def _se(self, gradient: Floats) -> float:
        return float(math.sqrt(max(float(gradient @ self.cov @ gradient), 0.0)))

    def coefficient(self, name: str) -> Estimate:
        """One coefficient with its interval."""
        i = self.names.index(name)
        return normal(name, float(self.beta[i]), float(math.sqrt(self.cov[i, i])))

    @property
    def level(self) -> Estimate:
        """c: the level the pre-intervention segment predicts for the intervention month."""
        a = self.design[self._t0] * self._baseline_mask
        return normal("baseline_level", float(a @ self.beta), self._se(a))

    @property
    def _t0(self) -> int:
        return self.series.months.index(self.intervention)

    @property
    def _baseline_mask(self) -> Floats:
        return np.array([0.0 if n in ("step", "slope_change") else 1.0 for n in self.names])

    @property
    def step(self) -> Estimate:
        """b2: the level change at the intervention month, in counts per month."""
        return self.coefficient("step")

    @property
    def slope_change(self) -> Estimate:
        """b3: the change of slope, counts per month per month."""
        return self.coefficient("slope_change")

    @property
    def rate_ratio(self) -> Estimate:
        """(c + b2) / c; std_error is of its log. NaN if the baseline level is not positive."""
        a = self.design[self._t0] * self._baseline_mask
        b = a + (np.array(self.names) == "step")
        c, after = float(a @ self.beta), float(b @ self.beta)
        if c <= 0 or after <= 0:
            return Estimate("rate_ratio", math.nan, math.nan, math.nan, math.nan)
        low, high = fieller(after, c, b @ self.cov @ b, b @ self.cov @ a, a @ self.cov @ a)
        se = self._se(b / after - a / c)
        return Estimate("rate_ratio", after / c, se, low, high)

    @property
    def relative_slope(self) -> Estimate:
        """b1 / c: the pre-period trend as a share of the level per month (parallel trends)."""
        a = self.design[self._t0] * self._baseline_mask
        e = (np.array(self.names) == "trend").astype(np.float64)
        c, b1 = float(a @ self.beta), float(self.beta[self.names.index("trend")])
        if c <= 0:
            return Estimate("relative_slope", math.nan, math.nan, math.nan, math.nan)
        return normal("relative_slope", b1 / c, self._se(e / c - a * b1 / c**2))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready estimates and the series."""
        return {
            "series": self.series.label,
            "intervention": self.intervention,
            "months": list(self.series.months),
            "counts": self.series.counts.tolist(),
            "noise_variance": self.series.noise_variance.tolist(),
            "fitted": self.fitted.tolist(),
            "seasonal": self.seasonal,
            "dispersion": self.dispersion,
            "coefficients": [self.coefficient(n).to_dict() for n in self.names],
            "rate_ratio": self.rate_ratio.to_dict(),
            "relative_slope": self.relative_slope.to_dict(),
        }


def design(months: tuple[str, ...], intervention: str, *, seasonal: bool) -> Floats:
    """The segmented-regression design matrix (columns as in DESIGN_NAMES)."""
    index = np.array([month_index(m) for m in months], dtype=np.float64)
    t = index - month_index(intervention)
    after = (t >= 0).astype(np.float64)
    cols = [np.ones_like(t), t, after, after * t]
    if seasonal:
        angle = 2 * math.pi * (index % 12) / 12
        cols += [np.sin(angle), np.cos(angle)]
    return np.column_stack(cols)


DESIGN_NAMES = ("level", "trend", "step", "slope_change", "season_sin", "season_cos")


def fit(series: Series, intervention: str, *, seasonal: bool | None = None) -> ItsFit:
    """Fit the segmented regression to a series (seasonal: default when the span allows)."""
    months = series.months
    if intervention not in months:
        raise ConfigError(
            f"--intervention {intervention}: not within the series {months[0]}..{months[-1]}"
        )
    t0 = months.index(intervention)
    if t0 < MIN_SEGMENT_MONTHS or len(months) - t0 < MIN_SEGMENT_MONTHS:
        raise ConfigError(
            f"--intervention {intervention}: needs at least {MIN_SEGMENT_MONTHS} months on each "
            f"side (the series has {t0} before and {len(months) - t0} from it); widen the span"
        )
    if seasonal is None:
        seasonal = len(months) >= SEASONAL_MONTHS
    x = design(months, intervention, seasonal=seasonal)
    names = DESIGN_NAMES[: x.shape[1]]
    y = series.counts
    # Start from the counts as the Poisson variance, then use the fitted means (the counts'
    # own noise would otherwise weight low months up).
    mean = y
    for _ in range(_ITERATIONS):
        variance = series.noise_variance + np.maximum(mean, _POISSON_FLOOR)
        w = 1.0 / variance
        xtwx = x.T @ (x * w[:, None])
        cov: Floats = np.linalg.inv(xtwx).astype(np.float64)
        beta = cov @ (x.T @ (w * y))
        mean = x @ beta
    resid = y - mean
    df = max(len(months) - x.shape[1], 1)
    base = x * np.array([0.0 if n in ("step", "slope_change") else 1.0 for n in names])
    return ItsFit(
        series=series,
        intervention=intervention,
        names=names,
        beta=beta,
        cov=cov,
        design=x,
        fitted=mean,
        counterfactual=base @ beta,
        variance=variance,
        dispersion=float(np.sum(resid**2 / variance) / df),
        seasonal=seasonal,
    )
