"""A fitted federated model as the hub returns it: shared by the hub, serde and the client."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from queries.model import Family
from queries.results import NodeOutcome

# The 97.5% point of the standard normal: 95% intervals.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class FittedCoefficient:
    """One coefficient with its two standard errors and its 95% interval (DP + sampling)."""

    column: str
    estimate: float
    # The DP noise alone: its interval covers the fit the pooled data would give without noise.
    dp_std_error: float
    # DP noise and sampling (model-based): for the population coefficient.
    std_error: float
    ci_low: float
    ci_high: float

    @property
    def dp_interval(self) -> tuple[float, float]:
        """The 95% interval of the noise alone (for the noiseless pooled fit)."""
        return (self.estimate - Z95 * self.dp_std_error, self.estimate + Z95 * self.dp_std_error)


@dataclass(frozen=True)
class FitIterationInfo:
    """One Newton step: its largest change (in standard errors) and whether it was repaired."""

    step: int
    max_change: float
    repaired: bool


@dataclass(frozen=True)
class NodeTotals:
    """One node's noisy outcome sum and sum of y - mu (the last step's), with noise variances.

    outcome_sum is the design check's; residual_sum the intercept entry of the gradient of
    Newton step `step`, at the coefficients the hub sent for it. Their noises are independent.
    """

    node: str
    outcome_sum: float
    outcome_variance: float
    residual_sum: float
    residual_variance: float
    step: int


@dataclass(frozen=True)
class UnitTotals:
    """One compared unit's noisy outcome sum and sum of y - mu, over the nodes, with noise.

    From a compare_by model: outcome_sum is the design checks' sum at the unit's level,
    residual_sum the expected step's, at the final coefficients; both summed over `nodes`
    (whose catalogs have the level), their noise variances added. A unit the disclosure
    rules suppress has NaN figures and the reason.
    """

    unit: str
    outcome_sum: float
    outcome_variance: float
    residual_sum: float
    residual_variance: float
    nodes: tuple[str, ...]
    suppressed: bool = False
    reason: str = ""


@dataclass(frozen=True)
class FittedModel:
    """The hub's fit: coefficients, convergence, and what each node was charged."""

    query_id: str
    family: Family
    link: str
    coefficients: tuple[FittedCoefficient, ...]
    iterations: tuple[FitIterationInfo, ...]
    nodes: tuple[NodeOutcome, ...]
    partial: bool
    persons: int
    message: str
    # Per node, for indirect standardisation (coordinator/learning/compare.py).
    node_totals: tuple[NodeTotals, ...] = ()
    # The coefficients the node_totals' step was sent: E = O - g_0 is at these.
    totals_coefficients: tuple[float, ...] = ()
    # A compare_by model's units (then node_totals is empty), and the column compared.
    unit_totals: tuple[UnitTotals, ...] = ()
    compare_by: str = ""

    @property
    def has_ratios(self) -> bool:
        """Whether exp(coefficient) means something: an odds ratio or a rate ratio."""
        return self.family is not Family.GAUSSIAN

    @property
    def ratio_name(self) -> str:
        """What exp(coefficient) is called for this family ('' for Gaussian)."""
        return {Family.BINOMIAL: "odds ratio", Family.POISSON: "rate ratio"}.get(self.family, "")

    def coefficient(self, column: str) -> FittedCoefficient:
        """One coefficient by its design column."""
        for c in self.coefficients:
            if c.column == column:
                return c
        raise KeyError(
            f"no coefficient {column!r}; columns: {[c.column for c in self.coefficients]}"
        )

    def to_arrow(self) -> pa.Table:
        """One row per coefficient; ratio columns (exp) are null for a Gaussian model."""
        cs = self.coefficients

        def ratio(values: list[float]) -> list[float | None]:
            # exp of a huge coefficient is infinite rather than an OverflowError.
            return [
                (math.exp(v) if v < 700 else math.inf) if self.has_ratios else None for v in values
            ]

        return pa.table(
            {
                "column": pa.array([c.column for c in cs], pa.string()),
                "estimate": pa.array([c.estimate for c in cs], pa.float64()),
                "dp_std_error": pa.array([c.dp_std_error for c in cs], pa.float64()),
                "std_error": pa.array([c.std_error for c in cs], pa.float64()),
                "ci_low": pa.array([c.ci_low for c in cs], pa.float64()),
                "ci_high": pa.array([c.ci_high for c in cs], pa.float64()),
                "dp_ci_low": pa.array([c.dp_interval[0] for c in cs], pa.float64()),
                "dp_ci_high": pa.array([c.dp_interval[1] for c in cs], pa.float64()),
                "ratio": pa.array(ratio([c.estimate for c in cs]), pa.float64()),
                "ratio_low": pa.array(ratio([c.ci_low for c in cs]), pa.float64()),
                "ratio_high": pa.array(ratio([c.ci_high for c in cs]), pa.float64()),
            }
        )

    def to_pandas(self) -> Any:
        """The coefficient table as a pandas DataFrame (needs pandas installed)."""
        return self.to_arrow().to_pandas()
