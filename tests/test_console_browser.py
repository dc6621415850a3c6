"""The console in headless Chromium against a real server (the demo app under uvicorn): sign
in, make a key of each type through the form and read its secret once, use it, revoke it
through the ⋮ menu, read its usage charts; another project's key never shows; a revoked
admin key's session ends; no request leaves for another host; axe finds no serious
accessibility violation (issue #16, item 4).

Screenshots of every page visited are written to ``tests/screenshots/`` (ignored by git).
With ``KEYSTILE_TEST_DOCS_SCREENSHOT=1`` the key page's is also saved as ``docs/console.png``,
and the alert-rules page's as ``docs/console-rules.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser.chromium import TIMEOUT, chromium
from browser.harness import ServerProcess, seed_env, serve, uvicorn_argv

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "tests" / "screenshots"
ORIGIN = "https://app.example"
SEED: list[dict[str, object]] = [
    {"name": "alpha admin", "type": "prod", "scopes": ["*"], "project": "alpha"},
    {"name": "second admin", "type": "prod", "scopes": ["*"], "project": "alpha"},
    {"name": "beta only key", "type": "dev", "scopes": ["vec:read"], "project": "beta"},
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """The demo app (which mounts the console at /console) with two projects' keys."""
    with serve(uvicorn_argv, seed_env(SEED)) as started:
        yield started


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Chromium recording its network requests, 1280 pixels wide."""
    with chromium(tmp_path_factory.mktemp("console-profile"), network_log=True) as browser:
        browser.set_window_size(1280, 1000)
        yield browser


def by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def shot(driver: Any, name: str) -> None:
    """A full-page screenshot of what the browser shows, as tests/screenshots/<name>.png."""
    SHOTS.mkdir(exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(min(int(height) + 40, 4000), 600))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 1000)


def arrive(driver: Any, part: str) -> None:
    """Wait (bounded) until the browser has navigated to a URL containing ``part``."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, TIMEOUT).until(lambda d: part in d.current_url)


def settle(driver: Any, ready: Any) -> None:
    """Wait (bounded) until ``ready(driver)`` holds on the page the browser shows (an
    element of the page being left may go stale meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, TIMEOUT, ignored_exceptions=[StaleElementReferenceException]).until(
        ready
    )


def sign_in(driver: Any, server: ServerProcess, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{server.base_url}/console/signin")
    field = driver.find_element(by("ID"), "key")
    field.send_keys(key)
    field.submit()
    arrive(driver, "/console/keys")


def create(driver: Any, server: ServerProcess, name: str, kind: str) -> str:
    """Fill the create form for a key of ``kind``; the secret its one page shows."""
    driver.get(f"{server.base_url}/console/keys/new")
    driver.find_element(by("ID"), "name").send_keys(name)
    driver.find_element(by("ID"), f"type-{kind}").click()
    for scope in ("vec-read", "kev-read"):
        driver.find_element(by("ID"), f"scope-{scope}").click()
    if kind == "client":
        driver.find_element(by("ID"), "allowed_origins").send_keys(ORIGIN)
    if kind == "prod":
        driver.find_element(by("ID"), "allowed_ips").send_keys("127.0.0.1")
    if kind == "client":
        shot(driver, "create-form")
    driver.find_element(by("ID"), "save").click()
    arrive(driver, "/console/created/")
    page = driver.page_source
    assert "Copy it now, it will only be shown once." in page
    secret: str = driver.find_element(by("ID"), "secret").get_attribute("value")
    assert secret.startswith(f"{kind}_")
    copy = driver.find_element(by("CSS_SELECTOR"), "button[data-copy=secret]")
    assert copy.is_displayed()  # the script ran (CSP 'self' allows it)
    shot(driver, f"created-{kind}")
    driver.refresh()
    assert secret not in driver.page_source
    assert "shown once and cannot be shown again" in driver.page_source
    return secret


def api(server: ServerProcess, key: str, origin: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    if origin:
        headers["Origin"] = origin
    return httpx.get(f"{server.base_url}/cloud/vec/databases", headers=headers).status_code


def key_id_of(server: ServerProcess, admin: str, name: str) -> str:
    listing = httpx.get(
        f"{server.base_url}/cloud/keys/", headers={"Authorization": f"Bearer {admin}"}
    ).json()
    [found] = [k["id"] for k in listing["keys"] if k["name"] == name]
    return str(found)


def test_keys_made_in_the_browser_work_until_revoked_through_the_menu(
    driver: Any, server: ServerProcess
) -> None:
    """A key of each type made through the form is shown once, works against the API,
    shows its requests in the usage chart, and is refused once revoked via the ⋮ menu."""
    admin = server.keys[0]
    sign_in(driver, server, admin)
    made = {kind: create(driver, server, f"browser {kind}", kind) for kind in KINDS}
    assert api(server, made["dev"]) == 200
    assert api(server, made["prod"]) == 200
    assert api(server, made["client"], ORIGIN) == 200
    for _ in range(4):
        assert api(server, made["dev"]) == 200
    for _ in range(2):  # kev:write is not among the key's scopes: two errors
        refused = httpx.put(
            f"{server.base_url}/cloud/kev/greeting",
            content=b"hi",
            headers={"Authorization": f"Bearer {made['dev']}"},
        )
        assert refused.status_code == 403

    dev_id = key_id_of(server, admin, "browser dev")
    driver.get(f"{server.base_url}/console/keys/{dev_id}")
    chart = driver.find_element(by("ID"), "chart-hour")
    assert int(chart.get_attribute("data-total")) == 7
    assert driver.find_element(by("ID"), "hour-requests").text == "7"
    assert driver.find_element(by("ID"), "hour-errors").text == "2"
    assert len(chart.find_elements(by("CSS_SELECTOR"), "rect.bar")) >= 1
    assert len(chart.find_elements(by("CSS_SELECTOR"), "rect.bar-error")) >= 1
    shot(driver, "key-usage")
    if os.environ.get("KEYSTILE_TEST_DOCS_SCREENSHOT"):
        driver.save_screenshot(str(ROOT / "docs" / "console.png"))

    driver.get(f"{server.base_url}/console/keys")
    shot(driver, "keys")
    menu = driver.find_element(by("CSS_SELECTOR"), "summary[aria-label='Actions for browser dev']")
    menu.click()
    parent = menu.find_element(by("XPATH"), "..")
    parent.find_element(by("LINK_TEXT"), "Revoke").click()
    arrive(driver, "/revoke")
    assert "cannot be undone" in driver.page_source
    shot(driver, "revoke-confirm")
    driver.find_element(by("ID"), "confirm-revoke").click()
    arrive(driver, "revoked=1")
    assert "The key is revoked." in driver.page_source
    assert api(server, made["dev"]) == 401
    assert api(server, made["prod"]) == 200


KINDS = ("dev", "prod", "client")


def test_another_projects_key_never_appears(driver: Any, server: ServerProcess) -> None:
    """Project alpha's admin sees none of project beta's keys, in the list or a search."""
    sign_in(driver, server, server.keys[0])
    assert "alpha admin" in driver.page_source
    assert "beta only key" not in driver.page_source
    driver.get(f"{server.base_url}/console/keys?q=beta")
    assert "beta only key" not in driver.page_source
    assert "No keys match." in driver.page_source


def test_a_revoked_admin_keys_session_is_signed_out(driver: Any, server: ServerProcess) -> None:
    """Once the signed-in admin key is revoked, the next page is the sign-in page."""
    second = server.keys[1]
    sign_in(driver, server, second)
    driver.get(f"{server.base_url}/console/audit")
    shot(driver, "audit")
    second_id = key_id_of(server, server.keys[0], "second admin")
    revoked = httpx.post(
        f"{server.base_url}/cloud/keys/{second_id}/revoke",
        headers={"Authorization": f"Bearer {server.keys[0]}"},
    )
    assert revoked.status_code == 200
    driver.refresh()
    arrive(driver, "/console/signin")
    assert driver.get_cookie("keystile_console") is None
    shot(driver, "signin")


def test_alert_rules_set_in_the_browser_are_in_force(driver: Any, server: ServerProcess) -> None:
    """On the alert-rules page, a threshold typed and saved with the keyboard (Enter) is
    shown in force, set by the project, and is what the REST API answers; its Clear button
    puts the default back. The key's rules page and the project's settings show too."""
    from selenium.webdriver.common.keys import Keys

    admin = server.keys[0]
    sign_in(driver, server, admin)
    driver.get(f"{server.base_url}/console/alert-rules")
    field = driver.find_element(by("ID"), "requests_per_minute")
    field.clear()
    field.send_keys("250", Keys.ENTER)
    arrive(driver, "saved=1")
    row = driver.find_element(by("ID"), "rule-requests_per_minute")
    assert row.find_element(by("CSS_SELECTOR"), "td.effective").text == "250"
    assert row.find_element(by("CSS_SELECTOR"), "td.source").text == "project"
    answer = httpx.get(
        f"{server.base_url}/cloud/keys/alert-rules", headers={"Authorization": f"Bearer {admin}"}
    ).json()
    assert answer["alert_rules"]["rules"] == {"requests_per_minute": 250}
    shot(driver, "alert-rules")
    if os.environ.get("KEYSTILE_TEST_DOCS_SCREENSHOT"):
        driver.save_screenshot(str(ROOT / "docs" / "console-rules.png"))
    row.find_element(by("CSS_SELECTOR"), "button[form=clear-rules]").click()
    source = "#rule-requests_per_minute td.source"
    settle(driver, lambda d: d.find_element(by("CSS_SELECTOR"), source).text == "default")

    some_key = key_id_of(server, admin, "alpha admin")
    driver.get(f"{server.base_url}/console/keys/{some_key}/alert-rules")
    driver.find_element(by("ID"), "cooldown").send_keys("abc", Keys.ENTER)
    settle(driver, lambda d: d.find_elements(by("ID"), "cooldown-error"))  # beside the field
    shot(driver, "key-alert-rules")
    driver.get(f"{server.base_url}/console/project")
    assert driver.find_element(by("CSS_SELECTOR"), ".project").text == "alpha"
    shot(driver, "project")


PAGES = [
    "/console/signin",
    "/console/keys",
    "/console/keys/new",
    "/console/audit",
    "/console/alert-rules",
    "/console/project",
]


def test_no_request_leaves_for_another_host_and_axe_finds_no_serious_violation(
    driver: Any, server: ServerProcess
) -> None:
    """Every request the pages make goes to the console's own server, and axe-core (from
    the axe-selenium-python package) finds no serious or critical violation on them."""
    from axe_selenium_python import Axe

    driver.get_log("performance")  # drop what earlier tests logged
    pages = list(PAGES)
    driver.delete_all_cookies()
    driver.get(f"{server.base_url}/console/signin")
    problems = audit_page(driver, Axe)
    sign_in(driver, server, server.keys[0])
    some_key = key_id_of(server, server.keys[0], "alpha admin")
    pages += [f"/console/keys/{some_key}", f"/console/keys/{some_key}/edit"]
    pages += [f"/console/keys/{some_key}/rotate", f"/console/keys/{some_key}/revoke"]
    pages += [f"/console/keys/{some_key}/alert-rules"]
    for path in pages[1:]:
        driver.get(f"{server.base_url}{path}")
        problems += audit_page(driver, Axe)
    driver.find_element(by("ID"), "error_rate").send_keys("2")
    driver.find_element(by("ID"), "save-rules").click()  # a 422 page: errors beside fields
    settle(driver, lambda d: d.find_elements(by("ID"), "error_rate-error"))
    problems += audit_page(driver, Axe)
    assert not problems, json.dumps(problems, indent=1)
    requested = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    assert any(u.endswith("/console/static/console.css") for u in requested)
    foreign = [u for u in requested if not u.startswith(server.base_url + "/")]
    assert not [u for u in foreign if not u.startswith(("data:", "about:"))], foreign


def audit_page(driver: Any, axe_class: Any) -> list[dict[str, Any]]:
    """axe's serious and critical violations on the current page."""
    axe = axe_class(driver)
    axe.inject()
    results = axe.run()
    return [
        {"page": driver.current_url, "id": v["id"], "help": v["help"], "nodes": len(v["nodes"])}
        for v in results["violations"]
        if v.get("impact") in ("serious", "critical")
    ]
