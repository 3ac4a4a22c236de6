"""Complementary suppression: no suppressed cell is recovered from the pooled row and the others.

Tables are built by hand in the hub's long format (queries.combine.OUTPUT_SCHEMA_TAIL), with
the pooled row the exact sum of the regions as combine computes it, so no noise is drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queries import release
from queries.combine import OUTPUT_SCHEMA_TAIL, POOLED
from queries.results import ReleaseRules

NO_ROUNDING = ReleaseRules(suppress_below=8, round_to=1)
BINS = ((0.0, 10.0), (10.0, 20.0), (20.0, 30.0))


def row(
    region: str,
    group: tuple[str, ...],
    measure: str,
    stat: str,
    est: float | None,
    group_by: tuple[str, ...] = ("sex",),
    **kw: object,
) -> dict[str, object]:
    """One output row; the interval is a stand-in, as release rules only round it."""
    out: dict[str, object] = dict(zip(group_by, group, strict=True))
    out.update(
        {
            "region": region,
            "measure": measure,
            "statistic": stat,
            "bin_lower": None,
            "bin_upper": None,
            "estimate": est,
            "std_error": 3.0,
            "ci_low": None if est is None else est - 6,
            "ci_high": None if est is None else est + 6,
            "n": None,
            "approximate": False,
            "partial": False,
            "suppressed": False,
        }
    )
    out.update(kw)
    return out


def apply(
    rows: list[dict[str, object]],
    rules: ReleaseRules = NO_ROUNDING,
    group_by: tuple[str, ...] = ("sex",),
) -> list[dict[str, Any]]:
    schema = pa.schema(
        [("region", pa.string()), *((c, pa.string()) for c in group_by), *OUTPUT_SCHEMA_TAIL]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    out: list[dict[str, Any]] = release.apply(table, rules, group_by).to_pylist()
    return out


def counts(values: dict[str, float], group: tuple[str, ...] = ("f",)) -> list[dict[str, object]]:
    """Count rows of one group for each region, and the pooled row as their sum."""
    rows = [row(region, group, "n", "count", v) for region, v in values.items()]
    return [*rows, row(POOLED, group, "n", "count", sum(values.values()))]


def hidden(out: list[dict[str, Any]], measure: str = "n") -> set[str]:
    return {r["region"] for r in out if r["measure"] == measure and r["suppressed"]}


def test_two_small_cells_totalling_enough_need_nothing_more() -> None:
    out = apply(counts({"a": 5.0, "b": 6.0, "c": 40.0, "d": 50.0}))
    assert hidden(out) == {"a", "b"}


def test_further_cells_are_taken_smallest_first_until_the_total_is_large_enough() -> None:
    out = apply(counts({"a": 3.0, "b": 4.0, "c": 50.0, "d": 20.0, "e": 9.0}))
    # 3 + 4 = 7 is still a small count, so the smallest published region (e, 9) goes too.
    assert hidden(out) == {"a", "b", "e"}


def test_with_two_regions_both_are_suppressed_and_the_pooled_total_stays() -> None:
    out = apply(counts({"a": 3.0, "b": 100.0}))
    assert hidden(out) == {"a", "b"}
    assert next(r for r in out if r["region"] == POOLED)["estimate"] == 103.0


def test_with_one_region_the_pooled_cell_is_suppressed_instead() -> None:
    out = apply(counts({"a": 3.0}))
    assert hidden(out) == {"a", POOLED}


def test_a_lone_suppressed_pooled_cell_takes_its_smallest_region_with_it() -> None:
    # A quantile's n from clipped noisy bins is not additive, so a pooled cell can be small
    # while no region is; its count would then be the sum of the published regions'.
    rows = []
    for region, (count, n) in {"a": (30.0, 20.0), "b": (25.0, 30.0)}.items():
        rows += [
            row(region, ("f",), "n", "count", count),
            row(region, ("f",), "median", "quantile", 40.0, n=n, approximate=True),
        ]
    rows += [
        row(POOLED, ("f",), "n", "count", 55.0),
        row(POOLED, ("f",), "median", "quantile", 40.0, n=4.0, approximate=True),
    ]
    out = apply(rows)
    assert hidden(out) == {POOLED, "a"}  # a's noisy count (smallest of 30 and 20) is smaller
    assert hidden(out, "median") == {POOLED, "a"}


def test_complementary_cells_are_suppressed_whole() -> None:
    rows = counts({"a": 3.0, "b": 40.0, "c": 52.0})
    for region, n in {"a": 3.0, "b": 40.0, "c": 52.0, POOLED: 95.0}.items():
        rows.append(row(region, ("f",), "los", "mean", 4.0, n=n, approximate=True))
    out = apply(rows)
    assert hidden(out) == hidden(out, "los") == {"a", "b"}


def test_a_cell_is_ordered_by_the_smallest_of_its_counts() -> None:
    rows = counts({"a": 3.0, "b": 40.0, "c": 30.0})
    for region, n in {"a": 3.0, "b": 9.0, "c": 30.0, POOLED: 42.0}.items():
        rows.append(row(region, ("f",), "los", "mean", 4.0, n=n, approximate=True))
    out = apply(rows)
    # b counts 40 persons but only 9 rows behind its mean, so b is the smaller cell.
    assert hidden(out) == {"a", "b"}


def test_each_group_is_its_own_relation() -> None:
    out = apply(counts({"a": 3.0, "b": 40.0, "c": 52.0}) + counts({"a": 30.0, "b": 40.0}, ("m",)))
    assert {(r["region"], r["sex"]) for r in out if r["suppressed"]} == {("a", "f"), ("b", "f")}


def test_a_query_without_groups_is_one_relation() -> None:
    values = {"a": 3.0, "b": 40.0, "c": 52.0}
    rows = [row(region, (), "n", "count", v, group_by=()) for region, v in values.items()]
    rows.append(row(POOLED, (), "n", "count", 95.0, group_by=()))
    out = apply(rows, group_by=())
    assert hidden(out) == {"a", "b"}


def test_no_complementary_suppression_without_a_threshold() -> None:
    out = apply(
        counts({"a": -2.0, "b": 40.0, "c": 52.0}), ReleaseRules(suppress_below=0, round_to=1)
    )
    assert hidden(out) == {"a"}  # a negative count is still not shown, but it is no secret


def test_complementary_cells_are_rounded_like_the_rest_when_published() -> None:
    out = apply(counts({"a": 3.0, "b": 41.0, "c": 52.0, "d": 61.0}), ReleaseRules())
    assert hidden(out) == {"a", "b"}
    assert [r["estimate"] for r in out if not r["suppressed"]] == [50.0, 60.0, 155.0]


def histogram(
    values: Mapping[str, Sequence[float]], count: dict[str, float] | None = None
) -> list[dict[str, object]]:
    """Histogram rows for each region (and count rows if given), and the pooled sums."""
    rows = []
    for region, bins in values.items():
        for (lo, hi), v in zip(BINS, bins, strict=True):
            rows.append(row(region, ("f",), "h", "histogram", v, bin_lower=lo, bin_upper=hi))
    for i, (lo, hi) in enumerate(BINS):
        total = sum(b[i] for b in values.values())
        rows.append(row(POOLED, ("f",), "h", "histogram", total, bin_lower=lo, bin_upper=hi))
    return rows + (counts(count) if count else [])


def bins_hidden(out: list[dict[str, Any]]) -> set[tuple[str, float]]:
    return {(r["region"], r["bin_lower"]) for r in out if r["measure"] == "h" and r["suppressed"]}


def test_histograms_are_protected_bin_by_bin() -> None:
    out = apply(histogram({"a": [3.0, 40.0, 12.0], "b": [30.0, 50.0, 11.0], "c": [9.0, 2.0, 60.0]}))
    # Bin 0: a (3) and the smaller other, c (9); bin 10: c (2) and a (40); bin 20: none.
    assert bins_hidden(out) == {("a", 0.0), ("c", 0.0), ("c", 10.0), ("a", 10.0)}


def test_a_suppressed_cell_hides_its_bins_and_the_bins_are_then_protected() -> None:
    bins = {"a": [3.0, 40.0, 12.0], "b": [30.0, 50.0, 11.0], "c": [9.0, 20.0, 60.0]}
    out = apply(histogram(bins, count={"a": 5.0, "b": 91.0, "c": 89.0}))
    # a's count hides cell a; c is the smaller other cell, so c goes whole, bins included.
    assert hidden(out) == {"a", "c"}
    assert bins_hidden(out) == {(r, lo) for r in ("a", "c") for lo, _ in BINS}


def test_a_histogram_bin_with_one_region_hides_the_pooled_bin() -> None:
    out = apply(histogram({"a": [3.0, 40.0, 12.0]}))
    assert bins_hidden(out) == {("a", 0.0), (POOLED, 0.0)}


def test_a_median_sharing_the_bins_makes_each_cell_a_relation_of_its_bins() -> None:
    # The planner may release one bins component for HISTOGRAM(x) and MEDIAN(x), so a cell's
    # median n is the sum of its bins: n minus the shown bins would give back a hidden one.
    bins = {"a": [3.0, 40.0, 12.0], "b": [30.0, 50.0, 11.0], "c": [20.0, 25.0, 60.0]}
    rows = histogram(bins)
    for region, n in {**{r: sum(b) for r, b in bins.items()}, POOLED: 251.0}.items():
        rows.append(row(region, ("f",), "median", "quantile", 15.0, n=n, approximate=True))
    out = apply(rows)
    # a's small bin takes a's next smallest bin and c's bin 0, and so on until every region
    # and every cell has none or at least two hidden bins; the medians and pooled bins stay.
    assert bins_hidden(out) == {
        ("a", 0.0), ("a", 10.0), ("a", 20.0), ("b", 0.0), ("b", 20.0), ("c", 0.0), ("c", 10.0)
    }  # fmt: skip
    assert hidden(out, "median") == set()
    for region, values in bins.items():
        shown = [r["estimate"] for r in out if r["region"] == region and r["measure"] == "h"]
        derived = sum(values) - sum(v for v in shown if v is not None)
        assert derived not in values


def test_a_pooled_mean_does_not_give_back_a_suppressed_regions_sum() -> None:
    # Rows behind each mean and the sums, as combine pools them: pooled mean = sum(s) / sum(n).
    sums = {"a": (5.0, 31.0), "b": (40.0, 170.0), "c": (60.0, 250.0)}
    n_all, s_all = (sum(v[i] for v in sums.values()) for i in (0, 1))
    rows = [row(r, (), "los", "mean", s / n, (), n=n) for r, (n, s) in sums.items()]
    rows.append(row(POOLED, (), "los", "mean", s_all / n_all, (), n=n_all))
    out = apply(rows, group_by=())
    by = {r["region"]: r for r in out}
    assert by["a"]["suppressed"]  # 5 rows behind its mean
    pooled = by[POOLED]
    assert not pooled["suppressed"]
    published = [r for r in out if r["region"] not in (POOLED, "a") and not r["suppressed"]]
    # pooled mean x pooled n is the pooled sum; minus the others' mean x n it would be a's sum.
    derived = pooled["estimate"] * pooled["n"] - sum(r["estimate"] * r["n"] for r in published)
    assert derived != pytest.approx(31.0)
    assert derived == pytest.approx(31.0 + 170.0)  # a's and b's sums together


@dataclass
class Case:
    """A random hub table: per region and group a count, a sum, a histogram, maybe a median."""

    group_by: tuple[str, ...]
    rows: list[dict[str, object]]
    threshold: int


@st.composite
def cases(draw: st.DrawFn, low: int) -> Case:
    regions = [f"r{i}" for i in range(draw(st.integers(1, 5)))]
    grouped = draw(st.booleans())
    group_by = ("sex",) if grouped else ()
    groups = [(g,) for g in ("f", "m", "x")[: draw(st.integers(1, 3))]] if grouped else [()]
    # A median over the histogram's grid shares its bins, so its n is the sum of the bins.
    median = draw(st.booleans())
    values = st.integers(low, 60).map(float)
    rows: list[dict[str, object]] = []
    for group in groups:
        cells = {
            region: (draw(values), draw(values), [draw(values) for _ in BINS]) for region in regions
        }
        total = (
            sum(c for c, _, _ in cells.values()),
            sum(s for _, s, _ in cells.values()),
            [sum(b[i] for _, _, b in cells.values()) for i in range(len(BINS))],
        )
        for region, (c, s, bins) in [*cells.items(), (POOLED, total)]:
            rows.append(row(region, group, "n", "count", c, group_by))
            rows.append(row(region, group, "days", "sum", s, group_by))
            for (lo, hi), v in zip(BINS, bins, strict=True):
                rows.append(
                    row(region, group, "h", "histogram", v, group_by, bin_lower=lo, bin_upper=hi)
                )
            if median:
                rows.append(row(region, group, "median", "quantile", 15.0, group_by, n=sum(bins)))
    return Case(group_by, rows, draw(st.integers(1, 15)))


Pair = tuple[dict[str, object], dict[str, Any]]  # a row before and after the rules


def value(r: dict[str, object]) -> float:
    """The additive figure of a row: a quantile's n, otherwise its estimate."""
    return float(str(r["n"] if r["statistic"] == "quantile" else r["estimate"]))


def relations(case: Case, out: list[dict[str, Any]]) -> list[tuple[list[Pair], Pair]]:
    """Every exact relation as (members, their total), worked out from the table itself."""
    pairs = list(zip(case.rows, out, strict=True))
    across: dict[tuple[Any, ...], list[Pair]] = defaultdict(list)
    pooled: dict[tuple[Any, ...], Pair] = {}
    cells: dict[tuple[Any, ...], list[Pair]] = defaultdict(list)
    for b, a in pairs:
        group = tuple(b[c] for c in case.group_by)
        key = (*group, b["measure"], b["bin_lower"])
        if b["region"] == POOLED:
            pooled[key] = (b, a)
        else:
            across[key].append((b, a))
        cells[(b["region"], *group)].append((b, a))
    found = [(members, pooled[key]) for key, members in across.items()]
    for members in cells.values():
        for b, a in members:
            if b["statistic"] == "quantile":
                found.append(([m for m in members if m[0]["statistic"] == "histogram"], (b, a)))
    return found


@settings(max_examples=300, deadline=None)
@given(cases(low=-3))
def test_every_relation_has_none_or_at_least_two_suppressed_or_its_pooled_cell(case: Case) -> None:
    out = apply(case.rows, ReleaseRules(case.threshold, 1), case.group_by)
    for members, (_, total) in relations(case, out):
        for b, a in members:
            if b["statistic"] != "sum" and value(b) < case.threshold:
                assert a["suppressed"]  # primary suppression is kept
        suppressed = [value(b) for b, a in members if a["suppressed"]]
        if total["suppressed"]:
            assert suppressed  # else the total would be the sum of the published members
        elif members[0][0]["statistic"] == "sum":
            assert len(suppressed) != 1  # sums are hidden with their cells' counts
        elif suppressed:
            assert len(suppressed) >= 2
            assert sum(suppressed) >= case.threshold


@settings(max_examples=300, deadline=None)
@given(cases(low=1))
def test_no_suppressed_region_equals_pooled_minus_the_published_others(case: Case) -> None:
    # Counts of at least 1: with zero or negative noisy counts the others in a suppressed set
    # can add up to 0, so their total equals one member by coincidence, which no analyst can
    # tell apart from any other total (the structural property above covers those tables).
    out = apply(case.rows, ReleaseRules(case.threshold, 1), case.group_by)
    for members, (_, total) in relations(case, out):
        if total["suppressed"]:
            continue
        derived = value(total) - sum(value(a) for _, a in members if not a["suppressed"])
        for b, a in members:
            if a["suppressed"]:
                assert not math.isclose(derived, value(b))


@settings(max_examples=100, deadline=None)
@given(cases(low=-3))
def test_cells_are_suppressed_whole_with_their_bins(case: Case) -> None:
    out = apply(case.rows, ReleaseRules(case.threshold, 1), case.group_by)
    figures: dict[tuple[Any, ...], set[bool]] = defaultdict(set)
    bins: dict[tuple[Any, ...], set[bool]] = defaultdict(set)
    for b, a in zip(case.rows, out, strict=True):
        cell = (b["region"], *(b[c] for c in case.group_by))
        (bins if b["statistic"] == "histogram" else figures)[cell].add(bool(a["suppressed"]))
    for cell, flags in figures.items():
        assert len(flags) == 1, cell
        if True in flags:
            assert bins[cell] == {True}
