"""Run a compiled plan on the node's data: exact aggregates, then calibrated noise.

The exact values never leave this module except as noisy releases; `exact_values` is the
internal path tests use to compare releases with the truth, and is never reachable over gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from node.store import OmopStore
from queries import mechanisms, plan


@dataclass(frozen=True)
class MeasureRelease:
    """One measure's calibration, fixed before the data is touched."""

    name: str
    statistic: str
    calibration: mechanisms.Calibration


def calibrations(compiled: plan.Plan) -> tuple[MeasureRelease, ...]:
    """The noise of every measure in a plan, with the query's rho split between them."""
    share = compiled.query.rho / len(compiled.query.measures)
    return tuple(
        MeasureRelease(
            name=m.name,
            statistic=m.statistic.value,
            calibration=mechanisms.calibrate(compiled.sensitivity_per_measure, share),
        )
        for m in compiled.query.measures
    )


def exact_values(compiled: plan.Plan, store: OmopStore) -> dict[str, list[int]]:
    """Exact integer aggregates per measure, re-indexed onto the public output domain."""
    result = store.query(compiled.sql)
    keys = [result.column(c).to_pylist() for c in compiled.group_by]
    index = {tuple(str(k[i]) for k in keys): i for i in range(result.num_rows)}
    values: dict[str, list[int]] = {}
    for m in compiled.query.measures:
        column = result.column(m.name).to_pylist()
        values[m.name] = [
            int(column[i]) if (i := index.get(group)) is not None and column[i] is not None else 0
            for group in compiled.domain
        ]
    return values


def release_table(compiled: plan.Plan, noisy: dict[str, tuple[int, ...]]) -> pa.Table:
    """Group columns, then one int64 column per measure, one row per public group."""
    columns: dict[str, pa.Array] = {
        c: pa.array([g[j] for g in compiled.domain], pa.string())
        for j, c in enumerate(compiled.group_by)
    }
    for m in compiled.query.measures:
        columns[m.name] = pa.array(noisy[m.name], pa.int64())
    return pa.table(columns)
