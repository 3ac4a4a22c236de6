"""`chc-node`: the custodian's command line for running a regional node."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from node.budget.accounting import default_ledger_path, open_accountant
from node.config import (
    NodeConfig,
    check_node_certificate,
    check_superlink_address,
    load_config,
)
from node.data.store import OmopStore, node_pathways
from node.dial import Dialer
from node.dial import serve_until_signalled as dial_serve_until_signalled
from node.flower.forwarder import fleet_forwarder_for, forwarder_address
from node.flower.supernode import supernode_for
from node.flower.supervisor import SuperNodeSupervisor
from node.service import NodeService
from protocols.cli import ChcGroup, DebugOpt, read_identity
from protocols.observability.health import Health
from protocols.observability.listeners import parse_serving, start_listeners
from protocols.observability.logs import check_log_format
from protocols.observability.metrics import BudgetCollector, Metrics, use_for_process
from protocols.process import exit_now, serve_until_signalled, setup_logging, write_ready_file
from protocols.revocation import CRL_FILE, RevocationList
from protocols.rpc import INSECURE_WARNING, make_server
from protocols.security.pki import Role
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.errors import ChcError
from queries.numbers import show_apart

log = logging.getLogger("chc.node")

# ---- chc-node -----------------------------------------------------------------------------

app = typer.Typer(
    help="Run a chc regional node beside an OMOP CDM.",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)

# A flag rather than a node.toml key: a loosening is a one-off decision by the custodian, and a
# key left in node.toml would silently allow every later loosening too.
AllowLoosening = Annotated[
    str | None,
    typer.Option(
        "--allow-policy-loosening",
        metavar="REASON",
        help="start although node.toml's [budget] loosens the policy recorded in the ledger "
        "(a cap rises, or the period changes); REASON (who approved it, and why) is recorded "
        "in the signed policy entry for auditors",
    ),
]
# Serving options shared with `chc hub serve` (docs/observability.md); each overrides the
# node.toml key of the same name.
LogFormatOpt = Annotated[
    str | None, typer.Option(help='"text" or "json" (one JSON object per line) [log_format]')
]
MetricsListenOpt = Annotated[
    str | None,
    typer.Option(help="serve Prometheus metrics on http://HOST:PORT/metrics [metrics_listen]"),
]
HealthListenOpt = Annotated[
    str | None,
    typer.Option(help="serve a plaintext gRPC health service on HOST:PORT [health_listen]"),
]
DrainGraceOpt = Annotated[
    float | None,
    typer.Option(help="seconds a SIGTERM lets calls in flight finish [drain_grace_s]"),
]


@app.callback()
def _root(debug: DebugOpt = False) -> None:
    """Run a chc regional node beside an OMOP CDM."""
    del debug  # read by ChcGroup when a command fails


@app.command()
def check(
    config: Annotated[Path, typer.Option("--config", "-c", help="node.toml")],
    allow_policy_loosening: AllowLoosening = None,
) -> None:
    """Validate node.toml, the identity, the OMOP data and the ledger; build the views once.

    Writes nothing to the ledger: it says whether serving would record a new budget policy,
    and fails as serving would on a loosened one. "ready" is printed last, once every check
    has passed, so a failing check never follows a claim that the node is ready.
    """
    cfg = load_config(config)
    identity = read_identity(cfg.identity, flag=f"`identity =` in {config}")
    check_node_certificate(cfg, identity, str(config))
    store = OmopStore.from_config(cfg)  # refuses bad data with the validation report
    try:
        typer.echo(store.report.render())
        for view in store.catalog().views:
            typer.echo(f"view {view.name}: ok")
        seconds = store.build_seconds
    finally:
        store.close()
    typer.echo(_check_ledger(cfg, config, allow_policy_loosening))
    typer.echo(
        f"node {cfg.name} ({identity.role.value} certificate {identity.name}) is ready: "
        f"views built in {seconds:.2f} s"
    )


def _check_ledger(cfg: NodeConfig, config: Path, override: str | None) -> str:
    """What `check` says of the ledger, having opened and verified it (records nothing)."""
    ledger = default_ledger_path(cfg, config)
    if not ledger.exists():
        return f"ledger {ledger}: will be created, with its signing key, at first start"
    # Verifies the chain's tail and the policy change; refuses a file that is no ledger.
    accountant = open_accountant(cfg, config_file=config, override=override, record_policy=False)
    try:
        spent, policy = accountant.status(), accountant.policy
        life, change = accountant.lifetime_spent(), accountant.policy_change
    finally:
        accountant.close()
    period, period_cap = show_apart(spent.rho_spent, policy.total_rho)
    lifetime, lifetime_cap = show_apart(life, policy.lifetime_cap)
    text = (
        f"ledger {ledger}: ok, rho {period} of {period_cap} spent this period, {lifetime} of "
        f"{lifetime_cap} over the node's life"
    )
    if change is not None:
        text += f"\nbudget policy: `serve` will record a policy entry that {change.describe()}"
    return text


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="node.toml")],
    ready_file: Annotated[
        Path | None, typer.Option(help="write {port, pid} here once listening")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="override node.toml's listen address")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="DEV ONLY: plaintext, no authentication")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    memory_ledger: Annotated[
        bool,
        typer.Option("--memory-ledger", help="DEV/BENCH ONLY: a ledger that a restart forgets"),
    ] = False,
    allow_policy_loosening: AllowLoosening = None,
    log_format: LogFormatOpt = None,
    metrics_listen: MetricsListenOpt = None,
    health_listen: HealthListenOpt = None,
    drain_grace: DrainGraceOpt = None,
    dial: Annotated[
        str | None,
        typer.Option(
            "--dial",
            metavar="HUB_ADDRESS",
            help="outbound-only: dial the hub at host:port and serve its calls over that link, "
            "with no listening port unless --listen or [hub] inbound = true (overrides "
            "node.toml's [hub] dial; docs/outbound.md)",
        ),
    ] = None,
    hub_name: Annotated[
        str | None,
        typer.Option(help="with --dial: the name the hub's certificate must carry [hub_name]"),
    ] = None,
    learning: Annotated[
        str | None,
        typer.Option(
            "--learning",
            metavar="SUPERLINK_ADDRESS",
            help="also run a Flower SuperNode dialling the hub's SuperLink at host:port "
            "(overrides node.toml's [learning] superlink and hub_fleet)",
        ),
    ] = None,
) -> None:
    """Serve the node's catalog and DP queries over gRPC with mutual TLS.

    With a SuperLink address (--learning or [learning] superlink), a Flower SuperNode runs
    beside the gRPC server as a child process, and stops with it; with [learning] hub_fleet
    it dials the hub's Fleet proxy through a local nginx forwarder that adds the node's
    certificate.

    SIGTERM drains: health turns NOT_SERVING, new calls are refused, calls in flight get
    drain_grace_s to finish (a query is charged completely or not at all), then the store
    and ledger close; a second signal stops at once (docs/observability.md).
    """
    setup_logging(log_level, check_log_format(log_format or "text", "--log-format"))
    cfg = load_config(config)
    serving = parse_serving(
        {
            "metrics_listen": metrics_listen or cfg.serving.metrics_listen,
            "health_listen": health_listen or cfg.serving.health_listen,
            "log_format": log_format or cfg.serving.log_format,
            "drain_grace_s": cfg.serving.drain_grace_s if drain_grace is None else drain_grace,
        },
        "chc-node serve",
    )
    setup_logging(log_level, serving.log_format, node=cfg.name)
    identity = read_identity(cfg.identity, flag=f"`identity =` in {config}")
    if identity.role is not Role.NODE:
        raise ChcError(f"{cfg.identity} holds a {identity.role.value} certificate, not a node one")
    check_node_certificate(cfg, identity, str(config))
    hub_address = dial or cfg.hub.dial
    if hub_address is not None:
        hub_address = check_superlink_address(hub_address, "--dial", key="the hub address")
        if insecure:
            raise ChcError(
                "--insecure: an outbound-only node links to its hub over mutual TLS only"
            )
    # An outbound-only node opens no port unless asked to listen as well.
    listening = hub_address is None or cfg.hub.inbound or listen is not None
    trains = (learning or cfg.learning.superlink or cfg.learning.hub_fleet) is not None
    if not listening and trains:
        raise ChcError(
            "a node that trains over Flower needs its gRPC port (its SuperNode's ClientApp "
            "calls it): set [hub] inbound = true, or give --listen 127.0.0.1:PORT"
        )
    if insecure:
        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.RED, bold=True)
    node_pathways(cfg)  # a bad pathway list fails before the ledger is opened
    accountant = open_accountant(
        cfg, config_file=config, memory=memory_ledger, override=allow_policy_loosening
    )
    store = OmopStore.from_config(cfg)
    revocations = RevocationList(cfg.crl or cfg.identity / CRL_FILE, identity.ca_pem)
    service = NodeService(
        name=cfg.name,
        store=store,
        catalog=store.catalog(),  # carries the reference date the views were built with
        accountant=accountant,
        ca_pem=identity.ca_pem,
        require_tls=not insecure,
        rules=cfg.release,
        access=cfg.access,
        revocations=revocations,
        models=cfg.models,
        identity=identity,
    )
    metrics = Metrics("node")
    # Read at every scrape; per analyst only for those node.toml names (a bounded set).
    metrics.registry.register(
        BudgetCollector(
            node=cfg.name,
            status=accountant.status,
            lifetime_spent=accountant.lifetime_spent,
            analysts=tuple(name for name, _ in accountant.policy.analysts),
        )
    )
    use_for_process(metrics)
    health = Health([node_pb2.DESCRIPTOR.services_by_name["Node"].full_name])
    server, port = None, 0
    if listening:
        server, port = make_server(
            listen or cfg.listen, None if insecure else identity, metrics=metrics, health=health
        )
        node_pb2_grpc.add_NodeServicer_to_server(service, server)
    side = start_listeners(serving, registry=metrics.registry, health=health)
    dialer = None
    if hub_address is not None:
        dialer = Dialer(
            service,
            identity,
            address=hub_address,
            hub_name=hub_name or cfg.hub.hub_name,
            metrics=metrics,
            is_revoked=revocations.is_revoked,
        )
    if server is not None:
        server.start()
    if dialer is not None:
        dialer.start()
    health.serving()
    log.info(
        "node %s serving %s %s (views built in %.2f s; reference date %s, %s)",
        cfg.name,
        cfg.omop,
        " and ".join(
            ([f"on port {port}"] if server is not None else [])
            + ([f"over its link to the hub at {hub_address}"] if dialer is not None else [])
        ),
        store.build_seconds,
        store.reference_date.isoformat(),
        store.report.reference_origin,
    )
    supervisor = forwarder = None
    superlink = learning or cfg.learning.superlink
    try:
        if superlink is None and cfg.learning.hub_fleet is not None:
            forwarder = fleet_forwarder_for(cfg, config)
            forwarder.start()
            superlink = forwarder_address(forwarder)
            log.info(
                "node %s: Fleet forwarder to %s on %s", cfg.name, cfg.learning.hub_fleet, superlink
            )
        if superlink is not None:
            host = (listen or cfg.listen).rsplit(":", 1)[0]
            # A wildcard bind is reached on loopback by the ClientApp on this machine.
            host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "") else host  # noqa: S104
            supernode = supernode_for(
                cfg,
                config,
                superlink=check_superlink_address(superlink, "--learning"),
                grpc_address=f"{host}:{port}",
            )
            # Supervised: restarted with backoff if it exits (its key not yet registered,
            # the hub's SuperLink restarting), while the node's own service goes on.
            supervisor = SuperNodeSupervisor(supernode)
            supervisor.start()
            log.info(
                "node %s: Flower SuperNode dialling %s; the hub registers its key %s",
                cfg.name,
                superlink,
                supernode.private_key.with_suffix(".pub"),
            )
        if ready_file is not None:
            write_ready_file(
                ready_file,
                port=port,
                name=cfg.name,
                metrics_port=side.metrics_port,
                health_port=side.health_port,
            )
        if dialer is not None:
            drained = dial_serve_until_signalled(
                dialer, server, grace=serving.drain_grace_s, health=health, metrics=metrics
            )
        elif server is not None:
            drained = serve_until_signalled(
                server, grace=serving.drain_grace_s, health=health, metrics=metrics
            )
        else:  # a node that does not dial always listens (see `listening`)
            raise ChcError("the node neither listens nor dials the hub")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if forwarder is not None:
            forwarder.stop()
        if dialer is not None:
            dialer.close()
        if server is not None:
            server.stop(0)  # at once only if serving failed: a drain has already stopped it
        side.stop()
    if not drained.clean:
        # A handler still runs: closing the ledger under it could fail its charge midway;
        # SQLite rolls back an unfinished transaction, so the ledger is never torn.
        log.warning("node %s stopped with %d call(s) cut short", cfg.name, drained.busy)
        exit_now(1)
    store.close()
    accountant.close()
    log.info("node %s stopped", cfg.name)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="folder for node.toml (created if needed)")],
    name: Annotated[str, typer.Option(help="the node's name (its certificate's name)")],
    omop: Annotated[
        Path, typer.Option(help="OMOP CDM: a DuckDB file, or a folder of Parquet/CSV files")
    ],
    imd_lookup: Annotated[
        Path | None, typer.Option(help="CSV/Parquet LSOA code -> IMD quintile or decile")
    ] = None,
    opt_outs: Annotated[
        list[Path] | None,
        typer.Option("--opt-outs", help="opt-out / consent register (repeat for several)"),
    ] = None,
    reference_date: Annotated[
        str | None,
        typer.Option(
            help="ages and outcome windows end on this date (default: the end of the data, "
            "rounded up to a month end)"
        ),
    ] = None,
    pathways: Annotated[
        str | None, typer.Option(help="comma-separated pathways to serve (default: all)")
    ] = None,
    omop_schema: Annotated[
        str | None, typer.Option(help="DuckDB file only: the schema of the OMOP tables")
    ] = None,
    listen: Annotated[str, typer.Option(help="address to serve on")] = "0.0.0.0:50051",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing node.toml")] = False,
    copy: Annotated[
        bool,
        typer.Option("--copy", help="copy the columns the node reads to DIRECTORY/omop (Parquet)"),
    ] = False,
) -> None:
    """Write DIRECTORY/node.toml for an OMOP CDM and check the data (a validation report)."""
    from datetime import date

    from node.bootstrap import init_node

    try:
        ref = date.fromisoformat(reference_date) if reference_date is not None else None
    except ValueError:
        raise ChcError(
            f"--reference-date {reference_date!r} is not a date like 2025-12-31"
        ) from None
    path, report = init_node(
        directory,
        name=name,
        omop=omop,
        imd_lookup=imd_lookup,
        registers=tuple(opt_outs or ()),
        reference_date=ref,
        pathways=[p.strip() for p in pathways.split(",") if p.strip()] if pathways else None,
        listen=listen,
        omop_schema=omop_schema,
        force=force,
        copy=copy,
    )
    typer.echo(report.render())
    if report.ok or not copy:  # a refused --copy writes nothing
        typer.echo(f"wrote {path}")
    if not report.ok:
        typer.secho(
            "the node will refuse this data: fix the errors above, then run "
            f"`chc-node check --config {path}`",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(1)
    typer.echo(
        f"next: put the node's certificate in {path.parent / 'identity'} "
        f"(chc pki issue --role node --name {name}), then `chc-node serve --config {path}`"
    )


def main() -> None:
    """Entry point: every error ends in one line on stderr and an ExitCode (see ChcGroup)."""
    app()
