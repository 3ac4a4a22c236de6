"""`chc audit ...` for auditors and `chc budget` for analysts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from coordinator.audit import report as audit_report
from coordinator.audit import verification
from coordinator.audit.export import export
from coordinator.audit.sources import (
    LedgerSource,
    node_addresses,
    open_file,
    open_relayed,
    open_remote,
)
from coordinator.local.demo import read_demo_state
from protocols.cli import (
    AnalystIdentityOpt,
    ChcGroup,
    CommandFailedError,
    ExitCode,
    JsonOpt,
    read_identity,
)
from protocols.cli import HubOpt as HubAddressOpt
from protocols.cli import console as rich_console
from protocols.ledger.entry import load_public_key
from protocols.link_frames import DIAL_ADDRESS
from protocols.security.pki import Identity, Role
from queries.errors import ConfigError

if TYPE_CHECKING:
    from coordinator.analyst.client import NodeBudget

audit_app = typer.Typer(
    help="Auditors: read, verify and report on the nodes' privacy ledgers.",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)

PathsArg = Annotated[
    list[Path] | None,
    typer.Argument(help="ledger files (node.ledger.sqlite) or exports (.jsonl, .parquet)"),
]
HubOpt = Annotated[
    str | None,
    typer.Option(
        help="hub host:port: find every node there, then read each node directly (an "
        "outbound-only node through the hub's relay, verified end to end)"
    ),
]
NodeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--node",
        help="NAME=HOST:PORT of a node to read directly, or NAME=dial to read an "
        "outbound-only node through --hub (repeatable)",
    ),
]
IdentityOpt = Annotated[
    Path | None, typer.Option(help="identity folder (an auditor's, to read ledgers)")
]
KeyOpt = Annotated[
    Path | None,
    typer.Option(help="the node's ledger public key (PEM or hex), for a single ledger"),
]


def _identity(identity: Path | None, role: Role) -> Identity:
    """The given identity, or while `chc demo --keep-running` runs, the demo's one for role."""
    if identity is None:
        from coordinator.local.federation import AUDITOR_NAME

        demo = read_demo_state().get("identity")
        if demo is None:
            raise ConfigError("give --identity DIR (your certificate folder)")
        identity = Path(demo)
        if role is Role.AUDITOR:
            identity = identity.parent.parent / Role.AUDITOR.value / AUDITOR_NAME
    loaded = read_identity(identity)
    if loaded.role is not role:
        raise ConfigError(
            f"{identity} holds a {loaded.role.value} certificate; this needs a {role.value} one"
        )
    return loaded


def _sources(
    paths: list[Path] | None,
    hub: str | None,
    nodes: list[str] | None,
    identity: Path | None,
    public_key: Path | None,
) -> list[LedgerSource]:
    key = load_public_key(public_key) if public_key is not None else None
    sources = [open_file(p, public_key=key) for p in paths or []]
    if not sources and hub is None and not nodes:
        hub = read_demo_state().get("hub")
        if hub is None:
            raise ConfigError("give ledger files, --hub ADDRESS or --node NAME=ADDRESS")
    if hub is not None or nodes:
        ident = _identity(identity, Role.AUDITOR)
        addresses = node_addresses(hub, ident) if hub is not None else {}
        for item in nodes or []:
            name, sep, address = item.partition("=")
            if not sep or not name or not address:
                raise ConfigError(f"--node {item!r} must look like NAME=HOST:PORT")
            addresses[name] = address
        for name, address in sorted(addresses.items()):
            if address == DIAL_ADDRESS:
                if hub is None:
                    raise ConfigError(
                        f"--node {name}={address}: an outbound-only node is read through its "
                        "hub: give --hub HOST:PORT instead"
                    )
                # Outbound-only: no one can connect to it, so its hub relays its signed
                # stream unchanged, and the node signs its ledger key for this audit.
                source = open_relayed(name, hub, ident)
            else:
                source = open_remote(name, address, ident)
            if key is not None:
                source = LedgerSource(source.label, source.node, key, "given", source.read)
            sources.append(source)
    if key is not None and len(sources) > 1:
        raise ConfigError("--public-key checks one ledger; give one file or one --node")
    return sources


def _ca(ca: Path | None, identity: Path | None, remote: bool) -> bytes | None:
    if ca is not None:
        return ca.read_bytes()
    if identity is not None:
        return read_identity(identity).ca_pem
    if remote or read_demo_state():
        try:
            return _identity(None, Role.AUDITOR).ca_pem
        except ConfigError:
            return None
    return None


@audit_app.command()
def verify(
    paths: PathsArg = None,
    hub: HubOpt = None,
    node: NodeOpt = None,
    identity: IdentityOpt = None,
    public_key: KeyOpt = None,
    ca: Annotated[
        Path | None, typer.Option(help="federation CA (ca.pem) to check analysts' signatures")
    ] = None,
    previous: Annotated[
        list[Path] | None,
        typer.Option(
            help="an earlier export of a ledger (repeatable): every entry it held must still "
            "be there, unchanged"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check each ledger's chain, signatures, sequence, head, caps and analysts' signatures.

    Exits 1 if anything is wrong; every anomaly names its entry.
    """
    sources = _sources(paths, hub, node, identity, public_key)
    ca_pem = _ca(ca, identity, hub is not None or bool(node))
    results = [verification.verify(s, ca_pem=ca_pem) for s in sources]
    for earlier in (open_file(p) for p in previous or []):
        matches = [i for i, s in enumerate(sources) if s.node == earlier.node]
        if len(matches) != 1:
            raise ConfigError(f"--previous {earlier.label}: no single ledger of {earlier.node!r}")
        found = verification.compare_with_earlier(sources[matches[0]], earlier)
        results[matches[0]].anomalies.extend(found)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        console = rich_console()
        for r in results:
            summary = (
                f"{r.entries} entries ({r.released} released, {r.refused} refused, "
                f"{len(r.policies)} budget policies), rho {r.rho_released:.6g} released"
            )
            name = f"[bold]{r.node or '?'}[/] ({r.source})"
            if r.ok:
                console.print(f"[green]ok[/] {name}: {summary}; chain, signatures and caps verify")
            else:
                console.print(f"[red]FAILED[/] {name}: {summary}; {len(r.anomalies)} anomalies:")
                for a in r.anomalies:
                    console.print(f"  {a}", highlight=False, markup=False, soft_wrap=True)
            console.print(f"  [dim]public key from {r.key_origin}[/]")
            for note in r.notes:
                console.print(f"  [dim]{note}[/]")
            # Every policy change; a loosening is legitimate only with its override, which an
            # auditor should see and follow up, so it is printed in the open.
            for policy in r.policies:
                style = "yellow" if policy.loosened else "dim"
                console.print(f"  [{style}]{escape(str(policy))}[/]", soft_wrap=True)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@audit_app.command("export")
def export_cmd(
    out: Annotated[
        Path,
        typer.Option(help="file (.jsonl or .parquet) for one ledger; a folder for several"),
    ],
    paths: PathsArg = None,
    hub: HubOpt = None,
    node: NodeOpt = None,
    identity: IdentityOpt = None,
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl or parquet, when --out is a folder")
    ] = "jsonl",
) -> None:
    """Export ledgers, exactly as signed, to JSON Lines or Parquet (verifiable later)."""
    if fmt not in ("jsonl", "parquet"):
        raise ConfigError("--format must be jsonl or parquet")
    sources = _sources(paths, hub, node, identity, None)
    console = rich_console(stderr=True)
    to_folder = len(sources) > 1 or out.is_dir() or out.suffix == ""
    if to_folder:
        out.mkdir(parents=True, exist_ok=True)
    for s in sources:
        target = out / f"{s.node or Path(s.label).stem}.{fmt}" if to_folder else out
        count = export(s, target)
        console.print(f"exported {count} entries of {s.node or s.label} to {target}")


@audit_app.command()
def report(
    paths: PathsArg = None,
    hub: HubOpt = None,
    node: NodeOpt = None,
    identity: IdentityOpt = None,
    by: Annotated[str, typer.Option(help="chart and summary by node, analyst, view or period")] = (
        "analyst"
    ),
    csv_out: Annotated[Path | None, typer.Option("--csv", help="write every row as CSV")] = None,
    chart: Annotated[Path | None, typer.Option(help="write a bar chart (.svg)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Spend by node, analyst, view (pathway) and budget period: table, CSV and chart."""
    sources = _sources(paths, hub, node, identity, None)
    rows = audit_report.spend_rows(sources)
    summary = audit_report.summarise(rows, by)
    if csv_out is not None:
        with csv_out.open("w", encoding="utf-8", newline="") as f:
            audit_report.write_csv(rows, f)
    if chart is not None:
        if chart.suffix.lower() != ".svg":
            raise ConfigError("--chart writes SVG: give a file name ending in .svg")
        chart.write_text(audit_report.svg_chart(rows, by), encoding="utf-8")
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "node": r.node,
                        "period": r.period,
                        "analyst": r.analyst,
                        "view": r.view,
                        "released": r.released,
                        "refused": r.refused,
                        "rho": r.rho,
                        "epsilon": r.epsilon,
                        "delta": r.delta,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    console = rich_console()
    table = Table(title="Privacy budget spent (zCDP rho; epsilon at each node's delta)")
    for col in ("node", "period", "analyst", "view / pathway", "released", "refused"):
        table.add_column(col, justify="right" if col in ("released", "refused") else "left")
    table.add_column("rho", justify="right")
    table.add_column("epsilon", justify="right")
    for r in rows:
        table.add_row(
            r.node,
            r.period,
            r.analyst,
            r.view,
            str(r.released),
            str(r.refused),
            f"{r.rho:.6g}",
            f"{r.epsilon:.4g}",
        )
    console.print(table)
    totals = Table(title=f"Total by node and {by}")
    for col in ("node", by, "released", "refused", "rho", "epsilon"):
        totals.add_column(col, justify="right" if col not in ("node", by) else "left")
    for r in summary:
        value = r.node if by == "node" else str(getattr(r, by))
        totals.add_row(
            r.node,
            value,
            str(r.released),
            str(r.refused),
            f"{r.rho:.6g}",
            f"{r.epsilon:.4g}",
        )
    console.print(totals)
    history = audit_report.policy_history(sources)
    if history:
        policies = Table(title="Budget policy entries (caps in zCDP rho)")
        for col in ("node", "entry", "time", "change"):
            policies.add_column(col, justify="right" if col == "entry" else "left")
        for node_name, note in history:
            policies.add_row(node_name, str(note.entry), note.time, escape(note.change))
        console.print(policies)
    for path, what in ((csv_out, "CSV"), (chart, "chart")):
        if path is not None:
            console.print(f"wrote the {what} to {path}")


def budget(
    hub: HubAddressOpt = None,
    identity: AnalystIdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remaining privacy budget at every node, overall and for you (spends nothing)."""
    from coordinator.analyst.client import Federation

    hub = hub or read_demo_state().get("hub")
    if hub is None:
        raise ConfigError("give --hub ADDRESS (or start `chc demo --keep-running`)")
    with Federation(hub, _identity(identity, Role.ANALYST)) as fed:
        found = fed.budget()
    if as_json:
        payload = [
            {
                "node": b.node,
                "status": b.status.value,
                "message": b.message,
                "rho_total": b.budget.rho_total if b.budget else None,
                "rho_spent": b.budget.rho_spent if b.budget else None,
                "rho_remaining": b.budget.rho_remaining if b.budget else None,
                "max_rho_per_query": b.budget.max_rho_per_query if b.budget else None,
                "your_rho_spent": b.analyst.rho_spent if b.analyst else None,
                "your_rho_remaining": b.analyst.rho_remaining if b.analyst else None,
            }
            for b in found
        ]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        _fail_if_nobody(found)
        return
    table = Table(title="Privacy budget (zCDP rho) in the current period")
    for col in ("node", "spent", "total", "remaining", "per query", "you spent", "you can spend"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for b in found:
        if b.budget is None:
            table.add_row(b.node, f"[red]{b.status.value}[/]", "", "", "", "", "")
            continue
        mine = b.analyst
        table.add_row(
            b.node,
            f"{b.budget.rho_spent:.6g}",
            f"{b.budget.rho_total:.6g}",
            f"{b.budget.rho_remaining:.6g}",
            f"{b.budget.max_rho_per_query:.6g}",
            f"{mine.rho_spent:.6g}" if mine else "?",
            f"{mine.rho_remaining:.6g}" if mine else "?",
        )
    console = rich_console()
    console.print(table)
    for b in found:
        if b.message:
            console.print(f"[yellow]{b.node}[/]: {b.message}")
    _fail_if_nobody(found)


def _fail_if_nobody(found: list[NodeBudget]) -> None:
    """Exit non-zero if no node reported its budget."""
    if found and any(b.budget is not None for b in found):
        return
    statuses = ", ".join(f"{b.node} {b.status.value}" for b in found) or "the hub has no nodes"
    raise CommandFailedError(ExitCode.NO_ANSWER, f"no node answered ({statuses})")
