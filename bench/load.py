"""Load: many concurrent analysts x many queries through the hub of a 4-node federation.

Each analyst has a certificate of their own from the federation's CA and runs a mix of SQL
(counts, means, medians, grouped queries, a query over the per-query cap), and a few have a
small per-analyst cap that they exhaust, so expected refusals happen along with releases.
At the end the budgets are checked to the ledger: for every analyst and node, the rho the
client was told it was charged equals the rho the node's ledger released to that analyst,
which equals what the node reports (`chc budget`'s figure, from Federation.budget()).

Prints one JSON object: queries, errors by kind (expected refusals apart), p50/p99 latency,
elapsed seconds and queries per second. `python -m bench.load` runs 20 analysts x 500
queries; tests/load/test_load.py runs it smaller and asserts on the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.timing import percentile
from coordinator.analyst.client import Federation
from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols.security.pki import CA_FILE
from queries.errors import BudgetExceededError, ChcError, QueryError
from queries.results import NodeStatus
from queries.spec import Query
from queries.sql import parse_sql

RHO = 0.002
MAX_RHO_PER_QUERY = 0.5
# Analysts 1..TIGHT have a per-analyst cap they exhaust after about TIGHT_CAP / RHO queries.
TIGHT = 4
TIGHT_CAP = 0.03
ROOMY_CAP = 1_000.0
MIX = (
    "SELECT sex, COUNT(*) AS n FROM persons GROUP BY sex",
    "SELECT sex, AVG(age) AS mean_age FROM persons GROUP BY sex",
    "SELECT MEDIAN(age) AS median_age FROM persons",
    "SELECT imd_quintile, COUNT(*) AS n FROM persons GROUP BY imd_quintile",
    "SELECT visit_type, COUNT(*) AS n, AVG(length_of_stay) AS los FROM visits GROUP BY visit_type",
    "SELECT age_band, sex, COUNT(*) AS n FROM persons GROUP BY age_band, sex",
    "SELECT COUNT(*) AS n FROM persons",
)
OVER_CAP = "SELECT COUNT(*) AS n FROM persons"  # sent at 2x the per-query cap: refused
OVER_CAP_EVERY = 10  # one query in ten


def analyst_name(i: int) -> str:
    """The i-th load analyst's certificate name (1-based)."""
    return f"load-analyst-{i:02d}"


def queries_for(i: int, count: int) -> list[Query]:
    """Analyst i's queries: the mix from an offset of their own, one in ten over the cap."""
    out = []
    for k in range(count):
        if k % OVER_CAP_EVERY == OVER_CAP_EVERY - 1:
            out.append(parse_sql(OVER_CAP, rho=2 * MAX_RHO_PER_QUERY))
        else:
            out.append(parse_sql(MIX[(i + k) % len(MIX)], rho=RHO))
    return out


def budget_toml(analysts: int) -> str:
    """[budget] for every node: roomy caps, and small ones for the first TIGHT analysts."""
    tight = "\n".join(f'"{analyst_name(i)}" = {TIGHT_CAP}' for i in range(1, TIGHT + 1))
    return (
        f"[budget]\ntotal_rho = {analysts * ROOMY_CAP}\n"
        f"max_rho_per_query = {MAX_RHO_PER_QUERY}\nanalyst_rho = {ROOMY_CAP}\n"
        f"[budget.analysts]\n{tight}\n"
    )


@dataclass
class LoadReport:
    """What a load run did and found."""

    analysts: int
    queries_per_analyst: int
    queries: int = 0
    released: int = 0
    expected_refusals: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # unexpected, by kind
    error_examples: list[str] = field(default_factory=list)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    elapsed_s: float = 0.0
    queries_per_s: float = 0.0
    # Every (analyst, node) whose three budget figures disagree: told, ledger, reported.
    budget_mismatches: list[str] = field(default_factory=list)
    ledgers_verified: bool = False
    ledger_anomalies: list[str] = field(default_factory=list)
    # rho charged at every node per analyst, as the clients were told (for the test).
    told: dict[str, dict[str, float]] = field(default_factory=dict)


class _Tally:
    """Thread-safe tallies of outcomes, latencies and what each analyst was told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.kinds: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.examples: list[str] = []
        self.released = 0
        self.told: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def unexpected(self, kind: str, text: str) -> None:
        self.kinds[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {text[:300]}")


def _classify(exc: ChcError) -> str | None:
    """The expected-refusal kind of an error, or None if it was not expected."""
    text = str(exc)
    if isinstance(exc, BudgetExceededError):
        return "analyst_cap"
    if isinstance(exc, QueryError) and "per-query" in text.replace("per query", "per-query"):
        return "over_query_cap"
    if isinstance(exc, QueryError) and "max_rho_per_query" in text:
        return "over_query_cap"
    return None


def _analyst(fed: LocalFederation, i: int, queries: list[Query], tally: _Tally) -> None:
    name = analyst_name(i)
    with Federation(fed.hub_address, fed.analyst_identity_of(name)) as client:
        for query in queries:
            started = time.perf_counter()
            try:
                result = client.query(query, deadline_s=30.0)
            except ChcError as exc:
                ms = (time.perf_counter() - started) * 1000
                kind = _classify(exc)
                with tally.lock:
                    tally.latencies.append(ms)
                    if kind is None:
                        tally.unexpected(type(exc).__name__, str(exc))
                    else:
                        tally.expected[kind] += 1
                continue
            ms = (time.perf_counter() - started) * 1000
            with tally.lock:
                tally.latencies.append(ms)
                tally.released += 1
                for o in result.nodes:
                    if o.status is NodeStatus.OK:
                        tally.told[name][o.node] += o.rho_charged
                    else:
                        tally.unexpected(f"partial:{o.status.value}", f"{o.node}: {o.message}")


def _ledger_released(fed: LocalFederation, node: str) -> tuple[dict[str, float], list[str]]:
    """rho released per analyst in a node's ledger, and the ledger's anomalies."""
    path = fed.ledger_path(node)
    verification = verify(open_file(path), ca_pem=(fed.pki / CA_FILE).read_bytes())
    spent: dict[str, float] = defaultdict(float)
    for entry in open_file(path).read():
        if entry.head:
            continue
        body = json.loads(entry.body)
        if body.get("outcome") == "released":
            spent[body["analyst"]] += body["rho"]
    return spent, [f"{node}: {a}" for a in verification.anomalies]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def run_load(workdir: Path, *, analysts: int, queries: int, persons: int = 8_000) -> LoadReport:
    """Start a 4-node federation in workdir, run the load, check budgets; the report."""
    folders = synth.generate_federation(persons, workdir / "data", seed=21)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], extra_toml=budget_toml(analysts))
        for r in synth.REGIONS
    )
    names = tuple(analyst_name(i) for i in range(1, analysts + 1))
    report = LoadReport(analysts=analysts, queries_per_analyst=queries)
    tally = _Tally()
    with LocalFederation(workdir=workdir, nodes=setups, analysts=names) as fed:
        plans = {i: queries_for(i, queries) for i in range(1, analysts + 1)}
        threads = [
            threading.Thread(target=_analyst, args=(fed, i, plans[i], tally))
            for i in range(1, analysts + 1)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.elapsed_s = round(time.perf_counter() - started, 2)
        reported: dict[str, dict[str, float]] = {}
        for name in names:
            with Federation(fed.hub_address, fed.analyst_identity_of(name)) as client:
                reported[name] = {
                    b.node: b.analyst.rho_spent for b in client.budget() if b.analyst is not None
                }
        fed.stop()
        ledgers: dict[str, dict[str, float]] = {}
        for setup in setups:
            ledgers[setup.name], anomalies = _ledger_released(fed, setup.name)
            report.ledger_anomalies += anomalies
    report.ledgers_verified = not report.ledger_anomalies
    for name in names:
        for setup in setups:
            told = tally.told[name][setup.name]
            ledger = ledgers[setup.name].get(name, 0.0)
            shown = reported[name].get(setup.name, float("nan"))
            if not (_close(told, ledger) and _close(ledger, shown)):
                report.budget_mismatches.append(
                    f"{name} at {setup.name}: told {told!r}, ledger {ledger!r}, shown {shown!r}"
                )
    report.told = {k: dict(v) for k, v in tally.told.items()}
    report.queries = len(tally.latencies)
    report.released = tally.released
    report.expected_refusals = dict(tally.expected)
    report.errors = dict(tally.kinds)
    report.error_examples = tally.examples
    report.p50_ms = round(percentile(tally.latencies, 50), 1)
    report.p99_ms = round(percentile(tally.latencies, 99), 1)
    report.queries_per_s = round(report.queries / report.elapsed_s, 1)
    return report


def main() -> None:
    """Run the load and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--analysts", type=int, default=20)
    ap.add_argument("--queries", type=int, default=500, help="per analyst")
    ap.add_argument("--persons", type=int, default=8_000, help="total across 4 regions")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chc-load-") as tmp:
        report = run_load(
            Path(tmp), analysts=args.analysts, queries=args.queries, persons=args.persons
        )
    out = asdict(report)
    del out["told"]
    out["benchmark"] = "load"
    out["python"] = sys.version.split()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
