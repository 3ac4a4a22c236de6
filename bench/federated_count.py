"""Federated DP count latency over 4 loopback nodes versus the same aggregate in DuckDB.

Prints one JSON object. The federated figure is end to end as an analyst sees it: sign,
hub fan-out over mutual TLS, four nodes plan, aggregate, charge, noise, hub combine. The
baselines run the same count of distinct children with asthma by sex on the pooled data:
`duckdb_raw` derives the cohort from the Parquet files each time (what a node would do with
no start-up views), `duckdb_cohort` reads a pre-built cohort table (what a node does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import duckdb

from bench.timing import summary, timings
from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from queries.spec import Query

REF = date(2025, 12, 31)


def _pooled_cohort_sql(folders: dict[str, Path]) -> str:
    """Children (0-17) with asthma across all regions, one row per (region, person)."""
    parts = []
    for slug, folder in folders.items():
        parts.append(
            f"""
            SELECT '{slug}' AS region, p.person_id, p.gender_concept_id AS sex
            FROM read_parquet('{folder / "person.parquet"}') AS p
            WHERE date_sub('year', make_date(p.year_of_birth, coalesce(p.month_of_birth, 7),
                           coalesce(p.day_of_birth, 1)), DATE '{REF.isoformat()}') BETWEEN 0 AND 17
              AND p.person_id IN (SELECT person_id
                                  FROM read_parquet('{folder / "condition_occurrence.parquet"}')
                                  WHERE condition_concept_id = 317009)"""  # noqa: S608 - own paths
        )
    return " UNION ALL ".join(parts)


def main() -> None:
    """Run the benchmark and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=1_000_000, help="total across 4 regions")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rho", type=float, default=0.001)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chc-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        folders = synth.generate_federation(args.persons, root / "data", seed=1)
        gen_s = time.perf_counter() - t
        setups = tuple(
            NodeSetup(name=r.slug, omop=folders[r.slug], total_rho=1e6, max_rho_per_query=1.0)
            for r in synth.REGIONS
        )
        query = Query(view="asthma_children", rho=args.rho, group_by=("sex",))
        with (
            LocalFederation(workdir=root, nodes=setups) as fed,
            Federation(fed.hub_address, fed.analyst_identity) as client,
        ):
            client.query(query)  # warm-up: channels, caches
            federated = timings(lambda: client.query(query), args.repeats, warmup=False)

        con = duckdb.connect(config={"threads": 2})
        cohort_select = _pooled_cohort_sql(folders)
        raw_sql = f"SELECT sex, count(*) FROM ({cohort_select}) GROUP BY sex"  # noqa: S608
        con.sql(raw_sql).fetchall()
        raw = timings(lambda: con.sql(raw_sql).fetchall(), args.repeats, warmup=False)
        con.execute(f"CREATE TABLE cohort AS {cohort_select}")
        cohort_sql = "SELECT sex, count(DISTINCT (region, person_id)) FROM cohort GROUP BY sex"
        con.sql(cohort_sql).fetchall()
        cohort = timings(lambda: con.sql(cohort_sql).fetchall(), args.repeats, warmup=False)

    fed_s, raw_s, cohort_s = summary(federated), summary(raw), summary(cohort)
    print(
        json.dumps(
            {
                "benchmark": "federated_count",
                "persons_total": args.persons,
                "nodes": 4,
                "repeats": args.repeats,
                "synth_seconds": round(gen_s, 2),
                "federated": fed_s,
                "duckdb_raw": raw_s,
                "duckdb_cohort": cohort_s,
                "ratio_p50_vs_duckdb_raw": round(fed_s["p50_ms"] / raw_s["p50_ms"], 2),
                "ratio_p50_vs_duckdb_cohort": round(fed_s["p50_ms"] / cohort_s["p50_ms"], 2),
                "python": sys.version.split()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
