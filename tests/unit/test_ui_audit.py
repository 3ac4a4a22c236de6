"""The Audit page's data: a real ledger verifies; an edited one fails naming its entry; the
spend charts draw one point per released charge."""

from __future__ import annotations

import json
import math
from pathlib import Path

from coordinator.audit.sources import open_file
from coordinator.ui.audit import audit
from coordinator.ui.spend_chart import spend_svg
from protocols.ledger.entry import canonical_json
from tests.unit._accounting_helpers import make_pki
from tests.unit._ledger_helpers import ENTRIES, rows, tamper, write_ledger

RELEASED = ENTRIES - 1  # write_ledger refuses one query (entry 5)


def test_a_real_ledger_verifies_and_its_spend_is_charted(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ledger = write_ledger(tmp_path / "nwc.ledger.sqlite", pki)
    report = audit([open_file(ledger)], ca_pem=pki.ca_pem)
    [node] = report.nodes
    assert node.node == "nwc"
    assert node.verified
    assert node.summary == "verified"
    assert node.result is not None
    assert node.result.released == RELEASED
    assert len(report.spend) == RELEASED
    assert {s.analyst for s in report.spend} == {"alice", "bob"}
    assert math.isclose(sum(s.rho for s in report.spend), sum(r.rho for r in report.totals))
    svg = spend_svg(report.spend, "analyst")
    assert svg.count('<circle class="point"') == RELEASED
    assert svg.count('<g class="series"') == 2
    assert "<title" in svg
    assert 'role="img"' in svg
    by_view = spend_svg(report.spend, "view")
    assert by_view.count('<g class="series"') == 1
    assert 'data-series="persons"' in by_view


def test_an_edited_entry_fails_naming_it(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ledger = write_ledger(tmp_path / "nwc.ledger.sqlite", pki)
    _, body, _ = rows(ledger)[6]  # entry 7, a release
    edited = canonical_json({**json.loads(body), "rho": 0.001})
    tamper(ledger, ("UPDATE entries SET body = ? WHERE sequence = 7", (edited,)))
    [node] = audit([open_file(ledger)], ca_pem=pki.ca_pem).nodes
    assert not node.verified
    assert node.summary.startswith("FAILED: entry 7: ")
    assert node.result is not None
    assert all(a.entry is not None for a in node.result.anomalies)


def test_no_spend_draws_an_empty_chart_that_says_so() -> None:
    svg = spend_svg([], "analyst")
    assert "No released charges" in svg
    assert '<circle class="point"' not in svg
