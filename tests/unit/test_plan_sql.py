"""Running a plan's SQL (queries.plan_sql) on DuckDB: counts, filters, quoting, sums, bins.

Only the exact path is exercised (node.engine.exact_values over a DuckDB connection, the
internal function that never answers over the wire): no noise is drawn in this module. The
last section checks the planner's sensitivities empirically, on random tables.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import engine
from node.data.catalog import build_catalog
from queries import plan
from queries.pathway import builtin_pathways
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Filter, Measure, Query, Statistic
from tests.unit._plan_helpers import CUSTOM, LABELS, MAX_COST, SETTINGS, VISITS, counts, q


class DuckStore:
    """The one method of OmopStore that node.engine uses, over a plain DuckDB connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def query(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()


def exact(compiled: plan.Plan, con: duckdb.DuckDBPyConnection) -> dict[str, list[int]]:
    """Exact integers per component key, on the plan's public domain."""
    return engine.exact_values(compiled, DuckStore(con))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return build_catalog(list(builtin_pathways().values()))


# ---- the SQL on a real DuckDB ----------------------------------------------------------------

PERSON_ROWS = [
    # person_id, sex, age_band, deceased
    (1, "female", "0-4", "no"),
    (2, "female", "0-4", "yes"),
    (3, "male", "80+", "yes"),
    (4, "male", "18-39", "no"),
    (5, "female", "18-39", "no"),
    (6, "unknown", "40-64", "no"),
    (7, "female", "0-4", "no"),
]


def _persons_table(rows: Sequence[tuple[int, str, str, str]]) -> pa.Table:
    return pa.table(
        {
            "person_id": pa.array([r[0] for r in rows], pa.int64()),
            "sex": pa.array([r[1] for r in rows], pa.string()),
            "age_band": pa.array([r[2] for r in rows], pa.string()),
            "deceased": pa.array([r[3] for r in rows], pa.string()),
        }
    )


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(":memory:")
    connection.register("persons_source", _persons_table(PERSON_ROWS))
    connection.execute("CREATE TABLE persons AS SELECT * FROM persons_source")
    yield connection
    connection.close()


def test_sql_counts_persons_by_group(catalog: Catalog, con: duckdb.DuckDBPyConnection) -> None:
    compiled = plan.compile_query(q(group_by=("sex", "age_band")), catalog)
    values = exact(compiled, con)["persons"]
    got = dict(zip(compiled.domain, values, strict=True))
    expected: Counter[tuple[str, ...]] = Counter((r[1], r[2]) for r in PERSON_ROWS)
    assert got == {g: expected.get(g, 0) for g in compiled.domain}
    assert sum(values) == len(PERSON_ROWS)


def test_sql_applies_filters(catalog: Catalog, con: duckdb.DuckDBPyConnection) -> None:
    compiled = plan.compile_query(
        q(group_by=("sex",), where=(Filter("deceased", ("no",)), Filter("sex", ("female",)))),
        catalog,
    )
    assert compiled.domain == (("female",),)
    assert exact(compiled, con) == {"persons": [3]}  # persons 1, 5 and 7


def test_sql_without_group_by_counts_everyone(
    catalog: Catalog, con: duckdb.DuckDBPyConnection
) -> None:
    compiled = plan.compile_query(
        Query(view="persons", rho=0.1, measures=counts("n", "count")), catalog
    )
    assert exact(compiled, con) == {"persons": [7]}


VISIT_ROWS = [
    # person_id, sex, setting, label, cost, los
    (1, "female", "inpatient", "it's", 100, 3),
    (1, "female", "inpatient", "it's", 9000, 40),  # clamped to 5000 and 30
    (1, "female", "emergency", "it's", 0, 0),
    (2, "male", "inpatient", 'say "hi"', 250, 30),
    (3, "male", "outpatient", "a\\b", None, None),
    (4, "female", "outpatient", "plain", 7, 1),
]


@pytest.fixture
def visits_con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(":memory:")
    connection.execute(
        "CREATE TABLE visits (person_id BIGINT, sex VARCHAR, setting VARCHAR, label VARCHAR,"
        " cost BIGINT, los BIGINT)"
    )
    connection.executemany("INSERT INTO visits VALUES (?, ?, ?, ?, ?, ?)", VISIT_ROWS)
    yield connection
    connection.close()


def test_sql_counts_distinct_persons(visits_con: duckdb.DuckDBPyConnection) -> None:
    compiled = plan.compile_query(q("visits", group_by=("setting",)), CUSTOM)
    # inpatient: persons 1 and 2; outpatient: 3 and 4; emergency: 1.
    assert exact(compiled, visits_con) == {"persons": [2, 2, 1]}


def test_sql_quotes_literals(visits_con: duckdb.DuckDBPyConnection) -> None:
    quoted = plan.compile_query(
        q("visits", group_by=("label",), where=(Filter("label", ("it's", 'say "hi"', "a\\b")),)),
        CUSTOM,
    )
    assert quoted.domain == (("it's",), ('say "hi"',), ("a\\b",))
    assert exact(quoted, visits_con) == {"persons": [1, 1, 1]}


def test_sql_rows_sums_and_bins(visits_con: duckdb.DuckDBPyConnection) -> None:
    query = Query(
        view="visits",
        rho=0.1,
        group_by=("sex",),
        measures=(
            Measure(Statistic.COUNT_ROWS, "rows"),
            Measure(Statistic.SUM, "cost", column="cost"),
            Measure(Statistic.VARIANCE, "var_los", column="los"),
            Measure(Statistic.HISTOGRAM, "los_hist", column="los"),
        ),
    )
    compiled = plan.compile_query(query, CUSTOM)
    got = exact(compiled, visits_con)
    assert got["rows"] == [4, 2]  # female, male
    assert got["sum:cost"] == [100 + 5000 + 0 + 7, 250]  # clamped at 5000; NULL ignored
    assert got["rows:los"] == [4, 1]  # rows with a value
    assert got["sum:los"] == [3 + 30 + 0 + 1, 30]
    assert got["sumsq:los"] == [9 + 900 + 0 + 1, 900]
    hist = got["bins:los"]
    assert len(hist) == 2 * 31
    female, male = hist[:31], hist[31:]
    assert {i: v for i, v in enumerate(female) if v} == {0: 1, 1: 1, 3: 1, 30: 1}
    assert {i: v for i, v in enumerate(male) if v} == {30: 1}


def test_sql_quotes_identifiers() -> None:
    view = ViewSpec(
        name="select",
        description="a view whose names are SQL keywords",
        columns=(
            ColumnSpec("person_id", ColumnType.IDENTIFIER),
            ColumnSpec("group", ColumnType.CATEGORY, domain=("x", "y")),
        ),
    )
    compiled = plan.compile_query(
        Query(view="select", rho=0.1, group_by=("group",), measures=counts("from")),
        Catalog(views=(view,)),
    )
    con = duckdb.connect(":memory:")
    con.execute('CREATE TABLE "select" ("person_id" BIGINT, "group" VARCHAR)')
    con.execute("""INSERT INTO "select" VALUES (1, 'x'), (2, 'x'), (3, 'y')""")
    assert exact(compiled, con) == {"persons": [2, 1]}
    con.close()


# ---- sensitivity, checked empirically ---------------------------------------------------------

Visit = tuple[int, str, str, str, int, int]


@st.composite
def visit_tables(draw: st.DrawFn) -> list[Visit]:
    """Visits for up to 12 persons, each with 1 to 3 rows and a fixed sex."""
    rows: list[Visit] = []
    for pid in range(draw(st.integers(1, 12))):
        sex = draw(st.sampled_from(("female", "male")))
        for _ in range(draw(st.integers(1, VISITS.max_rows_per_person))):
            rows.append(
                (
                    pid,
                    sex,
                    draw(st.sampled_from(SETTINGS)),
                    draw(st.sampled_from(LABELS)),
                    draw(st.integers(-100, MAX_COST + 1000)),
                    draw(st.integers(0, 40)),
                )
            )
    return rows


GROUPINGS = [(), ("sex",), ("setting",), ("sex", "setting"), ("label", "setting")]
SENSITIVITY_MEASURES = (
    Measure(Statistic.COUNT, "n"),
    Measure(Statistic.COUNT_ROWS, "rows"),
    Measure(Statistic.SUM, "cost", column="cost"),
    Measure(Statistic.MEAN, "los", column="los"),
    Measure(Statistic.HISTOGRAM, "hist", column="los", bins=8),
)


def _with_and_without(
    rows: list[Visit], person: int, compiled: plan.Plan
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Exact components on the rows, then on the rows without one person's."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(
            "CREATE TABLE visits (person_id BIGINT, sex VARCHAR, setting VARCHAR, label VARCHAR,"
            " cost BIGINT, los BIGINT)"
        )
        con.executemany("INSERT INTO visits VALUES (?, ?, ?, ?, ?, ?)", rows)
        full = exact(compiled, con)
        con.execute("DELETE FROM visits WHERE person_id = ?", [person])
        return full, exact(compiled, con)
    finally:
        con.close()


@settings(max_examples=20, deadline=None)
@given(rows=visit_tables(), grouping=st.sampled_from(GROUPINGS), data=st.data())
def test_removing_one_person_moves_each_component_by_at_most_its_sensitivity(
    rows: list[Visit], grouping: tuple[str, ...], data: st.DataObject
) -> None:
    """Add/remove one person: every component's exact vector moves by at most its L2 bound."""
    compiled = plan.compile_query(
        Query(view="visits", rho=0.1, measures=SENSITIVITY_MEASURES, group_by=grouping), CUSTOM
    )
    person = data.draw(st.sampled_from(sorted({r[0] for r in rows})))
    full, without = _with_and_without(rows, person, compiled)
    for c in compiled.components:
        a, b = full[c.key], without[c.key]
        l2 = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
        assert l2 <= c.sensitivity + 1e-9, c.key


def test_nulls_stay_out_of_clamped_sums(visits_con: duckdb.DuckDBPyConnection) -> None:
    """A NULL is not a value: clamping must not turn it into the lower bound and sum it."""
    query = Query(
        view="visits",
        rho=0.1,
        group_by=("sex",),
        measures=(
            Measure(Statistic.SUM, "cost", column="cost", clamp=(50, 5000)),
            Measure(Statistic.MEAN, "mean_cost", column="cost", clamp=(50, 5000)),
        ),
    )
    got = exact(plan.compile_query(query, CUSTOM), visits_con)
    # male: person 2's 250 and person 3's NULL (which used to be summed as 50).
    assert got["sum:cost@50.0,5000.0"] == [100 + 5000 + 50 + 50, 250]
    assert got["rows:cost"] == [4, 1]
