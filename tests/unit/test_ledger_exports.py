"""Exports of a SQLite ledger and the auditors' reports (coordinator.audit, `chc audit`).

An export verifies like the ledger it came from, a tampered one is named, the spend report
comes as a table, CSV and a chart, and an earlier export catches a rewrite that only the
holder of the node's key could make.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from coordinator.audit import report as audit_report
from coordinator.audit.export import export
from coordinator.audit.sources import open_file
from coordinator.audit.verification import compare_with_earlier, verify
from coordinator.cli import app
from protocols.ledger.entry import canonical_json, default_key_path, entry_hash
from tests.unit._accounting_helpers import Pki, make_pki
from tests.unit._ledger_helpers import ENTRIES, ROWS, rows, tamper, write_ledger


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ledger_path(tmp_path: Path, pki: Pki) -> Path:
    """A fresh copy of write_ledger's ledger for each test."""
    return write_ledger(tmp_path / "nwc.ledger.sqlite", pki)


# ---- exports and reports -------------------------------------------------------------------


@pytest.fixture
def exports(ledger_path: Path, tmp_path: Path) -> Iterator[dict[str, Path]]:
    source = open_file(ledger_path)
    out = {}
    for fmt in ("jsonl", "parquet"):
        out[fmt] = tmp_path / f"export.{fmt}"
        assert export(source, out[fmt]) == ROWS
    return out


def test_exports_verify_like_the_ledger(exports: dict[str, Path], pki: Pki) -> None:
    for path in exports.values():
        result = verify(open_file(path), ca_pem=pki.ca_pem)
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
    result = verify(open_file(path))
    problems = [str(a) for a in result.anomalies]
    assert any(p.startswith("entry 3: its signature does not verify") for p in problems)
    assert any(p.startswith("entry 4: its prev_hash does not match") for p in problems)
    assert "there is no signed head" in problems[-1]


def test_report_table_csv_and_chart(ledger_path: Path, tmp_path: Path) -> None:
    rows_ = audit_report.spend_rows([open_file(ledger_path)])
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
    head = json.loads(next(e for e in open_file(path).read() if e.head).body)
    head_body = canonical_json({**head, "hash": prev})
    statements.append(
        ("UPDATE head SET body = ?, signature = ?", (head_body, loaded.sign(head_body)))
    )
    tamper(path, *statements)


def test_an_earlier_export_catches_a_rewrite_by_the_key_holder(
    ledger_path: Path, tmp_path: Path
) -> None:
    earlier = tmp_path / "earlier.jsonl"
    export(open_file(ledger_path), earlier)
    _rewrite_with_the_node_key(ledger_path, 3)
    # The chain and signatures hold: the key holder can do this undetected by verify alone...
    assert verify(open_file(ledger_path)).ok
    # ...but not against a copy an auditor kept.
    found = compare_with_earlier(open_file(ledger_path), open_file(earlier))
    assert [a.entry for a in found] == list(range(3, ROWS + 1))
    run = CliRunner().invoke(app, ["audit", "verify", str(ledger_path), "--previous", str(earlier)])
    assert run.exit_code == 1
    assert "entry 3: differs from the earlier copy" in run.output
