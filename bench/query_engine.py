"""A six-statistic grouped query over 4 nodes, against the same aggregates in DuckDB; and the
accuracy of pooled means and medians against averaging per-region estimates. Prints JSON.

Latency: end to end as an analyst sees it (sign, hub fan-out over mutual TLS, 4 nodes plan,
aggregate, charge the ledger, noise; hub combine and disclosure rules), against the exact
aggregates run straight in DuckDB on the pooled persons table (all regions in one table).
The two are timed interleaved (one baseline run, one federated run, and so on), so that the
machine's noise falls on both alike; ratio_p50 is the ratio of their medians.

Accuracy at the given rho: relative error of the pooled mean and median of age against the
exact pooled values, for chc's pooling (pooled sums and pooled DP histograms) and for the
naive alternative of averaging the four regional estimates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa

from bench.timing import percentile
from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from node.data.store import OmopStore
from queries.combine import POOLED
from queries.pathway import load_pathways
from queries.sql import parse_sql

REF = date(2025, 12, 31)
SQL = (
    "SELECT sex, imd_quintile, COUNT(*) AS n, SUM(age) AS total_age, AVG(age) AS mean_age, "
    "STDDEV(age) AS sd_age, MEDIAN(age) AS median_age, QUANTILE(age, 0.9) AS p90_age "
    "FROM persons GROUP BY sex, imd_quintile"
)
BASELINE = (
    "SELECT sex, imd_quintile, COUNT(*), SUM(age), AVG(age), STDDEV_SAMP(age), "
    "MEDIAN(age), QUANTILE_CONT(age, 0.9) FROM persons GROUP BY sex, imd_quintile"
)
# Accuracy on everyone and on a small cohort, where DP noise matters more.
ACCURACY_VIEWS = ("persons", "asthma_children")


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Wall-clock milliseconds of `repeats` rounds, each calling every run once in turn.

    Alternating the runs puts any slow spell of a shared machine on all of them alike, so
    their ratio is steadier than that of runs timed one after the other.
    """
    if warmup:
        for fn in runs.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    """Run and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons-per-node", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--accuracy-runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chc-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        folders = {r.slug: root / "data" / r.slug for r in synth.REGIONS}
        for i, r in enumerate(synth.REGIONS):
            synth.generate_region(r, args.persons_per_node, folders[r.slug], seed=100 + i)
        gen_s = time.perf_counter() - t
        # The pooled truth and the DuckDB baseline, from the nodes' own persons views.
        pathways = load_pathways(None)
        tables: dict[str, list[pa.Table]] = {v: [] for v in ACCURACY_VIEWS}
        for slug, folder in folders.items():
            store = OmopStore(folder, pathways, reference_date=REF)
            for view in ACCURACY_VIEWS:
                part = store.query(f"SELECT sex, imd_quintile, age FROM {view}")  # noqa: S608
                tables[view].append(part.append_column("region", pa.array([slug] * part.num_rows)))
            store.close()
        con = duckdb.connect(config={"threads": 2})
        truth: dict[str, tuple[float, float]] = {}
        for view in ACCURACY_VIEWS:
            con.register("pooled", pa.concat_tables(tables[view]))
            con.execute(f"CREATE TABLE {view} AS SELECT * FROM pooled")  # noqa: S608 - our own view names
            con.unregister("pooled")
            ((mean, median),) = con.sql(f"SELECT AVG(age), MEDIAN(age) FROM {view}").fetchall()  # noqa: S608
            truth[view] = (float(mean), float(median))
        setups = tuple(
            NodeSetup(name=s, omop=f, total_rho=1e6, max_rho_per_query=10.0)
            for s, f in folders.items()
        )
        t = time.perf_counter()
        with LocalFederation(workdir=root, nodes=setups, startup_timeout_s=600) as fed:
            startup_s = time.perf_counter() - t
            with Federation(fed.hub_address, fed.analyst_identity) as client:
                query = parse_sql(SQL, rho=args.rho)
                timed = interleaved(
                    {
                        "duckdb": lambda: con.sql(BASELINE).fetchall(),
                        "federated": lambda: client.query(query, deadline_s=120),
                    },
                    args.repeats,
                )
                federated, baseline = timed["federated"], timed["duckdb"]
                errors: dict[str, list[float]] = {}
                for view in ACCURACY_VIEWS:
                    acc_query = parse_sql(
                        f"SELECT AVG(age) AS mean_age, MEDIAN(age) AS median_age FROM {view}",  # noqa: S608
                        rho=args.rho,
                    )
                    for _ in range(args.accuracy_runs):
                        rows = client.query(acc_query).table.to_pylist()
                        for i, stat in enumerate(("mean", "median")):
                            mine = [r for r in rows if r["measure"] == f"{stat}_age"]
                            pooled = next(r["estimate"] for r in mine if r["region"] == POOLED)
                            regional = [r["estimate"] for r in mine if r["region"] != POOLED]
                            true = truth[view][i]
                            for how, value in (
                                ("pooled", pooled),
                                ("averaged", statistics.fmean(regional)),
                            ):
                                key = f"{view}.{how}_{stat}"
                                errors.setdefault(key, []).append(abs(value - true) / true)
    fed_p50, base_p50 = statistics.median(federated), statistics.median(baseline)
    print(
        json.dumps(
            {
                "benchmark": "query_engine",
                "persons_per_node": args.persons_per_node,
                "nodes": 4,
                "statistics": 6,
                "groups": "sex x imd_quintile",
                "synth_seconds": round(gen_s, 1),
                "federation_startup_seconds": round(startup_s, 1),
                "federated_p50_ms": round(fed_p50, 1),
                "federated_p95_ms": round(percentile(federated, 95), 1),
                "duckdb_pooled_p50_ms": round(base_p50, 1),
                "duckdb_pooled_p95_ms": round(percentile(baseline, 95), 1),
                "ratio_p50": round(fed_p50 / base_p50, 2),
                "rho": args.rho,
                "truth_mean_median_age": {k: [round(v[0], 3), v[1]] for k, v in truth.items()},
                "mean_relative_error": {k: f"{statistics.fmean(v):.2e}" for k, v in errors.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
