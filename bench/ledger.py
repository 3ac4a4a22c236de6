"""The privacy ledger's cost: append latency with full sync, and query latency with and without it.

Prints one JSON object.

- `append`: SqliteLedger.charge() one at a time (check every cap, build and sign the entry,
  INSERT, COMMIT with synchronous=FULL, so the WAL is fsync'd), against the same work kept
  in memory (MemoryAccountant: caps, canonical JSON and the Ed25519 signature, no disk).
  The ledger lives in --dir (default: a temporary folder under the current directory, so
  that fsync reaches a real disk rather than a tmpfs).
- `query`: two node processes over the same synthetic region, one started with
  `--memory-ledger`, each answering the same signed query over mutual TLS; requests
  alternate between them so both see the same machine load. Times are the Execute round
  trip as an analyst calling the node directly sees it (signing excluded).

Run: `python -m bench.ledger` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.local import synth
from node.budget.accounting import Accountant, Charge, MemoryAccountant
from node.budget.ledger import SqliteLedger
from protocols import serde
from protocols.budget.policy import BudgetPolicy
from protocols.process import read_ready_file
from protocols.security.envelope import sign_query
from protocols.security.pki import Identity, Role, create_ca, issue, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.mechanisms import rho_to_epsilon
from queries.spec import Query, canonical_bytes

NODE = "nwc"
POLICY = BudgetPolicy(total_rho=1e9, max_rho_per_query=1.0)


def _summary(xs: list[float]) -> dict[str, float]:
    ordered = sorted(xs)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]

    return {
        "p50_ms": round(statistics.median(xs), 3),
        "p99_ms": round(pct(99), 3),
        "mean_ms": round(statistics.fmean(xs), 3),
        "max_ms": round(max(xs), 3),
    }


def _charges(analyst: Identity, n: int) -> list[Charge]:
    """Realistic charges: a signed envelope (with certificate) in every entry."""
    query = Query(view="asthma_children", rho=0.001, group_by=("sex", "age_band"))
    out = []
    for i in range(n):
        signed = sign_query(analyst, canonical_bytes(query))
        envelope = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
        out.append(
            Charge(
                query_id=f"bench-{i}",
                analyst=analyst.name,
                query=signed.query,
                envelope=envelope,
                views=(query.view,),
                rho=query.rho,
                epsilon=rho_to_epsilon(query.rho, POLICY.delta),
            )
        )
    return out


def _append_latency(accountant: Accountant, charges: list[Charge]) -> list[float]:
    out = []
    for c in charges:
        started = time.perf_counter()
        accountant.charge(c)
        out.append((time.perf_counter() - started) * 1000)
    return out


def _write_node_toml(folder: Path, omop: Path, identity: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "node.toml"
    config.write_text(
        f'name = "{NODE}"\nomop = "{omop}"\nidentity = "{identity}"\n'
        f'listen = "127.0.0.1:0"\nledger = "{folder / name}.ledger.sqlite"\n'
        "reference_date = 2025-12-31\n\n[budget]\ntotal_rho = 1e9\nmax_rho_per_query = 1.0\n"
    )
    return config


@contextmanager
def _node(config: Path, *, memory: bool, log: Path) -> Iterator[int]:
    ready = config.with_suffix(".ready")
    args = [sys.executable, "-m", "node", "serve", "--config", str(config)]
    args += ["--ready-file", str(ready), "--log-level", "WARNING"]
    if memory:
        args.append("--memory-ledger")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while (info := read_ready_file(ready)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield int(str(info["port"]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query_latency(
    root: Path, pki: Path, persons: int, repeats: int
) -> dict[str, dict[str, float]]:
    omop = root / "data" / NODE
    synth.generate_region(synth.region_by_slug(NODE), persons, omop, seed=11)
    node_id = issue(pki, role=Role.NODE, name=NODE)
    analyst = load_identity(pki / "analyst" / "bench-analyst")
    query = canonical_bytes(Query(view="asthma_children", rho=0.001, group_by=("sex",)))
    configs = {
        kind: _write_node_toml(root / kind, omop.resolve(), node_id.resolve(), kind)
        for kind in ("memory", "sqlite")
    }
    times: dict[str, list[float]] = {"memory": [], "sqlite": []}
    with (
        _node(configs["memory"], memory=True, log=root / "memory.log") as memory_port,
        _node(configs["sqlite"], memory=False, log=root / "sqlite.log") as sqlite_port,
    ):
        stubs = {}
        channels = []
        for kind, port in (("memory", memory_port), ("sqlite", sqlite_port)):
            channel = secure_channel(f"127.0.0.1:{port}", analyst, server_name=NODE)
            channels.append(channel)
            stubs[kind] = node_pb2_grpc.NodeStub(channel)
        for i in range(repeats + 5):
            for kind in ("memory", "sqlite") if i % 2 else ("sqlite", "memory"):
                envelope = serde.signed_query_to_proto(sign_query(analyst, query))
                request = node_pb2.ExecuteRequest(envelope=envelope)
                started = time.perf_counter()
                stubs[kind].Execute(request, timeout=60)
                if i >= 5:  # the first few warm channels and caches up
                    times[kind].append((time.perf_counter() - started) * 1000)
        for channel in channels:
            channel.close()
    return {kind: _summary(xs) for kind, xs in times.items()}


def main() -> None:
    """Run the benchmark and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--appends", type=int, default=1000, help="ledger appends to time")
    ap.add_argument("--repeats", type=int, default=200, help="queries per configuration")
    ap.add_argument("--persons", type=int, default=50_000, help="persons in the node's region")
    ap.add_argument("--dir", type=Path, default=None, help="where the ledger file goes")
    args = ap.parse_args()
    base = args.dir or Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".chc-bench-ledger-", dir=base) as tmp:
        root = Path(tmp)
        pki = root / "pki"
        create_ca(pki)
        analyst = load_identity(issue(pki, role=Role.ANALYST, name="bench-analyst"))
        charges = _charges(analyst, args.appends)
        ledger = SqliteLedger(root / "bench.ledger.sqlite", node=NODE, policy=POLICY)
        sqlite_ms = _append_latency(ledger, charges)
        ledger.close()
        ledger_bytes = sum(
            p.stat().st_size for p in root.iterdir() if p.name.startswith("bench.ledger.sqlite")
        )
        memory_ms = _append_latency(MemoryAccountant(POLICY, node=NODE), charges)
        query = _query_latency(root, pki, args.persons, args.repeats)
    overhead = query["sqlite"]["p50_ms"] - query["memory"]["p50_ms"]
    print(
        json.dumps(
            {
                "benchmark": "ledger",
                "ledger_dir": str(base.resolve()),
                "append": {
                    "entries": args.appends,
                    "bytes_per_entry": round(ledger_bytes / args.appends),
                    "sqlite_wal_synchronous_full": _summary(sqlite_ms),
                    "memory_same_entries_signed": _summary(memory_ms),
                },
                "query": {
                    "persons": args.persons,
                    "repeats": args.repeats,
                    "view": "asthma_children by sex",
                    "with_sqlite_ledger": query["sqlite"],
                    "with_memory_accountant": query["memory"],
                    "ledger_overhead_p50_ms": round(overhead, 3),
                },
                "python": sys.version.split()[0],
                "sqlite": sqlite3.sqlite_version,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
