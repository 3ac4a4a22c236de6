"""Shared fixtures of the planner tests (queries.plan): a custom catalog and query builders.

VISITS is a row-level view (up to three rows per person) with quoted labels and bounded
numbers; WIDE has two category columns whose product is just over the cell limit.
"""

from __future__ import annotations

from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Measure, Query, Statistic

SETTINGS = ("inpatient", "outpatient", "emergency")
LABELS = ("it's", 'say "hi"', "plain", "a\\b")
MAX_COST = 5000

VISITS = ViewSpec(
    name="visits",
    description="one row per visit; up to three per person",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("sex", ColumnType.CATEGORY, domain=("female", "male")),
        ColumnSpec("setting", ColumnType.CATEGORY, domain=SETTINGS, person_level=False),
        ColumnSpec("label", ColumnType.CATEGORY, domain=LABELS, person_level=False),
        ColumnSpec("cost", ColumnType.INTEGER, lower=0, upper=MAX_COST, person_level=False),
        ColumnSpec("los", ColumnType.INTEGER, lower=0, upper=30, person_level=False),
        ColumnSpec("weight", ColumnType.FLOAT),
    ),
    max_rows_per_person=3,
)
WIDE = ViewSpec(
    name="wide",
    description="two columns with many public values",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("a", ColumnType.CATEGORY, domain=tuple(f"a{i}" for i in range(200))),
        ColumnSpec("b", ColumnType.CATEGORY, domain=tuple(f"b{i}" for i in range(101))),
    ),
)
CUSTOM = Catalog(views=(VISITS, WIDE))


def q(view: str = "persons", **kwargs: object) -> Query:
    return Query(view=view, rho=0.1, **kwargs)  # type: ignore[arg-type]


def counts(*names: str) -> tuple[Measure, ...]:
    return tuple(Measure(Statistic.COUNT, n) for n in names)
