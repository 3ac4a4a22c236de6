"""Serving the dashboard: uvicorn in this process, on a socket the command already bound."""

from __future__ import annotations

import signal
import socket
import sys
import webbrowser
from types import FrameType

import uvicorn
from fastapi import FastAPI

from coordinator.ui.auth import TOKEN_PARAM, Guard


class _Server(uvicorn.Server):
    """Uvicorn, printing the URL line once the app has started."""

    def __init__(self, config: uvicorn.Config, url: str, open_browser: bool) -> None:
        super().__init__(config)
        self.url = url
        self.open_browser = open_browser

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit:
            return
        sys.stdout.write(f"chc ui: {self.url}\n")
        sys.stdout.flush()
        if self.open_browser:
            webbrowser.open(self.url)


def _stay(sig: int, frame: FrameType | None) -> None:
    """Uvicorn re-raises the signal that stopped it once it has shut down; by then there is
    nothing left to do, so it ends the command normally (exit 0)."""
    del sig, frame


def serve(app: FastAPI, sock: socket.socket, guard: Guard, *, open_browser: bool) -> None:
    """Serve app on sock until SIGTERM or SIGINT; print the URL line once started."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=guard.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # No websockets: the pages are plain HTTP (and uvicorn's default one is deprecated).
        ws="none",
    )
    url = f"http://127.0.0.1:{guard.port}/?{TOKEN_PARAM}={guard.token}"
    server = _Server(config, url, open_browser=open_browser)
    signal.signal(signal.SIGTERM, _stay)
    signal.signal(signal.SIGINT, _stay)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
