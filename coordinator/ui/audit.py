"""What the Audit page shows: each node's ledger verified, spend over time, anomalies.

The checks are coordinator/audit's (`chc audit verify`, `chc audit report`); this module only
reads each ledger once, so that the verification, the spend charts and the totals on one page
describe the same entries, and gathers the results for the template. Ledgers are read from
each node directly over mutual TLS with the auditor's own certificate (the hub only says where
the nodes are), or from files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from coordinator.audit import report as audit_report
from coordinator.audit import verification
from coordinator.audit.budget import number
from coordinator.audit.sources import LedgerSource, node_addresses, open_remote
from protocols.budget.changes import POLICY_RECORD
from protocols.ledger.entry import RELEASED, SignedEntry, decode_body, parse_time
from protocols.security.pki import Identity
from queries.errors import ChcError


@dataclass(frozen=True)
class Spend:
    """One released charge: when, at which node, by whom, on which view, and its rho."""

    time: datetime
    node: str
    analyst: str
    view: str
    rho: float
    entry: int


@dataclass
class NodeAudit:
    """One node's ledger as the page shows it."""

    node: str
    source: str
    result: verification.Verification | None = None
    error: str = ""  # why the ledger could not be read (then result is None)

    @property
    def verified(self) -> bool:
        """Read, and no anomaly found."""
        return self.result is not None and self.result.ok

    @property
    def summary(self) -> str:
        """ "verified", "FAILED: <the first anomaly, naming its entry>", or why not checked."""
        if self.result is None:
            return f"not checked: {self.error}"
        if self.result.ok:
            return "verified"
        return f"FAILED: {self.result.anomalies[0]}"


@dataclass
class AuditReport:
    """Everything the Audit page shows."""

    nodes: list[NodeAudit] = field(default_factory=list)
    spend: list[Spend] = field(default_factory=list)
    totals: list[audit_report.SpendRow] = field(default_factory=list)


def snapshot(source: LedgerSource) -> LedgerSource:
    """The same ledger, read once now: every later read sees exactly these entries."""
    entries = list(source.read())

    def read() -> Iterator[SignedEntry]:
        return iter(entries)

    return LedgerSource(source.label, source.node, source.public_key, source.key_origin, read)


def spend_of(source: LedgerSource) -> list[Spend]:
    """Every released charge in a ledger, in ledger order (entries that do not decode are
    verification's business, and skipped here)."""
    found: list[Spend] = []
    for e in source.read():
        if e.head:
            continue
        try:
            body = decode_body(e.body)
            when = parse_time(str(body.get("time")))
        except ValueError:
            continue
        if body.get("record") == POLICY_RECORD or body.get("outcome") != RELEASED:
            continue
        views = body.get("views")
        view = "+".join(str(v) for v in views) if isinstance(views, list) and views else "?"
        found.append(
            Spend(
                time=when,
                node=str(body.get("node") or source.node),
                analyst=str(body.get("analyst")),
                view=view,
                rho=number(body.get("rho")) or 0.0,
                entry=e.sequence,
            )
        )
    return found


def audit(sources: Iterable[LedgerSource], *, ca_pem: bytes | None) -> AuditReport:
    """Verify every ledger and gather its spend; a ledger that cannot be read is named."""
    out = AuditReport()
    read: list[LedgerSource] = []
    for source in sources:
        name = source.node or source.label
        try:
            kept = snapshot(source)
        except ChcError as exc:
            out.nodes.append(NodeAudit(name, source.label, error=str(exc)))
            continue
        read.append(kept)
        result = verification.verify(kept, ca_pem=ca_pem)
        out.nodes.append(NodeAudit(result.node or name, source.label, result=result))
        out.spend += spend_of(kept)
    out.spend.sort(key=lambda s: s.time)
    out.totals = audit_report.spend_rows(read)
    return out


def remote_audit(hub: str, auditor: Identity) -> AuditReport:
    """Every node the hub names, read directly over mutual TLS with the auditor's identity.

    Analysts' signatures in the ledgers are checked against the federation CA of the
    auditor's own identity.
    """
    addresses = node_addresses(hub, auditor)
    sources: list[LedgerSource] = []
    failed: list[NodeAudit] = []
    for name, address in sorted(addresses.items()):
        try:
            sources.append(open_remote(name, address, auditor, timeout_s=60.0))
        except ChcError as exc:
            failed.append(NodeAudit(name, f"{name}@{address}", error=str(exc)))
    report = audit(sources, ca_pem=auditor.ca_pem)
    report.nodes = sorted(report.nodes + failed, key=lambda n: n.node)
    return report
