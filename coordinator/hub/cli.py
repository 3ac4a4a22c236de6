"""`chc hub ...` and `chc pki ...`: the hub operator's commands.

Serving the hub and running the federation's certificate authority are both the operator's
job, not an analyst's, so their sub-apps live here and the top-level app (coordinator/cli.py)
only mounts them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from protocols.cli import ChcGroup, read_identity
from protocols.process import setup_logging
from protocols.security.pki import CA_FILE, CA_KEY_FILE, Role, create_ca, issue
from queries.errors import ChcError, ConfigError

hub_app = typer.Typer(
    help="Run the hub (coordinator).",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)
pki_app = typer.Typer(
    help="Federation PKI: CA and certificates.",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)
federation_app = typer.Typer(
    help="Lay out a whole federation: CA, identities, hub.toml and node.toml files.",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)


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
    log_format: Annotated[
        str | None, typer.Option(help='"text" or "json" (one JSON object per line) [log_format]')
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(help="serve Prometheus metrics on http://HOST:PORT/metrics [metrics_listen]"),
    ] = None,
    health_listen: Annotated[
        str | None,
        typer.Option(help="serve a plaintext gRPC health service on HOST:PORT [health_listen]"),
    ] = None,
    drain_grace: Annotated[
        float | None,
        typer.Option(help="seconds a SIGTERM lets calls in flight finish [drain_grace_s]"),
    ] = None,
) -> None:
    """Serve analysts' federated queries over gRPC with mutual TLS.

    SIGTERM drains: health turns NOT_SERVING, new calls are refused and queries in flight
    get drain_grace_s to finish; a second signal stops at once (docs/observability.md).
    """
    from coordinator.hub.registry import load_hub_config
    from coordinator.hub.server import hub_serving_settings, serve_hub
    from protocols.observability.logs import check_log_format
    from protocols.rpc import INSECURE_WARNING

    setup_logging(log_level, check_log_format(log_format or "text", "--log-format"))
    try:
        cfg = load_hub_config(config)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {config} is not UTF-8 text (byte {exc.start})") from None
    serving = hub_serving_settings(
        config,
        {
            "metrics_listen": metrics_listen,
            "health_listen": health_listen,
            "log_format": log_format,
            "drain_grace_s": drain_grace,
        },
    )
    setup_logging(log_level, serving.log_format)
    read_identity(cfg.identity, flag=f"`identity =` in {config}")  # names a malformed PEM
    if insecure:
        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.RED, bold=True)
    serve_hub(config, ready_file=ready_file, listen=listen, insecure=insecure, serving=serving)


@pki_app.command("init")
def pki_init(
    folder: Annotated[Path, typer.Argument(help="where to create the federation CA")],
) -> None:
    """Create a federation CA (ECDSA P-256); its key never leaves this folder."""
    path = create_ca(folder)
    typer.echo(f"created CA certificate {path} (private key {folder / CA_KEY_FILE}, 0600)")


@pki_app.command("issue")
def pki_issue(
    folder: Annotated[Path, typer.Argument(help="the CA folder")],
    role: Annotated[Role, typer.Option(help="node, hub, analyst or auditor")],
    name: Annotated[str, typer.Option(help="identity name (node names must match hub.toml)")],
    host: Annotated[
        list[str] | None, typer.Option(help="extra DNS name or IP for servers (repeatable)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="identity folder to write (default: FOLDER/ROLE/NAME/identity for a node or "
            "the hub, beside its node.toml or hub.toml; FOLDER/ROLE/NAME for an analyst or "
            "an auditor, what --identity takes)"
        ),
    ] = None,
    org: Annotated[str | None, typer.Option(help="organisation, for node access policies")] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
) -> None:
    """Issue a certificate and key for a node, the hub, an analyst or an auditor."""
    hosts = ("localhost", "127.0.0.1", *(host or []))
    target = out if out is not None else default_identity_dir(folder, role, name)
    with _ca_folder(folder):
        path = issue(
            folder, role=role, name=name, out_dir=target, hosts=hosts, organisation=org, days=days
        )
    typer.echo(f"issued {role.value} identity {name} in {path} (key.pem is 0600)")
    if out is None and role in SERVER_ROLES:
        config = "node.toml" if role is Role.NODE else "hub.toml"
        typer.echo(
            f'{config} in {path.parent} finds it as identity = "{path.name}" '
            + (
                f"(chc-node init {path.parent} --name {name} --omop OMOP writes one)"
                if role is Role.NODE
                else "(chc federation init writes one)"
            )
        )
    elif out is None:
        typer.echo(f"use it as --identity {path}")


@pki_app.command("revoke")
def pki_revoke(
    folder: Annotated[Path, typer.Argument(help="the CA folder")],
    name: Annotated[str, typer.Argument(help="identity name whose certificates to revoke")],
    reason: Annotated[str, typer.Option(help="recorded with the revocation")] = "unspecified",
) -> None:
    """Revoke every certificate of NAME and rewrite crl.pem (nodes and the hub reload it)."""
    from protocols.revocation import CRL_FILE, revoke

    with _ca_folder(folder):
        serials = revoke(folder, name, reason=reason)
    typer.echo(
        f"revoked {len(serials)} certificate(s) of {name}; distribute {folder / CRL_FILE} "
        "to every node and the hub (they re-read it when it changes)"
    )


# Servers keep their configuration beside their identity (node.toml's `identity = "identity"`,
# as `chc-node init` and `chc federation init` write it); people's identity folder is what
# `chc --identity` takes. Both live under the CA folder as ROLE/NAME, like the demo's.
SERVER_ROLES = frozenset({Role.NODE, Role.HUB})
IDENTITY_DIR = "identity"


def default_identity_dir(folder: Path, role: Role, name: str) -> Path:
    """Where `chc pki issue` writes an identity without --out."""
    party = folder / role.value / name
    return party / IDENTITY_DIR if role in SERVER_ROLES else party


@federation_app.command("init")
def federation_init(
    folder: Annotated[Path, typer.Argument(help="the new federation folder (the CA folder)")],
    node: Annotated[
        list[str],
        typer.Option(
            help="NAME[=OMOP_PATH][@HOST:PORT]: a node, its OMOP data on its machine and where "
            "the hub reaches it (default 127.0.0.1:50051, 50052, ...); repeat per node",
        ),
    ],
    hub: Annotated[
        str, typer.Option(help="HOST:PORT where analysts reach the hub")
    ] = "127.0.0.1:50050",
    hub_host: Annotated[
        list[str] | None, typer.Option(help="extra DNS name or IP on the hub's certificate")
    ] = None,
    analyst: Annotated[str, typer.Option(help="the first analyst's name")] = "analyst",
    analyst_org: Annotated[
        str | None, typer.Option(help="the analyst's organisation (for [access] policies)")
    ] = None,
    auditor: Annotated[str, typer.Option(help="the first auditor's name")] = "auditor",
    days: Annotated[int, typer.Option(help="certificate validity in days")] = 365,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="replace an existing federation folder (never one holding a ledger)"
        ),
    ] = False,
) -> None:
    """Create a CA, every identity, hub.toml and one node.toml per node, one folder each."""
    from coordinator.hub.federation_init import init_federation, next_steps, parse_node

    specs = [parse_node(text, i) for i, text in enumerate(node)]
    layout = init_federation(
        folder,
        specs,
        hub_address=hub,
        hub_hosts=hub_host or (),
        analyst=analyst,
        analyst_org=analyst_org,
        auditor=auditor,
        days=days,
        force=force,
    )
    typer.echo(next_steps(layout))


@contextmanager
def _ca_folder(folder: Path) -> Iterator[None]:
    """A malformed ca.pem or ca.key becomes a ConfigError naming the folder."""
    try:
        yield
    except ChcError:
        raise
    except (ValueError, TypeError):  # what cryptography raises for a malformed PEM
        raise ConfigError(
            f"{folder} does not hold a readable CA ({CA_FILE} and "
            f"{CA_KEY_FILE}): give the folder `chc pki init` created"
        ) from None
