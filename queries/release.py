"""Disclosure rules on what analysts see: small-cell suppression and rounding.

NHS and OpenSAFELY practice (DOMAIN.md section 2): counts 0-7 are suppressed and the rest
rounded to the nearest 5 in published tables; figures derived from a suppressed cell are
suppressed too. These rules apply to DP releases, so they cost no budget (suppression is
decided on the noisy value, never the exact one, which would leak).
"""

from __future__ import annotations

import math

import pyarrow as pa

from queries.combine import COUNT_LIKE
from queries.results import ReleaseRules
from queries.spec import Statistic

NO_RULES = ReleaseRules(suppress_below=0, round_to=1)


def _round(x: float, base: int, how: str = "nearest") -> float:
    if base <= 1:
        return x
    if how == "down":
        return math.floor(x / base) * base
    if how == "up":
        return math.ceil(x / base) * base
    return math.floor(x / base + 0.5) * base


def apply(table: pa.Table, rules: ReleaseRules, group_by: tuple[str, ...]) -> pa.Table:
    """Suppress small cells and everything derived from them; round the counts shown."""
    rows = table.to_pylist()
    suppressed_cells: set[tuple[object, ...]] = set()
    for r in rows:
        cell = (r["region"], *(r[c] for c in group_by))
        stat = Statistic(r["statistic"])
        small = False
        if stat in COUNT_LIKE and stat is not Statistic.HISTOGRAM:
            small = r["estimate"] is not None and r["estimate"] < rules.suppress_below
        if stat not in COUNT_LIKE and r["n"] is not None:
            small = r["n"] < rules.suppress_below
        if r["estimate"] is None:
            small = True
        if small:
            r["suppressed"] = True
            if stat is not Statistic.HISTOGRAM:
                suppressed_cells.add(cell)
        elif stat is Statistic.HISTOGRAM and r["estimate"] < rules.suppress_below:
            r["suppressed"] = True
    for r in rows:
        cell = (r["region"], *(r[c] for c in group_by))
        if cell in suppressed_cells:
            r["suppressed"] = True
        if r["suppressed"]:
            for k in ("estimate", "std_error", "ci_low", "ci_high", "n"):
                r[k] = None
            continue
        if r["n"] is not None:
            r["n"] = _round(r["n"], rules.round_to)
        if Statistic(r["statistic"]) in COUNT_LIKE:
            r["estimate"] = _round(r["estimate"], rules.round_to)
            # Widen the interval outwards so rounding never reduces its coverage.
            r["ci_low"] = max(0.0, _round(r["ci_low"], rules.round_to, "down"))
            r["ci_high"] = _round(r["ci_high"], rules.round_to, "up")
    return pa.Table.from_pylist(rows, schema=table.schema)
