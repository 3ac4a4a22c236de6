"""Today's pooling and release rules, kept as the reference the vectorised ones must equal.

A copy of queries/combine.py (`combine`) and queries/release.py (`apply`) as they were before
they were vectorised (issue 16), renamed `reference_combine` and `reference_apply`; only the
scalar estimators in queries/estimators.py, which are unchanged, are shared. Do not edit
the logic here: tests/unit/test_pooling_fast.py asserts the fast code gives the same tables.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from queries import estimators
from queries.components import role_keys
from queries.errors import ConfigError
from queries.estimators import Z95, Figure
from queries.results import RELEASE_COLUMNS, NodeRelease, ReleaseRules
from queries.sensitivity import COUNT_KINDS, Kind
from queries.spec import Measure, Query, Statistic

POOLED = "All regions"
COUNT_LIKE = frozenset({Statistic.COUNT, Statistic.COUNT_ROWS, Statistic.HISTOGRAM})
# Every release column but the values: what must be the same at every node to pool.
_STRUCTURE = tuple(c for c in RELEASE_COLUMNS if c != "value")


class CatalogMismatchError(ConfigError):
    """Nodes released different public structures, so their figures cannot be pooled."""


@dataclass
class _Vector:
    """A component's values for one group (one per bin), with its per-value noise variance."""

    values: np.ndarray
    variance: float
    lower: float | None  # clamp bounds of the component's column (None for counts)
    upper: float | None
    edges: np.ndarray  # bin edges (bins + 1) for histograms, empty otherwise


Components = dict[str, _Vector]


def _kind(key: str) -> str:
    return key.split(":", 1)[0]


def _variance(release: NodeRelease, key: str, z: float) -> float:
    """Noise variance of one value, widened where the node rounded it.

    A node rounds a count only when its noise is finer than the rounding
    (ReleaseRules.node_rounds). The rounding error is then at most round_to / 2 but not
    random (it depends on the count), so it is bounded rather than averaged: the standard
    deviation grows by round_to / (2 z), which widens a count's interval by exactly
    round_to / 2 on each side and keeps its coverage at least that of the noise alone.
    """
    var = release.variance(key)
    rules = release.rules
    if rules is not None and Kind(_kind(key)) in COUNT_KINDS and rules.node_rounds(math.sqrt(var)):
        var = (math.sqrt(var) + rules.round_to / (2 * z)) ** 2
    return var


@dataclass
class _Layout:
    """Where each (group, component) sits in the rows every node released."""

    groups: list[tuple[str, ...]]
    slices: dict[tuple[str, ...], dict[str, np.ndarray]]
    table: pa.Table  # the structure columns (no values)


def _layout(query: Query, table: pa.Table) -> _Layout:
    cols = [table.column(c).to_pylist() for c in query.group_by]
    comps = table.column("component").to_pylist()
    index: dict[tuple[str, ...], dict[str, list[int]]] = {}
    order: list[tuple[str, ...]] = []
    for i, comp in enumerate(comps):
        group = tuple(str(c[i]) for c in cols)
        if group not in index:
            index[group] = {}
            order.append(group)
        index[group].setdefault(comp, []).append(i)
    slices = {g: {k: np.asarray(v) for k, v in d.items()} for g, d in index.items()}
    return _Layout(order, slices, table.select([*query.group_by, *_STRUCTURE]))


def _check_same(query: Query, layout: _Layout, releases: Sequence[tuple[str, NodeRelease]]) -> None:
    first_region = releases[0][0]
    for region, release in releases[1:]:
        other = release.table.select([*query.group_by, *_STRUCTURE])
        if not other.equals(layout.table):
            raise CatalogMismatchError(
                f"nodes {first_region!r} and {region!r} answered with different public "
                "structures (groups, grids or clamp bounds), so their figures cannot be pooled; "
                "their catalogs differ: compare `chc nodes` for the two nodes and align their "
                "configuration (reference_date, pathways, chc version)"
            )


def _vectors(
    layout: _Layout, values: np.ndarray, release: NodeRelease, z: float
) -> dict[tuple[str, ...], Components]:
    lower = layout.table.column("lower").to_numpy(zero_copy_only=False)
    upper = layout.table.column("upper").to_numpy(zero_copy_only=False)
    bin_lo = layout.table.column("bin_lower").to_numpy(zero_copy_only=False)
    bin_hi = layout.table.column("bin_upper").to_numpy(zero_copy_only=False)
    out: dict[tuple[str, ...], Components] = {}
    for group, comps in layout.slices.items():
        out[group] = {}
        for key, rows in comps.items():
            first = rows[0]
            edges = np.empty(0)
            if _kind(key) == "bins":
                edges = np.concatenate((bin_lo[rows].astype(np.float64), [float(bin_hi[rows[-1]])]))
            out[group][key] = _Vector(
                values=values[rows],
                variance=_variance(release, key, z),
                lower=None if np.isnan(lower[first]) else float(lower[first]),
                upper=None if np.isnan(upper[first]) else float(upper[first]),
                edges=edges,
            )
    return out


def _sum_range(c: _Vector) -> tuple[float | None, float | None]:
    lo = 0.0 if c.lower is not None and c.lower >= 0 else None
    hi = 0.0 if c.upper is not None and c.upper <= 0 else None
    return lo, hi


def _row_range(c: _Vector) -> tuple[float, float]:
    """Bounds on one row's value: the clamp range, or exactly 1 for a row count."""
    if c.lower is None or c.upper is None:
        return 1.0, 1.0
    return c.lower, c.upper


def _ratio_range(num: _Vector, den: _Vector) -> tuple[float | None, float | None]:
    """Public bounds on sum(a)/sum(b) from each row's bounds (a weighted mean of a_i/b_i)."""
    la, ha = _row_range(num)
    lb, hb = _row_range(den)
    if num.lower is not None and den.lower is None:
        # sum(a) / COUNT(*): rows where a is NULL add 1 below and 0 above.
        la, ha = min(la, 0.0), max(ha, 0.0)
    if lb > 0:
        ends = [la / lb, la / hb, ha / lb, ha / hb]
        return min(ends), max(ends)
    if lb >= 0 and la >= 0:
        return 0.0, None
    return None, None


def figures(m: Measure, c: Components, z: float = Z95) -> list[Figure]:
    """The output figures of one measure from its components (one per bin for histograms)."""
    keys = role_keys(m)
    stat = m.statistic
    if stat in {Statistic.COUNT, Statistic.COUNT_ROWS, Statistic.SUM}:
        vec = c[keys["n" if "n" in keys else "s"]]
        lo, hi = _sum_range(vec) if stat is Statistic.SUM else (0.0, None)
        return [estimators.total(float(vec.values[0]), vec.variance, lo, hi, z)]
    if stat is Statistic.MEAN:
        n, s = c[keys["n"]], c[keys["s"]]
        return [
            estimators.ratio(
                float(s.values[0]), s.variance, float(n.values[0]), n.variance, s.lower, s.upper, z
            )
        ]
    if stat in {Statistic.VARIANCE, Statistic.STDDEV}:
        n, s, ss = c[keys["n"]], c[keys["s"]], c[keys["ss"]]
        return [
            estimators.variance(
                float(n.values[0]),
                n.variance,
                float(s.values[0]),
                s.variance,
                float(ss.values[0]),
                ss.variance,
                s.lower or 0.0,
                s.upper or 0.0,
                sd=stat is Statistic.STDDEV,
                z=z,
            )
        ]
    if stat is Statistic.QUANTILE:
        h = c[keys["h"]]
        # A grid of one bin per whole value ends one past the column's upper bound.
        discrete = h.upper is not None and float(h.edges[-1]) > h.upper
        quantile = m.quantile or 0.5
        return [
            estimators.quantile(h.values, h.variance, h.edges, quantile, discrete=discrete, z=z)
        ]
    if stat is Statistic.HISTOGRAM:
        h = c[keys["h"]]
        out = []
        for i, v in enumerate(h.values.tolist()):
            f = estimators.total(v, h.variance, 0.0, None, z)
            out.append(
                Figure(
                    f.estimate,
                    f.std_error,
                    f.ci_low,
                    f.ci_high,
                    bin_lower=float(h.edges[i]),
                    bin_upper=float(h.edges[i + 1]),
                )
            )
        return out
    num, den = c[keys["num"]], c[keys["den"]]
    lo, hi = _ratio_range(num, den)
    return [
        estimators.ratio(
            float(num.values[0]), num.variance, float(den.values[0]), den.variance, lo, hi, z
        )
    ]


def sample_size(m: Measure, c: Components) -> float | None:
    """The noisy number of rows behind a derived figure (None for plain counts and sums)."""
    keys = role_keys(m)
    if m.statistic in {Statistic.MEAN, Statistic.VARIANCE, Statistic.STDDEV}:
        return float(c[keys["n"]].values[0])
    if m.statistic is Statistic.QUANTILE:
        return float(c[keys["h"]].values.sum())
    if m.statistic is Statistic.RATIO:
        den = keys["den"]
        return float(c[den].values[0]) if _kind(den) == "rows" else None
    return None


OUTPUT_SCHEMA_TAIL = [
    ("measure", pa.string()),
    ("statistic", pa.string()),
    ("bin_lower", pa.float64()),
    ("bin_upper", pa.float64()),
    ("estimate", pa.float64()),
    ("std_error", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("n", pa.float64()),
    ("approximate", pa.bool_()),
    ("partial", pa.bool_()),
    ("suppressed", pa.bool_()),
]


def _values(release: NodeRelease) -> np.ndarray:
    # Null values are cells the node withheld under its disclosure rules.
    values: np.ndarray = release.table.column("value").to_numpy(zero_copy_only=False)
    return values.astype(np.float64)


def reference_combine(
    query: Query,
    releases: Sequence[tuple[str, NodeRelease]],
    *,
    partial: bool = False,
    z: float = Z95,
) -> pa.Table:
    """Long table of figures: each region's rows, then the pooled rows, per group and measure.

    Columns: region, group columns, measure, statistic, bin_lower, bin_upper, estimate,
    std_error, ci_low, ci_high, n (noisy rows behind a derived figure), approximate,
    partial (pooled rows when a node is missing or withheld the cell), suppressed (set by
    release rules, and for cells a node withheld).
    """
    rows: dict[str, list[object]] = {
        name: [] for name in ("region", *query.group_by, *(n for n, _ in OUTPUT_SCHEMA_TAIL))
    }
    schema = pa.schema(
        [("region", pa.string())] + [(c, pa.string()) for c in query.group_by] + OUTPUT_SCHEMA_TAIL
    )
    if not releases:
        return pa.table(rows, schema=schema)
    layout = _layout(query, releases[0][1].table)
    _check_same(query, layout, releases)
    per_region = [(region, _vectors(layout, _values(r), r, z)) for region, r in releases]

    def emit(region: str, group: tuple[str, ...], comps: Components, *, is_partial: bool) -> None:
        # A withheld cell keeps its rows (one per histogram bin too), so that the shape of an
        # answer never depends on the data.
        withheld = _withheld(comps)
        for m in query.measures:
            found = _blank(m, comps) if withheld else figures(m, comps, z)
            n = None if withheld else sample_size(m, comps)
            for f in found:
                rows["region"].append(region)
                for col, value in zip(query.group_by, group, strict=True):
                    rows[col].append(value)
                rows["measure"].append(m.name)
                rows["statistic"].append(m.statistic.value)
                rows["bin_lower"].append(f.bin_lower)
                rows["bin_upper"].append(f.bin_upper)
                rows["estimate"].append(f.estimate)
                rows["std_error"].append(f.std_error)
                rows["ci_low"].append(f.ci_low)
                rows["ci_high"].append(f.ci_high)
                rows["n"].append(n)
                rows["approximate"].append(f.approximate)
                rows["partial"].append(is_partial)
                rows["suppressed"].append(withheld)

    for region, vectors in per_region:
        for group in layout.groups:
            comps = vectors[group]
            emit(region, group, comps, is_partial=False)
    for group in layout.groups:
        pooled: Components = {}
        missing = False
        for _, vectors in per_region:
            comps = vectors[group]
            if _withheld(comps):
                missing = True  # this node withheld the cell: pool the others, flag partial
                continue
            for key, v in comps.items():
                if key not in pooled:
                    pooled[key] = _Vector(v.values.copy(), v.variance, v.lower, v.upper, v.edges)
                else:
                    pooled[key].values = pooled[key].values + v.values
                    pooled[key].variance += v.variance
        emit(POOLED, group, pooled or vectors[group], is_partial=partial or missing)
    return pa.table(rows, schema=schema)


def _blank(m: Measure, comps: Components) -> list[Figure]:
    """Empty figures of a withheld cell: one per bin for a histogram, else one."""
    if m.statistic is not Statistic.HISTOGRAM:
        return [estimators.NONE]
    edges = comps[role_keys(m)["h"]].edges
    return [
        Figure(None, None, None, None, bin_lower=float(lo), bin_upper=float(hi))
        for lo, hi in itertools.pairwise(edges.tolist())
    ]


def _withheld(comps: Components) -> bool:
    return any(bool(np.isnan(v.values).any()) for v in comps.values())


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


def reference_apply(table: pa.Table, rules: ReleaseRules, group_by: tuple[str, ...]) -> pa.Table:
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
