"""Budget enforcement by the in-memory accountant (node.budget.accounting.MemoryAccountant).

Checks against the per-query cap and the remaining budget, charges adding up and stopping at
the total, refused charges spending nothing, atomicity under threads, and the lifetime cap.
"""

from __future__ import annotations

import math
import threading

import pytest

from node.budget.accounting import Charge, MemoryAccountant
from protocols.budget.policy import BudgetPolicy
from queries.errors import BudgetExceededError, QueryError


def charge(rho: float, analyst: str = "alice") -> Charge:
    return Charge(
        query_id="q",
        analyst=analyst,
        query=b"{}",
        envelope=b"",
        views=("persons",),
        rho=rho,
        epsilon=1.0,
    )


def test_fresh_status() -> None:
    accountant = MemoryAccountant(BudgetPolicy(total_rho=2.0, max_rho_per_query=0.5, delta=1e-5))
    status = accountant.status()
    assert (status.rho_total, status.rho_spent, status.rho_remaining) == (2.0, 0.0, 2.0)
    assert status.max_rho_per_query == 0.5
    assert status.delta == 1e-5


def test_check_refuses_over_the_per_query_cap_with_a_query_error() -> None:
    accountant = MemoryAccountant(BudgetPolicy(total_rho=10.0, max_rho_per_query=0.5))
    accountant.check("alice", 0.5)
    with pytest.raises(QueryError, match="per-query cap") as info:
        accountant.check("alice", 0.5000001)
    assert not isinstance(info.value, BudgetExceededError)


def test_check_refuses_over_the_remaining_with_budget_exceeded() -> None:
    accountant = MemoryAccountant(BudgetPolicy(total_rho=1.0, max_rho_per_query=0.6))
    accountant.charge(charge(0.6))
    accountant.check("alice", 0.4)
    with pytest.raises(BudgetExceededError, match="remaining budget"):
        accountant.check("alice", 0.41)
    assert accountant.spent() == pytest.approx(0.6)  # checking spends nothing


def test_charges_add_up_and_stop_at_the_total() -> None:
    accountant = MemoryAccountant(BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0))
    status, first = accountant.charge(charge(0.25, "alice"))
    assert status.rho_spent == pytest.approx(0.25)
    status, second = accountant.charge(charge(0.75, "bob"))
    assert second > first
    assert status.rho_spent == pytest.approx(1.0)
    assert status.rho_remaining == pytest.approx(0.0)
    with pytest.raises(BudgetExceededError):
        accountant.charge(charge(1e-6))
    assert accountant.spent() == pytest.approx(1.0)
    assert accountant.spent("alice") == pytest.approx(0.25)
    assert accountant.spent("bob") == pytest.approx(0.75)


def test_a_refused_charge_spends_nothing() -> None:
    accountant = MemoryAccountant(BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0))
    accountant.charge(charge(0.7))
    with pytest.raises(BudgetExceededError, match="remaining budget"):
        accountant.charge(charge(0.5))
    assert accountant.spent() == pytest.approx(0.7)
    accountant.charge(charge(0.3))
    assert accountant.spent() == pytest.approx(1.0)


@pytest.mark.parametrize("rho", [math.nan, -1.0, -math.inf])
def test_a_charge_that_is_not_a_positive_number_is_refused(rho: float) -> None:
    # BUG: MemoryAccountant.charge only tests `spent + rho > total`. A NaN charge passes (NaN
    # comparisons are false) and makes spent NaN, after which every charge passes; a negative
    # charge silently refunds budget. Refuse any rho that is not finite and > 0 (and do the
    # same in the ledger implementation).
    accountant = MemoryAccountant(BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0))
    accountant.charge(charge(0.5))
    with pytest.raises((ValueError, BudgetExceededError)):
        accountant.charge(charge(rho))
    assert accountant.spent() == pytest.approx(0.5)
    with pytest.raises(BudgetExceededError):
        accountant.charge(charge(0.6))


def test_charges_are_atomic_under_threads() -> None:
    """50 threads charge 0.3 each against a total of 10: exactly 33 fit."""
    accountant = MemoryAccountant(BudgetPolicy(total_rho=10.0, max_rho_per_query=1.0))
    start = threading.Barrier(50)
    ok: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        start.wait()
        try:
            accountant.charge(charge(0.3, f"analyst{i}"))
        except BudgetExceededError:
            with lock:
                refused.append(i)
        else:
            with lock:
                ok.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ok) == 33
    assert len(refused) == 17
    assert accountant.spent() == pytest.approx(9.9)
    assert accountant.spent() <= 10.0
    assert accountant.status().rho_remaining == pytest.approx(0.1)


def test_memory_accountant_refuses_over_the_lifetime_cap() -> None:
    accountant = MemoryAccountant(
        BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0, period="none", lifetime_rho=0.5)
    )
    accountant.charge(charge(0.4))
    with pytest.raises(BudgetExceededError, match=r"remaining lifetime budget of 0\.1"):
        accountant.charge(charge(0.2))
    assert accountant.lifetime_spent() == pytest.approx(0.4)
    assert accountant.status().rho_remaining == pytest.approx(0.1)
