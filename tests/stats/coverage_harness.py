"""Draws of complete federated releases on fixed data, for the interval coverage suite.

The data are generated once per setting (seeded numpy: fine for test data, never used for
noise) and loaded into one real DuckDB per region. The exact components are computed once
with the real engine (plan.compile_query, engine.exact_values). Each draw then adds fresh
OpenDP discrete Gaussian noise to them with the node's own calibrations and call
(engine.calibrations, engine.add_noise), applies the node's disclosure rules and builds each
region's NodeRelease as NodeService does (_release, _execute), and pools the regions with
combine.combine, as the hub does.

What is vectorised, and why it changes nothing a coverage rate depends on:

- Noise for all draws is drawn in one call per component: engine.add_noise on the exact
  vectors repeated `draws` times. OpenDP adds independent noise to each coordinate, so draw d
  gets exactly what a node would add to that component.
- The node's rules (engine.withhold_small_cells: counts whose noise is finer than RULES.round_to
  rounded to it, a group with a noisy count below RULES.suppress_below withheld) are applied
  with numpy, and a release table is the engine's table built once (engine.release_table on the
  exact values) with its value column replaced. test_coverage checks both against the engine's
  own functions on the same noise; a draw in which the node would withhold is built by them.

The figures these releases give, their coverage, the per-setting caches and the census they
are checked against are in coverage_rates.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from node import engine
from queries import mechanisms, plan
from queries.results import BudgetStatus, NodeRelease, ReleaseRules
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.sensitivity import COUNT_KINDS
from queries.spec import Measure, Query, Statistic

CAP = 2  # rows per person: 30% of persons have two stays
RANK = "stay_rank"  # each person's stays in order (1, 2): what a lower rows_per_person keeps
VIEW = ViewSpec(
    name="stays",
    description="coverage test view: one or two stays per person",
    max_rows_per_person=CAP,
    rank_column=RANK,
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("age", ColumnType.INTEGER, lower=0, upper=120),
        ColumnSpec("weight_change", ColumnType.FLOAT, lower=-20.0, upper=20.0),
        ColumnSpec("los", ColumnType.INTEGER, lower=0, upper=60, person_level=False),
        ColumnSpec("cost", ColumnType.FLOAT, lower=0.0, upper=2000.0, person_level=False),
    ),
)
CATALOG = Catalog(views=(VIEW,))
# What a node uses when its configuration names none (NodeService: rules or ReleaseRules()).
RULES = ReleaseRules()
DELTA = 1e-6
BUDGET = BudgetStatus(rho_total=1e6, rho_spent=0.0, max_rho_per_query=1e6, delta=DELTA)
NOISELESS = "noiseless"  # the truth of every figure: combine() on the exact components

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Bools = NDArray[np.bool_]


# --- data -----------------------------------------------------------------------------------


def region_data(rng: np.random.Generator, rows: int, first_person: int) -> pa.Table:
    """One region's stays: `rows` rows, persons with one or two stays each.

    age: person-level, rounded normal(52, 18) in [0, 120] (symmetric integer).
    weight_change: person-level, normal(0.3, 4) in [-20, 20] (symmetric float, either sign).
    los: per stay, 95% geometric(0.45) - 1, 5% floor(lognormal(2.3, 0.55)), in [0, 60]:
         most stays 0-3 days with a long tail (skewness ~5, kurtosis ~40; skewed integer).
    cost: per stay, lognormal(5, 0.9) in [0, 2000] (skewness ~3, kurtosis ~17; skewed float).
    Every value is inside its column's public bounds, so the bounds clamp nothing.
    stay_rank: a person's stays numbered 1, 2 in order (stays are drawn independently, so
    keeping the first is keeping one at random; it draws nothing, so the data above are
    unchanged by it).
    """
    per_person = 1 + (rng.random(rows) < 0.3).astype(np.int64)
    persons = int(np.searchsorted(np.cumsum(per_person), rows)) + 1
    person = np.repeat(np.arange(persons), per_person[:persons])[:rows]
    age = np.clip(np.rint(rng.normal(52.0, 18.0, persons)), 0, 120).astype(np.int64)
    change = np.clip(rng.normal(0.3, 4.0, persons), -20.0, 20.0)
    short = rng.geometric(0.45, rows) - 1
    tail = np.floor(rng.lognormal(2.3, 0.55, rows))
    los = np.clip(np.where(rng.random(rows) < 0.05, tail, short), 0, 60).astype(np.int64)
    cost = np.clip(rng.lognormal(5.0, 0.9, rows), 0.0, 2000.0)
    first_row = np.concatenate([[0], np.cumsum(per_person[:persons])])[person]
    return pa.table(
        {
            "person_id": pa.array(person + first_person, pa.int64()),
            "age": pa.array(age[person], pa.int64()),
            "weight_change": pa.array(change[person], pa.float64()),
            "los": pa.array(los, pa.int64()),
            "cost": pa.array(cost, pa.float64()),
            RANK: pa.array(np.arange(rows) - first_row + 1, pa.int64()),
        }
    )


class Runner:
    """A real DuckDB holding the view as a table (what OmopStore is to a node)."""

    def __init__(self, tables: Sequence[pa.Table]) -> None:
        self.con = duckdb.connect()
        self.con.register("src", pa.concat_tables(tables))
        self.con.execute(f"CREATE TABLE {VIEW.name} AS SELECT * FROM src")  # noqa: S608
        self.con.unregister("src")

    def query(self, sql: str) -> pa.Table:
        """Run one statement and return its result (engine.SqlRunner)."""
        return self.con.sql(sql).to_arrow_table()

    def scalar(self, sql: str) -> float:
        """The single value of a one-row, one-column query."""
        row = self.con.execute(sql).fetchone()
        assert row is not None, sql
        assert row[0] is not None, sql
        return float(row[0])


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """Fixed data (rows per region, seed) and the queries asked of it."""

    name: str
    rows: tuple[int, ...]
    seed: int
    queries: tuple[Query, ...]

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names, r1, r2..."""
        return tuple(f"r{i + 1}" for i in range(len(self.rows)))

    def measures(self) -> list[Measure]:
        """Every measure of every query."""
        return [m for q in self.queries for m in q.measures]


def query(measures: Sequence[tuple[Measure, float]]) -> Query:
    """A query in which each measure is charged the rho given with it.

    The weight of a measure is its rho and the query's rho is their sum, so the node's share
    rho * weight / total is the given rho (up to rounding).
    """
    return Query(
        view=VIEW.name,
        rho=math.fsum(rho for _, rho in measures),
        measures=tuple(
            Measure(
                statistic=m.statistic,
                name=m.name,
                column=m.column,
                denominator=m.denominator,
                quantile=m.quantile,
                bins=m.bins,
                clamp=m.clamp,
                weight=rho,
            )
            for m, rho in measures
        ),
    )


def clamp_range(m: Measure) -> tuple[float, float]:
    """The bounds a measure's column is clamped to: the catalog's, narrowed by its clamp."""
    spec = VIEW.column(m.column or "")
    lo, hi = float(spec.lower or 0.0), float(spec.upper or 0.0)
    if m.clamp is not None:
        lo, hi = max(lo, m.clamp[0]), min(hi, m.clamp[1])
    return lo, hi


def continuous_quantile(m: Measure) -> bool:
    """A quantile on a grid of equal bins (interpolated), not of one bin per whole value."""
    if m.statistic is not Statistic.QUANTILE:
        return False
    return m.bins is not None or VIEW.column(m.column or "").type is not ColumnType.INTEGER


# --- releases -------------------------------------------------------------------------------


@dataclass
class RegionPlan:
    """One region's exact components and calibrations for one query."""

    compiled: plan.Plan
    releases: tuple[engine.ComponentRelease, ...]
    exact: dict[str, list[int]]
    template: pa.Table  # engine.release_table on the exact values, without rules

    def release(self, table: pa.Table) -> NodeRelease:
        """A NodeRelease carrying this table, built by the node's own engine.node_release (the
        noise and cost of each component, and the node's rules, from which the hub widens for
        the node's rounding)."""
        return engine.node_release(
            self.releases,
            table,
            query_id="coverage",
            epsilon=mechanisms.rho_to_epsilon(self.compiled.query.rho, DELTA),
            budget=BUDGET,
            rules=RULES,
        )

    def exact_release(self) -> NodeRelease:
        """The same release carrying the exact values (no noise, no rounding): the truth."""
        return self.release(self.template)

    def engine_table(self, noisy: Mapping[str, Sequence[int]]) -> pa.Table:
        """One noisy release table exactly as NodeService._release builds it."""
        ints = {k: tuple(int(x) for x in v) for k, v in noisy.items()}
        shown = engine.withhold_small_cells(self.compiled, self.releases, ints, RULES)
        return engine.release_table(self.compiled, self.releases, shown)

    def table(self, values: F64) -> pa.Table:
        """The template with its value column replaced by one draw's values."""
        i = self.template.schema.get_field_index("value")
        return self.template.set_column(i, "value", pa.array(values, pa.float64()))


def region_plan(q: Query, runner: Runner) -> RegionPlan:
    """Compile a query and compute its exact components on one region's data."""
    assert not q.group_by, "the harness handles ungrouped queries only"
    compiled = plan.compile_query(q, CATALOG)
    releases = engine.calibrations(compiled)
    exact = engine.exact_values(compiled, runner)
    template = engine.release_table(compiled, releases, {k: tuple(v) for k, v in exact.items()})
    return RegionPlan(compiled, releases, exact, template)


def draw_noisy(rp: RegionPlan, draws: int) -> dict[str, I64]:
    """`draws` noisy copies of every component: an array (draws, len) per component key.

    engine.add_noise, the node's own call, on every exact vector repeated `draws` times.
    """
    tiled = {key: exact * draws for key, exact in rp.exact.items()}
    noisy = engine.add_noise(rp.releases, tiled)
    return {
        key: np.asarray(values, dtype=np.int64).reshape(draws, len(rp.exact[key]))
        for key, values in noisy.items()
    }


@dataclass
class Draws:
    """Noisy releases of one region plan, one per row of `noisy`, after the node's rules.

    The rules are those of engine.withhold_small_cells, with numpy: count components
    (COUNT_KINDS) whose noise is finer than the rounding (RULES.node_rounds) rounded to
    a multiple of RULES.round_to by the same integer formula;
    a draw in which the node would withhold the group (a noisy count, or a histogram's
    total, below RULES.suppress_below) is built by the engine itself instead.
    """

    plan: RegionPlan
    noisy: dict[str, I64]
    values: F64 = field(init=False)  # value columns, one row per draw
    withheld: Bools = field(init=False)

    def __post_init__(self) -> None:
        comps = {r.component.key: r.component for r in self.plan.releases}
        count = next(iter(self.noisy.values())).shape[0]
        self.withheld = np.zeros(count, dtype=np.bool_)
        shown: dict[str, I64] = {}
        base = RULES.round_to
        sd = {r.component.key: math.sqrt(r.variance) for r in self.plan.releases}
        for key, c in comps.items():
            v = self.noisy[key]
            if c.kind in COUNT_KINDS:
                # No group_by: one group, whose total is the sum of the bins (or the value).
                self.withheld |= v.sum(axis=1) < RULES.suppress_below
                if RULES.node_rounds(sd[key]):
                    v = (2 * v + base) // (2 * base) * base
            shown[key] = v
        names = self.plan.template.column("component").to_pylist()
        bins = self.plan.template.column("bin").to_pylist()
        self.values = np.empty((count, len(names)), dtype=np.float64)
        for j, (key, b) in enumerate(zip(names, bins, strict=True)):
            # No group_by: a component's values are its bins in order (or its one value).
            self.values[:, j] = shown[key][:, max(b, 0)].astype(np.float64) * comps[key].unit

    def table(self, d: int) -> pa.Table:
        """Draw d's release table."""
        if self.withheld[d]:
            return self.plan.engine_table({k: v[d].tolist() for k, v in self.noisy.items()})
        return self.plan.table(self.values[d])
