"""The budget half of `chc audit verify`: policy entries, the caps in force, and spend.

coordinator/audit/verification.py checks the chain and the signatures, and
coordinator/audit/query_checks.py the analysts' envelopes; both hand
every entry's budget fields here. A ledger's policy entries (protocols/budget/changes.py) say
which caps were in force from when: each must name the policy it replaces exactly, record
exactly how it loosens it, and carry a custodian's reason if it does. Every later entry must
record those caps, and every release must fit them: the period caps over the period that
contains it, the lifetime caps over every release since the ledger began.

Entries written before a ledger's first policy entry (ledgers from before policy entries
existed) are checked as they always were: against the caps each records, with spend summed
by the period each records, so old ledgers still verify.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from protocols.budget.changes import loosenings, policy_record, read_change, summary
from protocols.budget.policy import BudgetPolicy, period_bounds
from protocols.budget.rules import cap_exceeded
from protocols.budget.tally import SpendTally
from queries.errors import ConfigError


def number(value: object) -> float | None:
    """A JSON number as a float (None for anything else, booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def close(a: float, b: float) -> bool:
    """Equal up to float rounding (the node and the verifier may sum in another order)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class PolicyNote:
    """One policy entry, as an auditor should see it (overrides above all)."""

    entry: int
    time: str
    policy: str  # the caps, in one line
    first: bool  # the ledger's first policy entry (no previous one to compare with)
    loosened: list[str] = field(default_factory=list)
    override: str | None = None  # the custodian's recorded reason for a loosening

    @property
    def change(self) -> str:
        """What the entry did, and the caps from then on."""
        if self.first:
            what = "first budget policy"
        elif not self.loosened:
            what = "budget policy tightened"
        else:
            what = (
                f"budget policy LOOSENED ({'; '.join(self.loosened)}) by the custodian's "
                f"override: {self.override!r}"
            )
        return f"{what}: {self.policy}"

    def __str__(self) -> str:
        return f"entry {self.entry} ({self.time}): {self.change}"


Flag = Callable[[int | None, str], None]


class BudgetChecks:
    """Follows the policy in force and the spend, entry by entry, and flags what breaks."""

    def __init__(self, flag: Flag) -> None:
        self.flag = flag
        self.policy: BudgetPolicy | None = None  # None until the first policy entry
        self.policy_entry: int | None = None
        self.notes: list[PolicyNote] = []
        self.tally = SpendTally()
        # Before the first policy entry: spend by the period each entry records.
        self.total: dict[str, float] = defaultdict(float)
        self.by_analyst: dict[tuple[str, str], float] = defaultdict(float)

    # policy entries ---------------------------------------------------------------------

    def policy_entry_body(self, label: int, body: dict[str, Any]) -> None:
        """Check one policy entry against the policy in force, then put it in force."""
        try:
            change = read_change(body)
        except (ValueError, KeyError, TypeError) as exc:
            self.flag(label, f"is not a valid policy entry ({exc}); the caps before it stay")
            return
        previous, where = self.policy, f"policy entry {self.policy_entry}"
        if previous is None and change.previous is not None:
            self.flag(
                label,
                f"replaces the policy of entry {change.previous_entry}, but no policy entry "
                "comes before it (policy entries were deleted or the history was edited)",
            )
        elif previous is not None and (
            change.previous is None
            or change.previous_entry != self.policy_entry
            or policy_record(change.previous) != policy_record(previous)
        ):
            self.flag(
                label,
                f"does not record the policy it replaces ({where}) as it was: the policy "
                "history was edited",
            )
        found = loosenings(previous, change.policy) if previous is not None else ()
        recorded = [item.to_json() for item in change.loosened]
        if recorded != [item.to_json() for item in found]:
            self.flag(
                label,
                f"records its loosening as {[str(i) for i in change.loosened] or 'none'}, but "
                f"against {where} it loosens {[str(i) for i in found] or 'nothing'}",
            )
        if found and not (change.override or "").strip():
            self.flag(
                label,
                f"loosens the budget policy of {where} ({'; '.join(str(i) for i in found)}) "
                "without a custodian's override reason",
            )
        self.notes.append(
            PolicyNote(
                entry=label,
                time=str(body.get("time")),
                policy=summary(change.policy),
                first=previous is None,
                loosened=[str(i) for i in found],
                override=change.override if found else None,
            )
        )
        self.policy, self.policy_entry = change.policy, label

    # query entries ----------------------------------------------------------------------

    def caps(
        self,
        label: int,
        analyst: str,
        caps: dict[str, Any],
        delta: float,
        when: datetime,
    ) -> tuple[str, float | None]:
        """Check the caps an entry records; returns its period key and the per-query cap."""
        key = self._period(label, caps, when)
        p = self.policy
        if p is None:
            return key, number(caps.get("max_rho_per_query"))
        where = f"the policy in force (entry {self.policy_entry})"
        expected: dict[str, object] = {
            "period": p.period,
            "total_rho": p.total_rho,
            "max_rho_per_query": p.max_rho_per_query,
            "analyst_rho": p.analyst_cap(analyst),
            "lifetime_rho": p.lifetime_cap,
            "analyst_lifetime_rho": p.analyst_lifetime_cap(analyst),
            "policy": self.policy_entry,
        }
        for name, want in expected.items():
            got = caps.get(name)
            if got != want or isinstance(got, bool):
                self.flag(label, f"records caps.{name} as {got!r}, but {where} has {want!r}")
        if delta != p.delta:
            self.flag(label, f"records delta {delta:g}, but {where} has {p.delta:g}")
        return key, p.max_rho_per_query

    def _period(self, label: int, caps: dict[str, Any], when: datetime) -> str:
        start, end = caps.get("period_start"), caps.get("period_end")
        try:
            want = period_bounds(str(caps.get("period")), when)
        except ConfigError:
            self.flag(label, f"unknown budget period {caps.get('period')!r}")
            return str(start or "")
        expected = tuple(d.isoformat() if d is not None else None for d in want)
        if (start, end) != expected:
            self.flag(
                label,
                f"its budget period {start} to {end} does not contain its time "
                f"(a {caps.get('period')} period would be {expected[0]} to {expected[1]})",
            )
        return str(start or "")

    def spend(
        self,
        label: int,
        analyst: str,
        when: datetime,
        rho: float,
        key: str,
        caps: dict[str, Any],
        spent: dict[str, Any],
    ) -> None:
        """Count a release (rho 0 for a refusal), then check the sums against the caps."""
        if rho:
            self.tally.add(when, analyst, rho)
        if self.policy is None:
            self.total[key] += rho
            self.by_analyst[key, analyst] += rho
            self._recorded_totals(label, key, analyst, caps, spent)
            return
        p, n = self.policy, self.policy_entry
        start = period_bounds(p.period, when)[0]
        period, life = self.tally.since(start), self.tally.life
        span = f"the period from {start.isoformat()}" if start is not None else "the ledger"
        limits: list[tuple[str, float, float | None]] = [
            (f"the node's spend in {span}", period.total, p.total_rho),
            (f"{analyst}'s spend in {span}", period.of(analyst), p.analyst_cap(analyst)),
            ("the node's spend since the ledger began", life.total, p.lifetime_cap),
            (
                f"{analyst}'s spend since the ledger began",
                life.of(analyst),
                p.analyst_lifetime_cap(analyst),
            ),
        ]
        for what, amount, cap in limits:
            if cap is not None and cap_exceeded(amount, cap):
                self.flag(
                    label,
                    f"{what} reaches {amount:.12g}, above the cap of {cap:g} in force "
                    f"(policy entry {n})",
                )
        for name, amount in (
            ("period_rho", period.total),
            ("analyst_rho", period.of(analyst)),
            ("lifetime_rho", life.total),
            ("analyst_lifetime_rho", life.of(analyst)),
        ):
            recorded = number(spent.get(name))
            if recorded is None or not close(recorded, amount):
                self.flag(
                    label,
                    f"records spent.{name} as {recorded} but the ledger sums to {amount:.12g}",
                )

    def _recorded_totals(
        self, label: int, key: str, analyst: str, caps: dict[str, Any], spent: dict[str, Any]
    ) -> None:
        """Before any policy entry: the sums by recorded period against the recorded caps."""
        total, mine = self.total[key], self.by_analyst[key, analyst]
        total_cap, analyst_cap = number(caps.get("total_rho")), number(caps.get("analyst_rho"))
        period = f"the period from {key}" if key else "the ledger"
        if total_cap is None or cap_exceeded(total, total_cap):
            self.flag(
                label,
                f"the node's spend in {period} reaches {total:.12g}, above the cap of "
                f"{total_cap} in force",
            )
        if analyst_cap is not None and cap_exceeded(mine, analyst_cap):
            self.flag(
                label,
                f"{analyst}'s spend in {period} reaches {mine:.12g}, above their cap of "
                f"{analyst_cap:g} in force",
            )
        recorded_total, recorded_mine = (
            number(spent.get("period_rho")),
            number(spent.get("analyst_rho")),
        )
        if recorded_total is None or not close(recorded_total, total):
            self.flag(
                label,
                f"records a period spend of {recorded_total} but the ledger sums to {total:.12g}",
            )
        if recorded_mine is None or not close(recorded_mine, mine):
            self.flag(
                label,
                f"records {analyst}'s spend as {recorded_mine} but the ledger sums to {mine:.12g}",
            )
