"""Issue 10, item 8: a budget refusal must tell the asked rho apart from the cap it broke.

The issue quoted `--rho 1.0000001` printing "rho 1 is above the cap of 1": with `:g` the two
numbers print alike, so the message contradicts itself. Every budget message now formats its
numbers together (queries/numbers.py); tests/unit/test_budget_messages.py covers each.
"""

from __future__ import annotations

from datetime import UTC, datetime

from protocols.budget.policy import BudgetPolicy
from protocols.budget.rules import budget_refusal, per_query_refusal
from protocols.budget.tally import SpendTally

POLICY = BudgetPolicy(total_rho=10.0, max_rho_per_query=1.0)


def test_a_rho_just_above_the_per_query_cap_is_printed_apart_from_the_cap() -> None:
    error = per_query_refusal(POLICY, 1.0000001)
    assert error is not None
    message = str(error)
    assert "rho 1.0000001 is above" in message
    assert "cap of 1;" in message


def test_a_rho_within_float_rounding_of_the_cap_is_not_refused() -> None:
    # The tolerance that lets 1 + 1e-12 through must not swallow 1.0000001 (above).
    assert per_query_refusal(POLICY, 1.0 + 1e-12) is None


def test_a_rho_just_above_the_remaining_budget_is_printed_apart_from_it() -> None:
    now = datetime.now(UTC)
    tally = SpendTally()
    tally.add(now, "alice", 9.5)
    error = budget_refusal(POLICY, tally, "bob", 0.5000001, now)
    assert error is not None
    assert "rho 0.5000001 exceeds this node's remaining budget of 0.5 " in str(error)
