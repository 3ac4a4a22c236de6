"""Once a query has planned, nothing about the data may change what happens next.

The node's whole release path after planning (exact aggregate, noise, the node's disclosure
rules, the release table) and the hub's (pooling, estimators, release rules) must succeed on
every dataset the view's public bounds allow, so that success versus failure is never an
un-noised function of the data. Noise draws differ between runs, but no assertion here
depends on a particular draw: they hold for every draw.
"""

from __future__ import annotations

import math

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import engine
from node.data.catalog import build_catalog
from queries import combine, mechanisms, plan
from queries import release as release_rules
from queries.errors import QueryError
from queries.results import BudgetStatus, NodeRelease, ReleaseRules
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Measure, Query, Statistic
from queries.sql import parse_sql

VIEW = ViewSpec(
    name="people",
    description="one row per person",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("sex", ColumnType.CATEGORY, domain=("female", "male")),
        ColumnSpec("age", ColumnType.INTEGER, lower=0, upper=120),
        ColumnSpec("cost", ColumnType.FLOAT, lower=-1e6, upper=1e6),
    ),
)
CATALOG = Catalog(views=(VIEW,))
RULES = ReleaseRules()


class Store:
    """A real DuckDB holding the view."""

    def __init__(self, rows: list[tuple[int, str, int | None, float | None]]) -> None:
        self.con = duckdb.connect()
        self.con.execute(
            "CREATE TABLE people (person_id BIGINT, sex VARCHAR, age BIGINT, cost DOUBLE)"
        )
        if rows:
            self.con.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", rows)

    def query(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()


def node_release(compiled: plan.Plan, exact: dict[str, list[int]]) -> NodeRelease:
    """Everything a node does after the charge is recorded, as NodeService does it."""
    releases = engine.calibrations(compiled)
    noisy = engine.add_noise(releases, exact)
    shown = engine.withhold_small_cells(compiled, releases, noisy, RULES)
    table = engine.release_table(compiled, releases, shown)
    budget = BudgetStatus(10, 1, 1, 1e-6)
    return engine.node_release(
        releases, table, query_id="q", epsilon=1.0, budget=budget, rules=RULES
    )


def hub(compiled: plan.Plan, exacts: list[dict[str, list[int]]]) -> pa.Table:
    """What the hub does with the nodes' releases."""
    releases = [(f"r{i}", node_release(compiled, e)) for i, e in enumerate(exacts)]
    table = combine.combine(compiled.query, releases)
    return release_rules.apply(table, RULES, compiled.query.group_by)


def test_the_public_worst_case_releases_without_overflow() -> None:
    """AVG(CLAMP(age, 0, 99)) over 1.2M persons has a sum of squares of ~1.2e10 > 2^31.

    OpenDP's default integer domain is i32, which raised after the charge; every component at
    the largest value its public bounds allow must now be noised without error or saturation.
    """
    catalog = build_catalog([])
    for sql in (
        "SELECT AVG(CLAMP(age, 0, 99)), VARIANCE(CLAMP(age, 0, 99)) FROM persons",
        "SELECT sex, SUM(length_of_stay), STDDEV(length_of_stay) FROM visits GROUP BY sex",
    ):
        compiled = plan.compile_query(parse_sql(sql, rho=0.5), catalog)
        big = {
            c.key: [c.max_abs] * (len(compiled.domain) * (c.bins or 1)) for c in compiled.components
        }
        table = hub(compiled, [big])
        assert table.num_rows > 0
        for r in engine.calibrations(compiled):
            noisy = mechanisms.add_noise(r.calibration, [r.component.max_abs, -r.component.max_abs])
            assert all(abs(v) < mechanisms.INT64_MAX for v in noisy)
    persons = 1_200_000
    sumsq = persons * 99 * 99
    assert sumsq > 2**31
    compiled = plan.compile_query(
        parse_sql("SELECT AVG(CLAMP(age, 0, 99)) FROM persons", rho=0.5), catalog
    )
    (c,) = [c for c in compiled.components if c.kind.value == "sum"]
    cal = mechanisms.calibrate(c.sensitivity, 0.25)
    (value,) = mechanisms.add_noise(cal, [sumsq])
    assert abs(value - sumsq) < 40 * cal.scale


def test_a_rho_too_small_for_64_bits_is_refused_before_planning() -> None:
    """A weight of 1e-300 used to charge every node and then fail at the hub; weights now
    have a public range, checked when the query is built (queries.spec.WEIGHT_RANGE)."""
    with pytest.raises(QueryError, match=r"weight must be between 1e-12 and 1e\+12"):
        Measure(Statistic.SUM, "s", column="cost", weight=1e-300)


def test_components_that_could_overflow_64_bits_are_refused_at_plan_time() -> None:
    """The bound comes from public declarations only: persons x rows per person x clamp.

    A view declaring 10^17 persons cannot have its sums of a 1e15-bounded column released in
    64 bits (nor any noise added to them), so the query is refused before any data is read;
    the same query on a view of the default size plans.
    """
    huge = ViewSpec(name="people", description="", columns=VIEW.columns, max_persons=10**17)
    query = Query(
        view="people",
        rho=1.0,
        measures=(Measure(Statistic.SUM, "s", column="cost", clamp=(0.0, 1e15)),),
    )
    with pytest.raises(QueryError, match="could overflow a 64-bit integer"):
        plan.compile_query(query, Catalog(views=(huge,)))
    assert plan.compile_query(query, CATALOG).components[0].max_abs < mechanisms.INT64_MAX


MEASURES = [
    Measure(Statistic.COUNT, "n"),
    Measure(Statistic.COUNT_ROWS, "rows"),
    Measure(Statistic.SUM, "total_cost", column="cost"),
    Measure(Statistic.MEAN, "mean_age", column="age"),
    Measure(Statistic.VARIANCE, "var_cost", column="cost", clamp=(-10.0, 500.0)),
    Measure(Statistic.STDDEV, "sd_age", column="age"),
    Measure(Statistic.QUANTILE, "median_age", column="age", quantile=0.5),
    Measure(Statistic.QUANTILE, "p90_cost", column="cost", quantile=0.9, clamp=(0.0, 100.0)),
    Measure(Statistic.HISTOGRAM, "hist_age", column="age", bins=12),
    Measure(Statistic.RATIO, "cost_per_year", column="cost", denominator="age"),
    Measure(Statistic.RATIO, "age_per_row", column="age"),
]

rows_strategy = st.lists(
    st.tuples(
        st.sampled_from(["female", "male", "other"]),  # "other" is outside the domain
        st.one_of(st.none(), st.integers(-(2**40), 2**40)),
        st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(rows_strategy, min_size=1, max_size=3),
    measures=st.lists(
        st.sampled_from(MEASURES), min_size=1, max_size=4, unique_by=lambda m: m.name
    ),
    grouped=st.booleans(),
    log_rho=st.floats(-7, 1),
)
def test_after_planning_the_data_never_changes_the_outcome(
    data: list[list[tuple[str, int | None, float | None]]],
    measures: list[Measure],
    grouped: bool,
    log_rho: float,
) -> None:
    query = Query(
        view="people",
        rho=10.0**log_rho,
        measures=tuple(measures),
        group_by=("sex",) if grouped else (),
    )
    try:
        compiled = plan.compile_query(query, CATALOG)
    except QueryError:
        return  # refused from public information alone, before any data is read
    exacts = []
    for region in data:
        store = Store([(i, sex, age, cost) for i, (sex, age, cost) in enumerate(region)])
        exacts.append(engine.exact_values(compiled, store))
    table = hub(compiled, exacts)
    # The shape of the answer is public: regions x groups x figures, whatever the data.
    figures = sum(m.bins or 12 if m.statistic is Statistic.HISTOGRAM else 1 for m in measures)
    assert table.num_rows == (len(data) + 1) * len(compiled.domain) * figures
    for r in table.to_pylist():
        for key in ("estimate", "ci_low", "ci_high"):
            value = r[key]
            assert value is None or math.isfinite(value)
        if r["estimate"] is None or r["statistic"] in {"sum", "ratio", "variance", "stddev"}:
            continue
        if r["statistic"] in {"count", "count_rows", "histogram"}:
            assert r["estimate"] >= 0
        elif r["measure"] in {"mean_age", "median_age"}:
            assert 0 <= r["ci_low"] <= r["estimate"] <= r["ci_high"] <= 120
