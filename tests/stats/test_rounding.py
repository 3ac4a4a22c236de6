"""Counts a node rounds: their intervals stay honest whatever the count is modulo 5.

A node rounds a count to 5 only where its noise sd is below 5 (ReleaseRules.node_rounds).
There the rounding error is not noise: it is fixed by the count modulo 5, up to 2.5. The
hub bounds it (the interval is widened by 2.5 on each side) instead of averaging it, so the
coverage is at least that of the noise alone, 95%, for every count. Tested per region and
pooled over two regions, for counts with every remainder modulo 5, at two noise levels.
"""

from __future__ import annotations

import math

import pytest

from node import engine
from queries import combine, plan
from queries.results import BudgetStatus, NodeRelease, ReleaseRules
from queries.schema import Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Query
from tests.stats import coverage_rates as h

DRAWS = 3_500
GROUPS = tuple(f"g{i}" for i in range(5))
VIEW = ViewSpec(
    name="people",
    description="one row per person",
    columns=(
        ColumnSpec("person_id", ColumnType.IDENTIFIER),
        ColumnSpec("group", ColumnType.CATEGORY, domain=GROUPS),
    ),
)
CATALOG = Catalog(views=(VIEW,))
RULES = ReleaseRules()  # suppress below 8, round to 5
# Exact counts per group in two regions: every remainder modulo 5, none near the threshold.
EXACT = {"a": [40, 41, 42, 43, 44], "b": [52, 53, 50, 51, 54]}


def _release(compiled: plan.Plan, exact: list[int]) -> NodeRelease:
    releases = engine.calibrations(compiled)
    noisy = engine.add_noise(releases, {"persons": exact})
    shown = engine.withhold_small_cells(compiled, releases, noisy, RULES)
    table = engine.release_table(compiled, releases, shown)
    budget = BudgetStatus(1e6, 0.0, 1e6, 1e-6)
    return engine.node_release(
        releases, table, query_id="r", epsilon=1.0, budget=budget, rules=RULES
    )


@pytest.mark.stats
@pytest.mark.parametrize("sd", [0.5, 2.0])
def test_rounded_counts_cover_at_least_95_percent(sd: float) -> None:
    """Coverage of each rounded count's interval is at least 92.5% over 3,500 releases.

    Only a lower bound: bounding the rounding error makes the interval conservative (up to
    100% when the noise is much finer than the rounding). If a figure's true coverage is 95%
    or more, its number of covering draws falls below 92.5% of 3,500 with probability below
    1e-8 (binomial, checked below), so with 15 figures the test fails falsely with
    probability below 1.5e-7.
    """
    assert h.binomial_below(DRAWS, 0.95, 0.925) < 1e-8
    query = Query(view="people", rho=1 / (2 * sd * sd), group_by=("group",))
    compiled = plan.compile_query(query, CATALOG)
    assert RULES.node_rounds(math.sqrt(engine.calibrations(compiled)[0].variance))
    truth = {(r, g): EXACT[r][i] for r in EXACT for i, g in enumerate(GROUPS)}
    truth |= {(combine.POOLED, g): EXACT["a"][i] + EXACT["b"][i] for i, g in enumerate(GROUPS)}
    covered = dict.fromkeys(truth, 0)
    for _ in range(DRAWS):
        releases = [(r, _release(compiled, exact)) for r, exact in EXACT.items()]
        for row in combine.combine(query, releases).to_pylist():
            key = (row["region"], row["group"])
            covered[key] += row["ci_low"] <= truth[key] <= row["ci_high"]
    rates = {k: v / DRAWS for k, v in covered.items()}
    assert all(rate >= 0.925 for rate in rates.values()), rates
