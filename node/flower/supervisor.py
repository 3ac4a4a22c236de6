"""Keep a node's SuperNode running: restart it when it exits, with backoff and jitter.

A SuperNode exits when it cannot activate (the hub has not registered its key yet, or its
SuperLink is down or restarting) and when it crashes; the node's gRPC service is unaffected
either way. The supervisor checks every POLL_S seconds and restarts it after a delay that
doubles from BACKOFF_START_S to BACKOFF_MAX_S, with jitter so that a federation's nodes do
not all redial a restarted hub at the same instant; a run of RESET_AFTER_S without an exit
resets the delay. Each restart and its reason are logged (never anything of the data).
"""

from __future__ import annotations

import logging
import random
import threading
import time

from node.flower.supernode import SuperNodeProcess
from protocols.flower_process import FlowerStartError

log = logging.getLogger("chc.node.flower")

POLL_S = 1.0
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
RESET_AFTER_S = 120.0


class SuperNodeSupervisor:
    """Runs a SuperNodeProcess in the background until stop(), restarting it as needed."""

    def __init__(self, supernode: SuperNodeProcess) -> None:
        self.supernode = supernode
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supernode-supervisor", daemon=True)

    def start(self) -> None:
        """Start the SuperNode (an immediate failure is retried like a later exit)."""
        self._start_once()
        self._thread.start()

    def _start_once(self) -> bool:
        try:
            self.supernode.start()
        except FlowerStartError as exc:
            log.warning("SuperNode did not start (%s); retrying", str(exc).splitlines()[0])
            self.supernode.stop()
            return False
        return True

    def _run(self) -> None:
        delay = BACKOFF_START_S
        started = time.monotonic()
        while not self._stop.wait(POLL_S):
            why = self.supernode.exited()
            if why is None:
                if time.monotonic() - started > RESET_AFTER_S:
                    delay = BACKOFF_START_S
                continue
            self.supernode.stop()
            wait = delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            log.warning("SuperNode stopped (%s); restarting in %.1f s", why, wait)
            if self._stop.wait(wait):
                return
            delay = min(2 * delay, BACKOFF_MAX_S)
            if self._start_once():
                self.restarts += 1
                started = time.monotonic()

    def stop(self) -> None:
        """Stop supervising, then the SuperNode."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.supernode.stop()
