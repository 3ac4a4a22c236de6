"""Public metadata about what a node can be asked: views, columns, public domains.

Nothing here may be derived from patient data: domains and bounds are declared, so that
publishing them (Describe) leaks nothing.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass
from datetime import date

from queries.errors import QueryError

# Public upper bound on the persons in any view (the UK has about 69 million people). The
# engine refuses, at plan time, any query whose exact integers could overflow 64 bits under
# this bound, and a node refuses to start on data with more persons than its views declare.
MAX_PERSONS = 100_000_000


class ColumnType(enum.StrEnum):
    """How a column may be used in a query."""

    CATEGORY = "category"  # public domain; may be grouped and filtered on
    INTEGER = "integer"
    FLOAT = "float"
    IDENTIFIER = "identifier"  # never in an output


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a view and its public metadata."""

    name: str
    type: ColumnType
    description: str = ""
    domain: tuple[str, ...] = ()
    # True if the value is the same on every row of a person (sex, age band at a date).
    person_level: bool = True
    # Public clamping bounds of a numeric column; declared, never derived from the data.
    lower: float | None = None
    upper: float | None = None

    def __post_init__(self) -> None:
        if self.type is ColumnType.CATEGORY and not self.domain:
            raise ValueError(f"category column {self.name!r} needs a public domain")
        if (self.lower is None) != (self.upper is None):
            raise ValueError(f"numeric column {self.name!r} needs both bounds or neither")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"numeric column {self.name!r} has lower > upper")

    @property
    def bounded(self) -> bool:
        """True if the column has public bounds (so sums and means may use it)."""
        return self.lower is not None and self.upper is not None


@dataclass(frozen=True)
class ViewSpec:
    """A view analysts can query, with its per-person contribution bound."""

    name: str
    description: str
    columns: tuple[ColumnSpec, ...]
    max_rows_per_person: int = 1
    # Public bound on distinct persons in the view; with max_rows_per_person it bounds every
    # exact aggregate, which is what lets overflow be ruled out before any data is read.
    max_persons: int = MAX_PERSONS
    # The table column holding each row's place (1, 2, ...) in its person's fixed keep order,
    # or None. An analyst's lower cap (Query.rows_per_person = N) keeps, of each person's rows
    # that pass the query's filters, the N placed first. It is not among `columns`: no query
    # may group by, filter on or measure it (docs/statistics.md, "Analyst-chosen caps").
    rank_column: str | None = None

    def __post_init__(self) -> None:
        if self.rank_column is not None and any(c.name == self.rank_column for c in self.columns):
            raise ValueError(
                f"view {self.name!r}: rank column {self.rank_column!r} must not be an "
                "analysable column"
            )

    @property
    def max_rows(self) -> int:
        """Public upper bound on the rows of the view."""
        return self.max_persons * self.max_rows_per_person

    def column(self, name: str) -> ColumnSpec:
        """The named column, or a QueryError suggesting the closest names."""
        for col in self.columns:
            if col.name == name:
                return col
        raise QueryError(
            f"view {self.name!r} has no column {name!r}"
            + _suggest(name, [c.name for c in self.columns])
        )


@dataclass(frozen=True)
class Catalog:
    """Every view a node serves, by name."""

    views: tuple[ViewSpec, ...]
    # The day the views' windows end (ages, the ten-year windows, the visit years): public,
    # so analysts know what period an answer covers. None when a peer did not say.
    reference_date: date | None = None

    def view(self, name: str) -> ViewSpec:
        """The named view, or a QueryError suggesting the closest names."""
        for view in self.views:
            if view.name == name:
                return view
        raise QueryError(f"unknown view {name!r}" + _suggest(name, [v.name for v in self.views]))


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; available: {', '.join(sorted(candidates))}"
