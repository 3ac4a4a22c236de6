"""Synthetic OMOP generation: time and peak memory for 1,000,000 persons with their events.

Prints one JSON object. Each run generates in a fresh child process, so `peak_rss_mb` is
that process's own high-water mark (ru_maxrss) and not the benchmark's. The target (issue B):
1M persons with their events in under 60 s on 2 cores, with memory bounded by the chunk size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from coordinator.local import synth


def _child(persons: int, out: Path, chunk_size: int, region: str, federation: bool) -> None:
    """Generate, then print {seconds, rows, peak_rss_mb} for this process alone."""
    started = time.perf_counter()
    if federation:
        folders = synth.generate_federation(persons, out, seed=1)
    else:
        folder = out / region
        synth.generate_region(
            synth.region_by_slug(region), persons, folder, seed=1, chunk_size=chunk_size
        )
        folders = {region: folder}
    seconds = time.perf_counter() - started
    rows: dict[str, int] = {}
    for folder in folders.values():
        for table in synth.TABLE_NAMES:
            rows[table] = (
                rows.get(table, 0) + pq.ParquetFile(folder / f"{table}.parquet").metadata.num_rows
            )
    size = sum(f.stat().st_size for d in folders.values() for f in d.iterdir())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": round(seconds, 3),
                "rows": rows,
                "bytes_on_disk": size,
                "peak_rss_mb": round(peak_kb / 1024, 1),
            }
        )
    )


def main() -> None:
    """Run the benchmark and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--region", default="nwc", help="one region (default) ...")
    ap.add_argument("--federation", action="store_true", help="... or split over all four")
    ap.add_argument("--chunk-size", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args.persons, args.child, args.chunk_size, args.region, args.federation)
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="chc-bench-synth-") as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "bench.synth", "--child", str(out)]
            cmd += ["--persons", str(args.persons), "--region", args.region]
            cmd += ["--chunk-size", str(args.chunk_size)]
            cmd += ["--federation"] if args.federation else []
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout))
    seconds = sorted(r["seconds"] for r in runs)
    print(
        json.dumps(
            {
                "benchmark": "synthetic OMOP generation",
                "persons": args.persons,
                "regions": "all four" if args.federation else args.region,
                "chunk_size": args.chunk_size,
                "repeats": args.repeats,
                "seconds_median": seconds[len(seconds) // 2],
                "seconds_max": seconds[-1],
                "persons_per_second": round(args.persons / seconds[len(seconds) // 2]),
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
                "rows": runs[0]["rows"],
                "bytes_on_disk": runs[0]["bytes_on_disk"],
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "target": "1M persons in under 60 s on 2 cores",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
