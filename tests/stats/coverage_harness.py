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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from node import engine
from queries import combine, mechanisms, plan
from queries.results import BudgetStatus, NodeRelease, ReleaseRules
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.sensitivity import COUNT_KINDS, Kind
from queries.spec import Measure, Query, Statistic

CAP = 2  # rows per person: 30% of persons have two stays
VIEW = ViewSpec(
    name="stays",
    description="coverage test view: one or two stays per person",
    max_rows_per_person=CAP,
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
    return pa.table(
        {
            "person_id": pa.array(person + first_person, pa.int64()),
            "age": pa.array(age[person], pa.int64()),
            "weight_change": pa.array(change[person], pa.float64()),
            "los": pa.array(los, pa.int64()),
            "cost": pa.array(cost, pa.float64()),
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


# --- figures and their coverage -------------------------------------------------------------

LABELS = ["region", "measure", "bin_lower", "bin_upper"]


@dataclass(frozen=True)
class Figures:
    """The figures combine() gives for one query, in its output order, with no noise."""

    labels: pa.Table  # LABELS columns
    region: list[str]
    measure: list[str]
    bin_lower: list[float | None]
    bin_upper: list[float | None]
    truth: F64  # the noiseless estimate: what every interval must cover
    std_error: F64  # the noiseless std_error (the noise sd of a count)

    def rows(self, measure: str, region: str) -> list[int]:
        """Indices of one measure's figures in one region (several for a histogram)."""
        return [
            i
            for i, (m, r) in enumerate(zip(self.measure, self.region, strict=True))
            if m == measure and r == region
        ]

    def regions(self, measure: str) -> dict[str, list[int]]:
        """Indices of one measure's figures, by region (pooled last)."""
        out: dict[str, list[int]] = {}
        for i, (m, r) in enumerate(zip(self.measure, self.region, strict=True)):
            if m == measure:
                out.setdefault(r, []).append(i)
        return out


def _column(table: pa.Table, name: str) -> tuple[F64, Bools]:
    col = table.column(name)
    values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values, np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), dtype=np.bool_)


def figures(q: Query, plans: Sequence[tuple[str, RegionPlan]]) -> Figures:
    """combine() on every region's noiseless release."""
    table = combine.combine(q, [(name, rp.exact_release()) for name, rp in plans])
    truth, null = _column(table, "estimate")
    assert not null.any(), "a noiseless figure has no estimate"
    se, _ = _column(table, "std_error")
    return Figures(
        labels=table.select(LABELS),
        region=[str(x) for x in table.column("region").to_pylist()],
        measure=[str(x) for x in table.column("measure").to_pylist()],
        bin_lower=table.column("bin_lower").to_pylist(),
        bin_upper=table.column("bin_upper").to_pylist(),
        truth=truth,
        std_error=se,
    )


@dataclass(frozen=True)
class Coverage:
    """Per figure of one query: how many of `draws` intervals covered each truth, and why not.

    A figure covers a truth if ci_low <= truth <= ci_high and it has an estimate, or its
    interval has an infinite end (unbounded by design). A None end never covers.
    """

    figures: Figures
    draws: int
    covered: dict[str, I64]  # by truth (NOISELESS)
    truths: dict[str, F64]
    no_estimate: I64  # estimate None
    no_interval: I64  # ci_low or ci_high None
    unbounded: I64  # an infinite end


def coverage(
    q: Query,
    plans: Sequence[tuple[str, RegionPlan]],
    draws: int,
    truths: Mapping[str, F64],
) -> Coverage:
    """Coverage of every figure of one query over `draws` federated releases."""
    fig = figures(q, plans)
    drawn = [(name, rp, Draws(rp, draw_noisy(rp, draws))) for name, rp in plans]
    n = len(fig.truth)
    covered = {k: np.zeros(n, dtype=np.int64) for k in truths}
    no_estimate = np.zeros(n, dtype=np.int64)
    no_interval = np.zeros(n, dtype=np.int64)
    unbounded = np.zeros(n, dtype=np.int64)
    for d in range(draws):
        table = combine.combine(q, [(name, rp.release(dr.table(d))) for name, rp, dr in drawn])
        assert table.select(LABELS).equals(fig.labels), "figures changed between draws"
        _, est_null = _column(table, "estimate")
        lo, lo_null = _column(table, "ci_low")
        hi, hi_null = _column(table, "ci_high")
        infinite = np.isinf(lo) | np.isinf(hi)
        counts = ~lo_null & ~hi_null & (~est_null | infinite)
        for k, truth in truths.items():
            covered[k] += counts & (lo <= truth) & (truth <= hi)
        no_estimate += est_null
        no_interval += lo_null | hi_null
        unbounded += infinite
    return Coverage(fig, draws, covered, dict(truths), no_estimate, no_interval, unbounded)


# --- settings, cached -----------------------------------------------------------------------

RegionPlans = list[tuple[str, RegionPlan]]


@dataclass(frozen=True)
class Prepared:
    """A setting's data, one DuckDB per region (and pooled), and exact components per query."""

    tables: dict[str, pa.Table]
    runners: dict[str, Runner]  # per region, and combine.POOLED: every region's rows
    plans: list[RegionPlans]  # per query, in order


@functools.cache
def prepare(setting: Setting) -> Prepared:
    """Data and exact components of every query in every region; no noise."""
    tables: dict[str, pa.Table] = {}
    for i, (region, rows) in enumerate(zip(setting.regions, setting.rows, strict=True)):
        rng = np.random.default_rng([setting.seed, i])
        tables[region] = region_data(rng, rows, first_person=10_000_000 * i)
    runners = {region: Runner([t]) for region, t in tables.items()}
    plans = [
        [(region, region_plan(q, runners[region])) for region in tables] for q in setting.queries
    ]
    runners[combine.POOLED] = Runner(list(tables.values()))
    return Prepared(tables, runners, plans)


def query_index(setting: Setting, measure: str) -> int:
    """Which of the setting's queries asks for a measure."""
    (index,) = [i for i, q in enumerate(setting.queries) for m in q.measures if m.name == measure]
    return index


@functools.cache
def _figures(setting: Setting, index: int) -> Figures:
    return figures(setting.queries[index], prepare(setting).plans[index])


def noiseless(setting: Setting, measure: str) -> Figures:
    """The noiseless figures of the query that asks for a measure."""
    return _figures(setting, query_index(setting, measure))


@functools.cache
def _coverage(setting: Setting, index: int, draws: int) -> Coverage:
    fig = _figures(setting, index)
    truths = {NOISELESS: fig.truth}
    return coverage(setting.queries[index], prepare(setting).plans[index], draws, truths)


def simulate(setting: Setting, measure: str, draws: int) -> Coverage:
    """Coverage of the query that asks for a measure (each query runs once per session)."""
    return _coverage(setting, query_index(setting, measure), draws)


# --- the census, straight from DuckDB -------------------------------------------------------


def _select(expression: str) -> str:
    # Fixed test identifiers only: nothing here comes from outside the test.
    return f"SELECT {expression} FROM {VIEW.name}"  # noqa: S608


def _clamped(m: Measure, column: str | None = None) -> str:
    name = column or m.column or ""
    lo, hi = clamp_range(Measure(Statistic.SUM, "c", column=name, clamp=m.clamp))
    return f"LEAST(GREATEST(CAST({name} AS DOUBLE), {lo!r}), {hi!r})"


def _half_units(setting: Setting, measure: str) -> dict[tuple[Kind, str | None], float]:
    """Largest rounding error per row of each component of a measure's query: half a unit,
    or 0 where every value is a whole number of units (row counts, integers in units of 1)."""
    out: dict[tuple[Kind, str | None], float] = {}
    for r in prepare(setting).plans[query_index(setting, measure)][0][1].releases:
        c = r.component
        integer = c.column is not None and VIEW.column(c.column).type is ColumnType.INTEGER
        whole = c.kind is Kind.ROWS or (integer and c.unit == 1.0)
        key = (c.kind, c.column)
        out[key] = max(out.get(key, 0.0), 0.0 if whole else c.unit / 2)
    return out


def census(
    runner: Runner, setting: Setting, m: Measure, edges: Sequence[float | None]
) -> tuple[list[float], float]:
    """A measure's aggregate computed directly in DuckDB on its clamped column, and the
    tolerance the node's fixed-point rounding allows (each row's value, or square, is
    rounded to the component's unit: at most half a unit per row)."""
    col = m.column or ""
    n = runner.scalar(_select("COUNT(*)"))
    stat = m.statistic
    if stat is Statistic.COUNT:
        return [runner.scalar(_select("COUNT(DISTINCT person_id)"))], 0.0
    if stat is Statistic.COUNT_ROWS:
        return [n], 0.0
    if stat is Statistic.HISTOGRAM:
        bounds = [float(e) for e in edges if e is not None]
        counts = []
        for i in range(len(bounds) - 1):
            x = _clamped(m)
            top = "TRUE" if i == len(bounds) - 2 else f"{x} < {bounds[i + 1]!r}"
            where = f"{x} >= {bounds[i]!r} AND {top}"
            counts.append(runner.scalar(_select(f"COUNT(*) FILTER (WHERE {where})")))
        return counts, 0.0
    if stat is Statistic.QUANTILE:
        value = runner.scalar(_select(f"quantile_disc({_clamped(m)}, {m.quantile!r})"))
        if not continuous_quantile(m):
            return [value], 0.0
        lo, hi = clamp_range(m)
        return [value], (hi - lo) / (m.bins or plan.DEFAULT_FLOAT_BINS)  # one bin width
    half = _half_units(setting, m.name)
    if stat is Statistic.RATIO:
        a = runner.scalar(_select(f"SUM({_clamped(m)})"))
        den = "COUNT(*)" if m.denominator is None else f"SUM({_clamped(m, m.denominator)})"
        b = runner.scalar(_select(den))
        da = n * half[(Kind.SUM, col)]
        db = 0.0 if m.denominator is None else n * half[(Kind.SUM, m.denominator)]
        return [a / b], (da + abs(a / b) * db) / (b - db)
    x = _clamped(m)
    e_s = half[(Kind.SUM, col)]
    if stat is Statistic.SUM:
        return [runner.scalar(_select(f"SUM({x})"))], n * e_s
    if stat is Statistic.MEAN:
        return [runner.scalar(_select(f"AVG({x})"))], e_s
    # v = (ss - s^2/n)/(n-1) with |d ss| <= n e_ss and |d s| <= n e_s.
    e_ss = half[(Kind.SUMSQ, col)]
    s = runner.scalar(_select(f"SUM({x})"))
    tol_var = (n * e_ss + 2 * abs(s) * e_s + n * e_s * e_s) / (n - 1)
    var = runner.scalar(_select(f"VAR_SAMP({x})"))
    if stat is Statistic.VARIANCE:
        return [var], tol_var
    return [runner.scalar(_select(f"STDDEV_SAMP({x})"))], tol_var / math.sqrt(var)


# --- exact probabilities --------------------------------------------------------------------


def binomial_outside(draws: int, p: float, low: float, high: float) -> float:
    """P(X / draws < low or X / draws > high) for X ~ Binomial(draws, p), exactly."""
    log_p, log_q = math.log(p), math.log1p(-p)
    lg = math.lgamma(draws + 1)
    total = 0.0
    for k in range(draws + 1):
        if k < low * draws or k > high * draws:
            log_pmf = lg - math.lgamma(k + 1) - math.lgamma(draws - k + 1)
            total += math.exp(log_pmf + k * log_p + (draws - k) * log_q)
    return total


def binomial_below(draws: int, p: float, low: float) -> float:
    """P(X / draws < low) for X ~ Binomial(draws, p), exactly."""
    return binomial_outside(draws, p, low, 2.0)
