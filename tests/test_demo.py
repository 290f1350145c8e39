"""The live demo page, /demo: served by the API from the package, offline (in-process, with
Starlette's TestClient), and used as a person uses it: headless Chromium (Debian's `chromium`
and `chromium-driver`) against a real `mabrec up`, opening a movie and watching the learned
profile and the slate change.

With MABREC_DEMO_SCREENSHOT=<path> the browser test, once passed, saves the page there (the
README's docs/demo.png: `MABREC_DEMO_SCREENSHOT=docs/demo.png pytest tests/test_demo.py`)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from starlette.testclient import TestClient

from api.app import create_app
from api.demo import DEMO_ASSETS, DEMO_STATIC
from bench.running import RunningSystem
from system.core.catalog import Catalog
from system.core.catalog_file import read_movies
from tests.browser import console_errors, waiter
from tests.conftest import SMALL_CSV, system
from tests.fakes import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
# The one absolute URL the assets may hold: the SVG namespace's name, which nothing fetches.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(FakeBackend(Catalog.from_movies(list(read_movies(SMALL_CSV)))))) as client:
        yield client


def test_the_demo_page_and_its_assets_are_served_from_the_package(client: TestClient) -> None:
    page = client.get("/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # The browser itself refuses anything from another origin.
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assets = [r for r in refs if r.startswith(DEMO_ASSETS)]
    assert {Path(a).suffix for a in assets} == {".js", ".css", ".svg"}
    assert all(r.startswith("/") and not r.startswith("//") for r in refs), refs  # same origin, every one
    for ref in refs:
        got = client.get(ref)
        assert got.status_code == 200 and got.content, ref
    assert "javascript" in client.get(f"{DEMO_ASSETS}/demo.js").headers["content-type"]
    assert client.get(f"{DEMO_ASSETS}/demo.css").headers["content-type"].startswith("text/css")
    assert client.get(f"{DEMO_ASSETS}/nothing.js").status_code == 404
    assert client.get(f"{DEMO_ASSETS}/../__init__.py").status_code == 404  # only the static files


def test_the_demo_refers_to_no_other_host() -> None:
    files = sorted(DEMO_STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "demo.js", "demo.css"}
    for file in files:
        text = file.read_text()
        absolute = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", text))
        assert absolute <= {SVG_NAMESPACE}, (file.name, absolute)
        assert "@import" not in text and "url(" not in text, file.name  # no font or stylesheet from elsewhere


def test_the_html_has_every_element_the_script_uses() -> None:
    html = (DEMO_STATIC / "index.html").read_text()
    script = (DEMO_STATIC / "demo.js").read_text()
    used = set(re.findall(r'\bel\("([\w-]+)"\)', script))
    assert {"uxid", "user-form", "random-user", "token", "slate", "clicks", "genre-chart", "status"} <= used
    present = set(re.findall(r'\bid="([\w-]+)"', html))
    assert used <= present, used - present
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    assert 'data-uxid="' in html  # the suggested users the script wires up
    for label in re.findall(r'<label for="([\w-]+)"', html):  # every label names an input that exists
        assert label in present
    # The token goes in a header; the page never puts it in a URL.
    assert "Authorization" in script and "?token" not in script


def test_every_demo_file_ships_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"api.demo", "api.demo.static"} <= set(config["packages"])
    patterns = config["package-data"]["api.demo.static"]
    for file in DEMO_STATIC.iterdir():
        assert any(fnmatch(file.name, p) for p in patterns), f"{file.name} is not package data"


# --- in a browser, against the whole system ---------------------------------------------------


@pytest.fixture
def demo_system(
    services: dict[str, str], database_url: str, namespace: str, tmp_path: Path
) -> Iterator[tuple[RunningSystem, str]]:
    token = secrets.token_hex(16)  # 32 characters
    env = {
        "DATABASE_URL": database_url,
        "NATS_URL": services["nats"],
        "MABREC_NAMESPACE": namespace,
        "MABREC_ADMIN_TOKEN": token,
    }
    with system(tmp_path / "state", **env) as started:
        yield started, token


def _text(driver: WebDriver, element_id: str) -> str:
    text: str = driver.find_element(By.ID, element_id).text
    return text


def _genres_of(running: RunningSystem, item: WebElement) -> set[str]:
    """The genres of a movie of the slate on the page, as the API has them (no uxid: no click)."""
    movie = running.get(f"/api/movies/{item.get_attribute('data-movie-id')}").json()
    return {g["name"] for g in movie["genres"]}


def _genre_bars(driver: WebDriver) -> set[str]:
    return {
        bar.get_attribute("data-genre") or "" for bar in driver.find_elements(By.CSS_SELECTOR, "#genre-chart g.bar")
    }


@pytest.mark.e2e
@pytest.mark.integration
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_a_click_on_the_demo_page_changes_the_profile_and_the_slate(
    browser: WebDriver, demo_system: tuple[RunningSystem, str], tmp_path: Path
) -> None:
    running, token = demo_system
    assert running.runtime is not None
    origin = running.runtime.api_url.rstrip("/")

    wait = waiter(
        browser,
        tmp_path,
        lambda: (
            f"the page's status: {_text(browser, 'status')!r}, profile message: {_text(browser, 'profile-message')!r}"
        ),
    )

    browser.get(f"{origin}/demo#token={token}")
    uxid = f"démo-{secrets.token_hex(4)}"  # not ASCII: the page sends its UTF-8 bytes, as the API reads them
    field = wait(lambda d: d.find_element(By.ID, "uxid"), "the page")
    assert "token=" not in browser.current_url  # kept in the tab's sessionStorage, off the address bar
    field.send_keys(uxid)
    browser.find_element(By.ID, "load").click()

    # The slate, with a reason for every movie, and the profile of a new user: nothing clicked.
    wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#slate li.movie")) == 10, "a slate of 10 movies")
    wait(lambda d: _text(d, "clicks") == "0", "the profile of a new user")
    movies = browser.find_elements(By.CSS_SELECTOR, "#slate li.movie")
    assert all(m.find_element(By.CSS_SELECTOR, ".reason").text for m in movies)
    assert _genre_bars(browser) == set()
    first_slate = _text(browser, "slate-meta")
    assert uxid in first_slate

    # Open the first movie: a click, applied through NATS by the user's shard.
    movie = running.get(f"/api/movies/{movies[0].get_attribute('data-movie-id')}").json()  # (no uxid: no click)
    genres = _genres_of(running, movies[0])
    assert genres
    movies[0].find_element(By.CSS_SELECTOR, "button.open").click()
    wait(lambda d: _text(d, "clicks") == "1", "the click counted in the profile")
    wait(lambda d: _genre_bars(d) == genres, f"bars for the clicked movie's genres {genres}")
    wait(lambda d: "applied" in _text(d, "status"), "the page saying the click was applied")
    wait(lambda d: _text(d, "slate-meta") != first_slate, "a new slate after the click")
    assert _text(browser, "opened-title") == movie["name"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#slate li.movie")) == 10
    # And again, on the new slate (a movie with another genre, where there is one): the page is ready for more.
    second = next(
        (m for m in browser.find_elements(By.CSS_SELECTOR, "#slate li.movie") if not genres >= _genres_of(running, m)),
        browser.find_elements(By.CSS_SELECTOR, "#slate li.movie")[-1],
    )
    both = genres | _genres_of(running, second)
    second.find_element(By.CSS_SELECTOR, "button.open").click()
    wait(lambda d: _text(d, "clicks") == "2", "the second click counted in the profile")
    wait(lambda d: _genre_bars(d) == both, f"bars for the genres of both movies {both}")
    wait(lambda d: "applied" in _text(d, "status"), "the page saying the second click was applied")
    learned = running.get("/api/profile", uxid, headers=running.admin_headers)
    assert learned.json()["uxid"] == uxid and learned.json()["clicks"] == 2

    # Nothing came from anywhere but the API, and the token never went into a URL.
    loaded: list[str] = browser.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => e.name)"
    )
    assert any("/api/profile" in url for url in loaded) and any("/demo/static/demo.js" in url for url in loaded)
    assert {f"{urlsplit(url).scheme}://{urlsplit(url).netloc}" for url in loaded} == {origin}, loaded
    assert not [url for url in loaded if token in url.split("#", 1)[0]]  # the fragment stays in the browser
    referenced: list[str] = browser.execute_script(
        "return Array.from(document.querySelectorAll('[src], [href]'),"
        " e => new URL(e.getAttribute('src') || e.getAttribute('href'), location.href).origin)"
    )
    assert referenced and set(referenced) == {origin}
    assert not console_errors(browser)  # no script error, no refused load
    # The whole page, for the README.
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    screenshot = browser.get_screenshot_as_png()
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # A refused token is said so, in words.
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "save-token").click()
    wait(lambda d: "401" in _text(d, "profile-message"), "the message for a refused token")
    assert "admin token" in _text(browser, "profile-message") and _text(browser, "clicks") == "–"

    if destination := os.environ.get("MABREC_DEMO_SCREENSHOT"):
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        Path(destination).write_bytes(screenshot)
