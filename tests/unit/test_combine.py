"""Pooling node releases (queries.combine): sums, variances and truncated 95% intervals.

Releases are built by hand in the node's wire format (group columns, component, bin,
bin_lower, bin_upper, lower, upper, value), so no noise is drawn here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa
import pytest

from queries.combine import OUTPUT_SCHEMA_TAIL, POOLED, Z95, CatalogMismatchError, combine
from queries.results import (
    RELEASE_COLUMNS,
    BudgetStatus,
    MeasureNoise,
    NodeRelease,
    NoiseInfo,
    release_schema,
)
from queries.spec import Measure, Query, Statistic

BUDGET = BudgetStatus(rho_total=10.0, rho_spent=1.0, max_rho_per_query=1.0, delta=1e-6)

# One released value: group values, component key, value.
Cell = tuple[tuple[str, ...], str, float | None]
# Public clamp bounds of the sum components used below.
BOUNDS = {"sum:cost": (-100.0, 100.0), "sum:los": (0.0, 30.0), "sumsq:los": (0.0, 30.0)}


def noise(variance: float) -> NoiseInfo:
    return NoiseInfo("discrete_gaussian", math.sqrt(variance), variance, 1.0)


def node_release(
    group_by: Sequence[str], cells: Sequence[Cell], variances: dict[str, float]
) -> NodeRelease:
    """A release as a node sends it: one row per group and component, unbinned."""
    columns: dict[str, list[object]] = {c: [] for c in group_by}
    for name in RELEASE_COLUMNS:
        columns[name] = []
    for group, component, value in cells:
        for col, g in zip(group_by, group, strict=True):
            columns[col].append(g)
        lower, upper = BOUNDS.get(component, (None, None))
        columns["component"].append(component)
        columns["bin"].append(-1)
        columns["bin_lower"].append(None)
        columns["bin_upper"].append(None)
        columns["lower"].append(lower)
        columns["upper"].append(upper)
        columns["value"].append(None if value is None else float(value))
    schema = release_schema(group_by)
    first = next(iter(variances.values()))
    return NodeRelease(
        query_id="q",
        table=pa.table(columns, schema=schema),
        noise=noise(first),
        rho_charged=0.1,
        epsilon=1.0,
        budget=BUDGET,
        measures=tuple(
            MeasureNoise(measure=k, statistic=k.split(":")[0], noise=noise(v), rho=0.05)
            for k, v in variances.items()
        ),
    )


def count_release(
    groups: Sequence[tuple[str, ...]], values: Sequence[float], variance: float
) -> NodeRelease:
    group_by = ["sex"] if groups and groups[0] else []
    cells: list[Cell] = [(g, "persons", v) for g, v in zip(groups, values, strict=True)]
    return node_release(group_by, cells, {"persons": variance})


def rows(table: pa.Table) -> list[dict[str, object]]:
    out: list[dict[str, object]] = table.to_pylist()
    return out


def interval(est: float, var: float) -> tuple[float, float, float]:
    se = math.sqrt(var)
    return se, max(0.0, est - Z95 * se), max(0.0, est + Z95 * se)


def test_z95_is_the_normal_quantile() -> None:
    assert pytest.approx(1.959964, abs=1e-6) == Z95


def test_grouped_counts_are_pooled_by_sum() -> None:
    query = Query(view="persons", rho=0.1, group_by=("sex",))
    groups = [("female",), ("male",)]
    leeds = count_release(groups, [100, 50], variance=16.0)
    york = count_release(groups, [30, 2], variance=9.0)
    table = combine(query, [("leeds", leeds), ("york", york)])

    assert table.column_names[:3] == ["region", "sex", "measure"]
    out = rows(table)
    assert [(r["region"], r["sex"]) for r in out] == [
        ("leeds", "female"),
        ("leeds", "male"),
        ("york", "female"),
        ("york", "male"),
        (POOLED, "female"),
        (POOLED, "male"),
    ]
    expected = [
        (100, 16.0),
        (50, 16.0),
        (30, 9.0),
        (2, 9.0),
        (130, 25.0),  # pooled: sum of estimates, sum of variances
        (52, 25.0),
    ]
    for row, (est, var) in zip(out, expected, strict=True):
        se, lo, hi = interval(est, var)
        assert row["measure"] == "count"
        assert row["statistic"] == "count"
        assert row["estimate"] == est
        assert row["std_error"] == pytest.approx(se)
        assert row["ci_low"] == pytest.approx(lo)
        assert row["ci_high"] == pytest.approx(hi)
        assert row["suppressed"] is False
    pooled_female = out[4]
    assert pooled_female["std_error"] == pytest.approx(5.0)
    assert pooled_female["ci_low"] == pytest.approx(130 - 1.959964 * 5.0, abs=1e-5)
    assert pooled_female["ci_high"] == pytest.approx(130 + 1.959964 * 5.0, abs=1e-5)


def test_count_intervals_are_truncated_at_zero() -> None:
    query = Query(view="persons", rho=0.1)
    small = count_release([()], [3], variance=100.0)
    negative = count_release([()], [-4], variance=100.0)
    out = rows(combine(query, [("a", small), ("b", negative)]))
    assert out[0]["ci_low"] == 0.0
    assert out[0]["ci_high"] == pytest.approx(3 + Z95 * 10)
    assert out[1]["estimate"] == 0.0  # a count is never shown below zero
    assert out[1]["ci_low"] == 0.0
    assert out[1]["ci_high"] == pytest.approx(-4 + Z95 * 10)
    assert out[2]["region"] == POOLED
    assert out[2]["estimate"] == 0.0  # pooled from the raw -4 and 3: -1, shown as 0
    assert out[2]["ci_low"] == 0.0
    assert out[2]["ci_high"] == pytest.approx(-1 + Z95 * math.sqrt(200))
    (row, _) = rows(combine(query, [("c", count_release([()], [-50], variance=1.0))]))
    assert row["ci_low"] == row["ci_high"] == 0.0


def test_sum_intervals_are_not_truncated() -> None:
    query = Query(view="visits", rho=0.1, measures=(Measure(Statistic.SUM, "net", column="cost"),))
    release = node_release([], [((), "sum:cost", -10.0)], {"sum:cost": 4.0})
    (row, pooled) = rows(combine(query, [("a", release)]))
    assert row["ci_low"] == pytest.approx(-10 - 2 * Z95)
    assert row["ci_high"] == pytest.approx(-10 + 2 * Z95)
    assert pooled["estimate"] == -10.0


def test_no_group_by_gives_one_row_per_region_and_one_pooled() -> None:
    query = Query(view="persons", rho=0.1)
    releases = [(f"r{i}", count_release([()], [10 * i], variance=4.0)) for i in range(1, 4)]
    table = combine(query, releases)
    assert table.column_names[0] == "region"
    assert table.column_names[1] == "measure"
    out = rows(table)
    assert [r["region"] for r in out] == ["r1", "r2", "r3", POOLED]
    assert out[-1]["estimate"] == 60.0
    assert out[-1]["std_error"] == pytest.approx(math.sqrt(12.0))


def test_each_measure_uses_its_own_variance() -> None:
    query = Query(
        view="persons",
        rho=0.1,
        group_by=("sex",),
        measures=(Measure(name="a"), Measure(Statistic.COUNT_ROWS, name="b")),
    )

    def release(a: list[float], b: list[float], var_a: float, var_b: float) -> NodeRelease:
        cells: list[Cell] = [
            ((s,), "persons", v) for s, v in zip(("female", "male"), a, strict=True)
        ]
        cells += [((s,), "rows", v) for s, v in zip(("female", "male"), b, strict=True)]
        return node_release(["sex"], cells, {"persons": var_a, "rows": var_b})

    one = release([1, 2], [10, 20], 1.0, 4.0)
    two = release([3, 4], [30, 40], 9.0, 16.0)
    out = rows(combine(query, [("one", one), ("two", two)]))
    assert len(out) == 2 * 2 * 2 + 2 * 2  # regions x groups x measures, then pooled
    pooled = {(r["sex"], r["measure"]): r for r in out if r["region"] == POOLED}
    assert set(pooled) == {("female", "a"), ("male", "a"), ("female", "b"), ("male", "b")}
    assert pooled[("female", "a")]["estimate"] == 4.0
    assert pooled[("male", "b")]["estimate"] == 60.0
    assert pooled[("female", "a")]["std_error"] == pytest.approx(math.sqrt(10.0))
    assert pooled[("female", "b")]["std_error"] == pytest.approx(math.sqrt(20.0))
    per_region = {(r["region"], r["sex"], r["measure"]): r for r in out}
    assert per_region[("two", "male", "b")]["std_error"] == pytest.approx(4.0)


def test_a_pooled_mean_comes_from_pooled_components() -> None:
    """The pooled mean is pooled sum / pooled n, not an average of regional means."""
    query = Query(view="visits", rho=0.1, measures=(Measure(Statistic.MEAN, "los", column="los"),))
    var = {"rows:los": 1.0, "sum:los": 25.0}

    def release(n: float, s: float) -> NodeRelease:
        return node_release([], [((), "rows:los", n), ((), "sum:los", s)], var)

    small = release(10, 100)  # mean 10
    large = release(90, 180)  # mean 2
    out = rows(combine(query, [("small", small), ("large", large)]))
    assert [r["region"] for r in out] == ["small", "large", POOLED]
    assert out[0]["estimate"] == pytest.approx(10.0)
    assert out[1]["estimate"] == pytest.approx(2.0)
    pooled = out[2]
    assert pooled["estimate"] == pytest.approx(280 / 100)  # not (10 + 2) / 2
    assert pooled["n"] == 100.0
    assert pooled["approximate"] is True
    # Fieller: the r with (s - r n)^2 = z^2 (var_s + r^2 var_n), pooled variances 50 and 2.
    for r in (pooled["ci_low"], pooled["ci_high"]):
        assert (280 - r * 100) ** 2 == pytest.approx(Z95**2 * (50 + r * r * 2))
    assert pooled["ci_low"] < 2.8 < pooled["ci_high"]


def test_means_stay_inside_the_public_range() -> None:
    """A noisy sum can make s / n leave [lower, upper]; the estimate and interval never do."""
    query = Query(view="visits", rho=0.1, measures=(Measure(Statistic.MEAN, "los", column="los"),))
    negative = node_release(
        [], [((), "rows:los", 20.0), ((), "sum:los", -650.0)], {"rows:los": 1.0, "sum:los": 1e4}
    )
    huge = node_release(
        [], [((), "rows:los", 3.0), ((), "sum:los", 500.0)], {"rows:los": 1.0, "sum:los": 1e4}
    )
    for r in rows(combine(query, [("neg", negative), ("huge", huge)])):
        assert 0.0 <= r["ci_low"] <= r["estimate"] <= r["ci_high"] <= 30.0
    (neg, big, _) = rows(combine(query, [("neg", negative), ("huge", huge)]))
    assert neg["estimate"] == 0.0
    assert big["estimate"] == 30.0


def test_a_ratio_whose_denominator_is_within_noise_of_zero_shows_the_public_range() -> None:
    query = Query(view="visits", rho=0.1, measures=(Measure(Statistic.RATIO, "r", column="los"),))
    release = node_release(
        [], [((), "sum:los", 40.0), ((), "rows", 2.0)], {"sum:los": 100.0, "rows": 25.0}
    )
    (row, _) = rows(combine(query, [("a", release)]))
    # sum(los) / COUNT(*) is a mean of values in [0, 30]: Fieller is unbounded here.
    assert (row["ci_low"], row["ci_high"]) == (0.0, 30.0)
    assert row["estimate"] == 20.0


def test_mean_and_ratio_of_the_same_sums_get_the_same_interval() -> None:
    mean = Measure(Statistic.MEAN, "m", column="los")
    ratio = Measure(Statistic.RATIO, "r", column="los", denominator=None)
    var = {"rows:los": 4.0, "sum:los": 900.0, "rows": 4.0}
    cells: list[Cell] = [((), "rows:los", 50.0), ((), "sum:los", 400.0), ((), "rows", 50.0)]
    out = rows(
        combine(
            Query(view="visits", rho=0.1, measures=(mean, ratio)),
            [("a", node_release([], cells, var))],
        )
    )
    m, r = out[0], out[1]
    assert (m["estimate"], m["ci_low"], m["ci_high"]) == pytest.approx(
        (r["estimate"], r["ci_low"], r["ci_high"])
    )


def test_a_withheld_cell_is_suppressed_and_the_pooled_row_is_partial() -> None:
    query = Query(view="persons", rho=0.1, group_by=("sex",))
    groups = [("female",), ("male",)]
    a = count_release(groups, [100, 50], variance=4.0)
    b = count_release(groups, [None, 60], variance=4.0)  # type: ignore[list-item]
    out = {(r["region"], r["sex"]): r for r in rows(combine(query, [("a", a), ("b", b)]))}
    assert out[("b", "female")]["suppressed"] is True
    assert out[("b", "female")]["estimate"] is None
    assert out[(POOLED, "female")]["estimate"] == 100.0
    assert out[(POOLED, "female")]["partial"] is True
    assert out[(POOLED, "male")]["estimate"] == 110.0
    assert out[(POOLED, "male")]["partial"] is False


def test_releases_with_different_structures_are_not_pooled() -> None:
    query = Query(view="persons", rho=0.1, group_by=("sex",))
    a = count_release([("female",), ("male",)], [1, 2], variance=1.0)
    b = count_release([("female",), ("unknown",)], [1, 2], variance=1.0)
    with pytest.raises(CatalogMismatchError, match="'a' and 'b' answered with different"):
        combine(query, [("a", a), ("b", b)])


@pytest.mark.parametrize("group_by", [(), ("sex",), ("sex", "age_band")])
def test_zero_releases_give_an_empty_table_with_the_right_schema(
    group_by: tuple[str, ...],
) -> None:
    table = combine(Query(view="persons", rho=0.1, group_by=group_by), [])
    assert table.num_rows == 0
    assert table.schema == pa.schema(
        [("region", pa.string())] + [(c, pa.string()) for c in group_by] + OUTPUT_SCHEMA_TAIL
    )
    for name in ("measure", "estimate", "std_error", "ci_low", "ci_high"):
        assert name in table.column_names


def test_partial_marks_only_the_pooled_rows() -> None:
    query = Query(view="persons", rho=0.1)
    out = rows(combine(query, [("a", count_release([()], [5], 1.0))], partial=True))
    assert [(r["region"], r["partial"]) for r in out] == [("a", False), (POOLED, True)]
    out = rows(combine(query, [("a", count_release([()], [5], 1.0))]))
    assert [r["partial"] for r in out] == [False, False]


def test_a_custom_z() -> None:
    query = Query(view="persons", rho=0.1)
    (row, pooled) = rows(combine(query, [("a", count_release([()], [100], 4.0))], z=1))
    assert (row["ci_low"], row["ci_high"]) == (98.0, 102.0)
    assert pooled["estimate"] == 100.0
