"""Checks on the staged persons, visits and deaths: what the source pass cannot see row by row.

Run after node/data/staging.py has staged the typed columns: they derive s_person (with a
birth date) and check each table against the persons and the reference date (births out of
range, visits before birth or after the reference date, duplicate ids, several deaths). They
read only the staged temporary tables, never the source, so they are kept apart from it.
"""

from __future__ import annotations

from typing import Final

import duckdb

from node.data.catalog import MAX_AGE, VISIT_TYPE_CONCEPTS
from node.data.findings import Level, ValidationReport

# Years of birth outside this range cannot be a living person's; such rows are dropped.
MIN_YEAR_OF_BIRTH: Final = 1800


def person_checks(con: duckdb.DuckDBPyConnection, ref: str, report: ValidationReport) -> None:
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
        SELECT person_id, gender_concept_id, location_id, care_site_id,
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


def visit_checks(con: duckdb.DuckDBPyConnection, ref: str, report: ValidationReport) -> None:
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


def death_checks(con: duckdb.DuckDBPyConnection, ref: str, report: ValidationReport) -> None:
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
