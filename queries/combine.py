"""Post-processing across nodes: per-region and pooled estimates with intervals.

Everything here is post-processing of DP releases, so it costs no budget. Nodes add
independent noise, so a pooled sum's noise variance is the sum of the nodes' variances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

from queries.results import NodeRelease
from queries.spec import Query

POOLED = "All regions"
Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


def _interval(estimate: float, variance: float, z: float) -> tuple[float, float, float]:
    se = math.sqrt(variance)
    # A count is never negative, so truncating the interval at 0 keeps its coverage.
    return se, max(0.0, estimate - z * se), max(0.0, estimate + z * se)


def combine_counts(
    query: Query, releases: Sequence[tuple[str, NodeRelease]], *, z: float = Z95
) -> pa.Table:
    """Long table: region, group columns, measure, estimate, std_error, ci_low, ci_high.

    One row per region, group and measure from each answering node, then the pooled row
    (sum over the answering regions) for each group and measure.
    """
    seen_order: list[tuple[tuple[str, ...], str]] = []
    rows: dict[str, list[object]] = {
        k: []
        for k in (
            "region",
            *query.group_by,
            "measure",
            "estimate",
            "std_error",
            "ci_low",
            "ci_high",
        )
    }
    pooled: dict[tuple[tuple[str, ...], str], list[float]] = {}

    def add(region: str, group: tuple[str, ...], measure: str, est: float, var: float) -> None:
        se, lo, hi = _interval(est, var, z)
        rows["region"].append(region)
        for col, value in zip(query.group_by, group, strict=True):
            rows[col].append(value)
        rows["measure"].append(measure)
        rows["estimate"].append(float(est))
        rows["std_error"].append(se)
        rows["ci_low"].append(lo)
        rows["ci_high"].append(hi)

    for region, release in releases:
        table = release.table
        keys = list(zip(*(table.column(c).to_pylist() for c in query.group_by), strict=True))
        if not query.group_by:
            keys = [()] * table.num_rows
        for m in query.measures:
            values = table.column(m.name).to_pylist()
            for key, value in zip(keys, values, strict=True):
                group = tuple(str(k) for k in key)
                variance = release.variance(m.name)
                add(region, group, m.name, value, variance)
                acc = pooled.setdefault((group, m.name), [0.0, 0.0])
                if (group, m.name) not in seen_order:
                    seen_order.append((group, m.name))
                acc[0] += value
                acc[1] += variance
    for group, measure in seen_order:
        est, var = pooled[(group, measure)]
        add(POOLED, group, measure, est, var)
    schema = pa.schema(
        [("region", pa.string())]
        + [(c, pa.string()) for c in query.group_by]
        + [
            ("measure", pa.string()),
            ("estimate", pa.float64()),
            ("std_error", pa.float64()),
            ("ci_low", pa.float64()),
            ("ci_high", pa.float64()),
        ]
    )
    return pa.table(rows, schema=schema)
