"""The node's privacy accounting interface: check, charge, refuse, and read back.

Flower's state pattern: one abstract class, implementations (in memory for tests and dev;
the signed, hash-chained SQLite ledger in node/ledger.py for real nodes), and one contract
test suite run against every implementation. Budgets are derived from what was recorded,
never from a separate counter.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from node.policy import BudgetPolicy
from protocols.errors import BudgetExceededError, QueryError
from queries.results import BudgetStatus


@dataclass(frozen=True)
class Charge:
    """What the node is about to release, to be recorded before the release leaves."""

    query_id: str  # returned to the client with the release, so results map to entries
    analyst: str
    query: bytes  # canonical query bytes, as signed
    envelope: bytes  # the serialised QueryEnvelope, so an auditor can prove who asked
    views: tuple[str, ...]
    rho: float
    epsilon: float


@dataclass(frozen=True)
class Refusal:
    """A refused request, recorded at zero cost."""

    analyst: str
    query: bytes
    envelope: bytes
    reason: str
    code: str  # gRPC status name, e.g. "INVALID_ARGUMENT"


@dataclass(frozen=True)
class SignedEntry:
    """One ledger entry as stored: canonical JSON body and the node's signature over it."""

    sequence: int
    body: bytes
    signature: bytes


class Accountant(abc.ABC):
    """Where a node's privacy spend is checked and recorded."""

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy

    @abc.abstractmethod
    def spent(self, analyst: str | None = None) -> float:
        """Total rho charged (by one analyst, or by everyone)."""

    def status(self, analyst: str | None = None) -> BudgetStatus:
        """The node's totals (an analyst's own cap is the D-issue ledger's concern)."""
        del analyst
        return BudgetStatus(
            rho_total=self.policy.total_rho,
            rho_spent=self.spent(),
            max_rho_per_query=self.policy.max_rho_per_query,
            delta=self.policy.delta,
        )

    def check(self, analyst: str, rho: float) -> None:
        """Refuse, before any computation, a query over the per-query cap or what remains."""
        if rho > self.policy.max_rho_per_query:
            raise QueryError(
                f"rho {rho:g} is above this node's per-query cap of "
                f"{self.policy.max_rho_per_query:g}; ask for less"
            )
        remaining = self.status(analyst).rho_remaining
        if rho > remaining:
            raise BudgetExceededError(
                f"rho {rho:g} exceeds this node's remaining budget of {remaining:g}"
            )

    @abc.abstractmethod
    def charge(self, charge: Charge) -> tuple[BudgetStatus, int]:
        """Durably record a charge, or raise BudgetExceededError and record nothing.

        Returns the budget after the charge and the entry's sequence number. Must be
        serialised: concurrent charges can never together exceed a cap.
        """

    @abc.abstractmethod
    def refuse(self, refusal: Refusal) -> None:
        """Record a refusal at zero cost."""

    @abc.abstractmethod
    def entries(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """Every recorded entry from a sequence number on, in order."""

    @property
    def public_key(self) -> bytes:
        """Raw public key that verifies entries (empty if entries are not signed)."""
        return b""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources."""


class MemoryAccountant(Accountant):
    """Charges kept in memory: for tests and --insecure development nodes only."""

    def __init__(self, policy: BudgetPolicy) -> None:
        super().__init__(policy)
        self._charges: list[Charge] = []
        self._refusals: list[Refusal] = []
        self._lock = threading.Lock()

    def spent(self, analyst: str | None = None) -> float:
        """Sum of recorded charges."""
        with self._lock:
            return sum(c.rho for c in self._charges if analyst is None or c.analyst == analyst)

    def charge(self, charge: Charge) -> tuple[BudgetStatus, int]:
        """Record a charge if it fits under the node's total."""
        with self._lock:
            spent = sum(c.rho for c in self._charges)
            if spent + charge.rho > self.policy.total_rho * (1 + 1e-12):
                raise BudgetExceededError(
                    f"rho {charge.rho:g} exceeds this node's remaining budget of "
                    f"{max(0.0, self.policy.total_rho - spent):g}"
                )
            self._charges.append(charge)
            sequence = len(self._charges) + len(self._refusals)
        return self.status(), sequence

    def refuse(self, refusal: Refusal) -> None:
        """Keep the refusal (not signed)."""
        with self._lock:
            self._refusals.append(refusal)

    def entries(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """Nothing is signed in memory; auditors need the SQLite ledger."""
        del from_sequence
        return iter(())
