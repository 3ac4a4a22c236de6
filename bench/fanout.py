"""Fan-out at 1 to 100 nodes: the hub's CPU per node per query, and latency. Prints JSON.

For each federation size N (--nodes 1,10,30,100), a real federation on loopback: N node gRPC
servers with mutual TLS, each with its own certificate, ledger and OmopStore, run side by
side in one node-pool process (bench/_node_pool.py: a hundred node processes would not fit
a 2-core machine), and one real hub process (`python -m coordinator hub serve`) that dials
every node, as coordinator/local/federation.py starts it. The data is small (--persons per
region, a few hundred by default): the four synthetic regions are generated once and node i
reads region i mod 4, read-only, so the nodes' own work stays small beside the hub's.

From this process, as an analyst (coordinator.analyst.client.Federation), --repeats rounds
of two queries, interleaved: a small count and the six-statistic grouped query of
bench/query_engine.py. Each query is signed afresh, at a rho that differs in the sixth
significant digit from the previous one, so that no node or hub could answer it from a kept
release. For each query: the analyst's wall latency, and the CPU time (user + system, from
/proc/PID/stat, every thread's, those that ended included) the hub process and the node pool
spent during it.

The goal (issue 16) is at most 0.2 ms of hub CPU per node per query; ratio_to_goal below 1
meets it. Per size and query kind: wall p50/p95, hub CPU per query and per node per query
(means: /proc counts in 10 ms ticks, so a single query's figure is coarse), and the node
pool's CPU per query for context (all N nodes share its one process, so at large N the wall
time is mostly the nodes taking turns, not the hub). both_kinds is the whole timed span over
its query count (two /proc readings: the most precise figure). hub_idle_cpu_ms_per_s is the
hub's CPU with no query (gRPC's timers and polling), read for 5 s before the queries; it is
in every figure, and the ..._net_of_idle one takes it out. marginal is the slope of hub CPU
per query over N (least squares): the cost of one more node, without the fixed cost of a
query (the analyst's signature, planning, the reply) that dominates at one node.

Run: .venv/bin/python -m bench.fanout [--nodes 1,10,30,100] [--repeats 30] [--persons 300]
To measure another tree (e.g. a git worktree of older code), run it from that tree with
PYTHONPATH set to it: the hub and node pool are started with this interpreter and inherit it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import coordinator
from bench.query_engine import SQL as GROUPED_SQL
from bench.timing import percentile
from coordinator.analyst.client import Federation
from coordinator.local import node_toml, synth
from protocols.revocation import CRL_FILE
from protocols.security.pki import Role, create_ca, issue
from queries.errors import ChcError
from queries.results import FederatedResult, NodeStatus
from queries.spec import Query
from queries.sql import parse_sql

REF = date(2025, 12, 31)
GOAL_HUB_CPU_MS_PER_NODE = 0.2
COUNT_SQL = "SELECT COUNT(*) AS n FROM persons"
# rho per query kind; small enough that thousands of queries fit each node's budget below.
RHO = {"count": 0.01, "grouped": 0.1}
SQL_OF = {"count": COUNT_SQL, "grouped": GROUPED_SQL}
HUB_NAME = "hub"
ANALYST_NAME = "bench-analyst"
IDLE_WINDOW_S = 5.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError, ChcError):
    """The node pool or the hub did not start (the message carries the end of its log), or a
    warm-up query was not answered by every node."""


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) of a whole process so far, in milliseconds.

    /proc/PID/stat counts every thread the process has had, those that ended included (the
    kernel folds an exiting thread's time into its process), which per-thread readings would
    miss: a fan-out that starts a thread per call would look cheaper than it is.
    """
    raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * 1000 / TICKS_PER_S


@dataclass
class Child:
    """A process this benchmark started in its own process group, and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready: Path

    def tail(self, lines: int = 30) -> str:
        """The end of its log, for an error message."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log at {self.log})"
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """The ready file's JSON once written; raises with the log's end if it never is."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                data: dict[str, Any] = json.loads(self.ready.read_text(encoding="utf-8"))
                return data
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if self.popen.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with code {self.popen.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not start within {timeout_s:g} s:\n{self.tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM its process group, then SIGKILL it if it has not ended in timeout_s."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        except ProcessLookupError:
            self.popen.wait()


def spawn(name: str, args: list[str], run: Path) -> Child:
    """Start `python -m ARGS --ready-file ...` in a new session, logging to run/NAME.log."""
    ready = run / f"{name}.ready"
    log = run / f"{name}.log"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        popen = subprocess.Popen(  # our own interpreter and modules
            [sys.executable, "-m", *args, "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, stopped as one
        )
    return Child(name=name, popen=popen, log=log, ready=ready)


@dataclass(frozen=True)
class Layout:
    """What every federation size shares: the data, the PKI and the node names."""

    root: Path
    pki: Path
    data: tuple[Path, ...]  # one folder per synthetic region
    names: tuple[str, ...]  # every node's name, for the largest N

    def identity(self, role: Role, name: str) -> Path:
        """The identity folder `issue` wrote for a party."""
        return self.pki / role.value / name


def prepare(root: Path, persons: int, most: int) -> Layout:
    """Generate the four regions' data and issue the CA, hub, analyst and node certificates."""
    data = []
    for i, region in enumerate(synth.REGIONS):
        folder = root / "data" / region.slug
        synth.generate_region(region, persons, folder, seed=100 + i)
        data.append(folder)
    pki = root / "pki"
    create_ca(pki)
    issue(pki, role=Role.HUB, name=HUB_NAME)
    issue(pki, role=Role.ANALYST, name=ANALYST_NAME)
    names = tuple(f"n{i:03d}" for i in range(1, most + 1))
    for name in names:
        issue(pki, role=Role.NODE, name=name)
    return Layout(root=root, pki=pki, data=tuple(data), names=names)


def write_node_configs(layout: Layout, n: int, run: Path) -> Path:
    """node.toml for the first n nodes (node i reads region i mod 4); the list's path."""
    paths = []
    for i, name in enumerate(layout.names[:n]):
        omop = layout.data[i % len(layout.data)]
        table: dict[str, Any] = {
            "omop": str(omop),
            "reference_date": REF,
            "imd_lookup": str(omop / synth.LOOKUP_FILE),
            "budget": {"total_rho": 1e6, "max_rho_per_query": 10.0},
        }
        table = node_toml.with_owned_keys(
            table,
            name=name,
            identity=layout.identity(Role.NODE, name),
            crl=layout.pki / CRL_FILE,
            listen="127.0.0.1:0",
            ledger=run / "ledgers" / f"{name}.ledger.sqlite",
        )
        path = run / "conf" / f"{name}.toml"
        path.write_text(node_toml.dumps(table, comment="bench/fanout.py"), encoding="utf-8")
        paths.append(path)
    listing = run / "conf" / "nodes.txt"
    listing.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    return listing


def write_hub_config(layout: Layout, ports: dict[str, int], run: Path, deadline_s: float) -> Path:
    """hub.toml listing every node of the pool at its loopback port."""
    table = {
        "identity": str(layout.identity(Role.HUB, HUB_NAME)),
        "listen": "127.0.0.1:0",
        "deadline_ms": int(deadline_s * 1000),
        "crl": str(layout.pki / CRL_FILE),
        "nodes": [
            {"name": name, "title": name, "address": f"127.0.0.1:{port}"}
            for name, port in ports.items()
        ],
    }
    path = run / "conf" / "hub.toml"
    path.write_text(node_toml.dumps(table, comment="bench/fanout.py"), encoding="utf-8")
    return path


def cpu_figures(
    n: int, hub_ms: float, pool_ms: float, idle: float, wall_ms: float
) -> dict[str, Any]:
    """Per-query CPU figures at n nodes, per node, and the ratio to the goal.

    idle (the hub's CPU in ms per second with no query) times the mean wall time is what the
    hub would have spent anyway; the net figure takes it out, for context.
    """
    per_node = hub_ms / n
    net = max(0.0, hub_ms - idle * wall_ms / 1000) / n
    return {
        "hub_cpu_ms_per_query": round(hub_ms, 2),
        "hub_cpu_ms_per_node_per_query": round(per_node, 3),
        "ratio_to_goal": round(per_node / GOAL_HUB_CPU_MS_PER_NODE, 2),
        "hub_cpu_ms_per_node_per_query_net_of_idle": round(net, 3),
        "node_pool_cpu_ms_per_query": round(pool_ms, 1),
        "node_pool_cpu_ms_per_node_per_query": round(pool_ms / n, 2),
    }


@dataclass
class Samples:
    """One query kind's measurements at one federation size."""

    wall_ms: list[float] = field(default_factory=list)
    hub_cpu_ms: list[float] = field(default_factory=list)
    pool_cpu_ms: list[float] = field(default_factory=list)
    failed: int = 0

    def summary(self, n: int, idle: float) -> dict[str, Any]:
        """The figures for the JSON (CPU as means: /proc counts in 10 ms ticks)."""
        wall = statistics.fmean(self.wall_ms)
        hub, pool = statistics.fmean(self.hub_cpu_ms), statistics.fmean(self.pool_cpu_ms)
        return {
            "queries": len(self.wall_ms),
            "failed": self.failed,
            "wall_p50_ms": round(statistics.median(self.wall_ms), 1),
            "wall_p95_ms": round(percentile(self.wall_ms, 95), 1),
            **cpu_figures(n, hub, pool, idle, wall),
        }


@dataclass(frozen=True)
class Span:
    """CPU and wall time from the first timed query's start to the last one's end."""

    hub_cpu_ms: float
    pool_cpu_ms: float
    wall_ms: float
    queries: int

    def summary(self, n: int, idle: float) -> dict[str, Any]:
        """Per-query means over the whole span: two /proc readings, so 10 ms over all."""
        q = self.queries
        wall = self.wall_ms / q
        return {
            "queries": q,
            **cpu_figures(n, self.hub_cpu_ms / q, self.pool_cpu_ms / q, idle, wall),
        }


def complete(result: FederatedResult, n: int) -> bool:
    """Every node answered: a partial result would make the hub's work look smaller."""
    return (
        not result.partial
        and len(result.nodes) == n
        and all(o.status is NodeStatus.OK for o in result.nodes)
    )


@dataclass(frozen=True)
class Measured:
    """Everything measured at one federation size."""

    samples: dict[str, Samples]
    span: Span
    idle: float  # the hub's CPU with no query, ms per second


def measure(
    client: Federation, pids: tuple[int, int], n: int, repeats: int, deadline_s: float
) -> Measured:
    """Warm up, read the hub's idle CPU, then time interleaved rounds of both query kinds."""
    hub_pid, pool_pid = pids
    serial = iter(range(1, 1_000_000))

    def make(kind: str) -> Query:
        # A new rho every time (sixth significant digit): no two queries are the same.
        return parse_sql(SQL_OF[kind], rho=RHO[kind] * (1 + next(serial) * 1e-6))

    def run(kind: str) -> tuple[FederatedResult, float]:
        started = time.perf_counter()
        result = client.query(make(kind), deadline_s=deadline_s)
        return result, (time.perf_counter() - started) * 1000

    for kind in SQL_OF:  # the hub's channels to every node connect on the first call
        for _ in range(2):
            result, _ = run(kind)
            if not complete(result, n):
                raise BenchError(f"warm-up {kind} query: not every node answered: {result.nodes}")
    before = cpu_ms(hub_pid)
    time.sleep(IDLE_WINDOW_S)
    idle = (cpu_ms(hub_pid) - before) / IDLE_WINDOW_S
    samples = {kind: Samples() for kind in SQL_OF}
    first = (cpu_ms(hub_pid), cpu_ms(pool_pid), time.perf_counter())
    for _ in range(repeats):
        for kind, into in samples.items():
            hub0, pool0 = cpu_ms(hub_pid), cpu_ms(pool_pid)
            result, wall = run(kind)
            into.hub_cpu_ms.append(cpu_ms(hub_pid) - hub0)
            into.pool_cpu_ms.append(cpu_ms(pool_pid) - pool0)
            into.wall_ms.append(wall)
            into.failed += not complete(result, n)
    span = Span(
        hub_cpu_ms=cpu_ms(hub_pid) - first[0],
        pool_cpu_ms=cpu_ms(pool_pid) - first[1],
        wall_ms=(time.perf_counter() - first[2]) * 1000,
        queries=repeats * len(samples),
    )
    return Measured(samples=samples, span=span, idle=idle)


def one_size(layout: Layout, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start a pool of n nodes and a hub, measure, stop both."""
    run = layout.root / f"n{n}"
    for sub in ("conf", "ledgers"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    pool_cmd = ["bench._node_pool", "--configs", str(write_node_configs(layout, n, run))]
    if args.memory_ledger:
        pool_cmd.append("--memory-ledger")
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
            got = measure(client, (hub.popen.pid, pool.popen.pid), n, args.repeats, args.deadline_s)
    finally:
        for child in reversed(children):  # the hub first, then its nodes
            child.stop()
    return {
        "nodes": n,
        "startup_seconds": {"node_pool": round(pool_s, 1), "hub": round(hub_s, 1)},
        "hub_idle_cpu_ms_per_s": round(got.idle, 2),
        **{kind: s.summary(n, got.idle) for kind, s in got.samples.items()},
        "both_kinds": got.span.summary(n, got.idle),
    }


def marginal(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Hub CPU per added node: the slope of hub CPU per query over N (least squares).

    What the goal is about at scale: a hub's fixed cost per query (the analyst's signature,
    planning, the reply) dominates at one node and fades as nodes are added.
    """
    if len({s["nodes"] for s in sizes}) < 2:
        return {}
    out: dict[str, Any] = {}
    for kind in (*SQL_OF, "both_kinds"):
        fit = statistics.linear_regression(
            [float(s["nodes"]) for s in sizes], [s[kind]["hub_cpu_ms_per_query"] for s in sizes]
        )
        out[kind] = {
            "hub_cpu_ms_per_added_node": round(fit.slope, 3),
            "ratio_to_goal": round(fit.slope / GOAL_HUB_CPU_MS_PER_NODE, 2),
            "hub_cpu_ms_fixed_per_query": round(fit.intercept, 2),
        }
    return out


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or max(sizes) > 999:
        raise argparse.ArgumentTypeError(
            f"--nodes {text!r}: give federation sizes from 1 to 999, comma-separated (1,10,30)"
        )
    return sizes


def _tree() -> dict[str, Any]:
    """Which code was measured: its folder and git commit (with uncommitted changes or not)."""
    root = Path(coordinator.__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *cmd], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    return {
        "path": str(root),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        # What the hub and node pool import too (they inherit this environment).
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }


def main() -> None:
    """Run every federation size and print one JSON object."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=_sizes, default=[1, 10, 30, 100], help="e.g. 1,10,30,100")
    ap.add_argument("--repeats", type=int, default=30, help="rounds of the two queries")
    ap.add_argument("--persons", type=int, default=300, help="persons per synthetic region")
    ap.add_argument("--deadline-s", type=float, default=120.0, help="each query's deadline")
    ap.add_argument("--memory-ledger", action="store_true", help="nodes keep no SQLite ledger")
    ap.add_argument("--workdir", type=Path, help="keep data, configs and logs here")
    args = ap.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chc-bench-fanout-") as tmp:
        root = args.workdir or Path(tmp)
        layout = prepare(root, args.persons, max(args.nodes))
        sizes = [one_size(layout, n, args) for n in args.nodes]
    print(
        json.dumps(
            {
                "benchmark": "fanout",
                "tree": _tree(),
                "goal_hub_cpu_ms_per_node_per_query": GOAL_HUB_CPU_MS_PER_NODE,
                "queries": {kind: {"sql": SQL_OF[kind], "rho": RHO[kind]} for kind in SQL_OF},
                "repeats": args.repeats,
                "persons_per_node": args.persons,
                "ledger": "memory" if args.memory_ledger else "sqlite",
                "cpus": os.cpu_count(),
                "seconds": round(time.perf_counter() - began, 1),
                "sizes": sizes,
                "marginal": marginal(sizes),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
