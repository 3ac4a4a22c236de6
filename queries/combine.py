"""Post-processing across nodes: per-region and pooled estimates with intervals.

Everything here is post-processing of DP releases, so it costs no budget. Nodes add
independent noise, so a pooled component's noise variance is the sum of the nodes'. Pooled
figures are computed from pooled components (sums of counts, sums, sums of squares and
histograms over the shared public grid), never by averaging regional estimates. The
estimators and what their intervals cover are in queries/estimators.py.

Pooling adds values position by position, which is only right if every node released the
same public structure (groups, components, grids, clamp bounds). That is checked first: nodes
whose catalogs differ are refused clearly rather than pooled wrongly.

A hub may pool hundreds of nodes, so nothing here loops over nodes or rows in Python: the
public layout is read once from the first release, every node's values are stacked into one
(nodes x rows) array, and each measure's figures are computed for every (region, group) cell
at once with the vectorised estimators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from queries import estimators
from queries.components import role_keys
from queries.errors import ConfigError
from queries.estimators import Z95, Figures
from queries.results import RELEASE_COLUMNS, NodeRelease
from queries.sensitivity import COUNT_KINDS, Kind
from queries.spec import Measure, Query, Statistic

__all__ = ["COUNT_LIKE", "OUTPUT_SCHEMA_TAIL", "POOLED", "Z95", "CatalogMismatchError", "combine"]

POOLED = "All regions"
COUNT_LIKE = frozenset({Statistic.COUNT, Statistic.COUNT_ROWS, Statistic.HISTOGRAM})
# Every release column but the values: what must be the same at every node to pool.
_STRUCTURE = tuple(c for c in RELEASE_COLUMNS if c != "value")


class CatalogMismatchError(ConfigError):
    """Nodes released different public structures, so their figures cannot be pooled."""


def _kind(key: str) -> str:
    return key.split(":", 1)[0]


def _variances(release: NodeRelease, keys: Sequence[str], z: float) -> list[float]:
    """Noise variance of each component's values, widened where the node rounded them.

    A node rounds a count only when its noise is finer than the rounding
    (ReleaseRules.node_rounds). The rounding error is then at most round_to / 2 but not
    random (it depends on the count), so it is bounded rather than averaged: the standard
    deviation grows by round_to / (2 z), which widens a count's interval by exactly
    round_to / 2 on each side and keeps its coverage at least that of the noise alone.
    """
    listed: dict[str, float] = {}
    for m in release.measures:
        listed.setdefault(m.measure, m.noise.variance)
    rules = release.rules
    out = []
    for key in keys:
        var = listed.get(key, release.noise.variance)
        if rules is not None and Kind(_kind(key)) in COUNT_KINDS:
            sd = math.sqrt(var)
            if rules.node_rounds(sd):
                var = (sd + rules.round_to / (2 * z)) ** 2
        out.append(var)
    return out


@dataclass(frozen=True)
class _Layout:
    """Where each (group, component) sits in the rows every node released."""

    groups: list[tuple[str, ...]]
    keys: list[str]  # component keys, in order of first appearance
    rows: dict[str, np.ndarray]  # key -> row numbers, one line per group (groups x width)
    structure: list[pa.ChunkedArray]  # the structure columns (no values), to compare
    lower: dict[str, np.ndarray]  # key -> clamp bound per group (NaN for none)
    upper: dict[str, np.ndarray]
    edges: dict[str, np.ndarray]  # bins key -> bin edges per group (groups x bins + 1)
    group_of_row: np.ndarray


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Integer codes of a string column's values (null read as the text 'None', like str())."""
    encoded = pc.dictionary_encode(pc.fill_null(column, "None")).combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(encoded.dictionary)


def _first_seen(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 0.. in order of first appearance, per row, and the first row of each id."""
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)], first[order]


def _layout(query: Query, table: pa.Table) -> _Layout:
    n = table.num_rows
    code = np.zeros(n, dtype=np.int64)
    for c in query.group_by:
        col, size = _codes(table.column(c))
        code = code * max(size, 1) + col
    gid, group_first = _first_seen(code)
    group_values = [
        [str(v) for v in table.column(c).take(pa.array(group_first)).to_pylist()]
        for c in query.group_by
    ]
    groups = [tuple(col[i] for col in group_values) for i in range(group_first.size)]
    comp_code, _ = _codes(table.column("component"))
    kid, key_first = _first_seen(comp_code)
    names = table.column("component").take(pa.array(key_first)).to_pylist()
    lower = table.column("lower").to_numpy()
    upper = table.column("upper").to_numpy()
    bin_lo = table.column("bin_lower").to_numpy().astype(np.float64)
    bin_hi = table.column("bin_upper").to_numpy().astype(np.float64)
    rows: dict[str, np.ndarray] = {}
    lows: dict[str, np.ndarray] = {}
    ups: dict[str, np.ndarray] = {}
    edges: dict[str, np.ndarray] = {}
    order = np.lexsort((np.arange(n), gid, kid))  # by component, then group, then row
    bounds = np.searchsorted(kid[order], np.arange(len(names) + 1))
    for k, key in enumerate(names):
        mine = order[bounds[k] : bounds[k + 1]]
        per_group = np.bincount(gid[mine], minlength=len(groups))
        if per_group.min() != per_group.max():
            raise CatalogMismatchError(
                f"the release has a different number of rows for component {key!r} in "
                "different groups, so it cannot be pooled; the node's chc version may differ "
                "from the hub's: upgrade them together"
            )
        grid = mine.reshape(len(groups), -1)
        rows[key] = grid
        lows[key] = lower[grid[:, 0]]
        ups[key] = upper[grid[:, 0]]
        if _kind(key) == "bins":
            edges[key] = np.concatenate((bin_lo[grid], bin_hi[grid[:, -1:]]), axis=1)
    return _Layout(
        groups=groups,
        keys=names,
        rows=rows,
        structure=[table.column(c) for c in (*query.group_by, *_STRUCTURE)],
        lower=lows,
        upper=ups,
        edges=edges,
        group_of_row=gid,
    )


def _check_same(query: Query, layout: _Layout, releases: Sequence[tuple[str, NodeRelease]]) -> None:
    first_region = releases[0][0]
    names = (*query.group_by, *_STRUCTURE)
    for region, release in releases[1:]:
        table = release.table
        if not all(
            table.column(c).equals(col) for c, col in zip(names, layout.structure, strict=True)
        ):
            raise CatalogMismatchError(
                f"nodes {first_region!r} and {region!r} answered with different public "
                "structures (groups, grids or clamp bounds), so their figures cannot be pooled; "
                "their catalogs differ: compare `chc nodes` for the two nodes and align their "
                "configuration (reference_date, pathways, chc version)"
            )


@dataclass(frozen=True)
class _Cells:
    """One component over every (region, group) cell: region-major, pooled last."""

    values: np.ndarray  # cells x width (width: bins, or 1)
    variance: np.ndarray  # cells
    lower: np.ndarray  # cells (NaN: no bound)
    upper: np.ndarray
    edges: np.ndarray  # cells x bins + 1 for histograms, else empty

    @property
    def first(self) -> np.ndarray:
        """The single value of each cell of an unbinned component."""
        return self.values[:, 0]


def _sum_range(c: _Cells) -> tuple[np.ndarray, np.ndarray]:
    lo = np.where(c.lower >= 0, 0.0, np.nan)  # NaN >= 0 is False: no bound
    hi = np.where(c.upper <= 0, 0.0, np.nan)
    return lo, hi


def _ratio_range(
    num: tuple[float | None, float | None], den: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    """Public bounds on sum(a)/sum(b) from each row's bounds (a weighted mean of a_i/b_i)."""

    def row_range(c: tuple[float | None, float | None]) -> tuple[float, float]:
        # The clamp range, or exactly 1 for a row count.
        return (1.0, 1.0) if c[0] is None or c[1] is None else (c[0], c[1])

    la, ha = row_range(num)
    lb, hb = row_range(den)
    if num[0] is not None and den[0] is None:
        # sum(a) / COUNT(*): rows where a is NULL add 1 below and 0 above.
        la, ha = min(la, 0.0), max(ha, 0.0)
    if lb > 0:
        ends = [la / lb, la / hb, ha / lb, ha / hb]
        return min(ends), max(ends)
    if lb >= 0 and la >= 0:
        return 0.0, None
    return None, None


def _bound(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _ratio_bounds(num: _Cells, den: _Cells) -> tuple[np.ndarray, np.ndarray]:
    """_ratio_range per cell (the bounds are public and the same in every region)."""
    lo = np.empty(num.lower.size)
    hi = np.empty(num.lower.size)
    seen: dict[tuple[float | None, ...], tuple[float, float]] = {}
    for i in range(num.lower.size):
        key = tuple(_bound(float(c[i])) for c in (num.lower, num.upper, den.lower, den.upper))
        if key not in seen:
            a, b = _ratio_range((key[0], key[1]), (key[2], key[3]))
            seen[key] = (np.nan if a is None else a, np.nan if b is None else b)
        lo[i], hi[i] = seen[key]
    return lo, hi


@dataclass(frozen=True)
class _Found:
    """A measure's figures over every cell (cells x figures per cell)."""

    figures: Figures
    n: np.ndarray  # cells: noisy rows behind a derived figure, NaN for none
    bin_lower: np.ndarray  # cells x figures, NaN for none
    bin_upper: np.ndarray


def _quantiles(measures: Sequence[Measure], c: dict[str, _Cells], z: float) -> dict[int, Figures]:
    """Every quantile measure's figures, by measure number; quantiles of one bins component
    (a median and a p90, say) are computed together, from one pass over its histograms."""
    asked: dict[str, list[int]] = {}
    for i, m in enumerate(measures):
        if m.statistic is Statistic.QUANTILE:
            asked.setdefault(role_keys(m)["h"], []).append(i)
    out: dict[int, Figures] = {}
    for key, which in asked.items():
        h = c[key]
        # A grid of one bin per whole value ends one past the column's upper bound.
        discrete = h.edges[:, -1] > h.upper  # False where there is no upper bound (NaN)
        qs = [measures[i].quantile or 0.5 for i in which]
        found = estimators.quantiles(h.values, h.variance, h.edges, qs, discrete=discrete, z=z)
        out.update(zip(which, found, strict=True))
    return out


def _measure(
    m: Measure, c: dict[str, _Cells], cells: int, z: float, quantile: Figures | None = None
) -> _Found:
    """The figures of one measure in every cell (one per bin for histograms); a quantile's
    come from _quantiles."""
    keys = role_keys(m)
    stat = m.statistic
    none = np.full((cells, 1), np.nan)
    no_n = np.full(cells, np.nan)

    def column(f: Figures) -> Figures:
        return Figures.of(
            [x[:, None] for x in (f.estimate, f.std_error, f.ci_low, f.ci_high)], f.approximate
        )

    if stat in {Statistic.COUNT, Statistic.COUNT_ROWS, Statistic.SUM}:
        vec = c[keys["n" if "n" in keys else "s"]]
        if stat is Statistic.SUM:
            lo, hi = _sum_range(vec)
        else:
            lo, hi = np.zeros(cells), np.full(cells, np.nan)
        f = estimators.totals(vec.first, vec.variance, lo, hi, z)
        return _Found(column(f), no_n, none, none)
    if stat is Statistic.MEAN:
        n, s = c[keys["n"]], c[keys["s"]]
        f = estimators.ratios(s.first, s.variance, n.first, n.variance, s.lower, s.upper, z)
        return _Found(column(f), n.first, none, none)
    if stat in {Statistic.VARIANCE, Statistic.STDDEV}:
        n, s, ss = c[keys["n"]], c[keys["s"]], c[keys["ss"]]
        f = estimators.variances(
            n.first,
            n.variance,
            s.first,
            s.variance,
            ss.first,
            ss.variance,
            np.nan_to_num(s.lower, nan=0.0),  # `s.lower or 0.0`
            np.nan_to_num(s.upper, nan=0.0),
            sd=stat is Statistic.STDDEV,
            z=z,
        )
        return _Found(column(f), n.first, none, none)
    if stat is Statistic.QUANTILE:
        h = c[keys["h"]]
        if quantile is None:
            quantile = _quantiles([m], c, z)[0]
        return _Found(column(quantile), h.values.sum(axis=1), none, none)
    if stat is Statistic.HISTOGRAM:
        h = c[keys["h"]]
        bins = h.values.shape[1]
        f = estimators.totals(
            h.values,
            h.variance[:, None],
            np.zeros((cells, bins)),
            np.full((cells, bins), np.nan),
            z,
        )
        return _Found(f, no_n, h.edges[:, :-1], h.edges[:, 1:])
    num, den = c[keys["num"]], c[keys["den"]]
    lo, hi = _ratio_bounds(num, den)
    f = estimators.ratios(num.first, num.variance, den.first, den.variance, lo, hi, z)
    return _Found(column(f), den.first if _kind(keys["den"]) == "rows" else no_n, none, none)


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


def _values(releases: Sequence[tuple[str, NodeRelease]], rows: int) -> np.ndarray:
    """Every node's values, one line per node. Null values (NaN here) are cells the node
    withheld under its disclosure rules."""
    out = np.empty((len(releases), rows))
    for i, (_, release) in enumerate(releases):
        out[i] = release.table.column("value").to_numpy()
    return out


def _floats(x: np.ndarray) -> pa.Array:
    return pa.array(x, pa.float64(), from_pandas=True)  # NaN -> null


def combine(
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
    schema = pa.schema(
        [("region", pa.string())] + [(c, pa.string()) for c in query.group_by] + OUTPUT_SCHEMA_TAIL
    )
    if not releases:
        return schema.empty_table()
    first = releases[0][1].table
    layout = _layout(query, first)
    _check_same(query, layout, releases)
    with np.errstate(all="ignore"):
        return _combine(query, layout, releases, partial, z, schema)


def _combine(
    query: Query,
    layout: _Layout,
    releases: Sequence[tuple[str, NodeRelease]],
    partial: bool,
    z: float,
    schema: pa.Schema,
) -> pa.Table:
    nodes, groups = len(releases), len(layout.groups)
    if groups == 0:
        return schema.empty_table()  # an empty release has no cells to show
    regions = nodes + 1
    values = _values(releases, layout.group_of_row.size)
    # A node that withheld any value of a group withheld the cell: pool the others, flag it.
    nan = np.isnan(values)
    withheld = np.zeros((nodes, groups), dtype=bool)
    node, row = np.nonzero(nan)  # few: only the cells nodes withheld
    withheld[node, layout.group_of_row[row]] = True
    kept = ~withheld
    everyone_withheld = np.asarray(withheld.all(axis=0), dtype=bool)
    variances = np.asarray([_variances(r, layout.keys, z) for _, r in releases]).reshape(
        nodes, len(layout.keys)
    )
    cells: dict[str, _Cells] = {}
    for k, key in enumerate(layout.keys):
        grid = layout.rows[key]
        x = values[:, grid]  # nodes x groups x width
        # Sums over nodes run node by node in order (numpy adds along the first axis row by
        # row), so pooled values are the same as adding the releases one after another.
        pooled = np.where(kept[:, :, None], x, 0.0).sum(axis=0)
        var = np.broadcast_to(variances[:, k : k + 1], (nodes, groups))
        pooled_var = np.where(kept, var, 0.0).sum(axis=0)
        # A cell every node withheld is shown blank, like the regions' cells.
        pooled = np.where(everyone_withheld[:, None], x[-1], pooled)
        pooled_var = np.where(everyone_withheld, var[-1], pooled_var)
        edges = layout.edges.get(key)
        cells[key] = _Cells(
            values=np.ascontiguousarray(np.concatenate((x, pooled[None]))).reshape(
                regions * groups, -1
            ),
            variance=np.concatenate((var, pooled_var[None])).reshape(-1),
            lower=np.tile(layout.lower[key], regions),
            upper=np.tile(layout.upper[key], regions),
            edges=np.empty(0) if edges is None else np.tile(edges, (regions, 1)),
        )
    blank = np.concatenate((withheld, everyone_withheld[None])).reshape(-1)
    is_partial = np.concatenate(
        (
            np.zeros((nodes, groups), dtype=bool),
            np.asarray(partial | withheld.any(axis=0), dtype=bool)[None],
        )
    ).reshape(-1)
    return _table(query, layout, releases, cells, blank, is_partial, z, schema)


def _table(
    query: Query,
    layout: _Layout,
    releases: Sequence[tuple[str, NodeRelease]],
    cells: dict[str, _Cells],
    blank: np.ndarray,
    is_partial: np.ndarray,
    z: float,
    schema: pa.Schema,
) -> pa.Table:
    """The output rows, region-major, then group, measure and bin."""
    count = blank.size
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("est", "se", "lo", "hi", "n", "approx", "bl", "bu", "measure")
    }
    quantiles = _quantiles(query.measures, cells, z)
    for i, m in enumerate(query.measures):
        found = _measure(m, cells, count, z, quantiles.get(i))
        f = found.figures
        width = f.estimate.shape[1]
        hide = blank[:, None]
        for name, x in (
            ("est", f.estimate),
            ("se", f.std_error),
            ("lo", f.ci_low),
            ("hi", f.ci_high),
        ):
            parts[name].append(np.where(hide, np.nan, x))
        parts["n"].append(
            np.broadcast_to(np.where(blank, np.nan, found.n)[:, None], (count, width))
        )
        # A withheld cell keeps its rows (one per histogram bin too), so that the shape of an
        # answer never depends on the data; its figures are blank and "approximate" unless a
        # histogram's.
        histogram = m.statistic is Statistic.HISTOGRAM
        approx = np.where(blank, not histogram, f.approximate)
        parts["approx"].append(np.broadcast_to(approx[:, None], (count, width)))
        parts["bl"].append(np.broadcast_to(found.bin_lower, (count, width)))
        parts["bu"].append(np.broadcast_to(found.bin_upper, (count, width)))
        parts["measure"].append(np.full((count, width), i))
    per_cell = sum(p.shape[1] for p in parts["est"])

    def flat(name: str, dtype: type = np.float64) -> np.ndarray:
        if not parts[name]:
            return np.empty(0, dtype=dtype)
        return np.concatenate(parts[name], axis=1).reshape(-1).astype(dtype)

    regions = len(releases) + 1
    groups = len(layout.groups)
    region_names = pa.array([r for r, _ in releases] + [POOLED], pa.string())
    columns: list[pa.Array] = [
        region_names.take(pa.array(np.repeat(np.arange(regions), groups * per_cell)))
    ]
    group_index = pa.array(np.tile(np.repeat(np.arange(groups), per_cell), regions))
    for j, _ in enumerate(query.group_by):
        columns.append(pa.array([g[j] for g in layout.groups], pa.string()).take(group_index))
    measure_index = pa.array(flat("measure", np.int64))
    columns += [
        pa.array([m.name for m in query.measures], pa.string()).take(measure_index),
        pa.array([m.statistic.value for m in query.measures], pa.string()).take(measure_index),
        _floats(flat("bl")),
        _floats(flat("bu")),
        _floats(flat("est")),
        _floats(flat("se")),
        _floats(flat("lo")),
        _floats(flat("hi")),
        _floats(flat("n")),
        pa.array(flat("approx", np.bool_)),
        pa.array(np.repeat(is_partial, per_cell)),
        pa.array(np.repeat(blank, per_cell)),
    ]
    return pa.Table.from_arrays(columns, schema=schema)
