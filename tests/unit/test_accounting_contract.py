"""The Accountant contract, run against every implementation (Flower's state pattern).

MemoryAccountant and SqliteLedger must agree on caps, periods, refusals, sequence numbers,
the entry format and serialised charging; lifetime caps and the policy entry are in
test_accounting_lifetime.py, SQLite-only behaviour in test_ledger.py.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator.audit.verification import verify
from node.budget.accounting import Charge
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import canonical_json, entry_hash
from queries.errors import BudgetExceededError, QueryError
from tests.unit._accounting_helpers import (
    KINDS,
    Clock,
    Factory,
    Pki,
    accountants,
    make_pki,
    query_entries,
    refusal,
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


POLICY = BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5)


def test_fresh_status(make: Factory) -> None:
    a = make(BudgetPolicy(total_rho=2.0, max_rho_per_query=0.5, delta=1e-5))
    s = a.status()
    assert (s.rho_total, s.rho_spent, s.rho_remaining, s.max_rho_per_query, s.delta) == (
        2.0,
        0.0,
        2.0,
        0.5,
        1e-5,
    )
    assert a.spent() == 0.0
    assert a.lifetime_spent() == 0.0
    assert query_entries(a) == []
    assert len(a.public_key) == 32


@pytest.mark.parametrize("rho", [0.0, -0.1, math.nan, math.inf, -math.inf])
def test_a_rho_that_is_not_positive_and_finite_is_refused(make: Factory, rho: float) -> None:
    a = make(POLICY)
    with pytest.raises(QueryError, match="positive finite"):
        a.check("alice", rho)
    charge = Charge("q", "alice", b"{}", b"", ("persons",), rho, 0.0)
    with pytest.raises(QueryError):
        a.charge(charge)
    assert query_entries(a) == []


def test_per_query_cap(make: Factory, pki: Pki) -> None:
    a = make(POLICY)
    a.check("alice", 0.5)
    with pytest.raises(QueryError, match="per-query cap") as info:
        a.check("alice", 0.5000001)
    assert not isinstance(info.value, BudgetExceededError)
    with pytest.raises(QueryError, match="per-query cap"):
        a.charge(signed_charge(pki.alice, 0.6))
    assert a.spent() == 0.0


def test_charges_add_up_stop_at_the_total_and_a_refused_charge_records_nothing(
    make: Factory, pki: Pki
) -> None:
    a = make(POLICY)
    status, first = a.charge(signed_charge(pki.alice, 0.25))
    assert (status.rho_spent, first) == (0.25, 2)  # entry 1 is the ledger's policy
    status, second = a.charge(signed_charge(pki.bob, 0.5))
    assert second == 3
    assert status.rho_spent == pytest.approx(0.75)
    a.check("alice", 0.25)
    with pytest.raises(BudgetExceededError, match=r"remaining budget of 0\.25"):
        a.check("alice", 0.26)
    with pytest.raises(BudgetExceededError, match="remaining budget"):
        a.charge(signed_charge(pki.alice, 0.3))
    assert len(query_entries(a)) == 2
    a.charge(signed_charge(pki.alice, 0.25))
    assert a.status().rho_remaining == pytest.approx(0.0)
    assert (a.spent(), a.spent("alice"), a.spent("bob")) == pytest.approx((1.0, 0.5, 0.5))


def test_per_analyst_caps_default_and_override(make: Factory, pki: Pki) -> None:
    policy = BudgetPolicy(
        total_rho=1.0, max_rho_per_query=0.5, analyst_rho=0.3, analysts=(("alice", 0.6),)
    )
    a = make(policy)
    a.charge(signed_charge(pki.bob, 0.3))
    with pytest.raises(BudgetExceededError, match="bob's remaining budget at this node of 0"):
        a.check("bob", 0.01)
    with pytest.raises(BudgetExceededError, match=r"a cap of 0\.3 per analyst"):
        a.charge(signed_charge(pki.bob, 0.01))
    a.charge(signed_charge(pki.alice, 0.5))
    with pytest.raises(BudgetExceededError, match="alice's remaining budget"):
        a.charge(signed_charge(pki.alice, 0.2))
    a.charge(signed_charge(pki.alice, 0.1))
    assert a.spent() == pytest.approx(0.9)
    mine = a.status("alice")
    assert (mine.rho_spent, mine.rho_remaining) == pytest.approx((0.6, 0.0))
    # The node's total binds before carol's own default cap of 0.3 does.
    carol = a.status("carol")
    assert (carol.rho_spent, carol.rho_remaining, carol.rho_total) == pytest.approx((0, 0.1, 0.1))
    assert a.status().rho_spent == pytest.approx(0.9)


def test_budget_periods_reset_spend_at_the_uk_financial_year(make: Factory, pki: Pki) -> None:
    clock = Clock(datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC))
    a = make(POLICY, clock)
    a.charge(signed_charge(pki.alice, 0.5))
    a.charge(signed_charge(pki.alice, 0.5))
    with pytest.raises(BudgetExceededError, match="2025-04-01 to 2026-03-31"):
        a.check("alice", 0.1)
    clock.when = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)
    assert a.spent() == 0.0
    a.charge(signed_charge(pki.alice, 0.5))
    bodies = [json.loads(e.body) for e in query_entries(a)]
    assert [b["caps"]["period_start"] for b in bodies] == ["2025-04-01"] * 2 + ["2026-04-01"]
    assert [b["spent"]["period_rho"] for b in bodies] == [0.5, 1.0, 0.5]
    # The lifetime spend does not reset with the period.
    assert [b["spent"]["lifetime_rho"] for b in bodies] == [0.5, 1.0, 1.5]
    assert a.lifetime_spent() == 1.5
    # The envelopes were signed today, long after this clock: the verifier notices.
    problems = {x.problem for x in verify(source_of(a)).anomalies}
    assert problems == {"was charged before the analyst signed the query"}


@pytest.mark.parametrize(
    ("period", "later", "reset"),
    [
        ("calendar-year", datetime(2027, 1, 1, tzinfo=UTC), True),
        ("calendar-year", datetime(2026, 12, 31, tzinfo=UTC), False),
        ("none", datetime(2040, 1, 1, tzinfo=UTC), False),
    ],
)
def test_other_periods(make: Factory, pki: Pki, period: str, later: datetime, reset: bool) -> None:
    clock = Clock(datetime(2026, 6, 1, tzinfo=UTC))
    a = make(BudgetPolicy(total_rho=1.0, max_rho_per_query=1.0, period=period), clock)
    a.charge(signed_charge(pki.alice, 1.0))
    clock.when = later
    assert a.spent() == (0.0 if reset else 1.0)


def test_refusals_are_recorded_at_zero_cost(make: Factory, pki: Pki) -> None:
    a = make(POLICY)
    a.refuse(refusal())
    _, sequence = a.charge(signed_charge(pki.alice, 0.2))
    a.refuse(refusal("mallory", "the query's signature does not match its contents"))
    assert sequence == 3
    assert a.spent() == pytest.approx(0.2)
    bodies = [json.loads(e.body) for e in query_entries(a)]
    assert [b["outcome"] for b in bodies] == ["refused", "released", "refused"]
    assert [b["rho"] for b in bodies] == [0.0, 0.2, 0.0]
    assert bodies[2]["reason"] == "the query's signature does not match its contents"
    assert bodies[2]["code"] == "INVALID_ARGUMENT"
    assert bodies[2]["spent"] == {
        "period_rho": 0.2,
        "analyst_rho": 0.0,
        "lifetime_rho": 0.2,
        "analyst_lifetime_rho": 0.0,
    }


def test_entries_follow_the_documented_format(make: Factory, pki: Pki) -> None:
    a = make(BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5, analyst_rho=0.8))
    charge = signed_charge(pki.alice, 0.125, view="copd")
    a.charge(charge)
    a.refuse(refusal())
    policy_entry, *entries = list(a.entries())
    first, second = (json.loads(e.body) for e in entries)
    assert set(first) == {
        "record",
        "format",
        "sequence",
        "time",
        "node",
        "analyst",
        "query_id",
        "query",
        "query_sha256",
        "envelope",
        "views",
        "rho",
        "epsilon",
        "delta",
        "outcome",
        "reason",
        "code",
        "caps",
        "spent",
        "prev_hash",
    }
    assert entries[0].body == canonical_json(first)
    assert first["node"] == "test"
    assert first["query_id"] == charge.query_id
    assert first["query"].encode() == charge.query
    assert first["views"] == ["copd"]
    assert first["caps"] == {
        "period": "financial-year",
        "period_start": first["caps"]["period_start"],
        "period_end": first["caps"]["period_end"],
        "total_rho": 1.0,
        "max_rho_per_query": 0.5,
        "analyst_rho": 0.8,
        "lifetime_rho": 5.0,  # not configured: five periods' worth
        "analyst_lifetime_rho": 4.0,
        "policy": 1,
    }
    assert first["spent"] == {
        "period_rho": 0.125,
        "analyst_rho": 0.125,
        "lifetime_rho": 0.125,
        "analyst_lifetime_rho": 0.125,
    }
    assert first["prev_hash"] == entry_hash(policy_entry.body, policy_entry.signature)
    assert second["prev_hash"] == entry_hash(entries[0].body, entries[0].signature)
    assert first["time"].endswith("Z")
    assert len(first["time"]) == len("2026-01-01T00:00:00.000Z")
    assert [e.sequence for e in a.entries(3)] == [3]
    *rest, head = list(a.stream())
    assert head.head
    assert not any(e.head for e in rest)
    assert json.loads(head.body)["sequence"] == 3
    assert json.loads(head.body)["hash"] == entry_hash(entries[1].body, entries[1].signature)


def test_an_auditor_can_verify_everything_recorded(make: Factory, pki: Pki) -> None:
    a = make(BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5, analyst_rho=0.6))
    for who in (pki.alice, pki.bob, pki.alice):
        a.charge(signed_charge(who, 0.2))
    a.refuse(refusal())
    with pytest.raises(BudgetExceededError):
        a.charge(signed_charge(pki.alice, 0.3))
    result = verify(source_of(a), ca_pem=pki.ca_pem)
    assert result.ok, [str(x) for x in result.anomalies]
    assert (result.entries, result.released, result.refused) == (5, 3, 1)
    assert [(p.entry, p.first, p.loosened) for p in result.policies] == [(1, True, [])]
    assert result.rho_released == pytest.approx(0.6)


def test_times_never_go_backwards(make: Factory, pki: Pki) -> None:
    clock = Clock(datetime(2026, 6, 1, 12, tzinfo=UTC))
    a = make(POLICY, clock)
    a.charge(signed_charge(pki.alice, 0.1))
    clock.when -= timedelta(hours=1)  # NTP stepped the clock back
    a.refuse(refusal())
    times = [json.loads(e.body)["time"] for e in a.entries()]
    assert times == ["2026-06-01T12:00:00.000Z"] * 3  # the policy entry, then the two


def test_charges_are_serialised_under_threads(make: Factory, pki: Pki) -> None:
    """40 threads charge 0.3 against a total of 10 (per-query cap 0.5): exactly 33 fit."""
    a = make(BudgetPolicy(total_rho=10.0, max_rho_per_query=0.5))
    charges = [signed_charge(pki.alice if i % 2 else pki.bob, 0.3) for i in range(40)]
    start = threading.Barrier(len(charges))
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(charge: Charge) -> None:
        start.wait()
        try:
            a.charge(charge)
        except BudgetExceededError:
            outcome = "refused"
        else:
            outcome = "released"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(c,)) for c in charges]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcomes.count("released") == 33
    assert outcomes.count("refused") == 7
    assert a.spent() == pytest.approx(9.9)
    assert a.spent() <= 10.0
    entries = query_entries(a)
    assert [e.sequence for e in entries] == list(range(2, 35))
    assert verify(source_of(a), ca_pem=pki.ca_pem).ok
