"""Queries kept in flight through the hub while a fault is injected, each outcome recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from coordinator.analyst.client import Federation
from queries.results import FederatedResult
from queries.spec import Query
from tests.faults._invariants import Receipt, receipts


@dataclass(frozen=True)
class Sent:
    """One query's fate as the analyst saw it: a result or an error, and how long it took."""

    started: float  # time.monotonic() when it was sent
    elapsed_s: float
    result: FederatedResult | None = None
    error: Exception | None = None  # a ChcError, unless something unexpected happened


@dataclass
class Traffic:
    """Worker threads, each an analyst's client of its own, sending query until stopped."""

    hub: str
    identity: Path
    query: Query
    deadline_s: float
    threads: int = 4
    sent: list[Sent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _work(self) -> None:
        with Federation(self.hub, self.identity) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    result = client.query(self.query, deadline_s=self.deadline_s)
                    item = Sent(started, time.monotonic() - started, result=result)
                except Exception as exc:
                    # Kept, not raised: the test reports any error it did not expect.
                    item = Sent(started, time.monotonic() - started, error=exc)
                    time.sleep(0.05)  # a hub that is down refuses at once: do not spin
                with self._lock:
                    self.sent.append(item)

    def start(self) -> Traffic:
        """Start the workers."""
        self._workers = [threading.Thread(target=self._work) for _ in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def stop(self) -> None:
        """Let every query in flight finish, then stop."""
        self._stop.set()
        for t in self._workers:
            t.join(timeout=self.deadline_s + 30)

    def snapshot(self) -> list[Sent]:
        """Everything recorded so far."""
        with self._lock:
            return list(self.sent)

    def wait_for(self, what: str, ok: Callable[[list[Sent]], bool], timeout_s: float) -> None:
        """Wait until ok(everything so far) holds; fail naming what was awaited."""
        deadline = time.monotonic() + timeout_s
        while not ok(self.snapshot()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def receipts(self, analyst: str) -> list[Receipt]:
        """Every release received, across all results."""
        return [r for s in self.snapshot() if s.result for r in receipts(s.result, analyst)]

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
