"""Risk-adjusted comparison of units by indirect standardisation (docs/models.md).

By region: the adjusting model is fitted across every node WITHOUT a region effect
(indirect standardisation against the pooled model). Per node the fit already released, and
charged, the outcome sum O_hat = O + e1 (design check, variance v1) and the intercept entry
of the last Newton step's gradient g_hat = O - E + e2 (variance v2), E = sum of mu at that
step's coefficients; e1 and e2 are independent. So E_hat = O_hat - g_hat = E + e1 - e2, at
no further charge, and the ratio R = O_hat / E_hat has, to first order (R = O/(O - g)),
DP variance (g^2 v1 + O^2 v2) / E^4: the outcome's noise nearly cancels when O ~ E. Its
sampling variance is O/E^2 (Poisson on O, E taken as known, as in indirect standardisation;
conservative for a binomial outcome). The 95% interval is on the log scale.

By another public category of the person (care_site): the model says compare_by, so each
node's design check also releases O per level and an expected step at the final
coefficients releases sum (y - mu) per level (queries/model_plan.py); the hub sums each
level over the nodes and applies the disclosure rules (units.py); the same ratio follows.
Trusts are usually compared within their region's expected rate: give `region` among the
adjusters and the model takes a region effect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.learning import funnel
from coordinator.learning.plot import figure_paths
from coordinator.learning.result import FitResult
from queries.errors import ConfigError, QueryError
from queries.fitted import Z95, NodeTotals, UnitTotals
from queries.model import Covariate, Family, ModelSpec
from queries.spec import Filter

if TYPE_CHECKING:
    from coordinator.analyst.client import Federation

# The units a comparison takes: region, or a public category of the person such as care_site.
BY_REGION = "region"
# The flag of a unit whose noisy expected count came out not positive: no ratio can be
# stated. Reported, never raised: the fit was charged, and after that nothing about the data
# may turn into an error (a status that depends on the data).
NO_ESTIMATE = "no estimate: the noisy expected count is not positive (give the fit more rho)"
DEFAULT_RHO = 1.0  # zCDP of the adjusting fit at each node, within the default per-query cap


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
    """O/E of one node from its noisy totals, with DP and sampling variances."""
    return ratio_of(t.node, t.outcome_sum, t.outcome_variance, t.residual_sum, t.residual_variance)


def _unit(t: UnitTotals) -> UnitRatio:
    if t.suppressed:
        nan = math.nan
        return UnitRatio(t.unit, nan, nan, nan, nan, nan, nan, nan, nan, flag=t.reason)
    return ratio_of(t.unit, t.outcome_sum, t.outcome_variance, t.residual_sum, t.residual_variance)


def ratio_of(unit: str, o: float, v1: float, g: float, v2: float) -> UnitRatio:
    """O/E from O_hat (variance v1) and g_hat = sum (y - mu) (variance v2), noises independent."""
    e = o - g
    if not e > 0:
        inf = math.inf
        return UnitRatio(unit, o, e, math.nan, inf, inf, 0.0, inf, v2, flag=NO_ESTIMATE)
    ratio = o / e
    dp = (g**2 * v1 + o**2 * v2) / e**4
    # Poisson on O; at least one event's variance so that O = 0 still has a width.
    sampling = max(o, 1.0) / e**2
    sd = math.sqrt(dp + sampling)
    if ratio > 0:
        low, high = ratio * math.exp(-Z95 * sd / ratio), ratio * math.exp(Z95 * sd / ratio)
    else:
        low, high = 0.0, Z95 * sd
    return UnitRatio(unit, o, e, ratio, dp, sampling, low, high, v2)


def _scored(u: UnitRatio) -> bool:
    """Whether the unit has a ratio (neither suppressed nor without an estimate)."""
    return math.isfinite(u.ratio)


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
        """The units outside the 99.8% limits (alarms, Spiegelhalter 2005)."""
        return tuple(u.unit for u in self.units if _scored(u) and u.flag.endswith("99.8%"))

    @property
    def alerts(self) -> tuple[str, ...]:
        """The units outside the 95% limits but within the 99.8% ones."""
        return tuple(u.unit for u in self.units if _scored(u) and u.flag.endswith(" 95%"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (`chc learn compare --json`)."""
        return {
            "by": self.by,
            # JSON has no NaN or Infinity: a unit without an estimate has nulls there.
            "units": [{k: _finite_or_none(v) for k, v in asdict(u).items()} for u in self.units],
            "outliers": list(self.outliers),
            "alerts": list(self.alerts),
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
            if _scored(u)
            else [u.unit, "-", "-", "-", "-", u.flag]
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
            "outside the 99.8% limits: " + (", ".join(self.outliers) or "none"),
            "outside the 95% limits only: " + (", ".join(self.alerts) or "none"),
        ]
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, path: Path | str) -> Path:
        """Write the funnel plot as PNG or SVG (by suffix)."""
        shown = [u for u in self.units if _scored(u)]
        if not shown:
            raise QueryError("no unit has a ratio to plot (every one suppressed or without one)")
        v = sorted(u.residual_variance for u in shown)[len(shown) // 2]
        return funnel.draw(
            [(u.unit, u.expected, u.ratio) for u in shown],
            Path(path),
            dp_variance=v,
            phi=self.phi,
            flagged=frozenset(u.unit for u in shown if u.flag),
            title=f"O/E by {self.by}, adjusted for {self.fit_adjustment()}",
        )

    def plots(self, stem: Path | str) -> tuple[Path, Path]:
        """Write the funnel plot as STEM.png and STEM.svg."""
        png, svg = figure_paths(Path(stem).with_suffix(""))
        return self.plot(png), self.plot(svg)

    def fit_adjustment(self) -> str:
        """The adjusting covariates, for titles."""
        model = self.fit.model
        if model is None:
            return "?"
        return ", ".join(
            [c.column for c in model.covariates] + (["region"] if model.region else [])
        )


def compare_units(
    totals: Sequence[NodeTotals] | Sequence[UnitTotals],
    *,
    overdispersed: bool,
    by: str,
    fit: FitResult,
) -> Comparison:
    """The comparison from the fit's per-node or per-unit totals."""
    if not totals:
        raise QueryError("the fit released no per-unit totals (a Gaussian model has none)")
    ratios = [_unit(t) if isinstance(t, UnitTotals) else unit_ratio(t) for t in totals]
    scored = [u for u in ratios if _scored(u)]
    phi_hat = funnel.overdispersion([z_score(u) for u in scored]) if scored else math.nan
    phi = max(1.0, phi_hat) if overdispersed and scored else None
    units = tuple(
        UnitRatio(**{**asdict(u), "flag": flag(u, phi)}) if _scored(u) else u for u in ratios
    )
    return Comparison(by=by, units=units, phi=phi, phi_estimate=phi_hat, fit=fit)


def adjusting_model(
    pathway: str,
    outcome: str,
    adjust: Sequence[str],
    rho: float = DEFAULT_RHO,
    *,
    by: str = BY_REGION,
    family: Family = Family.BINOMIAL,
    event: str | None = None,
    iterations: int | None = None,
    where: tuple[Filter, ...] = (),
) -> ModelSpec:
    """The pooled model to standardise against: the adjusters, and `region` if named."""
    if by == BY_REGION and BY_REGION in adjust:
        raise ConfigError("--adjust: the unit compared (region) cannot also be adjusted for")
    if by in adjust:
        raise ConfigError(f"--adjust: the unit compared ({by}) cannot also be adjusted for")
    if family is Family.GAUSSIAN:
        raise ConfigError("--family: O/E compares counts; use binomial or poisson")
    return ModelSpec(
        view=pathway,
        outcome=outcome,
        family=family,
        covariates=tuple(Covariate(column=c) for c in adjust if c != BY_REGION),
        rho=rho,
        region=BY_REGION in adjust,
        event=event,
        iterations=iterations,
        where=where,
        compare_by=None if by == BY_REGION else by,
    )


def compare(
    fed: Federation,
    model: ModelSpec,
    *,
    by: str = BY_REGION,
    overdispersion: bool = False,
    deadline_s: float = 60.0,
) -> Comparison:
    """Fit the adjusting model across the federation and compare its units by O/E."""
    if by == BY_REGION:
        if model.region or model.compare_by is not None:
            raise ConfigError(
                "comparing regions: the adjusting model must have no region effect and no "
                "compare_by (adjusting_model builds it)"
            )
    elif model.compare_by != by:
        raise ConfigError(
            f"comparing by {by[:40]!r}: the adjusting model must say compare_by={by[:40]!r} "
            "(adjusting_model(..., by=...) builds it)"
        )
    result = fed.fit(model, deadline_s=deadline_s)
    if not result.coefficients:
        raise QueryError(f"the fit gave no coefficients: {result.message}")
    totals = result.unit_totals if by != BY_REGION else result.node_totals
    return compare_units(totals, overdispersed=overdispersion, by=by, fit=result)
