"""Training a DP logistic model over Flower, against the same model trained centrally.

Prints one JSON object. Two nodes (synthetic regions nenc and nwc, --persons over the four
regions generated), a LocalFederation with learning on (the hub's SuperLink, each node's
supervised SuperNode relaying every round to the node's own FitStep), and the synthetic
known model's covariates without region (COPD emergency admissions), trained by DP gradient
descent for --rounds rounds at each of --rhos. Reported per budget:

- the wall time of the whole run (`Federation.train`: signing, the hub's Train RPC, a ping,
  the design check, the rounds and the evaluation over Flower) and of each step;
- the held-out AUC three ways: the central non-private logistic fit on the pooled training
  persons, the DP model's exact AUC on the same held-out persons, and the DP estimate the
  nodes released; and the gap between the central and the DP model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from scipy.stats import rankdata

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from node.data.catalog import cohort_view
from node.data.store import OmopStore
from queries.model import ModelSpec
from queries.pathway import load_pathways

REGIONS = ("nenc", "nwc")
ROWS_SQL = f"""
    SELECT person_id, CAST(age_band AS VARCHAR) AS age_band, age, CAST(sex AS VARCHAR) AS sex,
           CAST(imd_quintile AS VARCHAR) AS imd_quintile,
           CAST(deceased AS VARCHAR) AS deceased, CAST(admitted AS VARCHAR) AS admitted
    FROM {synth.KNOWN_PATHWAY}
"""  # noqa: S608 - a constant


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    r = rankdata(s)
    n1 = y.sum()
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def _held_out(person: int) -> bool:
    """The nodes' hold-out rule (queries/model_sql.py): md5 of the identifier, mod 5."""
    return int(hashlib.md5(str(person).encode()).hexdigest(), 16) % 5 == 0  # noqa: S324


def _rows(folders: dict[str, Path]) -> dict[str, pa.Table]:
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    out = {}
    for region in REGIONS:
        folder = folders[region]
        store = OmopStore(
            folder,
            [pathway],
            reference_date=LocalFederation.reference_date,
            imd_lookup=folder / synth.LOOKUP_FILE,
            recheck_s=None,
        )
        try:
            out[region] = store.query(ROWS_SQL)
        finally:
            store.close()
    return out


def _central(model: ModelSpec, rows: dict[str, pa.Table]) -> tuple[Any, ...]:
    """(columns, X, y, held-out mask, central coefficients) on the pooled rows."""
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    columns, x, y = synth.pooled_design(model, cohort_view(pathway), rows)
    persons = []
    for table in rows.values():
        keep = pa.array(np.ones(table.num_rows, dtype=np.bool_))
        for f in model.where:
            keep = pc.and_(keep, pc.is_in(table[f.column], pa.array(f.values)))
        persons.append(np.asarray(table.filter(keep)["person_id"].to_pylist()))
    held = np.array([_held_out(int(p)) for p in np.concatenate(persons)])
    fit = sm.GLM(y[~held], x[~held], family=sm.families.Binomial()).fit()
    return columns, x, y, held, np.asarray(fit.params)


def main() -> None:
    """Run the benchmark and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=800_000, help="over the four regions")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 5.0])
    ap.add_argument("--seed", type=int, default=21)
    args = ap.parse_args()
    base = synth.known_model(1.0, under_40=False, unknown_address=False)
    with tempfile.TemporaryDirectory(prefix="chc-bench-train-") as tmp:
        root = Path(tmp)
        folders = synth.generate_federation(args.persons, root / "data", seed=args.seed)
        rows = _rows(folders)
        setups = tuple(
            NodeSetup(
                name=r,
                omop=folders[r],
                imd_lookup=folders[r] / synth.LOOKUP_FILE,
                pathways=(synth.KNOWN_PATHWAY,),
                total_rho=10 * sum(args.rhos),
                max_rho_per_query=max(args.rhos),
            )
            for r in REGIONS
        )
        started = time.perf_counter()
        runs = []
        with LocalFederation(
            workdir=root / "fed", nodes=setups, learning=True, deadline_ms=60_000
        ) as fed:
            startup_s = time.perf_counter() - started
            with Federation(fed.hub_address, fed.analyst_identity) as client:
                for rho in args.rhos:
                    model = dataclasses.replace(
                        base, rho=rho, region=False, solver="gradient", iterations=args.rounds
                    )
                    t0 = time.perf_counter()
                    trained = client.train(model, timeout_s=1800)
                    wall = time.perf_counter() - t0
                    runs.append((rho, model, trained, wall))
    out = []
    for rho, model, trained, wall in runs:
        columns, x, y, held, central = _central(model, rows)
        dp = np.array([trained.coefficients[c] for c in columns])
        central_auc, dp_auc = _auc(y[held], x[held] @ central), _auc(y[held], x[held] @ dp)
        steps = [s["wall_s"] for s in trained.result["steps"]]
        out.append(
            {
                "rho_per_node": rho,
                "rounds": args.rounds,
                "run_seconds": round(wall, 2),
                "step_seconds_median": round(statistics.median(steps), 2),
                "steps": len(steps),
                "held_out_auc_central": round(central_auc, 4),
                "held_out_auc_dp_model_exact": round(dp_auc, 4),
                "held_out_auc_dp_released": round(trained.held_out_auc, 4),
                "held_out_auc_noise_sd": round(trained.result["held_out_auc_noise_sd"], 4),
                "auc_gap_central_minus_dp": round(central_auc - dp_auc, 4),
                "training_persons": trained.result["training_persons"],
                "held_out_persons": trained.result["held_out_persons"],
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "train over Flower (DP gradient descent) vs central logistic fit",
                "nodes": len(REGIONS),
                "federation_startup_seconds": round(startup_s, 2),
                "runs": out,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
