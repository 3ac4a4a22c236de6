"""Verifying a ledger entry by entry: what `chc audit verify` checks and what it found.

`verify` checks everything the entry format (protocols/ledger/, docs/ledger.md) promises: the
hash chain, every signature against the node's public key, the sequence (gaps, repeats,
reordering), the signed head (deletions at the end), every released query's envelope against
the federation CA, and that recorded totals never exceeded the caps in force. It names the
entry of every anomaly and keeps going, so one report shows everything that is wrong. This
module holds the ledger's integrity (chain, sequence, signatures, head) and the result; what
each query entry records is checked in coordinator/audit/query_checks.py and its budget fields
in coordinator/audit/budget.py, so each stays readable on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from coordinator.audit.budget import BudgetChecks, PolicyNote
from coordinator.audit.query_checks import QueryChecks
from coordinator.audit.sources import LedgerSource
from protocols.budget.changes import POLICY_RECORD
from protocols.ledger.entry import (
    ENTRY_RECORD,
    FORMAT,
    HEAD_RECORD,
    ZERO_HASH,
    SignedEntry,
    canonical_json,
    decode_body,
    entry_hash,
    parse_time,
    signature_ok,
)


@dataclass(frozen=True)
class Anomaly:
    """One thing wrong with a ledger, at an entry (its sequence number) or the whole."""

    entry: int | None
    problem: str

    def __str__(self) -> str:
        return f"entry {self.entry}: {self.problem}" if self.entry is not None else self.problem


@dataclass
class Verification:
    """What verifying one ledger found."""

    source: str
    node: str
    key_origin: str
    entries: int = 0
    released: int = 0
    refused: int = 0
    rho_released: float = 0.0
    anomalies: list[Anomaly] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Every policy entry: the caps from then on, and any loosening with its override reason.
    policies: list[PolicyNote] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No anomaly at all."""
        return not self.anomalies

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["ok"] = self.ok
        out["anomalies"] = [{"entry": a.entry, "problem": a.problem} for a in self.anomalies]
        return out


class _Verifier:
    """Checks entries one at a time (a ledger is never held in memory), then the head."""

    def __init__(
        self, result: Verification, public_key: bytes | None, ca_pem: bytes | None
    ) -> None:
        self.r = result
        self.key = public_key
        self.expected = 1
        self.prev_hash = ZERO_HASH
        self.last_label: int | None = None
        self.last_time: datetime | None = None
        self.bad_signatures: list[int] = []
        self.budget = BudgetChecks(self.flag)
        self.queries = QueryChecks(self.flag, self.budget, result.notes, ca_pem)

    def flag(self, entry: int | None, problem: str) -> None:
        self.r.anomalies.append(Anomaly(entry, problem))

    def entry(self, item: SignedEntry) -> None:
        self.r.entries += 1
        stored = item.sequence
        this_hash = entry_hash(item.body, item.signature)
        try:
            body = decode_body(item.body)
        except ValueError as exc:
            self.flag(stored, f"its body is not a JSON object ({exc})")
            self._advance(stored, stored, this_hash)
            return
        seq = body.get("sequence")
        label = seq if isinstance(seq, int) and not isinstance(seq, bool) else stored
        if self.key is not None and not signature_ok(self.key, item.body, item.signature):
            self.bad_signatures.append(label)
        if canonical_json(body) != item.body:
            self.flag(label, "its body is not in canonical form (it was re-encoded or edited)")
        record = body.get("record")
        if record not in (ENTRY_RECORD, POLICY_RECORD) or body.get("format") != FORMAT:
            self.flag(label, f"is not a format-{FORMAT} ledger entry")
        if label != stored:
            self.flag(
                stored,
                f"is stored as entry {stored} but its signed body says it is entry {label} "
                "(entries were reordered or renumbered)",
            )
        elif label > self.expected:
            missing = (
                f"entry {self.expected} is"
                if label == self.expected + 1
                else f"entries {self.expected} to {label - 1} are"
            )
            self.flag(label, f"{missing} missing before it (deleted)")
        elif label < self.expected:
            self.flag(label, f"comes after entry {self.last_label}: out of order or repeated")
        if body.get("prev_hash") != self.prev_hash:
            if self.last_label is None:
                self.flag(
                    label,
                    "its prev_hash is not the first entry's zero hash: the ledger does not "
                    "start here (entries were deleted from the start)",
                )
            else:
                self.flag(
                    label,
                    f"its prev_hash does not match the entry before it (entry "
                    f"{self.last_label}): an entry was edited, inserted, deleted or moved",
                )
        node = body.get("node")
        if self.r.node and node != self.r.node:
            self.flag(label, f"belongs to node {node!r}, not {self.r.node!r}")
        elif not self.r.node and isinstance(node, str):
            self.r.node = node
        try:
            when = parse_time(str(body.get("time")))
        except ValueError:
            self.flag(label, f"its time {body.get('time')!r} is not UTC ISO 8601 with ms")
            when = None
        if when is not None and self.last_time is not None and when < self.last_time:
            self.flag(label, f"its time is earlier than entry {self.last_label}'s")
        if when is not None and record == POLICY_RECORD:
            self.budget.policy_entry_body(label, body)
            self.last_time = when
        elif when is not None:
            self.queries.entry(label, body, when)
            self.last_time = when
        self._advance(label, label, this_hash)

    def _advance(self, label: int, seq: int, this_hash: str) -> None:
        self.expected = max(self.expected, seq + 1)
        self.prev_hash = this_hash
        self.last_label = label

    def head(self, item: SignedEntry | None) -> None:
        last = self.expected - 1
        if item is None:
            if self.r.entries:
                self.flag(
                    None,
                    "there is no signed head, so entries deleted from the end could not be "
                    "detected",
                )
            return
        if self.key is not None and not signature_ok(self.key, item.body, item.signature):
            self.flag(None, "the signed head's signature does not verify with the node's key")
        try:
            head = decode_body(item.body)
            sequence = int(head["sequence"])
        except (ValueError, KeyError, TypeError):
            self.flag(None, "the signed head is not a ledger head")
            return
        if head.get("record") != HEAD_RECORD:
            self.flag(None, "the signed head is not a ledger head")
        if self.r.node and head.get("node") != self.r.node:
            self.flag(None, f"the signed head belongs to node {head.get('node')!r}")
        if sequence > last:
            missing = (
                f"entry {sequence} is"
                if sequence == last + 1
                else f"entries {last + 1} to {sequence} are"
            )
            self.flag(
                last + 1,
                f"{missing} missing at the end: the node's signed head says the ledger ends at "
                f"entry {sequence}",
            )
        elif sequence < last:
            self.flag(
                sequence + 1,
                f"entries {sequence + 1} to {last} are not covered by the node's signed head, "
                f"which ends at entry {sequence} (appended without the node's key?)",
            )
        elif head.get("hash") != self.prev_hash:
            self.flag(
                last,
                "is not the entry the node's signed head names (the hashes differ): the last "
                "entry was replaced",
            )

    def finish(self) -> None:
        bad = self.bad_signatures
        if bad and len(bad) == self.r.entries and len(bad) > 1:
            self.flag(
                bad[0],
                f"its signature does not verify with the node's public key, and neither does "
                f"any other of the {len(bad)} entries: wrong key ({self.r.key_origin})",
            )
        else:
            for label in bad:
                self.flag(
                    label,
                    "its signature does not verify with the node's public key (the entry was "
                    "edited, or signed by another key)",
                )
        self.r.anomalies.sort(key=lambda a: (a.entry is None, a.entry or 0))


def verify(source: LedgerSource, *, ca_pem: bytes | None = None) -> Verification:
    """Check one ledger completely; every anomaly is reported with its entry."""
    result = Verification(source=source.label, node=source.node, key_origin=source.key_origin)
    verifier = _Verifier(result, source.public_key, ca_pem)
    if source.public_key is None:
        result.anomalies.append(
            Anomaly(None, "no public key to check signatures with; give --public-key")
        )
    if ca_pem is None:
        result.notes.append("analyst signatures not checked: give --ca or --identity")
    head: SignedEntry | None = None
    for item in source.read():
        if item.head:
            head = item
        elif head is not None:
            verifier.flag(item.sequence, "comes after the signed head")
        else:
            verifier.entry(item)
    verifier.head(head)
    verifier.finish()
    result.policies = verifier.budget.notes
    queries = verifier.queries  # releases and refusals are tallied where they are checked
    result.released, result.refused = queries.released, queries.refused
    result.rho_released = queries.rho_released
    return result


def compare_with_earlier(current: LedgerSource, earlier: LedgerSource) -> list[Anomaly]:
    """Whether a ledger still holds, unchanged, every entry an earlier copy of it held.

    The chain alone cannot stop whoever holds the node's key from rewriting history and
    re-signing it; an auditor who kept an earlier export can (the ledger is append-only).
    """
    kept = {e.sequence: entry_hash(e.body, e.signature) for e in earlier.read() if not e.head}
    found: list[Anomaly] = []
    for e in current.read():
        if e.head or e.sequence not in kept:
            continue
        if entry_hash(e.body, e.signature) != kept.pop(e.sequence):
            found.append(
                Anomaly(e.sequence, f"differs from the earlier copy {earlier.label}: rewritten")
            )
    for sequence in sorted(kept):
        found.append(
            Anomaly(sequence, f"was in the earlier copy {earlier.label} but is gone: deleted")
        )
    return found
