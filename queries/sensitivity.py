"""Every L2 sensitivity chc uses, computed in one place from public contribution bounds.

The privacy unit is one person. A view declares `max_rows_per_person` and enforces it; an
analyst may choose a lower cap (Query.rows_per_person), which the exact SQL enforces by keeping
at most that many of each person's rows (effective_cap; plan_sql.py). c below is the cap in
force, the query's if it set one, else the view's. Numeric values are clamped to public bounds
and summed as integers in fixed-point units. Under adding or removing one person:
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

from queries.errors import QueryError
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


def effective_cap(view: ViewSpec, rows_per_person: int | None) -> int:
    """The rows per person a query counts: its own cap, at most the view's (the custodian's)."""
    c = view.max_rows_per_person
    if c < 1:
        raise ValueError(f"view {view.name!r} declares max_rows_per_person < 1")
    if rows_per_person is None or rows_per_person == c:
        return c
    if rows_per_person > c:
        raise QueryError(
            f"rows_per_person {rows_per_person} is above the cap of view {view.name!r}, which "
            f"keeps at most {c} row(s) per person: the custodian's cap is the maximum; ask for "
            f"1 to {c}, or leave rows_per_person out for {c}"
        )
    if view.rank_column is None:
        raise QueryError(
            f"view {view.name!r} declares no order in which to keep fewer of a person's rows, "
            f"so rows_per_person must be {c} (its own cap) or left out, got {rows_per_person}"
        )
    return rows_per_person


def groups_per_person(
    view: ViewSpec, group_by: tuple[str, ...], n_groups: int, cap: int | None = None
) -> int:
    """How many output groups one person can fall into, with at most `cap` rows each."""
    if all(view.column(c).person_level for c in group_by):
        return 1
    return max(1, min(view.max_rows_per_person if cap is None else cap, n_groups))


def sensitivity(
    kind: Kind,
    view: ViewSpec,
    group_by: tuple[str, ...],
    n_groups: int,
    *,
    max_abs_units: int = 1,
    cap: int | None = None,
) -> float:
    """L2 sensitivity of one released vector under adding or removing one person.

    `cap` is the rows per person the query counts (effective_cap), the view's if None.
    """
    c = view.max_rows_per_person if cap is None else cap
    if c < 1 or c > view.max_rows_per_person:
        raise ValueError(f"view {view.name!r}: a cap of {c} rows per person is out of range")
    if kind is Kind.PERSONS:
        return histogram_sensitivity(
            max_groups_per_person=groups_per_person(view, group_by, n_groups, c)
        )
    if kind in {Kind.ROWS, Kind.BINS}:
        return float(c)
    if max_abs_units < 0:
        raise ValueError("max_abs_units must be non-negative")
    return float(c * max(1, max_abs_units))


# ---- model fits (queries/model.py, queries/model_plan.py) ---------------------------------
#
# A fit's rows have design entries x_j in [0, 1], of which at most q are not 0 (the
# intercept, one level per category covariate, each numeric covariate and this node's region
# indicator). One row adds to each released vector a vector v with every |v_j| <= B, the
# vector's entry bound, and at most k entries not 0; so ||v||_2 <= sqrt(k) * B. Rounded to
# units row by row, |round(v_j / u)| <= round(B / u) (rounding is monotone), so in units
# ||v||_2 <= sqrt(k) * round(B / u). A person adds at most c rows, so by the triangle
# inequality the L2 sensitivity is c * sqrt(k) * round(B / u). Per vector, k is:
# - counts (n, then one count per non-reference level): 1 + the category covariates, as a
#   row falls in at most one level of each;
# - outcome_sum, yty, n: 1;
# - unit_outcome and unit_residual (a compare_by model's y and y - mu summed per level of the
#   compared column): 1, as a row is at one level only;
# - loss (a gradient fit's training loss, each row's capped) and score_hist (held-out rows
#   counted by outcome and score bin): 1, one entry per row;
# - gradient sum_i x_i (y_i - mu_i) and X'y: q;
# - Hessian sum_i w_i x_i x_i' and X'X, upper triangle: the pairs j <= k of the q entries
#   that are not 0, q (q + 1) / 2.
# The entry bounds B (|y - mu|, w, |y|, y^2) come from the outcome's public clamp: see
# queries/model_plan.py.

MODEL_VECTORS = frozenset(
    {
        "counts",
        "outcome_sum",
        "gradient",
        "hessian",
        "xtx",
        "xty",
        "yty",
        "n",
        "unit_outcome",
        "unit_residual",
        "loss",
        "score_hist",
    }
)


def model_row_factor(vector: str, *, nonzero: int, categories: int) -> float:
    """sqrt(k): a row's L2 contribution to a fit's vector in units of its entry bound."""
    if nonzero < 1 or categories < 0:
        raise ValueError("a design has at least the intercept")
    if vector == "counts":
        return math.sqrt(1 + categories)
    if vector in {"outcome_sum", "yty", "n", "unit_outcome", "unit_residual", "loss", "score_hist"}:
        return 1.0
    if vector in {"gradient", "xty"}:
        return math.sqrt(nonzero)
    if vector in {"hessian", "xtx"}:
        return math.sqrt(nonzero * (nonzero + 1) / 2)
    raise ValueError(f"unknown model vector {vector!r}; one of {sorted(MODEL_VECTORS)}")


def model_sensitivity(rows_per_person: int, row_factor: float, entry_units: int) -> float:
    """L2 sensitivity, in units, of a fit's vector: c * sqrt(k) * round(B / u) (above)."""
    if rows_per_person < 1 or entry_units < 0:
        raise ValueError("contribution bounds must be positive")
    # math.sqrt of a perfect square is exact, so a whole bound stays whole (OpenDP's
    # integer metric then applies, mechanisms._d_in).
    return float(rows_per_person * row_factor * max(1, entry_units))
