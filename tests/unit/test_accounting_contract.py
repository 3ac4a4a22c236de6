"""The Accountant contract, run against every implementation (Flower's state pattern).

MemoryAccountant and SqliteLedger must agree on caps, periods, refusals, sequence numbers,
the entry format and serialised charging; SQLite-only behaviour is in test_ledger.py.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator.audit import ledgers as audit
from node.budget.accounting import Accountant, Charge, MemoryAccountant, Refusal
from node.budget.ledger import SqliteLedger
from protocols import security, serde
from protocols.budget.policy import BudgetPolicy
from protocols.budget.rules import POLICY_RECORD
from protocols.ledger.entry import ZERO_HASH, SignedEntry, canonical_json, entry_hash
from queries.errors import BudgetExceededError, QueryError
from queries.mechanisms import rho_to_epsilon
from queries.spec import Query, canonical_bytes


@dataclass(frozen=True)
class Pki:
    """A federation CA and two analysts."""

    ca_pem: bytes
    alice: security.Identity
    bob: security.Identity


def make_pki(root: Path) -> Pki:
    """A throwaway federation."""
    security.create_ca(root)
    ids = {
        n: security.load_identity(security.issue(root, role=security.Role.ANALYST, name=n))
        for n in ("alice", "bob")
    }
    return Pki((root / security.CA_FILE).read_bytes(), ids["alice"], ids["bob"])


def signed_charge(identity: security.Identity, rho: float, *, view: str = "persons") -> Charge:
    """A charge exactly as the node builds it, from a real analyst-signed envelope."""
    signed = security.sign_query(identity, canonical_bytes(Query(view=view, rho=rho)))
    envelope = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
    return Charge(
        query_id=f"q-{signed.nonce.hex()[:12]}",
        analyst=identity.name,
        query=signed.query,
        envelope=envelope,
        views=(view,),
        rho=rho,
        epsilon=rho_to_epsilon(rho, 1e-6),
    )


def refusal(analyst: str = "alice", reason: str = "no such view") -> Refusal:
    """A refusal of an unsigned, unparseable request."""
    return Refusal(
        analyst=analyst, query=b"{not json", envelope=b"", reason=reason, code="INVALID_ARGUMENT"
    )


def source_of(accountant: Accountant, label: str = "under test") -> audit.LedgerSource:
    """What an auditor streaming this accountant would read."""
    return audit.LedgerSource(
        label=label,
        node="",
        public_key=accountant.public_key,
        key_origin="the accountant",
        read=lambda: accountant.stream(),
    )


def query_entries(accountant: Accountant) -> list[SignedEntry]:
    """The entries of queries (releases and refusals), without the policy entries."""
    return [e for e in accountant.entries() if json.loads(e.body)["record"] != POLICY_RECORD]


class Clock:
    """A settable clock, so tests can cross budget periods."""

    def __init__(self, when: datetime) -> None:
        self.when = when

    def __call__(self) -> datetime:
        return self.when


Factory = Callable[..., Accountant]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Build the implementation under test with a policy (and optionally a clock)."""
    opened: list[Accountant] = []

    def factory(policy: BudgetPolicy, clock: Callable[[], datetime] | None = None) -> Accountant:
        accountant: Accountant
        if request.param == "memory":
            accountant = MemoryAccountant(policy, node="test", clock=clock)
        else:
            path = tmp_path / f"ledger{len(opened)}.sqlite"
            accountant = SqliteLedger(path, node="test", policy=policy, clock=clock)
        opened.append(accountant)
        return accountant

    yield factory
    for a in opened:
        a.close()


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
    problems = {x.problem for x in audit.verify(source_of(a)).anomalies}
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
    result = audit.verify(source_of(a), ca_pem=pki.ca_pem)
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
    assert audit.verify(source_of(a), ca_pem=pki.ca_pem).ok


# ---- lifetime caps and the policy entry ------------------------------------------------------

# What the verifier says about envelopes charged at a test clock far from when they were signed.
ENVELOPE_TIMES = {
    "was charged before the analyst signed the query",
    "was charged long after the analyst's envelope expired",
}


def budget_problems(accountant: Accountant, pki: Pki) -> list[str]:
    """Every anomaly the verifier finds, but for envelopes signed at another time than charged."""
    result = audit.verify(source_of(accountant), ca_pem=pki.ca_pem)
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
    assert audit.verify(source_of(a), ca_pem=pki.ca_pem).ok


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
