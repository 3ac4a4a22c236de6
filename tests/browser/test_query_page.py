"""The Query and History pages: type SQL, Explain, Run, read the chart, re-open and export.

The chart's expected size comes from the public catalog, not from the page: a query grouped
by a column with a public domain of G values, over N nodes, has G x (N + 1) cells (the
pooled region last); each published cell is one bar with one whisker, each suppressed cell
one `text.suppressed` mark.
"""

from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from coordinator.analyst.client import Federation
from coordinator.local.federation import LocalFederation
from queries.combine import POOLED
from tests.browser._browser import BROWSER_MARKS, Ui, screenshot
from tests.browser.conftest import WAIT_S, next_page, wait_for

pytestmark = list(BROWSER_MARKS)

VIEW, GROUP, RHO = "persons", "age_band", "0.1"
SQL = "SELECT age_band, COUNT(*) AS persons FROM persons GROUP BY age_band"


def _domain(federation: LocalFederation) -> tuple[str, ...]:
    """The grouping column's public domain, as every node's catalog publishes it."""
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        described, _ = fed.nodes()
    domains = {d.catalog.view(VIEW).column(GROUP).domain for d in described}
    assert len(domains) == 1, f"the nodes publish different domains for {GROUP}: {domains}"
    return domains.pop()


def _type_query(browser: WebDriver, ui: Ui, sql: str) -> None:
    """Open the Query page and type the SQL and rho with the keyboard."""
    browser.get(f"{ui.base}/query")
    editor = wait_for(browser, "#sql")
    assert isinstance(editor, WebElement)
    editor.clear()
    editor.send_keys(sql)
    rho = browser.find_element(By.ID, "rho")
    rho.clear()
    rho.send_keys(RHO)
    assert editor.get_attribute("value") == sql


@dataclass(frozen=True)
class Chart:
    """What the drawn chart holds, counted from the page."""

    panels: list[str]  # data-region of each panel, in order
    pooled_last: bool
    bars: int
    whiskers: int
    suppressed: int
    per_panel: dict[str, int]  # bars + suppressed marks in each panel


def _chart(root: WebElement) -> Chart:
    svg = root.find_element(By.CSS_SELECTOR, "svg.chc-chart")
    panels = svg.find_elements(By.CSS_SELECTOR, "g.panel")
    per_panel = {
        p.get_attribute("data-region") or "": len(
            p.find_elements(By.CSS_SELECTOR, "rect.bar, text.suppressed")
        )
        for p in panels
    }
    return Chart(
        panels=[p.get_attribute("data-region") or "" for p in panels],
        pooled_last=bool(panels) and "pooled" in (panels[-1].get_attribute("class") or ""),
        bars=len(svg.find_elements(By.CSS_SELECTOR, "rect.bar")),
        whiskers=len(svg.find_elements(By.CSS_SELECTOR, "line.whisker")),
        suppressed=len(svg.find_elements(By.CSS_SELECTOR, "text.suppressed")),
        per_panel=per_panel,
    )


@dataclass(frozen=True)
class Table:
    """The rows of #result-table: published and suppressed cells."""

    published: int
    suppressed: int


def _table(root: WebElement) -> Table:
    found = root.find_elements(By.CSS_SELECTOR, "#result-table tbody tr[data-suppressed]")
    flags = [r.get_attribute("data-suppressed") for r in found]
    return Table(published=flags.count("false"), suppressed=flags.count("true"))


@pytest.fixture(scope="module")
def domain(federation: LocalFederation) -> tuple[str, ...]:
    return _domain(federation)


@dataclass(frozen=True)
class Ran:
    """The Query page's answer to Run, as counted there."""

    chart: Chart
    table: Table


@pytest.fixture(scope="module")
def ran(browser: WebDriver, ui: Ui) -> Ran:
    """Type SQL, press Run, count what is drawn (one query, shared by the tests)."""
    _type_query(browser, ui, SQL)
    with next_page(browser):
        browser.find_element(By.ID, "run").click()
    section = wait_for(browser, "#result, #error")
    assert isinstance(section, WebElement)
    errors = browser.find_elements(By.ID, "error")
    assert not errors, f"Run showed an error: {errors[0].text}"
    screenshot(browser, "query-result")
    return Ran(chart=_chart(section), table=_table(section))


def test_explain_shows_cost_and_noise_for_every_node_and_spends_nothing(
    browser: WebDriver, ui: Ui, federation: LocalFederation
) -> None:
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
    _type_query(browser, ui, SQL)
    with next_page(browser):
        browser.find_element(By.ID, "explain").click()
    section = wait_for(browser, "#explain-result, #error")
    assert isinstance(section, WebElement)
    assert section.get_attribute("id") == "explain-result", section.text
    found = section.find_elements(By.CSS_SELECTOR, "#explain-table tr[data-node]")
    statuses = {r.get_attribute("data-node"): r.get_attribute("data-status") for r in found}
    assert statuses == {n.name: "ok" for n in federation.nodes}
    for row in found:
        # Each node's row shows the rho it would charge and a noise sd for the measure.
        assert RHO in row.text, row.text
        noise = row.find_elements(By.CSS_SELECTOR, ".noise[data-measure]")
        assert len(noise) == 1, row.text  # one measure, one noise sd
        assert re.search(r": \d+(\.\d+)?$", noise[0].text), noise[0].text
    # The SQL stays in the editor for the Run that follows.
    assert browser.find_element(By.ID, "sql").get_attribute("value") == SQL
    screenshot(browser, "explain")
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        after = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
    assert after == before, "Explain spent budget"


def test_run_draws_one_bar_and_whisker_per_published_cell(
    ran: Ran, federation: LocalFederation, domain: tuple[str, ...]
) -> None:
    chart = ran.chart
    regions = [n.name for n in federation.nodes]
    titles = {n.name: n.title or n.name for n in federation.nodes}
    assert len(chart.panels) == len(regions) + 1, chart.panels
    assert chart.panels[-1] == POOLED
    assert chart.pooled_last, "the pooled panel should be highlighted"
    assert set(chart.panels[:-1]) <= set(titles.values()) | set(regions), chart.panels
    cells = len(domain) * (len(regions) + 1)
    assert chart.bars + chart.suppressed == cells
    assert all(n == len(domain) for n in chart.per_panel.values()), chart.per_panel
    # A noisy count always has a 95% interval: one whisker per bar, none for a suppressed cell.
    assert chart.whiskers == chart.bars
    # The table beside it has one row per cell of the one measure, flagged alike.
    assert ran.table == Table(published=chart.bars, suppressed=chart.suppressed)


def test_history_reopens_the_result_and_exports_csv(
    browser: WebDriver, ui: Ui, ran: Ran, downloads: Path, domain: tuple[str, ...]
) -> None:
    shown = ran.chart
    browser.get(f"{ui.base}/history")
    wait_for(browser, "#history")
    entries = [
        r
        for r in browser.find_elements(By.CSS_SELECTOR, "#history tr[data-entry]")
        if "age_band" in r.text
    ]
    assert entries, "the query just run is not in the history"
    entry = entries[0].get_attribute("data-entry")
    screenshot(browser, "history")
    with next_page(browser):
        entries[0].find_element(By.CSS_SELECTOR, f"a[href='/history/{entry}']").click()
    reopened = wait_for(browser, "#result-table")
    assert browser.current_url == f"{ui.base}/history/{entry}"
    assert isinstance(reopened, WebElement)
    main = browser.find_element(By.TAG_NAME, "main")
    assert _chart(main) == shown, "the re-opened result draws a different chart"
    assert _table(main) == ran.table

    link = browser.find_element(By.CSS_SELECTOR, f"a[href='/history/{entry}.csv']")
    link.click()
    saved = _downloaded(downloads, ".csv")
    with saved.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {"region", GROUP, "measure", "estimate", "ci_low", "ci_high"} <= set(rows[0])
    assert len(rows) == len(domain) * len(shown.panels)
    assert {r["region"] for r in rows} >= {POOLED}
    assert {r[GROUP] for r in rows} == set(domain)
    published = [r for r in rows if r["estimate"] not in ("", "None", "nan")]
    assert len(published) == shown.bars


def _downloaded(folder: Path, suffix: str) -> Path:
    """The one finished download with that suffix (Chromium writes .crdownload first)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.name.endswith(suffix)]
        partial = [p for p in folder.iterdir() if p.name.endswith(".crdownload")]
        if done and not partial:
            assert len(done) == 1, f"several downloads: {done}"
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no {suffix} download in {folder} within {WAIT_S:g} s")


def test_a_refused_query_shows_its_error_without_a_traceback(browser: WebDriver, ui: Ui) -> None:
    # person_id has no public domain: grouping by it would publish who is in the data.
    _type_query(browser, ui, "SELECT COUNT(*) FROM persons GROUP BY person_id")
    with next_page(browser):
        browser.find_element(By.ID, "run").click()
    error = wait_for(browser, "#error, #result")
    assert isinstance(error, WebElement)
    assert error.get_attribute("id") == "error", "a query no node may answer was answered"
    assert error.get_attribute("role") == "alert"
    assert "person_id" in error.text, error.text
    assert "Traceback" not in browser.page_source
    assert not browser.find_elements(By.CSS_SELECTOR, "svg.chc-chart")
    screenshot(browser, "query-error")


def _press(browser: WebDriver, button: str, answer: str) -> WebElement:
    """Press a button of the query form and return the section the page answers with."""
    with next_page(browser):
        browser.find_element(By.ID, button).click()
    section = wait_for(browser, f"#{answer}, #error")
    assert isinstance(section, WebElement)
    assert section.get_attribute("id") == answer, section.text
    return section


def test_pooled_only_compares_both_noises_then_draws_the_pooled_panel_alone(
    browser: WebDriver, ui: Ui, federation: LocalFederation, domain: tuple[str, ...]
) -> None:
    """Tick 'Pooled only' with the keyboard: Explain sets each node's own noise beside
    secure aggregation's, and Run draws one panel (the pooled one) with the guarantee."""
    k = len(federation.nodes)
    _type_query(browser, ui, SQL)
    box = browser.find_element(By.ID, "pooled_only")
    assert not box.is_selected()
    box.send_keys(" ")  # a checkbox toggles on Space, as a keyboard user would
    assert box.is_selected()
    section = _press(browser, "explain", "explain-result")
    guarantee = section.find_element(By.ID, "secure-explain-guarantee").text
    assert f"secure aggregation over {k} nodes" in guarantee, guarantee
    ratios = section.find_elements(By.CSS_SELECTOR, "#noise-comparison td.ratio")
    assert len(ratios) == 1  # one component: the row count
    # About sqrt(k) narrower (the shares' rounding costs a few percent, KLS21).
    narrower = re.match(r"[0-9.]+", ratios[0].text)
    assert narrower is not None, ratios[0].text
    assert abs(float(narrower[0]) / k**0.5 - 1) < 0.15, ratios[0].text
    # The choice survives the round trip, so Run asks for the same thing.
    assert browser.find_element(By.ID, "pooled_only").is_selected()
    screenshot(browser, "explain-pooled-only")

    result = _press(browser, "run", "result")
    stated = result.find_element(By.ID, "secure-guarantee").text
    assert f"secure aggregation over {k} nodes" in stated, stated
    chart = _chart(result)
    assert chart.panels == [POOLED]
    assert chart.bars + chart.suppressed == len(domain)
    assert chart.whiskers == chart.bars
    assert _table(result) == Table(published=chart.bars, suppressed=chart.suppressed)
    screenshot(browser, "query-pooled-only")
