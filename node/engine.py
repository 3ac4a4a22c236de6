"""Run a compiled plan on the node's data: exact integer aggregates, then calibrated noise.

The exact values never leave this module except as noisy releases; `exact_values` is the
internal path tests use to compare releases with the truth, and is never reachable over gRPC.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp

from queries import mechanisms, plan, plan_sql
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
    """Every component's exact integers with its calibrated noise (OpenDP).

    Components whose noise is the same (scale and sensitivity) share one OpenDP call on their
    concatenated vectors: each value still gets its own independent draw, so this is the same
    release, with one call's overhead instead of several. OpenDP's time per value dominates
    (about 8 us on the benchmark machine), so this saves little; it costs nothing either.
    """
    shared: dict[tuple[float, float], list[ComponentRelease]] = {}
    for r in releases:
        shared.setdefault((r.calibration.scale, r.calibration.sensitivity), []).append(r)
    out: dict[str, tuple[int, ...]] = {}
    for group in shared.values():
        vectors = [exact[r.component.key] for r in group]
        joined = [int(v) for vector in vectors for v in vector]
        noisy = mechanisms.add_noise(group[0].calibration, joined)
        start = 0
        for r, vector in zip(group, vectors, strict=True):
            out[r.component.key] = noisy[start : start + len(vector)]
            start += len(vector)
    return {r.component.key: out[r.component.key] for r in releases}


def exact_values(compiled: plan.Plan, store: SqlRunner) -> dict[str, list[int]]:
    """Exact integers per component: one per group (times bins), on the public domain.

    One statement (the plan's Scan) gives every component; its rows are mapped onto the
    public domain with numpy, dropping groups outside it and rows in no bin (a NULL value).
    """
    scan = compiled.scan
    table = store.query(scan.sql)
    n = len(compiled.domain)
    group = _group_index(table, compiled)
    which = table.column(plan_sql.SET_COLUMN).to_numpy(zero_copy_only=False) if scan.sets else None

    def rows_of(i: int | None) -> npt.NDArray[np.bool_]:
        inside = group >= 0
        value = scan.set_of(i)
        return inside if which is None or value is None else inside & (which == value)

    values: dict[str, list[int]] = {}
    # Non-binned components: from the totals grouping, or summed over the first one's bins.
    scalar_rows = rows_of(None if scan.totals else 0)
    at = group[scalar_rows]
    for c in compiled.components:
        if c.kind is Kind.BINS:
            continue
        out = np.zeros(n, dtype=np.int64)
        np.add.at(out, at, _integers(table.column(c.key))[scalar_rows])
        values[c.key] = out.tolist()
    bins = {c.key: c for c in compiled.components if c.kind is Kind.BINS}
    if scan.binned:
        counts = _integers(table.column(plan_sql.COUNT_COLUMN))
    for i, key in enumerate(scan.binned):
        width = bins[key].bins
        b = _integers(table.column(plan_sql.bin_column(i)), missing=-1)
        keep = rows_of(i) & (b >= 0) & (b < width)
        out = np.zeros(n * width, dtype=np.int64)
        np.add.at(out, group[keep] * width + b[keep], counts[keep])
        values[key] = out.tolist()
    return {c.key: values[c.key] for c in compiled.components}


def _integers(column: pa.ChunkedArray, missing: int = 0) -> npt.NDArray[np.int64]:
    """A result column as int64 (a SUM's 128-bit decimal too), nulls as `missing`.

    The cast is checked: plans bound every cell well inside 64 bits, so an overflow here
    would be a bug, raised rather than wrapped.
    """
    ints = pc.fill_null(pc.cast(column, pa.int64()), missing)
    return np.asarray(ints.to_numpy(), dtype=np.int64)


def _group_index(table: pa.Table, compiled: plan.Plan) -> npt.NDArray[np.int64]:
    """The position in compiled.domain of each result row's group, -1 if outside it.

    Each group column is dictionary-encoded and only its few distinct values are looked up
    (by their text, as str() gives it; NULL as 'None', in no public domain), then the
    positions are combined in the domain's order (the product of the column domains).
    """
    index = np.zeros(table.num_rows, dtype=np.int64)
    for name, domain in zip(compiled.group_by, compiled.group_domains, strict=True):
        column = table.column(name).combine_chunks()
        encoded = (
            column
            if pa.types.is_dictionary(column.type)
            else column.dictionary_encode(null_encoding="encode")
        )
        position = {v: i for i, v in enumerate(domain)}
        found = [position.get(str(v), -1) for v in encoded.dictionary.to_pylist()]
        # A NULL index (a dictionary array's own nulls) is looked up as None.
        lookup = np.array([*found, position.get(str(None), -1)], dtype=np.int64)
        codes = pc.fill_null(encoded.indices, len(found)).to_numpy(zero_copy_only=False)
        at = lookup[codes]
        index = np.where((index < 0) | (at < 0), -1, index * len(domain) + at)
    return index


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
        per_group = c.bins or 1
        rounds = c.kind in COUNT_KINDS and rules.node_rounds(sd[c.key])
        shown = np.array(_rounded(noisy[c.key], rules.round_to if rounds else 1), dtype=object)
        shown[np.repeat(small, per_group)] = None
        out[c.key] = shown.tolist()
    return out


# Below this, 2 * value + base stays inside int64, so numpy rounds exactly.
_NUMPY_ROUNDS = 2**61


def _rounded(values: Sequence[int], base: int) -> list[int]:
    if base <= 1:
        return list(values)
    array = np.asarray(values, dtype=np.int64)
    if array.size and int(np.abs(array).max()) >= _NUMPY_ROUNDS:
        return [_round(v, base) for v in values]
    # numpy's // floors like Python's, so this is _round, value by value.
    return ((2 * array + base) // (2 * base) * base).tolist()  # type: ignore[no-any-return]


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

    A null value is a cell the node withheld under its disclosure rules. Everything but the
    values is the same for every release of a plan, so it is built once (_template).
    """
    template = _template(compiled, tuple(r.component for r in releases))
    value = pa.concat_arrays(
        [_natural(noisy[r.component.key], r.component.unit) for r in releases]
        or [pa.array([], pa.float64())]
    )
    return template.append_column(pa.field("value", pa.float64()), value)


def _natural(values: Sequence[int | None], unit: float) -> pa.Array:
    """Fixed-point integers as float64 values in natural units (v * unit, as Python does)."""
    ints = pa.array(values, pa.int64())
    # Unchecked: an int64 beyond 2^53 becomes the nearest double, as float(v) would.
    return pc.multiply(pc.cast(ints, pa.float64(), safe=False), pa.scalar(unit, pa.float64()))


# Release tables without their values, per plan object: plans are cached by the planner, so
# the same object comes back for the same query; the entry holds it, so its id is not reused.
_TEMPLATES: OrderedDict[tuple[int, tuple[str, ...]], tuple[plan.Plan, pa.Table]] = OrderedDict()
_TEMPLATES_LOCK = threading.Lock()
_TEMPLATES_KEPT = 64


def release_template(compiled: plan.Plan, components: tuple[Component, ...]) -> pa.Table:
    """The release table of these components without its value column (public: the plan's)."""
    return _template(compiled, components)


def _template(compiled: plan.Plan, components: tuple[Component, ...]) -> pa.Table:
    key = (id(compiled), tuple(c.key for c in components))
    with _TEMPLATES_LOCK:
        hit = _TEMPLATES.get(key)
        if hit is not None and hit[0] is compiled:
            _TEMPLATES.move_to_end(key)
            return hit[1]
    table = _build_template(compiled, components)
    with _TEMPLATES_LOCK:
        _TEMPLATES[key] = (compiled, table)
        while len(_TEMPLATES) > _TEMPLATES_KEPT:
            _TEMPLATES.popitem(last=False)
    return table


def _build_template(compiled: plan.Plan, components: tuple[Component, ...]) -> pa.Table:
    n = len(compiled.domain)
    columns: dict[str, list[pa.Array]] = {c: [] for c in (*compiled.group_by, *RELEASE_COLUMNS)}
    groups = [
        pa.array([g[j] for g in compiled.domain], pa.string())
        for j in range(len(compiled.group_by))
    ]
    for c in components:
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
    fields = [f for f in release_schema(compiled.group_by) if f.name != "value"]
    return pa.table(
        [
            pa.concat_arrays(columns[f.name]) if columns[f.name] else pa.array([], f.type)
            for f in fields
        ],
        schema=pa.schema(fields),
    )
