"""Run a compiled plan on the node's data: exact integer aggregates, then calibrated noise.

The exact values never leave this module except as noisy releases; `exact_values` is the
internal path tests use to compare releases with the truth, and is never reachable over gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp

from queries import mechanisms, plan
from queries.components import Component
from queries.errors import ConfigError
from queries.results import (
    RELEASE_COLUMNS,
    BudgetStatus,
    MeasureNoise,
    NodeRelease,
    NoiseInfo,
    ReleaseRules,
    release_schema,
)
from queries.schema import Catalog, ColumnType
from queries.sensitivity import COUNT_KINDS, Kind


class SqlRunner(Protocol):
    """Anything that runs read-only SQL over the analysis views (OmopStore in a node)."""

    def query(self, sql: str) -> pa.Table:
        """Run one statement and return its result."""
        ...


@dataclass(frozen=True)
class ComponentRelease:
    """One component's calibration, fixed before the data is touched."""

    component: Component
    calibration: mechanisms.Calibration

    @property
    def variance(self) -> float:
        """Noise variance of each released value, in the value's own units."""
        return self.calibration.variance * self.component.unit**2

    def noise_info(self) -> NoiseInfo:
        """The noise in the released values' own units (fixed-point decoded)."""
        return NoiseInfo(
            mechanism=mechanisms.MECHANISM,
            scale=self.calibration.scale * self.component.unit,
            variance=self.variance,
            sensitivity=self.calibration.sensitivity * self.component.unit,
        )

    def measure_noise(self) -> MeasureNoise:
        """What the hub needs to know about this component's noise and cost."""
        return MeasureNoise(
            measure=self.component.key,
            statistic=self.component.kind.value,
            noise=self.noise_info(),
            rho=self.calibration.rho,
        )


def calibrations(compiled: plan.Plan) -> tuple[ComponentRelease, ...]:
    """The noise of every component, with the query's rho shared between them."""
    shares = compiled.rho_shares()
    return tuple(
        ComponentRelease(c, mechanisms.calibrate(c.sensitivity, shares[c.key]))
        for c in compiled.components
    )


def node_release(
    releases: Sequence[ComponentRelease],
    table: pa.Table,
    *,
    query_id: str,
    epsilon: float,
    budget: BudgetStatus,
    rules: ReleaseRules | None,
) -> NodeRelease:
    """The NodeRelease a node sends for a release table: the noise and cost of each component."""
    return NodeRelease(
        query_id=query_id,
        table=table,
        noise=releases[0].noise_info(),
        rho_charged=sum(r.calibration.rho for r in releases),
        epsilon=epsilon,
        budget=budget,
        measures=tuple(r.measure_noise() for r in releases),
        rules=rules,
    )


def add_noise(
    releases: Sequence[ComponentRelease], exact: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Every component's exact integers with its calibrated noise (OpenDP, one call each)."""
    return {
        r.component.key: mechanisms.add_noise(r.calibration, exact[r.component.key])
        for r in releases
    }


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


def check_row_bounds(catalog: Catalog, store: SqlRunner) -> None:
    """Refuse to serve views holding more persons than their public bound (start-up only).

    Plans rule out 64-bit overflow from the declared bounds; this makes the declaration true.
    """
    for view in catalog.views:
        if not any(c.type is ColumnType.IDENTIFIER and c.name == "person_id" for c in view.columns):
            continue
        sql = (
            sqlglot.select(exp.Count(this=exp.Distinct(expressions=[exp.column("person_id")])))
            .from_(exp.to_table(view.name, quoted=True))
            .sql(dialect="duckdb")
        )
        n = store.query(sql).column(0)
        persons = int(n[0].as_py() or 0)
        if persons > view.max_persons:
            raise ConfigError(
                f"view {view.name!r} holds {persons} persons, more than its public bound of "
                f"{view.max_persons}; this node's data is larger than chc supports"
            )


def withhold_small_cells(
    compiled: plan.Plan,
    releases: Sequence[ComponentRelease],
    noisy: Mapping[str, Sequence[int]],
    rules: ReleaseRules,
) -> dict[str, list[int | None]]:
    """The node's own disclosure rules, applied to its noisy release (post-processing).

    A group whose noisy count is below rules.suppress_below (the smallest of its person and
    row counts, and of the totals of its histograms) is withheld whole: every component of
    that group is released as null. Count components (persons, rows, bins) of the other groups
    are rounded to a multiple of rules.round_to where their noise is finer than that
    (ReleaseRules.node_rounds); sums are not rounded: they are not counts.
    Bins are rounded but not withheld one by one: they feed pooled quantiles, and withholding
    the small ones would bias every quantile; the hub suppresses small published bins. All of
    this reads noisy values only, so it costs no budget.
    """
    n = len(compiled.domain)
    small = np.zeros(n, dtype=bool)
    for c in compiled.components:
        if c.kind not in COUNT_KINDS:
            continue
        flat = np.asarray(noisy[c.key], dtype=np.float64)
        totals = flat.reshape(n, c.bins).sum(axis=1) if c.bins else flat
        small |= totals < rules.suppress_below
    sd = {r.component.key: math.sqrt(r.variance) for r in releases}
    out: dict[str, list[int | None]] = {}
    for c in compiled.components:
        values = noisy[c.key]
        per_group = c.bins or 1
        rounds = c.kind in COUNT_KINDS and rules.node_rounds(sd[c.key])
        base = rules.round_to if rounds else 1
        out[c.key] = [
            None if small[i // per_group] else _round(v, base) for i, v in enumerate(values)
        ]
    return out


def _round(value: int, base: int) -> int:
    if base <= 1:
        return value
    # Integer arithmetic: values may exceed 2^53, where a float division would round.
    return (2 * value + base) // (2 * base) * base


def release_table(
    compiled: plan.Plan,
    releases: tuple[ComponentRelease, ...],
    noisy: Mapping[str, Sequence[int | None]],
) -> pa.Table:
    """Long table: group columns, component, bin, bin edges, clamp bounds, value (natural units).

    A null value is a cell the node withheld under its disclosure rules.
    """
    n = len(compiled.domain)
    columns: dict[str, list[pa.Array]] = {c: [] for c in (*compiled.group_by, *RELEASE_COLUMNS)}
    groups = [
        pa.array([g[j] for g in compiled.domain], pa.string())
        for j in range(len(compiled.group_by))
    ]
    for r in releases:
        c = r.component
        per_group = c.bins or 1
        size = n * per_group
        index = pa.array(np.repeat(np.arange(n), per_group))
        for j, col in enumerate(compiled.group_by):
            columns[col].append(groups[j].take(index))
        columns["component"].append(pa.array([c.key] * size, pa.string()))
        if c.bins:
            edges = np.asarray(c.edges, dtype=np.float64)
            columns["bin"].append(pa.array(np.tile(np.arange(c.bins, dtype=np.int32), n)))
            columns["bin_lower"].append(pa.array(np.tile(edges[:-1], n)))
            columns["bin_upper"].append(pa.array(np.tile(edges[1:], n)))
        else:
            columns["bin"].append(pa.array(np.full(size, -1, dtype=np.int32)))
            columns["bin_lower"].append(pa.nulls(size, pa.float64()))
            columns["bin_upper"].append(pa.nulls(size, pa.float64()))
        columns["lower"].append(pa.array([c.lower] * size, pa.float64()))
        columns["upper"].append(pa.array([c.upper] * size, pa.float64()))
        values = noisy[c.key]
        columns["value"].append(
            pa.array([None if v is None else v * c.unit for v in values], pa.float64())
        )
    schema = release_schema(compiled.group_by)
    return pa.table(
        [
            pa.concat_arrays(columns[f.name]) if columns[f.name] else pa.array([], f.type)
            for f in schema
        ],
        schema=schema,
    )
