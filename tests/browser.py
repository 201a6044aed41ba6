"""A real headless browser for the tests of pages: Debian's chromium and its driver, driven
by selenium (a test tool's own browser download fails where there is no internet)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

# Nothing but the page under test: no update checks, no background requests.
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update",
             "--no-first-run")  # fmt: skip


def headless_chromium(window: str) -> Iterator[Any]:
    """A selenium Chrome driver on the system's chromium, `window` ("1280,1600") in size,
    keeping the page's console log; the calling test is skipped where there is none."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "no headless browser: these tests need Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (*ARGUMENTS, f"--window-size={window}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()
