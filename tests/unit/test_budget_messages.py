"""Budget refusals never print the asked rho and the limit it broke as the same number.

Issue 10, item 8: `:g` keeps six digits, so `--rho 1.0000001` read "rho 1 is above the cap of
1". Every budget message (per-query cap, remaining budget, per-analyst, lifetime, a policy
loosening) now formats its numbers together (queries/numbers.py); these tests ask
for rhos within 1e-7 of each limit, and for subnormals, which `:g` printed as "9.99989e-321".
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.budget.changes import Loosening, summary
from protocols.budget.policy import BudgetPolicy
from protocols.budget.rules import budget_refusal, cap_exceeded, per_query_refusal
from protocols.budget.tally import SpendTally
from queries.errors import BudgetExceededError, QueryError
from queries.numbers import show, show_apart

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=3 * 365)  # in an earlier period of every kind


def refusal(policy: BudgetPolicy, spends: list[tuple[datetime, str, float]], rho: float) -> str:
    tally = SpendTally()
    for when, who, amount in spends:
        tally.add(when, who, amount)
    error = budget_refusal(policy, tally, "alice", rho, NOW)
    assert error is not None, "expected a refusal"
    return str(error)


# ---- each message, asked 1e-7 above its limit ----------------------------------------------


def test_per_query_cap() -> None:
    error = per_query_refusal(BudgetPolicy(max_rho_per_query=0.3), 0.3000001)
    assert isinstance(error, QueryError)
    assert str(error) == (
        "rho 0.3000001 is above this node's per-query cap of 0.3; ask for at most 0.3"
    )


def test_remaining_budget_of_the_node() -> None:
    policy = BudgetPolicy(total_rho=10.0, max_rho_per_query=1.0, period="calendar-year")
    message = refusal(policy, [(NOW, "bob", 9.5)], 0.5000001)
    assert message == (
        "rho 0.5000001 exceeds this node's remaining budget of 0.5 in the budget period "
        "2026-01-01 to 2026-12-31 (9.5 of its cap of 10 spent)"
    )


def test_remaining_budget_of_the_analyst() -> None:
    policy = BudgetPolicy(analyst_rho=2.0, period="calendar-year")
    message = refusal(policy, [(NOW, "alice", 1.25)], 0.7500001)
    assert message == (
        "rho 0.7500001 exceeds alice's remaining budget at this node of 0.75 (a cap of 2 per "
        "analyst in the budget period 2026-01-01 to 2026-12-31, 1.25 spent)"
    )


def test_remaining_lifetime_budget_of_the_node() -> None:
    policy = BudgetPolicy(total_rho=10.0, lifetime_rho=12.0, period="calendar-year")
    message = refusal(policy, [(LONG_AGO, "bob", 11.9)], 0.1000001)
    assert message.startswith(
        "rho 0.1000001 exceeds this node's remaining lifetime budget of 0.1 "
        "(budget.lifetime_rho: a cap of 12 over the node's life"
    )
    assert message.endswith("; 11.9 spent since its ledger began)")


def test_remaining_lifetime_budget_of_the_analyst() -> None:
    policy = BudgetPolicy(analyst_rho=1.0, analyst_lifetime_rho=1.5, period="calendar-year")
    message = refusal(policy, [(LONG_AGO, "alice", 1.0)], 0.5000001)
    assert message == (
        "rho 0.5000001 exceeds alice's remaining lifetime budget at this node of 0.5 (a "
        "lifetime cap of 1.5 per analyst, whatever the period; 1 spent since the ledger began)"
    )


def test_a_loosening_by_1e_7_reads_as_one() -> None:
    assert str(Loosening("budget.total_rho", 1.0, 1.0000001)) == (
        "budget.total_rho from 1 to 1.0000001"
    )


def test_round_numbers_still_print_as_g_did() -> None:
    # The usual messages must not grow digits: six significant digits when they suffice.
    assert show_apart(0.1, 0.30000000000000004, 10.0, 1e-6) == ("0.1", "0.3", "10", "1e-06")
    assert summary(BudgetPolicy()) == (
        "node 10 per financial-year and 50 over its life, at most 1 per query "
        "(zCDP rho; delta 1e-06)"
    )


# ---- subnormals print as they were typed ---------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [(1e-320, "1e-320"), (5e-324, "5e-324")])
def test_a_subnormal_prints_as_typed(value: float, text: str) -> None:
    assert f"{value:g}" != text  # the reason for show(): :g prints 9.99989e-321
    assert show(value) == text


def test_refusals_print_subnormals_readably() -> None:
    tiny = BudgetPolicy(total_rho=3e-320, max_rho_per_query=2e-320, period="calendar-year")
    per_query = per_query_refusal(tiny, 4e-320)
    assert str(per_query) == (
        "rho 4e-320 is above this node's per-query cap of 2e-320; ask for at most 2e-320"
    )
    message = refusal(tiny, [(NOW, "bob", 2e-320)], 2e-320)
    assert message.startswith("rho 2e-320 exceeds this node's remaining budget of 1e-320 ")
    assert message.endswith("(2e-320 of its cap of 3e-320 spent)")


# ---- any refusal, any numbers --------------------------------------------------------------

ASKED_AND_LEFT = re.compile(r"^rho (\S+) exceeds this node's remaining budget of (\S+) ")
caps = st.floats(min_value=1e-6, max_value=1e6)


@given(
    cap=caps,
    spent_share=st.floats(min_value=0.0, max_value=1.0),
    above=st.floats(min_value=1e-15, max_value=1e-3),
)
def test_a_refused_rho_never_prints_as_the_room_it_broke(
    cap: float, spent_share: float, above: float
) -> None:
    spent = cap * spent_share
    room = max(0.0, cap - spent)
    rho = room * (1 + above) + cap * 2e-9  # just past the rounding tolerance
    policy = BudgetPolicy(total_rho=cap, max_rho_per_query=cap * 2, period="calendar-year")
    tally = SpendTally()
    tally.add(NOW, "bob", spent)
    error = budget_refusal(policy, tally, "alice", rho, NOW)
    if not cap_exceeded(spent + rho, cap):
        return  # float rounding left it within the cap: nothing to print
    assert isinstance(error, BudgetExceededError)
    match = ASKED_AND_LEFT.match(str(error))
    assert match is not None, str(error)
    asked, left = match.groups()
    assert asked != left
    # Each text is the number it stands for, rounded to at least six digits as `:g` was.
    assert float(asked) == pytest.approx(rho, rel=1e-5)
    assert float(left) == pytest.approx(room, rel=1e-5, abs=1e-300)
