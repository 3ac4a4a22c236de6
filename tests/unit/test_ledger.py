"""The SQLite ledger (node.ledger) and the auditors' tools (coordinator.audit, `chc audit`).

Tamper tests: editing, deleting, inserting or reordering any entry, or a wrong key, is named
by `chc audit verify`, and a node refuses to open such a ledger. The contract shared with
the in-memory accountant is in test_accounting_contract.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from coordinator.audit import ledgers as audit
from coordinator.audit import report as audit_report
from coordinator.cli import app
from node.budget.accounting import MemoryAccountant, open_accountant
from node.budget.ledger import SqliteLedger
from node.config import NodeConfig, load_config
from protocols.budget.policy import BudgetPolicy
from protocols.budget.rules import POLICY_RECORD
from protocols.ledger.entry import canonical_json, default_key_path, entry_hash, public_key_path
from queries.errors import ConfigError, LedgerIntegrityError
from tests.unit.test_accounting_contract import Pki, make_pki, refusal, signed_charge

POLICY = BudgetPolicy(total_rho=10.0, max_rho_per_query=1.0, analyst_rho=5.0)
ENTRIES = 10  # queries, after the ledger's first entry: its budget policy
ROWS = ENTRIES + 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ledger_path(tmp_path: Path, pki: Pki) -> Path:
    """A closed ledger: its policy (entry 1), then releases by alice and bob and one refusal
    (entry 5)."""
    path = tmp_path / "nwc.ledger.sqlite"
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
    source = audit.open_file(ledger_path)
    assert audit.verify(source, ca_pem=pki.ca_pem).ok
    action(ledger_path)
    result = audit.verify(audit.open_file(ledger_path), ca_pem=pki.ca_pem)
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
    result = audit.verify(audit.open_file(ledger_path, public_key=audit.load_public_key(other)))
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
    result = audit.verify(audit.open_file(path))
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


# ---- exports and reports -------------------------------------------------------------------


@pytest.fixture
def exports(ledger_path: Path, tmp_path: Path) -> Iterator[dict[str, Path]]:
    source = audit.open_file(ledger_path)
    out = {}
    for fmt in ("jsonl", "parquet"):
        out[fmt] = tmp_path / f"export.{fmt}"
        assert audit.export(source, out[fmt]) == ROWS
    return out


def test_exports_verify_like_the_ledger(exports: dict[str, Path], pki: Pki) -> None:
    for path in exports.values():
        result = audit.verify(audit.open_file(path), ca_pem=pki.ca_pem)
        assert result.ok, [str(a) for a in result.anomalies]
        assert (result.node, result.entries, result.refused) == ("nwc", ROWS, 1)
        assert len(result.policies) == 1
    table = pq.read_table(exports["parquet"])
    assert table.column("outcome").to_pylist().count("refused") == 1
    assert table.column("record").to_pylist()[:2] == ["chc.ledger.policy", "chc.ledger.entry"]
    assert table.column("analyst").to_pylist()[1] == "bob"


def test_a_tampered_export_is_named(exports: dict[str, Path]) -> None:
    path = exports["jsonl"]
    lines = path.read_text().splitlines()
    line = json.loads(lines[3])  # entry 3 (after the header line)
    body = json.loads(line["body"])
    body["analyst"] = "nobody"
    line["body"] = canonical_json(body).decode()
    lines[3] = json.dumps(line)
    path.write_text("\n".join(lines[:-1]) + "\n")  # and drop the head
    result = audit.verify(audit.open_file(path))
    problems = [str(a) for a in result.anomalies]
    assert any(p.startswith("entry 3: its signature does not verify") for p in problems)
    assert any(p.startswith("entry 4: its prev_hash does not match") for p in problems)
    assert "there is no signed head" in problems[-1]


def test_report_table_csv_and_chart(ledger_path: Path, tmp_path: Path) -> None:
    rows_ = audit_report.spend_rows([audit.open_file(ledger_path)])
    assert {r.analyst for r in rows_} == {"alice", "bob"}
    assert sum(r.released for r in rows_) == ENTRIES - 1
    assert sum(r.rho for r in rows_) == pytest.approx(
        sum(0.1 * (1 + i % 3) for i in range(ENTRIES) if i != 3)
    )
    by_analyst = audit_report.summarise(rows_, "analyst")
    assert [r.analyst for r in by_analyst] == ["alice", "bob"]
    csv_path, svg_path = tmp_path / "spend.csv", tmp_path / "spend.svg"
    run = CliRunner().invoke(
        app,
        ["audit", "report", str(ledger_path), "--csv", str(csv_path), "--chart", str(svg_path)],
    )
    assert run.exit_code == 0, run.output
    assert "alice" in run.output
    assert "nwc" in run.output
    header, *lines = csv_path.read_text().splitlines()
    assert header == "node,period,analyst,view,released,refused,rho,epsilon,delta"
    assert len(lines) == len(rows_)
    svg = svg_path.read_text()
    assert svg.startswith("<svg")
    assert svg.rstrip().endswith("</svg>")
    assert ">alice<" in svg
    assert ">nwc<" in svg


def test_cli_export_and_verify(ledger_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    run = CliRunner().invoke(app, ["audit", "export", str(ledger_path), "--out", str(out)])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(app, ["audit", "verify", str(out), "--json"])
    assert run.exit_code == 0, run.output
    (report,) = json.loads(run.output)
    assert report["ok"]
    assert report["entries"] == ROWS
    assert [p["entry"] for p in report["policies"]] == [1]


def _rewrite_with_the_node_key(path: Path, from_sequence: int) -> None:
    """What only the key holder can do: rewrite history, re-sign it and re-chain it."""
    loaded = serialization.load_pem_private_key(default_key_path(path).read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    entries = rows(path)
    prev = entry_hash(entries[from_sequence - 2][1], entries[from_sequence - 2][2])
    statements = []
    for seq, body, _ in entries[from_sequence - 1 :]:
        new_body = canonical_json({**json.loads(body), "query_id": "x", "prev_hash": prev})
        sig = loaded.sign(new_body)
        statements.append(
            ("UPDATE entries SET body = ?, signature = ? WHERE sequence = ?", (new_body, sig, seq))
        )
        prev = entry_hash(new_body, sig)
    head = json.loads(next(e for e in audit.open_file(path).read() if e.head).body)
    head_body = canonical_json({**head, "hash": prev})
    statements.append(
        ("UPDATE head SET body = ?, signature = ?", (head_body, loaded.sign(head_body)))
    )
    tamper(path, *statements)


def test_an_earlier_export_catches_a_rewrite_by_the_key_holder(
    ledger_path: Path, tmp_path: Path
) -> None:
    earlier = tmp_path / "earlier.jsonl"
    audit.export(audit.open_file(ledger_path), earlier)
    _rewrite_with_the_node_key(ledger_path, 3)
    # The chain and signatures hold: the key holder can do this undetected by verify alone...
    assert audit.verify(audit.open_file(ledger_path)).ok
    # ...but not against a copy an auditor kept.
    found = audit.compare_with_earlier(audit.open_file(ledger_path), audit.open_file(earlier))
    assert [a.entry for a in found] == list(range(3, ROWS + 1))
    run = CliRunner().invoke(app, ["audit", "verify", str(ledger_path), "--previous", str(earlier)])
    assert run.exit_code == 1
    assert "entry 3: differs from the earlier copy" in run.output
