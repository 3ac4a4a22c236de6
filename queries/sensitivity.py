"""Every L2 sensitivity chc uses, computed in one place from public contribution bounds.

The privacy unit is one person. A view declares `max_rows_per_person`
(c) and enforces it; numeric values are clamped to public bounds and summed as integers in
fixed-point units. Under adding or removing one person:
- a distinct-person count per group changes by at most 1 in each of the m groups the person
  touches, so L2 = sqrt(m), where m = 1 if every group column is constant per person, else
  min(c, number of groups);
- any row count (rows, rows with a value, histogram bins) changes by non-negative amounts
  summing to at most c, and sqrt(sum r_i^2) <= sum r_i, so L2 = c;
- a clamped fixed-point sum changes by at most c * M in total, M the largest absolute value a
  row can contribute in units, so L2 = c * M (same argument, per unit).
"""

from __future__ import annotations

import enum
import math

from queries.schema import ViewSpec


class Kind(enum.StrEnum):
    """What a released integer vector counts or sums."""

    PERSONS = "persons"  # distinct persons per group
    ROWS = "rows"  # rows per group (with a non-null value, where a column is given)
    SUM = "sum"  # clamped fixed-point sum per group
    SUMSQ = "sumsq"  # clamped fixed-point sum of squares per group
    BINS = "bins"  # rows per (group, bin)


# Kinds whose values count persons or rows: the ones disclosure rules round and suppress.
COUNT_KINDS = frozenset({Kind.PERSONS, Kind.ROWS, Kind.BINS})


def histogram_sensitivity(*, max_groups_per_person: int, max_rows_per_group: int = 1) -> float:
    """L2 sensitivity of a grouped count where one person adds c rows to each of m groups."""
    if max_groups_per_person < 1 or max_rows_per_group < 1:
        raise ValueError("contribution bounds must be at least 1")
    return max_rows_per_group * math.sqrt(max_groups_per_person)


def groups_per_person(view: ViewSpec, group_by: tuple[str, ...], n_groups: int) -> int:
    """How many output groups one person can fall into."""
    if all(view.column(c).person_level for c in group_by):
        return 1
    return max(1, min(view.max_rows_per_person, n_groups))


def sensitivity(
    kind: Kind,
    view: ViewSpec,
    group_by: tuple[str, ...],
    n_groups: int,
    *,
    max_abs_units: int = 1,
) -> float:
    """L2 sensitivity of one released vector under adding or removing one person."""
    c = view.max_rows_per_person
    if c < 1:
        raise ValueError(f"view {view.name!r} declares max_rows_per_person < 1")
    if kind is Kind.PERSONS:
        return histogram_sensitivity(
            max_groups_per_person=groups_per_person(view, group_by, n_groups)
        )
    if kind in {Kind.ROWS, Kind.BINS}:
        return float(c)
    if max_abs_units < 0:
        raise ValueError("max_abs_units must be non-negative")
    return float(c * max(1, max_abs_units))
