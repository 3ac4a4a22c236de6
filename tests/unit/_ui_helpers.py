"""The dashboard served for real (uvicorn on a loopback port, in a thread) for tests in-process.

Starlette's TestClient would do without a socket, but with the httpx in the tree it warns
(it wants the httpx2 fork), and the tests treat warnings as errors; a real server on
127.0.0.1 is also closer to what `chc ui` runs. The app's Federation points at `hub`: a
closed port for the tests that need no hub (the door, history, exports).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from coordinator.ui.app import UiConfig, create_app
from coordinator.ui.auth import Guard
from coordinator.ui.history import History
from protocols.security.pki import Identity
from tests.unit._accounting_helpers import make_pki

TOKEN = "t0k3n-" + "x" * 40
CLOSED_HUB = "127.0.0.1:1"


def ui_config(
    root: Path,
    *,
    hub: str = CLOSED_HUB,
    identity: Identity | None = None,
    auditor: Identity | None = None,
    history: History | None = None,
) -> UiConfig:
    """An app's config: an analyst (a throwaway one by default), a history under root."""
    if identity is None:
        identity = make_pki(root / "pki").alice
    return UiConfig(
        hub=hub,
        identity=identity,
        history=history or History(root / "history.sqlite"),
        guard=Guard(token=TOKEN),
        auditor=auditor,
    )


@contextmanager
def serving(config: UiConfig) -> Iterator[str]:
    """The app served on a free loopback port until the block ends; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config.guard.port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), log_level="warning", access_log=False, lifespan="on", ws="none"
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.guard.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextmanager
def browser(base: str, *, signed_in: bool = True) -> Iterator[httpx.Client]:
    """An HTTP client at the dashboard; signed_in: it followed the token URL (has the cookie)."""
    with httpx.Client(base_url=base, follow_redirects=False, timeout=60.0) as c:
        if signed_in:
            response = c.get(f"/history?token={TOKEN}")
            assert response.status_code == 303, response.text
        yield c
