"""Difference-in-differences of a step change against control regions (docs/learning.md).

The treated region's series and the controls' summed series are each fitted with the same
segmented regression (its.py). The effect is the ratio of their rate ratios at the
intervention month, RR_treated / RR_control: what changed in the treated region beyond what
changed in the controls at the same time. The two fits use disjoint regions, so their
noise (DP and Poisson) is independent and the variances of the log ratios add. Regions
differ in size, so trends are compared on the relative scale: the parallel-trends check is
the difference of the pre-period slopes as a share of each series' level per month, with
its 95% interval (an interval away from 0 says the controls are not a fair comparison; one
that holds 0 does not prove the trends parallel, only that the data cannot tell them apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from coordinator.learning import its
from coordinator.learning.its import Estimate, ItsFit, Series


@dataclass(frozen=True)
class DidFit:
    """The treated and control fits and what compares them."""

    treated: ItsFit
    control: ItsFit

    @property
    def ratio_of_ratios(self) -> Estimate:
        """RR_treated / RR_control, its std_error of the log."""
        t, c = self.treated.rate_ratio, self.control.rate_ratio
        if not (math.isfinite(t.estimate) and math.isfinite(c.estimate)):
            return Estimate("did_rate_ratio", math.nan, math.nan, math.nan, math.nan)
        log = math.log(t.estimate) - math.log(c.estimate)
        return its.log_normal("did_rate_ratio", log, math.hypot(t.std_error, c.std_error))

    @property
    def pre_trend_difference(self) -> Estimate:
        """Treated minus control pre-period relative slope (per month): 0 if parallel."""
        t, c = self.treated.relative_slope, self.control.relative_slope
        return its.normal(
            "pre_trend_difference", t.estimate - c.estimate, math.hypot(t.std_error, c.std_error)
        )

    @property
    def parallel(self) -> bool:
        """Whether the parallel-trends check's interval holds 0."""
        return self.pre_trend_difference.covers(0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "treated": self.treated.to_dict(),
            "control": self.control.to_dict(),
            "did_rate_ratio": self.ratio_of_ratios.to_dict(),
            "pre_trend_difference": self.pre_trend_difference.to_dict(),
            "parallel_trends_consistent": self.parallel,
        }


def fit(
    treated: Series, control: Series, intervention: str, *, seasonal: bool | None = None
) -> DidFit:
    """Fit both series with the same model and compare them."""
    if seasonal is None:
        seasonal = len(treated.months) >= its.SEASONAL_MONTHS
    return DidFit(
        its.fit(treated, intervention, seasonal=seasonal),
        its.fit(control, intervention, seasonal=seasonal),
    )
