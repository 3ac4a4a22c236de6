"""One site, about 1,000,000 visits: "per sex: count, mean and median length of stay" at
epsilon 1, three ways, timed interleaved (one run of each in turn, so that a busy machine slows
all three alike). Prints JSON.

- duckdb: the same aggregate, exact, straight in DuckDB on the node's own visits view
  in-process (COUNT(*), AVG, MEDIAN by sex);
- engine: the node's engine in-process on the same views: plan, the exact scan, OpenDP noise,
  the node's disclosure rules and the release table (what a node does between the charge
  checks; no gRPC, no ledger);
- federated: end to end as an analyst sees it, through the hub to one node over mutual TLS
  (sign, fan out, plan, scan, noise, charge the ledger, combine).

The goal (issue 16) is engine <= 1.2x duckdb. The synthetic region is sized so that its visits
view holds about --visits rows (from the visits per person of a small pilot region); the JSON
gives the real count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.query_engine import interleaved
from bench.timing import summary
from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from node import engine
from node.data.store import OmopStore
from queries import plan
from queries.pathway import load_pathways
from queries.results import ReleaseRules
from queries.spec import rho_from_epsilon
from queries.sql import parse_sql

REF = date(2025, 12, 31)
REGION = "nwc"
SQL = (
    "SELECT sex, COUNT(*) AS n, AVG(length_of_stay) AS mean_los, "
    "MEDIAN(length_of_stay) AS median_los FROM visits GROUP BY sex"
)
BASELINE = (
    "SELECT sex, COUNT(*), AVG(length_of_stay), MEDIAN(length_of_stay) FROM visits GROUP BY sex"
)
PILOT_PERSONS = 2_000


def _visits(folder: Path) -> int:
    store = OmopStore(folder, load_pathways(None), reference_date=REF)
    try:
        return int(store.query("SELECT COUNT(*) AS n FROM visits").column(0)[0].as_py())
    finally:
        store.close()


def _region(root: Path, visits: int) -> tuple[Path, int]:
    """A synthetic region whose visits view holds about `visits` rows, and its persons."""
    region = synth.region_by_slug(REGION)
    pilot = root / "pilot"
    synth.generate_region(region, PILOT_PERSONS, pilot, seed=1)
    persons = max(PILOT_PERSONS, round(visits * PILOT_PERSONS / max(1, _visits(pilot))))
    folder = root / "data" / REGION
    synth.generate_region(region, persons, folder, seed=2)
    return folder, persons


def main() -> None:
    """Run and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--visits", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-6)
    args = ap.parse_args()
    rho = rho_from_epsilon(args.epsilon, args.delta)
    query = parse_sql(SQL, rho=rho)
    rules = ReleaseRules()
    with tempfile.TemporaryDirectory(prefix="chc-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        folder, persons = _region(root, args.visits)
        gen_s = time.perf_counter() - t
        store = OmopStore(folder, load_pathways(None), reference_date=REF)
        visits = int(store.query("SELECT COUNT(*) AS n FROM visits").column(0)[0].as_py())

        def in_engine() -> object:
            compiled = plan.compile_query(query, store.catalog())
            releases = engine.calibrations(compiled)
            with store.snapshot() as views:
                exact = engine.exact_values(compiled, views)
            noisy = engine.add_noise(releases, exact)
            shown = engine.withhold_small_cells(compiled, releases, noisy, rules)
            return engine.release_table(compiled, releases, shown)

        setup = NodeSetup(name=REGION, omop=folder, total_rho=1e6, max_rho_per_query=10.0)
        t = time.perf_counter()
        with LocalFederation(workdir=root, nodes=(setup,), startup_timeout_s=600) as fed:
            startup_s = time.perf_counter() - t
            with Federation(fed.hub_address, fed.analyst_identity) as client:
                timed = interleaved(
                    {
                        "duckdb": lambda: store.query(BASELINE),
                        "engine": in_engine,
                        "federated": lambda: client.query(query, deadline_s=120),
                    },
                    args.repeats,
                )
        compiled = plan.compile_query(query, store.catalog())
        store.close()
    p50 = {k: statistics.median(v) for k, v in timed.items()}
    print(
        json.dumps(
            {
                "benchmark": "single_site",
                "visits": visits,
                "persons": persons,
                "query": SQL,
                "epsilon": args.epsilon,
                "delta": args.delta,
                "rho": rho,
                "cells": compiled.cells,
                "components": [c.key for c in compiled.components],
                "synth_seconds": round(gen_s, 1),
                "federation_startup_seconds": round(startup_s, 1),
                "repeats": args.repeats,
                "duckdb_ms": summary(timed["duckdb"]),
                "engine_ms": summary(timed["engine"]),
                "federated_ms": summary(timed["federated"]),
                "engine_ratio_p50": round(p50["engine"] / p50["duckdb"], 2),
                "federated_ratio_p50": round(p50["federated"] / p50["duckdb"], 2),
                "goal_engine_ratio_p50": 1.2,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
