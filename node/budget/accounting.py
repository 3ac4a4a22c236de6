"""The node's privacy accounting interface: check, charge, refuse, and read back.

Flower's state pattern: one abstract class, implementations (in memory for tests and dev;
the signed, hash-chained SQLite ledger in node/budget/ledger.py for real nodes), and one contract
test suite run against every implementation. Budgets are derived from what was recorded,
never from a separate counter.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import NodeConfig
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import FitStepRecord, SignedEntry
from protocols.security.envelope import now_ms
from queries.errors import ChcError, ConfigError
from queries.results import BudgetStatus, SecureAggregation

if TYPE_CHECKING:
    from node.budget.book import LedgerBook
    from protocols.budget.changes import PolicyChange


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
    # One step of a model fit: recorded in the entry's `fit` field (docs/ledger.md).
    fit: FitStepRecord | None = None
    # A masked share of a secure aggregate: its `secure_aggregation` field (docs/ledger.md).
    secure_aggregation: SecureAggregation | None = None


class LedgerWriteError(ChcError):
    """The ledger could not record an entry (full, read-only or failing disk): nothing was
    charged, so nothing is released. A refusal for the analyst, a fault for the custodian."""

    status_name = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Keep:
    """The release to store with a charge, in the same transaction (idempotent retries).

    `response` is the serialised reply without its budget and ledger sequence (a re-sent
    copy carries the budget at the time it is re-sent and the sequence kept beside it); it
    is kept under the envelope's SHA-256 until the envelope expires.
    """

    envelope_sha256: bytes
    expires_at_ms: int
    response: bytes


@dataclass(frozen=True)
class Kept:
    """A release kept for a charged envelope: the reply and its ledger entry's sequence."""

    sequence: int
    response: bytes


@dataclass(frozen=True)
class RateLimited:
    """Refusals from one peer stop being recorded until `until` (node/service.py)."""

    peer: str  # the peer certificate's name, or without TLS the analyst the envelope claims
    refusals: int  # refusals recorded from it in the window
    window_seconds: float
    until: datetime


@dataclass(frozen=True)
class Refusal:
    """A refused request, recorded at zero cost.

    The ledger keeps a bounded digest of what was sent (node/budget/book.py: refusal_fields), never
    the whole query or envelope, so a refusal costs a few KB however much the caller sent.
    """

    analyst: str
    query: bytes
    envelope: bytes
    reason: str
    code: str  # gRPC status name, e.g. "INVALID_ARGUMENT"
    # Set on the one refusal that starts rate limiting its peer.
    rate_limited: RateLimited | None = None


class Accountant(abc.ABC):
    """Where a node's privacy spend is checked and recorded."""

    def __init__(
        self, policy: BudgetPolicy, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        # What node.toml asks for; the policy in force is the ledger's (see `policy`).
        self.configured_policy = policy
        # The policy entry recorded when the ledger was opened (None: the policy was in force).
        self.policy_change: PolicyChange | None = None
        # Injectable so that tests can cross budget periods; always timezone-aware UTC.
        self.clock: Callable[[], datetime] = clock if clock is not None else _utc_now

    @property
    def policy(self) -> BudgetPolicy:
        """The budget policy in force (a ledger's: that of its latest policy entry)."""
        return self.configured_policy

    @abc.abstractmethod
    def spent(self, analyst: str | None = None) -> float:
        """rho released in the current budget period (by one analyst, or by everyone)."""

    @abc.abstractmethod
    def lifetime_spent(self, analyst: str | None = None) -> float:
        """rho released since the ledger began, in every period (by one analyst, or everyone)."""

    @abc.abstractmethod
    def status(self, analyst: str | None = None) -> BudgetStatus:
        """The node's budget in the current period; for an analyst, what they can still spend.

        With an analyst, rho_spent is that analyst's own spend and rho_remaining the smaller
        of what their cap and the node's total leave (rho_total = spent + remaining).
        """

    @abc.abstractmethod
    def check(self, analyst: str, rho: float) -> None:
        """Refuse, before any computation, a query that would break any cap.

        QueryError for a rho that is not positive and finite or is above the per-query cap;
        BudgetExceededError if it would take the node's or the analyst's spend in the period,
        or since the ledger began, above their cap. Spends nothing; charge() checks again
        atomically.
        """

    @abc.abstractmethod
    def charge(self, charge: Charge, keep: Keep | None = None) -> tuple[BudgetStatus, int]:
        """Durably record a charge, or raise (as check() does) and record nothing.

        Returns the node's budget after the charge and the entry's sequence number. Must be
        serialised: concurrent charges can never together exceed a cap. Durable means the
        entry survives a crash of the process once this returns (charge before release).
        With `keep`, the release is stored atomically with the entry: both or neither.
        """

    @abc.abstractmethod
    def stored_release(self, envelope_sha256: bytes) -> Kept | None:
        """The release kept for a charged envelope that has not expired (None if none)."""

    @abc.abstractmethod
    def refuse(self, refusal: Refusal) -> None:
        """Record a refusal at zero cost."""

    @abc.abstractmethod
    def entries(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """Every recorded entry from a sequence number on, in order."""

    @abc.abstractmethod
    def stream(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """What auditors receive: entries from one snapshot, then the signed head (head=True)."""

    @property
    def public_key(self) -> bytes:
        """Raw public key that verifies entries (empty if entries are not signed)."""
        return b""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources."""


class MemoryAccountant(Accountant):
    """The ledger kept in memory, signed with a throwaway key: for tests and development.

    It builds exactly the entries the SQLite ledger stores (node.budget.book.LedgerBook), so one
    contract suite covers both, and a verifier can check them; nothing survives a restart.
    """

    def __init__(
        self,
        policy: BudgetPolicy,
        *,
        node: str = "memory",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(policy, clock=clock)
        # Imported here: node.budget.book builds on this module.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from node.budget.book import LedgerBook

        self._book: LedgerBook = LedgerBook(
            node=node, policy=policy, key=Ed25519PrivateKey.generate()
        )
        self._entries: list[SignedEntry] = []
        self._kept: dict[bytes, tuple[int, Kept]] = {}  # sha256: (expires_at_ms, kept)
        self._lock = threading.Lock()
        # A new ledger starts with its policy entry, like a new SQLite ledger.
        self.policy_change = self._book.plan_policy(policy, None)
        if self.policy_change is not None:
            self._append(self._book.policy_entry_for(self.policy_change, self._now()))

    def _now(self) -> datetime:
        return self._book.now(self.clock())

    def _append(self, entry: SignedEntry) -> None:
        self._entries.append(entry)
        self._book.fold(entry)

    @property
    def public_key(self) -> bytes:
        """The throwaway key that signs this run's entries."""
        return self._book.public_key

    @property
    def policy(self) -> BudgetPolicy:
        """The policy in force: the latest policy entry's."""
        return self._book.policy

    def spent(self, analyst: str | None = None) -> float:
        """rho released in the current period."""
        with self._lock:
            return self._book.spent(self._now(), analyst)

    def lifetime_spent(self, analyst: str | None = None) -> float:
        """rho released since this accountant began."""
        with self._lock:
            return self._book.lifetime_spent(analyst)

    def status(self, analyst: str | None = None) -> BudgetStatus:
        """The budget now (see Accountant.status)."""
        with self._lock:
            return self._book.status(self._now(), analyst)

    def check(self, analyst: str, rho: float) -> None:
        """Refuse a query that would break any cap now."""
        with self._lock:
            error = self._book.refusal(analyst, rho, self._now())
        if error is not None:
            raise error

    def charge(self, charge: Charge, keep: Keep | None = None) -> tuple[BudgetStatus, int]:
        """Check every cap and record the charge (and its kept release), under one lock."""
        with self._lock:
            when = self._now()
            entry = self._book.charge_entry(charge, when)
            self._append(entry)
            if keep is not None:
                now = now_ms()
                self._kept = {k: v for k, v in self._kept.items() if v[0] > now}
                self._kept[keep.envelope_sha256] = (
                    keep.expires_at_ms,
                    Kept(sequence=entry.sequence, response=keep.response),
                )
            return self._book.status(when), entry.sequence

    def stored_release(self, envelope_sha256: bytes) -> Kept | None:
        """The kept release of an unexpired charged envelope."""
        with self._lock:
            kept = self._kept.get(envelope_sha256)
        return kept[1] if kept is not None and kept[0] > now_ms() else None

    def refuse(self, refusal: Refusal) -> None:
        """Record the refusal at zero cost."""
        with self._lock:
            self._append(self._book.refusal_entry(refusal, self._now()))

    def entries(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """The entries recorded so far, from a sequence number on."""
        with self._lock:
            return iter(self._entries[max(1, from_sequence) - 1 :])

    def stream(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """The entries so far, then the signed head naming the last of them."""
        with self._lock:
            items = [*self._entries[max(1, from_sequence) - 1 :], self._book.head()]
        return iter(items)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def default_ledger_path(config: NodeConfig, config_file: Path | None) -> Path:
    """node.toml's `ledger`, else <name>.ledger.sqlite in node.toml's folder."""
    if config.ledger is not None:
        return config.ledger
    if config_file is None:
        raise ConfigError(f'node {config.name}: set `ledger = "PATH"` in node.toml')
    return config_file.parent / f"{config.name}.ledger.sqlite"


def open_accountant(
    config: NodeConfig,
    *,
    config_file: Path | None = None,
    memory: bool = False,
    clock: Callable[[], datetime] | None = None,
    override: str | None = None,
    record_policy: bool = True,
) -> Accountant:
    """The factory: the node's SQLite ledger (default), or an in-memory one for development.

    Opening the ledger records node.toml's budget policy if it changed; `override` is the
    custodian's reason for one that loosens the recorded policy, and record_policy=False
    only checks (see SqliteLedger).
    """
    if memory:
        return MemoryAccountant(config.budget, node=config.name, clock=clock)
    import sqlite3

    from node.budget.ledger import SqliteLedger
    from protocols.ledger.file import is_sqlite_file

    path = default_ledger_path(config, config_file)
    where = f"`ledger =` in {config_file}" if config_file is not None else "`ledger =`"
    # SQLite itself says only "file is not a database", naming neither the file nor the
    # setting; an empty file is what SQLite makes of a new database, so it may start one.
    empty = path.is_file() and path.stat().st_size == 0
    if path.exists() and not empty and not is_sqlite_file(path):
        raise ConfigError(
            f"ledger {path} is not a SQLite database (or cannot be read): fix {where} to name "
            "the node's ledger, or a file that does not exist yet for a new one"
        )
    try:
        return SqliteLedger(
            path,
            node=config.name,
            policy=config.budget,
            key_path=config.ledger_key,
            clock=clock,
            override=override,
            record_policy=record_policy,
        )
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"ledger {path} ({where}): {exc}") from None
