"""An analyst's per-person contribution cap (Query.rows_per_person): planning and truncation.

A lower cap than the view's trades bias for noise: every sensitivity scales with it, and the
exact SQL keeps, of each person's rows that pass the filters, the `rows_per_person` first in
the view's keep order (its rank column; visits.visit_rank, by the MD5 of the visit id). A cap
above the view's is refused at plan time. Exact paths only: no noise is drawn here (the noise
the plan states is checked against releases in tests/integration/test_rows_per_person.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Iterator
from datetime import date

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.local import synth
from node import engine
from node.data import catalog as cat
from node.data.store import OmopStore
from queries import plan
from queries.errors import QueryError
from queries.pathway import load_pathways
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Filter, Measure, Query, Statistic
from tests.unit.omop_testdata import REF, example, write, write_lookup

CATALOG = cat.build_catalog([], reference_date=REF)
CAP = cat.MAX_VISITS_PER_PERSON


def visits(*measures: Measure, cap: int | None = None, **kwargs: object) -> Query:
    return Query(
        view="visits",
        rho=0.1,
        measures=measures or (Measure(Statistic.COUNT_ROWS, "n"),),
        rows_per_person=cap,
        **kwargs,  # type: ignore[arg-type]
    )


# --- planning ---------------------------------------------------------------------------------


def test_a_cap_above_the_views_is_refused_at_plan_time_naming_both() -> None:
    with pytest.raises(QueryError) as refused:
        plan.compile_query(visits(cap=CAP + 1), CATALOG)
    message = str(refused.value)
    assert f"rows_per_person {CAP + 1}" in message
    assert f"at most {CAP} row(s) per person" in message
    assert "custodian's cap is the maximum" in message
    assert refused.value.status_name == "INVALID_ARGUMENT"
    # persons keeps one row per person: 1 is its own cap, 2 is above it.
    persons = Query(view="persons", rho=0.1, rows_per_person=2)
    with pytest.raises(QueryError, match="above the cap of view 'persons'"):
        plan.compile_query(persons, CATALOG)


def test_a_lower_cap_needs_a_view_with_a_keep_order() -> None:
    unordered = ViewSpec(
        name="stays",
        description="two rows per person, no keep order",
        columns=(ColumnSpec("person_id", ColumnType.IDENTIFIER),),
        max_rows_per_person=2,
    )
    lower = Query(view="stays", rho=0.1, measures=(Measure(Statistic.COUNT_ROWS, "n"),))
    catalog = Catalog(views=(unordered,))
    with pytest.raises(QueryError, match="declares no order"):
        plan.compile_query(dataclasses.replace(lower, rows_per_person=1), catalog)
    # Its own cap is no truncation, so it needs no order.
    same = plan.compile_query(dataclasses.replace(lower, rows_per_person=2), catalog)
    assert same.scan == plan.compile_query(lower, catalog).scan


def test_the_rank_column_cannot_be_analysed() -> None:
    rank = cat.VISIT_RANK
    assert CATALOG.view("visits").rank_column == rank
    assert rank not in {c.name for c in CATALOG.view("visits").columns}
    for query in (
        visits(Measure(Statistic.SUM, "s", column=rank)),
        visits(group_by=(rank,)),
        visits(where=(Filter(rank, ("1",)),)),
    ):
        with pytest.raises(QueryError, match=f"no column '{rank}'"):
            plan.compile_query(query, CATALOG)
    with pytest.raises(ValueError, match="must not be an analysable column"):
        ViewSpec(
            name="v",
            description="a rank column that is also a measure column",
            columns=(ColumnSpec("r", ColumnType.INTEGER, lower=0, upper=1),),
            max_rows_per_person=2,
            rank_column="r",
        )


def _sensitivities(query: Query) -> dict[str, float]:
    return {c.key: c.sensitivity for c in plan.compile_query(query, CATALOG).components}


def test_sensitivities_scale_with_the_cap() -> None:
    measures = (
        Measure(Statistic.COUNT_ROWS, "n"),
        Measure(Statistic.COUNT, "persons"),
        Measure(Statistic.SUM, "bed_days", column="length_of_stay"),
        Measure(Statistic.HISTOGRAM, "h", column="length_of_stay", bins=6),
    )
    years = len(cat.visit_years(REF))  # 10: a person falls into at most min(cap, 10) years
    for cap in (None, CAP, 3, 1):
        c = CAP if cap is None else cap
        got = _sensitivities(visits(*measures, cap=cap, group_by=("year",)))
        assert got == {
            "rows": c,
            "persons": pytest.approx(math.sqrt(min(c, years))),
            "sum:length_of_stay": c * cat.MAX_LENGTH_OF_STAY,
            "bins:length_of_stay/6": c,
        }, cap
    # A persons count grouped by person-level columns moves by 1 whatever the cap.
    assert _sensitivities(visits(Measure(Statistic.COUNT, "p"), cap=3, group_by=("sex",))) == {
        "persons": 1.0
    }


def test_the_noise_of_a_visit_count_at_cap_3_is_3_50ths_of_that_at_50() -> None:
    """sigma = sensitivity / sqrt(2 rho) (widened by one part in a billion: mechanisms.py)
    with L2 sensitivity = cap for a row count."""

    def sd(cap: int | None) -> float:
        (release,) = engine.calibrations(plan.compile_query(visits(cap=cap), CATALOG))
        return math.sqrt(release.variance)

    assert sd(None) == sd(CAP) == pytest.approx(CAP / math.sqrt(2 * 0.1), rel=1e-8)
    assert sd(3) == pytest.approx(sd(CAP) * 3 / 50, rel=1e-9)


def test_the_plan_says_which_rows_it_counts() -> None:
    capped = plan.compile_query(visits(cap=3), CATALOG)
    assert capped.rows_per_person == 3
    assert "counting at most 3 of each person's rows" in capped.describe()
    assert f"the view keeps up to {CAP}" in capped.describe()
    assert cat.VISIT_RANK in capped.describe()
    full = plan.compile_query(visits(cap=CAP), CATALOG)
    assert full.rows_per_person == CAP
    assert f"at most {CAP} row(s) per person" in full.describe()
    # The view's own cap is the default: the same SQL, no truncation.
    assert full.scan == plan.compile_query(visits(), CATALOG).scan
    assert "QUALIFY" not in full.scan.sql


# --- which rows a cap keeps, on the node's real views -----------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OmopStore]]:
    tmp = tmp_path_factory.mktemp("cap")
    folder = tmp / "yh"
    synth.generate_region(synth.region_by_slug("yh"), 4_000, folder, seed=3)
    pathways = load_pathways(None)
    built = {
        "synthetic": OmopStore(
            folder, pathways, reference_date=REF, threads=1, imd_lookup=folder / synth.LOOKUP_FILE
        ),
        "example": OmopStore(
            write(example(), tmp / "omop"),
            pathways,
            reference_date=REF,
            threads=1,
            imd_lookup=write_lookup(tmp / "imd.csv"),
        ),
    }
    yield built
    for s in built.values():
        s.close()


def _person5_years(cap: int, *, recent: bool = False) -> Counter[str]:
    """Years of the visits a cap keeps of person 5's 60 weekly visits (ids 1000-1059 from
    2024-01-01, tests/unit/omop_testdata.py), by the documented rule, without DuckDB: the
    first `cap` by the MD5 of the decimal visit id (or, for comparison, the most recent)."""
    ids = range(1000, 1060)
    if recent:
        kept = sorted(ids, reverse=True)[:cap]
    else:
        kept = sorted(ids, key=lambda i: (hashlib.md5(str(i).encode()).hexdigest(), i))[:cap]  # noqa: S324 - the keep order, not security
    start = date(2024, 1, 1).toordinal()
    return Counter(str(date.fromordinal(start + 7 * (i - 1000)).year) for i in kept)


def test_the_views_cap_and_a_lower_one_keep_the_first_by_a_hash_of_the_visit_id(
    stores: dict[str, OmopStore],
) -> None:
    store = stores["example"]
    outpatient = (Filter("visit_type", ("outpatient",)),)
    for cap in (1, 3, 10, 49, CAP):
        compiled = plan.compile_query(
            visits(cap=cap, group_by=("year",), where=outpatient), CATALOG
        )
        got = dict(zip(compiled.domain, engine.exact_values(compiled, store)["rows"], strict=True))
        expected = _person5_years(cap)
        expected["2025"] += 1  # person 1's one outpatient visit, kept at any cap
        assert {y: n for (y,), n in got.items() if n} == dict(expected), cap
    # The hash spreads the 50 over the years; the most recent 50 would hold 7 of 2025's 8.
    assert _person5_years(CAP) == Counter({"2024": 45, "2025": 5})
    assert _person5_years(CAP, recent=True) == Counter({"2024": 43, "2025": 7})


@pytest.mark.parametrize("which", ["synthetic", "example"])
def test_each_persons_ranks_are_1_to_n(stores: dict[str, OmopStore], which: str) -> None:
    rows = stores[which].query(
        f"SELECT person_id, list({cat.VISIT_RANK} ORDER BY {cat.VISIT_RANK}) AS r "  # noqa: S608
        "FROM visits GROUP BY person_id"
    )
    ranks = rows.column("r").to_pylist()
    assert ranks
    assert all(r == list(range(1, len(r) + 1)) for r in ranks)
    assert max(len(r) for r in ranks) <= CAP


def _view_rows(store: OmopStore) -> list[dict[str, object]]:
    return store.query(
        f"SELECT person_id, year, visit_type, length_of_stay, {cat.VISIT_RANK} AS rank "  # noqa: S608
        "FROM visits"
    ).to_pylist()


def _truncate(rows: list[dict[str, object]], cap: int, keep: set[str]) -> list[dict[str, object]]:
    """The rule, in Python: of each person's rows of the kept visit types, the `cap` lowest
    ranked."""
    by_person: dict[object, list[dict[str, object]]] = {}
    for r in rows:
        if r["visit_type"] in keep:
            by_person.setdefault(r["person_id"], []).append(r)
    return [
        r
        for mine in by_person.values()
        for r in sorted(mine, key=lambda r: r["rank"])[:cap]  # type: ignore[arg-type, return-value]
    ]


@pytest.mark.parametrize("cap", [1, 3])
def test_truncated_exact_values_equal_a_count_under_the_rank_rule(
    stores: dict[str, OmopStore], cap: int
) -> None:
    store = stores["synthetic"]
    rows = _view_rows(store)
    keep = {"emergency", "inpatient"}
    query = visits(
        Measure(Statistic.COUNT_ROWS, "n"),
        Measure(Statistic.COUNT, "persons"),
        Measure(Statistic.SUM, "los", column="length_of_stay"),
        Measure(Statistic.MEAN, "mean_los", column="length_of_stay"),
        Measure(Statistic.HISTOGRAM, "h", column="length_of_stay", bins=3),
        cap=cap,
        group_by=("year",),
        where=(Filter("visit_type", tuple(keep)),),
    )
    compiled = plan.compile_query(query, CATALOG)
    exact = engine.exact_values(compiled, store)
    kept = _truncate(rows, cap, keep)
    heavy = Counter(r["person_id"] for r in rows if r["visit_type"] in keep)
    assert max(heavy.values()) > cap  # the cap truncates someone here
    for g, (year,) in enumerate(compiled.domain):
        mine = [r for r in kept if r["year"] == year]
        los = [int(r["length_of_stay"]) for r in mine]  # type: ignore[call-overload]
        assert exact["rows"][g] == len(mine)
        assert exact["persons"][g] == len({r["person_id"] for r in mine})
        assert exact["sum:length_of_stay"][g] == sum(los)
        assert exact["rows:length_of_stay"][g] == len(los)
        bins = [min(2, v // 20) for v in los]  # [0, 20), [20, 40), [40, 60]
        assert exact["bins:length_of_stay/3"][3 * g : 3 * g + 3] == [
            bins.count(b) for b in range(3)
        ]
    assert sum(exact["rows"]) < sum(heavy.values())  # and so the count is lower


# --- sensitivities, empirically -----------------------------------------------------------------

TEST_CAP = 5
STAYS = ViewSpec(
    name="stays",
    description="up to five stays per person, placed in a keep order",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("sex", ColumnType.CATEGORY, domain=("female", "male")),
        ColumnSpec("kind", ColumnType.CATEGORY, domain=("a", "b", "c"), person_level=False),
        ColumnSpec("cost", ColumnType.INTEGER, lower=0, upper=5000, person_level=False),
        ColumnSpec("w", ColumnType.FLOAT, lower=-2.0, upper=3.5, person_level=False),
    ),
    max_rows_per_person=TEST_CAP,
    rank_column="rank",
)
STAYS_CATALOG = Catalog(views=(STAYS,))
MEASURES = (
    Measure(Statistic.COUNT, "persons"),
    Measure(Statistic.COUNT_ROWS, "rows"),
    Measure(Statistic.SUM, "cost", column="cost"),
    Measure(Statistic.SUM, "w", column="w"),
    Measure(Statistic.VARIANCE, "var_w", column="w"),
    Measure(Statistic.QUANTILE, "median_cost", column="cost", quantile=0.5, bins=8),
    Measure(Statistic.RATIO, "cost_per_stay", column="cost"),
)
Stay = tuple[int, str, str, int | None, float | None, int]


@st.composite
def stay_tables(draw: st.DrawFn) -> list[Stay]:
    """Up to eight persons, each with 0-5 rows whose ranks are a permutation of 1..n."""
    rows: list[Stay] = []
    for pid in range(1, draw(st.integers(1, 8)) + 1):
        sex = draw(st.sampled_from(["female", "male"]))
        n = draw(st.integers(0, TEST_CAP))
        ranks = draw(st.permutations(list(range(1, n + 1))))
        for rank in ranks:
            rows.append(
                (
                    pid,
                    sex,
                    draw(st.sampled_from(["a", "b", "c", "zzz"])),
                    draw(st.none() | st.integers(-100, 9000)),
                    draw(st.none() | st.floats(-10, 10, allow_nan=False)),
                    rank,
                )
            )
    return rows


class Table:
    """A real DuckDB holding the stays (what OmopStore is to a node)."""

    def __init__(self, rows: list[Stay]) -> None:
        self.con = duckdb.connect()
        self.con.execute(
            "CREATE TABLE stays (person_id BIGINT, sex VARCHAR, kind VARCHAR, cost BIGINT, "
            "w DOUBLE, rank BIGINT)"
        )
        if rows:
            self.con.executemany("INSERT INTO stays VALUES (?, ?, ?, ?, ?, ?)", rows)

    def query(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()


def _l2(a: list[int], b: list[int]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


@settings(max_examples=60, deadline=None)
@given(
    rows=stay_tables(),
    cap=st.integers(1, TEST_CAP),
    grouping=st.sampled_from([(), ("sex",), ("kind",), ("sex", "kind")]),
    kinds=st.none() | st.sets(st.sampled_from(["a", "b", "c"]), min_size=1),
    data=st.data(),
)
def test_removing_one_person_moves_each_component_by_at_most_its_sensitivity_at_the_cap(
    rows: list[Stay],
    cap: int,
    grouping: tuple[str, ...],
    kinds: set[str] | None,
    data: st.DataObject,
) -> None:
    where = () if kinds is None else (Filter("kind", tuple(sorted(kinds))),)
    query = Query(
        view="stays",
        rho=0.1,
        measures=MEASURES,
        group_by=grouping,
        where=where,
        rows_per_person=cap,
    )
    compiled = plan.compile_query(query, STAYS_CATALOG)
    person = data.draw(st.sampled_from(sorted({r[0] for r in rows} | {99})))
    full = engine.exact_values(compiled, Table(rows))
    without = engine.exact_values(compiled, Table([r for r in rows if r[0] != person]))
    for c in compiled.components:
        assert _l2(full[c.key], without[c.key]) <= c.sensitivity + 1e-9, (c.key, cap)


def test_the_bound_at_a_lower_cap_is_tight_and_truncation_is_what_makes_it_hold() -> None:
    """A person with five rows moves a row count by exactly the cap: without truncation it
    would move it by five, above the sensitivity the plan claims (and the noise it adds)."""
    rows: list[Stay] = [(1, "male", "a", 10, 0.5, r) for r in range(1, 6)]
    rows += [(2, "female", "b", 20, 1.0, 1)]
    for cap in (1, 3, 5):
        query = Query(view="stays", rho=0.1, measures=MEASURES, rows_per_person=cap)
        compiled = plan.compile_query(query, STAYS_CATALOG)
        full = engine.exact_values(compiled, Table(rows))
        without = engine.exact_values(compiled, Table(rows[5:]))
        sensitivity = {c.key: c.sensitivity for c in compiled.components}
        assert sensitivity["rows"] == cap
        assert _l2(full["rows"], without["rows"]) == cap
        assert _l2(full["sum:cost"], without["sum:cost"]) == 10 * cap
