"""The vectorised pooling and release rules give the same tables as the code they replaced.

tests/unit/_reference_combine.py keeps the row-by-row `combine` and `apply` as they were; here
both run on many random sets of node releases, laid out as nodes send them from real plans
(queries.plan against a test catalog): every statistic, with and without groups, nodes that
withheld cells, partial results, node rounding rules and hub release rules. Integers, flags,
strings, nulls and row order must be equal; floats equal to 1e-12 relative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queries import plan, release
from queries.combine import OUTPUT_SCHEMA_TAIL, POOLED, CatalogMismatchError, combine
from queries.components import Component
from queries.results import (
    BudgetStatus,
    MeasureNoise,
    NodeRelease,
    NoiseInfo,
    ReleaseRules,
    release_schema,
)
from queries.spec import Measure, Query, Statistic
from tests.unit import _reference_combine as reference
from tests.unit._plan_helpers import CUSTOM

BUDGET = BudgetStatus(rho_total=10.0, rho_spent=1.0, max_rho_per_query=1.0, delta=1e-6)

# Every statistic, on a discrete grid (los: 0..30, one bin per value), a continuous one
# (cost: 0..5000, 200 bins) and explicit bins; ratios of sums and of a sum to rows.
MEASURES = (
    Measure(Statistic.COUNT, "persons"),
    Measure(Statistic.COUNT_ROWS, "visits"),
    Measure(Statistic.SUM, "total_cost", column="cost"),
    Measure(Statistic.MEAN, "mean_los", column="los"),
    Measure(Statistic.VARIANCE, "var_los", column="los"),
    Measure(Statistic.STDDEV, "sd_cost", column="cost", clamp=(0.0, 800.0)),
    Measure(Statistic.QUANTILE, "median_los", column="los", quantile=0.5),
    Measure(Statistic.QUANTILE, "p90_los", column="los", quantile=0.9),
    Measure(Statistic.QUANTILE, "p25_cost", column="cost", quantile=0.25),
    Measure(Statistic.QUANTILE, "median_los_7", column="los", quantile=0.5, bins=7),
    Measure(Statistic.HISTOGRAM, "los_bins", column="los"),
    Measure(Statistic.HISTOGRAM, "cost_bins", column="cost", bins=10),
    Measure(Statistic.RATIO, "cost_per_visit", column="cost"),
    Measure(Statistic.RATIO, "cost_per_day", column="cost", denominator="los"),
)
GROUPINGS: tuple[tuple[str, ...], ...] = ((), ("sex",), ("setting",), ("sex", "setting"))


def _component_values(c: Component, groups: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy-looking integers of one component (in fixed-point units), groups x bins."""
    scale = float(rng.choice([0.5, 3.0, 40.0, 2000.0]))
    width = c.bins or 1
    exact = rng.poisson(scale, size=(groups, width)).astype(np.float64)
    if c.kind.value in {"sum", "sumsq"}:
        exact *= rng.integers(1, 40, size=(groups, 1))
    noise = np.rint(rng.normal(0.0, float(rng.choice([0.0, 1.0, 3.0, 30.0])), exact.shape))
    return exact + noise


def _release(
    compiled: plan.Plan,
    rng: np.random.Generator,
    variances: dict[str, float],
    rules: ReleaseRules | None,
    withhold: float,
) -> NodeRelease:
    """One node's release table, laid out as node.engine.release_table does."""
    groups = len(compiled.domain)
    hidden = rng.random(groups) < withhold
    columns: dict[str, list[pa.Array]] = {f.name: [] for f in release_schema(compiled.group_by)}
    for c in compiled.components:
        per_group = c.bins or 1
        size = groups * per_group
        index = np.repeat(np.arange(groups), per_group)
        for j, col in enumerate(compiled.group_by):
            columns[col].append(pa.array([compiled.domain[i][j] for i in index], pa.string()))
        columns["component"].append(pa.array([c.key] * size, pa.string()))
        if c.bins:
            edges = np.asarray(c.edges, dtype=np.float64)
            columns["bin"].append(pa.array(np.tile(np.arange(c.bins, dtype=np.int32), groups)))
            columns["bin_lower"].append(pa.array(np.tile(edges[:-1], groups)))
            columns["bin_upper"].append(pa.array(np.tile(edges[1:], groups)))
        else:
            columns["bin"].append(pa.array(np.full(size, -1, dtype=np.int32)))
            columns["bin_lower"].append(pa.nulls(size, pa.float64()))
            columns["bin_upper"].append(pa.nulls(size, pa.float64()))
        columns["lower"].append(pa.array([c.lower] * size, pa.float64()))
        columns["upper"].append(pa.array([c.upper] * size, pa.float64()))
        values = (_component_values(c, groups, rng) * c.unit).reshape(-1)
        columns["value"].append(pa.array(values, mask=np.repeat(hidden, per_group)))
    schema = release_schema(compiled.group_by)
    table = pa.table([pa.concat_arrays(columns[f.name]) for f in schema], schema=schema)

    def noise(v: float) -> NoiseInfo:
        return NoiseInfo("discrete_gaussian", math.sqrt(v), v, 1.0)

    return NodeRelease(
        query_id="q",
        table=table,
        noise=noise(next(iter(variances.values()))),
        rho_charged=0.1,
        epsilon=1.0,
        budget=BUDGET,
        measures=tuple(
            MeasureNoise(measure=k, statistic=k.split(":")[0], noise=noise(v), rho=0.01)
            for k, v in variances.items()
        ),
        rules=rules,
    )


def random_case(seed: int) -> tuple[Query, list[tuple[str, NodeRelease]], bool, ReleaseRules]:
    """A query over the test catalog, 1-12 node releases, a partial flag and hub rules."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(MEASURES), size=int(rng.integers(1, 6)), replace=False)
    query = Query(
        view="visits",
        rho=0.5,
        group_by=GROUPINGS[int(rng.integers(len(GROUPINGS)))],
        measures=tuple(MEASURES[i] for i in sorted(picked)),
    )
    compiled = plan.compile_query(query, CUSTOM)
    withhold = float(rng.choice([0.0, 0.0, 0.2, 0.7]))
    releases = []
    for i in range(int(rng.integers(1, 13))):
        variances = {
            c.key: float(rng.choice([0.0, 0.3, 4.0, 25.0, 900.0])) * c.unit**2
            for c in compiled.components
        }
        rules = [None, ReleaseRules(), ReleaseRules(suppress_below=3, round_to=10)][
            int(rng.integers(3))
        ]
        releases.append((f"n{i}", _release(compiled, rng, variances, rules, withhold)))
    hub_rules = [
        ReleaseRules(),
        ReleaseRules(suppress_below=0, round_to=1),
        ReleaseRules(suppress_below=50, round_to=10),
        ReleaseRules(suppress_below=3, round_to=1),
    ][int(rng.integers(4))]
    return query, releases, bool(rng.random() < 0.3), hub_rules


def assert_same_table(fast: pa.Table, slow: pa.Table) -> None:
    """Same schema and rows; floats to 1e-12 relative, everything else exactly."""
    assert fast.schema == slow.schema
    assert fast.num_rows == slow.num_rows
    for name in fast.column_names:
        a, b = fast.column(name).to_pylist(), slow.column(name).to_pylist()
        if pa.types.is_floating(fast.schema.field(name).type):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                same = (x is None and y is None) or (
                    x is not None
                    and y is not None
                    and math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-9)
                )
                assert same, f"column {name!r}, row {i}: {x!r} != {y!r}"
        else:
            assert a == b, f"column {name!r} differs"


def _both(seed: int) -> None:
    query, releases, partial, rules = random_case(seed)
    fast = combine(query, releases, partial=partial)
    slow = reference.reference_combine(query, releases, partial=partial)
    assert_same_table(fast, slow)
    assert_same_table(
        release.apply(fast, rules, query.group_by),
        reference.reference_apply(slow, rules, query.group_by),
    )


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_fast_pooling_and_rules_equal_the_reference(seed: int) -> None:
    _both(seed)


@pytest.mark.parametrize("seed", range(40))
def test_fixed_cases_equal_the_reference(seed: int) -> None:
    _both(seed)


# Hand-made long tables for the release rules alone, harder than combine's: rows in any order,
# region names whose text orders differently from the names (quotes, prefixes), group values
# that are null or the text "None", bins whose edges print as prefixes of each other, noisy
# counts drawn from a few values so that sizes tie, nulls, rows already suppressed, missing
# pooled cells, and histograms in cells with and without a quantile.
REGIONS = ("b", "a", "ab", "a'b", 'a"b', "Z", "a b", "é")
GROUP_VALUES = ("f", "m", None, "None")
EDGES = ((0.0, 1.0), (1.0, 1.05), (1.05, 2.0), (10.0, 11.0), (2.0, 10.0), (-1.0, 0.0))
STATISTICS = ("count", "count_rows", "sum", "mean", "quantile", "histogram", "ratio", "stddev")


def _hand_rows(rng: np.random.Generator) -> tuple[list[dict[str, object]], tuple[str, ...]]:
    group_by = (("sex",), (), ("sex", "site"))[int(rng.integers(3))]
    regions = [str(r) for r in rng.permutation(REGIONS)[: int(rng.integers(1, 7))]]
    pooled_share = float(rng.choice([0.0, 0.8, 1.0]))
    stats = [str(s) for s in rng.choice(STATISTICS, size=int(rng.integers(1, 5)))]
    if rng.random() < 0.5:  # a histogram in cells with a quantile: relations that interact
        stats += ["quantile", "histogram"]
    measures = [(f"m{i}", stat) for i, stat in enumerate(rng.permutation(stats))]
    edges = [EDGES[i] for i in rng.permutation(len(EDGES))[: int(rng.integers(1, 5))]]
    groups = {
        tuple(GROUP_VALUES[i] for i in rng.integers(len(GROUP_VALUES), size=len(group_by)))
        for _ in range(4)
    }
    # Cells mostly large (a cell with one small figure is hidden whole) and bins often small,
    # from few values so that sizes tie.
    cell_sizes = np.asarray([5.0, 12.0, 20.0, 20.0, 30.0, 40.0, 40.0, 60.0, 90.0, 20.0, -2.0])
    cell_sizes = np.concatenate((cell_sizes, np.full(10, 40.0), np.full(10, 90.0)))
    bin_sizes = np.asarray([0.0, 3.0, 5.0, 8.0, 10.0, 12.0, 20.0, 20.0, 30.0, 40.0])
    rows: list[dict[str, object]] = []
    for region in [*regions, POOLED]:
        for group in sorted(groups, key=str):
            if region == POOLED and rng.random() > pooled_share:
                continue
            for name, stat in measures:
                for lo, hi in edges if stat == "histogram" else [(None, None)]:
                    sizes = bin_sizes if stat == "histogram" else cell_sizes
                    est = None if rng.random() < 0.02 else float(rng.choice(sizes))
                    n = None
                    if stat not in {"count", "count_rows", "histogram"} and rng.random() < 0.8:
                        n = None if est is None else float(rng.choice(sizes)) + 0.5
                    row: dict[str, object] = {
                        "region": region,
                        **dict(zip(group_by, group, strict=True)),
                        "measure": name,
                        "statistic": stat,
                        "bin_lower": lo,
                        "bin_upper": hi,
                        "estimate": est,
                        "std_error": None if est is None else float(rng.random() * 4),
                        "ci_low": None if est is None else est - 6.3,
                        "ci_high": None if est is None else est + 6.7,
                        "n": n,
                        "approximate": bool(rng.random() < 0.5),
                        "partial": bool(rng.random() < 0.2),
                        "suppressed": bool(rng.random() < 0.02),
                    }
                    rows.append(row)
    order = rng.permutation(len(rows)) if rng.random() < 0.7 else np.arange(len(rows))
    return [rows[i] for i in order], group_by


def _both_rules(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, group_by = _hand_rows(rng)
    schema = pa.schema(
        [("region", pa.string()), *((c, pa.string()) for c in group_by), *OUTPUT_SCHEMA_TAIL]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    rules = ReleaseRules(
        suppress_below=int(rng.choice([0, 3, 8, 8, 20])), round_to=int(rng.choice([1, 5, 10]))
    )
    fast = release.apply(table, rules, group_by)
    slow = reference.reference_apply(table, rules, group_by)
    assert fast.schema == slow.schema
    # Exactly the same values: the rules add and round the same floats in the same order.
    assert fast.to_pylist() == slow.to_pylist()


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_release_rules_on_hand_made_tables_equal_the_reference(seed: int) -> None:
    _both_rules(seed)


@pytest.mark.parametrize("seed", range(60))
def test_release_rules_on_fixed_hand_made_tables_equal_the_reference(seed: int) -> None:
    _both_rules(seed)


def test_release_rules_keep_an_empty_table() -> None:
    schema = pa.schema([("region", pa.string()), *OUTPUT_SCHEMA_TAIL])
    empty = schema.empty_table()
    out = release.apply(empty, ReleaseRules(), ())
    assert out.schema == schema
    assert out.to_pylist() == reference.reference_apply(empty, ReleaseRules(), ()).to_pylist()


def test_a_table_with_a_bin_twice_is_refused() -> None:
    rng = np.random.default_rng(5)
    rows = [r for r in _hand_rows(rng)[0]]
    row = {**rows[0], "statistic": "histogram", "bin_lower": 0.0, "bin_upper": 1.0}
    schema = pa.schema([(k, pa.string()) for k in rows[0] if k not in dict(OUTPUT_SCHEMA_TAIL)])
    schema = pa.schema([*schema, *OUTPUT_SCHEMA_TAIL])
    table = pa.Table.from_pylist([row, dict(row)], schema=schema)
    group_by = tuple(n for n in schema.names[1 : -len(OUTPUT_SCHEMA_TAIL)])
    with pytest.raises(ValueError, match="two rows for the same histogram bin"):
        release.apply(table, ReleaseRules(), group_by)


def test_no_releases_give_an_empty_table_of_the_same_schema() -> None:
    query = Query(view="visits", rho=0.1, group_by=("sex",))
    assert_same_table(combine(query, []), reference.reference_combine(query, []))


def test_empty_releases_give_an_empty_table_as_before() -> None:
    query = Query(view="visits", rho=0.1, measures=MEASURES[:3])
    region, node = random_case(3)[1][0]
    blank = NodeRelease(**{**node.__dict__, "table": release_schema(()).empty_table()})
    releases = [(region, blank), ("other", blank)]
    assert_same_table(combine(query, releases), reference.reference_combine(query, releases))


def test_pooled_row_is_last_and_flags_a_withheld_cell_partial() -> None:
    # Sanity on the shape the equality tests rely on: regions in order, pooled last.
    query, releases, _, _ = random_case(7)
    out = combine(query, releases).column("region").to_pylist()
    assert out[-1] == POOLED
    assert [r for r in dict.fromkeys(out)] == [r for r, _ in releases] + [POOLED]


def test_a_node_with_another_grid_is_refused_as_before() -> None:
    query = Query(
        view="visits", rho=0.5, measures=(Measure(Statistic.HISTOGRAM, "h", column="los"),)
    )
    other = Query(
        view="visits", rho=0.5, measures=(Measure(Statistic.HISTOGRAM, "h", column="los", bins=30),)
    )
    rng = np.random.default_rng(1)
    a = plan.compile_query(query, CUSTOM)
    b = plan.compile_query(other, CUSTOM)
    ra = _release(a, rng, {c.key: 1.0 for c in a.components}, None, 0.0)
    rb = _release(b, rng, {c.key: 1.0 for c in b.components}, None, 0.0)
    # Same component key would be needed to pool; a different grid is a different table.
    rb = NodeRelease(
        **{
            **rb.__dict__,
            "table": rb.table.set_column(
                rb.table.schema.get_field_index("component"),
                "component",
                pa.array([a.components[0].key] * rb.table.num_rows),
            ),
        }
    )
    releases: Sequence[tuple[str, NodeRelease]] = [("a", ra), ("b", rb)]
    with pytest.raises(CatalogMismatchError, match="different public structures"):
        combine(query, releases)
    with pytest.raises(reference.CatalogMismatchError):
        reference.reference_combine(query, releases)
