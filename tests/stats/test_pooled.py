"""Coverage of pooled intervals over four nodes' independent DP releases.

Each test draws R = 2,000 complete federated releases (four regions, fresh noise each time)
on fixed data, combines them exactly as the hub does, and counts how often the 95% interval
covers the truth. The coverage estimate's standard error is sqrt(0.95 * 0.05 / R) = 0.0049,
so a +/- 2.7% band is 5.5 standard errors: with four figures checked, a false failure has
probability below 2e-7.
"""

from __future__ import annotations

import random

from node import engine
from queries import combine, plan
from queries.results import NodeRelease
from queries.spec import Measure, Query, Statistic
from tests.unit.test_engine import CATALOG, Runner, _data, make_release

R = 2_000
BAND = 0.027


def _release(compiled: plan.Plan, exact: dict[str, list[int]]) -> NodeRelease:
    noisy = engine.add_noise(engine.calibrations(compiled), exact)
    return make_release(compiled, noisy)


def test_pooled_count_and_ratio_intervals_cover_95_percent() -> None:
    rng = random.Random(3)
    regions = {f"r{i}": Runner(_data(rng, 400)) for i in range(4)}
    query = Query(
        view="stays",
        rho=0.02,
        measures=(
            Measure(Statistic.COUNT_ROWS, "stays"),
            Measure(Statistic.RATIO, "los_per_stay", column="los"),
        ),
        group_by=("sex",),
    )
    compiled = plan.compile_query(query, CATALOG)
    exact = {k: engine.exact_values(compiled, r) for k, r in regions.items()}
    # The truth, from the exact components (pooled over regions), per (sex, measure).
    truth: dict[tuple[str, str], float] = {}
    for g, (sex,) in enumerate(compiled.domain):
        rows = sum(e["rows"][g] for e in exact.values())
        los = sum(e["sum:los"][g] for e in exact.values())
        den = rows
        truth[(sex, "stays")] = rows
        truth[(sex, "los_per_stay")] = los / den
    covered = dict.fromkeys(truth, 0)
    for _ in range(R):
        releases = [(k, _release(compiled, e)) for k, e in exact.items()]
        table = combine.combine(query, releases)
        for row in table.to_pylist():
            if row["region"] != combine.POOLED:
                continue
            key = (row["sex"], row["measure"])
            if row["ci_low"] <= truth[key] <= row["ci_high"]:
                covered[key] += 1
    for key, hits in covered.items():
        assert abs(hits / R - 0.95) < BAND, (key, hits / R)
