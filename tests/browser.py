"""Headless Chromium (Debian's `chromium` and `chromium-driver`) for the tests that use a page as a
person does (tests/test_demo.py, tests/test_docs_page.py). CI installs both; there it must run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = (
            "headless Chromium needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run installs them, and CI must run this test")
        pytest.skip(reason)
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # the browser calls no service of its own either
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Chromium's temp files (its profile) in a dir of ours, removed after: none left in /tmp.
    # Short: the profile holds a unix socket, whose path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="mbr-chromium-") as private:
        service = Service(executable_path=CHROMEDRIVER, env={**os.environ, "TMPDIR": private})
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()


def waiter(driver: WebDriver, screenshots: Path, describe: Callable[[], str] = str) -> Callable[..., Any]:
    """`wait(condition, what, timeout)`: poll until `condition(driver)` holds; else a screenshot in
    `screenshots` and an AssertionError naming `what` (and `describe()`, the page's own words)."""

    def wait(condition: Callable[[WebDriver], Any], what: str, timeout: float = 20) -> Any:
        try:
            return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            shot = screenshots / "browser-failure.png"
            driver.save_screenshot(str(shot))
            raise AssertionError(f"{what}: not within {timeout} s; {describe()} (screenshot {shot})") from None

    return wait


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """What the page's console said at level SEVERE: script errors, refused loads."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e["level"] == "SEVERE"]
