"""The Models page: fill the forms with the keyboard, fit a logistic model, compare regions.

What the page must show follows from the public catalog, not from the page: a model of
`deceased` on `sex` restricted to two levels has exactly two terms (the intercept and the
non-reference level), so the coefficient table has two rows and the forest plot one; a
comparison by region has one row per node. The model is small and cheap on purpose (few
persons, two parameters, rho 0.5): the page is under test, not the statistics. Its levels
hold some 600 persons a node against the nodes' refusal threshold of 10, so no noisy design
check comes near refusing it.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

from coordinator.analyst.client import Federation
from coordinator.local.federation import LocalFederation
from tests.browser._browser import BROWSER_MARKS, Ui, screenshot
from tests.browser.conftest import next_page, wait_for

pytestmark = list(BROWSER_MARKS)

VIEW, OUTCOME, COVARIATE, RHO = "persons", "deceased", "sex", "0.5"
LEVELS = ("female", "male")  # the unknown level is too small to fit on 5,000 persons
WHERE = f"{COVARIATE}={','.join(LEVELS)}"


def _terms(federation: LocalFederation) -> list[str]:
    """The design's terms from the public catalog: intercept, then each non-reference level
    (the reference is the first level of the domain that the filter keeps)."""
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        described, _ = fed.nodes()
    domain = described[0].catalog.view(VIEW).column(COVARIATE).domain
    kept = [level for level in domain if level in LEVELS]
    return ["(intercept)"] + [f"{COVARIATE}[{level}]" for level in kept[1:]]


def _element(browser: WebDriver, css: str) -> WebElement:
    found = wait_for(browser, css)
    assert isinstance(found, WebElement)
    return found


def _type(browser: WebDriver, element_id: str, text: str) -> None:
    """Clear a text field and type into it."""
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)
    assert field.get_attribute("value") == text


def _choose(browser: WebDriver, element_id: str, option: str) -> None:
    """Pick an option of a <select> by typing its text, as a keyboard user does."""
    select = browser.find_element(By.ID, element_id)
    select.send_keys(option)
    assert select.get_attribute("value") == option, f"#{element_id} did not take {option!r}"


def _check(browser: WebDriver, element_id: str) -> None:
    """Tick a checkbox with the space bar."""
    box = browser.find_element(By.ID, element_id)
    if not box.is_selected():
        box.send_keys(Keys.SPACE)
    assert box.is_selected(), f"#{element_id} is not ticked"


def _open_pathway(browser: WebDriver, ui: Ui) -> None:
    """Open the Models page and show the pathway's columns (a GET form: no script needed)."""
    browser.get(f"{ui.base}/models")
    _choose(browser, "pathway", VIEW)
    with next_page(browser):
        browser.find_element(By.ID, "pathway-show").send_keys(Keys.ENTER)
    _element(browser, f"#model-form input[name='view'][value='{VIEW}']")


def _rows(root: WebElement, css: str, attribute: str) -> list[str]:
    return [str(r.get_attribute(attribute)) for r in root.find_elements(By.CSS_SELECTOR, css)]


def _no_error(browser: WebDriver) -> None:
    errors = browser.find_elements(By.ID, "error")
    assert not errors, f"the page showed an error: {errors[0].text}"


def _spent(federation: LocalFederation) -> dict[str, float]:
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        return {d.node: d.budget.rho_spent for d in fed.nodes()[0]}


def _forest_terms(root: WebElement) -> list[str]:
    forest = root.find_element(By.CSS_SELECTOR, "svg.chc-forest")
    terms = forest.find_elements(By.CSS_SELECTOR, "g.term")
    for term in terms:
        # Each plotted term names itself and its interval for screen readers and tooltips.
        title = term.find_element(By.TAG_NAME, "title").get_attribute("textContent") or ""
        assert "odds ratio" in title, title
        assert "95% CI" in title, title
    return [str(t.get_attribute("data-term")) for t in terms]


def test_a_logistic_fit_through_the_form_shows_its_terms_and_forest_plot(
    browser: WebDriver, ui: Ui, federation: LocalFederation
) -> None:
    terms = _terms(federation)
    _open_pathway(browser, ui)
    _choose(browser, "outcome", OUTCOME)
    _choose(browser, "family", "binomial")
    _check(browser, f"covariate-{COVARIATE}")
    _type(browser, "where", WHERE)
    _type(browser, "model-rho", RHO)

    before = _spent(federation)
    with next_page(browser):
        browser.find_element(By.ID, "model-explain").click()
    plan = _element(browser, "#model-plan, #error")
    assert plan.get_attribute("id") == "model-plan", plan.text
    nodes = _rows(plan, "#model-explain-table tr[data-node]", "data-status")
    assert nodes == ["ok"] * len(federation.nodes), plan.text
    assert _spent(federation) == before, "Explain spent budget"
    screenshot(browser, "models-explain")

    # The form keeps what was typed: Fit straight after Explain.
    assert browser.find_element(By.ID, f"covariate-{COVARIATE}").is_selected()
    with next_page(browser):
        browser.find_element(By.ID, "model-fit").click()
    result = _element(browser, "#model-result, #error")
    _no_error(browser)
    assert _rows(result, "#coefficients tr[data-term]", "data-term") == terms
    assert _forest_terms(result) == terms[1:]  # the intercept is not a ratio to plot
    screenshot(browser, "models-fit")
    spent = _spent(federation)
    assert all(spent[n] > before[n] for n in before), (before, spent)

    # Kept in History: the entry re-opens as the same table and plot.
    link = browser.find_element(By.ID, "history-link")
    entry = str(link.get_attribute("href")).rsplit("/", 1)[1]
    with next_page(browser):
        link.click()
    reopened = _element(browser, "#coefficients")
    assert browser.current_url == f"{ui.base}/history/{entry}"
    main = browser.find_element(By.TAG_NAME, "main")
    assert _rows(main, "#coefficients tr[data-term]", "data-term") == terms
    assert _forest_terms(main) == terms[1:]
    assert reopened.is_displayed()
    browser.get(f"{ui.base}/history")
    kinds = _rows(_element(browser, "#history"), f"tr[data-entry='{entry}']", "data-kind")
    assert kinds == ["model"]


def _flags(rows: Iterable[WebElement]) -> dict[str, str]:
    return {str(r.get_attribute("data-unit")): str(r.get_attribute("data-flag")) for r in rows}


def test_a_comparison_by_region_shows_every_region_and_the_funnel(
    browser: WebDriver, ui: Ui, federation: LocalFederation
) -> None:
    _open_pathway(browser, ui)
    _choose(browser, "compare-by", "region")
    _choose(browser, "compare-outcome", OUTCOME)
    _check(browser, f"adjust-{COVARIATE}")
    _type(browser, "compare-where", WHERE)
    _type(browser, "compare-rho", RHO)
    with next_page(browser):
        browser.find_element(By.ID, "compare-run").click()
    section = _element(browser, "#comparison-result, #error")
    _no_error(browser)
    flags = _flags(section.find_elements(By.CSS_SELECTOR, "#comparison tr[data-unit]"))
    assert set(flags) == {n.name for n in federation.nodes}
    assert set(flags.values()) <= {"outlier", "alert", "none"}, flags
    # The outliers and alerts are named above the plot, as the table flags them.
    outliers = [u for u, f in flags.items() if f == "outlier"]
    alerts = [u for u, f in flags.items() if f == "alert"]
    assert section.find_element(By.ID, "outliers").text.endswith(", ".join(outliers) or "none")
    assert section.find_element(By.ID, "alerts").text.endswith(", ".join(alerts) or "none")
    funnel = section.find_element(By.ID, "funnel-plot")
    assert funnel.tag_name == "svg"
    points = _flags(funnel.find_elements(By.CSS_SELECTOR, "g.unit"))
    # Every region with a ratio is a point, flagged as in the table (none is suppressed:
    # some 40 deaths a region, so no noisy expected count comes near 0).
    assert points == flags
    limits = funnel.find_elements(By.CSS_SELECTOR, "polyline.limit")
    assert sorted({str(p.get_attribute("data-level")) for p in limits}) == ["95", "99.8"]
    screenshot(browser, "models-compare")


@pytest.mark.parametrize("rho", ["lots", "-1"])
def test_a_bad_rho_shows_the_message_and_keeps_the_form(
    browser: WebDriver, ui: Ui, rho: str
) -> None:
    _open_pathway(browser, ui)
    _check(browser, f"covariate-{COVARIATE}")
    _type(browser, "model-rho", rho)
    with next_page(browser):
        browser.find_element(By.ID, "model-fit").click()
    error = _element(browser, "#error")
    assert error.get_attribute("role") == "alert"
    assert "rho" in error.text, error.text
    assert "Traceback" not in browser.page_source
    assert browser.find_element(By.ID, "model-rho").get_attribute("value") == rho
    assert browser.find_element(By.ID, f"covariate-{COVARIATE}").is_selected()
    assert not browser.find_elements(By.CSS_SELECTOR, "svg.chc-forest")
