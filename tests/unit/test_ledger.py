"""The SQLite ledger (node.budget.ledger): restarts, durability, keys, processes and configuration.

Tamper tests are in test_ledger_tampering.py, exports and reports in test_ledger_exports.py;
the contract shared with the in-memory accountant is in test_accounting_contract.py.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from node.budget.accounting import MemoryAccountant, open_accountant
from node.budget.ledger import SqliteLedger
from node.config import NodeConfig, load_config
from protocols.budget.changes import POLICY_RECORD
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import default_key_path, public_key_path
from queries.errors import ConfigError
from tests.unit._accounting_helpers import Pki, make_pki, signed_charge
from tests.unit._ledger_helpers import ENTRIES, POLICY, ROWS, write_ledger


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ledger_path(tmp_path: Path, pki: Pki) -> Path:
    """A fresh copy of write_ledger's ledger for each test."""
    return write_ledger(tmp_path / "nwc.ledger.sqlite", pki)


# ---- SQLite behaviour ----------------------------------------------------------------------


def test_spend_and_sequence_survive_a_restart(ledger_path: Path, pki: Pki) -> None:
    ledger = SqliteLedger(ledger_path, node="nwc", policy=POLICY)
    before = ledger.spent()
    assert before == pytest.approx(sum(0.1 * (1 + i % 3) for i in range(ENTRIES) if i != 3))
    _, sequence = ledger.charge(signed_charge(pki.alice, 0.5))
    assert sequence == ROWS + 1  # reopened with the same policy: no new policy entry
    ledger.close()
    again = SqliteLedger(ledger_path, node="nwc", policy=POLICY)
    assert again.spent() == pytest.approx(before + 0.5)
    again.close()


def test_wal_and_full_sync(ledger_path: Path) -> None:
    ledger = SqliteLedger(ledger_path, node="nwc", policy=POLICY)
    assert ledger._con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    ledger.close()


def test_the_table_is_append_only_by_mistake_too(ledger_path: Path) -> None:
    con = sqlite3.connect(ledger_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE entries SET body = x'00' WHERE sequence = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM entries")
    con.close()


def test_the_key_is_private_and_published(ledger_path: Path) -> None:
    key = default_key_path(ledger_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert public_key_path(key).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_keys_and_ledgers_behind_symlinks_or_readable_by_others_are_refused(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real.key"
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        SqliteLedger(tmp_path / "a.sqlite", node="n", policy=POLICY, key_path=link)
    assert not real.exists()
    ledger = SqliteLedger(tmp_path / "b.sqlite", node="n", policy=POLICY)
    ledger.close()
    default_key_path(tmp_path / "b.sqlite").chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        SqliteLedger(tmp_path / "b.sqlite", node="n", policy=POLICY)
    (tmp_path / "c.sqlite").symlink_to(tmp_path / "b.sqlite")
    with pytest.raises(ConfigError, match="symbolic link"):
        SqliteLedger(tmp_path / "c.sqlite", node="n", policy=POLICY)


PROCESS_SCRIPT = """
import sys
from pathlib import Path
from node.budget.accounting import Charge
from node.budget.ledger import SqliteLedger
from protocols.budget.policy import BudgetPolicy
from queries.errors import BudgetExceededError
from queries.mechanisms import rho_to_epsilon

EPSILON = rho_to_epsilon(0.1, 1e-6)
ledger = SqliteLedger(Path(sys.argv[1]), node="n",
                      policy=BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5))
released = 0
for i in range(10):
    try:
        charge = Charge(f"{sys.argv[2]}-{i}", sys.argv[2], b"{}", b"", ("persons",), 0.1, EPSILON)
        ledger.charge(charge)
    except BudgetExceededError:
        continue
    released += 1
print(released)
"""


def test_processes_sharing_a_ledger_cannot_overspend(tmp_path: Path) -> None:
    """Four processes each try ten charges of 0.1 against a total of 1: exactly ten land."""
    path = tmp_path / "shared.sqlite"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_SCRIPT, str(path), f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode() for _, e in outputs]
    assert sum(int(out) for out, _ in outputs) == 10
    ledger = SqliteLedger(path, node="n", policy=BudgetPolicy(total_rho=1.0, max_rho_per_query=0.5))
    assert ledger.spent() == pytest.approx(1.0)
    # One policy entry (whichever process came first recorded it; the others found it).
    assert [e.sequence for e in ledger.entries()] == list(range(1, 12))
    assert sum(json.loads(e.body)["record"] == POLICY_RECORD for e in ledger.entries()) == 1
    ledger.close()
    result = verify(open_file(path))
    # Only complaints about the synthetic envelopes: chain, signatures and caps hold.
    assert {a.problem for a in result.anomalies} == {
        "a release without the analyst's signed envelope"
    }


def test_a_stream_is_one_snapshot(ledger_path: Path, pki: Pki) -> None:
    ledger = SqliteLedger(ledger_path, node="nwc", policy=POLICY)
    stream = ledger.stream()
    first = next(stream)
    ledger.charge(signed_charge(pki.alice, 0.1))  # appended while an auditor reads
    rest = list(stream)
    assert [e.sequence for e in [first, *rest]] == [*range(1, ROWS + 1), ROWS]
    assert rest[-1].head
    assert len(list(ledger.entries())) == ROWS + 1
    ledger.close()


def test_factory_and_config(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        'name = "york"\nomop = "omop"\nidentity = "id"\n'
        '[budget]\ntotal_rho = 4.0\nperiod = "calendar-year"\nanalyst_rho = 1.0\n'
        "[budget.analysts]\nalice = 2.0\n"
    )
    cfg = load_config(toml)
    assert cfg.ledger is None
    assert cfg.budget.analyst_cap("alice") == 2.0
    assert cfg.budget.analyst_cap("bob") == 1.0
    ledger = open_accountant(cfg, config_file=toml)
    assert isinstance(ledger, SqliteLedger)
    assert ledger.path == tmp_path / "york.ledger.sqlite"
    assert ledger.key_path == tmp_path / "york.ledger.key"
    ledger.close()
    assert isinstance(open_accountant(cfg, memory=True), MemoryAccountant)
    toml.write_text(
        toml.read_text().replace('identity = "id"\n', 'identity = "id"\nledger = "l/x.db"\n')
    )
    assert load_config(toml).ledger == tmp_path / "l" / "x.db"
    with pytest.raises(ConfigError, match="ledger"):
        open_accountant(NodeConfig(name="n", omop=tmp_path, identity=tmp_path))


@pytest.mark.parametrize(
    "line",
    ['period = "monthly"', "period = 1", "analyst_rho = 0", "analyst_rho = true"],
)
def test_bad_budget_caps(tmp_path: Path, line: str) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(f'name = "n"\nomop = "o"\nidentity = "i"\n[budget]\n{line}\n')
    with pytest.raises(ConfigError, match="budget"):
        load_config(toml)


def test_bad_per_analyst_cap(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('name = "n"\nomop = "o"\nidentity = "i"\n[budget.analysts]\nalice = -1\n')
    with pytest.raises(ConfigError, match=r"budget.analysts.alice"):
        load_config(toml)
