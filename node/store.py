"""DuckDB over a node's OMOP CDM: source tables read in place, analysis views built once.

Queries see only the analysis tables built here (persons and one per pathway), never the
OMOP tables, and the node never writes to the source.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa

from node.catalog import AGE_BANDS
from protocols.errors import DataError
from queries.pathway import Pathway

log = logging.getLogger(__name__)

REQUIRED_TABLES = ("person", "condition_occurrence", "death")


@dataclass(frozen=True)
class SourceInfo:
    """Where the OMOP tables came from, for logs and Describe."""

    kind: str
    tables: dict[str, str]


def _literal(text: str) -> str:
    # DuckDB table functions take file paths as SQL string literals; escaping the quote is
    # the SQL standard's only escape, and paths are validated to exist before this.
    return "'" + text.replace("'", "''") + "'"


def _find_tables(path: Path) -> SourceInfo:
    if path.is_file() and path.suffix in {".duckdb", ".db"}:
        return SourceInfo(kind="duckdb", tables={})
    if not path.is_dir():
        raise DataError(
            f"OMOP source {path} is neither a folder of Parquet/CSV files nor a DuckDB file"
        )
    tables: dict[str, str] = {}
    for f in sorted(path.iterdir()):
        stem, suffix = f.stem.lower(), f.suffix.lower()
        if suffix in {".parquet", ".csv"} and stem not in tables:
            reader = "read_parquet" if suffix == ".parquet" else "read_csv_auto"
            tables[stem] = f"{reader}({_literal(str(f.resolve()))})"
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise DataError(
            f"OMOP source {path} lacks table(s) {missing}: expected files such as "
            f"{missing[0]}.parquet or {missing[0]}.csv"
        )
    return SourceInfo(kind="files", tables=tables)


def _age_band_sql(age: str) -> str:
    whens = " ".join(
        f"WHEN {age} BETWEEN {lo} AND {hi} THEN '{band}'" for band, lo, hi in AGE_BANDS
    )
    return f"CASE {whens} END"


class OmopStore:
    """A node's data: an in-memory DuckDB holding the analysis tables."""

    def __init__(
        self, source: Path, pathways: Sequence[Pathway], *, reference_date: date, threads: int = 2
    ) -> None:
        started = time.perf_counter()
        self.source = _find_tables(source)
        self._con = duckdb.connect(":memory:", config={"threads": threads})
        self._lock = threading.Lock()
        if self.source.kind == "duckdb":
            self._con.execute(f"ATTACH {_literal(str(source.resolve()))} AS omop (READ_ONLY)")
            src = {t: f"omop.{t}" for t in REQUIRED_TABLES}
        else:
            src = self.source.tables
        try:
            self._build(src, pathways, reference_date)
        except duckdb.Error as exc:
            raise DataError(f"could not build analysis views from {source}: {exc}") from None
        # Lock the database down once the views exist: no more file reads or extensions.
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")
        self.build_seconds = time.perf_counter() - started
        log.info("analysis views built in %.2f s", self.build_seconds)

    def _build(self, src: dict[str, str], pathways: Sequence[Pathway], ref: date) -> None:
        con = self._con
        ref_sql = f"DATE '{ref.isoformat()}'"
        birth = (
            "make_date(CAST(p.year_of_birth AS BIGINT), "
            "CAST(coalesce(p.month_of_birth, 7) AS BIGINT), "
            "CAST(coalesce(p.day_of_birth, 1) AS BIGINT))"
        )
        con.execute(
            f"""
            CREATE TABLE persons AS
            WITH base AS (
                SELECT CAST(p.person_id AS BIGINT) AS person_id,
                       CASE CAST(p.gender_concept_id AS BIGINT)
                            WHEN 8532 THEN 'female' WHEN 8507 THEN 'male' ELSE 'unknown' END
                           AS sex,
                       date_sub('year', {birth}, {ref_sql}) AS age
                FROM {src["person"]} AS p
            ),
            dead AS (SELECT DISTINCT CAST(person_id AS BIGINT) AS person_id FROM {src["death"]})
            SELECT b.person_id, b.sex, b.age, {_age_band_sql("b.age")} AS age_band,
                   CASE WHEN d.person_id IS NULL THEN 'no' ELSE 'yes' END AS deceased
            FROM base AS b LEFT JOIN dead AS d USING (person_id)
            WHERE b.age >= 0
            """  # noqa: S608 - sources are escaped file paths, not user input
        )
        con.execute(
            f"""
            CREATE TABLE conditions AS
            SELECT DISTINCT CAST(person_id AS BIGINT) AS person_id,
                   CAST(condition_concept_id AS BIGINT) AS concept_id
            FROM {src["condition_occurrence"]}
            """  # noqa: S608 - sources are escaped file paths, not user input
        )
        for p in pathways:
            concepts = ", ".join(str(int(c)) for c in p.conditions)
            con.execute(
                f"""
                CREATE TABLE {p.name} AS
                SELECT persons.* FROM persons
                WHERE persons.age BETWEEN {int(p.age_min)} AND {int(p.age_max)}
                  AND persons.person_id IN
                      (SELECT person_id FROM conditions WHERE concept_id IN ({concepts}))
                """  # noqa: S608 - the name is a checked identifier and concepts are ints
            )
        con.execute("DROP TABLE conditions")

    def query(self, sql: str) -> pa.Table:
        """Run one read-only aggregate on a fresh cursor and return it as Arrow."""
        # A cursor per call: DuckDB connections are not safe to share between threads.
        with self._lock:
            cursor = self._con.cursor()
        try:
            return cursor.sql(sql).to_arrow_table()
        finally:
            cursor.close()

    def close(self) -> None:
        """Release DuckDB's resources."""
        self._con.close()
