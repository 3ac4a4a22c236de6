"""One scan per query: the one-statement plan gives the same exact integers as the old path.

tests/unit/_reference_exact.py keeps the exact path as it was (one statement for the
non-binned components, one more per binned component, mapped onto the domain in Python).
Over many query shapes (grouping or none, filters, rows_per_person truncation, clamps,
fractional float columns with fixed-point units, explicit and default bins, ratios, counts
of rows and of distinct persons), on real DuckDB data with NULLs, values outside the public
bounds and groups outside the public domain, the current `engine.exact_values` must give the
same integers as the reference, and run exactly one SQL statement.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from datetime import date

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from coordinator.local import synth
from node import engine
from node.data.catalog import with_cohort
from node.data.store import OmopStore
from node.data.view_set import cohort_runner
from queries import plan
from queries.cohort import Allow, Cohort, CohortPolicy
from queries.errors import QueryError
from queries.pathway import load_pathways
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Filter, Measure, Query, Statistic
from tests.unit import _reference_exact as reference

CAP = 4
STAYS = ViewSpec(
    name="stays",
    description="up to four stays per person, in a keep order",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("sex", ColumnType.CATEGORY, domain=("female", "male")),
        ColumnSpec("kind", ColumnType.CATEGORY, domain=("a", "b", "c"), person_level=False),
        # Stored as integers: the domain holds their text, as the old path compared them.
        ColumnSpec("band", ColumnType.CATEGORY, domain=("1", "2", "3"), person_level=False),
        ColumnSpec("los", ColumnType.INTEGER, lower=0, upper=30, person_level=False),
        ColumnSpec("cost", ColumnType.INTEGER, lower=0, upper=5000, person_level=False),
        ColumnSpec("w", ColumnType.FLOAT, lower=-2.0, upper=3.5, person_level=False),
        ColumnSpec("amount", ColumnType.FLOAT, lower=0.0, upper=1500.0, person_level=False),
    ),
    max_rows_per_person=CAP,
    rank_column="rank",
)
CATALOG = Catalog(views=(STAYS,))
SCHEMA = pa.schema(
    [
        ("person_id", pa.int64()),
        ("sex", pa.string()),
        ("kind", pa.string()),
        ("band", pa.int64()),
        ("los", pa.int64()),
        ("cost", pa.int64()),
        ("w", pa.float64()),
        ("amount", pa.float64()),
        ("rank", pa.int64()),
    ]
)


class CountingRunner:
    """A real DuckDB holding the view as a table, counting the statements it runs."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.con = duckdb.connect()
        self.con.register("src", pa.Table.from_pylist(rows, schema=SCHEMA))
        self.con.execute("CREATE TABLE stays AS SELECT * FROM src")
        self.con.unregister("src")
        self.statements = 0

    def query(self, sql: str) -> pa.Table:
        self.statements += 1
        return self.con.sql(sql).to_arrow_table()


def _rows(rng: random.Random, persons: int) -> list[dict[str, object]]:
    """Several rows per person, with NULLs, out-of-domain groups and out-of-bounds values."""
    rows: list[dict[str, object]] = []
    for pid in range(1, persons + 1):
        sex = rng.choice(["female", "male", "male", "other", None])
        n = rng.randint(0, CAP)
        for rank in rng.sample(range(1, n + 1), n):
            rows.append(
                {
                    "person_id": pid,
                    "sex": sex,
                    "kind": rng.choice(["a", "b", "c", "c", "zzz", None]),
                    "band": rng.choice([1, 2, 3, 3, 4, None]),
                    "los": rng.choice([rng.randint(-5, 40), rng.randint(0, 6), None]),
                    "cost": rng.choice([rng.randint(-100, 9000), None]),
                    "w": rng.choice([rng.uniform(-10, 10), round(rng.uniform(-3, 4), 1), None]),
                    "amount": rng.choice([rng.uniform(-200, 3000), rng.uniform(0, 5), None]),
                    "rank": rank,
                }
            )
    return rows


@functools.cache
def _shared() -> CountingRunner:
    return CountingRunner(_rows(random.Random(16), 400))


COLUMNS = ("los", "cost", "w", "amount")
CLAMPS: dict[str, list[tuple[float, float] | None]] = {
    "los": [None, (0, 10), (2, 25)],
    "cost": [None, (0, 1000), (100, 4000)],
    "w": [None, (0.0, 1.0), (-1.5, 2.25)],
    "amount": [None, (0.5, 1000.0), (0.0, 7.5)],
}


@st.composite
def measures(draw: st.DrawFn, name: str) -> Measure:
    stat = draw(st.sampled_from(list(Statistic)))
    if stat in {Statistic.COUNT, Statistic.COUNT_ROWS}:
        return Measure(stat, name)
    column = draw(st.sampled_from(COLUMNS))
    clamp = draw(st.sampled_from(CLAMPS[column]))
    if stat is Statistic.RATIO:
        denominator = draw(st.none() | st.sampled_from(COLUMNS))
        numerator = draw(st.none() | st.just(column))
        if numerator is None and denominator is None:
            numerator = column
        return Measure(stat, name, column=numerator, denominator=denominator, clamp=clamp)
    if stat in {Statistic.QUANTILE, Statistic.HISTOGRAM}:
        # A histogram names its bins; a quantile may use the default grid of its column.
        bins = draw(
            st.integers(2, 40) | (st.none() if stat is Statistic.QUANTILE else st.nothing())
        )
        level = draw(st.sampled_from([0.1, 0.5, 0.9])) if stat is Statistic.QUANTILE else None
        return Measure(stat, name, column=column, quantile=level, bins=bins, clamp=clamp)
    return Measure(stat, name, column=column, clamp=clamp)


@st.composite
def queries(draw: st.DrawFn) -> Query:
    n = draw(st.integers(1, 5))
    chosen = tuple(draw(measures(f"m{i}")) for i in range(n))
    group_by = draw(st.sampled_from([(), ("sex",), ("kind",), ("band",), ("sex", "kind", "band")]))
    where: list[Filter] = []
    if draw(st.booleans()):
        where.append(Filter("kind", tuple(draw(st.sets(st.sampled_from("abc"), min_size=1)))))
    if draw(st.booleans()):
        where.append(Filter("band", tuple(draw(st.sets(st.sampled_from("123"), min_size=1)))))
    cap = draw(st.none() | st.integers(1, CAP))
    return Query(
        view="stays", rho=1.0, measures=chosen, group_by=group_by, where=tuple(where),
        rows_per_person=cap,
    )  # fmt: skip


def _compile(query: Query, catalog: Catalog = CATALOG) -> plan.Plan:
    try:
        return plan.compile_query(query, catalog)
    except QueryError:
        assume(False)  # a shape the planner refuses (e.g. a clamp outside the bounds)
        raise


def _same(compiled: plan.Plan, runner: CountingRunner) -> None:
    runner.statements = 0
    got = engine.exact_values(compiled, runner)
    assert runner.statements == 1, compiled.describe()
    expected = reference.exact_values(compiled, runner)
    assert got == expected, compiled.describe()
    # The same vectors, one value per group (times bins), in the plan's component order.
    assert list(got) == [c.key for c in compiled.components]
    assert all(type(v) is int for vector in got.values() for v in vector)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query=queries())
def test_one_scan_gives_the_old_integers_on_every_query_shape(query: Query) -> None:
    _same(_compile(query), _shared())


@st.composite
def small_tables(draw: st.DrawFn) -> list[dict[str, object]]:
    """Few persons, any values (empty tables, all-NULL columns, a single group...)."""
    return _rows(random.Random(draw(st.integers(0, 2**32))), draw(st.integers(0, 6)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=small_tables(), query=queries())
def test_one_scan_gives_the_old_integers_on_small_and_empty_tables(
    rows: list[dict[str, object]], query: Query
) -> None:
    _same(_compile(query), CountingRunner(rows))


ALL_KINDS = (
    Measure(Statistic.COUNT, "persons"),
    Measure(Statistic.COUNT_ROWS, "rows"),
    Measure(Statistic.SUM, "cost", column="cost"),
    Measure(Statistic.MEAN, "mean_w", column="w", clamp=(-1.5, 2.25)),
    Measure(Statistic.STDDEV, "sd_los", column="los"),
    Measure(Statistic.QUANTILE, "median_los", column="los", quantile=0.5),
    Measure(Statistic.QUANTILE, "p90_amount", column="amount", quantile=0.9, bins=12),
    Measure(Statistic.HISTOGRAM, "hist_w", column="w", bins=5),
    Measure(Statistic.RATIO, "cost_per_day", column="cost", denominator="los"),
)


@pytest.mark.parametrize(
    "measures",
    [
        ALL_KINDS,
        ALL_KINDS[:1],  # persons only: no bins
        ALL_KINDS[5:6],  # one binned component only
        ALL_KINDS[1:6],  # bins, and sums read across them (no distinct persons)
        (ALL_KINDS[0], ALL_KINDS[5]),  # bins and distinct persons: a totals grouping
        ALL_KINDS[5:8],  # three binned components: three grouping sets
    ],
)
@pytest.mark.parametrize("group_by", [(), ("sex", "kind")])
@pytest.mark.parametrize("cap", [None, 1, 2])
def test_every_plan_runs_exactly_one_statement(
    measures: tuple[Measure, ...], group_by: tuple[str, ...], cap: int | None
) -> None:
    query = Query(view="stays", rho=1.0, measures=measures, group_by=group_by, rows_per_person=cap)
    _same(plan.compile_query(query, CATALOG), _shared())


def test_the_old_path_would_run_one_statement_per_binned_component() -> None:
    # The finding the one scan fixes, measured on the reference: 1 + 3 statements here.
    runner = _shared()
    compiled = plan.compile_query(Query(view="stays", rho=1.0, measures=ALL_KINDS), CATALOG)
    runner.statements = 0
    reference.exact_values(compiled, runner)
    assert runner.statements == 4


def test_a_person_in_several_bins_is_one_person() -> None:
    # COUNT(DISTINCT person_id) does not add up across bins: one person, two rows, two bins.
    rows = [
        {"person_id": 1, "sex": "male", "kind": "a", "band": 1, "los": 2, "rank": 1},
        {"person_id": 1, "sex": "male", "kind": "a", "band": 1, "los": 9, "rank": 2},
    ]
    runner = CountingRunner(rows)
    compiled = plan.compile_query(
        Query(view="stays", rho=1.0, measures=(ALL_KINDS[0], ALL_KINDS[5])), CATALOG
    )
    exact = engine.exact_values(compiled, runner)
    assert exact["persons"] == [1]
    assert sum(exact["bins:los"]) == 2


# --- the node's own views ----------------------------------------------------------------------

REF = date(2025, 12, 31)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> OmopStore:
    folder = tmp_path_factory.mktemp("one-scan") / "omop"
    synth.generate_region(synth.region_by_slug("nwc"), 1_500, folder, seed=16)
    # Any ad hoc cohort may be asked for (the custodian's policy; the default allows none).
    policy = CohortPolicy(Allow.ANY)
    return OmopStore(
        folder, load_pathways(None), reference_date=REF, cohorts=policy, recheck_s=None
    )


class Counting:
    """Counts the statements a real runner (the node's views, or a cohort's) is given."""

    def __init__(self, run: Callable[[str], pa.Table]) -> None:
        self.run = run
        self.statements = 0

    def query(self, sql: str) -> pa.Table:
        self.statements += 1
        return self.run(sql)


NODE_QUERIES = [
    # The benchmark's six statistics by sex x IMD quintile.
    Query(
        view="persons",
        rho=0.1,
        measures=(
            Measure(Statistic.COUNT_ROWS, "n"),
            Measure(Statistic.SUM, "total_age", column="age"),
            Measure(Statistic.MEAN, "mean_age", column="age"),
            Measure(Statistic.STDDEV, "sd_age", column="age"),
            Measure(Statistic.QUANTILE, "median_age", column="age", quantile=0.5),
            Measure(Statistic.QUANTILE, "p90_age", column="age", quantile=0.9),
        ),
        group_by=("sex", "imd_quintile"),
    ),
    Query(
        view="visits",
        rho=1.0,
        measures=(
            Measure(Statistic.COUNT_ROWS, "n"),
            Measure(Statistic.COUNT, "persons"),
            Measure(Statistic.MEAN, "mean_los", column="length_of_stay"),
            Measure(Statistic.QUANTILE, "median_los", column="length_of_stay", quantile=0.5),
        ),
        group_by=("sex", "visit_type"),
        where=(Filter("visit_type", ("inpatient", "emergency")),),
        rows_per_person=3,
    ),
    Query(
        view="visits",
        rho=1.0,
        measures=(
            Measure(Statistic.VARIANCE, "v", column="length_of_stay", clamp=(0, 14)),
            Measure(Statistic.HISTOGRAM, "h", column="length_of_stay", bins=6),
        ),
        group_by=("year",),
    ),
    Query(
        view="asthma_children",
        rho=1.0,
        measures=(
            Measure(Statistic.COUNT, "persons"),
            Measure(Statistic.MEAN, "mean_admissions", column="admissions"),
            Measure(
                Statistic.RATIO,
                "bed_days_per_admission",
                column="bed_days",
                denominator="admissions",
            ),
        ),
        group_by=("sex",),
    ),
]


@pytest.mark.parametrize("query", NODE_QUERIES, ids=lambda q: q.view)
def test_one_scan_gives_the_old_integers_on_the_node_views(store: OmopStore, query: Query) -> None:
    compiled = plan.compile_query(query, store.catalog())
    runner = Counting(store.query)
    got = engine.exact_values(compiled, runner)
    assert runner.statements == 1
    assert got == reference.exact_values(compiled, store)
    assert any(v for vector in got.values() for v in vector)  # not all zeros: data was read


def test_one_scan_gives_the_old_integers_on_an_ad_hoc_cohort(store: OmopStore) -> None:
    cohort = Cohort(conditions=(317009,))  # asthma
    query = Query(
        view="cohort",
        rho=1.0,
        measures=(
            Measure(Statistic.COUNT, "persons"),
            Measure(Statistic.QUANTILE, "median_bed_days", column="bed_days", quantile=0.5),
        ),
        group_by=("sex",),
        cohort=cohort,
    )
    compiled = plan.compile_query(query, with_cohort(store.catalog(), cohort))
    with store.snapshot() as views, cohort_runner(views, query) as runner:
        counting = Counting(runner.query)
        got = engine.exact_values(compiled, counting)
        assert counting.statements == 1
        assert got == reference.exact_values(compiled, runner)


def test_the_scan_is_built_once_per_plan() -> None:
    # Plans are cached by the planner, and the statement is part of the plan.
    query = Query(view="stays", rho=1.0, measures=ALL_KINDS, group_by=("sex",))
    assert plan.compile_query(query, CATALOG).scan is plan.compile_query(query, CATALOG).scan
