"""A federated risk-adjusted comparison of care sites against the same comparison pooled.

Prints one JSON object. Four nodes of --persons persons each (synthetic regions, each node
declaring its region's trusts), the COPD pathway's `admitted` adjusted for age band, sex, IMD
quintile and region, compared by care site (docs/models.md, "Comparing care sites").
Reported:

- federated: the wall time of `compare` (signing, the hub's design check, Newton steps and
  the expected step, each a round trip to the four nodes over mutual TLS and charged in
  their ledgers, then the O/E ratios and funnel flags), median of --repeats;
- pooled: the non-private baseline on the pooled rows the nodes serve, read as they build
  them: statsmodels' GLM and each site's O and E = sum of mu (the fit and sums alone, and
  with the reading);
- their ratio, and whether both name the same units outside the 99.8% limits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import statsmodels.api as sm

from coordinator.analyst.client import Federation
from coordinator.learning import funnel
from coordinator.learning.compare import DEFAULT_RHO, adjusting_model, compare
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from node.data.catalog import cohort_view
from node.data.store import OmopStore
from queries.model import ModelSpec
from queries.pathway import Pathway, load_pathways
from queries.spec import Filter

ADJUST = ["age_band", "sex", "imd_quintile", "region"]
WHERE = (
    Filter("sex", ("female", "male")),
    Filter("age_band", ("40-64", "65-79", "80+")),
    Filter("imd_quintile", ("1", "2", "3", "4", "5")),
)
ROWS_SQL = f"""
    SELECT CAST(age_band AS VARCHAR) AS age_band, CAST(sex AS VARCHAR) AS sex,
           CAST(imd_quintile AS VARCHAR) AS imd_quintile,
           CAST(admitted AS VARCHAR) AS admitted, CAST(care_site AS VARCHAR) AS care_site
    FROM {synth.KNOWN_PATHWAY}
"""  # noqa: S608 - a constant


def _sites(region: str) -> tuple[str, ...]:
    return tuple(t.code for t in synth.region_trusts(region))


def _read(folders: dict[str, Path], pathway: Pathway) -> tuple[dict[str, pa.Table], float]:
    """Each node's view rows (views built as the node does, untimed) and the read time."""
    rows: dict[str, pa.Table] = {}
    seconds = 0.0
    for region, folder in folders.items():
        store = OmopStore(
            folder,
            [pathway],
            reference_date=LocalFederation.reference_date,
            imd_lookup=folder / synth.LOOKUP_FILE,
            recheck_s=None,
            care_sites=_sites(region),
        )
        try:
            started = time.perf_counter()
            rows[region] = store.query(ROWS_SQL)
            seconds += time.perf_counter() - started
        finally:
            store.close()
    return rows, seconds


def _pooled(model: ModelSpec, pathway: Pathway, rows: dict[str, pa.Table]) -> dict[str, Any]:
    """The non-private comparison: the pooled fit, then O and E per site and their flags."""
    started = time.perf_counter()
    _, x, y = synth.pooled_design(model, cohort_view(pathway), rows)
    keep = []
    for table in rows.values():
        mask = pa.array(np.ones(table.num_rows, dtype=np.bool_))
        for f in WHERE:
            mask = pc.and_(mask, pc.is_in(table[f.column], pa.array(f.values)))
        keep.append(np.asarray(table.filter(mask).column("care_site").to_pylist(), dtype=object))
    site = np.concatenate(keep)
    design_s = time.perf_counter() - started
    started = time.perf_counter()
    params = sm.GLM(y, x, family=sm.families.Binomial()).fit().params
    mu = 1.0 / (1.0 + np.exp(-(x @ np.asarray(params))))
    outliers = []
    for code in dict.fromkeys(site.tolist()):
        o, e = float(y[site == code].sum()), float(mu[site == code].sum())
        low, high = funnel.limits(e, 0.998)
        if e > 0 and not low <= o / e <= high:
            outliers.append(str(code))
    return {"fit_s": time.perf_counter() - started, "design_s": design_s, "outliers": outliers}


def main() -> None:
    """Run the benchmark and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=250_000, help="per node (4 nodes)")
    ap.add_argument("--rho", type=float, default=DEFAULT_RHO, help="the fit's rho at each node")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    model = adjusting_model("copd", "admitted", ADJUST, args.rho, by="care_site", where=WHERE)
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    with tempfile.TemporaryDirectory(prefix="chc-bench-compare-") as tmp:
        root = Path(tmp)
        total = args.persons * len(synth.REGIONS)
        folders = synth.generate_federation(total, root / "data", seed=args.seed)
        rows, read_s = _read(folders, pathway)
        setups = tuple(
            NodeSetup(
                name=r.slug,
                omop=folders[r.slug],
                imd_lookup=folders[r.slug] / synth.LOOKUP_FILE,
                pathways=(synth.KNOWN_PATHWAY,),
                care_sites=_sites(r.slug),
                total_rho=1e6,
                max_rho_per_query=max(1.0, args.rho),
            )
            for r in synth.REGIONS
        )
        with (
            LocalFederation(workdir=root, nodes=setups, startup_timeout_s=600.0) as fed,
            Federation(fed.hub_address, fed.analyst_identity) as client,
        ):
            times, named = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = compare(client, model, by="care_site", deadline_s=600.0)
                times.append(time.perf_counter() - started)
                named.append(list(result.outliers))
    pooled = _pooled(model, pathway, rows)
    federated_s = statistics.median(times)
    print(
        json.dumps(
            {
                "benchmark": "compare by care site (federated DP O/E vs statsmodels, pooled)",
                "persons_per_node": args.persons,
                "nodes": len(folders),
                "rho_per_node": args.rho,
                "round_trips": model.steps,
                "federated": {
                    "compare_seconds_median": round(federated_s, 3),
                    "compare_seconds": [round(t, 3) for t in times],
                    "seconds_per_round_trip": round(federated_s / model.steps, 3),
                    "outliers_by_run": named,
                },
                "pooled": {
                    "fit_and_sums_seconds": round(pooled["fit_s"], 3),
                    "read_design_fit_and_sums_seconds": round(
                        read_s + pooled["design_s"] + pooled["fit_s"], 3
                    ),
                    "outliers": pooled["outliers"],
                },
                "ratio_federated_vs_pooled_fit": round(federated_s / pooled["fit_s"], 2),
                "ratio_federated_vs_pooled_read_design_and_fit": round(
                    federated_s / (read_s + pooled["design_s"] + pooled["fit_s"]), 2
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
