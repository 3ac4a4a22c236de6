"""Federated results built the hub's way (queries.combine, then the release rules), no noise.

Each region's release is written by hand in the node's wire format, pooled by combine() and
passed through release.apply() as the hub does, so the flags and nulls the presentation code
reads are the real ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pyarrow as pa

from queries import release
from queries.combine import combine
from queries.results import (
    RELEASE_COLUMNS,
    BudgetStatus,
    FederatedResult,
    MeasureNoise,
    NodeOutcome,
    NodeRelease,
    NodeStatus,
    NoiseInfo,
    ReleaseRules,
    release_schema,
)
from queries.spec import Measure, Query, Statistic

BUDGET = BudgetStatus(rho_total=10.0, rho_spent=1.0, max_rho_per_query=1.0, delta=1e-6)
RHO = 0.1
VARIANCE = 16.0
SUM_BOUNDS = (-100.0, 100.0)


def _noise(variance: float) -> NoiseInfo:
    return NoiseInfo("discrete_gaussian", math.sqrt(variance), variance, 1.0)


def _release(
    groups: Sequence[str], component: str, values: Sequence[float | None], bounds: object
) -> NodeRelease:
    lower, upper = bounds if isinstance(bounds, tuple) else (None, None)
    n = len(values)
    columns: dict[str, list[object]] = {"sex": list(groups)} if groups else {}
    columns |= {
        "component": [component] * n,
        "bin": [-1] * n,
        "bin_lower": [None] * n,
        "bin_upper": [None] * n,
        "lower": [lower] * n,
        "upper": [upper] * n,
        "value": [None if v is None else float(v) for v in values],
    }
    assert set(columns) - {"sex"} == set(RELEASE_COLUMNS)
    return NodeRelease(
        query_id="q",
        table=pa.table(columns, schema=release_schema(["sex"] if groups else [])),
        noise=_noise(VARIANCE),
        rho_charged=RHO,
        epsilon=1.0,
        budget=BUDGET,
        measures=(MeasureNoise(component, component, _noise(VARIANCE), RHO),),
    )


def federated(
    values: Mapping[str, Sequence[float | None]],
    *,
    groups: Sequence[str] = ("female", "male"),
    statistic: Statistic = Statistic.COUNT,
    missing: Mapping[str, str] | None = None,
    rules: ReleaseRules | None = None,
) -> FederatedResult:
    """A result of regions' counts (or sums of `cost`) by sex, pooled and under the rules.

    values: each answering region's released values, one per group (None: withheld);
    missing: the nodes that did not answer, with their message (the result is then partial).
    """
    if statistic is Statistic.SUM:
        measure = Measure(Statistic.SUM, "cost", column="cost")
        component, bounds = "sum:cost", SUM_BOUNDS
    else:
        measure, component, bounds = Measure(), "persons", None
    group_by = ("sex",) if groups else ()
    query = Query(view="persons", rho=RHO, group_by=group_by, measures=(measure,))
    releases = [(r, _release(groups, component, v, bounds)) for r, v in values.items()]
    gone = dict(missing or {})
    table = combine(query, releases, partial=bool(gone))
    table = release.apply(table, rules or ReleaseRules(), group_by)
    outcomes = [
        NodeOutcome(node=r, status=NodeStatus.OK, rho_charged=RHO, budget=BUDGET) for r in values
    ]
    outcomes += [
        NodeOutcome(node=n, status=NodeStatus.UNREACHABLE, message=m) for n, m in gone.items()
    ]
    return FederatedResult(
        query_id="0123abcd", table=table, nodes=tuple(outcomes), partial=bool(gone)
    )
