"""/docs as a person uses it: headless Chromium against a real uvicorn serving the API (on the
backend of real parts without services, tests/fakes.py). Every operation of /openapi.json is on
the page, one is tried from it with the uxid header and another with the admin token, and the
console stays clean. (Swagger UI 4.15 read only OpenAPI 3.0 and showed nothing but an error.)"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from api.app import create_app
from api.openapi import openapi
from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from system.local.processes import free_port
from tests.browser import console_errors, waiter
from tests.conftest import SMALL_CSV
from tests.fakes import FakeBackend

pytestmark = pytest.mark.browser  # not in the unit tier: a browser is a program of its own

TOKEN = "docs-page-admin-token-0123456789"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # on a thread of the test: signals stay the test runner's


@pytest.fixture
def served() -> Iterator[str]:
    """The API over HTTP on 127.0.0.1, from a thread of this process."""
    app = create_app(FakeBackend(Catalog.from_movies(list(read_movies(SMALL_CSV)))), admin_token=TOKEN)
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="docs-page-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def operation(driver: WebDriver, method: str, path: str) -> WebElement:
    """The operation's block on the page, opened."""
    for block in driver.find_elements(By.CSS_SELECTOR, f".opblock.opblock-{method}"):
        if block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path") == path:
            if not block.find_elements(By.CSS_SELECTOR, ".opblock-body"):
                block.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
            return block
    raise AssertionError(f"no {method.upper()} {path} on the page")


@pytest.mark.timeout(120)
def test_the_docs_render_every_route_and_try_one_out_with_the_uxid_and_the_admin_token(
    browser: WebDriver, served: str, tmp_path: Path
) -> None:
    wait = waiter(browser, tmp_path, lambda: browser.find_element(By.TAG_NAME, "body").text[:300])
    browser.get(f"{served}/docs")
    spec = openapi()
    operations = sum(1 for methods in spec["paths"].values() for m in methods if m != "parameters")
    wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations, f"{operations} operations")
    assert "Unable to render" not in browser.find_element(By.TAG_NAME, "body").text

    # A slate, for a user typed in the uxid field.
    block = operation(browser, "get", "/api/recommendations/movies")
    wait(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"), "the Try it out button")
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    field = wait(
        lambda d: block.find_element(By.CSS_SELECTOR, "tr[data-param-name='uxid'] input"), "the uxid header's field"
    )
    field.send_keys("docs-reader")
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait(
        lambda d: block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"), "a response"
    )
    assert status.text.strip().startswith("200")
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_description").text
    assert '"reason"' in body and '"genres"' in body

    # An admin route, with the token given under "Authorize".
    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    dialog = wait(lambda d: d.find_element(By.CSS_SELECTOR, ".dialog-ux .modal-ux"), "the Authorize dialog")
    dialog.find_element(By.CSS_SELECTOR, "input").send_keys(TOKEN)
    dialog.find_element(By.CSS_SELECTOR, ".modal-btn.auth.authorize").click()
    dialog.find_element(By.CSS_SELECTOR, ".modal-btn.btn-done, .close-modal").click()
    admin = operation(browser, "get", "/api/status")
    wait(lambda d: admin.find_elements(By.CSS_SELECTOR, ".try-out__btn"), "the Try it out button of /api/status")
    admin.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    admin.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait(
        lambda d: admin.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"), "a response"
    )
    assert status.text.strip().startswith("200")
    assert (
        '"shards"' in admin.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_description").text
    )

    assert not console_errors(browser)
