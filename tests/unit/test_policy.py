"""Budget policies (protocols.budget): lifetime caps, and what a change to the policy loosens.

The default lifetime caps, which changes loosen a recorded policy and need an override, and
policy records round-tripping through the ledger.
"""

from __future__ import annotations

import dataclasses

import pytest

from protocols.budget.changes import (
    lifetime_bounds_periods,
    loosenings,
    plan_change,
    policy_from_record,
    policy_record,
)
from protocols.budget.policy import LIFETIME_PERIODS, BudgetPolicy
from queries.errors import ConfigError


def test_lifetime_caps_default_to_five_periods() -> None:
    budget = BudgetPolicy(total_rho=4.0, analyst_rho=1.0, analysts=(("alice", 2.0),))
    assert LIFETIME_PERIODS == 5
    assert budget.lifetime_cap == 20.0
    assert budget.analyst_lifetime_cap("alice") == 10.0  # five times her own period cap
    assert budget.analyst_lifetime_cap("bob") == 5.0
    assert BudgetPolicy().analyst_lifetime_cap("bob") is None  # only the node's caps apply
    resolved = budget.resolved()
    assert (resolved.lifetime_rho, resolved.analyst_lifetime_rho) == (20.0, 5.0)
    assert resolved.analysts_lifetime == (("alice", 10.0),)
    assert resolved.resolved() == resolved
    # An explicit default for analysts applies to named analysts without a lifetime cap.
    explicit = BudgetPolicy(analyst_rho=1.0, analysts=(("alice", 2.0),), analyst_lifetime_rho=3)
    assert explicit.analyst_lifetime_cap("alice") == 3.0


BASE = BudgetPolicy(
    total_rho=10.0,
    max_rho_per_query=1.0,
    analyst_rho=2.0,
    analysts=(("alice", 5.0),),
    lifetime_rho=30.0,
)


@pytest.mark.parametrize(
    ("changes", "loosened"),
    [
        ({"total_rho": 20.0}, ["budget.total_rho from 10 to 20"]),
        ({"max_rho_per_query": 2.0}, ["budget.max_rho_per_query from 1 to 2"]),
        ({"delta": 1e-5}, ["budget.delta from 1e-06 to 1e-05"]),
        ({"lifetime_rho": 31.0}, ["budget.lifetime_rho from 30 to 31"]),
        (
            {"analyst_rho": 3.0},
            ["budget.analyst_rho from 2 to 3", "budget.analyst_lifetime_rho from 10 to 15"],
        ),
        (
            {"analyst_rho": None},  # alice keeps hers; everyone else loses theirs
            [
                "budget.analyst_rho from 2 to no cap",
                "budget.analyst_lifetime_rho from 10 to no cap",
            ],
        ),
        (
            {"analysts": ()},  # alice falls back to the default: lower
            [],
        ),
        (
            {"analysts": (("alice", 5.0), ("bob", 3.0))},  # bob's own cap is above the default
            ["budget.analysts.bob from 2 to 3", "budget.analysts_lifetime.bob from 10 to 15"],
        ),
        (
            {"analysts_lifetime": (("alice", 26.0),)},
            ["budget.analysts_lifetime.alice from 25 to 26"],
        ),
        ({"period": "calendar-year"}, ['budget.period from "financial-year" to "calendar-year"']),
        # To "none" is a tightening: its one period is the node's life.
        ({"period": "none"}, []),
        # A period change that no period cap can feel: every lifetime cap is below its period's.
        (
            {
                "period": "calendar-year",
                "lifetime_rho": 10.0,
                "analyst_lifetime_rho": 2.0,
                "analysts_lifetime": (("alice", 2.0),),
            },
            [],
        ),
        (
            {"total_rho": 5.0, "max_rho_per_query": 0.5, "lifetime_rho": 20.0, "delta": 1e-7},
            [],
        ),
        ({}, []),
    ],
)
def test_what_loosens_a_policy(changes: dict[str, object], loosened: list[str]) -> None:
    new = dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]
    assert [str(item) for item in loosenings(BASE, new)] == loosened


def test_lifetime_bounds_periods() -> None:
    assert not lifetime_bounds_periods(BASE)
    assert lifetime_bounds_periods(BudgetPolicy(total_rho=1.0, lifetime_rho=1.0))
    # An analyst's period cap below the node's lifetime cap could still bind.
    assert not lifetime_bounds_periods(
        BudgetPolicy(total_rho=1.0, lifetime_rho=1.0, analyst_rho=0.5)
    )
    assert lifetime_bounds_periods(
        BudgetPolicy(total_rho=1.0, lifetime_rho=1.0, analyst_rho=0.5, analyst_lifetime_rho=0.5)
    )


def test_a_loosening_is_refused_naming_each_cap_and_the_override() -> None:
    raised = dataclasses.replace(BASE, total_rho=20.0, lifetime_rho=None)
    with pytest.raises(ConfigError) as info:
        plan_change(raised, BASE, 7, node="leeds")
    message = str(info.value)
    assert message.startswith(
        "node leeds: the [budget] in node.toml loosens the budget policy recorded in its "
        "ledger (policy entry 7): budget.total_rho from 10 to 20; budget.lifetime_rho from 30 "
        "to 100 (not set in node.toml, so 5 times the matching period cap; set "
        "budget.lifetime_rho = 30 to keep it)."
    )
    assert '--allow-policy-loosening "REASON"' in message
    change = plan_change(raised, BASE, 7, node="leeds", override="  DSA v2 signed  ")
    assert change is not None
    assert (change.previous_entry, change.override) == (7, "DSA v2 signed")
    assert str(change.loosened[0]) == "budget.total_rho from 10 to 20"
    with pytest.raises(ConfigError, match="needs a reason"):
        plan_change(raised, BASE, 7, node="leeds", override=" ")


def test_a_tightening_or_no_change_needs_no_override() -> None:
    assert plan_change(BASE, BASE.resolved(), 3, node="n") is None
    tighter = plan_change(dataclasses.replace(BASE, total_rho=5.0), BASE, 3, node="n")
    assert tighter is not None
    assert (tighter.loosened, tighter.override) == ((), None)
    # An override given for a change that does not loosen is not recorded as one.
    again = plan_change(dataclasses.replace(BASE, total_rho=5.0), BASE, 3, node="n", override="x")
    assert again is not None
    assert again.override is None
    first = plan_change(BASE, None, None, node="n")
    assert first is not None
    assert (first.previous, first.policy) == (None, BASE.resolved())


def test_policy_records_round_trip_and_refuse_inconsistent_defaults() -> None:
    record = policy_record(BASE)
    assert policy_from_record(record) == BASE.resolved()
    assert policy_record(policy_from_record(record)) == record
    with pytest.raises(ConfigError, match="lifetime caps are not the ones"):
        policy_from_record({**record, "analyst_lifetime_rho": None})
    with pytest.raises(ConfigError, match="exactly the fields"):
        policy_from_record({**record, "extra": 1})
    with pytest.raises(ConfigError, match="total_rho must be a number"):
        policy_from_record({**record, "total_rho": "10"})
