"""Tampering with a SQLite ledger is named by `chc audit verify`, and a node will not open it.

Editing, deleting, inserting or reordering any entry, or a wrong key, is named by `chc audit
verify` (and coordinator.audit's verify), and a node refuses to open such a ledger. Its other
behaviour is in test_ledger.py; exports and reports in test_ledger_exports.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from coordinator.cli import app
from node.budget.ledger import SqliteLedger
from protocols.ledger.entry import canonical_json, default_key_path, entry_hash, load_public_key
from queries.errors import ConfigError, LedgerIntegrityError
from tests.unit._accounting_helpers import Pki, make_pki
from tests.unit._ledger_helpers import POLICY, ROWS, rows, tamper, write_ledger


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ledger_path(tmp_path: Path, pki: Pki) -> Path:
    """A fresh copy of write_ledger's ledger for each test."""
    return write_ledger(tmp_path / "nwc.ledger.sqlite", pki)


ATTACKER = Ed25519PrivateKey.generate()


def forged(
    sequence: int, prev_hash: str, template: bytes, **changes: object
) -> tuple[bytes, bytes]:
    body = json.loads(template)
    body.update(sequence=sequence, prev_hash=prev_hash, **changes)
    raw = canonical_json(body)
    return raw, ATTACKER.sign(raw)


def _edit(path: Path) -> None:
    _, body, _ = rows(path)[4]
    edited = canonical_json({**json.loads(body), "rho": 0.001})
    tamper(path, ("UPDATE entries SET body = ? WHERE sequence = 5", (edited,)))


def _edit_resign_and_rechain(path: Path) -> None:
    entries = rows(path)
    prev = entry_hash(entries[3][1], entries[3][2])
    statements = []
    for seq, body, _ in entries[4:]:
        changes = {"analyst": "mallory"} if seq == 5 else {}
        new_body, sig = forged(seq, prev, body, **changes)
        statements.append(
            ("UPDATE entries SET body = ?, signature = ? WHERE sequence = ?", (new_body, sig, seq))
        )
        prev = entry_hash(new_body, sig)
    tamper(path, *statements)


def _delete(sequence: int) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        tamper(path, ("DELETE FROM entries WHERE sequence = ?", (sequence,)))

    return run


def _insert_middle(path: Path) -> None:
    entries = rows(path)
    body, sig = forged(6, entry_hash(entries[4][1], entries[4][2]), entries[4][1], rho=0.0)
    tamper(
        path,
        ("UPDATE entries SET sequence = sequence + 1000 WHERE sequence >= 6", ()),
        ("UPDATE entries SET sequence = sequence - 999 WHERE sequence >= 1000", ()),
        ("INSERT INTO entries VALUES (6, ?, ?)", (body, sig)),
    )


def _append(path: Path) -> None:
    entries = rows(path)
    last = entries[-1]
    body, sig = forged(ROWS + 1, entry_hash(last[1], last[2]), last[1])
    tamper(path, ("INSERT INTO entries VALUES (?, ?, ?)", (ROWS + 1, body, sig)))


def _reorder(path: Path) -> None:
    entries = rows(path)
    (_, b5, s5), (_, b6, s6) = entries[4], entries[5]
    tamper(
        path,
        ("UPDATE entries SET body = ?, signature = ? WHERE sequence = 5", (b6, s6)),
        ("UPDATE entries SET body = ?, signature = ? WHERE sequence = 6", (b5, s5)),
    )


def _drop_head(path: Path) -> None:
    tamper(path, ("DELETE FROM head", ()))


TAMPERING: dict[str, tuple[Callable[[Path], None], int | None, str]] = {
    "edit an entry": (_edit, 5, "signature does not verify"),
    "edit, re-sign and re-chain": (_edit_resign_and_rechain, 5, "signature does not verify"),
    "delete an entry": (_delete(5), 6, "entry 5 is missing before it"),
    "delete the first entry": (_delete(1), 2, "entry 1 is missing before it"),
    "delete the last entry": (_delete(ROWS), ROWS, "missing at the end"),
    "insert an entry": (_insert_middle, 6, "signature does not verify"),
    "append an entry": (_append, ROWS + 1, "not covered by the node's signed head"),
    "reorder two entries": (_reorder, 5, "says it is entry 6"),
    "delete the head": (_drop_head, None, "no signed head"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_is_named_by_verify_and_the_cli(
    ledger_path: Path, pki: Pki, tmp_path: Path, case: str
) -> None:
    action, entry, words = TAMPERING[case]
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem)
    source = open_file(ledger_path)
    assert verify(source, ca_pem=pki.ca_pem).ok
    action(ledger_path)
    result = verify(open_file(ledger_path), ca_pem=pki.ca_pem)
    assert not result.ok
    assert any(a.entry == entry and words in a.problem for a in result.anomalies), [
        str(a) for a in result.anomalies
    ]
    run = CliRunner().invoke(app, ["audit", "verify", str(ledger_path), "--ca", str(ca)])
    assert run.exit_code == 1, run.output
    assert "FAILED" in run.output
    named = f"entry {entry}: " if entry is not None else words
    assert named in run.output


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_node_refuses_to_open_a_tampered_ledger(ledger_path: Path, case: str) -> None:
    TAMPERING[case][0](ledger_path)
    with pytest.raises(LedgerIntegrityError, match="does not verify, so the node will not start"):
        SqliteLedger(ledger_path, node="nwc", policy=POLICY)


def test_a_wrong_key_is_named(ledger_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = verify(open_file(ledger_path, public_key=load_public_key(other)))
    assert [str(a) for a in result.anomalies] == [
        "entry 1: its signature does not verify with the node's public key, and neither does "
        f"any other of the {ROWS} entries: wrong key (given)",
        "the signed head's signature does not verify with the node's key",
    ]
    run = CliRunner().invoke(app, ["audit", "verify", str(ledger_path), "--public-key", str(other)])
    assert run.exit_code == 1
    assert "entry 1: its signature does not verify" in run.output


def test_a_node_refuses_a_wrong_or_missing_key_file(ledger_path: Path) -> None:
    key = default_key_path(ledger_path)
    original = key.read_bytes()
    key.unlink()
    with pytest.raises(LedgerIntegrityError, match="restore that key file"):
        SqliteLedger(ledger_path, node="nwc", policy=POLICY)
    assert not key.exists()  # no new key was made for an existing ledger
    other = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, other)
    os.close(fd)
    with pytest.raises(LedgerIntegrityError, match="wrong key file"):
        SqliteLedger(ledger_path, node="nwc", policy=POLICY)
    key.write_bytes(original)
    SqliteLedger(ledger_path, node="nwc", policy=POLICY).close()


def test_a_ledger_belongs_to_one_node(ledger_path: Path) -> None:
    with pytest.raises(ConfigError, match="belongs to node 'nwc', not 'gm'"):
        SqliteLedger(ledger_path, node="gm", policy=POLICY)
