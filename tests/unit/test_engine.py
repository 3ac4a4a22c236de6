"""The exact path of the query engine: SQL results, and sensitivities checked empirically.

For each kind of measure, on random data that respects the view's per-person row cap,
removing any one person moves every released vector by at most its claimed L2 sensitivity
(the privacy unit: "add or remove one person, the exact aggregate moves by at most the
sensitivity").
"""

from __future__ import annotations

import math
import random
import statistics

import duckdb
import pyarrow as pa
import pytest

from node import engine
from queries import combine, plan
from queries.results import BudgetStatus, NodeRelease, ReleaseRules
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Filter, Measure, Query, Statistic

CAP = 4
VIEW = ViewSpec(
    name="stays",
    description="test view: up to 4 stays per person",
    max_rows_per_person=CAP,
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("sex", ColumnType.CATEGORY, domain=("female", "male")),
        ColumnSpec("kind", ColumnType.CATEGORY, domain=("a", "b", "c"), person_level=False),
        ColumnSpec("los", ColumnType.INTEGER, lower=0, upper=30, person_level=False),
        ColumnSpec("cost", ColumnType.FLOAT, lower=-50.0, upper=1500.0, person_level=False),
    ),
)
CATALOG = Catalog(views=(VIEW,))


class Runner:
    """A real DuckDB holding the view as a table (what OmopStore is to a node)."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.con = duckdb.connect()
        table = pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [
                    ("person_id", pa.int64()),
                    ("sex", pa.string()),
                    ("kind", pa.string()),
                    ("los", pa.int64()),
                    ("cost", pa.float64()),
                ]
            ),
        )
        self.con.register("src", table)
        self.con.execute("CREATE TABLE stays AS SELECT * FROM src")

    def query(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()


def _data(rng: random.Random, persons: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for pid in range(1, persons + 1):
        sex = rng.choice(["female", "male"])
        for _ in range(rng.randint(0, CAP)):
            rows.append(
                {
                    "person_id": pid,
                    "sex": sex,
                    "kind": rng.choice(["a", "b", "c", "zzz"]),  # zzz: outside the domain
                    # Values beyond the public bounds must be clamped, never trusted.
                    "los": rng.choice([rng.randint(0, 40), None]),
                    "cost": rng.uniform(-200, 3000),
                }
            )
    return rows


MEASURES = [
    Measure(Statistic.COUNT, "persons"),
    Measure(Statistic.COUNT_ROWS, "rows"),
    Measure(Statistic.SUM, "sum_los", column="los"),
    Measure(Statistic.SUM, "sum_cost", column="cost"),
    Measure(Statistic.MEAN, "mean_cost", column="cost", clamp=(0.0, 1000.0)),
    Measure(Statistic.QUANTILE, "median_los", column="los", quantile=0.5),
    Measure(Statistic.HISTOGRAM, "hist_cost", column="cost", bins=7),
    Measure(Statistic.RATIO, "los_per_stay", column="los"),
]


@pytest.mark.parametrize("group_by", [(), ("sex",), ("kind",), ("sex", "kind")])
def test_removing_one_person_moves_each_vector_by_at_most_its_sensitivity(
    group_by: tuple[str, ...],
) -> None:
    rng = random.Random(hash(group_by) & 0xFFFF)
    rows = _data(rng, 60)
    compiled = plan.compile_query(
        Query(view="stays", rho=1.0, measures=tuple(MEASURES), group_by=group_by), CATALOG
    )
    full = engine.exact_values(compiled, Runner(rows))
    tight = {c.key: 0.0 for c in compiled.components}
    for pid in rng.sample(range(1, 61), 25):
        without = engine.exact_values(compiled, Runner([r for r in rows if r["person_id"] != pid]))
        for c in compiled.components:
            diff = math.sqrt(
                sum((a - b) ** 2 for a, b in zip(full[c.key], without[c.key], strict=True))
            )
            assert diff <= c.sensitivity + 1e-9, (c.key, pid, diff, c.sensitivity)
            tight[c.key] = max(tight[c.key], diff / c.sensitivity)
    # The bounds are not vacuous: some person moves each count vector noticeably.
    assert tight["rows"] > 0.4
    assert tight["persons"] > 0.5


def test_exact_values_match_a_hand_computation() -> None:
    rows = _data(random.Random(5), 40)
    query = Query(view="stays", rho=1.0, measures=tuple(MEASURES), group_by=("kind",))
    compiled = plan.compile_query(query, CATALOG)
    exact = engine.exact_values(compiled, Runner(rows))
    for g, (kind,) in enumerate(compiled.domain):
        mine = [r for r in rows if r["kind"] == kind]
        assert exact["persons"][g] == len({r["person_id"] for r in mine})
        assert exact["rows"][g] == len(mine)
        los = [min(30, max(0, int(r["los"]))) for r in mine if r["los"] is not None]  # type: ignore[call-overload]
        assert exact["sum:los"][g] == sum(los)
        assert exact["bins:los"][g * 31 : (g + 1) * 31] == [los.count(v) for v in range(31)]
    # Groups outside the public domain ('zzz') are never released.
    assert len(compiled.domain) == 3


def test_fixed_point_sums_keep_four_significant_digits() -> None:
    compiled = plan.compile_query(
        Query(view="stays", rho=1.0, measures=(Measure(Statistic.SUM, "s", column="cost"),)),
        CATALOG,
    )
    (c,) = compiled.components
    assert c.unit == 1.0  # |bounds| up to 1500: units of 1
    rows = [{"person_id": 1, "sex": "male", "kind": "a", "los": 1, "cost": 1234.4}]
    assert engine.exact_values(compiled, Runner(rows))["sum:cost"] == [1234]
    mean = plan.compile_query(
        Query(
            view="stays",
            rho=1.0,
            measures=(Measure(Statistic.VARIANCE, "m", column="cost", clamp=(0.0, 2.5)),),
        ),
        CATALOG,
    )
    sums = {c.kind.value: c for c in mean.components}
    assert sums["sum"].unit == pytest.approx(0.001)
    assert sums["sumsq"].unit == pytest.approx(0.001)


def make_release(compiled: plan.Plan, values: dict[str, tuple[int, ...]]) -> NodeRelease:
    """A NodeRelease carrying the given integers with the plan's calibrated noise variances."""
    releases = engine.calibrations(compiled)
    table = engine.release_table(compiled, releases, values)
    budget = BudgetStatus(10, 1, 1, 1e-6)
    return engine.node_release(
        releases, table, query_id="t", epsilon=1.0, budget=budget, rules=None
    )


def _exact_release(compiled: plan.Plan, runner: Runner) -> NodeRelease:
    """A release carrying the exact values: for testing combine without noise."""
    exact = engine.exact_values(compiled, runner)
    return make_release(compiled, {k: tuple(v) for k, v in exact.items()})


def test_pooled_statistics_from_exact_components_equal_the_pooled_truth() -> None:
    rng = random.Random(11)
    regions = {name: _data(rng, 300) for name in ("r1", "r2", "r3")}
    query = Query(
        view="stays",
        rho=1.0,
        measures=(
            Measure(Statistic.COUNT_ROWS, "n"),
            Measure(Statistic.MEAN, "mean_los", column="los"),
            Measure(Statistic.VARIANCE, "var_los", column="los"),
            Measure(Statistic.QUANTILE, "median_los", column="los", quantile=0.5),
            Measure(Statistic.RATIO, "los_per_stay", column="los"),
        ),
        where=(Filter("kind", ("a", "b")),),
    )
    compiled = plan.compile_query(query, CATALOG)
    releases = [(k, _exact_release(compiled, Runner(v))) for k, v in regions.items()]
    table = combine.combine(query, releases)
    pooled = {r["measure"]: r for r in table.to_pylist() if r["region"] == combine.POOLED}
    rows = [r for v in regions.values() for r in v if r["kind"] in ("a", "b")]
    los = [min(30, max(0, int(r["los"]))) for r in rows if r["los"] is not None]  # type: ignore[call-overload]
    assert pooled["n"]["estimate"] == len(rows)
    assert pooled["mean_los"]["estimate"] == pytest.approx(statistics.fmean(los))
    assert pooled["var_los"]["estimate"] == pytest.approx(statistics.variance(los))
    # Integer grid with one bin per value: the median is the lower median, a value.
    assert pooled["median_los"]["estimate"] == statistics.median_low(los)
    assert pooled["los_per_stay"]["estimate"] == pytest.approx(sum(los) / len(rows))
    for r in pooled.values():
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"]


def test_the_node_withholds_small_cells_and_rounds_counts() -> None:
    """The node's own [release] rules, on noisy values: small groups withheld whole, counts
    rounded (exactly, even beyond 2^53) where their noise is finer than the rounding, sums
    left as they are, bins not withheld one by one."""
    query = Query(
        view="stays",
        rho=1000.0,  # noise sd well below 5: counts are rounded
        group_by=("sex",),
        measures=(
            Measure(Statistic.COUNT, "n"),
            Measure(Statistic.SUM, "s", column="los"),
            Measure(Statistic.HISTOGRAM, "h", column="los", bins=3),
        ),
    )
    compiled = plan.compile_query(query, CATALOG)
    releases = engine.calibrations(compiled)
    big = 2**60 + 3
    noisy = {"persons": (5, big), "sum:los": (41, 43), "bins:los/3": (1, 2, 1, 2, 50, 3)}
    rules = ReleaseRules(suppress_below=8, round_to=5)
    shown = engine.withhold_small_cells(compiled, releases, noisy, rules)
    # 5 < 8: female withheld; 2^60 + 3 = ...979 rounds to ...980, which floats cannot hold.
    assert shown["persons"] == [None, 1_152_921_504_606_846_980]
    assert shown["sum:los"] == [None, 43]
    assert shown["bins:los/3"] == [None, None, None, 0, 50, 5]
    off = ReleaseRules(suppress_below=0, round_to=1)
    none = engine.withhold_small_cells(compiled, releases, noisy, off)
    assert none == {k: list(v) for k, v in noisy.items()}
    # With noise coarser than the rounding step, the node withholds but does not round.
    coarse = plan.compile_query(
        Query(view="stays", rho=0.001, group_by=("sex",), measures=query.measures), CATALOG
    )
    kept = engine.withhold_small_cells(coarse, engine.calibrations(coarse), noisy, rules)
    assert kept["persons"] == [None, big]
    assert kept["bins:los/3"] == [None, None, None, 2, 50, 3]
