"""`chc ui`'s door and its Federation page, in a real Chromium against a real federation.

Without the printed token the app refuses everything but its static files; with it, the
browser trades the token for a cookie and lands on the Federation page, which lists every
node as ok. Keyboard and accessibility basics are checked on every page.
"""

from __future__ import annotations

import http.client

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from coordinator.local.federation import LocalFederation
from tests.browser._browser import BROWSER_MARKS, Ui, screenshot
from tests.browser.conftest import http_status, wait_for

pytestmark = list(BROWSER_MARKS)

PAGES = ("/", "/query", "/history", "/audit")


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/", {}),
        ("GET", "/query", {}),
        ("GET", "/history", {}),
        ("GET", "/audit", {}),
        ("GET", "/fragments/nodes", {}),
        ("GET", "/history/1.csv", {}),
        ("GET", "/history/1.parquet", {}),
        ("GET", "/?token=not-the-token", {}),
        ("GET", "/query", {"Cookie": "{cookie}=not-the-token"}),
        ("GET", "/query", {"Cookie": "chc_ui_token=not-the-token"}),
        ("POST", "/query", {}),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ("cookie" if v else ""),
)
def test_without_the_token_the_app_refuses(
    ui: Ui, method: str, path: str, headers: dict[str, str]
) -> None:
    # The cookie's name has the port in it, known only once the app runs.
    headers = {k: v.format(cookie=ui.cookie) for k, v in headers.items()}
    if method == "POST":
        # A same-origin form, but with no cookie: SameSite=Strict alone is not the fence.
        headers = {**headers, "Origin": ui.base}
    status, body = http_status(ui, method, path, **headers)
    assert status == 403, f"{method} {path} answered {status} without the token"
    assert "chc ui" in body, "the refusal should say to open the URL chc ui printed"
    assert ui.token not in body


def test_the_token_is_traded_for_an_http_only_strict_cookie(ui: Ui) -> None:
    con = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=30)
    try:
        con.request("GET", f"/query?token={ui.token}")
        response = con.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie") or ""
        assert response.status == 303
        # Redirected to the same page without the token, so it leaves the address bar.
        assert response.getheader("Location") == "/query"
    finally:
        con.close()
    assert cookie.startswith(f"chc_ui_token_{ui.port}={ui.token};")
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    status, _ = http_status(ui, "GET", "/query", Cookie=f"{ui.cookie}={ui.token}")
    assert status == 200


def test_a_wrong_host_is_refused_even_with_the_cookie(ui: Ui) -> None:
    # DNS rebinding: a page from evil.example resolved to 127.0.0.1 sends its own Host.
    status, _ = http_status(
        ui, "GET", "/", Host=f"evil.example:{ui.port}", Cookie=f"{ui.cookie}={ui.token}"
    )
    assert status == 403


def test_the_printed_url_lands_on_the_federation_page_with_every_node_ok(
    browser: WebDriver, ui: Ui, federation: LocalFederation
) -> None:
    browser.get(ui.login_url)
    wait_for(browser, "#nodes")
    assert browser.current_url == f"{ui.base}/", "the token should be gone from the address"
    assert ui.token not in browser.current_url
    # What a person opening the dashboard sees first, before scrolling.
    screenshot(browser, "first-screen", whole_page=False)
    rows = browser.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]")
    statuses = {r.get_attribute("data-node"): r.get_attribute("data-status") for r in rows}
    assert statuses == {n.name: "ok" for n in federation.nodes}
    catalogs = browser.find_elements(By.CSS_SELECTOR, "details.catalog[data-node]")
    assert {c.get_attribute("data-node") for c in catalogs} == set(statuses)
    # Open one node's catalog: its views and the domains of their columns are shown.
    catalogs[0].find_element(By.TAG_NAME, "summary").click()
    text = catalogs[0].text
    assert "persons" in text
    assert "age_band" in text
    assert "female" in text
    screenshot(browser, "federation")


@pytest.mark.parametrize("path", PAGES)
def test_every_page_has_landmarks_and_labels_for_its_inputs(
    browser: WebDriver, ui: Ui, path: str
) -> None:
    browser.get(f"{ui.base}{path}")
    wait_for(browser, "main")
    assert browser.find_elements(By.TAG_NAME, "main"), f"{path} has no <main>"
    assert browser.find_elements(By.TAG_NAME, "nav"), f"{path} has no <nav>"
    fields = browser.find_elements(By.CSS_SELECTOR, "input, textarea, select")
    for field in fields:
        kind = (field.get_attribute("type") or "").lower()
        if kind in {"hidden", "submit", "button", "reset", "image"}:
            continue
        name = field.get_attribute("id") or ""
        assert name, f"an input on {path} has no id, so no <label for> can name it"
        labels = browser.find_elements(By.CSS_SELECTOR, f"label[for='{name}']")
        assert labels, f"#{name} on {path} has no <label for={name!r}>"
        assert labels[0].text.strip(), f"the label of #{name} on {path} is empty"


def test_the_keyboard_reaches_the_editor_and_both_buttons_in_order(
    browser: WebDriver, ui: Ui
) -> None:
    browser.get(f"{ui.base}/query")
    wait_for(browser, "#sql")
    body = browser.find_element(By.TAG_NAME, "body")
    body.click()
    seen: list[str] = []
    for _ in range(80):
        body = browser.switch_to.active_element
        body.send_keys(Keys.TAB)
        focused = browser.switch_to.active_element.get_attribute("id") or ""
        if focused in {"sql", "explain", "run"} and focused not in seen:
            seen.append(focused)
        if len(seen) == 3:
            break
    assert seen == ["sql", "explain", "run"], f"Tab reached {seen} (in that order)"
