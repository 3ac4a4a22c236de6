"""Spend arithmetic over a ledger: rho released in total and by analyst, by UTC day.

The node (charging a query) and the verifier (re-adding a ledger) fold the same entries
through this tally, so the sums a cap is checked against are computed once, the same way,
on both sides. Separate from the cap checks (protocols/budget/rules.py) because it knows
nothing of caps: only of days, periods and who spent what.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from protocols.budget.policy import BudgetPolicy, period_bounds


@dataclass
class Spend:
    """rho released: in total and by analyst."""

    total: float = 0.0
    analysts: dict[str, float] = field(default_factory=dict)

    def add(self, analyst: str, rho: float) -> None:
        """Count one release."""
        self.total += rho
        self.analysts[analyst] = self.analysts.get(analyst, 0.0) + rho

    def of(self, analyst: str | None) -> float:
        """The total, or one analyst's share."""
        return self.total if analyst is None else self.analysts.get(analyst, 0.0)


class SpendTally:
    """Released rho by UTC day, so any budget period's spend, and the life's, can be summed.

    A period's spend is every release whose time falls in it, whatever period setting was in
    force when it was charged, so a change of `period` never forgets spend. Entries arrive in
    time order, so the periods asked about only start later, except after a change of period;
    the current one's sum is kept and recomputed only when its start changes.
    """

    def __init__(self) -> None:
        self._days: dict[date, Spend] = {}
        self.life = Spend()
        self._window: tuple[date, Spend] | None = None

    def add(self, when: datetime, analyst: str, rho: float) -> None:
        """Count one release at `when`."""
        day = when.astimezone(UTC).date()
        self._days.setdefault(day, Spend()).add(analyst, rho)
        self.life.add(analyst, rho)
        if self._window is not None and day >= self._window[0]:
            self._window[1].add(analyst, rho)

    def since(self, start: date | None) -> Spend:
        """Everything released from `start` on (None: since the ledger began)."""
        if start is None:
            return self.life
        if self._window is None or self._window[0] != start:
            spend = Spend()
            for day, daily in self._days.items():
                if day >= start:
                    spend.total += daily.total
                    for who, rho in daily.analysts.items():
                        spend.analysts[who] = spend.analysts.get(who, 0.0) + rho
            self._window = (start, spend)
        return self._window[1]

    def period(self, policy: BudgetPolicy, when: datetime) -> Spend:
        """Spend in the policy's budget period containing `when`."""
        return self.since(period_bounds(policy.period, when)[0])
