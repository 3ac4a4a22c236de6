"""Node start-up on 1,000,000 persons: checking the data and building the views.

Prints one JSON object with two figures:
- `store_seconds`: OmopStore built in-process (validation, consent, every view), median of
  `--repeats` runs, with its phases: `prepare_seconds` (checks and staging) and
  `views_seconds`; and the peak memory of a fresh process that builds it once.
- `serve_ready_seconds`: `chc-node serve` as a custodian starts it (TLS identity, ledger,
  store), from process start to listening.
The data is one synthetic region (a NHS trust's scale) unless --data points at an OMOP folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import duckdb

from coordinator.local import synth
from node.data import views
from node.data.consent import ConsentPolicy
from node.data.store import OmopStore
from node.data.validate import DataSettings, prepare
from protocols.process import read_ready_file
from protocols.security.pki import Role, create_ca, issue
from queries.pathway import load_pathways

REF = date(2025, 12, 31)


def _phases(data: Path, lookup: Path | None) -> tuple[float, float]:
    pathways = load_pathways(None)
    con = duckdb.connect(":memory:", config={"threads": 2})
    try:
        started = time.perf_counter()
        report = prepare(
            con,
            DataSettings(omop=data, reference_date=REF, imd_lookup=lookup, consent=ConsentPolicy()),
            pathways,
        )
        report.raise_if_refused()
        prepared = time.perf_counter()
        views.build_views(con, pathways, REF)
        return prepared - started, time.perf_counter() - prepared
    finally:
        con.close()


def _child_peak(data: Path, lookup: Path | None) -> float:
    """Build the store once in this (fresh) process; return peak RSS in MB."""
    store = OmopStore(data, load_pathways(None), reference_date=REF, imd_lookup=lookup)
    store.close()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve_ready(root: Path, data: Path, lookup: Path | None) -> float:
    pki = root / "pki"
    create_ca(pki)
    identity = issue(pki, role=Role.NODE, name="bench")
    config = root / "node.toml"
    lines = [
        'name = "bench"',
        f'omop = "{data}"',
        f'identity = "{identity}"',
        'listen = "127.0.0.1:0"',
        f"reference_date = {REF.isoformat()}",
        f'ledger = "{root / "ledger.sqlite"}"',
    ]
    if lookup is not None:
        lines.append(f'imd_lookup = "{lookup}"')
    config.write_text("\n".join(lines) + "\n")
    ready = root / "ready.json"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node",
            "serve",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    try:
        while read_ready_file(ready) is None:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "node exited")
            time.sleep(0.02)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    """Run the benchmark and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--data", type=Path, help="an OMOP folder or DuckDB file instead")
    ap.add_argument("--imd-lookup", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child-peak", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peak is not None:
        print(json.dumps({"peak_rss_mb": _child_peak(args.child_peak, args.imd_lookup)}))
        return
    with tempfile.TemporaryDirectory(prefix="chc-bench-node-") as tmp:
        root = Path(tmp)
        data, lookup = args.data, args.imd_lookup
        generated: dict[str, int] = {}
        if data is None:
            data = root / "nwc"
            generated = synth.generate_region(
                synth.region_by_slug("nwc"), args.persons, data, seed=1
            )
            lookup = data / synth.LOOKUP_FILE
        phases = [_phases(data, lookup) for _ in range(args.repeats)]
        totals = sorted(p + v for p, v in phases)
        middle = sorted(phases, key=sum)[len(phases) // 2]
        cmd = [sys.executable, "-m", "bench.node_startup", "--child-peak", str(data)]
        cmd += ["--imd-lookup", str(lookup)] if lookup is not None else []
        peak = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        serve = _serve_ready(root, data, lookup)
        store = OmopStore(data, load_pathways(None), reference_date=REF, imd_lookup=lookup)
        sizes = {
            name: int(store.query(f'SELECT count(*) AS n FROM "{name}"').to_pylist()[0]["n"])  # noqa: S608
            for name in store.tables()
        }
        store.close()
    print(
        json.dumps(
            {
                "benchmark": "node start-up (views built)",
                "persons": args.persons if args.data is None else sizes.get("persons"),
                "source_rows": generated or None,
                "repeats": args.repeats,
                "store_seconds_median": round(totals[len(totals) // 2], 3),
                "store_seconds_max": round(totals[-1], 3),
                "prepare_seconds": round(middle[0], 3),
                "views_seconds": round(middle[1], 3),
                "store_peak_rss_mb": round(peak["peak_rss_mb"], 1),
                "serve_ready_seconds": round(serve, 3),
                "view_rows": sizes,
                "duckdb_threads": 2,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
