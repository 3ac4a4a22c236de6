"""The OMOP CDM tables and columns a node reads, and what it loses without the optional ones.

Every other module takes its list of tables from here: node/data/omop.py finds them in the
source, node/data/staging.py checks and stages them, `chc-node init --copy` copies them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Kind(enum.StrEnum):
    """The type the node reads a column as."""

    INT = "BIGINT"
    DATE = "DATE"
    TEXT = "VARCHAR"


@dataclass(frozen=True)
class ColumnReq:
    """A column the node reads; `not_null` follows the OHDSI CommonDataModel v5.4 DDL."""

    name: str
    kind: Kind
    not_null: bool = False
    # Required columns must exist; an optional one may be absent and reads as NULL.
    required: bool = True
    # An optional column that feeds only an opt-in feature (care sites): its absence is a
    # note, not a warning, on a node that does not use it.
    note_if_absent: bool = False


@dataclass(frozen=True)
class TableReq:
    """An OMOP table the node reads."""

    name: str
    columns: tuple[ColumnReq, ...]
    required: bool = True
    # What the node loses without an optional table (for the report). An optional table that
    # is absent, empty or unusable (a required column missing, as in a header-less export) is
    # served as absent, with a warning: real exports are like this, and the rest still holds.
    if_absent: str = ""
    # False: values that are empty or do not convert are warnings, not refusals (a table the
    # node only takes a maximum of, where a bad row cannot change what a view holds).
    strict: bool = True


def _nn(name: str, kind: Kind = Kind.INT) -> ColumnReq:
    return ColumnReq(name, kind, not_null=True)


def _opt(name: str, kind: Kind = Kind.INT) -> ColumnReq:
    return ColumnReq(name, kind, required=False)


# The care site of a person (their usual site) and of a visit (node/data/care_sites.py).
_CARE_SITE = ColumnReq("care_site_id", Kind.INT, required=False, note_if_absent=True)


OMOP_TABLES: Final[tuple[TableReq, ...]] = (
    TableReq(
        "person",
        (
            _nn("person_id"),
            _nn("gender_concept_id"),
            _nn("year_of_birth"),
            _opt("month_of_birth"),
            _opt("day_of_birth"),
            _opt("location_id"),
            _CARE_SITE,
        ),
    ),
    TableReq(
        "visit_occurrence",
        (
            _nn("visit_occurrence_id"),
            _nn("person_id"),
            _nn("visit_concept_id"),
            _nn("visit_start_date", Kind.DATE),
            _nn("visit_end_date", Kind.DATE),
            _opt("preceding_visit_occurrence_id"),
            _CARE_SITE,
        ),
    ),
    TableReq(
        "condition_occurrence",
        (
            _nn("person_id"),
            _nn("condition_concept_id"),
            _nn("condition_start_date", Kind.DATE),
            _opt("visit_occurrence_id"),
        ),
    ),
    TableReq(
        "death",
        (_nn("person_id"), _nn("death_date", Kind.DATE)),
        required=False,
        if_absent="mortality outcomes (deceased, died_in_window) are unavailable",
    ),
    TableReq(
        "location",
        (_nn("location_id"), ColumnReq("location_source_value", Kind.TEXT)),
        required=False,
        if_absent="imd_quintile is 'unknown' for everyone",
    ),
    TableReq(
        "care_site",
        (_nn("care_site_id"), ColumnReq("care_site_source_value", Kind.TEXT)),
        required=False,
        if_absent="care sites cannot be published (every visit's care_site is 'other')",
    ),
    TableReq(
        "observation_period",
        (
            ColumnReq("person_id", Kind.INT),
            ColumnReq("observation_period_end_date", Kind.DATE),
        ),
        required=False,
        if_absent="without reference_date in node.toml it is taken from the latest visit end",
        strict=False,
    ),
    TableReq(
        "concept_ancestor",
        (_nn("ancestor_concept_id"), _nn("descendant_concept_id")),
        required=False,
        if_absent="pathway concept sets match the listed concept ids only, not their descendants",
    ),
)
TABLES_BY_NAME: Final = {t.name: t for t in OMOP_TABLES}
