"""`chc-node`: the custodian's command line for running a regional node."""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import sqlite3
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import grpc
import typer
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from typer.core import TyperGroup

from node.accounting import default_ledger_path, open_accountant
from node.catalog import build_catalog
from node.ledger import LedgerIntegrityError
from node.policy import check_node_certificate, load_config
from node.service import NodeService
from node.store import OmopStore, node_pathways
from protocols import security
from protocols.errors import ChcError, ConfigError, DataError
from protocols.process import serve_until_signalled, setup_logging, write_ready_file
from protocols.revocation import CRL_FILE, RevocationList
from protocols.rpc import INSECURE_WARNING, make_server
from protocols.security import Identity, Role
from protocols.v1 import node_pb2_grpc

log = logging.getLogger("chc.node")

# ---- the command-line boundary, shared with `chc` (coordinator/cli.py) --------------------


class ExitCode(enum.IntEnum):
    """What `chc` and `chc-node` exit with; README.md ("Command line") documents the table."""

    OK = 0
    CHECK_FAILED = 1  # `chc audit verify` found anomalies; data or a ledger does not pass
    USAGE = 2  # a bad flag, or a missing, unreadable or invalid file (click's code, too)
    REFUSED = 3  # the query or request was refused: locally, by the hub or by every node
    NO_ANSWER = 4  # the hub or every node did not answer, or the result is empty
    INTERNAL = 70  # a bug (sysexits' EX_SOFTWARE)


class CommandFailedError(ChcError):
    """A command ran but its outcome is a failure (e.g. no node answered): exit with code."""

    def __init__(self, code: ExitCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# Status codes that mean "no" (as opposed to "not now" or "misconfigured").
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Longest message of an unexpected error that is echoed (it may quote data).
_MAX_UNEXPECTED = 160


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code for an error that ends a command."""
    if isinstance(exc, CommandFailedError):
        return exc.code
    if isinstance(exc, ConnectionError | TimeoutError):  # HubUnavailableError among them
        return ExitCode.NO_ANSWER
    if isinstance(exc, DataError | LedgerIntegrityError):
        return ExitCode.CHECK_FAILED
    if isinstance(exc, ChcError):
        return ExitCode.REFUSED if exc.status in _REFUSALS else ExitCode.USAGE
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        if code in _REFUSALS:
            return ExitCode.REFUSED
        return ExitCode.USAGE if code is grpc.StatusCode.FAILED_PRECONDITION else ExitCode.NO_ANSWER
    if isinstance(exc, OSError | UnicodeError | sqlite3.DatabaseError):
        return ExitCode.USAGE
    return ExitCode.INTERNAL


def error_reference(exc: BaseException) -> str:
    """A short id of where an unexpected error was raised: the same bug gives the same id."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return hashlib.sha256(f"{type(exc).__name__} {where}".encode()).hexdigest()[:8]


def error_message(exc: BaseException) -> str:
    """What to tell the user about an error, without a traceback; the first line is the reason."""
    if isinstance(exc, ChcError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
    if isinstance(exc, OSError):
        names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{names}: {reason}" if names else reason
    if isinstance(exc, sqlite3.DatabaseError):
        return f"a ledger or database file cannot be used: {exc}"
    if isinstance(exc, grpc.RpcError):
        call = exc if isinstance(exc, grpc.Call) else None
        code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
        return f"{code.name}: {(call.details() if call is not None else None) or 'no details'}"
    text = " ".join(str(exc).split())
    if len(text) > _MAX_UNEXPECTED:
        text = text[: _MAX_UNEXPECTED - 1] + "…"
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (
        f"internal error ({what}; ref {error_reference(exc)}): this is a bug in chc; rerun "
        "with --debug for the traceback, and report it with the reference"
    )


def report_error(exc: BaseException, *, debug: bool) -> ExitCode:
    """Print an error as one `error:` line on stderr (and its traceback with debug)."""
    first, _, rest = error_message(exc).partition("\n")
    if debug:
        # The plain traceback: no local variables, which can hold keys and certificates.
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    click.secho(f"error: {first}", err=True, fg="red")
    if rest and isinstance(exc, ChcError):
        click.echo(rest, err=True)  # a validation report's findings, one per line
    return exit_code_of(exc)


class ChcGroup(TyperGroup):
    """A command group whose errors end in one line on stderr and a documented exit code.

    In the group rather than in main() so that the command as tests invoke it (CliRunner)
    behaves exactly as the installed one.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn any error that is not click's own into an exit code."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            debug = bool(ctx.find_root().params.get("debug")) or _env_debug()
            raise click.exceptions.Exit(report_error(exc, debug=debug)) from None


def _env_debug() -> bool:
    return os.environ.get("CHC_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


DebugOpt = Annotated[
    bool,
    typer.Option(
        "--debug",
        envvar="CHC_DEBUG",
        help="print the traceback of an error (without local variables); also CHC_DEBUG=1",
    ),
]


def read_identity(folder: Path, *, flag: str = "--identity") -> Identity:
    """security.load_identity, with a ConfigError naming the file if a PEM is malformed.

    load_identity parses only cert.pem; a bad key.pem or ca.pem would otherwise fail later,
    inside gRPC or signing, naming neither the file nor what to do.
    """
    files = {f: folder / f for f in (security.CERT_FILE, security.KEY_FILE, security.CA_FILE)}
    fix = f"re-issue it with `chc pki issue` ({flag} names {folder})"
    try:
        identity = security.load_identity(folder)
    except ChcError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read identity {folder} ({flag}): {error_message(exc)}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{files[security.CERT_FILE]} is not a valid certificate: {fix}"
        ) from None
    try:
        serialization.load_pem_private_key(identity.key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{files[security.KEY_FILE]} is not an unencrypted PEM private key: {fix}"
        ) from None
    try:
        x509.load_pem_x509_certificates(identity.ca_pem)
    except ValueError:
        raise ConfigError(f"{files[security.CA_FILE]} is not a PEM certificate: {fix}") from None
    return identity


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


@app.callback()
def _root(debug: DebugOpt = False) -> None:
    """Run a chc regional node beside an OMOP CDM."""
    del debug  # read by ChcGroup when a command fails


@app.command()
def check(
    config: Annotated[Path, typer.Option("--config", "-c", help="node.toml")],
    allow_policy_loosening: AllowLoosening = None,
) -> None:
    """Validate node.toml, the identity and the OMOP data, and build the views once.

    Writes nothing to the ledger: it says whether serving would record a new budget policy,
    and fails as serving would on a loosened one.
    """
    cfg = load_config(config)
    identity = read_identity(cfg.identity, flag=f"`identity =` in {config}")
    check_node_certificate(cfg, identity, str(config))
    store = OmopStore.from_config(cfg)  # refuses bad data with the validation report
    typer.echo(store.report.render())
    for view in build_catalog(store.pathways, reference_date=cfg.reference_date).views:
        typer.echo(f"view {view.name}: ok")
    typer.echo(
        f"node {cfg.name} ({identity.role.value} certificate {identity.name}) is ready: "
        f"views built in {store.build_seconds:.2f} s"
    )
    store.close()
    ledger = default_ledger_path(cfg, config)
    if not ledger.exists():
        typer.echo(f"ledger {ledger}: will be created, with its signing key, at first start")
        return
    # Verifies the chain's tail and the policy change, records nothing.
    accountant = open_accountant(
        cfg, config_file=config, override=allow_policy_loosening, record_policy=False
    )
    try:
        spent, policy = accountant.status(), accountant.policy
        life, change = accountant.lifetime_spent(), accountant.policy_change
    finally:
        accountant.close()
    typer.echo(
        f"ledger {ledger}: ok, rho {spent.rho_spent:.6g} of {policy.total_rho:g} spent this "
        f"period, {life:.6g} of {policy.lifetime_cap:g} over the node's life"
    )
    if change is not None:
        typer.echo(f"budget policy: `serve` will record a policy entry that {change.describe()}")


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
) -> None:
    """Serve the node's catalog and DP queries over gRPC with mutual TLS."""
    setup_logging(log_level)
    cfg = load_config(config)
    identity = read_identity(cfg.identity, flag=f"`identity =` in {config}")
    if identity.role is not Role.NODE:
        raise ChcError(f"{cfg.identity} holds a {identity.role.value} certificate, not a node one")
    check_node_certificate(cfg, identity, str(config))
    if insecure:
        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.RED, bold=True)
    node_pathways(cfg)  # a bad pathway list fails before the ledger is opened
    accountant = open_accountant(
        cfg, config_file=config, memory=memory_ledger, override=allow_policy_loosening
    )
    store = OmopStore.from_config(cfg)
    service = NodeService(
        name=cfg.name,
        store=store,
        catalog=build_catalog(store.pathways, reference_date=cfg.reference_date),
        accountant=accountant,
        ca_pem=identity.ca_pem,
        require_tls=not insecure,
        rules=cfg.release,
        access=cfg.access,
        revocations=RevocationList(cfg.crl or cfg.identity / CRL_FILE, identity.ca_pem),
    )
    server, port = make_server(listen or cfg.listen, None if insecure else identity)
    node_pb2_grpc.add_NodeServicer_to_server(service, server)
    server.start()
    log.info(
        "node %s serving %s on port %d (views built in %.2f s)",
        cfg.name,
        cfg.omop,
        port,
        store.build_seconds,
    )
    if ready_file is not None:
        write_ready_file(ready_file, port=port, name=cfg.name)
    serve_until_signalled(server)
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
        str, typer.Option(help="ages and outcome windows end on this date")
    ] = "2025-12-31",
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
        ref = date.fromisoformat(reference_date)
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
