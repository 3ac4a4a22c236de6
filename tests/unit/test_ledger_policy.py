"""Budget policies in the SQLite ledger: policy entries at start, the tightening rule and its
override, a change of period in node.toml, ledgers from before policy entries, and what
`chc audit verify` says about forged or loosened policy entries. Real SQLite files, real keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from coordinator.cli import app
from node.budget.accounting import Charge, open_accountant
from node.budget.ledger import SqliteLedger
from node.config import load_config
from protocols.budget.changes import POLICY_RECORD, policy_record
from protocols.budget.policy import BudgetPolicy, period_bounds
from protocols.ledger.entry import canonical_json, default_key_path, entry_hash, format_time
from queries.errors import BudgetExceededError, ConfigError, LedgerIntegrityError
from tests.unit._accounting_helpers import Clock, Pki, make_pki, signed_charge

POLICY = BudgetPolicy(total_rho=2.0, max_rho_per_query=0.5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def bodies(path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(path)
    try:
        return [json.loads(b) for (b,) in con.execute("SELECT body FROM entries ORDER BY sequence")]
    finally:
        con.close()


def problems(path: Path, pki: Pki) -> list[str]:
    return [str(a) for a in verify(open_file(path), ca_pem=pki.ca_pem).anomalies]


def node_key(path: Path) -> Ed25519PrivateKey:
    loaded = serialization.load_pem_private_key(default_key_path(path).read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    return loaded


def write_chain(path: Path, new: list[dict[str, Any]], *, keep: int | None = None) -> None:
    """What the key holder can do: keep the first `keep` entries (all if None), append `new`
    bodies, number, chain and sign them with the node's key, and sign a matching head."""
    key = node_key(path)
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    rows = con.execute("SELECT sequence, body, signature FROM entries ORDER BY sequence")
    kept = [(int(s), bytes(b), bytes(g)) for s, b, g in rows][:keep]
    con.execute("DELETE FROM entries WHERE sequence > ?", (len(kept),))
    prev = entry_hash(kept[-1][1], kept[-1][2]) if kept else "0" * 64
    sequence = len(kept)
    for body in new:
        sequence += 1
        raw = canonical_json({**body, "sequence": sequence, "prev_hash": prev})
        signature = key.sign(raw)
        con.execute("INSERT INTO entries VALUES (?, ?, ?)", (sequence, raw, signature))
        prev = entry_hash(raw, signature)
    head = canonical_json(
        {
            "record": "chc.ledger.head",
            "format": 1,
            "node": "nwc",
            "sequence": sequence,
            "hash": prev,
            "time": new[-1]["time"] if new else None,
        }
    )
    con.execute(
        "UPDATE head SET sequence = ?, body = ?, signature = ?", (sequence, head, key.sign(head))
    )
    con.commit()
    con.close()


def bare_charge(analyst: str, rho: float) -> Charge:
    """A charge without an envelope, for tests that do not ask the verifier."""
    return Charge(f"q-{analyst}-{rho}", analyst, b"{}", b"", ("persons",), rho, 0.0)


def open_ledger(path: Path, policy: BudgetPolicy = POLICY, **kw: Any) -> SqliteLedger:
    return SqliteLedger(path, node="nwc", policy=policy, **kw)


# ---- the node -----------------------------------------------------------------------------


def test_a_loosened_policy_is_refused_at_start_unless_a_custodian_overrides_it(
    tmp_path: Path, pki: Pki
) -> None:
    path = tmp_path / "nwc.ledger.sqlite"
    ledger = open_ledger(path)
    ledger.charge(signed_charge(pki.alice, 0.5))
    ledger.close()
    looser = BudgetPolicy(total_rho=3.0, max_rho_per_query=0.5, lifetime_rho=10.0)
    with pytest.raises(ConfigError) as info:
        open_ledger(path, looser)
    message = str(info.value)
    assert "budget.total_rho from 2 to 3" in message
    assert "(policy entry 1)" in message
    assert '--allow-policy-loosening "REASON"' in message
    assert "lifetime_rho" not in message  # 10 is the recorded default: not a loosening
    assert len(bodies(path)) == 2  # nothing was recorded
    reason = "Caldicott guardian approved DSA v2 (ticket 4411)"
    ledger = open_ledger(path, looser, override=reason)
    assert ledger.policy == looser.resolved()
    ledger.charge(signed_charge(pki.alice, 0.5))
    ledger.close()
    entry = bodies(path)[2]
    assert entry["record"] == POLICY_RECORD
    assert entry["override"] == {"reason": reason}
    assert entry["loosened"] == [{"field": "budget.total_rho", "from": 2.0, "to": 3.0}]
    assert (entry["previous"], entry["previous_entry"]) == (policy_record(POLICY), 1)
    assert bodies(path)[3]["caps"]["policy"] == 3
    # Restarting on the same (now recorded) policy needs no override and records nothing.
    open_ledger(path, looser).close()
    assert len(bodies(path)) == 4
    result = verify(open_file(path), ca_pem=pki.ca_pem)
    assert result.ok, [str(a) for a in result.anomalies]
    assert [(p.entry, p.loosened, p.override) for p in result.policies] == [
        (1, [], None),
        (3, ["budget.total_rho from 2 to 3"], reason),
    ]
    run = CliRunner().invoke(app, ["audit", "verify", str(path)])
    assert run.exit_code == 0, run.output
    assert "budget policy LOOSENED (budget.total_rho from 2 to 3)" in run.output
    assert reason in run.output


def test_a_tightened_policy_is_recorded_and_then_in_force(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "nwc.ledger.sqlite"
    ledger = open_ledger(path)
    ledger.charge(signed_charge(pki.alice, 0.5))
    ledger.close()
    tighter = BudgetPolicy(total_rho=0.8, max_rho_per_query=0.25, analyst_rho=0.6)
    ledger = open_ledger(path, tighter)
    assert ledger.policy_change is not None
    assert (ledger.policy_change.previous_entry, ledger.policy_change.loosened) == (1, ())
    with pytest.raises(BudgetExceededError, match=r"alice's remaining budget at this node of 0\.1"):
        ledger.check("alice", 0.2)
    ledger.close()
    # Going back to the old caps is now a loosening.
    with pytest.raises(ConfigError, match=r"budget\.total_rho from 0\.8 to 2"):
        open_ledger(path)
    assert verify(open_file(path), ca_pem=pki.ca_pem).ok


def test_check_only_opening_records_nothing(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "nwc.ledger.sqlite"
    open_ledger(path).close()
    tighter = BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5)
    ledger = open_ledger(path, tighter, record_policy=False)
    assert ledger.policy_change is not None
    assert ledger.policy_change.describe() == "tightens the policy of entry 1"
    with pytest.raises(ConfigError, match="opened to be checked only"):
        ledger.charge(signed_charge(pki.alice, 0.1))
    ledger.close()
    with pytest.raises(ConfigError, match="loosens"):
        open_ledger(path, BudgetPolicy(total_rho=5.0), record_policy=False)
    assert len(bodies(path)) == 1


def _node_toml(directory: Path, budget: str) -> Path:
    toml = directory / "node.toml"
    toml.write_text(f'name = "nwc"\nomop = "omop"\nidentity = "id"\n[budget]\n{budget}\n')
    return toml


def test_changing_the_period_in_node_toml_keeps_the_lifetime_and_period_spend(
    tmp_path: Path, pki: Pki
) -> None:
    """FY to calendar year in May 2026: the February charge still counts, in both windows."""
    clock = Clock(datetime(2026, 2, 1, tzinfo=UTC))
    budget = "total_rho = 1.0\nmax_rho_per_query = 0.5\nlifetime_rho = 1.0\n"
    toml = _node_toml(tmp_path, budget)
    ledger = open_accountant(load_config(toml), config_file=toml, clock=clock)
    ledger.charge(signed_charge(pki.alice, 0.5))
    ledger.charge(signed_charge(pki.bob, 0.1))
    ledger.close()
    clock.when = datetime(2026, 5, 1, tzinfo=UTC)  # a new financial year
    _node_toml(tmp_path, budget + 'period = "calendar-year"\n')
    # Every lifetime cap is at most its period cap, so the change cannot loosen anything.
    ledger = open_accountant(load_config(toml), config_file=toml, clock=clock)
    assert ledger.policy.period == "calendar-year"
    assert (ledger.lifetime_spent(), ledger.lifetime_spent("alice")) == pytest.approx((0.6, 0.5))
    assert ledger.spent() == pytest.approx(0.6)  # 2026 so far, whatever period recorded it
    with pytest.raises(BudgetExceededError, match=r"remaining lifetime budget of 0\.4"):
        ledger.check("alice", 0.45)
    ledger.charge(signed_charge(pki.alice, 0.4))
    ledger.close()
    last = bodies(tmp_path / "nwc.ledger.sqlite")[-1]
    assert last["caps"]["period_start"] == "2026-01-01"
    assert last["spent"] == {
        "period_rho": pytest.approx(1.0),
        "analyst_rho": pytest.approx(0.9),
        "lifetime_rho": pytest.approx(1.0),
        "analyst_lifetime_rho": pytest.approx(0.9),
    }
    assert [p for p in problems(tmp_path / "nwc.ledger.sqlite", pki) if "signed" not in p] == []


def test_a_period_change_the_lifetime_caps_do_not_bound_needs_an_override(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 2, 1, tzinfo=UTC))
    toml = _node_toml(tmp_path, "total_rho = 1.0\n")
    ledger = open_accountant(load_config(toml), config_file=toml, clock=clock)
    ledger.charge(bare_charge("alice", 1.0))
    ledger.close()
    _node_toml(tmp_path, 'total_rho = 1.0\nperiod = "calendar-year"\n')
    with pytest.raises(
        ConfigError, match=r'budget\.period from "financial-year" to "calendar-year"'
    ):
        open_accountant(load_config(toml), config_file=toml, clock=clock)
    ledger = open_accountant(
        load_config(toml), config_file=toml, clock=clock, override="align with the ICB's year"
    )
    # The lifetime spend is never reset; the 2026 period already holds February's charge.
    assert (ledger.lifetime_spent(), ledger.spent()) == (1.0, 1.0)
    ledger.close()


def test_a_node_refuses_to_open_a_ledger_whose_policy_entry_was_edited(tmp_path: Path) -> None:
    path = tmp_path / "nwc.ledger.sqlite"
    open_ledger(path).close()
    (body,) = bodies(path)
    body["policy"]["total_rho"] = 100.0
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("UPDATE entries SET body = ? WHERE sequence = 1", (canonical_json(body),))
    con.commit()
    con.close()
    with pytest.raises(LedgerIntegrityError, match="entry 1: its signature does not verify"):
        open_ledger(path, BudgetPolicy(total_rho=100.0, max_rho_per_query=0.5))
    result = verify(open_file(path))
    assert any(a.entry == 1 and "signature does not verify" in a.problem for a in result.anomalies)


# ---- the verifier --------------------------------------------------------------------------


@pytest.fixture
def ledger_path(tmp_path: Path, pki: Pki) -> Path:
    """Entry 1 the policy (2 per period, 0.5 per query, lifetime 10), entries 2-3 releases."""
    path = tmp_path / "nwc.ledger.sqlite"
    ledger = open_ledger(path)
    ledger.charge(signed_charge(pki.alice, 0.5))
    ledger.charge(signed_charge(pki.bob, 0.5))
    ledger.close()
    return path


def _policy_body(
    policy: BudgetPolicy, previous: dict[str, Any] | None, previous_entry: int | None, **kw: Any
) -> dict[str, Any]:
    return {
        "record": POLICY_RECORD,
        "format": 1,
        "time": format_time(datetime.now(UTC)),
        "node": "nwc",
        "policy": policy_record(policy),
        "previous": previous,
        "previous_entry": previous_entry,
        "loosened": [],
        "override": None,
        **kw,
    }


def test_a_loosening_without_an_override_is_flagged(ledger_path: Path, pki: Pki) -> None:
    looser = BudgetPolicy(total_rho=4.0, max_rho_per_query=0.5, lifetime_rho=10.0)
    write_chain(ledger_path, [_policy_body(looser, policy_record(POLICY), 1)])
    assert problems(ledger_path, pki) == [
        "entry 4: records its loosening as none, but against policy entry 1 it loosens "
        "['budget.total_rho from 2 to 4']",
        "entry 4: loosens the budget policy of policy entry 1 (budget.total_rho from 2 to 4) "
        "without a custodian's override reason",
    ]
    # Recorded as loosening, but with an empty reason: still flagged.
    loosened = [{"field": "budget.total_rho", "from": 2.0, "to": 4.0}]
    write_chain(
        ledger_path,
        [
            _policy_body(
                looser, policy_record(POLICY), 1, loosened=loosened, override={"reason": " "}
            )
        ],
        keep=3,
    )
    assert problems(ledger_path, pki) == [
        "entry 4: loosens the budget policy of policy entry 1 (budget.total_rho from 2 to 4) "
        "without a custodian's override reason",
    ]


def test_a_policy_entry_that_misstates_the_previous_policy_is_flagged(
    ledger_path: Path, pki: Pki
) -> None:
    claimed = policy_record(BudgetPolicy(total_rho=5.0, max_rho_per_query=0.5, lifetime_rho=10.0))
    tighter = BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5, lifetime_rho=10.0)
    write_chain(ledger_path, [_policy_body(tighter, claimed, 1)])
    assert problems(ledger_path, pki) == [
        "entry 4: does not record the policy it replaces (policy entry 1) as it was: the policy "
        "history was edited"
    ]
    write_chain(ledger_path, [_policy_body(tighter, policy_record(POLICY), 2)], keep=3)
    assert problems(ledger_path, pki) == [
        "entry 4: does not record the policy it replaces (policy entry 1) as it was: the policy "
        "history was edited"
    ]


def test_releases_are_checked_against_the_caps_in_force(ledger_path: Path, pki: Pki) -> None:
    """After a tightening, a release under the old caps, or beyond the new lifetime cap."""
    tighter = BudgetPolicy(total_rho=2.0, max_rho_per_query=0.5, lifetime_rho=1.2)
    old = bodies(ledger_path)[2]  # bob's release, under entry 1's caps
    assert (old["spent"]["lifetime_rho"], old["caps"]["lifetime_rho"]) == (1.0, 10.0)
    release = {
        **old,
        "time": format_time(datetime.now(UTC)),
        "spent": {**old["spent"], "period_rho": 1.5, "lifetime_rho": 1.5},
    }
    release["spent"]["analyst_rho"] = release["spent"]["analyst_lifetime_rho"] = 1.0
    write_chain(ledger_path, [_policy_body(tighter, policy_record(POLICY), 1), release])
    found = problems(ledger_path, pki)
    assert (
        "entry 5: records caps.lifetime_rho as 10.0, but the policy in force (entry 4) has 1.2"
        in found
    )
    assert "entry 5: records caps.policy as 1, but the policy in force (entry 4) has 4" in found
    assert (
        "entry 5: the node's spend since the ledger began reaches 1.5, above the cap of 1.2 in "
        "force (policy entry 4)" in found
    )
    # (and the envelope is bob's release again)
    assert "entry 5: replays the envelope already released as entry 3" in found


def test_a_ledger_from_before_policy_entries_verifies_and_is_upgraded(
    tmp_path: Path, pki: Pki
) -> None:
    """Old entries: no policy entry, no lifetime fields, spend summed by recorded period, and
    here a switch from the financial to the calendar year that restarted the sums."""
    path = tmp_path / "nwc.ledger.sqlite"
    open_ledger(path).close()  # the file, its key and meta; its policy entry is dropped below
    now = datetime.now(UTC) - timedelta(milliseconds=100)
    legacy, sums = [], {}
    for i, (who, period) in enumerate(
        [(pki.alice, "financial-year"), (pki.bob, "financial-year"), (pki.alice, "calendar-year")]
    ):
        when = now + timedelta(milliseconds=i)
        start, end = period_bounds(period, when)
        charge = signed_charge(who, 0.5)
        sums[start] = sums.get(start, 0.0) + 0.5
        legacy.append(
            {
                "record": "chc.ledger.entry",
                "format": 1,
                "time": format_time(when),
                "node": "nwc",
                "analyst": who.name,
                "query_id": charge.query_id,
                "query": charge.query.decode(),
                "query_sha256": hashlib.sha256(charge.query).hexdigest(),
                "envelope": base64.b64encode(charge.envelope).decode(),
                "views": ["persons"],
                "rho": 0.5,
                "epsilon": charge.epsilon,
                "delta": 1e-6,
                "outcome": "released",
                "reason": "",
                "code": "",
                "caps": {
                    "period": period,
                    "period_start": start.isoformat() if start else None,
                    "period_end": end.isoformat() if end else None,
                    "total_rho": 1.0,
                    "max_rho_per_query": 0.5,
                    "analyst_rho": None,
                },
                "spent": {"period_rho": sums[start], "analyst_rho": 0.5},
            }
        )
    write_chain(path, legacy, keep=0)
    result = verify(open_file(path), ca_pem=pki.ca_pem)
    assert result.ok, [str(a) for a in result.anomalies]
    assert (result.entries, result.policies) == (3, [])
    ledger = open_ledger(
        path, BudgetPolicy(total_rho=2.0, max_rho_per_query=0.5, period="calendar-year")
    )
    assert ledger.policy_change is not None
    assert ledger.policy_change.previous is None  # nothing recorded to compare with
    # Every old release counts over the life, and in the calendar year that holds them all.
    assert (ledger.lifetime_spent(), ledger.spent()) == (1.5, 1.5)
    ledger.charge(signed_charge(pki.bob, 0.5))
    with pytest.raises(BudgetExceededError, match=r"remaining budget of 0 in the budget period"):
        ledger.check("bob", 0.1)
    ledger.close()
    assert [b["record"] for b in bodies(path)][3:] == [POLICY_RECORD, "chc.ledger.entry"]
    result = verify(open_file(path), ca_pem=pki.ca_pem)
    assert result.ok, [str(a) for a in result.anomalies]
    assert [(p.entry, p.first) for p in result.policies] == [(4, True)]
