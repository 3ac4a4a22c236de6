"""Running a gRPC server as a process: ready files, logging and clean shutdown on signals."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import grpc


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with a timestamp; secrets are never passed to the logger."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def write_ready_file(path: Path, *, port: int, name: str) -> None:
    """Announce the bound port atomically, so a supervisor never reads half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"name": name, "port": port, "pid": os.getpid()}))
    tmp.replace(path)


def read_ready_file(path: Path) -> dict[str, object] | None:
    """The announcement written by write_ready_file, or None if not there yet."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def serve_until_signalled(server: grpc.Server, *, grace: float = 2.0) -> None:
    """Block until SIGINT or SIGTERM, then stop the server, letting calls finish."""
    stop = threading.Event()

    def _handler(signum: int, frame: object) -> None:
        del signum, frame
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    stop.wait()
    server.stop(grace).wait()
