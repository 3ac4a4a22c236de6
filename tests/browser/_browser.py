"""Debian's Chromium driven by Selenium, offline, and `chc ui` as a child process.

Selenium Manager (which downloads browsers and drivers) must never run: no internet at test
time. Naming the driver in Service(executable_path=...) makes Selenium skip it
(selenium/webdriver/common/driver_finder.py: "Skipping Selenium Manager"), and SE_OFFLINE=true
is set as well in case a later Selenium consults it anyway.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless, no GPU, no sandbox (CI runs as root), and nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
)
UI_LINE = re.compile(
    r"^chc ui: (?P<base>http://127\.0\.0\.1:(?P<port>\d+))/\?token=(?P<token>\S+)$"
)
UI_START_TIMEOUT_S = 60.0


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when Chromium and its driver exist."""
    absent = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not absent:
        return None
    return (
        f"{' and '.join(absent)} not found: the browser tests need Debian's chromium and "
        "chromium-driver (`make system-deps` installs them)"
    )


# Every test module here: `browser`, and skipped (saying why) only where Chromium is absent.
BROWSER_MARKS = (
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(missing_browser() is not None, reason=missing_browser() or ""),
)


def artifacts_dir() -> Path:
    """Where screenshots go: $CHC_TEST_ARTIFACTS/browser, else build/test-artifacts/browser."""
    root = Path(os.environ.get("CHC_TEST_ARTIFACTS") or "build/test-artifacts")
    folder = root / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_driver(profile: Path, downloads: Path, log: Path) -> WebDriver:
    """A headless Chromium with a fresh profile that saves downloads into `downloads`."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
        },
    )
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    return driver


def screenshot(driver: WebDriver, name: str, *, whole_page: bool = True) -> Path:
    """Save the page as NAME.png among the test artefacts (else just what a 1280x800 window
    shows)."""
    path = artifacts_dir() / f"{name}.png"
    if not whole_page:
        driver.save_screenshot(str(path))
        return path
    # The window is 1280x800; a taller page is captured whole by widening the viewport
    # to its scroll height for the shot, then put back.
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, max(800, min(height + 140, 4000)))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(1280, 800)
    return path


@dataclass(frozen=True)
class Ui:
    """A running `chc ui`: its base URL (no trailing slash), port and token."""

    base: str
    port: int
    token: str
    log: Path

    @property
    def cookie(self) -> str:
        """The session cookie's name: per port, so two `chc ui` do not sign each other out."""
        return f"chc_ui_token_{self.port}"

    @property
    def login_url(self) -> str:
        """The URL `chc ui` printed, with the token."""
        return f"{self.base}/?token={self.token}"


@contextmanager
def running_ui(
    *, hub: str, identity: Path, auditor: Path | None, history: Path, log: Path
) -> Iterator[Ui]:
    """Start `chc ui` on any free port, parse its one stdout line, SIGTERM it at the end."""
    chc = Path(sys.executable).with_name("chc")
    args = [str(chc), "ui", "--port", "0", "--no-browser", "--hub", hub]
    args += ["--identity", str(identity), "--history", str(history)]
    if auditor is not None:
        args += ["--auditor-identity", str(auditor)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    with log.open("w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        lines: Queue[str] = Queue()
        # Keeps reading stdout after the first line, so a chatty app never blocks on a full
        # pipe; everything it prints lands in the log too.
        reader = threading.Thread(target=_pump, args=(proc, lines, log), daemon=True)
        reader.start()
        try:
            yield _first_line(proc, lines, log)
        finally:
            _stop(proc)
            reader.join(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
    assert proc.returncode == 0, f"chc ui exited {proc.returncode} on SIGTERM:\n{_tail(log)}"


def _pump(proc: subprocess.Popen[str], lines: Queue[str], log: Path) -> None:
    assert proc.stdout is not None
    with (log.parent / f"{log.stem}.stdout").open("w", encoding="utf-8") as out:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            lines.put(line.rstrip("\n"))


def _first_line(proc: subprocess.Popen[str], lines: Queue[str], log: Path) -> Ui:
    try:
        line = lines.get(timeout=UI_START_TIMEOUT_S)
    except Empty:
        raise AssertionError(
            f"chc ui printed nothing within {UI_START_TIMEOUT_S:g} s (exit code "
            f"{proc.poll()}):\n{_tail(log)}"
        ) from None
    found = UI_LINE.match(line)
    assert found, f"chc ui's first line is not 'chc ui: http://127.0.0.1:PORT/?token=T': {line!r}"
    return Ui(base=found["base"], port=int(found["port"]), token=found["token"], log=log)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {log})"
    return "\n".join(f"  | {line}" for line in text[-lines:])
