"""Check a custodian's OMOP data and stage the columns the node uses, with a report.

`prepare` reads each OMOP table the node needs once to check it (types, NOT NULL, person
links) and once to stage the typed columns it uses in temporary tables (s_person, s_visit,
...), then reads the IMD lookup and the consent registers. It never raises for a problem in
the data: every problem becomes a Finding (what, where, how many), and errors refuse the data
(ValidationReport.raise_if_refused). node/views.py builds the analysis views from the staged
tables; node/store.py drops them afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Final

import duckdb

from node.data import consent, imd
from node.data.catalog import DEFAULT_REFERENCE_DATE, MAX_AGE, VISIT_TYPE_CONCEPTS
from node.data.findings import Finding, Level, ValidationReport
from node.data.omop import OMOP_TABLES, ColumnReq, OmopSource, SourceTable, TableReq, open_source
from queries.errors import DataError
from queries.pathway import Pathway

# Years of birth outside this range cannot be a living person's; such rows are dropped.
MIN_YEAR_OF_BIRTH: Final = 1800
STAGED: Final = {
    "person": "s_person_raw",
    "visit_occurrence": "s_visit",
    "condition_occurrence": "s_condition",
    "death": "s_death_raw",
    "location": "s_location_raw",
    "concept_ancestor": "s_ancestor",
}


@dataclass(frozen=True)
class DataSettings:
    """Where a node's data is and how to read it (from node.toml)."""

    omop: Path
    reference_date: date = DEFAULT_REFERENCE_DATE
    imd_lookup: Path | None = None
    consent: consent.ConsentPolicy = field(default_factory=consent.ConsentPolicy)
    omop_schema: str | None = None


def _ref(settings: DataSettings) -> str:
    return f"DATE '{settings.reference_date.isoformat()}'"


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(con.execute(sql).fetchall()[0][0])


def _check_structure(source: OmopSource, report: ValidationReport) -> None:
    for req in OMOP_TABLES:
        table = source.table(req.name)
        if table is None:
            if req.required:
                report.add(
                    Level.ERROR,
                    req.name,
                    f"required table missing: expected {req.name}.parquet or {req.name}.csv "
                    f"(any case) in the folder, or a table {req.name} in the DuckDB file",
                )
            else:
                report.add(Level.NOTE, req.name, f"no such table: {req.if_absent}")
            continue
        for col in req.columns:
            if table.has(col.name):
                continue
            if col.required:
                report.add(
                    Level.ERROR,
                    f"{req.name}.{col.name}",
                    f"required column missing from {table.origin}",
                )
            else:
                report.add(
                    Level.WARNING,
                    f"{req.name}.{col.name}",
                    f"column absent from {table.origin}: read as empty ({_if_absent(col)})",
                )


def _if_absent(col: ColumnReq) -> str:
    return {
        "month_of_birth": "births are taken as 1 July",
        "day_of_birth": "births are taken as the 1st of the month",
        "location_id": "imd_quintile is 'unknown'",
        "preceding_visit_occurrence_id": "emergency admissions are found by date only",
        "visit_occurrence_id": "conditions are matched to stays by date only",
    }.get(col.name, "treated as unknown")


def _quality_scan(
    con: duckdb.DuckDBPyConnection, req: TableReq, table: SourceTable, report: ValidationReport
) -> None:
    """One pass over a source table: NOT NULL violations, unconvertible values, orphans."""
    present = [c for c in req.columns if table.has(c.name)]
    parts: list[str] = ["count(*)"]
    labels: list[tuple[str, ColumnReq]] = []
    for col in present:
        raw, typed = table.raw(col.name), table.typed(col)
        if col.not_null:
            parts.append(f"count(*) FILTER (WHERE {raw} IS NULL)")
            labels.append(("null", col))
        if not table.native(col):
            bad = f"{raw} IS NOT NULL AND ({typed}) IS NULL"
            parts.append(f"count(*) FILTER (WHERE {bad})")
            parts.append(f"min(CAST({raw} AS VARCHAR)) FILTER (WHERE {bad})")
            labels.append(("bad", col))
            labels.append(("example", col))
    join = ""
    if req.name != "person" and table.has("person_id") and req.name in STAGED:
        pid = table.typed(next(c for c in present if c.name == "person_id"))
        join = (
            f" LEFT JOIN (SELECT DISTINCT person_id AS known_id FROM s_person_raw) AS known "  # noqa: S608
            f"ON known.known_id = {pid}"
        )
        parts.append(f"count(*) FILTER (WHERE {pid} IS NOT NULL AND known.known_id IS NULL)")
        labels.append(("orphan", present[0]))
    sql = f"SELECT {', '.join(parts)} FROM {table.relation} AS src{join}"  # noqa: S608
    try:
        row = con.execute(sql).fetchall()[0]
    except duckdb.Error as exc:
        report.add(Level.ERROR, req.name, f"cannot read {table.origin}: {_first(exc)}")
        return
    values = list(row[1:])
    for (what, col), value in zip(labels, values, strict=True):
        where = f"{req.name}.{col.name}"
        if what == "null" and value:
            report.add(Level.ERROR, where, "NOT NULL column has empty values", int(value))
        elif what == "bad" and value:
            example = values[labels.index(("example", col))]
            kind = "dates" if col.kind.value == "DATE" else "whole numbers"
            report.add(
                Level.ERROR,
                where,
                f"values that are not {kind} (e.g. {str(example)[:30]!r})",
                int(value),
            )
        elif what == "orphan" and value:
            report.add(
                Level.WARNING,
                f"{req.name}.person_id",
                "rows whose person_id has no person row; they are ignored",
                int(value),
            )


def _stage(
    con: duckdb.DuckDBPyConnection, req: TableReq, table: SourceTable, where: str = ""
) -> None:
    select = ", ".join(f"{table.typed(c)} AS {c.name}" for c in req.columns)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {STAGED[req.name]} AS "  # noqa: S608 - quoted
        f"SELECT {select} FROM {table.relation} {where}"
    )


def _stage_concepts(
    con: duckdb.DuckDBPyConnection,
    source: OmopSource,
    pathways: Sequence[Pathway],
) -> None:
    """s_concepts(pathway, concept_id): every pathway's concept set, with descendants."""
    rows = [(p.name, c) for p in pathways for c in p.conditions]
    con.execute("CREATE OR REPLACE TEMP TABLE s_concepts (pathway VARCHAR, concept_id BIGINT)")
    if rows:
        con.executemany("INSERT INTO s_concepts VALUES (?, ?)", rows)
    ancestor = source.table("concept_ancestor")
    expand = [p.name for p in pathways if p.descendants and p.conditions]
    if ancestor is None or not expand:
        return
    req = next(t for t in OMOP_TABLES if t.name == "concept_ancestor")
    listed = ", ".join(str(int(c)) for _, c in rows)
    _stage(con, req, ancestor, f"WHERE {ancestor.typed(req.columns[0])} IN ({listed})")
    names = ", ".join(f"'{n}'" for n in expand)
    con.execute(
        f"""
        INSERT INTO s_concepts
        SELECT DISTINCT c.pathway, a.descendant_concept_id FROM s_concepts AS c
        JOIN s_ancestor AS a ON a.ancestor_concept_id = c.concept_id
        WHERE c.pathway IN ({names}) AND a.descendant_concept_id IS NOT NULL
        EXCEPT SELECT pathway, concept_id FROM s_concepts
        """  # noqa: S608 - names are checked identifiers
    )
    con.execute("DROP TABLE s_ancestor")


def _person_checks(con: duckdb.DuckDBPyConnection, ref: str, report: ValidationReport) -> None:
    """Derive s_person (with birth_date) from the staged person rows, and check them."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE s_person AS
        WITH t AS (
            SELECT *,
                   CASE WHEN month_of_birth BETWEEN 1 AND 12 THEN month_of_birth END AS m,
                   year_of_birth BETWEEN {MIN_YEAR_OF_BIRTH} AND 9999 AS year_ok
            FROM s_person_raw
        ),
        u AS (
            SELECT *,
                   CASE WHEN m IS NOT NULL AND day_of_birth BETWEEN 1 AND 31
                        THEN day_of_birth ELSE 1 END AS d
            FROM t
        )
        SELECT person_id, gender_concept_id, location_id,
               CASE WHEN year_ok THEN make_date(year_of_birth, coalesce(m, 7),
                    least(d, day(last_day(make_date(year_of_birth, coalesce(m, 7), 1)))))
               END AS birth_date,
               (month_of_birth IS NOT NULL AND m IS NULL)
               OR (m IS NOT NULL AND day_of_birth IS NOT NULL
                   AND NOT day_of_birth BETWEEN 1 AND 31) AS bad_month_day
        FROM u
        WHERE person_id IS NOT NULL
        """  # noqa: S608 - constants
    )
    row = con.execute(
        f"""
        SELECT count(*),
               count(*) FILTER (WHERE birth_date IS NULL AND gender_concept_id IS NOT NULL),
               count(*) FILTER (WHERE bad_month_day),
               count(*) FILTER (WHERE birth_date > {ref}),
               count(*) FILTER (WHERE date_sub('year', birth_date, {ref}) > {MAX_AGE}),
               count(*) FILTER (WHERE gender_concept_id NOT IN (8507, 8532)),
               (SELECT count(*) FROM (SELECT person_id FROM s_person
                                      GROUP BY person_id HAVING count(*) > 1))
        FROM s_person
        """  # noqa: S608 - constants
    ).fetchall()[0]
    total, no_birth, bad_md, unborn, old, other_sex, duplicated = (int(v) for v in row)
    if total == 0:
        report.add(Level.ERROR, "person", "the person table has no usable rows")
    if duplicated:
        report.add(
            Level.ERROR,
            "person.person_id",
            "person_ids that appear on several rows (one row per person is required)",
            duplicated,
        )
    if no_birth:
        report.add(
            Level.WARNING,
            "person.year_of_birth",
            f"year of birth outside {MIN_YEAR_OF_BIRTH}-9999: these persons are left out",
            no_birth,
        )
    if bad_md:
        report.add(
            Level.WARNING,
            "person.month_of_birth",
            "impossible month or day of birth: ignored (1 July, or the 1st, is assumed)",
            bad_md,
        )
    if unborn:
        report.add(
            Level.NOTE,
            "person",
            "persons born after the reference date are left out",
            unborn,
        )
    if old:
        report.add(
            Level.WARNING,
            "person.year_of_birth",
            f"persons older than {MAX_AGE} with no death record: their age is shown as {MAX_AGE}",
            old,
        )
    if other_sex:
        report.add(
            Level.NOTE,
            "person.gender_concept_id",
            "gender concepts other than 8507 (male) and 8532 (female): sex 'unknown'",
            other_sex,
        )


def _visit_checks(con: duckdb.DuckDBPyConnection, ref: str, report: ValidationReport) -> None:
    known = ", ".join(str(c) for c in VISIT_TYPE_CONCEPTS)
    row = con.execute(
        f"""
        SELECT count(*),
               count(*) FILTER (WHERE v.visit_end_date < v.visit_start_date),
               count(*) FILTER (WHERE v.visit_start_date < p.birth_date),
               count(*) FILTER (WHERE v.visit_start_date > {ref}),
               count(*) FILTER (WHERE v.visit_concept_id NOT IN ({known})),
               (SELECT count(*) FROM (SELECT visit_occurrence_id FROM s_visit
                                      GROUP BY 1 HAVING count(*) > 1))
        FROM s_visit AS v JOIN s_person AS p USING (person_id)
        """  # noqa: S608 - constants
    ).fetchall()[0]
    total, backwards, unborn, future, other, duplicated = (int(v) for v in row)
    if duplicated:
        report.add(
            Level.ERROR,
            "visit_occurrence.visit_occurrence_id",
            "visit ids that appear on several rows (the id must be unique)",
            duplicated,
        )
    if backwards:
        report.add(
            Level.WARNING,
            "visit_occurrence.visit_end_date",
            "visits that end before they start: taken as same-day visits",
            backwards,
        )
    if unborn:
        report.add(
            Level.WARNING,
            "visit_occurrence.visit_start_date",
            "visits before the person's birth: left out",
            unborn,
        )
    if future:
        report.add(
            Level.NOTE,
            "visit_occurrence.visit_start_date",
            "visits after the reference date: left out",
            future,
        )
    if other:
        report.add(
            Level.NOTE,
            "visit_occurrence.visit_concept_id",
            f"visit concepts other than {known}: visit_type 'other'",
            other,
        )
    report.add(Level.NOTE, "visit_occurrence", f"{total:,} visits of known persons")


def _death_checks(con: duckdb.DuckDBPyConnection, ref: str, report: ValidationReport) -> None:
    row = con.execute(
        f"""
        SELECT (SELECT count(*) FROM (SELECT person_id FROM s_death_raw
                                      GROUP BY 1 HAVING count(*) > 1)),
               count(*) FILTER (WHERE d.death_date > {ref}),
               count(*) FILTER (WHERE d.death_date < p.birth_date)
        FROM s_death_raw AS d JOIN s_person AS p USING (person_id)
        """  # noqa: S608 - constants
    ).fetchall()[0]
    several, future, before_birth = (int(v) for v in row)
    if several:
        report.add(
            Level.WARNING,
            "death.person_id",
            "persons with several death records: the earliest date is used",
            several,
        )
    if future:
        report.add(
            Level.NOTE,
            "death.death_date",
            "deaths after the reference date: alive at the reference date",
            future,
        )
    if before_birth:
        report.add(
            Level.WARNING,
            "death.death_date",
            "deaths before birth: the death record is ignored",
            before_birth,
        )


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
    _check_structure(source, report)
    if not report.ok:
        return report
    ref = _ref(settings)
    person_req = next(t for t in OMOP_TABLES if t.name == "person")
    person = source.tables["person"]
    try:
        _quality_scan(con, person_req, person, report)
        _stage(con, person_req, person)
        _stage_concepts(con, source, pathways)
        for req in OMOP_TABLES:
            table = source.table(req.name)
            if req.name in {"person", "concept_ancestor"} or table is None:
                continue
            _quality_scan(con, req, table, report)
            where = ""
            if req.name == "condition_occurrence":
                concept = table.typed(req.columns[1])
                where = f"WHERE {concept} IN (SELECT concept_id FROM s_concepts)"  # noqa: S608
            _stage(con, req, table, where)
        if not report.ok:
            return report
        _person_checks(con, ref, report)
        _visit_checks(con, ref, report)
        _death_checks(con, ref, report)
        if source.table("location") is None:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE s_location_raw "
                "(location_id BIGINT, location_source_value VARCHAR)"
            )
        _imd(con, source, settings, report)
        report.extend(consent.load_registers(con, settings.consent))
        if not report.ok:
            return report
        report.extend(
            consent.apply_rules(
                con,
                settings.consent,
                persons="(SELECT person_id, birth_date FROM s_person WHERE birth_date IS NOT NULL)",
                reference_date=settings.reference_date,
            )
        )
    except duckdb.Error as exc:
        report.add(Level.ERROR, str(settings.omop), f"could not read the data: {_first(exc)}")
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


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["DataSettings", "Finding", "prepare", "validate"]
