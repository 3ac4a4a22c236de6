"""Model fits on the wire: one node's step release, and the hub's fitted model.

The part of protocols/serde.py for fits (queries/model.py, queries/fitted.py), kept apart so
that each module stays small; like serde, every *_from_proto validates what a peer sent.
"""

from __future__ import annotations

import math

from protocols.serde import budget_to_proto, outcome_from_proto, outcome_to_proto
from protocols.v1 import hub_pb2, node_pb2
from queries.errors import DataError
from queries.fitted import (
    FitIterationInfo,
    FittedCoefficient,
    FittedModel,
    NodeTotals,
    UnitTotals,
)
from queries.model import Family, StepRelease
from queries.results import BudgetStatus


def step_release_to_proto(
    release: StepRelease,
    *,
    query_id: str,
    epsilon: float,
    budget: BudgetStatus,
    ledger_sequence: int,
) -> node_pb2.FitStepResponse:
    """One node's release of one step of a fit, for the wire."""
    return node_pb2.FitStepResponse(
        query_id=query_id,
        step=release.step,
        columns=list(release.columns),
        statistics=[
            node_pb2.StatisticVector(
                name=name, values=list(values), noise_variance=release.variances.get(name, 0.0)
            )
            for name, values in release.vectors.items()
        ],
        rho_charged=release.rho,
        epsilon=epsilon,
        budget=budget_to_proto(budget),
        ledger_sequence=ledger_sequence,
        units=list(release.units),
    )


def step_release_from_proto(msg: node_pb2.FitStepResponse, node: str) -> StepRelease:
    """One node's release of one step from the wire; non-finite or repeated entries refused."""
    vectors: dict[str, tuple[float, ...]] = {}
    variances: dict[str, float] = {}
    for s in msg.statistics:
        if s.name in vectors:
            raise DataError(f"node {node} released statistic {s.name[:40]!r} twice")
        values = tuple(s.values)
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"node {node} released a non-finite {s.name[:40]!r}")
        if not math.isfinite(s.noise_variance) or s.noise_variance < 0:
            # An impossible noise would turn into a standard error that claims no error.
            raise DataError(
                f"node {node} reported an impossible noise variance for {s.name[:40]!r}"
            )
        vectors[s.name] = values
        variances[s.name] = s.noise_variance
    if not math.isfinite(msg.rho_charged) or msg.rho_charged < 0:
        raise DataError(f"node {node} reported an impossible charge {msg.rho_charged!r}")
    units = tuple(msg.units)
    if len(set(units)) != len(units):
        raise DataError(f"node {node} named a compared unit twice")
    for name in ("unit_outcome", "unit_residual"):
        if name in vectors and len(vectors[name]) != len(units):
            raise DataError(
                f"node {node} released {len(vectors[name])} {name} value(s) for "
                f"{len(units)} unit(s)"
            )
    return StepRelease(
        node=node,
        step=msg.step,
        columns=tuple(msg.columns),
        vectors=vectors,
        variances=variances,
        rho=msg.rho_charged,
        units=units,
    )


def fitted_to_proto(fitted: FittedModel) -> hub_pb2.FitResponse:
    """The hub's fitted model for the wire."""
    return hub_pb2.FitResponse(
        query_id=fitted.query_id,
        coefficients=[
            hub_pb2.Coefficient(
                column=c.column,
                estimate=c.estimate,
                dp_std_error=c.dp_std_error,
                std_error=c.std_error,
                ci_low=c.ci_low,
                ci_high=c.ci_high,
            )
            for c in fitted.coefficients
        ],
        iterations=[
            hub_pb2.FitIteration(step=i.step, max_change=i.max_change, repaired=i.repaired)
            for i in fitted.iterations
        ],
        nodes=[outcome_to_proto(o) for o in fitted.nodes],
        partial=fitted.partial,
        family=fitted.family.value,
        link=fitted.link,
        persons=fitted.persons,
        message=fitted.message,
        node_totals=[
            hub_pb2.NodeTotals(
                node=t.node,
                outcome_sum=t.outcome_sum,
                outcome_variance=t.outcome_variance,
                residual_sum=t.residual_sum,
                residual_variance=t.residual_variance,
                step=t.step,
            )
            for t in fitted.node_totals
        ],
        totals_coefficients=list(fitted.totals_coefficients),
        unit_totals=[
            hub_pb2.UnitTotals(
                unit=t.unit,
                outcome_sum=t.outcome_sum,
                outcome_variance=t.outcome_variance,
                residual_sum=t.residual_sum,
                residual_variance=t.residual_variance,
                nodes=list(t.nodes),
                suppressed=t.suppressed,
                reason=t.reason,
            )
            for t in fitted.unit_totals
        ],
        compare_by=fitted.compare_by,
    )


def fitted_from_proto(msg: hub_pb2.FitResponse) -> FittedModel:
    """The hub's fitted model from the wire."""
    try:
        family = Family(msg.family)
    except ValueError:
        raise DataError(f"the hub sent an unknown model family {msg.family[:40]!r}") from None
    for c in msg.coefficients:
        # +inf is the hub's "no interval" (the budget cannot pin this coefficient down,
        # docs/models.md); NaN or a negative one is never a standard error.
        for se in (c.dp_std_error, c.std_error):
            if math.isnan(se) or se < 0:
                raise DataError(f"coefficient {c.column!r} has an impossible standard error")
    return FittedModel(
        query_id=msg.query_id,
        family=family,
        link=msg.link,
        coefficients=tuple(
            FittedCoefficient(
                column=c.column,
                estimate=c.estimate,
                dp_std_error=c.dp_std_error,
                std_error=c.std_error,
                ci_low=c.ci_low,
                ci_high=c.ci_high,
            )
            for c in msg.coefficients
        ),
        iterations=tuple(
            FitIterationInfo(step=i.step, max_change=i.max_change, repaired=i.repaired)
            for i in msg.iterations
        ),
        nodes=tuple(outcome_from_proto(o) for o in msg.nodes),
        partial=msg.partial,
        persons=msg.persons,
        message=msg.message,
        node_totals=tuple(_totals_from_proto(t) for t in msg.node_totals),
        totals_coefficients=tuple(msg.totals_coefficients),
        unit_totals=tuple(_unit_from_proto(t) for t in msg.unit_totals),
        compare_by=msg.compare_by,
    )


def _possible(t: hub_pb2.NodeTotals | hub_pb2.UnitTotals) -> bool:
    """Whether totals are real numbers with noise variances >= 0."""
    values = (t.outcome_sum, t.outcome_variance, t.residual_sum, t.residual_variance)
    return all(math.isfinite(v) for v in values) and min(values[1], values[3]) >= 0


def _unit_from_proto(t: hub_pb2.UnitTotals) -> UnitTotals:
    # A suppressed unit's figures are NaN; a shown one's must be possible.
    if not t.suppressed and not _possible(t):
        raise DataError(f"the hub sent impossible totals for unit {t.unit[:40]!r}")
    return UnitTotals(
        unit=t.unit,
        outcome_sum=t.outcome_sum,
        outcome_variance=t.outcome_variance,
        residual_sum=t.residual_sum,
        residual_variance=t.residual_variance,
        nodes=tuple(t.nodes),
        suppressed=t.suppressed,
        reason=t.reason,
    )


def _totals_from_proto(t: hub_pb2.NodeTotals) -> NodeTotals:
    if not _possible(t):
        raise DataError(f"the hub sent impossible totals for node {t.node[:40]!r}")
    return NodeTotals(
        node=t.node,
        outcome_sum=t.outcome_sum,
        outcome_variance=t.outcome_variance,
        residual_sum=t.residual_sum,
        residual_variance=t.residual_variance,
        step=t.step,
    )
