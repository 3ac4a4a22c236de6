"""Budget decisions shared by node and verifier: cap checks, refusals and budget status.

Given the policy in force (a ledger's policy entry, protocols/budget/changes.py) and the
spend so far (protocols/budget/tally.py), these say whether a charge fits every cap and, if
not, which cap refuses it and why, and what an analyst or the node can still spend. The
node calls them before charging a query and the verifier (coordinator/audit/) when it
re-checks every entry, so both refuse with the same rule and the same tolerance.
"""

from __future__ import annotations

import math
from datetime import date, datetime

from protocols.budget.policy import BudgetPolicy, as_number
from protocols.budget.tally import SpendTally
from queries.errors import BudgetExceededError, ChcError, QueryError
from queries.numbers import show_apart
from queries.results import BudgetStatus

# Relative slack when a sum of float rhos is compared with a cap: the same fold runs at the
# node and in the verifier, so this only absorbs rounding (1e-9 of a cap is never a release).
CAP_TOLERANCE = 1e-9


def cap_exceeded(amount: float, cap: float) -> bool:
    """Whether a (summed) rho is above a cap, allowing only for float rounding."""
    return amount > cap * (1 + CAP_TOLERANCE)


# ---- decisions ----------------------------------------------------------------------------


def _period_label(policy: BudgetPolicy, when: datetime) -> str:
    start, end = policy.period_of(when)
    if start is None or end is None:
        return ""
    last = date.fromordinal(end.toordinal() - 1)
    return f" in the budget period {start.isoformat()} to {last.isoformat()}"


def per_query_refusal(policy: BudgetPolicy, rho: float) -> QueryError | None:
    """Why a query asking for rho is refused whatever has been spent, or None if it may ask.

    Needs only the public per-query cap, so a node checks it before planning or calibrating.
    """
    if as_number(rho) is None or not (math.isfinite(rho) and rho > 0):
        return QueryError(f"rho must be a positive finite number, got {rho!r}")
    if cap_exceeded(rho, policy.max_rho_per_query):
        asked, cap = show_apart(rho, policy.max_rho_per_query)
        return QueryError(
            f"rho {asked} is above this node's per-query cap of {cap}; ask for at most {cap}"
        )
    return None


def budget_refusal(
    policy: BudgetPolicy, tally: SpendTally, analyst: str, rho: float, when: datetime
) -> ChcError | None:
    """Why a charge of rho by analyst at `when` must be refused, or None if it fits.

    Of the caps it would break, the message names the one with the least room left (the
    lifetime one on a tie: waiting for the next period does not help there).
    """
    p = policy
    error = per_query_refusal(p, rho)
    if error is not None:
        return error
    period, life = tally.period(p, when), tally.life
    broken: list[tuple[float, int, str]] = []

    def test(cap: float | None, spent: float, lifetime: bool, message: str) -> None:
        if cap is not None and cap_exceeded(spent + rho, cap):
            broken.append((max(0.0, cap - spent), 0 if lifetime else 1, message))

    room = max(0.0, p.total_rho - period.total)
    asked, left, spent, limit = show_apart(rho, room, period.total, p.total_rho)
    test(
        p.total_rho,
        period.total,
        False,
        f"rho {asked} exceeds this node's remaining budget of {left}"
        f"{_period_label(p, when)} ({spent} of its cap of {limit} spent)",
    )
    cap = p.analyst_cap(analyst)
    mine = period.of(analyst)
    if cap is not None:
        asked, left, limit, spent = show_apart(rho, max(0.0, cap - mine), cap, mine)
        test(
            cap,
            mine,
            False,
            f"rho {asked} exceeds {analyst}'s remaining budget at this node of {left} (a cap "
            f"of {limit} per analyst{_period_label(p, when)}, {spent} spent)",
        )
    cap = p.lifetime_cap
    asked, left, limit, spent = show_apart(rho, max(0.0, cap - life.total), cap, life.total)
    test(
        cap,
        life.total,
        True,
        f"rho {asked} exceeds this node's remaining lifetime budget of {left} "
        f"(budget.lifetime_rho: a cap of {limit} over the node's life, whatever the period; "
        f"{spent} spent since its ledger began)",
    )
    cap = p.analyst_lifetime_cap(analyst)
    mine = life.of(analyst)
    if cap is not None:
        asked, left, limit, spent = show_apart(rho, max(0.0, cap - mine), cap, mine)
        test(
            cap,
            mine,
            True,
            f"rho {asked} exceeds {analyst}'s remaining lifetime budget at this node of "
            f"{left} (a lifetime cap of {limit} per analyst, whatever the period; {spent} "
            "spent since the ledger began)",
        )
    if not broken:
        return None
    return BudgetExceededError(min(broken)[2])


def budget_status(
    policy: BudgetPolicy, tally: SpendTally, when: datetime, analyst: str | None = None
) -> BudgetStatus:
    """The node's budget in the period; for an analyst, what that analyst can still spend.

    rho_spent is the spend in the current period; rho_remaining what every cap (period and
    lifetime) still allows, so rho_total is the period cap unless a lifetime cap leaves less.
    """
    p = policy
    period, life = tally.period(p, when), tally.life
    room = max(0.0, p.total_rho - period.total)
    life_room = max(0.0, p.lifetime_cap - life.total)
    node = BudgetStatus(
        rho_total=p.total_rho if room <= life_room else period.total + life_room,
        rho_spent=period.total,
        max_rho_per_query=p.max_rho_per_query,
        delta=p.delta,
    )
    if analyst is None:
        return node
    mine = period.of(analyst)
    room = min(room, life_room)
    for cap, spent in (
        (p.analyst_cap(analyst), mine),
        (p.analyst_lifetime_cap(analyst), life.of(analyst)),
    ):
        if cap is not None:
            room = min(room, max(0.0, cap - spent))
    return BudgetStatus(
        rho_total=mine + room,
        rho_spent=mine,
        max_rho_per_query=p.max_rho_per_query,
        delta=p.delta,
    )
