"""OmopStore (node.data.store): every input format, the views row by row, and the lock-down.

The dataset is tests/unit/omop_testdata.example(); its comments say what each person is for.
Exact paths only: no noise anywhere in this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from node import engine
from node.data.catalog import build_catalog
from node.data.store import OmopStore, node_pathways
from queries import plan
from queries.errors import DataError
from queries.pathway import Entry, Pathway, load_pathways
from queries.spec import Filter, Query
from tests.unit.omop_testdata import (
    ASTHMA,
    EPILEPSY,
    REF,
    Omop,
    example,
    write,
    write_lookup,
)

PERSON = ("person_id", "sex", "age", "age_band", "imd_quintile", "deceased")
EXPECTED_PERSONS = [
    (1, "female", 10, "5-11", "1", "no"),
    (2, "male", 74, "65-79", "5", "yes"),  # age at death
    (3, "female", 62, "40-64", "unknown", "yes"),
    (4, "male", 17, "12-17", "unknown", "no"),
    (5, "female", 35, "18-39", "1", "no"),
    (7, "unknown", 40, "40-64", "unknown", "no"),
    (8, "male", 25, "18-39", "1", "no"),
    (9, "female", 55, "40-64", "1", "no"),
    (10, "male", 45, "40-64", "1", "no"),
    (11, "female", 70, "65-79", "1", "no"),
]
VISIT = (
    "person_id",
    "visit_type",
    "admission",
    "year",
    "length_of_stay",
    "age_band",
    "readmitted_30d",
    "sex",
    "imd_quintile",
)
EXPECTED_VISITS = Counter(
    [
        (1, "emergency", "none", "2025", 0, "5-11", "n/a", "female", "1"),
        (1, "emergency", "none", "2025", 0, "5-11", "n/a", "female", "1"),
        (1, "inpatient", "emergency", "2025", 3, "5-11", "yes", "female", "1"),
        (1, "inpatient", "emergency", "2025", 1, "5-11", "no", "female", "1"),
        (1, "outpatient", "none", "2025", 0, "5-11", "n/a", "female", "1"),
        (1, "inpatient", "planned", "2024", 1, "5-11", "no", "female", "1"),
        (2, "emergency", "emergency", "2025", 9, "65-79", "no", "male", "5"),
        # Person 5's 60 weekly visits: the 50 a hash of the visit id keeps, 45 of them in 2024
        # (the 50 most recent would be 43; tests/unit/test_rows_per_person.py derives both).
        *[(5, "outpatient", "none", "2024", 0, "18-39", "n/a", "female", "1")] * 45,
        *[(5, "outpatient", "none", "2025", 0, "18-39", "n/a", "female", "1")] * 5,
        (7, "emergency", "none", "2024", 0, "18-39", "n/a", "unknown", "unknown"),
        (8, "emergency", "none", "2025", 0, "18-39", "n/a", "male", "1"),
        (9, "emergency", "none", "2025", 0, "40-64", "n/a", "female", "1"),
        (9, "inpatient", "emergency", "2025", 1, "40-64", "no", "female", "1"),
        (10, "inpatient", "planned", "2025", 2, "40-64", "no", "male", "1"),
        (11, "emergency", "none", "2025", 0, "65-79", "n/a", "female", "1"),
        (11, "inpatient", "emergency", "2025", 4, "65-79", "yes", "female", "1"),
        (11, "emergency", "emergency", "2025", 2, "65-79", "no", "female", "1"),
    ]
)
OUTCOMES = (
    "admissions",
    "related_admissions",
    "admitted",
    "bed_days",
    "readmissions",
    "readmitted",
    "ed_attendances",
    "died_in_window",
)
NOTHING = (0, 0, "no", 0, 0, "no", 0, "no")
EXPECTED_COHORTS: dict[str, list[tuple[Any, ...]]] = {
    "asthma_children": [
        (*EXPECTED_PERSONS[0], 2, 1, "yes", 4, 1, "yes", 2, "no"),
        (*EXPECTED_PERSONS[3], *NOTHING),
    ],
    "copd": [(*EXPECTED_PERSONS[1], 1, 1, "yes", 9, 0, "no", 1, "yes")],
    "epilepsy": [
        (*EXPECTED_PERSONS[7], 1, 1, "yes", 1, 0, "no", 1, "no"),
        (*EXPECTED_PERSONS[8], *NOTHING),
    ],
    "alcohol_liver": [(*EXPECTED_PERSONS[9], 2, 0, "no", 6, 1, "yes", 2, "no")],
    "urgent_care": [
        (*EXPECTED_PERSONS[0], 2, 2, "yes", 4, 1, "yes", 2, "no"),
        (*EXPECTED_PERSONS[1], 1, 1, "yes", 9, 0, "no", 1, "yes"),
        (*EXPECTED_PERSONS[6], 0, 0, "no", 0, 0, "no", 1, "no"),
        (*EXPECTED_PERSONS[7], 1, 1, "yes", 1, 0, "no", 1, "no"),
        (*EXPECTED_PERSONS[9], 2, 2, "yes", 6, 1, "yes", 2, "no"),
    ],
}
VIEWS = {"persons", "visits", *EXPECTED_COHORTS, *(f"{c}_admissions" for c in EXPECTED_COHORTS)}

FORMATS: dict[str, dict[str, Any]] = {
    "parquet": {"fmt": "parquet"},
    "parquet-upper-int32-parts": {
        "fmt": "parquet",
        "upper": True,
        "int_type": pa.int32(),
        "parts": True,
    },
    "parquet-uint32": {"fmt": "parquet", "int_type": pa.uint32()},
    "csv": {"fmt": "csv"},
    "csv-upper-gz-uk-dates": {"fmt": "csv", "upper": True, "gz": True, "uk_dates": True},
    "duckdb": {"fmt": "duckdb"},
    "duckdb-upper-int32-schema": {
        "fmt": "duckdb",
        "upper": True,
        "int_type": pa.int32(),
        "schema": "cdm",
    },
}


def make_source(tmp: Path, omop: Omop, fmt: str = "parquet", **options: Any) -> Path:
    target = tmp / ("omop.duckdb" if fmt == "duckdb" else "omop")
    return write(omop, target, fmt, **options)


def open_store(source: Path, tmp: Path, **options: Any) -> OmopStore:
    options.setdefault("imd_lookup", write_lookup(tmp / "imd.csv"))
    return OmopStore(source, load_pathways(None), reference_date=REF, threads=1, **options)


def rows(store: OmopStore, view: str, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    select = ", ".join(f'"{c}"' for c in columns)
    return sorted(
        tuple(r.values())
        for r in store.query(f'SELECT {select} FROM "{view}"').to_pylist()  # noqa: S608
    )


def ids(store: OmopStore, sql: str) -> list[int]:
    return [int(r["person_id"]) for r in store.query(sql).to_pylist()]


def snapshot(store: OmopStore) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every view's rows as a multiset: equal snapshots give equal aggregates of any kind."""
    return {
        name: Counter(tuple(r.values()) for r in store.query(f'SELECT * FROM "{name}"').to_pylist())  # noqa: S608
        for name in store.tables()
    }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OmopStore]:
    tmp = tmp_path_factory.mktemp("baseline")
    store = open_store(make_source(tmp, example()), tmp)
    yield store
    store.close()


def test_persons(baseline: OmopStore) -> None:
    assert rows(baseline, "persons", PERSON) == EXPECTED_PERSONS


def test_visits(baseline: OmopStore) -> None:
    got = Counter(
        tuple(r.values())
        for r in baseline.query(
            "SELECT " + ", ".join(VISIT) + " FROM visits"  # noqa: S608
        ).to_pylist()
    )
    assert got == EXPECTED_VISITS


@pytest.mark.parametrize("view", sorted(EXPECTED_COHORTS))
def test_cohorts(baseline: OmopStore, view: str) -> None:
    assert rows(baseline, view, (*PERSON, *OUTCOMES)) == EXPECTED_COHORTS[view]


def test_only_the_views_are_visible(baseline: OmopStore) -> None:
    assert set(baseline.tables()) == VIEWS
    databases = {r["database_name"] for r in baseline.query("FROM duckdb_databases()").to_pylist()}
    assert "omop_source" not in databases
    temporary = baseline.query("SELECT count(*) AS n FROM duckdb_tables() WHERE temporary")
    assert temporary.to_pylist() == [{"n": 0}]


def test_the_report_warns_about_orphans_and_duplicate_deaths(baseline: OmopStore) -> None:
    warnings = {f.where: f.count for f in baseline.report.warnings}
    assert warnings["condition_occurrence.person_id"] == 1
    assert warnings["death.person_id"] == 1  # the orphan row
    assert any("several death records" in f.message for f in baseline.report.warnings)
    assert baseline.report.ok


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_gives_the_same_views(name: str, baseline: OmopStore, tmp_path: Path) -> None:
    options = dict(FORMATS[name])
    schema = options.get("schema")
    source = make_source(tmp_path, example(), **options)
    store = open_store(source, tmp_path, omop_schema=schema)
    try:
        assert snapshot(store) == snapshot(baseline)
    finally:
        store.close()


def test_extra_tables_and_files_are_ignored(baseline: OmopStore, tmp_path: Path) -> None:
    omop = example()
    omop.rows("observation_period").append(
        {
            "observation_period_id": 1,
            "person_id": 1,
            "observation_period_start_date": date(2015, 1, 1),
            "observation_period_end_date": REF,
            "period_type_concept_id": 32817,
        }
    )
    omop.rows("note_nlp").append({"whatever": "x"})
    source = make_source(tmp_path, omop)
    (source / "README.txt").write_text("exported by the trust")
    (source / "scratch").mkdir()
    store = open_store(source, tmp_path)
    try:
        assert snapshot(store) == snapshot(baseline)
        ignored = " ".join(f.message for f in store.report.findings if "ignored" in f.message)
        assert "note_nlp" in ignored
        # observation_period is read now (for the default reference date), not ignored.
        assert "observation_period" not in ignored
    finally:
        store.close()


def test_a_plan_runs_on_the_store(baseline: OmopStore) -> None:
    catalog = build_catalog(load_pathways(None), reference_date=REF)
    compiled = plan.compile_query(
        Query(view="persons", rho=0.1, group_by=("sex",), where=(Filter("deceased", ("no",)),)),
        catalog,
    )
    (values,) = engine.exact_values(compiled, baseline).values()
    got = dict(zip((g[0] for g in compiled.domain), values, strict=True))
    assert got == {"female": 4, "male": 3, "unknown": 1}


def test_descendants_come_from_concept_ancestor(tmp_path: Path) -> None:
    omop = example()
    child_asthma = 4051466  # a descendant of 317009 in the tests' own concept_ancestor
    omop.person(12, date(2012, 2, 2), location=100)
    omop.condition(12, child_asthma, date(2023, 1, 1))
    without = open_store(make_source(tmp_path / "a", omop), tmp_path)
    omop.rows("concept_ancestor").extend(
        [
            {"ancestor_concept_id": ASTHMA, "descendant_concept_id": ASTHMA},
            {"ancestor_concept_id": ASTHMA, "descendant_concept_id": child_asthma},
            {"ancestor_concept_id": 999, "descendant_concept_id": 998},
        ]
    )
    with_ancestors = open_store(make_source(tmp_path / "b", omop), tmp_path)
    try:
        ids = "SELECT person_id FROM asthma_children ORDER BY 1"
        assert [r["person_id"] for r in without.query(ids).to_pylist()] == [1, 4]
        assert [r["person_id"] for r in with_ancestors.query(ids).to_pylist()] == [1, 4, 12]
        assert any("concept_ancestor" in f.where for f in without.report.findings)
    finally:
        without.close()
        with_ancestors.close()


def test_entry_events(tmp_path: Path) -> None:
    pathways = [
        Pathway("epilepsy_admitted", "t", "", (EPILEPSY,), entry=Entry.EMERGENCY_ADMISSION),
        Pathway("ed_epilepsy", "t", "", (EPILEPSY,), entry=Entry.EMERGENCY_VISIT),
        Pathway("ed_children", "t", "", (), age_max=17, entry=Entry.EMERGENCY_VISIT),
        Pathway("short_window", "t", "", (), entry=Entry.EMERGENCY_VISIT, window_days=7),
    ]
    store = OmopStore(make_source(tmp_path, example()), pathways, reference_date=REF, threads=1)
    try:
        members = {p.name: ids(store, f"SELECT person_id FROM {p.name}") for p in pathways}  # noqa: S608
    finally:
        store.close()
    assert sorted(members["epilepsy_admitted"]) == [9]  # 10's stay was planned
    assert sorted(members["ed_epilepsy"]) == [9]  # epilepsy recorded on the ED visit
    assert sorted(members["ed_children"]) == [1]
    assert sorted(members["short_window"]) == [8]  # only 8's visit is in the last 7 days


def test_the_reference_date_sets_ages_and_windows(tmp_path: Path) -> None:
    source = make_source(tmp_path, example())
    store = OmopStore(source, load_pathways(None), reference_date=date(2026, 1, 1), threads=1)
    try:
        ages = dict(
            (r["person_id"], r["age"])
            for r in store.query("SELECT person_id, age FROM persons").to_pylist()
        )
        years = {r["year"] for r in store.query("SELECT DISTINCT year FROM visits").to_pylist()}
    finally:
        store.close()
    assert ages[4] == 18  # 18 on 2026-01-01
    assert ages[8] == 25
    assert years == {"2024", "2025"}


def test_the_store_reads_no_files_once_built(baseline: OmopStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"x": [1]}), outside)
    attempts = [
        f"SELECT * FROM read_parquet('{outside}')",  # noqa: S608
        f"SELECT * FROM '{outside}'",  # noqa: S608
        "SELECT * FROM read_csv('/etc/passwd')",
        f"COPY persons TO '{tmp_path / 'leak.csv'}'",
        f"ATTACH '{tmp_path / 'other.db'}' AS other",
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "INSTALL httpfs",
    ]
    for sql in attempts:
        with pytest.raises(duckdb.Error):
            baseline.query(sql)
    assert not (tmp_path / "leak.csv").exists()
    assert not (tmp_path / "other.db").exists()


def test_a_duckdb_source_is_detached_and_unchanged(tmp_path: Path) -> None:
    source = make_source(tmp_path, example(), "duckdb")
    before = source.read_bytes()
    store = open_store(source, tmp_path)
    try:
        with pytest.raises(duckdb.Error):
            store.query("SELECT * FROM omop_source.main.person")
        with pytest.raises(duckdb.Error):
            store.query(f"ATTACH '{source}' AS again")
    finally:
        store.close()
    assert source.read_bytes() == before


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_the_source_files_are_not_modified(tmp_path: Path, fmt: str) -> None:
    folder = make_source(tmp_path, example(), fmt)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    open_store(folder, tmp_path).close()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_a_pathway_named_like_an_sql_keyword(tmp_path: Path) -> None:
    pathway = Pathway("order", "Orders", "", (ASTHMA,), 0, 17)
    store = OmopStore(make_source(tmp_path, example()), [pathway], reference_date=REF, threads=1)
    try:
        got = store.query('SELECT person_id FROM "order" ORDER BY person_id').to_pylist()
        assert [r["person_id"] for r in got] == [1, 4]
    finally:
        store.close()


def test_a_duckdb_file_with_the_tables_in_two_schemas_needs_omop_schema(tmp_path: Path) -> None:
    source = make_source(tmp_path, example(), "duckdb", schema="cdm")
    con = duckdb.connect(str(source))
    con.execute("CREATE TABLE main.person AS SELECT * FROM cdm.person LIMIT 0")
    con.close()
    with pytest.raises(DataError, match="several schemas"):
        open_store(source, tmp_path)
    store = open_store(source, tmp_path, omop_schema="CDM")
    try:
        assert rows(store, "persons", PERSON) == EXPECTED_PERSONS
    finally:
        store.close()
    with pytest.raises(DataError, match="no schema 'other'"):
        open_store(source, tmp_path, omop_schema="other")


def test_without_a_lookup_imd_is_unknown(tmp_path: Path) -> None:
    store = OmopStore(make_source(tmp_path, example()), [], reference_date=REF, threads=1)
    try:
        got = store.query("SELECT DISTINCT imd_quintile FROM persons").to_pylist()
    finally:
        store.close()
    assert got == [{"imd_quintile": "unknown"}]
    assert any(f.where == "imd_lookup" for f in store.report.findings)


def test_from_config_uses_the_data_settings(tmp_path: Path) -> None:
    from node.config import load_config

    source = make_source(tmp_path, example())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "copd.yaml").write_text("name: copd\nconditions: [255573]\nage_min: 80\n")
    write_lookup(tmp_path / "imd.csv")
    config = tmp_path / "node.toml"
    config.write_text(
        f'name = "n"\nomop = "{source}"\nidentity = "id"\nimd_lookup = "imd.csv"\n'
        'pathways = ["copd", "urgent_care"]\npathways_dir = "mine"\n'
    )
    cfg = load_config(config)
    assert [p.name for p in node_pathways(cfg)] == ["copd", "urgent_care"]
    store = OmopStore.from_config(cfg, threads=1)
    try:
        served = {"copd", "urgent_care"}
        assert set(store.tables()) == {
            "persons",
            "visits",
            *served,
            "copd_admissions",
            "urgent_care_admissions",
        }
        assert store.query("SELECT count(*) AS n FROM copd").to_pylist() == [{"n": 0}]  # 80+
        assert rows(store, "persons", PERSON) == EXPECTED_PERSONS
    finally:
        store.close()
