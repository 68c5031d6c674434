"""Swagger UI (/api/docs/) and ReDoc (/api/redoc/) render fully in headless Chromium with the
network closed: every file they need is ours (drf-spectacular-sidecar, pinned), no request
leaves 127.0.0.1. Screenshots are kept (SCREENSHOT_DIR, default the test's temporary directory)."""

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from drf_spectacular.generators import SchemaGenerator
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import browser_requests

pytestmark = pytest.mark.django_db


REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def _operation_ids() -> list[str]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return [op["operationId"] for path in schema["paths"].values() for op in path.values()]


def _render(driver: webdriver.Chrome, url: str, selector: str) -> list[WebElement]:
    """Open the page and wait until it shows every operation of the schema."""
    expected = len(_operation_ids())
    driver.get(url)
    WebDriverWait(driver, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, selector)) >= expected
    )
    return driver.find_elements(By.CSS_SELECTOR, selector)


def _outside(requests: list[str], base: str) -> list[str]:
    host = urlsplit(base).hostname
    return [
        url
        for url in requests
        if urlsplit(url).scheme in ("http", "https", "ws", "wss") and urlsplit(url).hostname != host
    ]


def _console_errors(driver: webdriver.Chrome) -> list[dict[str, object]]:
    # The browser asks for /favicon.ico on its own; the service has none (an API, not a site).
    return [
        entry
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "/favicon.ico " not in str(entry["message"])
    ]


def _screenshot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> None:
    directory = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    shot = directory / name
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_swagger_ui_renders_offline(
    live_server: object, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    base = str(live_server)
    operations = _render(browser, f"{base}/api/docs/", ".swagger-ui .opblock")
    assert "Merchant Service API" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    assert any("/link/batch" in element.text for element in operations)
    # Its stylesheet applied: an operation's summary bar is coloured by swagger-ui.css.
    summary = browser.find_element(By.CSS_SELECTOR, ".opblock-post .opblock-summary-method")
    assert summary.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "")
    requests = browser_requests(browser)
    assert any("/static/drf_spectacular_sidecar/swagger-ui-dist/" in url for url in requests)
    assert _outside(requests, base) == []
    assert _console_errors(browser) == []
    _screenshot(browser, tmp_path, "swagger-ui.png")


def test_redoc_renders_offline(
    live_server: object, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    base = str(live_server)
    _render(browser, f"{base}/api/redoc/", "[data-section-id^='operation/']")
    assert "Merchant Service API" in browser.find_element(By.TAG_NAME, "h1").text
    for operation in _operation_ids():
        assert browser.find_elements(By.CSS_SELECTOR, f"[data-section-id='operation/{operation}']")
    assert _outside(browser_requests(browser), base) == []
    # The one error: the browser refusing ReDoc's attribution logo (merchant.schema's policy).
    errors = _console_errors(browser)
    assert [(e["source"], REDOC_LOGO in str(e["message"])) for e in errors] == [("security", True)]
    _screenshot(browser, tmp_path, "redoc.png")
