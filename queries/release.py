"""Disclosure rules on what analysts see: small-cell suppression and rounding.

NHS and OpenSAFELY practice (docs/statistics.md, "Disclosure rules"): counts 0-7 are
suppressed and the rest rounded to the nearest 5 in published tables; figures derived from a
suppressed cell are suppressed too. These rules apply to DP releases, so they cost no budget
(suppression is decided on the noisy value, never the exact one, which would leak).

Primary suppression. A (region, group) cell is suppressed as a whole, every measure of it,
when one of its counts or the noisy number of rows behind one of its derived figures (`n`)
is below `suppress_below`, or when a figure is undefined; its histogram bins go with it.
Otherwise histogram bins are suppressed bin by bin: a small bin hides that bin only.

Complementary (secondary) suppression. The pooled row is the sum of the regions' rows, exactly,
for the noisy counts and sums and for the sums and rows behind pooled means, variances and
ratios. So with one region cell suppressed, the pooled cell minus the other regions would give
it back. Every such exact relation (members adding up to a published total) is protected:

- one group: its pooled cell is the total of the region cells with the same group values (a
  query without `group_by` has one group); cells are suppressed whole;
- one (group, histogram measure, bin): the pooled bin is the total of the regions' bins;
- one histogram in a cell that also has a quantile: the planner may release one bins component
  for both, so the quantile's n is the sum of the bins and the cell is their total. The table
  does not say which grid a quantile used, so this is assumed whenever a cell has both.

In each relation, if exactly one member is suppressed, or the suppressed members' noisy total
is below `suppress_below`, further members are suppressed, smallest noisy count first, until at
least two are and their noisy total reaches `suppress_below`: the total minus the published
members then gives only their sum, itself not a small count. If that is impossible (too few
regions or bins), the total is suppressed instead (the pooled cell or bin; for a histogram's
bins, the whole cell). A suppressed total with all its members published is their sum, so it
takes its smallest member with it. As a bin belongs to two relations and suppressing a cell
hides its bins, the rules are applied again until nothing changes (suppression only grows).

A cell's noisy count, for ordering and totals, is the smallest of its counts and `n`s, so a
total that reaches `suppress_below` reaches it for every measure of the cells. Every decision
reads only noisy values, so all of this is post-processing and free of budget.

What it does not protect against:

- differencing across results: the same query without a group, or with a wider filter, gives
  the margin that a grouped result hides. Such margins are separate DP releases with their own
  noise, so the difference is a noisy estimate, never the suppressed value; differential
  privacy and the budget bound what it reveals, not these rules;
- approximate relations within a result: a cell's histogram bins add up to about its count,
  but bins and counts are noised independently, so nothing is recovered exactly;
- what suppression itself says (a suppressed cell's noisy count was small, or one of a
  relation's smallest), the sum it leaves (a relation's hidden members add up to its total
  minus the rest, which bounds each of them), and the ranges left by rounding;
- a hub that does not apply the rules: nodes apply their own rules to their own releases.

Within one result there are no other exact relations: no margins over groups are published
(neither per region nor pooled), and components are shared only within a cell.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from queries.combine import COUNT_LIKE, POOLED
from queries.results import ReleaseRules
from queries.spec import Statistic

NO_RULES = ReleaseRules(suppress_below=0, round_to=1)

Row = dict[str, Any]
K = TypeVar("K", bound=Hashable)


def _round(x: float, base: int, how: str = "nearest") -> float:
    if base <= 1:
        return x
    if how == "down":
        return math.floor(x / base) * base
    if how == "up":
        return math.ceil(x / base) * base
    return math.floor(x / base + 0.5) * base


def _is_histogram(r: Row) -> bool:
    return Statistic(r["statistic"]) is Statistic.HISTOGRAM


def _small(r: Row, threshold: int) -> bool:
    """Whether a row is below the threshold on its own (primary suppression).

    A row already suppressed upstream (a figure withheld by a node, say) counts as small.
    """
    if r["suppressed"] or r["estimate"] is None:
        return True
    if Statistic(r["statistic"]) in COUNT_LIKE:
        return bool(r["estimate"] < threshold)
    return r["n"] is not None and bool(r["n"] < threshold)


def _cell_size(rows: Sequence[Row]) -> float | None:
    """A cell's noisy count: the smallest of its counts and `n`s (None if it has none)."""
    figures: list[float] = []
    for r in rows:
        if _is_histogram(r):
            continue
        if Statistic(r["statistic"]) in COUNT_LIKE and r["estimate"] is not None:
            figures.append(r["estimate"])
        if r["n"] is not None:
            figures.append(r["n"])
    return min(figures) if figures else None


def complement(
    members: Sequence[K],
    total: K | None,
    sizes: Mapping[K, float | None],
    suppressed: set[K],
    threshold: int,
) -> list[K]:
    """What to suppress in one relation (total = sum of members) so no hidden one is derived."""
    if total is None:
        return []  # nothing publishes the relation's total
    hidden = [k for k in members if k in suppressed]
    # Smallest noisy count first; members without a count come last, as they add nothing
    # known to the total. The key's text breaks ties, so the choice ignores row order.
    candidates = sorted(
        (k for k in members if k not in suppressed),
        key=lambda k: (sizes.get(k) is None, sizes.get(k) or 0.0, str(k)),
    )
    if total in suppressed:
        # A hidden total with every member shown would be their sum.
        return [] if hidden or not candidates else candidates[:1]
    if not hidden:
        return []

    def enough(chosen: Sequence[K]) -> bool:
        return len(chosen) >= 2 and sum(sizes.get(k) or 0.0 for k in chosen) >= threshold

    chosen = list(hidden)
    for k in candidates:
        if enough(chosen):
            break
        chosen.append(k)
    return chosen[len(hidden) :] if enough(chosen) else [total]


Key = tuple[Any, ...]


class _Units:
    """What is suppressed as one piece: whole cells, or single histogram bins."""

    def __init__(self, rows: Sequence[Row], group_by: tuple[str, ...]) -> None:
        self.rows: dict[Key, list[Row]] = {}
        self.bins: dict[Key, list[Key]] = {}  # a cell's bins, hidden with it
        self.sizes: dict[Key, float | None] = {}
        for r in rows:
            cell = ("cell", r["region"], *(r[c] for c in group_by))
            self.rows.setdefault(cell, []).append(r)
            self.bins.setdefault(cell, [])
            if _is_histogram(r):
                key = ("bin", *cell[1:], r["measure"], r["bin_lower"], r["bin_upper"])
                self.rows[key] = [r]
                self.bins[cell].append(key)
                self.sizes[key] = r["estimate"]
        for cell in self.bins:
            self.sizes[cell] = _cell_size(self.rows[cell])
        self.suppressed: set[Key] = set()

    def hide(self, key: Key) -> None:
        """Suppress a unit (a cell with its bins)."""
        self.suppressed.add(key)
        self.suppressed.update(self.bins.get(key, ()))

    def relations(self) -> list[tuple[list[Key], Key | None]]:
        """Every exact additive relation among the units, as (members, their total)."""
        regions: dict[Key, list[Key]] = {}
        pooled: dict[Key, Key] = {}
        for key in self.rows:
            kind, region, rest = key[0], key[1], key[2:]
            if region == POOLED:
                pooled[(kind, *rest)] = key
            else:
                regions.setdefault((kind, *rest), []).append(key)
        # Pooled = sum of regions, per group (cells) and per group and bin (histograms).
        found = [(members, pooled.get(k)) for k, members in regions.items()]
        # A quantile and a histogram over the same grid may share one noisy bins component,
        # so the quantile's n is the sum of the bins. The table does not say which grid a
        # quantile used, so every histogram in a cell with a quantile is taken to add up to it.
        for cell, bins in self.bins.items():
            if bins and any(r["statistic"] == Statistic.QUANTILE.value for r in self.rows[cell]):
                measures: dict[object, list[Key]] = {}
                for key in bins:
                    measures.setdefault(key[-3], []).append(key)
                found += [(members, cell) for members in measures.values()]
        return found


def _suppress(rows: Sequence[Row], threshold: int, group_by: tuple[str, ...]) -> None:
    """Primary suppression, then complementary suppression over every relation."""
    units = _Units(rows, group_by)
    for key, unit_rows in units.rows.items():
        if key[0] == "cell":
            if any(_small(r, threshold) for r in unit_rows if not _is_histogram(r)):
                units.hide(key)
        elif _small(unit_rows[0], threshold):
            units.hide(key)
    # With no threshold nothing is a small count, so there is nothing to protect.
    if threshold > 0:
        relations = units.relations()
        # Relations overlap (a bin is in its cell's and its bin's), so repeat until stable;
        # suppression only grows, so this ends.
        changed = True
        while changed:
            changed = False
            for members, total in relations:
                for key in complement(members, total, units.sizes, units.suppressed, threshold):
                    units.hide(key)
                    changed = True
    for key in units.suppressed:
        for r in units.rows[key]:
            r["suppressed"] = True


def apply(table: pa.Table, rules: ReleaseRules, group_by: tuple[str, ...]) -> pa.Table:
    """Suppress small cells, then complementary cells so none can be derived; round counts."""
    rows: list[Row] = table.to_pylist()
    _suppress(rows, rules.suppress_below, group_by)
    for r in rows:
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
