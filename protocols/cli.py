"""The command-line boundary shared by `chc` and `chc-node`: exit codes and one-line errors.

Every error that ends a command becomes one `error:` line on stderr and a documented exit
code (README.md, "Command line"); a traceback only with --debug, never with local variables.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import grpc
import typer
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from typer.core import TyperGroup

from protocols.security.pki import CA_FILE, CERT_FILE, KEY_FILE, Identity, load_identity
from queries.errors import ChcError, ConfigError, DataError, LedgerIntegrityError


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
        return ExitCode.REFUSED if grpc.StatusCode[exc.status_name] in _REFUSALS else ExitCode.USAGE
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


# Options every command that talks to the hub takes, said once so their help reads the same.
HubOpt = Annotated[str | None, typer.Option(help="hub address host:port")]
AnalystIdentityOpt = Annotated[Path | None, typer.Option(help="analyst identity folder")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def read_capped(path: Path, limit: int, *, flag: str, too_large: str) -> bytes:
    """A file named by a flag, read to at most limit bytes: one byte more and it is refused,
    so `/dev/zero` or a FIFO that never ends costs no more (ConfigError naming the flag).

    too_large ends the message of a file over the limit: what such a file should be.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise ConfigError(f"{flag} {path} is larger than {limit // 1024} KB: {too_large}")
    return raw


def read_identity(folder: Path, *, flag: str = "--identity") -> Identity:
    """load_identity, with a ConfigError naming the file if a PEM is malformed.

    load_identity parses only cert.pem; a bad key.pem or ca.pem would otherwise fail later,
    inside gRPC or signing, naming neither the file nor what to do.
    """
    files = {f: folder / f for f in (CERT_FILE, KEY_FILE, CA_FILE)}
    fix = f"re-issue it with `chc pki issue` ({flag} names {folder})"
    try:
        identity = load_identity(folder)
    except ChcError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read identity {folder} ({flag}): {error_message(exc)}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{files[CERT_FILE]} is not a valid certificate: {fix}") from None
    try:
        serialization.load_pem_private_key(identity.key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{files[KEY_FILE]} is not an unencrypted PEM private key: {fix}"
        ) from None
    try:
        x509.load_pem_x509_certificates(identity.ca_pem)
    except ValueError:
        raise ConfigError(f"{files[CA_FILE]} is not a PEM certificate: {fix}") from None
    return identity


# Output that is not a terminal (a pipe, a file, CI logs) has no width to fit: rich would
# assume 80 columns and wrap tables mid-cell, so such output gets room for the widest table
# here (COLUMNS, if set, still wins).
PIPE_WIDTH = 240


def console(*, stderr: bool = False) -> Console:
    """A rich Console as wide as the terminal it writes to, or PIPE_WIDTH when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return Console(stderr=stderr, width=int(columns), height=25)  # height: see below
    try:
        size = os.get_terminal_size(stream.fileno()) if stream.isatty() else None
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's buffer)
        size = None
    if size is not None and size.columns > 0:
        # The stream's own terminal (rich would take stdin's), with its height too: rich
        # ignores a width given alone under TERM=dumb and says 80.
        return Console(stderr=stderr, width=size.columns, height=size.lines or 25)
    return Console(stderr=stderr, width=PIPE_WIDTH)
