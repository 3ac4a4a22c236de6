"""`chc demo`: four synthetic regions, a PKI, four nodes and the hub on loopback, a report."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from coordinator import report, synth
from coordinator.client import Federation
from coordinator.local import LocalFederation, NodeSetup
from queries.results import FederatedResult
from queries.spec import Filter, Query

DEMO_STATE = Path.home() / ".chc" / "demo.json"


@dataclass(frozen=True)
class DemoQuery:
    """One question the demo asks."""

    title: str
    query: Query


def demo_queries(rho: float) -> tuple[DemoQuery, ...]:
    """The pathway questions the demo asks of every region."""
    return (
        DemoQuery(
            "Children (0-17) with asthma, by region and sex",
            Query(view="asthma_children", rho=rho, group_by=("sex",), where=(_sexes(),)),
        ),
        DemoQuery(
            "Adults with COPD, by region and age band",
            Query(view="copd", rho=rho, group_by=("age_band",)),
        ),
    )


def _sexes() -> Filter:
    return Filter(column="sex", values=("female", "male"))


@contextmanager
def _step(console: Console, text: str) -> Iterator[None]:
    started = time.perf_counter()
    with console.status(text):
        yield
    console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - started:.1f} s)[/]")


def run_demo(
    *,
    persons: int,
    seed: int,
    rho: float,
    as_json: bool,
    keep_running: bool,
    workdir: Path | None,
) -> int:
    """Run the demo end to end; returns the process exit code."""
    # Progress goes to stderr so that --json output on stdout stays machine-readable.
    console = Console(stderr=True)
    out = Console()
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="chc-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _step(
            console,
            f"Generating synthetic OMOP data for {len(synth.REGIONS)} regions "
            f"({persons:,} persons)",
        ):
            folders = synth.generate_federation(persons, root / "data", seed=seed)
        setups = tuple(
            NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name) for r in synth.REGIONS
        )
        fed = LocalFederation(workdir=root, nodes=setups)
        with _step(console, "Creating the federation PKI and starting 4 nodes and the hub (mTLS)"):
            fed.start()
        try:
            results: list[tuple[DemoQuery, FederatedResult]] = []
            with Federation(fed.hub_address, fed.analyst_identity) as client:
                for dq in demo_queries(rho):
                    with _step(console, f"Query: {dq.title} (rho={rho:g} per node)"):
                        results.append((dq, client.query(dq.query)))
            titles = {r.slug: r.name for r in synth.REGIONS}
            if as_json:
                payload = {
                    "regions": titles,
                    "queries": [
                        report.result_to_dict(r, dq.query, title=dq.title) for dq, r in results
                    ],
                }
                out.print_json(report.to_json(payload))
            else:
                out.print()
                for dq, r in results:
                    report.print_result(out, r, dq.query, title=dq.title, labels=titles)
                    out.print()
            if keep_running:
                _keep_running(console, fed)
        finally:
            with _step(console, "Stopping the federation"):
                fed.stop()
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _keep_running(console: Console, fed: LocalFederation) -> None:
    DEMO_STATE.parent.mkdir(parents=True, exist_ok=True)
    DEMO_STATE.write_text(
        json.dumps({"hub": fed.hub_address, "identity": str(fed.analyst_identity.resolve())})
    )
    console.print(
        f"\n[bold]The federation is running.[/] Hub: [cyan]{fed.hub_address}[/]\n"
        f"Analyst identity: {fed.analyst_identity}\n"
        f"Try: [cyan]chc nodes[/]  or  "
        f"[cyan]chc query --view asthma_children --group-by age_band --rho 0.05[/]\n"
        "(the demo's hub and identity are the defaults while it runs). Ctrl-C stops it."
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        DEMO_STATE.unlink(missing_ok=True)
