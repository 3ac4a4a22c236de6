"""The median (and p90) of length of stay on 1,000,000 visits at epsilon 1, single site.

Prints one JSON object:
- accuracy: relative error of the DP median against the exact one (median over --releases
  releases), and the coverage of the 95% interval over those releases and over --draws
  further noise draws on the same exact components;
- latency: the node's whole path in-process (plan, the exact histogram in DuckDB, OpenDP
  noise, the release table, then the hub's estimator), against the exact
  `quantile_disc(length_of_stay, 0.5)` straight in DuckDB on the same table, and the ratio.

The data: a visits table shaped like hospital stays (most 0-3 days, a long tail to the public
bound of 60), up to 50 visits per person as the node's `visits` view allows, so the
sensitivity is the view's (50 rows per person).
"""

from __future__ import annotations

import argparse
import json
import statistics

import duckdb
import numpy as np
import pyarrow as pa

from bench.timing import summary, timings
from node import engine
from node.data.catalog import visits_view
from queries import combine, mechanisms, plan
from queries.results import BudgetStatus, NodeRelease
from queries.schema import Catalog
from queries.spec import Measure, Query, Statistic, rho_from_epsilon


class Store:
    """DuckDB over the benchmark's visits table (what OmopStore is to a node)."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def query(self, sql: str) -> pa.Table:
        return self.con.cursor().sql(sql).to_arrow_table()


def _visits(rows: int, seed: int) -> pa.Table:
    # Test data, not privacy noise: numpy's generator is fine here.
    rng = np.random.default_rng(seed)
    los = np.minimum(rng.negative_binomial(1, 0.25, size=rows), 60)
    person = rng.integers(0, rows // 4, size=rows)
    return pa.table(
        {
            "person_id": pa.array(person, pa.int64()),
            "length_of_stay": pa.array(los, pa.int64()),
            "sex": pa.array(rng.choice(["female", "male"], size=rows)),
        }
    )


def _release(compiled: plan.Plan, exact: dict[str, list[int]]) -> NodeRelease:
    releases = engine.calibrations(compiled)
    noisy = engine.add_noise(releases, exact)
    table = engine.release_table(compiled, releases, noisy)
    budget = BudgetStatus(10.0, 0.0, 1.0, 1e-6)
    return engine.node_release(
        releases, table, query_id="bench", epsilon=0.0, budget=budget, rules=None
    )


def main() -> None:
    """Run and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--visits", type=int, default=1_000_000)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-6)
    ap.add_argument("--releases", type=int, default=50)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    con = duckdb.connect(":memory:", config={"threads": 2})
    con.register("src", _visits(args.visits, seed=7))
    con.execute("CREATE TABLE visits AS SELECT * FROM src")
    con.unregister("src")
    store = Store(con)
    catalog = Catalog(views=(visits_view(),))
    rho = rho_from_epsilon(args.epsilon, args.delta)
    query = Query(
        view="visits",
        rho=rho,
        measures=(
            Measure(Statistic.QUANTILE, "median_los", column="length_of_stay", quantile=0.5),
            Measure(Statistic.QUANTILE, "p90_los", column="length_of_stay", quantile=0.9),
        ),
    )
    truth = {
        "median_los": float(
            con.sql("SELECT quantile_disc(length_of_stay, 0.5) FROM visits").fetchall()[0][0]
        ),
        "p90_los": float(
            con.sql("SELECT quantile_disc(length_of_stay, 0.9) FROM visits").fetchall()[0][0]
        ),
    }

    def federated() -> dict[str, dict[str, object]]:
        compiled = plan.compile_query(query, catalog)
        release = _release(compiled, engine.exact_values(compiled, store))
        table = combine.combine(query, [("site", release)])
        return {r["measure"]: r for r in table.to_pylist() if r["region"] == "site"}

    def exact_duckdb() -> None:
        store.query("SELECT quantile_disc(length_of_stay, 0.5) FROM visits")

    ours = timings(federated, args.repeats)
    baseline = timings(exact_duckdb, args.repeats)

    compiled = plan.compile_query(query, catalog)
    exact = engine.exact_values(compiled, store)
    errors: dict[str, list[float]] = {k: [] for k in truth}
    covered = dict.fromkeys(truth, 0)
    for i in range(args.releases + args.draws):
        table = combine.combine(query, [("site", _release(compiled, exact))])
        for r in table.to_pylist():
            if r["region"] != "site":
                continue
            name = r["measure"]
            if i < args.releases:
                errors[name].append(abs(r["estimate"] - truth[name]) / truth[name])
            covered[name] += r["ci_low"] <= truth[name] <= r["ci_high"]
    total = args.releases + args.draws
    shares = compiled.rho_shares()
    (bins,) = compiled.components
    print(
        json.dumps(
            {
                "benchmark": "median_length_of_stay",
                "visits": args.visits,
                "epsilon": args.epsilon,
                "delta": args.delta,
                "rho": rho,
                "noise_sigma_per_bin": mechanisms.calibrate(
                    bins.sensitivity, shares[bins.key]
                ).scale,
                "truth": truth,
                "relative_error_median_over_releases": {
                    k: statistics.median(v) for k, v in errors.items()
                },
                "interval_coverage": {k: v / total for k, v in covered.items()},
                "coverage_releases": total,
                "chc_ms": summary(ours),
                "duckdb_exact_ms": summary(baseline),
                "ratio_p50": statistics.median(ours) / statistics.median(baseline),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
