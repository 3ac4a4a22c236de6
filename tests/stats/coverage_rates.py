"""The figures of the coverage suite's queries, their coverage over draws, and what judges it.

Built on coverage_harness.py's draws of federated releases: figures() is combine() on every
region's noiseless release (the truth each interval must cover), coverage() counts over
`draws` releases how often each figure's interval covers it, and prepare(), noiseless() and
simulate() cache both per setting, so each query runs once per session. census() computes
each aggregate directly in DuckDB, to check the noiseless figures against, and the binomial
probabilities are exact, to judge a coverage rate. Separate from the harness because this is
what a rate is and what it is checked against, not how a release is drawn.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from queries import combine
from queries.components import DEFAULT_FLOAT_BINS
from queries.schema import ColumnType
from queries.sensitivity import Kind
from queries.spec import Measure, Query, Statistic
from tests.stats.coverage_harness import (
    F64,
    I64,
    NOISELESS,
    VIEW,
    Bools,
    Draws,
    RegionPlan,
    Runner,
    Setting,
    clamp_range,
    continuous_quantile,
    draw_noisy,
    region_data,
    region_plan,
)

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
        return [value], (hi - lo) / (m.bins or DEFAULT_FLOAT_BINS)  # one bin width
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
