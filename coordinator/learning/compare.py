"""Risk-adjusted comparison of units by indirect standardisation (docs/models.md).

The adjusting model is fitted across every node WITHOUT a region effect (indirect
standardisation against the pooled model). Per node the fit already released, and charged,
the outcome sum O_hat = O + e1 (design check, variance v1) and the intercept entry of the
last Newton step's gradient g_hat = O - E + e2 (variance v2), E = sum of mu at that step's
coefficients; e1 and e2 are independent. So E_hat = O_hat - g_hat = E + e1 - e2, at no
further charge, and the ratio R = O_hat / E_hat has, to first order (R = O/(O - g)),
DP variance (g^2 v1 + O^2 v2) / E^4: the outcome's noise nearly cancels when O ~ E. Its
sampling variance is O/E^2 (Poisson on O, E taken as known, as in indirect standardisation;
conservative for a binomial outcome). The 95% interval is on the log scale.

`--by care_site` needs, per node, O and E per care site: a design check grouped by the
public care-site domain and a final step releasing sum of mu per site (one person in one
site, so the sensitivity of a single sum); then unit_ratios applies unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.learning import funnel
from coordinator.learning.result import FitResult
from queries.errors import ConfigError, QueryError
from queries.fitted import Z95, NodeTotals
from queries.model import Covariate, Family, ModelSpec
from queries.spec import Filter

if TYPE_CHECKING:
    from coordinator.analyst.client import Federation

BY = ("region",)
# The flag of a unit whose noisy expected count came out not positive: no ratio can be
# stated. Reported, never raised: the fit was charged, and after that nothing about the data
# may turn into an error (a status that depends on the data).
NO_ESTIMATE = "no estimate: the noisy expected count is not positive (give the fit more rho)"


@dataclass(frozen=True)
class UnitRatio:
    """One unit's observed and expected counts, O/E with its 95% interval, and its flag."""

    unit: str
    observed: float
    expected: float
    ratio: float
    dp_variance: float  # of the ratio
    sampling_variance: float  # of the ratio
    ci_low: float
    ci_high: float
    residual_variance: float  # v2, in counts: the DP noise the funnel's limits include
    flag: str = ""  # "", "above 95%", "below 99.8%", ...


def unit_ratio(t: NodeTotals) -> UnitRatio:
    """O/E of one unit from its noisy totals, with DP and sampling variances."""
    o, g = t.outcome_sum, t.residual_sum
    e = o - g
    if not e > 0:
        inf = math.inf
        return UnitRatio(
            t.node, o, e, math.nan, inf, inf, 0.0, inf, t.residual_variance, flag=NO_ESTIMATE
        )
    ratio = o / e
    dp = (g**2 * t.outcome_variance + o**2 * t.residual_variance) / e**4
    # Poisson on O; at least one event's variance so that O = 0 still has a width.
    sampling = max(o, 1.0) / e**2
    sd = math.sqrt(dp + sampling)
    if ratio > 0:
        low, high = ratio * math.exp(-Z95 * sd / ratio), ratio * math.exp(Z95 * sd / ratio)
    else:
        low, high = 0.0, Z95 * sd
    return UnitRatio(t.node, o, e, ratio, dp, sampling, low, high, t.residual_variance)


def _finite_or_none(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def flag(u: UnitRatio, phi: float | None) -> str:
    """Which funnel limits the unit's ratio lies outside of ('' if none)."""
    for level in reversed(funnel.LEVELS):
        low, high = funnel.limits(u.expected, level, u.residual_variance, phi)
        if u.ratio > high:
            return f"above {100 * level:g}%"
        if u.ratio < low:
            return f"below {100 * level:g}%"
    return ""


def z_score(u: UnitRatio) -> float:
    """(R - 1) / sqrt(V0): the unit's standardised residual under the null."""
    return (u.ratio - 1.0) / math.sqrt(funnel.null_variance(u.expected, u.residual_variance))


@dataclass(frozen=True)
class Comparison:
    """The units' O/E ratios against the pooled model, their flags, and the fit behind them."""

    by: str
    units: tuple[UnitRatio, ...]
    phi: float | None  # the overdispersion factor applied (None: none asked)
    phi_estimate: float
    fit: FitResult

    @property
    def outliers(self) -> tuple[str, ...]:
        """The units outside the 95% or 99.8% limits."""
        return tuple(u.unit for u in self.units if u.flag and u.flag != NO_ESTIMATE)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (`chc learn compare --json`)."""
        return {
            "by": self.by,
            # JSON has no NaN or Infinity: a unit without an estimate has nulls there.
            "units": [{k: _finite_or_none(v) for k, v in asdict(u).items()} for u in self.units],
            "outliers": list(self.outliers),
            "phi": self.phi,
            "phi_estimate": self.phi_estimate,
            "fit": self.fit.to_dict(),
        }

    def summary(self) -> str:
        """A table: O, E, O/E, its 95% interval, and the funnel's flag."""
        head = [self.by, "observed", "expected", "O/E", "95% CI", "funnel"]
        body = [
            [
                u.unit,
                f"{u.observed:.1f}",
                f"{u.expected:.1f}",
                f"{u.ratio:.3f}",
                f"{u.ci_low:.3f} to {u.ci_high:.3f}",
                u.flag or "within",
            ]
            for u in self.units
        ]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *body]
        ]
        over = f"phi {self.phi:.3g} applied" if self.phi is not None else "none applied"
        lines += [
            f"overdispersion: {over} (estimate {self.phi_estimate:.3g}); limits: "
            + ("normal approximation" if self.phi is not None else "exact Poisson with DP noise"),
            "outside the limits: " + (", ".join(self.outliers) or "none"),
        ]
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, path: Path | str) -> Path:
        """Write the funnel plot as PNG or SVG (by suffix)."""
        v = sorted(u.residual_variance for u in self.units)[len(self.units) // 2]
        return funnel.draw(
            [(u.unit, u.expected, u.ratio) for u in self.units if u.flag != NO_ESTIMATE],
            Path(path),
            dp_variance=v,
            phi=self.phi,
            title=f"O/E by {self.by}, adjusted for {self.fit_adjustment()}",
        )

    def fit_adjustment(self) -> str:
        """The adjusting covariates, for titles."""
        model = self.fit.model
        return ", ".join(c.column for c in model.covariates) if model else "?"


def compare_units(
    totals: Sequence[NodeTotals], *, overdispersed: bool, by: str, fit: FitResult
) -> Comparison:
    """The comparison from the fit's per-unit totals."""
    if not totals:
        raise QueryError("the fit released no per-unit totals (a Gaussian model has none)")
    ratios = [unit_ratio(t) for t in totals]
    scored = [u for u in ratios if u.flag != NO_ESTIMATE]
    phi_hat = funnel.overdispersion([z_score(u) for u in scored]) if scored else math.nan
    phi = max(1.0, phi_hat) if overdispersed and scored else None
    units = tuple(
        u if u.flag == NO_ESTIMATE else UnitRatio(**{**asdict(u), "flag": flag(u, phi)})
        for u in ratios
    )
    return Comparison(by=by, units=units, phi=phi, phi_estimate=phi_hat, fit=fit)


def adjusting_model(
    pathway: str,
    outcome: str,
    adjust: Sequence[str],
    rho: float,
    *,
    family: Family = Family.BINOMIAL,
    event: str | None = None,
    iterations: int | None = None,
    where: tuple[Filter, ...] = (),
) -> ModelSpec:
    """The pooled model to standardise against: the adjusters, no region effect."""
    if "region" in adjust:
        raise ConfigError("--adjust: the unit compared (region) cannot also be adjusted for")
    if family is Family.GAUSSIAN:
        raise ConfigError("--family: O/E compares counts; use binomial or poisson")
    return ModelSpec(
        view=pathway,
        outcome=outcome,
        family=family,
        covariates=tuple(Covariate(column=c) for c in adjust),
        rho=rho,
        region=False,
        event=event,
        iterations=iterations,
        where=where,
    )


def compare(
    fed: Federation,
    model: ModelSpec,
    *,
    by: str = "region",
    overdispersion: bool = False,
    deadline_s: float = 60.0,
) -> Comparison:
    """Fit the adjusting model across the federation and compare its units by O/E."""
    if by not in BY:
        raise ConfigError(
            f"--by {by[:40]!r}: this version compares {', '.join(BY)}; care sites need a "
            "per-site design check and expected step (docs/models.md, 'Comparing units')"
        )
    if model.region:
        raise ConfigError("the adjusting model must have no region effect")
    result = fed.fit(model, deadline_s=deadline_s)
    if not result.coefficients:
        raise QueryError(f"the fit gave no coefficients: {result.message}")
    return compare_units(result.node_totals, overdispersed=overdispersion, by=by, fit=result)
