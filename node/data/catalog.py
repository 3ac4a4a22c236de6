"""The views a node serves and their public metadata. Nothing here is derived from patients.

Every domain, bound and row cap below is declared in code or taken from the node's
configuration (the reference date, the pathway files), so publishing the catalog through
`Describe` leaks nothing about patients. Two facts come from the source as a whole: without
reference_date in node.toml the date is the end of the data rounded up to a month end
(node/data/reference.py), and without a usable death table the mortality columns are left
out. The SQL in node/data/views.py builds the views to match: it maps every value onto these
domains, clamps numeric columns to these bounds and keeps at most `max_rows_per_person` rows
per person, which is what the query engine's sensitivities rely on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import date
from typing import Final

from node.data import care_sites as care_site
from queries.cohort import COHORT_VIEW, Cohort
from queries.pathway import Entry, Pathway
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec

DEFAULT_REFERENCE_DATE: Final = date(2025, 12, 31)

# Public age bands (years); children's bands follow the school phases used in NHS children's
# services reporting, adults' the usual NHS reporting bands.
AGE_BANDS: Final[tuple[tuple[str, int, int], ...]] = (
    ("0-4", 0, 4),
    ("5-11", 5, 11),
    ("12-17", 12, 17),
    ("18-39", 18, 39),
    ("40-64", 40, 64),
    ("65-79", 65, 79),
    ("80+", 80, 200),
)
SEXES: Final = ("female", "male", "unknown")
YES_NO: Final = ("no", "yes")
# Index of Multiple Deprivation 2019 quintiles of the person's LSOA, 1 = most deprived.
IMD_QUINTILES: Final = ("1", "2", "3", "4", "5", "unknown")

# visit_concept_id -> visit_type (OMOP standard visit concepts, docs/data.md); anything else
# is "other".
VISIT_TYPES: Final = ("inpatient", "outpatient", "emergency", "other")
VISIT_TYPE_CONCEPTS: Final[dict[int, str]] = {
    9201: "inpatient",
    9202: "outpatient",
    9203: "emergency",
    262: "emergency",  # ER and inpatient visit: an attendance that became an admission
}
INPATIENT_CONCEPTS: Final = (9201, 262)
EMERGENCY_CONCEPTS: Final = (9203, 262)
# Whether a visit is a hospital stay and how it began.
ADMISSIONS: Final = ("emergency", "planned", "none")
# 30-day emergency readmission after a stay; "n/a" for visits that are not stays and stays
# whose 30 days of follow-up are not complete (discharged within 30 days of the reference
# date, or died during the stay).
READMITTED: Final = ("no", "yes", "n/a")
READMISSION_DAYS: Final = 30

# Public bounds. Values beyond them are clamped in the view (and again by the engine).
MAX_AGE: Final = 120
MAX_LENGTH_OF_STAY: Final = 60
MAX_VISITS_PER_PERSON: Final = 50  # rows per person in `visits` (the first 50 by VISIT_RANK)
# The column of `visits` placing each person's visits in a fixed order (by a hash of the
# visit id): a lower rows_per_person keeps the first N. Not analysable, so not a column.
VISIT_RANK: Final = "visit_rank"
VISIT_YEARS: Final = 10  # `visits` covers the calendar years ending with the reference year
MAX_ADMISSIONS: Final = 20
MAX_BED_DAYS: Final = 120
MAX_READMISSIONS: Final = 10
MAX_ED_ATTENDANCES: Final = 20
# Rows per person in a pathway's admissions view (`<pathway>_admissions`), by a hash of the
# visit id like `visits`: a lower rows_per_person keeps the first N.
MAX_PATHWAY_ADMISSIONS: Final = 20
ADMISSIONS_SUFFIX: Final = "_admissions"


def age_bands(age_min: int = 0, age_max: int = 200) -> tuple[str, ...]:
    """The public age bands that overlap [age_min, age_max]."""
    return tuple(b for b, lo, hi in AGE_BANDS if hi >= age_min and lo <= age_max)


def visit_years(reference_date: date) -> tuple[str, ...]:
    """The public domain of `visits.year`: VISIT_YEARS calendar years up to the reference."""
    last = reference_date.year
    return tuple(str(y) for y in range(last - VISIT_YEARS + 1, last + 1))


def visit_months(reference_date: date) -> tuple[str, ...]:
    """The public domain of `month` ("YYYY-MM"): every month of the visit years."""
    return tuple(f"{y}-{m:02d}" for y in visit_years(reference_date) for m in range(1, 13))


def _category(
    name: str, domain: tuple[str, ...], description: str, *, person_level: bool = True
) -> ColumnSpec:
    return ColumnSpec(name, ColumnType.CATEGORY, description, domain, person_level=person_level)


def _integer(
    name: str, lower: int, upper: int, description: str, *, person_level: bool = True
) -> ColumnSpec:
    return ColumnSpec(
        name, ColumnType.INTEGER, description, lower=lower, upper=upper, person_level=person_level
    )


def person_columns(age_min: int = 0, age_max: int = 200) -> tuple[ColumnSpec, ...]:
    """Columns shared by the persons view and every cohort view (one row per person)."""
    return (
        ColumnSpec("person_id", ColumnType.IDENTIFIER, "OMOP person_id; never released"),
        _category("sex", SEXES, "from gender_concept_id 8532 (female) / 8507 (male)"),
        _integer(
            "age",
            max(0, age_min),
            min(MAX_AGE, age_max),
            "whole years at the reference date, or at death if earlier",
        ),
        _category("age_band", age_bands(age_min, age_max), "band of `age`"),
        _category(
            "imd_quintile",
            IMD_QUINTILES,
            "IMD 2019 quintile of the person's LSOA (1 = most deprived), from the location "
            "table and the node's LSOA lookup; 'unknown' where the node cannot tell",
        ),
        _category("deceased", YES_NO, "has a death record on or before the reference date"),
    )


def persons_view() -> ViewSpec:
    """Every person after consent filtering, one row each."""
    return ViewSpec(
        name="persons",
        description=(
            "Every person in the node's OMOP CDM born on or before the reference date, after "
            "opt-outs and consent rules; one row per person"
        ),
        columns=person_columns(),
    )


def visits_view(reference_date: date = DEFAULT_REFERENCE_DATE) -> ViewSpec:
    """One row per visit, at most MAX_VISITS_PER_PERSON per person."""
    years = visit_years(reference_date)
    return ViewSpec(
        name="visits",
        description=(
            f"One row per visit starting in {years[0]}-{years[-1]} and on or before the "
            f"reference date; at most {MAX_VISITS_PER_PERSON} per person, chosen by a hash of "
            "the visit id (spread over the years); a lower rows_per_person keeps the first N "
            "of the same order among the visits that pass the query's filters"
        ),
        columns=(
            ColumnSpec("person_id", ColumnType.IDENTIFIER, "OMOP person_id; never released"),
            _category(
                "visit_type",
                VISIT_TYPES,
                "inpatient (9201), outpatient (9202), emergency (9203, 262), other",
                person_level=False,
            ),
            _category(
                "admission",
                ADMISSIONS,
                "for hospital stays (9201, 262): emergency if 262, preceded by an emergency "
                "visit, or starting on the day of (or after) one; else planned. none otherwise",
                person_level=False,
            ),
            _category("year", years, "calendar year the visit started", person_level=False),
            _category(
                "month",
                visit_months(reference_date),
                "calendar month the visit started, YYYY-MM",
                person_level=False,
            ),
            _integer(
                "length_of_stay",
                0,
                MAX_LENGTH_OF_STAY,
                "visit_end_date - visit_start_date in days (0 for same-day visits)",
                person_level=False,
            ),
            _category("age_band", age_bands(), "age band at the visit", person_level=False),
            _category(
                "readmitted_30d",
                READMITTED,
                f"for stays: an emergency admission began within {READMISSION_DAYS} days of "
                "discharge; n/a for other visits and stays without complete follow-up",
                person_level=False,
            ),
            _category("sex", SEXES, "as in persons"),
            _category("imd_quintile", IMD_QUINTILES, "as in persons"),
        ),
        max_rows_per_person=MAX_VISITS_PER_PERSON,
        rank_column=VISIT_RANK,
    )


def cohort_view(p: Pathway, name: str | None = None) -> ViewSpec:
    """One row per person on a pathway, with their outcomes over the pathway's window
    (named `name`, default the pathway's: an ad hoc cohort's is always "cohort")."""
    window = f"the {p.window_days} days up to the reference date"
    related = (
        "with a condition of the pathway's concept set recorded on the stay"
        if p.conditions
        else "(all emergency admissions: the pathway has no concept set)"
    )
    outcomes = (
        _integer("admissions", 0, MAX_ADMISSIONS, f"emergency admissions starting in {window}"),
        _integer(
            "related_admissions",
            0,
            MAX_ADMISSIONS,
            f"emergency admissions starting in {window} {related}",
        ),
        _category(
            "admitted",
            YES_NO,
            "yes if related_admissions > 0 (at least one pathway-related emergency admission)",
        ),
        _integer(
            "bed_days",
            0,
            MAX_BED_DAYS,
            f"total length of stay of the emergency admissions in {window}",
        ),
        _integer(
            "readmissions",
            0,
            MAX_READMISSIONS,
            f"emergency admissions in {window} that began within {READMISSION_DAYS} days of "
            "an earlier discharge",
        ),
        _category("readmitted", YES_NO, "yes if readmissions > 0"),
        _integer(
            "ed_attendances", 0, MAX_ED_ATTENDANCES, f"emergency department visits in {window}"
        ),
        _category("died_in_window", YES_NO, f"died in {window}"),
    )
    return ViewSpec(
        name=name or p.name,
        description=f"{p.title}: {p.description} Cohort: {describe_entry(p)}",
        columns=(*person_columns(p.age_min, p.age_max), *outcomes),
    )


def admissions_view(p: Pathway, reference_date: date = DEFAULT_REFERENCE_DATE) -> ViewSpec:
    """One row per pathway-related emergency admission (time series: count rows by month)."""
    years = visit_years(reference_date)
    related = (
        "with a condition of the pathway's concept set recorded on the stay"
        if (p.conditions)
        else "(every emergency admission: the pathway has no concept set)"
    )
    return ViewSpec(
        name=p.name + ADMISSIONS_SUFFIX,
        description=(
            f"{p.title}: one row per emergency admission {related}, starting in "
            f"{years[0]}-{years[-1]} on or before the reference date, of a person aged "
            f"{p.age_min}-{p.age_max} on its first day; at most {MAX_PATHWAY_ADMISSIONS} per "
            "person, chosen by a hash of the visit id"
        ),
        columns=(
            ColumnSpec("person_id", ColumnType.IDENTIFIER, "OMOP person_id; never released"),
            _category(
                "month",
                visit_months(reference_date),
                "calendar month the admission started, YYYY-MM",
                person_level=False,
            ),
            _category("year", years, "calendar year the admission started", person_level=False),
            _category(
                "age_band",
                age_bands(p.age_min, p.age_max),
                "age band on the admission's first day",
                person_level=False,
            ),
            _category("sex", SEXES, "as in persons"),
            _category("imd_quintile", IMD_QUINTILES, "as in persons"),
        ),
        max_rows_per_person=MAX_PATHWAY_ADMISSIONS,
        rank_column=VISIT_RANK,
    )


def describe_entry(p: Pathway) -> str:
    """How a person joins a pathway's cohort, in words (also shown by `chc-node check`)."""
    ages = f"aged {p.age_min}-{p.age_max} at the reference date (or at death)"
    alive = f"alive at the start of the {p.window_days}-day window"
    concepts = f"concept set {list(p.conditions)}" + (" and descendants" if p.descendants else "")
    if p.entry is Entry.CONDITION:
        what = f"a condition record in {concepts} on or before the reference date"
    elif p.entry is Entry.EMERGENCY_ADMISSION:
        what = f"an emergency admission in the window with {concepts} recorded on the stay"
    elif p.conditions:
        what = f"an emergency department visit in the window with {concepts} recorded on it"
    else:
        what = "an emergency department visit in the window"
    return f"persons {ages}, {alive}, with {what}."


# Columns built from the death table: a node without a usable one serves none of them (a
# query on them is refused at planning) rather than 'no' for everyone.
MORTALITY_COLUMNS: Final = frozenset({"deceased", "died_in_window"})


def build_catalog(
    pathways: Sequence[Pathway],
    *,
    reference_date: date = DEFAULT_REFERENCE_DATE,
    mortality: bool = True,
    care_sites: Sequence[str] = (),
) -> Catalog:
    """The node's public catalog: persons, visits and one cohort view per served pathway
    (with `care_site` on visits and the pathway views if the custodian declared care sites)."""
    visits = visits_view(reference_date)
    cohort_views = [cohort_view(p) for p in pathways]
    if care_sites:
        visits = dataclasses.replace(
            visits, columns=(*visits.columns, care_site.visit_column(care_sites))
        )
        column = care_site.person_column(care_sites)
        cohort_views = [dataclasses.replace(v, columns=(*v.columns, column)) for v in cohort_views]
    views = [persons_view(), visits]
    views += cohort_views
    views += [admissions_view(p, reference_date) for p in pathways]
    if not mortality:
        views = [
            dataclasses.replace(
                v, columns=tuple(c for c in v.columns if c.name not in MORTALITY_COLUMNS)
            )
            for v in views
        ]
    return Catalog(views=tuple(views), reference_date=reference_date)


def with_cohort(catalog: Catalog, cohort: Cohort, *, mortality: bool = True) -> Catalog:
    """The catalog a query with an ad hoc cohort is planned against: the node's views and
    the cohort's, named "cohort", with the columns of a pathway of the same definition."""
    view = cohort_view(cohort.pathway("adhoc"), name=COHORT_VIEW)
    if not mortality:
        kept = tuple(c for c in view.columns if c.name not in MORTALITY_COLUMNS)
        view = dataclasses.replace(view, columns=kept)
    return dataclasses.replace(catalog, views=(*catalog.views, view))


def describe_cohort(cohort: Cohort, *, concept_ancestor: bool) -> str:
    """An ad hoc cohort in words, for Explain: who is in it, as this node will build it."""
    text = f"ad hoc cohort, built by this node on demand: {describe_entry(cohort.pathway('adhoc'))}"
    if cohort.descendants and cohort.conditions and not concept_ancestor:
        text += (
            " Descendants were asked for, but this node's OMOP data has no concept_ancestor "
            "table: only the listed concept ids are matched here."
        )
    return text
