"""`chc ui`: start the dashboard on 127.0.0.1 and print its one-time URL.

Uvicorn runs in this process on a socket bound here first, so a busy port is a one-line
error, and `--port 0` asks for any free port: the URL line names the port actually bound. It
is printed once the app has started, and is the only line on stdout (tests and scripts read
it). SIGTERM and SIGINT stop the server gracefully, and the command exits 0.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from coordinator.analyst import connect
from coordinator.local.demo import DEMO_STATE
from coordinator.local.federation import AUDITOR_NAME
from protocols.cli import AnalystIdentityOpt, HubOpt, read_identity
from protocols.security.pki import Identity, Role
from queries.errors import ConfigError

DEFAULT_PORT = 8765
# Where the history store is kept unless --history says otherwise.
DEFAULT_HISTORY = Path.home() / ".chc" / "ui" / "history.sqlite"
LOOPBACK = ("127.0.0.1", "localhost")


def _identity(folder: Path, role: Role, flag: str) -> Identity:
    loaded = read_identity(folder, flag=flag)
    if loaded.role is not role:
        raise ConfigError(
            f"{flag} {folder} holds a {loaded.role.value} certificate; give a {role.value} one"
        )
    return loaded


def resolve(
    hub: str | None, identity: Path | None, auditor: Path | None
) -> tuple[str, Identity, Identity | None]:
    """The hub, analyst identity and (optional) auditor identity, found as the CLI finds them
    (coordinator/analyst/connect.py): the options, else CHC_HUB and CHC_IDENTITY, else those
    of a running `chc demo --keep-running`, whose auditor is then the default too."""
    target = connect.resolve(hub, identity, spelling=connect.CLI)
    if auditor is None and target.identity_from == str(DEMO_STATE):
        # The demo's auditor sits beside its analyst (coordinator/local/federation.py).
        candidate = target.identity.parent.parent / Role.AUDITOR.value / AUDITOR_NAME
        auditor = candidate if candidate.is_dir() else None
    return (
        target.hub,
        _identity(target.identity, Role.ANALYST, "--identity"),
        _identity(auditor, Role.AUDITOR, "--auditor-identity") if auditor is not None else None,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on the loopback host (port 0: any free port)."""
    if host not in LOOPBACK:
        raise ConfigError(
            f"--host {host}: the dashboard acts with your keys and listens on loopback only; "
            "give --host 127.0.0.1 (reach it from elsewhere through an SSH tunnel)"
        )
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range: give 0 (any free port) to 65535")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"--port {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
            "give another port, or --port 0 for any free one"
        ) from None
    sock.listen(128)
    return sock


def ui(
    hub: HubOpt = None,
    identity: AnalystIdentityOpt = None,
    auditor_identity: Annotated[
        Path | None,
        typer.Option("--auditor-identity", help="auditor identity folder, for the Audit page"),
    ] = None,
    port: Annotated[
        int, typer.Option(help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free port)")
    ] = DEFAULT_PORT,
    host: Annotated[str, typer.Option(help="127.0.0.1 only: the dashboard holds your keys")] = (
        "127.0.0.1"
    ),
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="do not open a browser; just print the URL")
    ] = False,
    history: Annotated[
        Path, typer.Option(help="the local store of your past queries (SQLite)")
    ] = DEFAULT_HISTORY,
) -> None:
    """The local web dashboard: federation, query with charts, history and audit pages.

    Prints one line, `chc ui: http://127.0.0.1:PORT/?token=TOKEN`: open it in a browser on
    this machine. Queries are signed here with your own identity; Ctrl-C stops it.
    """
    # The web stack is imported here, not by every `chc` command.
    from coordinator.ui.app import UiConfig, create_app
    from coordinator.ui.auth import Guard, new_token
    from coordinator.ui.history import History
    from coordinator.ui.server import serve

    hub_address, analyst, auditor = resolve(hub, identity, auditor_identity)
    store = History(history)
    sock = bind(host, port)
    guard = Guard(token=new_token(), port=int(sock.getsockname()[1]))
    app = create_app(
        UiConfig(hub=hub_address, identity=analyst, history=store, guard=guard, auditor=auditor)
    )
    serve(app, sock, guard, open_browser=not no_browser)
