"""Headless Chromium driven by Debian's chromedriver, for the browser tests.

Needs Chromium, its driver and Selenium; skipped with the reason when any is missing,
failed instead when KEYSTILE_TEST_REQUIRE_BROWSER is set (as .ci/run does). Selenium is
given the driver's path, so it never tries to download one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CHROMIUM_FLAGS", "REQUIRED", "TIMEOUT", "chromium", "unavailable"]

REQUIRED = os.environ.get("KEYSTILE_TEST_REQUIRE_BROWSER", "") not in ("", "0")
TIMEOUT = 15  # seconds for a page load or a script in the page
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]


def unavailable(reason: str) -> None:
    """Skip, or fail when a browser is required."""
    if REQUIRED:
        pytest.fail(f"a browser is required (KEYSTILE_TEST_REQUIRE_BROWSER): {reason}")
    pytest.skip(reason)


def _executable(name: str) -> str | None:
    found = shutil.which(name) or f"/usr/bin/{name}"
    return found if Path(found).is_file() and os.access(found, os.X_OK) else None


@contextmanager
def chromium(profile: Path, *, network_log: bool = False) -> Iterator[Any]:
    """A headless Chromium with a fresh profile in ``profile``; with ``network_log``, its
    performance log records every network request (``driver.get_log("performance")``)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    browser_path, driver_path = _executable("chromium"), _executable("chromedriver")
    if browser_path is None or driver_path is None:
        unavailable("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    assert browser_path is not None and driver_path is not None
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if network_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        browser = webdriver.Chrome(options=options, service=Service(driver_path))
    except WebDriverException as exc:
        unavailable(f"chromium does not start: {exc.msg}")
    try:
        browser.set_page_load_timeout(TIMEOUT)
        browser.set_script_timeout(TIMEOUT)
        yield browser
    finally:
        browser.quit()  # the browser and its chromedriver
