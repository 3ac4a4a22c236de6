"""Check a custodian's OMOP data and stage the columns the node uses, with a report.

`prepare` reads each OMOP table the node needs once to check it (types, NOT NULL, person
links) and once to stage the typed columns it uses in temporary tables (s_person, s_visit,
...), then reads the IMD lookup and the consent registers. It never raises for a problem in
the data: every problem becomes a Finding (what, where, how many), and errors refuse the data
(ValidationReport.raise_if_refused). node/data/views.py builds the analysis views from the
staged tables; node/data/store.py drops them afterwards. The pass over the source tables is in
node/data/staging.py and the checks on the staged tables in node/data/staged_checks.py; this
module holds the settings, the IMD areas and the order of work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import duckdb

from node.data import care_sites, cohorts, consent, imd, reference, registers
from node.data.findings import Finding, Level, ValidationReport
from node.data.omop import OmopSource, open_source, sql_string
from node.data.staged_checks import death_checks, person_checks, visit_checks
from node.data.staging import check_structure, first_line, quality_scan, stage, stage_concepts
from node.data.tables import OMOP_TABLES
from queries.cohort import CohortPolicy
from queries.errors import DataError
from queries.pathway import Pathway


@dataclass(frozen=True)
class DataSettings:
    """Where a node's data is and how to read it (from node.toml)."""

    omop: Path
    # None: the end of the data (node/data/reference.py), found when the data is read.
    reference_date: date | None = None
    imd_lookup: Path | None = None
    consent: consent.ConsentPolicy = field(default_factory=consent.ConsentPolicy)
    omop_schema: str | None = None
    # Ad hoc cohorts ([cohorts]): what condition records to keep for them (node/data/cohorts.py).
    cohorts: CohortPolicy = field(default_factory=CohortPolicy)
    # [care_sites] publish: the ODS codes of the care sites the custodian publishes.
    care_sites: tuple[str, ...] = ()


# Staged as empty when the source has no usable table, so the views need no special case.
_EMPTY: dict[str, str] = {
    "death": "s_death_raw (person_id BIGINT, death_date DATE)",
    "location": "s_location_raw (location_id BIGINT, location_source_value VARCHAR)",
    "care_site": "s_care_site_raw (care_site_id BIGINT, care_site_source_value VARCHAR)",
}


def _stage_tables(
    con: duckdb.DuckDBPyConnection, source: OmopSource, report: ValidationReport
) -> None:
    """Scan and stage every table but person and concept_ancestor; an optional table that
    cannot be read or has no rows is dropped from `source` with a warning."""
    for req in OMOP_TABLES:
        table = source.table(req.name)
        if req.name in {"person", "concept_ancestor"} or table is None:
            continue
        rows = quality_scan(con, req, table, report)
        if not req.required and not rows:
            if rows == 0:
                report.add(Level.WARNING, req.name, f"{table.origin} has no rows: {req.if_absent}")
            del source.tables[req.name]
            continue
        where = ""
        if req.name == "condition_occurrence":
            concept = table.typed(req.columns[1])
            where = f"WHERE {concept} IN (SELECT concept_id FROM s_concepts)"  # noqa: S608
        stage(con, req, table, where)
    ancestor = source.table("concept_ancestor")
    if (
        ancestor is not None
        and not con.execute(
            f"SELECT 1 FROM {ancestor.relation} LIMIT 1"  # noqa: S608 - quoted
        ).fetchall()
    ):
        req = next(t for t in OMOP_TABLES if t.name == "concept_ancestor")
        report.add(Level.WARNING, req.name, f"{ancestor.origin} has no rows: {req.if_absent}")
        del source.tables[req.name]
    for name, columns in _EMPTY.items():
        if source.table(name) is None:
            con.execute(f"CREATE OR REPLACE TEMP TABLE {columns}")
    report.absent = frozenset(t.name for t in OMOP_TABLES if source.table(t.name) is None)


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(con.execute(sql).fetchall()[0][0])


def _imd(
    con: duckdb.DuckDBPyConnection,
    source: OmopSource,
    settings: DataSettings,
    report: ValidationReport,
) -> None:
    """s_area(location_id, quintile): each location's IMD quintile, if the node can tell."""
    con.execute("CREATE OR REPLACE TEMP TABLE s_area (location_id BIGINT, quintile VARCHAR)")
    has_location = source.table("location") is not None
    if settings.imd_lookup is None:
        if has_location:
            report.add(
                Level.NOTE,
                "imd_lookup",
                "not configured in node.toml: imd_quintile is 'unknown' for everyone",
            )
        return
    if not has_location:
        report.add(
            Level.WARNING,
            "imd_lookup",
            "configured, but the source has no location table: imd_quintile is 'unknown'",
        )
        return
    findings = imd.load_imd_lookup(con, settings.imd_lookup)
    report.extend(findings)
    if any(f.level is Level.ERROR for f in findings):
        return
    row = con.execute(
        "SELECT (SELECT count(*) FROM (SELECT location_id FROM s_location_raw "
        "        WHERE location_id IS NOT NULL GROUP BY 1 "
        "        HAVING count(DISTINCT location_source_value) > 1))"
    ).fetchall()[0]
    if row[0]:
        report.add(
            Level.WARNING,
            "location.location_id",
            "location ids listed twice with different LSOA codes: the first code is used",
            int(row[0]),
        )
    con.execute(
        f"""
        INSERT INTO s_area
        SELECT l.location_id, i.quintile
        FROM (SELECT location_id, min(upper(trim(location_source_value))) AS lsoa
              FROM s_location_raw WHERE location_id IS NOT NULL GROUP BY 1) AS l
        JOIN {imd.LOOKUP_TABLE} AS i ON i.lsoa = l.lsoa
        """  # noqa: S608 - constant SQL
    )
    row = con.execute(
        """
        SELECT count(*) FILTER (WHERE p.location_id IS NULL),
               count(*) FILTER (WHERE p.location_id IS NOT NULL AND a.quintile IS NULL),
               count(*)
        FROM s_person AS p LEFT JOIN s_area AS a USING (location_id)
        """
    ).fetchall()[0]
    no_location, unmatched, total = (int(v) for v in row)
    if unmatched:
        report.add(
            Level.WARNING,
            "location.location_source_value",
            "persons whose location has no LSOA code found in the IMD lookup: 'unknown'",
            unmatched,
        )
    if no_location:
        report.add(
            Level.NOTE, "person.location_id", "persons without a location: 'unknown'", no_location
        )
    report.add(
        Level.NOTE,
        "imd",
        f"{total - no_location - unmatched:,} of {total:,} persons have an IMD quintile",
    )
    con.execute(f"DROP TABLE {imd.LOOKUP_TABLE}")


def prepare(
    con: duckdb.DuckDBPyConnection, settings: DataSettings, pathways: Sequence[Pathway]
) -> ValidationReport:
    """Check the data and stage it in temporary tables; problems go into the report."""
    report = ValidationReport(str(settings.omop))
    con.execute("SET enable_progress_bar = false")
    con.execute("SET allocator_flush_threshold = '32MB'")
    con.execute("SET allocator_bulk_deallocation_flush_threshold = '64MB'")
    try:
        source = open_source(con, settings.omop, schema=settings.omop_schema)
    except DataError as exc:
        report.add(Level.ERROR, str(settings.omop), str(exc))
        return report
    report.extend(source.findings)
    check_structure(source, report)
    if not report.ok:
        return report
    person_req = next(t for t in OMOP_TABLES if t.name == "person")
    person = source.tables["person"]
    try:
        quality_scan(con, person_req, person, report)
        stage(con, person_req, person)
        # s_concepts first: staging condition_occurrence keeps only the rows of its concepts.
        stage_concepts(con, source, pathways)
        _stage_tables(con, source, report)
        if not report.ok:
            return report
        cohorts.stage_sources(con, source, settings.cohorts)
        reference_date = reference.resolve(con, settings.reference_date, source, report)
        ref = f"DATE {sql_string(reference_date.isoformat())}"
        person_checks(con, ref, report)
        visit_checks(con, ref, report)
        death_checks(con, ref, report)
        end = reference.end_of_data(con, source) if settings.reference_date else None
        reference.window_checks(con, report, end)
        _imd(con, source, settings, report)
        care_sites.stage_sites(con, source, settings.care_sites, report)
        report.extend(registers.load_registers(con, settings.consent))
        if not report.ok:
            return report
        report.extend(
            consent.apply_rules(
                con,
                settings.consent,
                persons="(SELECT person_id, birth_date FROM s_person WHERE birth_date IS NOT NULL)",
                reference_date=reference_date,
            )
        )
    except duckdb.Error as exc:
        report.add(Level.ERROR, str(settings.omop), f"could not read the data: {first_line(exc)}")
    return report


def validate(
    settings: DataSettings, pathways: Sequence[Pathway], *, threads: int = 2
) -> ValidationReport:
    """Check a node's data without building views (for `chc-node init` and tests)."""
    con = duckdb.connect(":memory:", config={"threads": threads})
    try:
        return prepare(con, settings, pathways)
    finally:
        con.close()


__all__ = ["DataSettings", "Finding", "prepare", "validate"]
