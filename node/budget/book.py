"""A ledger's book-keeping, independent of storage: the chain's end, the policy, the spend.

The SQLite ledger (node/budget/ledger.py) and the in-memory accountant both build their
entries here, so one contract test suite covers the entries either one writes.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.budget.accounting import Charge, RateLimited, Refusal
from protocols.budget.changes import POLICY_RECORD, PolicyChange, plan_change, read_change
from protocols.budget.policy import BudgetPolicy
from protocols.budget.rules import budget_refusal, budget_status
from protocols.budget.tally import SpendTally
from protocols.ledger.entry import (
    ENTRY_RECORD,
    FIT_FIELD,
    FORMAT,
    HEAD_RECORD,
    REFUSED,
    RELEASED,
    SECURE_AGGREGATION_FIELD,
    ZERO_HASH,
    SignedEntry,
    canonical_json,
    decode_body,
    entry_hash,
    format_time,
    parse_time,
    public_key_bytes,
    query_text,
    secure_aggregation_fields,
    truncate_ms,
    views_of,
)
from queries.errors import ChcError, LedgerIntegrityError
from queries.results import BudgetStatus

# A refusal entry is a bounded digest of the request (docs/ledger.md, "Refusal entries"):
# anyone with a certificate can be refused, so what a refusal costs on disk must not depend
# on what they send. It keeps the SHA-256 and size of the query and of the envelope, the
# first REFUSAL_QUERY_BYTES of the query (a real query is whole) and the first
# REFUSAL_ENVELOPE_BYTES of the envelope; the claimed analyst and the reason are cut too.
REFUSAL_QUERY_BYTES = 2048
REFUSAL_ENVELOPE_BYTES = 256
REFUSAL_REASON_CHARS = 1000
REFUSAL_ANALYST_CHARS = 128


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refusal_fields(refusal: Refusal) -> dict[str, Any]:
    """What a refusal entry records of the request: a digest, never all of it."""
    query, envelope = refusal.query, refusal.envelope
    return {
        "query": query_text(query[:REFUSAL_QUERY_BYTES]),
        "query_sha256": hashlib.sha256(query).hexdigest(),
        "query_size": len(query),
        "query_truncated": len(query) > REFUSAL_QUERY_BYTES,
        "envelope_sha256": hashlib.sha256(envelope).hexdigest(),
        "envelope_size": len(envelope),
        "envelope_prefix": base64.b64encode(envelope[:REFUSAL_ENVELOPE_BYTES]).decode("ascii"),
    }


def rate_limited_fields(limit: RateLimited) -> dict[str, Any]:
    """How a refusal entry records that rate limiting of its peer started."""
    return {
        "peer": _cut(limit.peer, REFUSAL_ANALYST_CHARS),
        "refusals": limit.refusals,
        "window_seconds": float(limit.window_seconds),
        "until": format_time(limit.until),
    }


class LedgerBook:
    """A ledger's state, independent of storage: the chain's end, the policy, the spend.

    Storage folds every entry in order (`fold`), asks for a decision (`refusal`), and has the
    book build and sign the next entry and head; it folds them only once they are stored.
    The policy in force is the latest policy entry's; before the first one (a new ledger, or
    one written before policy entries existed) it is the configured one, and the storage
    records that as the first policy entry before anything else.
    """

    def __init__(self, *, node: str, policy: BudgetPolicy, key: Ed25519PrivateKey) -> None:
        self.node = node
        self.policy = policy
        self.policy_entry: int | None = None  # the sequence of the policy entry in force
        self._key = key
        self.public_key = public_key_bytes(key)
        self.sequence = 0
        self.last_hash = ZERO_HASH
        self.last_time: datetime | None = None
        self.tally = SpendTally()

    # reading --------------------------------------------------------------------------

    def fold(self, entry: SignedEntry) -> None:
        """Add one stored entry, checking that it extends the chain."""
        where = f"entry {entry.sequence}"
        try:
            body = decode_body(entry.body)
            sequence = int(body["sequence"])
            prev_hash = str(body["prev_hash"])
            when = parse_time(str(body["time"]))
            change: PolicyChange | None = None
            release: tuple[str, float] | None = None
            if body.get("record") == POLICY_RECORD:
                change = read_change(body)
            elif body["outcome"] == RELEASED:
                release = (str(body["analyst"]), float(body["rho"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerIntegrityError(f"{where}: its body is not a ledger entry ({exc})") from None
        if entry.sequence != sequence:
            raise LedgerIntegrityError(
                f"{where}: stored as entry {entry.sequence} but its body says {sequence} "
                "(entries were reordered or renumbered)"
            )
        if sequence != self.sequence + 1:
            raise LedgerIntegrityError(
                f"{where}: follows entry {self.sequence} (entries are missing or repeated)"
            )
        if prev_hash != self.last_hash:
            raise LedgerIntegrityError(
                f"{where}: its prev_hash does not match entry {self.sequence} "
                "(an entry was edited, inserted or deleted)"
            )
        if change is not None:
            self.policy, self.policy_entry = change.policy, sequence
        elif release is not None:
            self.tally.add(when, *release)
        self.sequence = sequence
        self.last_hash = entry_hash(entry.body, entry.signature)
        self.last_time = when

    def now(self, clock_time: datetime) -> datetime:
        """The time for the next entry: the clock, never before the last entry (ms precision)."""
        when = truncate_ms(clock_time.astimezone(UTC))
        if self.last_time is not None and when < self.last_time:
            return self.last_time
        return when

    def spent(self, when: datetime, analyst: str | None = None) -> float:
        """rho released in the period containing `when` (by one analyst, or in total)."""
        return self.tally.period(self.policy, when).of(analyst)

    def lifetime_spent(self, analyst: str | None = None) -> float:
        """rho released since the ledger began, in every period (by one analyst, or in total)."""
        return self.tally.life.of(analyst)

    def status(self, when: datetime, analyst: str | None = None) -> BudgetStatus:
        """The node's budget; for an analyst, what that analyst can still spend."""
        return budget_status(self.policy, self.tally, when, analyst)

    def refusal(self, analyst: str, rho: float, when: datetime) -> ChcError | None:
        """Why a charge of rho by analyst at `when` must be refused, or None if it fits."""
        return budget_refusal(self.policy, self.tally, analyst, rho, when)

    def plan_policy(self, configured: BudgetPolicy, override: str | None) -> PolicyChange | None:
        """The policy entry configured needs after what was folded (raises if it loosens)."""
        recorded = self.policy if self.policy_entry is not None else None
        return plan_change(
            configured, recorded, self.policy_entry, node=self.node, override=override
        )

    # writing --------------------------------------------------------------------------

    def _sign(self, body: dict[str, Any]) -> tuple[bytes, bytes]:
        raw = canonical_json(body)
        return raw, self._key.sign(raw)

    def _entry(
        self,
        when: datetime,
        *,
        analyst: str,
        query_id: str,
        request: dict[str, Any],
        views: list[str],
        rho: float,
        epsilon: float,
        outcome: str,
        reason: str,
        code: str,
    ) -> SignedEntry:
        p = self.policy
        start, end = p.period_of(when)
        released = rho if outcome == RELEASED else 0.0
        sequence = self.sequence + 1
        period, life = self.tally.period(p, when), self.tally.life
        body: dict[str, Any] = {
            "record": ENTRY_RECORD,
            "format": FORMAT,
            "sequence": sequence,
            "time": format_time(when),
            "node": self.node,
            "analyst": analyst,
            "query_id": query_id,
            **request,
            "views": views,
            "rho": float(rho),
            "epsilon": float(epsilon),
            "delta": float(p.delta),
            "outcome": outcome,
            "reason": reason,
            "code": code,
            "caps": {
                "period": p.period,
                "period_start": start.isoformat() if start else None,
                "period_end": end.isoformat() if end else None,
                "total_rho": float(p.total_rho),
                "max_rho_per_query": float(p.max_rho_per_query),
                "analyst_rho": p.analyst_cap(analyst),
                "lifetime_rho": float(p.lifetime_cap),
                "analyst_lifetime_rho": p.analyst_lifetime_cap(analyst),
                "policy": self.policy_entry,
            },
            "spent": {
                "period_rho": period.total + released,
                "analyst_rho": period.of(analyst) + released,
                "lifetime_rho": life.total + released,
                "analyst_lifetime_rho": life.of(analyst) + released,
            },
            "prev_hash": self.last_hash,
        }
        raw, signature = self._sign(body)
        return SignedEntry(sequence=sequence, body=raw, signature=signature)

    def charge_entry(self, charge: Charge, when: datetime) -> SignedEntry:
        """The signed entry for a release, or raise the reason it must be refused."""
        error = self.refusal(charge.analyst, charge.rho, when)
        if error is not None:
            raise error
        return self._entry(
            when,
            analyst=charge.analyst,
            query_id=charge.query_id,
            request={
                "query": query_text(charge.query),
                "query_sha256": hashlib.sha256(charge.query).hexdigest(),
                "envelope": base64.b64encode(charge.envelope).decode("ascii"),
                # Only on fit steps, so every other entry is byte for byte as before.
                **({FIT_FIELD: charge.fit.fields()} if charge.fit is not None else {}),
                **(
                    {SECURE_AGGREGATION_FIELD: secure_aggregation_fields(charge.secure_aggregation)}
                    if charge.secure_aggregation is not None
                    else {}
                ),
            },
            views=list(charge.views),
            rho=charge.rho,
            epsilon=charge.epsilon,
            outcome=RELEASED,
            reason="",
            code="",
        )

    def refusal_entry(self, refusal: Refusal, when: datetime) -> SignedEntry:
        """The signed, zero-cost entry for a refusal: a few KB, whatever was sent."""
        request = refusal_fields(refusal)
        if refusal.rate_limited is not None:
            request["rate_limited"] = rate_limited_fields(refusal.rate_limited)
        return self._entry(
            when,
            analyst=_cut(refusal.analyst, REFUSAL_ANALYST_CHARS),
            query_id="",
            request=request,
            views=views_of(refusal.query),
            rho=0.0,
            epsilon=0.0,
            outcome=REFUSED,
            reason=_cut(refusal.reason, REFUSAL_REASON_CHARS),
            code=refusal.code,
        )

    def policy_entry_for(self, change: PolicyChange, when: datetime) -> SignedEntry:
        """The signed policy entry recording a change of budget policy."""
        sequence = self.sequence + 1
        body: dict[str, Any] = {
            **change.fields(),
            "format": FORMAT,
            "sequence": sequence,
            "time": format_time(when),
            "node": self.node,
            "prev_hash": self.last_hash,
        }
        raw, signature = self._sign(body)
        return SignedEntry(sequence=sequence, body=raw, signature=signature)

    def head(self, after: SignedEntry | None = None) -> SignedEntry:
        """The signed head naming the chain's last entry (`after`, or the last one folded)."""
        if after is None:
            sequence, last_hash = self.sequence, self.last_hash
            when = self.last_time
        else:
            sequence, last_hash = after.sequence, entry_hash(after.body, after.signature)
            when = parse_time(str(decode_body(after.body)["time"]))
        body = {
            "record": HEAD_RECORD,
            "format": FORMAT,
            "node": self.node,
            "sequence": sequence,
            "hash": last_hash,
            "time": format_time(when) if when is not None else None,
        }
        raw, signature = self._sign(body)
        return SignedEntry(sequence=sequence, body=raw, signature=signature, head=True)
