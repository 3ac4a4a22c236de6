"""Running a gRPC server as a process: ready files, logging and a graceful drain on signals."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from protocols.observability.health import Health
from protocols.observability.listeners import DEFAULT_DRAIN_GRACE_S
from protocols.observability.logs import LogFormat
from protocols.observability.logs import setup_logging as _setup_logging
from protocols.observability.metrics import Metrics

log = logging.getLogger("chc.process")

# After the grace period gRPC cancels the calls still running, but a handler's thread runs
# on until its code returns (a DuckDB scan cannot be interrupted): the drain waits this much
# longer for them before it gives up and leaves the ledger to SQLite's atomic transactions.
HANDLER_WAIT_S = 5.0
# After a drain that had calls in flight, how long the process keeps its connections open
# before it exits: gRPC's shutdown completes once the last reply is written, and a socket
# closed with the client's frames still unread is reset, which makes the client's kernel drop
# a reply it has not read yet (a charged call then looks unanswered). Seen under CPU load.
REPLY_LINGER_S = 1.0


def setup_logging(level: str = "INFO", fmt: LogFormat = "text", **fields: object) -> None:
    """Log to stderr, as text lines or JSON lines (protocols/observability/logs.py).

    Secrets and exact values are never passed to the logger; fields (e.g. node="nwc") go on
    every record.
    """
    _setup_logging(level, fmt, **fields)


def write_ready_file(path: Path, *, port: int, name: str, **ports: int | None) -> None:
    """Announce the bound port(s) atomically, so a supervisor never reads half a file.

    ports: further bound ports by name (metrics_port, health_port), left out when None.
    """
    data: dict[str, object] = {"name": name, "port": port, "pid": os.getpid()}
    data.update({key: value for key, value in ports.items() if value is not None})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def read_ready_file(path: Path) -> dict[str, object] | None:
    """The announcement written by write_ready_file, or None if not there yet."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Drained:
    """How a server's drain ended."""

    # Every call that was in flight finished (none was cut short by the grace period).
    finished: bool
    # A second SIGINT/SIGTERM stopped the server at once.
    forced: bool
    # Handlers whose code was still running when the drain returned (0 when finished).
    busy: int
    seconds: float

    @property
    def clean(self) -> bool:
        """Nothing is running any more: the store and ledger may be closed."""
        return self.busy == 0 and not self.forced


def serve_until_signalled(
    server: grpc.Server,
    *,
    grace: float = DEFAULT_DRAIN_GRACE_S,
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> Drained:
    """Block until SIGINT or SIGTERM, then drain the server and say how that went.

    The drain: health turns NOT_SERVING, the listener closes (a new call fails UNAVAILABLE),
    calls in flight get up to grace seconds to finish, after which gRPC cancels them; with
    metrics, it then waits for their handlers to return (a node's query is charged in one
    SQLite transaction, so it is charged completely or not at all). A second signal stops
    the server at once.
    """
    # The handler only counts: it runs in the main thread between two bytecodes, maybe while
    # that thread holds a lock (an Event's, a log handler's), so it must take none itself.
    signals: list[int] = []

    def _handler(signum: int, frame: object) -> None:
        del frame
        signals.append(signum)

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    while not signals:
        time.sleep(0.1)
    log.info("received %s", signal.Signals(signals[0]).name)
    began = time.monotonic()
    if health is not None:
        health.drain()
    in_flight = metrics.in_flight_total() if metrics is not None else -1
    log.info(
        "draining: health NOT_SERVING, no new calls; %s in flight get up to %g s "
        "(a second signal stops at once)",
        f"{in_flight} call(s)" if in_flight >= 0 else "calls",
        grace,
    )
    stopped = server.stop(grace)
    deadline = began + grace + HANDLER_WAIT_S
    forced = False
    while not stopped.wait(timeout=0.05):
        if len(signals) > 1:
            forced = True
            server.stop(0)
            break
    finished = not forced and time.monotonic() - began < grace
    while metrics is not None and not forced and metrics.in_flight_total():
        if len(signals) > 1:
            forced = True
            break
        if time.monotonic() > deadline:
            break
        metrics.wait_idle(timeout=0.05)
    busy = metrics.in_flight_total() if metrics is not None else 0
    outcome = Drained(
        finished=finished and busy == 0,
        forced=forced,
        busy=busy,
        seconds=time.monotonic() - began,
    )
    if outcome.clean:
        if in_flight != 0:  # replies were sent during the drain: let the clients read them
            time.sleep(REPLY_LINGER_S)
        log.info("drained in %.2f s", outcome.seconds)
    else:
        log.warning(
            "stopped %s after %.2f s with %d call(s) still running; they end with the process "
            "(the ledger's SQLite transactions are atomic: no charge is half-written)",
            "at once (second signal)" if forced else "at the end of the grace period",
            outcome.seconds,
            busy,
        )
    return outcome


def exit_now(code: int) -> None:
    """End the process without waiting for handler threads still running (after a drain)."""
    logging.shutdown()
    os._exit(code)
