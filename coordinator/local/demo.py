"""`chc demo`: four synthetic regions, a PKI, four nodes and the hub on loopback, a report."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from coordinator.analyst import report
from coordinator.analyst.client import Federation
from coordinator.local import node_toml, synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols.cli import console as rich_console
from queries.errors import ConfigError
from queries.results import FederatedResult
from queries.schema import Catalog
from queries.spec import Filter, Measure, Query, Statistic

DEMO_STATE = Path.home() / ".chc" / "demo.json"
DEMO_FIGURES = Path("chc-figures")  # --learning's figures, under the current directory


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


def generic_queries(rho: float) -> tuple[DemoQuery, ...]:
    """Questions every node can answer: its `persons` and `visits` views, on any OMOP data."""
    return (
        DemoQuery(
            "Persons, by region, sex and age band",
            Query(view="persons", rho=rho, group_by=("sex", "age_band"), where=(_sexes(),)),
        ),
        DemoQuery(
            "Visits, by region, visit type and calendar year",
            Query(
                view="visits",
                rho=rho,
                measures=(Measure(Statistic.COUNT_ROWS, "visits"),),
                group_by=("visit_type", "year"),
            ),
        ),
    )


def _answerable(query: Query, catalog: Catalog) -> bool:
    """Whether the catalog serves the query's view with every column the query names."""
    view = next((v for v in catalog.views if v.name == query.view), None)
    if view is None:
        return False
    named = {*query.group_by, *(f.column for f in query.where)}
    named |= {m.column for m in query.measures if m.column is not None}
    return named <= {c.name for c in view.columns}


def choose_queries(rho: float, catalogs: Sequence[Catalog]) -> tuple[DemoQuery, ...]:
    """The pathway questions every node's catalog can answer, else the generic ones.

    Decided from what the nodes publish (Describe), never from their data: a question one node
    cannot plan would be refused there and the table would be partial, and a custodian's node
    may serve none of the demo's pathways (its own pathways only, or none).
    """
    fitting = tuple(
        dq for dq in demo_queries(rho) if all(_answerable(dq.query, c) for c in catalogs)
    )
    return fitting or generic_queries(rho)


def custom_node_setups(specs: Sequence[str]) -> tuple[NodeSetup, ...]:
    """NodeSetups from `--node NAME=PATH`: PATH is OMOP data or a custodian's node.toml.

    A node.toml is used as it is, but for the keys the demo owns (node_toml.OWNED_KEYS: the
    node's name, identity, CRL, listen address and ledger), so the node serves the custodian's
    own pathways, reference date, budget, disclosure rules and consent settings, and never
    touches the custodian's ledger. For OMOP data given directly, an lsoa_imd.csv beside the
    tables is used as the IMD lookup.
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
    """A node on a custodian's node.toml, read here only to refuse an unreadable file early.

    Not checked here: the node started from it checks it with its own loader and refuses with
    its own message (the hub side never imports the node's code).
    """
    source = f"--node {name}={path}"
    table = node_toml.custodian_table(path, source=source)
    omop = table.get("omop")
    if not isinstance(omop, str) or not omop:
        raise ConfigError(
            f'{source}: no `omop = "PATH"` setting; which data should node {name} serve?'
        )
    return NodeSetup(name=name, omop=Path(omop), title=name, config=path)


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
    learning: bool = False,
    figures: Path = DEMO_FIGURES,
) -> int:
    """Run the demo end to end; returns the process exit code.

    With `nodes` (NAME=PATH, see custom_node_setups) the federation runs on custodian-provided
    OMOP data instead of synthetic regions. With `learning`, a comparison of care sites and an
    ITS follow the report, their figures written to `figures` (demo_learning.py).
    """
    # Imported here: demo_learning uses the analyst's ITS command (its_cli), whose module
    # imports the analyst's CLI, which imports this module (read_demo_state).
    from coordinator.local import demo_learning

    if learning:
        demo_learning.check_learning(nodes)
    custom = custom_node_setups(nodes) if nodes else ()
    # Progress goes to stderr so that --json output on stdout stays machine-readable.
    console = rich_console(stderr=True)
    out = rich_console()
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
                    care_sites=tuple(t.code for t in synth.region_trusts(r.slug)),
                    # Synthetic regions: analysts may try their own cohorts (a custodian's
                    # node answers none unless its node.toml [cohorts] says so).
                    extra_toml=DEMO_COHORTS,
                )
                for r in synth.REGIONS
            )
        fed = LocalFederation(workdir=root, nodes=setups)
        with _step(
            console,
            f"Creating the federation PKI and starting {len(setups)} "
            f"node{'s' if len(setups) > 1 else ''} and the hub (mTLS)",
        ):
            fed.start()
        try:
            results: list[tuple[DemoQuery, FederatedResult]] = []
            with Federation(fed.hub_address, fed.analyst_identity) as client:
                described, _ = client.nodes()
                questions = choose_queries(rho, [d.catalog for d in described])
                note = _skipped_note(questions, rho)
                if note:
                    console.print(note)
                for dq in questions:
                    with _step(console, f"Query: {dq.title} (rho={rho:g} per node)"):
                        results.append((dq, client.query(dq.query)))
                learned = (
                    demo_learning.run_learning(client, figures.resolve(), console, _step)
                    if learning
                    else None
                )
            titles = {s.name: s.title or s.name for s in setups}
            if as_json:
                payload: dict[str, object] = {
                    "regions": titles,
                    "queries": [
                        report.result_to_dict(r, dq.query, title=dq.title) for dq, r in results
                    ],
                }
                if learned is not None:
                    payload["learning"] = learned.to_dict()
                out.print_json(report.to_json(payload))
            else:
                out.print()
                for dq, r in results:
                    report.print_result(out, r, dq.query, title=dq.title, labels=titles)
                    out.print()
                if learned is not None:
                    # Plain text, as `chc learn` prints it: no rich markup in the tables.
                    for line in demo_learning.learning_lines(learned):
                        out.print(line, markup=False, highlight=False, soft_wrap=True)
            if keep_running:
                _keep_running(console, fed, questions[0].query)
        finally:
            with _step(console, "Stopping the federation"):
                fed.stop()
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return learned.exit_code if learned is not None else 0


def _skipped_note(asked: Sequence[DemoQuery], rho: float) -> str:
    """What the demo left out because some node does not serve it, or "" if nothing."""
    skipped = {dq.query.view for dq in demo_queries(rho)} - {dq.query.view for dq in asked}
    if not skipped:
        return ""
    instead = (
        "; it asks about persons and visits instead" if tuple(asked) == generic_queries(rho) else ""
    )
    return (
        f"[yellow]![/] Not every node serves {', '.join(sorted(skipped))} (from the nodes' "
        f"catalogs): the demo skips those questions{instead}"
    )


# The [cohorts] policy of the demo's synthetic nodes, and a cohort to try on them (COPD).
DEMO_COHORTS = '[cohorts]\nallow = "any"\n'
COHORT_EXAMPLE = (
    "SELECT sex, COUNT(*) FROM cohort(conditions => [255573], age_min => 40) GROUP BY sex"
)


def _keep_running(console: Console, fed: LocalFederation, example: Query) -> None:
    DEMO_STATE.parent.mkdir(parents=True, exist_ok=True)
    DEMO_STATE.write_text(
        json.dumps({"hub": fed.hub_address, "identity": str(fed.analyst_identity.resolve())})
    )
    console.print(
        f"\n[bold]The federation is running.[/] Hub: [cyan]{fed.hub_address}[/]\n"
        f"Analyst identity: {fed.analyst_identity}\n"
        f"Try: [cyan]chc nodes[/]  or  "
        f"[cyan]chc query --view {example.view} --group-by {example.group_by[-1]} --rho 0.05[/]\n"
        + (
            f'or an ad hoc cohort: [cyan]chc query --sql "{COHORT_EXAMPLE}" --rho 0.05[/]\n'
            if any(s.extra_toml == DEMO_COHORTS for s in fed.nodes)
            else ""
        )
        + "(the demo's hub and identity are the defaults while it runs). Ctrl-C stops it."
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        DEMO_STATE.unlink(missing_ok=True)
