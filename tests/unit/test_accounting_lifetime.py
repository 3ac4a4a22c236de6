"""The Accountant contract, continued: lifetime caps and the ledger's policy entry.

Run against every implementation, like test_accounting_contract.py: the node's and each
analyst's caps over the node's life hold across budget periods, the cap with least room is
the one a refusal names, and the verifier finds nothing to say about what was charged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coordinator.audit.verification import verify
from node.budget.accounting import Accountant
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import ZERO_HASH, canonical_json
from queries.errors import BudgetExceededError
from tests.unit._accounting_helpers import (
    KINDS,
    Clock,
    Factory,
    Pki,
    accountants,
    make_pki,
    query_entries,
    signed_charge,
    source_of,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Build the implementation under test with a policy (and optionally a clock)."""
    with accountants(request.param, tmp_path) as factory:
        yield factory


# ---- lifetime caps and the policy entry ------------------------------------------------------

# What the verifier says about envelopes charged at a test clock far from when they were signed.
ENVELOPE_TIMES = {
    "was charged before the analyst signed the query",
    "was charged long after the analyst's envelope expired",
}


def budget_problems(accountant: Accountant, pki: Pki) -> list[str]:
    """Every anomaly the verifier finds, but for envelopes signed at another time than charged."""
    result = verify(source_of(accountant), ca_pem=pki.ca_pem)
    return [str(x) for x in result.anomalies if x.problem not in ENVELOPE_TIMES]


def test_a_new_ledger_starts_with_its_policy_entry(make: Factory, pki: Pki) -> None:
    policy = BudgetPolicy(
        total_rho=1.0,
        max_rho_per_query=0.5,
        analyst_rho=0.4,
        analysts=(("alice", 0.6),),
        analysts_lifetime=(("bob", 0.9),),
    )
    a = make(policy)
    (entry,) = list(a.entries())
    body = json.loads(entry.body)
    assert entry.body == canonical_json(body)
    assert body == {
        "record": "chc.ledger.policy",
        "format": 1,
        "sequence": 1,
        "time": body["time"],
        "node": "test",
        # Every default is written out: lifetime caps are five periods' worth.
        "policy": {
            "total_rho": 1.0,
            "max_rho_per_query": 0.5,
            "delta": 1e-6,
            "period": "financial-year",
            "analyst_rho": 0.4,
            "analysts": {"alice": 0.6},
            "lifetime_rho": 5.0,
            "analyst_lifetime_rho": 2.0,
            "analysts_lifetime": {"alice": 3.0, "bob": 0.9},
        },
        "previous": None,
        "previous_entry": None,
        "loosened": [],
        "override": None,
        "prev_hash": ZERO_HASH,
    }
    assert a.policy == policy.resolved()
    a.charge(signed_charge(pki.bob, 0.1))
    caps = json.loads(query_entries(a)[0].body)["caps"]
    assert (caps["policy"], caps["lifetime_rho"], caps["analyst_lifetime_rho"]) == (1, 5.0, 0.9)
    assert verify(source_of(a), ca_pem=pki.ca_pem).ok


def test_the_node_lifetime_cap_spans_budget_periods(make: Factory, pki: Pki) -> None:
    clock = Clock(datetime(2025, 6, 1, tzinfo=UTC))
    a = make(BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5, lifetime_rho=1.6), clock)
    a.charge(signed_charge(pki.alice, 0.5))
    a.charge(signed_charge(pki.bob, 0.5))
    clock.when = datetime(2026, 6, 1, tzinfo=UTC)  # a new financial year: the period resets
    assert (a.spent(), a.lifetime_spent(), a.lifetime_spent("bob")) == (0.0, 1.0, 0.5)
    a.charge(signed_charge(pki.alice, 0.5))
    status = a.status()
    assert (status.rho_spent, status.rho_remaining) == pytest.approx((0.5, 0.1))
    # The period has 0.5 left, but the node's life only 0.1: that cap is named.
    message = (
        r"rho 0\.2 exceeds this node's remaining lifetime budget of 0\.1 \(budget\.lifetime_rho: "
        r"a cap of 1\.6 over the node's life, whatever the period; 1\.5 spent since its ledger "
        r"began\)"
    )
    with pytest.raises(BudgetExceededError, match=message) as info:
        a.check("alice", 0.2)
    assert info.value.status_name == "RESOURCE_EXHAUSTED"
    with pytest.raises(BudgetExceededError, match="remaining lifetime budget"):
        a.charge(signed_charge(pki.alice, 0.2))
    assert len(query_entries(a)) == 3  # a refused charge records nothing; refuse() does
    a.charge(signed_charge(pki.alice, 0.1))
    assert a.lifetime_spent() == pytest.approx(1.6)
    assert budget_problems(a, pki) == []


def test_the_default_lifetime_cap_is_five_periods(make: Factory, pki: Pki) -> None:
    """A node configured without a lifetime cap still has a finite one: 5 x total_rho."""
    clock = Clock(datetime(2020, 6, 1, tzinfo=UTC))
    a = make(BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0), clock)
    for year in range(2020, 2025):
        clock.when = datetime(year, 6, 1, tzinfo=UTC)
        a.charge(signed_charge(pki.alice, 1.0))
    clock.when = datetime(2025, 6, 1, tzinfo=UTC)
    assert a.spent() == 0.0
    assert a.status().rho_remaining == 0.0
    with pytest.raises(BudgetExceededError, match=r"a cap of 5 over the node's life.* 5 spent"):
        a.check("alice", 0.01)
    assert budget_problems(a, pki) == []


def test_analyst_lifetime_caps_default_and_override(make: Factory, pki: Pki) -> None:
    clock = Clock(datetime(2025, 6, 1, tzinfo=UTC))
    policy = BudgetPolicy(
        total_rho=10.0,
        max_rho_per_query=1.0,
        analyst_lifetime_rho=0.5,
        analysts_lifetime=(("alice", 1.0),),
    )
    a = make(policy, clock)
    a.charge(signed_charge(pki.bob, 0.5))
    a.charge(signed_charge(pki.alice, 0.5))
    clock.when = datetime(2026, 6, 1, tzinfo=UTC)
    mine = a.status("bob")
    assert (mine.rho_spent, mine.rho_remaining) == (0.0, 0.0)  # nothing this year, nothing left
    with pytest.raises(
        BudgetExceededError,
        match=r"bob's remaining lifetime budget at this node of 0 \(a lifetime cap of 0\.5 per "
        r"analyst, whatever the period; 0\.5 spent since the ledger began\)",
    ):
        a.check("bob", 0.1)
    assert a.status("alice").rho_remaining == pytest.approx(0.5)
    a.charge(signed_charge(pki.alice, 0.5))
    with pytest.raises(BudgetExceededError, match=r"alice's remaining lifetime budget .* of 0 "):
        a.charge(signed_charge(pki.alice, 0.1))
    assert a.status().rho_remaining == pytest.approx(9.5)  # the node itself has room
    assert budget_problems(a, pki) == []


def test_the_cap_with_least_room_is_named(make: Factory, pki: Pki) -> None:
    policy = BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0, analyst_rho=0.8)
    a = make(policy)
    a.charge(signed_charge(pki.alice, 0.7))
    # alice's period cap (0.1 left) binds before the node's (0.3 left).
    with pytest.raises(BudgetExceededError, match=r"^rho 0\.5 exceeds alice's remaining budget"):
        a.check("alice", 0.5)
    with pytest.raises(BudgetExceededError, match=r"^rho 0\.5 exceeds this node's remaining"):
        a.check("bob", 0.5)
