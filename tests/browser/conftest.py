"""A real federation, `chc ui` in front of it, and a headless Chromium to drive it.

One federation, one `chc ui` and one browser are shared by the whole package (starting them
takes several seconds); a test that damages its federation (the tampered ledger) starts its
own of each.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation, NodeSetup
from protocols.security.pki import Role
from tests.browser._browser import Ui, new_driver, running_ui

# Few persons: the pages, not the statistics, are under test here.
PERSONS = 5_000
WAIT_S = 30.0


def make_federation(
    root: Path, regions: tuple[synth.Region, ...] = synth.REGIONS
) -> LocalFederation:
    """A federation of `regions` on synthetic data (not started)."""
    folders = synth.generate_federation(PERSONS, root / "data", seed=7)
    setups = tuple(NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name) for r in regions)
    return LocalFederation(workdir=root, nodes=setups, deadline_ms=10_000)


def auditor_identity(fed: LocalFederation) -> Path:
    """The federation's auditor identity folder."""
    return fed.identity_dir(Role.AUDITOR, AUDITOR_NAME)


@contextmanager
def start_ui(fed: LocalFederation, root: Path, *, auditor: bool = True) -> Iterator[Ui]:
    """`chc ui` for the federation's analyst (and auditor), its history and logs under root."""
    root.mkdir(parents=True, exist_ok=True)
    with running_ui(
        hub=fed.hub_address,
        identity=fed.analyst_identity,
        auditor=auditor_identity(fed) if auditor else None,
        history=root / "history.sqlite",
        log=root / "ui.log",
    ) as ui:
        yield ui


@pytest.fixture(scope="package")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """The shared federation: four regions, real nodes and hub, mutual TLS on loopback."""
    with make_federation(tmp_path_factory.mktemp("browser-fed")) as fed:
        yield fed


@pytest.fixture(scope="package")
def ui(federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """`chc ui` in front of the shared federation, as its analyst with an auditor identity."""
    with start_ui(federation, tmp_path_factory.mktemp("browser-ui")) as running:
        yield running


BrowserFactory = Callable[[str], WebDriver]


@pytest.fixture(scope="package")
def browsers_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each browser's profile, downloads and driver log, in a folder by its name."""
    return tmp_path_factory.mktemp("chromium")


@pytest.fixture(scope="package")
def open_browser(browsers_root: Path) -> Iterator[BrowserFactory]:
    """Start headless Chromiums, each with a fresh profile; all quit at the end."""
    drivers: list[WebDriver] = []
    patch = pytest.MonkeyPatch()
    # Belt and braces: Selenium Manager is skipped anyway, as the driver is named (_browser).
    patch.setenv("SE_OFFLINE", "true")

    def start(name: str) -> WebDriver:
        root = browsers_root / name
        (root / "downloads").mkdir(parents=True)
        drivers.append(new_driver(root / "profile", root / "downloads", root / "driver.log"))
        return drivers[-1]

    try:
        yield start
    finally:
        for driver in drivers:
            driver.quit()
        patch.undo()


@pytest.fixture(scope="package")
def browser(open_browser: BrowserFactory, ui: Ui) -> WebDriver:
    """The shared browser, signed in to the shared `chc ui`."""
    driver = open_browser("shared")
    sign_in(driver, ui)
    return driver


@pytest.fixture(scope="package")
def downloads(browsers_root: Path) -> Path:
    """Where the shared browser (the `browser` fixture) saves downloads."""
    return browsers_root / "shared" / "downloads"


def sign_in(driver: WebDriver, ui: Ui) -> None:
    """Open the printed URL: the app trades the token for its cookie and lands on `/`."""
    # Each `chc ui` has its own cookie (named by port), but a fresh start is clearer.
    driver.get(f"{ui.base}/static/")
    driver.delete_all_cookies()
    driver.get(ui.login_url)
    wait_for(driver, "#nodes")


def wait_for(driver: WebDriver, css: str, timeout: float = WAIT_S) -> object:
    """The first element matching css once it is on the page (fails after timeout)."""
    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css)),
        message=f"no {css} on {driver.current_url} within {timeout:g} s",
    )


@contextmanager
def next_page(driver: WebDriver, timeout: float = WAIT_S) -> Iterator[None]:
    """Wait, after the block (a click or Enter that submits), until the page it was on has
    been replaced: otherwise a wait for an element that both pages have finds the old one,
    and the next keystrokes go to a page that is about to go away."""
    old = driver.find_element(By.TAG_NAME, "html")
    yield
    WebDriverWait(driver, timeout).until(
        ec.staleness_of(old), message=f"{driver.current_url} was not replaced in {timeout:g} s"
    )


def http_status(ui: Ui, method: str, path: str, **headers: str) -> tuple[int, str]:
    """Status and body of a request made without the browser (and so without its cookie)."""
    con = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=WAIT_S)
    try:
        body = b"sql=SELECT+1&action=run" if method == "POST" else None
        if body is not None:
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        con.request(method, path, body=body, headers=headers)
        response = con.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    finally:
        con.close()
