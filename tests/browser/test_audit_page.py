"""The Audit page: every node's ledger verified, and a tampered one named FAILED with its entry.

The tampering is what an attacker with write access to a running node's ledger file can do:
edit one charge in place with sqlite3 (tests/unit/_ledger_helpers.tamper). The node keeps
serving (it checked its ledger when it opened it); the auditor's full check, which the Audit
page runs over mutual TLS, must name the entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation
from protocols.ledger.entry import canonical_json
from queries.sql import parse_sql
from tests.browser._browser import BROWSER_MARKS, Ui, screenshot
from tests.browser.conftest import BrowserFactory, make_federation, sign_in, start_ui, wait_for
from tests.unit._ledger_helpers import rows, tamper

pytestmark = list(BROWSER_MARKS)


def _verdicts(browser: WebDriver) -> dict[str, tuple[str, str]]:
    """Each #audit-nodes row: node -> (data-verified, its text)."""
    wait_for(browser, "#audit-nodes")
    found = browser.find_elements(By.CSS_SELECTOR, "#audit-nodes tr[data-node]")
    return {
        r.get_attribute("data-node") or "": (r.get_attribute("data-verified") or "", r.text)
        for r in found
    }


def test_an_auditor_sees_a_verified_chain_for_every_node(
    browser: WebDriver, ui: Ui, federation: LocalFederation
) -> None:
    browser.get(f"{ui.base}/audit")
    verdicts = _verdicts(browser)
    assert set(verdicts) == {n.name for n in federation.nodes}
    for node, (verified, text) in verdicts.items():
        assert verified == "true", f"{node}: {text}"
        assert "verified" in text.lower(), f"{node}: {text}"
        assert "FAILED" not in text
    screenshot(browser, "audit")


def _edit_last_charge(ledger: Path) -> int:
    """Lower the rho of the ledger's last charge in place; its sequence number."""
    charges = [(seq, body) for seq, body, _ in rows(ledger) if "rho" in json.loads(body)]
    assert charges, f"no charge in {ledger} to tamper with"
    sequence, body = charges[-1]
    edited = canonical_json({**json.loads(body), "rho": 1e-9})
    tamper(ledger, ("UPDATE entries SET body = ? WHERE sequence = ?", (edited, sequence)))
    return sequence


def test_a_tampered_ledger_shows_as_failed_naming_the_entry(
    tmp_path: Path, open_browser: BrowserFactory
) -> None:
    # A federation of its own: its ledger is damaged for good.
    regions = synth.REGIONS[:2]
    with make_federation(tmp_path / "fed", regions) as fed:
        with Federation(fed.hub_address, fed.analyst_identity) as client:
            client.query(parse_sql("SELECT sex, COUNT(*) FROM persons GROUP BY sex", rho=0.05))
        victim, intact = (r.slug for r in regions)
        sequence = _edit_last_charge(fed.ledger_path(victim))
        with start_ui(fed, tmp_path / "ui") as ui:
            browser = open_browser("tampered")
            sign_in(browser, ui)
            browser.get(f"{ui.base}/audit")
            verdicts = _verdicts(browser)
            screenshot(browser, "audit-tampered")
    assert verdicts[intact][0] == "true", verdicts[intact][1]
    verified, text = verdicts[victim]
    assert verified == "false", text
    assert "FAILED" in text
    assert f"entry {sequence}" in text, f"the failure should name entry {sequence}: {text}"
