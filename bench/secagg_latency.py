"""Added latency of secure aggregation per query through the real hub, at 4 and 16 nodes. JSON.

bench/secagg.py times the library (round keys, announcements, masks) inside one process;
this times what an analyst waits for. For each federation size k (--nodes 4,16), a real
federation on loopback as bench/fanout.py builds it: k node gRPC servers with mutual TLS, each
with its own certificate, ledger and OmopStore, side by side in one node-pool process
(bench/_node_pool.py), and one real hub process (`python -m coordinator hub serve`). Node i
reads synthetic region i mod 4 (--persons per region).

Two queries, each sent both ways: as an ordinary query (every node adds its full noise, the
hub pools the k releases) and as `pooled_only: true` (docs/secure-aggregation.md: the hub runs
the two rounds of secure aggregation over the k nodes the envelope names, and releases only
the noisy sum). The pooled_only envelope is signed with every node in its audience, as the
client does for such queries (Federation.sign(query, nodes=...), then Federation.run). The
queries: a grouped count (persons by sex x IMD quintile) and a grouped mean over visits
(length of stay by visit type). Each is signed afresh with a rho differing in the sixth
significant digit, so no node or hub could answer it from a kept release.

Per size and query: the analyst's wall latency, ordinary and secure, p50 and p90 over
--repeats, the added milliseconds and the ratio (secure over ordinary, at p50 and at p90), and
the same aggregate straight in DuckDB on the k nodes' rows in one table (the raw baseline, as
bench/query_engine.py has it). The three are timed interleaved (ordinary, secure, DuckDB, and
again), so that a slow spell of the shared machine falls on all alike. A secure query that
fails is counted and its error kept verbatim (the first few distinct ones); only complete
answers (every node ok) are timed.

Run: .venv/bin/python -m bench.secagg_latency [--nodes 4,16] [--repeats 30] [--persons 300]
(--ordinary-only skips the secure path: a dry run of the harness.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from bench.fanout import (
    ANALYST_NAME,
    HUB_NAME,
    BenchError,
    Child,
    Layout,
    complete,
    prepare,
    spawn,
    write_hub_config,
    write_node_configs,
)
from bench.timing import percentile
from coordinator.analyst.client import Federation
from node.config import load_config
from node.data.store import OmopStore
from protocols.security.envelope import Operation
from protocols.security.pki import Role
from queries.errors import ChcError
from queries.results import FederatedResult
from queries.spec import Query
from queries.sql import parse_sql

# A secure round needs 2 nodes; node/secure_share.py allows at most 200 in one round.
MIN_NODES, MAX_NODES = 2, 200
# How many distinct secure-query errors the JSON keeps, verbatim.
KEPT_ERRORS = 5


@dataclass(frozen=True)
class Kind:
    """One query of the benchmark: its SQL through chc, its rho, and the DuckDB baseline."""

    sql: str
    rho: float
    table: str  # the view the baseline reads, pooled over the k nodes
    columns: str  # the columns of that view the baseline needs
    baseline: str


KINDS: dict[str, Kind] = {
    "grouped_count": Kind(
        sql="SELECT sex, imd_quintile, COUNT(*) AS n FROM persons GROUP BY sex, imd_quintile",
        rho=0.05,
        table="persons",
        columns="sex, imd_quintile",
        baseline="SELECT sex, imd_quintile, COUNT(*) FROM persons GROUP BY sex, imd_quintile",
    ),
    "visits_mean": Kind(
        sql=(
            "SELECT visit_type, COUNT(*) AS n, AVG(length_of_stay) AS mean_los FROM visits "
            "GROUP BY visit_type"
        ),
        rho=0.1,
        table="visits",
        columns="visit_type, length_of_stay",
        baseline=(
            "SELECT visit_type, COUNT(*), AVG(length_of_stay) FROM visits GROUP BY visit_type"
        ),
    ),
}
MODES = ("ordinary", "secure", "duckdb")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < MIN_NODES or max(sizes) > MAX_NODES:
        raise argparse.ArgumentTypeError(
            f"--nodes {text!r}: give federation sizes from {MIN_NODES} to {MAX_NODES} (secure "
            "aggregation needs at least 2 nodes), comma-separated, e.g. 4,16"
        )
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (argv None: sys.argv)."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.secagg_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--nodes", type=_sizes, default=[4, 16], help="federation sizes, e.g. 4,16")
    ap.add_argument("--repeats", type=_positive, default=30, help="timed rounds per query")
    ap.add_argument("--persons", type=_positive, default=300, help="persons per synthetic region")
    ap.add_argument("--deadline-s", type=float, default=120.0, help="each query's deadline")
    ap.add_argument("--memory-ledger", action="store_true", help="nodes keep no SQLite ledger")
    ap.add_argument("--workdir", type=Path, help="keep data, configs and logs here")
    ap.add_argument(
        "--ordinary-only", action="store_true", help="skip the secure path (a harness dry run)"
    )
    args = ap.parse_args(argv)
    if not args.deadline_s > 0:
        ap.error(f"--deadline-s must be positive, got {args.deadline_s}")
    return args


@dataclass
class Timed:
    """One mode's wall times (complete answers only), failures and their errors."""

    ms: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Count a failure, keeping its message if it is one of the first distinct ones."""
        self.failed += 1
        if message not in self.errors and len(self.errors) < KEPT_ERRORS:
            self.errors.append(message)

    def summary(self) -> dict[str, Any]:
        """Count, failures, p50 and p90 in ms (None without a complete answer), errors."""
        out: dict[str, Any] = {
            "timed": len(self.ms),
            "failed": self.failed,
            "p50_ms": round(statistics.median(self.ms), 2) if self.ms else None,
            "p90_ms": round(percentile(self.ms, 90), 2) if self.ms else None,
        }
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def compare(ordinary: Timed, secure: Timed, duckdb_ms: Timed) -> dict[str, Any]:
    """The JSON for one query at one size: each mode, and secure against ordinary and DuckDB.

    added_*: secure minus ordinary at that percentile; ratio_*: secure over ordinary. Both are
    None when a side has no complete answer (a secure path that failed every time).
    """
    o, s, d = ordinary.summary(), secure.summary(), duckdb_ms.summary()
    return {
        "ordinary": o,
        "secure": s,
        "duckdb": d,
        "added_p50_ms": _minus(s["p50_ms"], o["p50_ms"]),
        "added_p90_ms": _minus(s["p90_ms"], o["p90_ms"]),
        "ratio_p50": _ratio(s["p50_ms"], o["p50_ms"]),
        "ratio_p90": _ratio(s["p90_ms"], o["p90_ms"]),
        "ordinary_vs_duckdb_p50": _ratio(o["p50_ms"], d["p50_ms"]),
        "secure_vs_duckdb_p50": _ratio(s["p50_ms"], d["p50_ms"]),
    }


def baseline_connection(configs: Sequence[Path]) -> duckdb.DuckDBPyConnection:
    """DuckDB with every kind's view as one table of all k nodes' rows, read as nodes do.

    Each distinct data folder is read once through the node's own OmopStore (its views, as
    node.toml builds them); node i's rows are then those of its folder, so k nodes over four
    regions pool four copies of each at k = 16, as the federation does.
    """
    parts: dict[Path, dict[str, pa.Table]] = {}
    pooled: dict[str, list[pa.Table]] = {kind.table: [] for kind in KINDS.values()}
    for config in configs:
        cfg = load_config(config)
        if cfg.omop not in parts:
            store = OmopStore.from_config(cfg)
            try:
                parts[cfg.omop] = {
                    kind.table: store.query(f"SELECT {kind.columns} FROM {kind.table}")  # noqa: S608 - our own constants
                    for kind in KINDS.values()
                }
            finally:
                store.close()
        for table, rows in parts[cfg.omop].items():
            pooled[table].append(rows)
    con = duckdb.connect(config={"threads": 2})
    for table, tables in pooled.items():
        con.register("pooled", pa.concat_tables(tables))
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM pooled")  # noqa: S608 - our own names
        con.unregister("pooled")
    return con


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Runner:
    """Sends one kind of query both ways through one hub, and times it in DuckDB."""

    client: Federation
    con: duckdb.DuckDBPyConnection
    names: tuple[str, ...]
    deadline_s: float
    serial: int = 0

    def _query(self, kind: Kind, *, pooled_only: bool) -> Query:
        # A new rho every time (sixth significant digit): no two envelopes ask the same.
        self.serial += 1
        query = parse_sql(kind.sql, rho=kind.rho * (1 + self.serial * 1e-6))
        return dataclasses.replace(query, pooled_only=True) if pooled_only else query

    def ordinary(self, kind: Kind) -> FederatedResult:
        """The query as today: every node adds its own noise, the hub pools the releases."""
        return self.client.query(self._query(kind, pooled_only=False), deadline_s=self.deadline_s)

    def secure(self, kind: Kind) -> FederatedResult:
        """The query as pooled_only, signed with every node of the round in its audience."""
        envelope = self.client.sign(
            self._query(kind, pooled_only=True), operation=Operation.EXECUTE, nodes=self.names
        )
        return self.client.run(envelope, deadline_s=self.deadline_s)

    def once(self, kind: Kind, mode: str, into: Timed) -> None:
        """Run one query in one mode; time it into `into` if every node answered."""
        n = len(self.names)
        started = time.perf_counter()
        try:
            if mode == "duckdb":
                self.con.sql(kind.baseline).fetchall()
                ok, why = True, ""
            else:
                result = self.ordinary(kind) if mode == "ordinary" else self.secure(kind)
                # A secure answer must be a secure aggregate, an ordinary one must not.
                secure = result.secure_aggregation is not None
                ok = complete(result, n) and secure == (mode == "secure")
                why = (
                    f"not a complete {mode} answer from {n} nodes (secure aggregate: {secure}): "
                    f"{result.nodes}"
                )
        except ChcError as exc:
            into.fail(_error_text(exc))
            return
        elapsed = (time.perf_counter() - started) * 1000
        if ok:
            into.ms.append(elapsed)
        else:
            into.fail(why)


def measure(runner: Runner, repeats: int, modes: Sequence[str]) -> dict[str, dict[str, Timed]]:
    """Warm up each kind and mode twice, then time interleaved rounds of every kind and mode."""
    for kind in KINDS.values():
        for mode in modes:
            for _ in range(2):  # the hub's channels connect, caches fill
                warm = Timed()
                runner.once(kind, mode, warm)
                if mode == "ordinary" and warm.failed:
                    raise BenchError(f"warm-up ordinary query failed: {warm.errors}")
    out = {name: {mode: Timed() for mode in MODES} for name in KINDS}
    for _ in range(repeats):
        for name, kind in KINDS.items():
            for mode in modes:
                runner.once(kind, mode, out[name][mode])
    return out


def one_size(layout: Layout, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start a pool of n nodes and a hub, measure every kind both ways, stop both."""
    run = layout.root / f"n{n}"
    for sub in ("conf", "ledgers"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    listing = write_node_configs(layout, n, run)
    configs = [Path(line) for line in listing.read_text(encoding="utf-8").split()]
    con = baseline_connection(configs)
    pool_cmd = ["bench._node_pool", "--configs", str(listing)]
    if args.memory_ledger:
        pool_cmd.append("--memory-ledger")
    modes = ("ordinary", "duckdb") if args.ordinary_only else MODES
    children: list[Child] = []
    try:
        t = time.perf_counter()
        pool = spawn("node_pool", pool_cmd, run)
        children.append(pool)
        ports = pool.wait_ready(timeout_s=60 + 5 * n)["ports"]
        pool_s = time.perf_counter() - t
        hub_conf = write_hub_config(layout, ports, run, args.deadline_s)
        t = time.perf_counter()
        hub = spawn("hub", ["coordinator", "hub", "serve", "--config", str(hub_conf)], run)
        children.append(hub)
        hub_port = hub.wait_ready(timeout_s=60)["port"]
        hub_s = time.perf_counter() - t
        analyst = layout.identity(Role.ANALYST, ANALYST_NAME)
        with Federation(f"127.0.0.1:{hub_port}", analyst, server_name=HUB_NAME) as client:
            runner = Runner(client, con, layout.names[:n], args.deadline_s)
            got = measure(runner, args.repeats, modes)
    finally:
        for child in reversed(children):  # the hub first, then its nodes
            child.stop()
        con.close()
    return {
        "nodes": n,
        "startup_seconds": {"node_pool": round(pool_s, 1), "hub": round(hub_s, 1)},
        **{
            name: compare(timed["ordinary"], timed["secure"], timed["duckdb"])
            for name, timed in got.items()
        },
    }


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], object] = print) -> None:
    """Run every federation size and print one JSON object."""
    args = parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chc-bench-secagg-latency-") as tmp:
        root = args.workdir or Path(tmp)
        layout = prepare(root, args.persons, max(args.nodes))
        sizes = [one_size(layout, n, args) for n in args.nodes]
    out(
        json.dumps(
            {
                "benchmark": "secagg_latency",
                "queries": {
                    name: {"sql": k.sql, "rho": k.rho, "duckdb": k.baseline}
                    for name, k in KINDS.items()
                },
                "repeats": args.repeats,
                "persons_per_region": args.persons,
                "secure_path": not args.ordinary_only,
                "ledger": "memory" if args.memory_ledger else "sqlite",
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "seconds": round(time.perf_counter() - began, 1),
                "sizes": sizes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
