"""Small hand-written OMOP CDM datasets for the data-layer tests, in every input format.

`Omop` holds rows per table as dicts; `write` puts them on disk as a Parquet folder, a CSV
folder (optionally gzipped or with DD/MM/YYYY dates) or a DuckDB file, with upper-case names
and other integer widths on request, the way custodians' exports differ.
"""

from __future__ import annotations

import copy
import csv
import gzip
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

Row = dict[str, Any]
INT64 = pa.int64()

# Columns and kinds of the tables the tests write ("int", "date" or "str").
COLUMNS: dict[str, dict[str, str]] = {
    "person": {
        "person_id": "int",
        "gender_concept_id": "int",
        "year_of_birth": "int",
        "month_of_birth": "int",
        "day_of_birth": "int",
        "race_concept_id": "int",
        "ethnicity_concept_id": "int",
        "location_id": "int",
        "person_source_value": "str",
    },
    "visit_occurrence": {
        "visit_occurrence_id": "int",
        "person_id": "int",
        "visit_concept_id": "int",
        "visit_start_date": "date",
        "visit_end_date": "date",
        "visit_type_concept_id": "int",
        "preceding_visit_occurrence_id": "int",
    },
    "condition_occurrence": {
        "condition_occurrence_id": "int",
        "person_id": "int",
        "condition_concept_id": "int",
        "condition_start_date": "date",
        "condition_type_concept_id": "int",
        "visit_occurrence_id": "int",
    },
    "death": {"person_id": "int", "death_date": "date"},
    "location": {"location_id": "int", "location_source_value": "str"},
    "observation_period": {
        "observation_period_id": "int",
        "person_id": "int",
        "observation_period_start_date": "date",
        "observation_period_end_date": "date",
        "period_type_concept_id": "int",
    },
    "concept_ancestor": {"ancestor_concept_id": "int", "descendant_concept_id": "int"},
}

ASTHMA, COPD, EPILEPSY, ALCOHOL = 317009, 255573, 380378, 201612
INPATIENT, OUTPATIENT, EMERGENCY, ER_INPATIENT = 9201, 9202, 9203, 262
MALE, FEMALE = 8507, 8532


@dataclass
class Omop:
    """Rows of each OMOP table; add rows with the helpers, write with `write`."""

    tables: dict[str, list[Row]] = field(
        default_factory=lambda: {
            "person": [],
            "visit_occurrence": [],
            "condition_occurrence": [],
            "death": [],
        }
    )

    def copy(self) -> Omop:
        """A deep copy to change without touching the original."""
        return Omop(copy.deepcopy(self.tables))

    def rows(self, table: str) -> list[Row]:
        """The rows of a table (created empty if absent)."""
        return self.tables.setdefault(table, [])

    def person(
        self,
        pid: int,
        born: date | tuple[int, int | None, int | None],
        *,
        gender: int = FEMALE,
        location: int | None = None,
    ) -> None:
        """A person row; `born` is a date or (year, month or None, day or None)."""
        y, m, d = (born.year, born.month, born.day) if isinstance(born, date) else born
        self.rows("person").append(
            {
                "person_id": pid,
                "gender_concept_id": gender,
                "year_of_birth": y,
                "month_of_birth": m,
                "day_of_birth": d,
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "location_id": location,
                "person_source_value": f"p{pid}",
            }
        )

    def visit(
        self,
        vid: int,
        pid: int,
        concept: int,
        start: date,
        end: date | None = None,
        *,
        preceding: int | None = None,
    ) -> None:
        """A visit_occurrence row (same-day if no end)."""
        self.rows("visit_occurrence").append(
            {
                "visit_occurrence_id": vid,
                "person_id": pid,
                "visit_concept_id": concept,
                "visit_start_date": start,
                "visit_end_date": end or start,
                "visit_type_concept_id": 32817,
                "preceding_visit_occurrence_id": preceding,
            }
        )

    def condition(self, pid: int, concept: int, day: date, *, visit: int | None = None) -> None:
        """A condition_occurrence row."""
        rows = self.rows("condition_occurrence")
        rows.append(
            {
                "condition_occurrence_id": len(rows) + 1,
                "person_id": pid,
                "condition_concept_id": concept,
                "condition_start_date": day,
                "condition_type_concept_id": 32817,
                "visit_occurrence_id": visit,
            }
        )

    def death(self, pid: int, day: date) -> None:
        """A death row."""
        self.rows("death").append({"person_id": pid, "death_date": day})

    def location(self, lid: int, code: str | None) -> None:
        """A location row whose location_source_value is an LSOA code."""
        self.rows("location").append({"location_id": lid, "location_source_value": code})

    def drop_person(self, pid: int) -> Omop:
        """A copy without any row about this person."""
        out = self.copy()
        for name, rows in out.tables.items():
            if rows and "person_id" in rows[0]:
                out.tables[name] = [r for r in rows if r["person_id"] != pid]
        return out


def _arrow_type(kind: str, int_type: pa.DataType) -> pa.DataType:
    return {"int": int_type, "date": pa.date32(), "str": pa.string()}[kind]


def _columns(name: str, rows: list[Row]) -> dict[str, str]:
    known = COLUMNS.get(name, {})
    present = {k for r in rows for k in r} if rows else set(known)
    return {c: k for c, k in known.items() if c in present} | {
        c: "str" for c in present if c not in known
    }


def arrow_table(
    name: str, rows: list[Row], *, int_type: pa.DataType = INT64, upper: bool = False
) -> pa.Table:
    """One table as Arrow with the given integer type."""
    cols = _columns(name, rows)
    arrays = {
        (c.upper() if upper else c): pa.array(
            [r.get(c) for r in rows], type=_arrow_type(kind, int_type)
        )
        for c, kind in cols.items()
    }
    return pa.table(arrays)


def _csv_value(value: object, uk_dates: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, date) and uk_dates:
        return value.strftime("%d/%m/%Y")
    return str(value)


def write(
    omop: Omop,
    path: Path,
    fmt: str = "parquet",
    *,
    upper: bool = False,
    int_type: pa.DataType = INT64,
    uk_dates: bool = False,
    gz: bool = False,
    parts: bool = False,
    schema: str | None = None,
) -> Path:
    """Write every table; returns the source path to give the node.

    fmt: parquet (folder), csv (folder) or duckdb (a file at `path`). upper: upper-case
    table and column names. parts: each Parquet table as a folder of two part files.
    schema: for duckdb, the schema to create the tables in.
    """
    if fmt == "duckdb":
        con = duckdb.connect(str(path))
        if schema is not None:
            con.execute(f"CREATE SCHEMA {schema}")
        prefix = f"{schema}." if schema else ""
        for name, rows in omop.tables.items():
            table = arrow_table(name, rows, int_type=int_type, upper=upper)
            con.register("t", table)
            table_name = name.upper() if upper else name
            con.execute(f'CREATE TABLE {prefix}"{table_name}" AS SELECT * FROM t')  # noqa: S608
            con.unregister("t")
        con.close()
        return path
    path.mkdir(parents=True, exist_ok=True)
    for name, rows in omop.tables.items():
        stem = name.upper() if upper else name
        if fmt == "parquet":
            table = arrow_table(name, rows, int_type=int_type, upper=upper)
            if parts:
                (path / stem).mkdir()
                half = table.num_rows // 2
                pq.write_table(table.slice(0, half), path / stem / "part-0.parquet")
                pq.write_table(table.slice(half), path / stem / "part-1.parquet")
            else:
                pq.write_table(table, path / f"{stem}.parquet")
            continue
        cols = list(_columns(name, rows))
        target = path / (f"{stem}.csv.gz" if gz else f"{stem}.csv")
        opener = gzip.open if gz else open
        with opener(target, "wt", newline="") as f:  # type: ignore[operator]
            writer = csv.writer(f)
            writer.writerow([c.upper() if upper else c for c in cols])
            for r in rows:
                writer.writerow([_csv_value(r.get(c), uk_dates) for c in cols])
    return path


REF = date(2025, 12, 31)
LOOKUP_HEADER = ("LSOA code (2011)", "Index of Multiple Deprivation (IMD) Decile")
LOOKUP_ROWS = (("E01000001", 1), ("E01000002", 10), ("E01000003", 5))


def write_lookup(path: Path) -> Path:
    """An IMD lookup shaped like IoD2019 File 1 (deciles), saved as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOOKUP_HEADER)
        writer.writerows(LOOKUP_ROWS)
    return path


def example() -> Omop:
    """The dataset whose views tests/unit/test_store.py spells out row by row."""
    o = Omop()
    o.location(100, "E01000001")  # IMD decile 1: quintile 1
    o.location(101, " e01000002 ")  # decile 10: quintile 5 (codes are trimmed, upper-cased)
    o.location(102, "E01999999")  # not in the lookup: unknown
    d = date
    # 1: a child with asthma, two emergency admissions 16 days apart, one planned stay.
    o.person(1, d(2015, 6, 1), gender=FEMALE, location=100)
    o.condition(1, ASTHMA, d(2020, 1, 10))
    o.visit(10, 1, EMERGENCY, d(2025, 3, 1))
    o.visit(11, 1, INPATIENT, d(2025, 3, 1), d(2025, 3, 4), preceding=10)
    o.condition(1, ASTHMA, d(2025, 3, 1), visit=11)
    o.visit(12, 1, EMERGENCY, d(2025, 3, 20))
    o.visit(13, 1, INPATIENT, d(2025, 3, 20), d(2025, 3, 21))  # same-day ER, not linked
    o.visit(14, 1, OUTPATIENT, d(2025, 5, 1))
    o.visit(15, 1, INPATIENT, d(2024, 6, 1), d(2024, 6, 2))  # planned
    # 2: COPD, one ER-and-inpatient stay with an unlinked COPD record inside it, then died.
    o.person(2, (1950, None, None), gender=MALE, location=101)
    o.condition(2, COPD, d(2019, 3, 3))
    o.visit(20, 2, ER_INPATIENT, d(2025, 5, 1), d(2025, 5, 10))
    o.condition(2, COPD, d(2025, 5, 2))
    o.death(2, d(2025, 6, 5))
    o.death(2, d(2025, 6, 1))  # two death records: the earliest counts
    # 3: COPD but died before the window: in persons only.
    o.person(3, d(1960, 1, 15), gender=FEMALE, location=102)
    o.condition(3, COPD, d(2015, 2, 1))
    o.death(3, d(2023, 1, 1))
    # 4: a 17-year-old with asthma and no location.
    o.person(4, d(2008, 1, 1), gender=MALE)
    o.condition(4, ASTHMA, d(2024, 5, 5))
    # 5: 60 weekly outpatient visits: 50 are kept, the first by a hash of the visit id.
    o.person(5, d(1990, 5, 5), gender=FEMALE, location=100)
    for i in range(60):
        o.visit(1000 + i, 5, OUTPATIENT, d.fromordinal(d(2024, 1, 1).toordinal() + 7 * i))
    # 6: born after the reference date: left out.
    o.person(6, d(2030, 1, 1), gender=FEMALE)
    # 7: another gender concept; an ED visit before the window.
    o.person(7, d(1985, 2, 2), gender=0)
    o.visit(70, 7, EMERGENCY, d(2024, 12, 15))
    # 8: an ED visit on the reference date: urgent care.
    o.person(8, d(2000, 12, 31), gender=MALE, location=100)
    o.visit(80, 8, EMERGENCY, d(2025, 12, 31))
    # 9: epilepsy recorded on the ED visit that led to an admission.
    o.person(9, d(1970, 3, 3), gender=FEMALE, location=100)
    o.visit(90, 9, EMERGENCY, d(2025, 7, 1))
    o.visit(91, 9, INPATIENT, d(2025, 7, 1), d(2025, 7, 2), preceding=90)
    o.condition(9, EPILEPSY, d(2025, 7, 1), visit=90)
    # 10: epilepsy recorded on a planned stay only.
    o.person(10, d(1980, 8, 8), gender=MALE, location=100)
    o.condition(10, EPILEPSY, d(2021, 1, 1))
    o.visit(100, 10, INPATIENT, d(2025, 8, 1), d(2025, 8, 3))
    o.condition(10, EPILEPSY, d(2025, 8, 1), visit=100)
    # 11: alcohol-related liver disease; admitted the day after an ED visit, then an
    # ER-and-inpatient readmission 15 days after discharge.
    o.person(11, d(1955, 11, 11), gender=FEMALE, location=100)
    o.condition(11, ALCOHOL, d(2022, 2, 2))
    o.visit(111, 11, EMERGENCY, d(2025, 9, 30))
    o.visit(110, 11, INPATIENT, d(2025, 10, 1), d(2025, 10, 5))
    o.visit(112, 11, ER_INPATIENT, d(2025, 10, 20), d(2025, 10, 22))
    # Rows about a person who does not exist: warned about, ignored.
    o.condition(99, COPD, d(2020, 1, 1))
    o.death(99, d(2020, 1, 1))
    return o
