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

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from queries.combine import COUNT_LIKE, POOLED
from queries.results import ReleaseRules
from queries.spec import Statistic

NO_RULES = ReleaseRules(suppress_below=0, round_to=1)

# How the rules are computed. A hub may pool a thousand nodes (a hundred thousand rows), so
# nothing loops over rows in Python: cells and bins get integer ids, primary suppression and
# rounding are numpy masks, and the complementary rules, which must run in order, loop over
# relations but look again only at those whose members changed. Every choice is the one the
# rules above make, tie for tie (tests/unit/test_pooling_fast.py checks it against the
# row-by-row version they replaced).

_FIGURES = ("estimate", "std_error", "ci_low", "ci_high", "n")


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Integer codes of a column's values, and the value of each code.

    Null is a value of its own, and values that Python holds equal (0.0 and -0.0) share a
    code, so codes are equal exactly when the rows' values are equal as Python objects.
    """
    encoded = pc.dictionary_encode(column.combine_chunks(), null_encoding="encode")
    values = encoded.dictionary.to_pylist()
    first: dict[Any, int] = {}
    remap = np.asarray([first.setdefault(v, i) for i, v in enumerate(values)], dtype=np.int64)
    indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return remap[indices], values


def _first_seen(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 0.. of the codes in order of first appearance, per row, and each id's first row."""
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)], first[order]


def _ids(parts: Sequence[np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the rows' tuples of codes in order of first appearance, and each id's first row."""
    code = np.zeros(rows, dtype=np.int64)
    for part in parts:
        size = int(part.max()) + 1 if part.size else 1
        top = int(code.max()) + 1 if code.size else 1
        if top * size >= 2**62:  # renumber densely before the product could overflow
            code = np.unique(code, return_inverse=True)[1].reshape(-1).astype(np.int64)
            top = int(code.max()) + 1
        code = code * size + part
    return _first_seen(code)


def _floats(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A float column's values (NaN for nulls) and where it is not null."""
    column = table.column(name).combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return column.to_numpy(zero_copy_only=False).astype(np.float64), valid


@dataclass(frozen=True)
class _Rows:
    """The columns the rules read, as numpy arrays (one entry per row)."""

    estimate: np.ndarray
    has_estimate: np.ndarray
    n: np.ndarray
    has_n: np.ndarray
    flagged: np.ndarray  # suppressed upstream (a null flag is not set)
    count_like: np.ndarray
    histogram: np.ndarray
    quantile: np.ndarray

    @classmethod
    def read(cls, table: pa.Table) -> _Rows:
        """The rows of a long result table."""
        codes, names = _codes(table.column("statistic"))
        stats = [Statistic(s) for s in names]  # an unknown statistic fails as it always did

        def flag(pick: frozenset[Statistic]) -> np.ndarray:
            per_code = np.asarray([s in pick for s in stats], dtype=bool)
            return np.asarray(per_code[codes])

        estimate, has_estimate = _floats(table, "estimate")
        n, has_n = _floats(table, "n")
        flagged = pc.fill_null(table.column("suppressed"), False).combine_chunks()
        return cls(
            estimate=estimate,
            has_estimate=has_estimate,
            n=n,
            has_n=has_n,
            flagged=flagged.to_numpy(zero_copy_only=False).astype(bool),
            count_like=flag(COUNT_LIKE),
            histogram=flag(frozenset({Statistic.HISTOGRAM})),
            quantile=flag(frozenset({Statistic.QUANTILE})),
        )

    def small(self, threshold: int) -> np.ndarray:
        """Rows below the threshold on their own (primary suppression).

        A row already suppressed upstream (a figure withheld by a node, say) counts as small.
        """
        with np.errstate(invalid="ignore"):
            own = np.where(
                self.count_like, self.estimate < threshold, self.has_n & (self.n < threshold)
            )
        return np.asarray(self.flagged | ~self.has_estimate | own, dtype=bool)


def _text_rank(texts: Sequence[str]) -> np.ndarray:
    """Each text's rank in sorted order."""
    order = sorted(range(len(texts)), key=texts.__getitem__)
    rank = np.empty(len(texts), dtype=np.int64)
    rank[order] = np.arange(len(texts))
    return rank


def _grouped(key: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items grouped by key: groups in order of their first position, items in position order
    within a group; and where each group starts (one entry more than there are groups)."""
    by_position = np.argsort(position, kind="stable")
    group, _ = _first_seen(key[by_position])
    order = by_position[np.argsort(group, kind="stable")]
    sizes = np.bincount(group, minlength=int(group.max()) + 1 if group.size else 0)
    return order, np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)


@dataclass(frozen=True)
class _Relations:
    """Every exact additive relation with a published total, in the order the rules take them.

    Units are cells (ids 0..cells-1) and histogram bins (ids cells..). Relation r's members
    are `members[start[r]:start[r + 1]]` in the order the rules list them (as they appear),
    the same members in `by_size` in the order candidates are taken, and `total[r]` is its
    total. A unit is a member or the total of at most one region relation (`of_unit`), a bin
    a member of at most one quantile cell's relation (`of_bin`), and a cell the total of its
    quantile relations `of_cell[c, 0]` to `of_cell[c, 1]` (exclusive).
    """

    cells: int
    members: np.ndarray
    by_size: np.ndarray
    start: np.ndarray
    total: np.ndarray
    size: np.ndarray  # a unit's noisy count, 0.0 where it has none (it adds nothing known)
    of_unit: np.ndarray
    of_bin: np.ndarray
    of_cell: np.ndarray
    bins: np.ndarray  # bins (unit ids) by cell: a cell's bins are hidden with it
    bins_start: np.ndarray

    def complement(self, r: int, hidden: np.ndarray, threshold: int) -> np.ndarray:
        """What to suppress in relation r so that no hidden member can be derived."""
        members = self.members[self.start[r] : self.start[r + 1]]
        shown = self.by_size[self.start[r] : self.start[r + 1]]
        gone: np.ndarray = members[hidden[members]]
        candidates: np.ndarray = shown[~hidden[shown]]
        total: np.ndarray = self.total[r : r + 1]
        if hidden[total[0]]:
            # A hidden total with every member shown would be their sum.
            return candidates[:1] if gone.size == 0 else candidates[:0]
        if gone.size == 0:
            return candidates[:0]
        # Take members smallest first until at least two are hidden and their noisy total
        # reaches the threshold; np.cumsum adds in sequence, so totals are the same floats.
        running = np.cumsum(self.size[np.concatenate((gone, candidates))])
        enough = running >= threshold
        enough[: max(2, gone.size) - 1] = False
        if not enough.any():
            return total  # too few members to hide: the total goes instead
        return candidates[: int(np.argmax(enough)) + 1 - gone.size]

    def hide(self, units: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """Suppress units (a cell with its bins); returns those that were not hidden before."""
        parts = [units]
        for c in units[units < self.cells].tolist():
            parts.append(self.bins[self.bins_start[c] : self.bins_start[c + 1]])
        every = np.unique(np.concatenate(parts))
        new: np.ndarray = every[~hidden[every]]
        hidden[new] = True
        return new

    def touching(self, units: np.ndarray) -> list[int]:
        """The relations with any of these units as a member or total, in order."""
        found = [self.of_unit[units], self.of_bin[units]]
        for c in units[units < self.cells].tolist():
            found.append(np.arange(self.of_cell[c, 0], self.of_cell[c, 1]))
        out = np.unique(np.concatenate(found))
        listed: list[int] = out[out >= 0].tolist()
        return listed


def _complementary(relations: _Relations, hidden: np.ndarray, threshold: int) -> None:
    """Apply every relation's complement until nothing changes (suppression only grows).

    The rules go through all relations in order, again and again until a pass changes
    nothing. A relation whose members and total are as they were when it was last looked
    at would suppress nothing, so only relations that have a newly hidden unit are looked at
    again: later in the same pass if they come after the one that hid it, else in the next.
    The first pass looks only at relations with a hidden member or total; any other has
    nothing to protect until one of its units is hidden.
    """
    count = relations.total.size
    if count == 0:
        return
    any_hidden = np.logical_or.reduceat(hidden[relations.members], relations.start[:-1])
    todo: list[int] = np.flatnonzero(any_hidden | hidden[relations.total]).tolist()
    queued = np.zeros(count, dtype=bool)  # in this pass's heap
    queued[todo] = True
    later = np.zeros(count, dtype=bool)  # waiting for the next pass
    while todo:
        heap = todo  # sorted, so already a heap
        following: list[int] = []
        while heap:
            r = heapq.heappop(heap)
            queued[r] = False
            chosen = relations.complement(r, hidden, threshold)
            if chosen.size == 0:
                continue
            for t in relations.touching(relations.hide(chosen, hidden)):
                if t > r and not queued[t]:
                    queued[t] = True
                    heapq.heappush(heap, t)
                elif t <= r and not later[t]:
                    later[t] = True
                    following.append(t)
        following.sort()
        later[following] = False
        queued[following] = True
        todo = following


class _Units:
    """What is suppressed as one piece: whole cells, or single histogram bins.

    Cells are (region, group) ids in order of first appearance; bins are the histogram rows,
    one per (cell, measure, bin), numbered after the cells.
    """

    def __init__(self, table: pa.Table, rows: _Rows, group_by: tuple[str, ...]) -> None:
        count = table.num_rows
        self.rows = rows
        region, region_names = _codes(table.column("region"))
        groups = [_codes(table.column(c))[0] for c in group_by]
        self.cell, self.cell_row = _ids([region, *groups], count)
        self.cells = self.cell_row.size
        self.cell_region = region[self.cell_row]
        self.cell_group = _ids(groups, count)[0][self.cell_row]
        pooled = [i for i, v in enumerate(region_names) if v == POOLED]
        self.cell_pooled = np.isin(self.cell_region, pooled)
        # Ties between a relation's members are broken by the text of their keys. Members
        # of a region relation differ only in region, and a string's repr is never the start
        # of another's, so the order of their reprs decides.
        self.region_rank = _text_rank([repr(v) for v in region_names])
        self.bin_rows = np.flatnonzero(rows.histogram)
        self.bin_cell = self.cell[self.bin_rows]
        bins = self.bin_rows.size
        taken = pa.array(self.bin_rows)
        measure = _codes(table.column("measure").take(taken))[0]
        lower, lower_values = _codes(table.column("bin_lower").take(taken))
        upper, upper_values = _codes(table.column("bin_upper").take(taken))
        self.bin_measure = measure
        self.bin_edges, edges_row = _ids([lower, upper], bins)
        if _ids([self.bin_cell, measure, self.bin_edges], bins)[1].size != bins:
            raise ValueError(
                "release rules: the table has two rows for the same histogram bin of one region "
                "and group, so it is not a pooled result; build it with queries.combine.combine"
            )
        # Members of a quantile cell's relation differ only in their bin: the text of their
        # keys after the measure decides ties.
        self.edges_rank = _text_rank(
            [f"{lower_values[lower[i]]!r}, {upper_values[upper[i]]!r})" for i in edges_row]
        )

    def primary(self, threshold: int) -> np.ndarray:
        """Which units primary suppression hides (cells, then bins)."""
        small = self.rows.small(threshold)
        cells = np.zeros(self.cells, dtype=bool)
        cells[self.cell[small & ~self.rows.histogram]] = True
        bins = small[self.bin_rows] | cells[self.bin_cell]
        return np.concatenate((cells, bins))

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each unit's noisy count (0.0 where it has none) and whether it has one.

        A cell's is the smallest of its counts and `n`s, so a total that reaches the threshold
        reaches it for every measure of the cells; a bin's is its estimate.
        """
        r = self.rows
        plain = ~r.histogram
        from_estimate = plain & r.count_like & r.has_estimate
        from_n = plain & r.has_n
        figure = np.minimum(
            np.where(from_estimate, r.estimate, np.inf), np.where(from_n, r.n, np.inf)
        )
        has = np.zeros(self.cells, dtype=bool)
        has[self.cell[from_estimate | from_n]] = True
        smallest = np.full(self.cells, np.inf)
        np.minimum.at(smallest, self.cell[plain], figure[plain])
        size = np.concatenate((smallest, r.estimate[self.bin_rows]))
        known = np.concatenate((has, r.has_estimate[self.bin_rows]))
        return np.where(known, size + 0.0, 0.0), known

    def relations(self) -> _Relations:
        """Every relation with a published total, in the order the rules go through them."""
        cells, bins, rows = self.cells, self.bin_rows.size, self.rows.estimate.size
        units = cells + bins
        size, known = self.sizes()
        # Pooled = sum of regions, per group (cells) and per group and bin (histograms): a
        # relation's key is its units' keys without the region. Relations are in order of
        # their first unit, units in the order they appear (a cell before its first row's bin).
        groups = int(self.cell_group.max()) + 1 if cells else 0
        rest = _ids([self.cell_group[self.bin_cell], self.bin_measure, self.bin_edges], bins)[0]
        key = np.concatenate((self.cell_group, groups + rest))
        position = np.concatenate((2 * self.cell_row, 2 * self.bin_rows + 1))
        pooled = np.concatenate((self.cell_pooled, self.cell_pooled[self.bin_cell]))
        total_of_key = np.full(int(key.max()) + 1 if units else 0, -1, dtype=np.int64)
        total_of_key[key[pooled]] = np.flatnonzero(pooled)
        # Regions whose pooled unit is not in the table have no published total.
        items = np.flatnonzero(~pooled & (total_of_key[key] >= 0))
        order, start_a = _grouped(key[items], position[items])
        members_a = items[order]
        total_a = total_of_key[key[members_a[start_a[:-1]]]]
        # A quantile and a histogram over the same grid may share one noisy bins component,
        # so the quantile's n is the sum of the bins. The table does not say which grid a
        # quantile used, so every histogram in a cell with a quantile is taken to add up to it.
        # Cells in order of appearance (their ids), then measures in order of appearance.
        with_quantile = np.zeros(cells, dtype=bool)
        with_quantile[self.cell[self.rows.quantile]] = True
        items = np.flatnonzero(with_quantile[self.bin_cell])
        cell_of = self.bin_cell[items]
        measure_key = _ids([cell_of, self.bin_measure[items]], items.size)[0]
        order, start_b = _grouped(measure_key, cell_of * (rows + 1) + self.bin_rows[items])
        members_b = cells + items[order]
        total_b = self.bin_cell[members_b[start_b[:-1]] - cells]
        members = np.concatenate((members_a, members_b))
        start = np.concatenate((start_a, start_a[-1] + start_b[1:]))
        total = np.concatenate((total_a, total_b))
        count = total.size
        relation = np.repeat(np.arange(count), np.diff(start))
        # Candidates: smallest noisy count first; units without one last, as they add nothing
        # known to the total; the text of their keys breaks ties, so row order does not.
        tie = np.concatenate(
            (
                self.region_rank[self.cell_region[self.cell_of(members_a)]],
                self.edges_rank[self.bin_edges[members_b - cells]],
            )
        )
        by_size = members[np.lexsort((tie, size[members], ~known[members], relation))]
        of_unit = np.full(units, -1, dtype=np.int64)
        of_unit[members_a] = relation[: members_a.size]
        of_unit[total_a] = np.arange(total_a.size)
        of_bin = np.full(units, -1, dtype=np.int64)
        of_bin[members_b] = relation[members_a.size :]
        # A cell's quantile relations are consecutive (relations go cell by cell).
        of_cell = np.zeros((cells, 2), dtype=np.int64)
        of_cell[:, 0] = total_a.size + np.searchsorted(total_b, np.arange(cells), side="left")
        of_cell[:, 1] = total_a.size + np.searchsorted(total_b, np.arange(cells), side="right")
        by_cell = np.argsort(self.bin_cell, kind="stable")
        bins_start = np.concatenate(([0], np.cumsum(np.bincount(self.bin_cell, minlength=cells))))
        return _Relations(
            cells=cells,
            members=members,
            by_size=by_size,
            start=start,
            total=total,
            size=size,
            of_unit=of_unit,
            of_bin=of_bin,
            of_cell=of_cell,
            bins=cells + by_cell,
            bins_start=bins_start.astype(np.int64),
        )

    def cell_of(self, units: np.ndarray) -> np.ndarray:
        """The cell of each unit (a cell's own id)."""
        out = units.copy()
        binned = units >= self.cells
        out[binned] = self.bin_cell[units[binned] - self.cells]
        return out

    def suppress(self, threshold: int) -> np.ndarray:
        """Primary suppression, then complementary suppression; which rows are suppressed."""
        hidden = self.primary(threshold)
        # With no threshold nothing is a small count, so there is nothing to protect.
        if threshold > 0:
            _complementary(self.relations(), hidden, threshold)
        out = self.rows.flagged | hidden[self.cell]
        out[self.bin_rows] |= hidden[self.cells :]
        return np.asarray(out, dtype=bool)


def _rounded(x: np.ndarray, base: int, how: str = "nearest") -> np.ndarray:
    """Round to a multiple of base (as floats: the same values as rounding in integers)."""
    if base <= 1:
        return x
    if how == "down":
        out = np.floor(x / base) * base
    elif how == "up":
        out = np.ceil(x / base) * base
    else:
        out = np.floor(x / base + 0.5) * base
    return np.asarray(out + 0.0)  # -0.0 -> 0.0, as an integer 0 would give


def apply(table: pa.Table, rules: ReleaseRules, group_by: tuple[str, ...]) -> pa.Table:
    """Suppress small cells, then complementary cells so none can be derived; round counts."""
    if table.num_rows == 0:
        return table
    rows = _Rows.read(table)
    suppressed = _Units(table, rows, group_by).suppress(rules.suppress_below)
    shown = ~suppressed
    counts = shown & rows.count_like
    base = rules.round_to
    out = table
    for name in (*_FIGURES, "suppressed"):
        i = table.schema.get_field_index(name)
        field = table.schema.field(i)
        if name == "suppressed":
            flags = table.column(name).combine_chunks()
            keep_null = ~flags.is_valid().to_numpy(zero_copy_only=False) & shown
            out = out.set_column(i, field, pa.array(suppressed, pa.bool_(), mask=keep_null))
            continue
        values, valid = _floats(table, name)
        if name == "n":
            values = np.where(valid & shown, _rounded(values, base), values)
        elif name == "estimate":
            values = np.where(counts, _rounded(values, base), values)
        elif name == "ci_low":
            # Widen the interval outwards so rounding never reduces its coverage.
            low = _rounded(values, base, "down")
            values = np.where(counts, np.where(low > 0.0, low, 0.0), values)
        elif name == "ci_high":
            values = np.where(counts, _rounded(values, base, "up"), values)
        out = out.set_column(i, field, pa.array(values, field.type, mask=~(valid & shown)))
    return out
