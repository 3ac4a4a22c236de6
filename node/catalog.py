"""The views a node serves and their public metadata. Nothing here is derived from data."""

from __future__ import annotations

from collections.abc import Sequence

from queries.pathway import Pathway
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec

# Public age bands (years at the node's reference date); children's bands follow the
# school phases used in NHS children's services reporting.
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("0-4", 0, 4),
    ("5-11", 5, 11),
    ("12-17", 12, 17),
    ("18-39", 18, 39),
    ("40-64", 40, 64),
    ("65-79", 65, 79),
    ("80+", 80, 200),
)
SEXES = ("female", "male", "unknown")


def person_columns(age_min: int = 0, age_max: int = 200) -> tuple[ColumnSpec, ...]:
    """Columns shared by the persons view and every cohort view (one row per person)."""
    bands = tuple(b for b, lo, hi in AGE_BANDS if hi >= age_min and lo <= age_max)
    return (
        ColumnSpec("person_id", ColumnType.IDENTIFIER, "OMOP person_id; never released"),
        ColumnSpec("sex", ColumnType.CATEGORY, "from gender_concept_id 8532/8507", SEXES),
        ColumnSpec("age_band", ColumnType.CATEGORY, "age at the reference date", bands),
        ColumnSpec("deceased", ColumnType.CATEGORY, "has a death record", ("no", "yes")),
    )


def build_catalog(pathways: Sequence[Pathway]) -> Catalog:
    """The node's public catalog: persons plus one cohort view per served pathway."""
    views = [
        ViewSpec(
            name="persons",
            description="Every person in the node's OMOP CDM after consent filtering",
            columns=person_columns(),
        )
    ]
    for p in pathways:
        views.append(
            ViewSpec(
                name=p.name,
                description=f"{p.title}: {p.description}",
                columns=person_columns(p.age_min, p.age_max),
            )
        )
    return Catalog(views=tuple(views))
