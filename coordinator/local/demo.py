"""`chc demo`: four synthetic regions, a PKI, four nodes and the hub on loopback, a report."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.analyst import report
from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from queries.errors import ConfigError
from queries.results import FederatedResult
from queries.spec import Filter, Measure, Query, Statistic

DEMO_STATE = Path.home() / ".chc" / "demo.json"


def read_demo_state() -> dict[str, str]:
    """The running `chc demo --keep-running`'s hub address and identity, or {} if none."""
    try:
        data = json.loads(DEMO_STATE.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}


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
        DemoQuery(
            "People with an emergency department visit in the last year, and their mean "
            "number of attendances, by region and IMD quintile (1 = most deprived)",
            Query(
                view="urgent_care",
                rho=rho,
                measures=(
                    Measure(Statistic.COUNT, "people"),
                    Measure(
                        Statistic.MEAN,
                        "mean_attendances",
                        column="ed_attendances",
                        clamp=(0.0, 10.0),
                    ),
                ),
                group_by=("imd_quintile",),
                where=(Filter(column="imd_quintile", values=("1", "2", "3", "4", "5")),),
            ),
        ),
        DemoQuery(
            "Adults with COPD, by region and whether they had an emergency admission for "
            "COPD in the last year",
            Query(view="copd", rho=rho, group_by=("admitted",)),
        ),
    )


def custom_node_setups(specs: Sequence[str]) -> tuple[NodeSetup, ...]:
    """NodeSetups from `--node NAME=PATH`: PATH is OMOP data or a `chc-node init` node.toml.

    From a node.toml the demo takes the data settings (omop, imd_lookup, pathways, consent
    registers, omop_schema); its own PKI, ports and budget replace the rest. For OMOP data
    given directly, an lsoa_imd.csv beside the tables is used as the IMD lookup.
    """
    setups: list[NodeSetup] = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep or not name or not raw:
            raise ConfigError(f"--node {spec!r}: expected NAME=PATH")
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"--node {spec!r}: {path} does not exist")
        if path.suffix == ".toml":
            setups.append(_setup_from_node_toml(name, path))
            continue
        lookup = path / synth.LOOKUP_FILE
        setups.append(
            NodeSetup(
                name=name, omop=path, title=name, imd_lookup=lookup if lookup.is_file() else None
            )
        )
    if len({s.name for s in setups}) != len(setups):
        raise ConfigError("--node names must differ")
    return tuple(setups)


def _setup_from_node_toml(name: str, path: Path) -> NodeSetup:
    """The data settings of a custodian's node.toml, its relative paths taken from its folder.

    Only read here, not checked: the node started from them checks them with its own loader
    and refuses with its own message (the hub side never imports the node's code).
    """
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--node {name}={path}: cannot read it as TOML: {exc}") from None

    def where(key: str, raw: object) -> Path:
        if not isinstance(raw, str):
            raise ConfigError(f"{path}: {key} must be a path (a string)")
        return (path.parent / Path(raw).expanduser()).resolve()

    if "omop" not in data:
        raise ConfigError(f"{path}: no `omop =` setting; which data should node {name} serve?")
    consent = data.get("consent", {})
    registers = consent.get("registers", []) if isinstance(consent, dict) else []
    if isinstance(registers, str):
        registers = [registers]
    pathways = data.get("pathways")
    return NodeSetup(
        name=name,
        omop=where("omop", data["omop"]),
        title=name,
        imd_lookup=where("imd_lookup", data["imd_lookup"]) if "imd_lookup" in data else None,
        pathways=tuple(str(p) for p in pathways) if isinstance(pathways, list) else None,
        omop_schema=str(data["omop_schema"]) if "omop_schema" in data else None,
        consent_registers=tuple(where("consent.registers", r) for r in registers)
        if isinstance(registers, list)
        else (),
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
    nodes: Sequence[str] = (),
) -> int:
    """Run the demo end to end; returns the process exit code.

    With `nodes` (NAME=PATH, see custom_node_setups) the federation runs on custodian-provided
    OMOP data instead of synthetic regions.
    """
    custom = custom_node_setups(nodes) if nodes else ()
    # Progress goes to stderr so that --json output on stdout stays machine-readable.
    console = Console(stderr=True)
    out = Console()
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="chc-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    try:
        if custom:
            setups = custom
        else:
            with _step(
                console,
                f"Generating synthetic OMOP data for {len(synth.REGIONS)} regions "
                f"({persons:,} persons)",
            ):
                folders = synth.generate_federation(persons, root / "data", seed=seed)
            setups = tuple(
                NodeSetup(
                    name=r.slug,
                    omop=folders[r.slug],
                    title=r.name,
                    imd_lookup=folders[r.slug] / synth.LOOKUP_FILE,
                )
                for r in synth.REGIONS
            )
        fed = LocalFederation(workdir=root, nodes=setups)
        with _step(
            console,
            f"Creating the federation PKI and starting {len(setups)} nodes and the hub (mTLS)",
        ):
            fed.start()
        try:
            results: list[tuple[DemoQuery, FederatedResult]] = []
            with Federation(fed.hub_address, fed.analyst_identity) as client:
                for dq in demo_queries(rho):
                    with _step(console, f"Query: {dq.title} (rho={rho:g} per node)"):
                        results.append((dq, client.query(dq.query)))
            titles = {s.name: s.title or s.name for s in setups}
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
