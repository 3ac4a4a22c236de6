"""Shared by the SQLite ledger tests: a small ledger to tamper with, and raw access to its rows.

The tamper tests (test_ledger_tampering.py), the SQLite behaviour tests (test_ledger.py) and
the export and report tests (test_ledger_exports.py) all start from the same closed ledger
and, like an attacker with write access to the file, read and rewrite its rows directly.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.budget.ledger import SqliteLedger
from protocols.budget.policy import BudgetPolicy
from tests.unit._accounting_helpers import Pki, refusal, signed_charge

POLICY = BudgetPolicy(total_rho=10.0, max_rho_per_query=1.0, analyst_rho=5.0)
ENTRIES = 10  # queries, after the ledger's first entry: its budget policy
ROWS = ENTRIES + 1


def write_ledger(path: Path, pki: Pki) -> Path:
    """A closed ledger: its policy (entry 1), then releases by alice and bob and one refusal
    (entry 5)."""
    ledger = SqliteLedger(path, node="nwc", policy=POLICY)
    for i in range(ENTRIES):
        if i == 3:
            ledger.refuse(refusal())
        else:
            ledger.charge(signed_charge(pki.alice if i % 2 else pki.bob, 0.1 * (1 + i % 3)))
    ledger.close()
    return path


def rows(path: Path) -> list[tuple[int, bytes, bytes]]:
    con = sqlite3.connect(path)
    try:
        found = con.execute("SELECT sequence, body, signature FROM entries ORDER BY sequence")
        return [(int(s), bytes(b), bytes(g)) for s, b, g in found]
    finally:
        con.close()


def tamper(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What an attacker with write access to the file can do (triggers are no obstacle)."""
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER IF EXISTS entries_no_update")
    con.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    for sql, params in statements:
        con.execute(sql, params)
    con.commit()
    con.close()
