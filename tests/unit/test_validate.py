"""Validation of a custodian's OMOP data (node.data.validate): each failure is reported, not raised.

Every problem must come back as a finding that says what, where and how many; errors refuse
the data (OmopStore raises DataError carrying the report), warnings do not. Nothing may
crash the node with anything but a DataError.
"""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.data.findings import Finding, Level, ValidationReport
from node.data.store import OmopStore
from node.data.validate import DataSettings, validate
from queries.errors import DataError
from queries.pathway import load_pathways
from tests.unit.omop_testdata import REF, Omop, example, write, write_lookup

PATHWAYS = load_pathways(None)


def check(source: Path, **options: Any) -> ValidationReport:
    return validate(DataSettings(omop=source, reference_date=REF, **options), PATHWAYS, threads=1)


def found(report: ValidationReport, level: Level, where: str) -> Finding:
    matches = [f for f in report.findings if f.level is level and f.where == where]
    assert matches, f"no {level.value} at {where}:\n{report.render()}"
    return matches[0]


def drop_column(omop: Omop, table: str, column: str) -> Omop:
    out = omop.copy()
    for row in out.rows(table):
        row.pop(column, None)
    return out


def test_the_example_is_accepted_with_warnings(tmp_path: Path) -> None:
    report = check(write(example(), tmp_path / "omop"))
    assert report.ok
    assert "data accepted" in report.render()
    assert found(report, Level.WARNING, "condition_occurrence.person_id").count == 1


def test_a_path_that_does_not_exist(tmp_path: Path) -> None:
    report = check(tmp_path / "nowhere")
    assert not report.ok
    assert "neither a folder" in report.errors[0].message
    with pytest.raises(DataError, match="neither a folder"):
        OmopStore(tmp_path / "nowhere", [], reference_date=REF)


def test_a_single_file_is_not_a_source(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop")
    report = check(folder / "person.parquet")
    assert "point the node at the folder" in report.errors[0].message


def test_a_file_that_is_not_a_duckdb_database(tmp_path: Path) -> None:
    bogus = tmp_path / "omop.duckdb"
    bogus.write_bytes(b"this is not a database" * 100)
    report = check(bogus)
    assert not report.ok
    assert "cannot open" in report.errors[0].message


def test_an_empty_folder_lists_every_missing_table(tmp_path: Path) -> None:
    (tmp_path / "omop").mkdir()
    report = check(tmp_path / "omop")
    missing = {f.where for f in report.errors}
    assert missing == {"person", "visit_occurrence", "condition_occurrence"}
    assert all("required table missing" in f.message for f in report.errors)


@pytest.mark.parametrize("table", ["person", "visit_occurrence", "condition_occurrence"])
def test_a_missing_table_is_refused(tmp_path: Path, table: str) -> None:
    omop = example()
    del omop.tables[table]
    folder = write(omop, tmp_path / "omop")
    report = check(folder)
    assert [f.where for f in report.errors] == [table]
    with pytest.raises(DataError, match=f"ERROR   {table}: required table missing"):
        OmopStore(folder, PATHWAYS, reference_date=REF)


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("person", "year_of_birth"),
        ("person", "gender_concept_id"),
        ("visit_occurrence", "visit_start_date"),
        ("visit_occurrence", "visit_concept_id"),
        ("condition_occurrence", "condition_concept_id"),
    ],
)
def test_a_missing_column_is_refused(tmp_path: Path, table: str, column: str) -> None:
    report = check(write(drop_column(example(), table, column), tmp_path / "omop"))
    error = found(report, Level.ERROR, f"{table}.{column}")
    assert "required column missing" in error.message
    assert len(report.errors) == 1


@pytest.mark.parametrize(
    ("table", "column", "expected", "lost"),
    [
        ("death", "death_date", "person_id, death_date", "mortality outcomes"),
        ("location", "location_id", "location_id, location_source_value", "'unknown'"),
        (
            "concept_ancestor",
            "descendant_concept_id",
            "ancestor_concept_id, descendant_concept_id",
            "listed concept ids only",
        ),
    ],
)
def test_an_optional_table_missing_a_column_is_served_as_absent(
    tmp_path: Path, table: str, column: str, expected: str, lost: str
) -> None:
    omop = example()
    omop.rows("concept_ancestor").append({"ancestor_concept_id": 1, "descendant_concept_id": 2})
    report = check(write(drop_column(omop, table, column), tmp_path / "omop"))
    assert report.ok
    warning = found(report, Level.WARNING, table).message
    assert f"found, expected {expected};" in warning
    assert column not in warning.split(" found")[0]  # the columns found, without the missing
    assert lost in warning
    assert table in report.absent


@pytest.mark.parametrize(
    ("table", "column", "effect"),
    [
        ("person", "month_of_birth", "1 July"),
        ("person", "location_id", "unknown"),
        ("visit_occurrence", "preceding_visit_occurrence_id", "by date"),
        ("condition_occurrence", "visit_occurrence_id", "by date"),
    ],
)
def test_a_missing_optional_column_is_a_warning(
    tmp_path: Path, table: str, column: str, effect: str
) -> None:
    folder = write(drop_column(example(), table, column), tmp_path / "omop")
    report = check(folder)
    assert report.ok
    assert effect in found(report, Level.WARNING, f"{table}.{column}").message
    OmopStore(folder, PATHWAYS, reference_date=REF, threads=1).close()


@pytest.mark.parametrize(
    ("table", "column", "how_many"),
    [
        ("person", "year_of_birth", 2),
        ("visit_occurrence", "visit_end_date", 1),
        ("condition_occurrence", "condition_start_date", 1),
        ("death", "death_date", 3),
    ],
)
def test_not_null_columns_with_nulls_are_refused(
    tmp_path: Path, table: str, column: str, how_many: int
) -> None:
    omop = example()
    for row in omop.rows(table)[:how_many]:
        row[column] = None
    folder = write(omop, tmp_path / "omop")
    report = check(folder)
    error = found(report, Level.ERROR, f"{table}.{column}")
    assert error.count == how_many
    assert "NOT NULL" in error.message
    with pytest.raises(DataError, match=rf"{table}\.{column} \[{how_many}\]: NOT NULL"):
        OmopStore(folder, PATHWAYS, reference_date=REF)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_values_that_do_not_convert_are_refused_with_an_example(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop", "csv")
    text = (folder / "person.csv").read_text().splitlines()
    # person 1's gender becomes "F", person 2's year 1950.5; a visit date becomes 31/31/2020
    text[1] = text[1].replace(",8532,", ",F,", 1)
    text[2] = text[2].replace(",1950,", ",1950.5,", 1)
    (folder / "person.csv").write_text("\n".join(text) + "\n")
    visits = (folder / "visit_occurrence.csv").read_text().splitlines()
    visits[1] = visits[1].replace("2025-03-01", "31/31/2020", 1)
    (folder / "visit_occurrence.csv").write_text("\n".join(visits) + "\n")
    report = check(folder)
    gender = found(report, Level.ERROR, "person.gender_concept_id")
    assert (gender.count, "'F'") == (1, gender.message.split("e.g. ")[1].rstrip(")"))
    assert found(report, Level.ERROR, "person.year_of_birth").count == 1
    start = found(report, Level.ERROR, "visit_occurrence.visit_start_date")
    assert start.count == 1
    assert "not dates" in start.message
    assert "31/31/2020" in start.message


def test_blank_and_null_text_in_csv_is_empty_not_bad(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop", "csv")
    text = (folder / "person.csv").read_text().splitlines()
    header = text[0].split(",")
    month = header.index("month_of_birth")
    cells = text[1].split(",")
    cells[month] = "NULL"
    text[1] = ",".join(cells)
    (folder / "person.csv").write_text("\n".join(text) + "\n")
    assert check(folder).ok


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    omop = example()
    omop.person(1, date(2001, 1, 1))
    omop.visit(10, 4, 9202, date(2025, 1, 1))
    report = check(write(omop, tmp_path / "omop"))
    assert found(report, Level.ERROR, "person.person_id").count == 1
    assert found(report, Level.ERROR, "visit_occurrence.visit_occurrence_id").count == 1


def test_orphans_and_odd_dates_are_warnings(tmp_path: Path) -> None:
    omop = example()
    omop.visit(5000, 98, 9202, date(2025, 1, 1))  # no such person
    omop.visit(5001, 4, 9201, date(2025, 2, 10), date(2025, 2, 1))  # ends before it starts
    omop.visit(5002, 4, 9202, date(2001, 1, 1))  # before birth
    omop.visit(5003, 4, 9202, date(2026, 6, 1))  # after the reference date
    omop.death(4, date(2026, 6, 1))  # after the reference date
    omop.person(20, (1700, 1, 1))  # impossible year of birth
    omop.person(21, (1990, 13, 40))  # impossible month and day
    omop.person(22, (1880, 1, 1))  # older than 120
    folder = write(omop, tmp_path / "omop")
    report = check(folder)
    assert report.ok, report.render()
    assert found(report, Level.WARNING, "visit_occurrence.person_id").count == 1
    assert found(report, Level.WARNING, "visit_occurrence.visit_end_date").count == 1
    assert found(report, Level.WARNING, "visit_occurrence.visit_start_date").count == 1
    assert found(report, Level.NOTE, "visit_occurrence.visit_start_date").count == 1
    assert found(report, Level.NOTE, "death.death_date").count == 1
    assert found(report, Level.WARNING, "person.month_of_birth").count == 1
    warnings = [f for f in report.warnings if f.where == "person.year_of_birth"]
    assert sorted(f.count or 0 for f in warnings) == [1, 1]
    store = OmopStore(folder, PATHWAYS, reference_date=REF, threads=1)
    try:
        ages = {
            r["person_id"]: (r["age"], r["deceased"])
            for r in store.query("SELECT person_id, age, deceased FROM persons").to_pylist()
        }
        visits_of_4 = store.query(
            "SELECT visit_type, length_of_stay FROM visits "
            "WHERE sex = 'male' AND age_band = '12-17'"
        ).to_pylist()
    finally:
        store.close()
    assert 20 not in ages
    assert ages[21] == (35, "no")  # born 1 July 1990
    assert ages[22] == (120, "no")
    assert ages[4] == (17, "no")
    assert visits_of_4 == [{"visit_type": "inpatient", "length_of_stay": 0}]


def test_a_corrupt_file_is_reported(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop")
    (folder / "visit_occurrence.parquet").write_bytes(b"PAR1 but not really" * 10)
    (folder / "death.parquet").write_bytes(b"PAR1 but not really" * 10)
    report = check(folder)
    assert "cannot read" in found(report, Level.ERROR, "visit_occurrence").message
    # An optional table that cannot be read is served as absent, with a warning.
    warning = found(report, Level.WARNING, "death")
    assert "cannot read" in warning.message
    assert "mortality outcomes" in warning.message
    assert not [f for f in report.findings if f.level is Level.NOTE and f.where == "death"]


def test_two_files_for_one_table_are_refused(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop")
    pq.write_table(pq.read_table(folder / "death.parquet"), folder / "DEATH.parquet")
    write_csv(folder / "death.csv", ["person_id", "death_date"], [])
    report = check(folder)
    assert "several files" in found(report, Level.ERROR, "death").message


def test_columns_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop")
    table = pq.read_table(folder / "death.parquet")
    table = table.append_column("PERSON_ID", table.column("person_id"))
    pq.write_table(table, folder / "death.parquet")
    report = check(folder)
    assert "differ only in case" in found(report, Level.ERROR, "death.person_id").message


def test_an_empty_person_table_is_refused(tmp_path: Path) -> None:
    omop = example()
    omop.tables["person"] = []
    report = check(write(omop, tmp_path / "omop"))
    assert "no usable rows" in found(report, Level.ERROR, "person").message


# ---- IMD lookup -----------------------------------------------------------------------------


def test_a_lookup_in_deciles_or_quintiles(tmp_path: Path) -> None:
    folder = write(example(), tmp_path / "omop")
    deciles = check(folder, imd_lookup=write_lookup(tmp_path / "imd.csv"))
    quintiles_file = tmp_path / "q.parquet"
    pq.write_table(
        pa.table({"lsoa21cd": ["E01000001", "E01000002"], "IMD_Quintile": [1, 5]}), quintiles_file
    )
    quintiles = check(folder, imd_lookup=quintiles_file)
    for report in (deciles, quintiles):
        assert report.ok
        assert "persons have an IMD quintile" in found(report, Level.NOTE, "imd").message
        assert found(report, Level.WARNING, "location.location_source_value").count == 1


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["code", "imd_quintile"], [["E01000001", 1]], "LSOA code column"),
        (["lsoa_code", "score"], [["E01000001", 1]], "quintile (or else decile)"),
        (["lsoa_code", "imd_quintile"], [["E01000001", 7]], "from 1 to 5"),
        (["lsoa_code", "imd_decile"], [["E01000001", "x"]], "from 1 to 10"),
        (
            ["lsoa_code", "imd_quintile"],
            [["E01000001", 1], ["e01000001", 2]],
            "listed twice with different values",
        ),
    ],
)
def test_a_bad_lookup_is_refused(
    tmp_path: Path, header: list[str], rows: list[list[object]], message: str
) -> None:
    lookup = tmp_path / "imd.csv"
    write_csv(lookup, header, rows)
    report = check(write(example(), tmp_path / "omop"), imd_lookup=lookup)
    assert not report.ok
    assert message in report.errors[0].message
    assert str(lookup) in report.errors[0].where


def test_a_lookup_that_does_not_exist(tmp_path: Path) -> None:
    report = check(write(example(), tmp_path / "omop"), imd_lookup=tmp_path / "no.csv")
    assert "does not exist" in report.errors[0].message


def test_a_lookup_without_a_location_table_is_a_warning(tmp_path: Path) -> None:
    omop = example()
    del omop.tables["location"]
    report = check(write(omop, tmp_path / "omop"), imd_lookup=write_lookup(tmp_path / "i.csv"))
    assert report.ok
    assert "no location table" in found(report, Level.WARNING, "imd_lookup").message


# ---- never a crash --------------------------------------------------------------------------

GARBAGE = st.one_of(
    st.none(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=12),
    st.sampled_from(["2025-01-01", "01/02/2025", "NULL", "", "1e3", "8507.0", "9999-99-99"]),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    table=st.sampled_from(["person", "visit_occurrence", "condition_occurrence", "death"]),
    row=st.integers(min_value=0, max_value=5),
    values=st.dictionaries(
        st.sampled_from(
            [
                "person_id",
                "gender_concept_id",
                "year_of_birth",
                "month_of_birth",
                "visit_occurrence_id",
                "visit_concept_id",
                "visit_start_date",
                "visit_end_date",
                "condition_concept_id",
                "condition_start_date",
                "death_date",
            ]
        ),
        GARBAGE,
        max_size=3,
    ),
)
def test_garbage_in_a_csv_gives_a_report_or_views_never_a_crash(
    tmp_path_factory: pytest.TempPathFactory, table: str, row: int, values: dict[str, Any]
) -> None:
    folder = write(example(), tmp_path_factory.mktemp("fuzz") / "omop", "csv")
    path = folder / f"{table}.csv"
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    header = lines[0]
    target = lines[1 + row % (len(lines) - 1)]
    for column, value in values.items():
        if column in header:
            target[header.index(column)] = "" if value is None else str(value)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(lines)
    try:
        OmopStore(folder, PATHWAYS, reference_date=REF, threads=1).close()
    except DataError as exc:
        message = str(exc)
    else:
        message = "REFUSED"
    assert "REFUSED" in message, message


def test_a_duckdb_source_is_attached_read_only(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop.duckdb", "duckdb")
    writer = duckdb.connect(str(source))  # another process holding the file open to write
    try:
        report = check(source)
    finally:
        writer.close()
    # DuckDB may or may not allow a read-only attach beside a writer; either way: a report.
    assert report.ok or "cannot open" in report.errors[0].message
