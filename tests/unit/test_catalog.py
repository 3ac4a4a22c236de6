"""The public catalog (node.data.catalog) against the views the store builds (node.data.views).

Sensitivities rest on the catalog: every value a view holds must lie in its column's public
domain or bounds, no person may have more rows than max_rows_per_person, and person-level
columns must be constant per person. These tests check that on synthetic regions and on the
hand-written example, and that the catalog depends only on configuration.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import pytest

from coordinator.local import synth
from node.data import catalog as cat
from node.data.store import OmopStore
from queries.pathway import Entry, Pathway, load_pathways
from queries.schema import Catalog, ColumnType, ViewSpec
from tests.unit.omop_testdata import REF, example, write, write_lookup

PATHWAYS = load_pathways(None)
CATALOG = cat.build_catalog(PATHWAYS, reference_date=REF)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OmopStore]]:
    tmp = tmp_path_factory.mktemp("catalog")
    folder = tmp / "gm"
    synth.generate_region(synth.region_by_slug("gm"), 6_000, folder, seed=11)
    built = {
        "synthetic": OmopStore(
            folder,
            PATHWAYS,
            reference_date=REF,
            threads=1,
            imd_lookup=folder / synth.LOOKUP_FILE,
        ),
        "example": OmopStore(
            write(example(), tmp / "omop"),
            PATHWAYS,
            reference_date=REF,
            threads=1,
            imd_lookup=write_lookup(tmp / "imd.csv"),
        ),
    }
    yield built
    for s in built.values():
        s.close()


@pytest.fixture(params=["synthetic", "example"])
def store(request: pytest.FixtureRequest, stores: dict[str, OmopStore]) -> OmopStore:
    return stores[request.param]


def views() -> list[ViewSpec]:
    return list(CATALOG.views)


def test_the_catalog_lists_every_view(store: OmopStore) -> None:
    assert sorted(v.name for v in CATALOG.views) == store.tables()


@pytest.mark.parametrize("view", views(), ids=lambda v: v.name)
def test_columns_match(store: OmopStore, view: ViewSpec) -> None:
    got = store.query(f'DESCRIBE "{view.name}"').to_pylist()
    # The keep order (visits.visit_rank) is stored last, and is not an analysable column.
    ranks = [view.rank_column] if view.rank_column else []
    assert [r["column_name"] for r in got] == [*(c.name for c in view.columns), *ranks]
    kinds = {r["column_name"]: r["column_type"] for r in got}
    for col in view.columns:
        if col.type is ColumnType.CATEGORY:
            # An ENUM holding (at least) the public domain: a byte per value.
            assert kinds[col.name].startswith("ENUM("), col.name
            for value in col.domain:
                assert f"'{value}'" in kinds[col.name], (col.name, value)
        else:
            assert kinds[col.name] == "BIGINT", col.name


@pytest.mark.parametrize("view", views(), ids=lambda v: v.name)
def test_values_lie_in_public_domains_and_bounds(store: OmopStore, view: ViewSpec) -> None:
    for col in view.columns:
        quoted = f'"{col.name}"'
        nulls = store.query(f'SELECT count(*) AS n FROM "{view.name}" WHERE {quoted} IS NULL')  # noqa: S608
        assert nulls.to_pylist() == [{"n": 0}], col.name
        if col.type is ColumnType.CATEGORY:
            seen = store.query(f'SELECT DISTINCT {quoted} AS v FROM "{view.name}"').to_pylist()  # noqa: S608
            assert {r["v"] for r in seen} <= set(col.domain), col.name
        elif col.bounded:
            row = store.query(
                f'SELECT min({quoted}) AS lo, max({quoted}) AS hi FROM "{view.name}"'  # noqa: S608
            ).to_pylist()[0]
            if row["lo"] is not None:
                assert col.lower is not None
                assert col.upper is not None
                assert col.lower <= row["lo"] <= row["hi"] <= col.upper, col.name


@pytest.mark.parametrize("view", views(), ids=lambda v: v.name)
def test_rows_per_person_respect_the_cap(store: OmopStore, view: ViewSpec) -> None:
    most = store.query(
        f'SELECT coalesce(max(n), 0) AS n FROM (SELECT count(*) AS n FROM "{view.name}" '  # noqa: S608
        "GROUP BY person_id)"
    ).to_pylist()[0]["n"]
    assert most <= view.max_rows_per_person


@pytest.mark.parametrize("view", views(), ids=lambda v: v.name)
def test_person_level_columns_are_constant_per_person(store: OmopStore, view: ViewSpec) -> None:
    for col in view.columns:
        if col.type is ColumnType.IDENTIFIER or not col.person_level:
            continue
        varying = store.query(
            f'SELECT count(*) AS n FROM (SELECT person_id FROM "{view.name}" '  # noqa: S608
            f'GROUP BY person_id HAVING count(DISTINCT "{col.name}") > 1)'
        ).to_pylist()
        assert varying == [{"n": 0}], col.name


def test_every_view_has_a_person_id_and_bounded_numbers() -> None:
    for view in CATALOG.views:
        assert view.column("person_id").type is ColumnType.IDENTIFIER
        for col in view.columns:
            if col.type in {ColumnType.INTEGER, ColumnType.FLOAT}:
                assert col.bounded, (view.name, col.name)
    assert CATALOG.view("visits").max_rows_per_person == cat.MAX_VISITS_PER_PERSON
    events = [v for v in CATALOG.views if v.name.endswith(cat.ADMISSIONS_SUFFIX)]
    assert len(events) == len(PATHWAYS)
    assert all(v.max_rows_per_person == cat.MAX_PATHWAY_ADMISSIONS for v in events)
    assert all(
        v.max_rows_per_person == 1 for v in CATALOG.views if v.name != "visits" and v not in events
    )


def test_the_synthetic_views_are_not_trivial(stores: dict[str, OmopStore]) -> None:
    store = stores["synthetic"]
    for view in ("asthma_children", "copd", "urgent_care", "visits"):
        assert len(store.query(f'SELECT * FROM "{view}"')) > 50, view  # noqa: S608
    quintiles = store.query("SELECT DISTINCT imd_quintile AS q FROM persons").to_pylist()
    assert {r["q"] for r in quintiles} == set(cat.IMD_QUINTILES)


def test_the_catalog_depends_only_on_configuration() -> None:
    again = cat.build_catalog(load_pathways(None), reference_date=REF)
    assert again == CATALOG
    later = cat.build_catalog(PATHWAYS, reference_date=date(2030, 6, 30))
    assert later.view("visits").column("year").domain == tuple(str(y) for y in range(2021, 2031))
    assert later.view("persons") == CATALOG.view("persons")


def test_pathway_views_take_their_age_bands_and_bounds() -> None:
    asthma = CATALOG.view("asthma_children")
    assert asthma.column("age_band").domain == ("0-4", "5-11", "12-17")
    assert (asthma.column("age").lower, asthma.column("age").upper) == (0, 17)
    copd = CATALOG.view("copd")
    assert copd.column("age_band").domain == ("18-39", "40-64", "65-79", "80+")
    assert (copd.column("age").lower, copd.column("age").upper) == (18, 120)


def test_descriptions_say_how_a_person_joins() -> None:
    urgent = Pathway("ed", "ED", "Everyone at ED.", (), entry=Entry.EMERGENCY_VISIT)
    admitted = Pathway("adm", "A", "", (380378,), entry=Entry.EMERGENCY_ADMISSION)
    assert "emergency department visit in the window." in cat.describe_entry(urgent)
    assert "emergency admission" in cat.describe_entry(admitted)
    assert "[317009] and descendants" in CATALOG.view("asthma_children").description
    described = cat.build_catalog([urgent]).view("ed")
    assert "all emergency admissions" in described.column("related_admissions").description


def test_build_catalog_takes_no_data() -> None:
    # Nothing about a store goes in: the catalog is a function of pathways and a date.
    assert isinstance(cat.build_catalog([]), Catalog)
    assert [v.name for v in cat.build_catalog([]).views] == ["persons", "visits"]
