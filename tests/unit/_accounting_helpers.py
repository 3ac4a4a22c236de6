"""Shared by the Accountant tests: a throwaway PKI, charges as the node builds them, accountants.

The contract tests (test_accounting_contract.py, test_accounting_lifetime.py), the SQLite
ledger tests (test_ledger*.py) and the policy-entry tests all charge real analyst-signed
envelopes and read what an auditor would; each test module makes its own PKI once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from coordinator.audit.sources import LedgerSource
from node.budget.accounting import Accountant, Charge, MemoryAccountant, Refusal
from node.budget.ledger import SqliteLedger
from protocols import serde
from protocols.budget.changes import POLICY_RECORD
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import SignedEntry
from protocols.security.envelope import sign_query
from protocols.security.pki import CA_FILE, Identity, Role, create_ca, issue, load_identity
from queries.mechanisms import rho_to_epsilon
from queries.spec import Query, canonical_bytes


@dataclass(frozen=True)
class Pki:
    """A federation CA and two analysts."""

    ca_pem: bytes
    alice: Identity
    bob: Identity


def make_pki(root: Path) -> Pki:
    """A throwaway federation."""
    create_ca(root)
    ids = {n: load_identity(issue(root, role=Role.ANALYST, name=n)) for n in ("alice", "bob")}
    return Pki((root / CA_FILE).read_bytes(), ids["alice"], ids["bob"])


def signed_charge(identity: Identity, rho: float, *, view: str = "persons") -> Charge:
    """A charge exactly as the node builds it, from a real analyst-signed envelope."""
    signed = sign_query(identity, canonical_bytes(Query(view=view, rho=rho)))
    envelope = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
    return Charge(
        query_id=f"q-{signed.nonce.hex()[:12]}",
        analyst=identity.name,
        query=signed.query,
        envelope=envelope,
        views=(view,),
        rho=rho,
        epsilon=rho_to_epsilon(rho, 1e-6),
    )


def refusal(analyst: str = "alice", reason: str = "no such view") -> Refusal:
    """A refusal of an unsigned, unparseable request."""
    return Refusal(
        analyst=analyst, query=b"{not json", envelope=b"", reason=reason, code="INVALID_ARGUMENT"
    )


def source_of(accountant: Accountant, label: str = "under test") -> LedgerSource:
    """What an auditor streaming this accountant would read."""
    return LedgerSource(
        label=label,
        node="",
        public_key=accountant.public_key,
        key_origin="the accountant",
        read=lambda: accountant.stream(),
    )


def query_entries(accountant: Accountant) -> list[SignedEntry]:
    """The entries of queries (releases and refusals), without the policy entries."""
    return [e for e in accountant.entries() if json.loads(e.body)["record"] != POLICY_RECORD]


class Clock:
    """A settable clock, so tests can cross budget periods."""

    def __init__(self, when: datetime) -> None:
        self.when = when

    def __call__(self) -> datetime:
        return self.when


Factory = Callable[..., Accountant]


# The implementations of the Accountant contract, by the name a test's parameter shows.
KINDS = ["memory", "sqlite"]


@contextmanager
def accountants(kind: str, folder: Path) -> Iterator[Factory]:
    """Build the implementation under test with a policy (and optionally a clock)."""
    opened: list[Accountant] = []

    def factory(policy: BudgetPolicy, clock: Callable[[], datetime] | None = None) -> Accountant:
        accountant: Accountant
        if kind == "memory":
            accountant = MemoryAccountant(policy, node="test", clock=clock)
        else:
            path = folder / f"ledger{len(opened)}.sqlite"
            accountant = SqliteLedger(path, node="test", policy=policy, clock=clock)
        opened.append(accountant)
        return accountant

    yield factory
    for a in opened:
        a.close()
