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
    from coordinator.hub.registry import load_hub_config
    from coordinator.hub.server import serve_hub
    from protocols.rpc import INSECURE_WARNING

    setup_logging(log_level)
    try:
        cfg = load_hub_config(config)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {config} is not UTF-8 text (byte {exc.start})") from None
    read_identity(cfg.identity, flag=f"`identity =` in {config}")  # names a malformed PEM
    if insecure:
        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.RED, bold=True)
    serve_hub(config, ready_file=ready_file, listen=listen, insecure=insecure)


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
    out: Annotated[Path | None, typer.Option(help="identity folder to write")] = None,
    org: Annotated[str | None, typer.Option(help="organisation, for node access policies")] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
) -> None:
    """Issue a certificate and key for a node, the hub, an analyst or an auditor."""
    hosts = ("localhost", "127.0.0.1", *(host or []))
    with _ca_folder(folder):
        path = issue(
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

    with _ca_folder(folder):
        serials = revoke(folder, name, reason=reason)
    typer.echo(
        f"revoked {len(serials)} certificate(s) of {name}; distribute {folder / CRL_FILE} "
        "to every node and the hub (they re-read it when it changes)"
    )


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
