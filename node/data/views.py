"""Build the analysis views (persons, visits, one per pathway) from the staged OMOP tables.

Runs after node/data/validate.py has staged the typed columns (s_person, s_visit, s_condition,
s_death_raw, s_area, s_concepts) and node/data/consent.py has listed the excluded persons
(consent_excluded). The first step drops every excluded person from the base tables, so no
view can see them. Every view then follows its catalog entry (node/data/catalog.py): each value
lies in its column's public domain or bounds, and no person has more rows than the view's
max_rows_per_person. Definitions are in docs/data.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

import duckdb

from node.data import care_sites as care_site
from node.data import catalog as cat
from node.data import cohorts
from node.data.omop import sql_ident, sql_string
from queries.pathway import Entry, Pathway

# Working tables, dropped once the views exist.
WORK_TABLES = ("b_person", "b_visit", "b_acute", "b_stay")


def _date(d: date) -> str:
    return f"DATE {sql_string(d.isoformat())}"


def _age_band(age: str) -> str:
    whens = " ".join(
        f"WHEN {age} BETWEEN {lo} AND {hi} THEN '{band}'" for band, lo, hi in cat.AGE_BANDS
    )
    return f"CASE {whens} END"


def _ints(values: Sequence[int]) -> str:
    return ", ".join(str(int(v)) for v in values)


def build_base(con: duckdb.DuckDBPyConnection, reference_date: date) -> None:
    """b_person, b_visit, b_acute, b_stay: consented persons and their visits, with flags."""
    ref = _date(reference_date)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE b_person AS
        WITH deaths AS (
            SELECT person_id, min(death_date) AS death_date FROM s_death_raw
            WHERE death_date IS NOT NULL GROUP BY person_id
        ),
        p AS (
            SELECT s.person_id,
                   CASE s.gender_concept_id WHEN 8532 THEN 'female' WHEN 8507 THEN 'male'
                        ELSE 'unknown' END AS sex,
                   s.birth_date,
                   CASE WHEN d.death_date BETWEEN s.birth_date AND {ref} THEN d.death_date
                   END AS death_date,
                   coalesce(a.quintile, 'unknown') AS imd_quintile,
                   s.care_site_id AS home_site_id
            FROM s_person AS s
            LEFT JOIN consent_excluded AS x ON x.person_id = s.person_id
            LEFT JOIN deaths AS d ON d.person_id = s.person_id
            LEFT JOIN s_area AS a ON a.location_id = s.location_id
            WHERE x.person_id IS NULL AND s.birth_date <= {ref}
        )
        SELECT *,
               least(date_sub('year', birth_date, coalesce(death_date, {ref})), {cat.MAX_AGE})
                   AS age,
               CASE WHEN death_date IS NULL THEN 'no' ELSE 'yes' END AS deceased
        FROM p
        """  # noqa: S608 - dates and numbers are generated, not user input
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE b_visit AS
        SELECT v.visit_occurrence_id AS id, v.person_id, v.visit_concept_id AS concept,
               v.visit_start_date AS start,
               least(greatest(v.visit_end_date, v.visit_start_date), {ref}) AS stop,
               v.preceding_visit_occurrence_id AS preceding, v.care_site_id AS site_id
        FROM s_visit AS v JOIN b_person AS p ON p.person_id = v.person_id
        WHERE v.visit_start_date BETWEEN p.birth_date AND {ref}
        """  # noqa: S608 - generated constants
    )
    con.execute("DROP TABLE s_visit")  # checked already; free the memory early
    emergency = _ints(cat.EMERGENCY_CONCEPTS)
    inpatient = _ints(cat.INPATIENT_CONCEPTS)
    # A stay is an emergency admission if it is an ER-and-inpatient visit (262), if its
    # preceding visit is an emergency visit, or if the person had an emergency visit that
    # day or the day before (many ETLs from HES/ECDS do not link the two).
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE b_acute AS
        WITH er AS (SELECT id, person_id, start FROM b_visit WHERE concept IN ({emergency})),
        er_days AS (
            SELECT person_id, start AS day FROM er
            UNION SELECT person_id, start + 1 FROM er
        )
        SELECT v.*,
               CASE WHEN v.concept NOT IN ({inpatient}) THEN 'none'
                    WHEN v.concept = 262 OR pe.id IS NOT NULL OR ed.person_id IS NOT NULL
                        THEN 'emergency'
                    ELSE 'planned' END AS admission
        FROM b_visit AS v
        LEFT JOIN er AS pe ON pe.id = v.preceding AND pe.person_id = v.person_id
        LEFT JOIN er_days AS ed ON ed.person_id = v.person_id AND ed.day = v.start
        """  # noqa: S608 - generated constants
    )
    con.execute("DROP TABLE b_visit")
    last_complete = _date(reference_date - timedelta(days=cat.READMISSION_DAYS))
    days = cat.READMISSION_DAYS
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE b_stay AS
        WITH s AS (
            SELECT a.id, a.person_id, a.start, a.stop, a.admission, p.death_date,
                   max(a.stop) OVER earlier AS previous_stop,
                   min(a.start) FILTER (WHERE a.admission = 'emergency') OVER later
                       AS next_emergency
            FROM b_acute AS a JOIN b_person AS p ON p.person_id = a.person_id
            WHERE a.admission <> 'none'
            WINDOW earlier AS (PARTITION BY a.person_id ORDER BY a.start, a.id
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                   later AS (PARTITION BY a.person_id ORDER BY a.start, a.id
                             ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
        )
        SELECT id,
               coalesce(admission = 'emergency' AND start >= previous_stop
                        AND start - previous_stop <= {days}, false) AS is_readmission,
               CASE WHEN death_date BETWEEN start AND stop THEN 'n/a'
                    WHEN stop > {last_complete} THEN 'n/a'
                    WHEN next_emergency >= stop AND next_emergency - stop <= {days} THEN 'yes'
                    ELSE 'no' END AS readmitted_30d
        FROM s
        """  # noqa: S608 - generated constants
    )


def build_persons(con: duckdb.DuckDBPyConnection, *, mortality: bool = True) -> None:
    """persons: one row per consented person (no `deceased` without a usable death table)."""
    deceased = ", CAST(deceased AS chc_yes_no) AS deceased" if mortality else ""
    con.execute(
        f"""
        CREATE TABLE persons AS
        SELECT person_id, CAST(sex AS chc_sex) AS sex, age,
               CAST({_age_band("age")} AS chc_age_band) AS age_band,
               CAST(imd_quintile AS chc_imd) AS imd_quintile{deceased}
        FROM b_person
        """  # noqa: S608 - generated
    )


def build_visits(
    con: duckdb.DuckDBPyConnection, reference_date: date, *, care_sites: bool = False
) -> None:
    """visits: one row per visit in the public years, MAX_VISITS_PER_PERSON per person at most
    (with care_sites, the visit's declared care site: node/data/care_sites.py)."""
    site = f", coalesce(cs.site, '{care_site.OTHER}') AS {care_site.COLUMN}" if care_sites else ""
    site_join = "LEFT JOIN s_site AS cs ON cs.care_site_id = a.site_id" if care_sites else ""
    first_year = cat.visit_years(reference_date)[0]
    kinds = " ".join(
        f"WHEN {concept} THEN '{kind}'" for concept, kind in cat.VISIT_TYPE_CONCEPTS.items()
    )
    age = "date_sub('year', p.birth_date, a.start)"
    # Each person's visits are placed in a fixed pseudo-random order, by the MD5 of the visit
    # id (ties, which need a hash collision, by the id): it depends only on that person's own
    # rows and is the same on every build, and the cap (and an analyst's lower one, which keeps
    # the first N of this order) spreads what it keeps over the years instead of favouring the
    # most recent. docs/statistics.md, "Analyst-chosen caps".
    cap = cat.MAX_VISITS_PER_PERSON
    con.execute(
        f"""
        CREATE TABLE visits AS
        WITH ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY person_id ORDER BY md5(CAST(id AS VARCHAR)), id
            ) AS {cat.VISIT_RANK}
            FROM b_acute WHERE start >= DATE '{first_year}-01-01'
            QUALIFY {cat.VISIT_RANK} <= {cap}
        )
        SELECT a.person_id,
               CAST(CASE a.concept {kinds} ELSE 'other' END AS chc_visit_type) AS visit_type,
               CAST(a.admission AS chc_admission) AS admission,
               CAST(CAST(year(a.start) AS VARCHAR) AS chc_year) AS year,
               CAST(strftime(a.start, '%Y-%m') AS chc_month) AS month,
               least(a.stop - a.start, {cat.MAX_LENGTH_OF_STAY}) AS length_of_stay,
               CAST({_age_band(age)} AS chc_age_band) AS age_band,
               CAST(coalesce(s.readmitted_30d, 'n/a') AS chc_readmitted) AS readmitted_30d,
               CAST(p.sex AS chc_sex) AS sex,
               CAST(p.imd_quintile AS chc_imd) AS imd_quintile,
               a.{cat.VISIT_RANK}{site}
        FROM ranked AS a
        JOIN b_person AS p ON p.person_id = a.person_id
        LEFT JOIN b_stay AS s ON s.id = a.id
        {site_join}
        """  # noqa: S608 - generated constants
    )


def _members(p: Pathway, window_start: str, ref: str) -> str:
    """SQL listing the person_ids that enter the pathway (before age and survival rules)."""
    emergency = _ints(cat.EMERGENCY_CONCEPTS)
    if p.entry is Entry.CONDITION:
        return f"""
            SELECT DISTINCT c.person_id FROM s_condition AS c
            JOIN s_concepts AS k ON k.concept_id = c.condition_concept_id
            WHERE k.pathway = {sql_string(p.name)} AND c.condition_start_date <= {ref}
        """  # noqa: S608 - quoted
    in_window = f"a.start BETWEEN {window_start} AND {ref}"
    if p.entry is Entry.EMERGENCY_ADMISSION:
        return f"""
            SELECT DISTINCT a.person_id FROM b_acute AS a JOIN related AS r ON r.id = a.id
            WHERE a.admission = 'emergency' AND {in_window}
        """  # noqa: S608 - generated
    join = "JOIN related AS r ON r.id = a.id" if p.conditions else ""
    return f"""
        SELECT DISTINCT a.person_id FROM b_acute AS a {join}
        WHERE a.concept IN ({emergency}) AND {in_window}
    """  # noqa: S608 - generated


def _related(p: Pathway) -> str:
    """SQL listing the acute visits (emergency stays and ED visits) with a concept-set
    condition recorded on them, on the ED visit that led to them, or (for unlinked records)
    dated within them."""
    emergency = _ints(cat.EMERGENCY_CONCEPTS)
    return f"""
        SELECT DISTINCT a.id FROM b_acute AS a
        JOIN s_condition AS c ON c.person_id = a.person_id
        JOIN s_concepts AS k ON k.concept_id = c.condition_concept_id
        WHERE k.pathway = {sql_string(p.name)}
          AND (a.admission = 'emergency' OR a.concept IN ({emergency}))
          AND (c.visit_occurrence_id = a.id OR c.visit_occurrence_id = a.preceding
               OR (c.visit_occurrence_id IS NULL
                   AND c.condition_start_date BETWEEN a.start AND a.stop))
    """  # noqa: S608 - quoted


def build_admissions(con: duckdb.DuckDBPyConnection, p: Pathway, reference_date: date) -> None:
    """`<pathway>_admissions`: one row per pathway-related emergency admission in the visit
    years of a person in the pathway's age range that day, MAX_PATHWAY_ADMISSIONS per person."""
    first_year = cat.visit_years(reference_date)[0]
    age = "date_sub('year', p.birth_date, a.start)"
    related = f"JOIN ({_related(p)}) AS r ON r.id = a.id" if p.conditions else ""
    # The same fixed pseudo-random order per person as `visits` (build_visits).
    con.execute(
        f"""
        CREATE TABLE {sql_ident(p.name + cat.ADMISSIONS_SUFFIX)} AS
        WITH ranked AS (
            SELECT a.*, {age} AS age_then, row_number() OVER (
                PARTITION BY a.person_id ORDER BY md5(CAST(a.id AS VARCHAR)), a.id
            ) AS {cat.VISIT_RANK}
            FROM b_acute AS a {related}
            JOIN b_person AS p ON p.person_id = a.person_id
            WHERE a.admission = 'emergency' AND a.start >= DATE '{first_year}-01-01'
              AND {age} BETWEEN {int(p.age_min)} AND {int(p.age_max)}
            QUALIFY {cat.VISIT_RANK} <= {cat.MAX_PATHWAY_ADMISSIONS}
        )
        SELECT a.person_id,
               CAST(strftime(a.start, '%Y-%m') AS chc_month) AS month,
               CAST(CAST(year(a.start) AS VARCHAR) AS chc_year) AS year,
               CAST({_age_band("a.age_then")} AS chc_age_band) AS age_band,
               CAST(p.sex AS chc_sex) AS sex,
               CAST(p.imd_quintile AS chc_imd) AS imd_quintile,
               a.{cat.VISIT_RANK}
        FROM ranked AS a JOIN b_person AS p ON p.person_id = a.person_id
        """  # noqa: S608 - the name is a checked identifier, quoted; the rest generated
    )


def build_cohort(
    con: duckdb.DuckDBPyConnection,
    p: Pathway,
    reference_date: date,
    *,
    mortality: bool = True,
    table: str | None = None,
) -> None:
    """One row per person on the pathway, with outcomes over its window (no `deceased` and
    `died_in_window` without a usable death table), in `table` (default: the pathway's name)."""
    ref = _date(reference_date)
    window_start = _date(reference_date - timedelta(days=p.window_days - 1))
    emergency = _ints(cat.EMERGENCY_CONCEPTS)
    related = _related(p)
    is_related = "r.id IS NOT NULL" if p.conditions else "true"
    died = (
        f", CAST(CASE WHEN p.death_date >= {window_start} THEN 'yes' ELSE 'no' END"
        " AS chc_yes_no) AS died_in_window"
    )
    con.execute(
        f"""
        CREATE TABLE {table or sql_ident(p.name)} AS
        WITH related AS ({related}),
        members AS ({_members(p, window_start, ref)}),
        w AS (
            SELECT a.person_id, a.admission, a.concept, a.stop - a.start AS los,
                   {is_related} AS related, coalesce(s.is_readmission, false) AS readmission
            FROM b_acute AS a
            JOIN members AS m ON m.person_id = a.person_id
            LEFT JOIN related AS r ON r.id = a.id
            LEFT JOIN b_stay AS s ON s.id = a.id
            WHERE a.start BETWEEN {window_start} AND {ref}
              AND (a.admission = 'emergency' OR a.concept IN ({emergency}))
        ),
        o AS (
            SELECT person_id,
                   count(*) FILTER (WHERE admission = 'emergency') AS admissions,
                   count(*) FILTER (WHERE admission = 'emergency' AND related)
                       AS related_admissions,
                   CAST(coalesce(sum(los) FILTER (WHERE admission = 'emergency'), 0) AS BIGINT)
                       AS bed_days,
                   count(*) FILTER (WHERE admission = 'emergency' AND readmission)
                       AS readmissions,
                   count(*) FILTER (WHERE concept IN ({emergency})) AS ed_attendances
            FROM w GROUP BY person_id
        )
        SELECT p.person_id, CAST(p.sex AS chc_sex) AS sex, p.age,
               CAST({_age_band("p.age")} AS chc_age_band) AS age_band,
               CAST(p.imd_quintile AS chc_imd) AS imd_quintile,
               {"CAST(p.deceased AS chc_yes_no) AS deceased," if mortality else ""}
               least(coalesce(o.admissions, 0), {cat.MAX_ADMISSIONS}) AS admissions,
               least(coalesce(o.related_admissions, 0), {cat.MAX_ADMISSIONS})
                   AS related_admissions,
               CAST(CASE WHEN coalesce(o.related_admissions, 0) > 0 THEN 'yes' ELSE 'no' END
                   AS chc_yes_no) AS admitted,
               least(coalesce(o.bed_days, 0), {cat.MAX_BED_DAYS}) AS bed_days,
               least(coalesce(o.readmissions, 0), {cat.MAX_READMISSIONS}) AS readmissions,
               CAST(CASE WHEN coalesce(o.readmissions, 0) > 0 THEN 'yes' ELSE 'no' END
                   AS chc_yes_no) AS readmitted,
               least(coalesce(o.ed_attendances, 0), {cat.MAX_ED_ATTENDANCES}) AS ed_attendances
               {died if mortality else ""}
        FROM b_person AS p
        JOIN members AS m ON m.person_id = p.person_id
        LEFT JOIN o ON o.person_id = p.person_id
        WHERE (p.death_date IS NULL OR p.death_date >= {window_start})
          AND p.age BETWEEN {int(p.age_min)} AND {int(p.age_max)}
        """  # noqa: S608 - the name is a checked identifier, quoted; the rest generated
    )


def create_types(con: duckdb.DuckDBPyConnection, reference_date: date) -> None:
    """ENUM types for the public domains: a byte per value instead of a string, so the
    views take a fraction of the memory (queries compare them with strings as before)."""
    domains = {
        "chc_sex": cat.SEXES,
        "chc_age_band": cat.age_bands(),
        "chc_imd": cat.IMD_QUINTILES,
        "chc_yes_no": cat.YES_NO,
        "chc_visit_type": cat.VISIT_TYPES,
        "chc_admission": cat.ADMISSIONS,
        "chc_readmitted": cat.READMITTED,
        "chc_year": cat.visit_years(reference_date),
        "chc_month": cat.visit_months(reference_date),
    }
    for name, values in domains.items():
        con.execute(f"CREATE TYPE {name} AS ENUM ({', '.join(sql_string(v) for v in values)})")


def build_views(
    con: duckdb.DuckDBPyConnection,
    pathways: Sequence[Pathway],
    reference_date: date,
    *,
    mortality: bool = True,
    keep_cohort_sources: bool = False,
    care_sites: bool = False,
) -> None:
    """Every analysis view, from the staged tables; the working tables are dropped after
    (with keep_cohort_sources, what ad hoc cohorts are built from is kept: node/data/cohorts.py;
    with care_sites, the visits and pathway views get `care_site`: node/data/care_sites.py).

    mortality=False (no usable death table) leaves out the columns built from deaths, as the
    catalog does (cat.build_catalog), so a query on them is refused at planning."""
    create_types(con, reference_date)
    build_base(con, reference_date)
    build_persons(con, mortality=mortality)
    build_visits(con, reference_date, care_sites=care_sites)
    for p in pathways:
        build_cohort(con, p, reference_date, mortality=mortality)
        build_admissions(con, p, reference_date)
    if care_sites:
        care_site.add_person_sites(con, [p.name for p in pathways], _date(reference_date))
    if keep_cohort_sources:
        cohorts.retain_sources(con, reference_date)
    for table in WORK_TABLES[::-1]:
        con.execute(f"DROP TABLE IF EXISTS {table}")
