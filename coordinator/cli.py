"""`chc`: the command line for analysts, auditors and hub operators."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from coordinator import report, synth
from coordinator.audit_cli import audit_app, budget
from coordinator.client import Federation
from coordinator.demo import read_demo_state, run_demo
from protocols import security
from protocols.errors import ChcError, ConfigError
from protocols.process import setup_logging
from queries import spec
from queries.sql import parse_sql

app = typer.Typer(
    help="chc: federated, differentially private analytics for regional health data.",
    no_args_is_help=True,
)
hub_app = typer.Typer(help="Run the hub (coordinator).", no_args_is_help=True)
pki_app = typer.Typer(help="Federation PKI: CA and certificates.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
app.add_typer(pki_app, name="pki")
app.add_typer(audit_app, name="audit")
app.command("budget")(budget)


@app.command()
def demo(
    persons: Annotated[int, typer.Option(help="synthetic persons across all regions")] = 100_000,
    seed: Annotated[int, typer.Option(help="seed of the synthetic data")] = 2015,
    rho: Annotated[float, typer.Option(help="zCDP budget per query at each node")] = 0.05,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="leave the federation up until Ctrl-C")
    ] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="keep data, PKI and logs here (default: a temp folder)")
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="NAME=PATH: run a node on your own OMOP data (a DuckDB file, a Parquet/CSV "
            "folder, or a node.toml from `chc-node init`) instead of synthetic regions; repeat",
        ),
    ] = None,
) -> None:
    """Four synthetic regions, four nodes and the hub on loopback with mTLS, and a report."""
    if persons < 4:
        raise ConfigError("--persons must be at least 4 (one per region)")
    raise typer.Exit(
        run_demo(
            persons=persons,
            seed=seed,
            rho=rho,
            as_json=as_json,
            keep_running=keep_running,
            workdir=workdir,
            nodes=tuple(node or ()),
        )
    )


@app.command("synth")
def synth_cmd(
    region: Annotated[str, typer.Option(help="nenc, nwc, yh or gm")],
    persons: Annotated[int, typer.Option(help="number of persons")],
    out: Annotated[Path, typer.Option(help="folder for the OMOP Parquet files")],
    seed: Annotated[int, typer.Option(help="random seed")] = 2015,
) -> None:
    """Write synthetic OMOP CDM Parquet files for one region."""
    counts = synth.generate_region(synth.region_by_slug(region), persons, out, seed=seed)
    Console(stderr=True).print(
        "wrote " + ", ".join(f"{k}: {v:,}" for k, v in counts.items()) + f" to {out}"
    )


def _connect(hub: str | None, identity: Path | None) -> Federation:
    defaults = read_demo_state()
    hub = hub or defaults.get("hub")
    ident = identity or (Path(defaults["identity"]) if "identity" in defaults else None)
    if hub is None or ident is None:
        raise ConfigError(
            "give --hub ADDRESS and --identity DIR (or start `chc demo --keep-running`, whose "
            "hub and analyst identity are then the defaults)"
        )
    return Federation(hub, ident)


def _budget(rho: float | None, epsilon: float | None, delta: float) -> float:
    if rho is not None and epsilon is not None:
        raise ConfigError("give --rho or --epsilon, not both")
    if epsilon is not None:
        return spec.rho_from_epsilon(epsilon, delta)
    if rho is None:
        raise ConfigError("give the privacy budget per node: --rho R (zCDP) or --epsilon E")
    return rho


def _build_query(
    sql_text: str | None,
    spec_file: Path | None,
    view: str | None,
    group_by: list[str] | None,
    where: list[str] | None,
    rho: float | None,
    epsilon: float | None,
    delta: float,
) -> spec.Query:
    chosen = [x for x in (sql_text, spec_file, view) if x is not None]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --sql, --spec FILE or --view")
    if spec_file is not None:
        try:
            data = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read spec {spec_file}: {exc}") from None
        if isinstance(data, dict) and (rho is not None or epsilon is not None):
            data = {k: v for k, v in data.items() if k not in {"rho", "epsilon", "delta"}}
            data["rho"] = _budget(rho, epsilon, delta)
        return spec.from_dict(data)
    budget = _budget(rho, epsilon, delta)
    if sql_text is not None:
        return parse_sql(sql_text, rho=budget)
    filters = []
    for w in where or []:
        column, sep, values = w.partition("=")
        if not sep or not values:
            raise ConfigError(f"--where {w!r} must look like COLUMN=V1,V2")
        filters.append(spec.Filter(column=column.strip(), values=tuple(values.split(","))))
    return spec.Query(
        view=view or "", rho=budget, group_by=tuple(group_by or ()), where=tuple(filters)
    )


@app.command()
def query(
    sql_text: Annotated[
        str | None, typer.Option("--sql", help='e.g. "SELECT sex, COUNT(*) FROM copd GROUP BY sex"')
    ] = None,
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="a YAML or JSON query spec")
    ] = None,
    view: Annotated[str | None, typer.Option(help="count persons in this view")] = None,
    group_by: Annotated[
        list[str] | None, typer.Option("--group-by", "-g", help="public column (repeatable)")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="COLUMN=V1,V2 on a public column (repeatable)")
    ] = None,
    rho: Annotated[float | None, typer.Option(help="zCDP budget charged at each node")] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="budget as (epsilon, delta)-DP, converted to rho")
    ] = None,
    delta: Annotated[float, typer.Option(help="delta for --epsilon")] = 1e-6,
    explain: Annotated[
        bool, typer.Option("--explain", help="show the plan, cost and noise; spend nothing")
    ] = False,
    hub: Annotated[str | None, typer.Option(help="hub address host:port")] = None,
    identity: Annotated[Path | None, typer.Option(help="analyst identity folder")] = None,
    deadline: Annotated[float, typer.Option(help="seconds to wait for nodes")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
) -> None:
    """Run a federated DP query at every node; print per-region and pooled estimates."""
    q = _build_query(sql_text, spec_file, view, group_by, where, rho, epsilon, delta)
    console = Console()
    with _connect(hub, identity) as fed:
        if explain:
            explains = fed.explain(q, deadline_s=deadline)
            if as_json:
                console.print_json(report.to_json([report.explain_to_dict(e) for e in explains]))
            else:
                report.print_explain(console, explains, q)
            return
        result = fed.query(q, deadline_s=deadline)
    if as_json:
        console.print_json(report.to_json(report.result_to_dict(result, q)))
    elif as_csv:
        typer.echo(report.result_to_csv(result, q), nl=False)
    else:
        report.print_result(console, result, q)


@app.command()
def nodes(
    hub: Annotated[str | None, typer.Option(help="hub address host:port")] = None,
    identity: Annotated[Path | None, typer.Option(help="identity folder")] = None,
) -> None:
    """List every node's views and remaining privacy budget."""
    console = Console()
    with _connect(hub, identity) as fed:
        found, missing = fed.nodes()
    for d in found:
        b = d.budget
        console.print(
            f"[bold]{d.node}[/] ({d.protocol_version}): rho {b.rho_spent:.4g} spent of "
            f"{b.rho_total:.4g}, at most {b.max_rho_per_query:.4g} per query"
        )
        for v in d.catalog.views:
            cols = ", ".join(c.name for c in v.columns if c.type.value == "category")
            console.print(f"  {v.name}: {v.description} [dim](group by: {cols})[/]")
    for o in missing:
        console.print(f"[red]{o.node}: {o.status.value}[/] {o.message}")


@hub_app.command("serve")
def hub_serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="hub.toml")],
    ready_file: Annotated[
        Path | None, typer.Option(help="write {port, pid} once listening")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="override hub.toml's listen address")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="DEV ONLY: plaintext, no authentication")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Serve analysts' federated queries over gRPC with mutual TLS."""
    from coordinator.hub import serve_hub
    from protocols.rpc import INSECURE_WARNING

    setup_logging(log_level)
    if insecure:
        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.RED, bold=True)
    serve_hub(config, ready_file=ready_file, listen=listen, insecure=insecure)


@pki_app.command("init")
def pki_init(
    folder: Annotated[Path, typer.Argument(help="where to create the federation CA")],
) -> None:
    """Create a federation CA (ECDSA P-256); its key never leaves this folder."""
    path = security.create_ca(folder)
    typer.echo(f"created CA certificate {path} (private key {folder / security.CA_KEY_FILE}, 0600)")


@pki_app.command("issue")
def pki_issue(
    folder: Annotated[Path, typer.Argument(help="the CA folder")],
    role: Annotated[security.Role, typer.Option(help="node, hub, analyst or auditor")],
    name: Annotated[str, typer.Option(help="identity name (node names must match hub.toml)")],
    host: Annotated[
        list[str] | None, typer.Option(help="extra DNS name or IP for servers (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="identity folder to write")] = None,
    org: Annotated[str | None, typer.Option(help="organisation, for node access policies")] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
) -> None:
    """Issue a certificate and key for a node, the hub, an analyst or an auditor."""
    hosts = ("localhost", "127.0.0.1", *(host or []))
    path = security.issue(
        folder, role=role, name=name, out_dir=out, hosts=hosts, organisation=org, days=days
    )
    typer.echo(f"issued {role.value} identity {name} in {path} (key.pem is 0600)")


@pki_app.command("revoke")
def pki_revoke(
    folder: Annotated[Path, typer.Argument(help="the CA folder")],
    name: Annotated[str, typer.Argument(help="identity name whose certificates to revoke")],
    reason: Annotated[str, typer.Option(help="recorded with the revocation")] = "unspecified",
) -> None:
    """Revoke every certificate of NAME and rewrite crl.pem (nodes and the hub reload it)."""
    from protocols.revocation import CRL_FILE, revoke

    serials = revoke(folder, name, reason=reason)
    typer.echo(
        f"revoked {len(serials)} certificate(s) of {name}; distribute {folder / CRL_FILE} "
        "to every node and the hub (they re-read it when it changes)"
    )


def main() -> None:
    """Entry point: chc errors become one clear line on stderr and exit code 2."""
    try:
        app()
    except ChcError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
