"""Run a compiled plan on the node's data: exact integer aggregates, then calibrated noise.

The exact values never leave this module except as noisy releases; `exact_values` is the
internal path tests use to compare releases with the truth, and is never reachable over gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from queries import mechanisms, plan
from queries.sensitivity import Kind

RELEASE_COLUMNS = ("component", "bin", "bin_lower", "bin_upper", "value")


class SqlRunner(Protocol):
    """Anything that runs read-only SQL over the analysis views (OmopStore in a node)."""

    def query(self, sql: str) -> pa.Table:
        """Run one statement and return its result."""
        ...


@dataclass(frozen=True)
class ComponentRelease:
    """One component's calibration, fixed before the data is touched."""

    component: plan.Component
    calibration: mechanisms.Calibration

    @property
    def variance(self) -> float:
        """Noise variance of each released value, in the value's own units."""
        return self.calibration.variance * self.component.unit**2


def calibrations(compiled: plan.Plan) -> tuple[ComponentRelease, ...]:
    """The noise of every component, with the query's rho shared between them."""
    shares = compiled.rho_shares()
    return tuple(
        ComponentRelease(c, mechanisms.calibrate(c.sensitivity, shares[c.key]))
        for c in compiled.components
    )


def exact_values(compiled: plan.Plan, store: SqlRunner) -> dict[str, list[int]]:
    """Exact integers per component: one per group (times bins), on the public domain."""
    index: dict[tuple[str, ...], int] = {group: i for i, group in enumerate(compiled.domain)}
    n = len(compiled.domain)
    values: dict[str, list[int]] = {}
    scalar = [c for c in compiled.components if c.kind is not Kind.BINS]
    if compiled.scalar_sql is not None:
        table = store.query(compiled.scalar_sql)
        keys = _keys(table, compiled.group_by)
        for c in scalar:
            out = [0] * n
            for group, v in zip(keys, table.column(c.key).to_pylist(), strict=True):
                i = index.get(group)
                if i is not None and v is not None:  # groups outside the domain are dropped
                    out[i] = int(v)
            values[c.key] = out
    binned = {c.key: c for c in compiled.components if c.kind is Kind.BINS}
    for component_key, sql in compiled.binned_sql:
        bins = binned[component_key].bins
        out = [0] * (n * bins)
        table = store.query(sql)
        groups = _keys(table, compiled.group_by)
        for group, b, count in zip(
            groups, table.column("bin").to_pylist(), table.column("n").to_pylist(), strict=True
        ):
            i = index.get(group)
            if i is not None and b is not None and 0 <= b < bins:
                out[i * bins + int(b)] = int(count)
        values[component_key] = out
    return values


def _keys(table: pa.Table, group_by: tuple[str, ...]) -> list[tuple[str, ...]]:
    columns = [table.column(c).to_pylist() for c in group_by]
    return [tuple(str(col[i]) for col in columns) for i in range(table.num_rows)]


def release_table(
    compiled: plan.Plan, releases: tuple[ComponentRelease, ...], noisy: dict[str, tuple[int, ...]]
) -> pa.Table:
    """Long table: group columns, component, bin, bin edges, value (in natural units)."""
    rows: dict[str, list[object]] = {c: [] for c in (*compiled.group_by, *RELEASE_COLUMNS)}
    for r in releases:
        c = r.component
        values = noisy[c.key]
        per_group = c.bins or 1
        for g, group in enumerate(compiled.domain):
            for b in range(per_group):
                for j, col in enumerate(compiled.group_by):
                    rows[col].append(group[j])
                rows["component"].append(c.key)
                rows["bin"].append(b if c.bins else -1)
                rows["bin_lower"].append(c.edges[b] if c.bins else None)
                rows["bin_upper"].append(c.edges[b + 1] if c.bins else None)
                rows["value"].append(values[g * per_group + b] * c.unit)
    return pa.table(rows, schema=release_schema(compiled.group_by))


def release_schema(group_by: Sequence[str]) -> pa.Schema:
    """Schema of the long release table a node sends: groups, then RELEASE_COLUMNS."""
    return pa.schema(
        [(col, pa.string()) for col in group_by]
        + [
            ("component", pa.string()),
            ("bin", pa.int32()),
            ("bin_lower", pa.float64()),
            ("bin_upper", pa.float64()),
            ("value", pa.float64()),
        ]
    )
