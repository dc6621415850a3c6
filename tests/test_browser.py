"""End to end in headless Chromium (docs/cors.md): a page on one origin calls `keystile demo` on
another with a client key, and the browser itself enforces what keystile answers.

Needs Chromium, its driver and Selenium; skipped with the reason when any is missing,
failed instead when KEYSTILE_TEST_REQUIRE_BROWSER is set (as .ci/run does). Selenium is
given the driver's path, so it never tries to download one.
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from browser.chromium import chromium
from browser.harness import ServerProcess, demo_argv, seed_env, serve
from keystile.origins import parse_origin_pattern

PATH = "/cloud/vec/databases"

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>keystile browser test</title></head>
<body>
<script>
// What a browser app does: call the API with its client key and read the answer.
async function callApi(url, key) {
  const headers = key ? {Authorization: "Bearer " + key} : {};
  try {
    const response = await fetch(url, {headers});
    return {
      ok: true,
      status: response.status,
      body: await response.json(),
      rateLimit: response.headers.get("RateLimit"),
      rateLimitPolicy: response.headers.get("RateLimit-Policy"),
    };
  } catch (error) {
    return {ok: false, error: error.name, message: String(error.message)};
  }
}
// How this browser serialises an origin (null when the URL does not parse).
function originOf(text) {
  try { return new URL(text).origin; } catch (error) { return null; }
}
</script>
</body></html>
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium driven by Debian's chromedriver, with a fresh profile."""
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def page_port() -> Iterator[int]:
    """A server of the test page on 127.0.0.1 (so also on localhost): one port, two origins."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def demo(page_port: int) -> Iterator[ServerProcess]:
    """`keystile demo` with two more client keys: one for the page's localhost origin, one
    for the demo's own http://localhost:5173."""
    keys: list[dict[str, object]] = [
        {
            "name": "page key",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": [f"http://localhost:{page_port}"],
        },
        {
            "name": "other app's key",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": ["http://localhost:5173"],
        },
    ]
    with serve(demo_argv, seed_env(keys)) as server:
        yield server


def call_from(driver: Any, page: str, url: str, key: str | None) -> dict[str, Any]:
    """Open ``page`` and run the page's own fetch of ``url``; what the page saw."""
    driver.get(page)
    result: dict[str, Any] = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "callApi(arguments[0], arguments[1]).then(done);",
        url,
        key,
    )
    return result


def test_an_allowed_origin_reads_the_answer(
    driver: Any, page_port: int, demo: ServerProcess
) -> None:
    """A page on an origin its key allows reads the JSON and the RateLimit headers, and a
    401 (no key) is readable too."""
    page = f"http://localhost:{page_port}/"
    url = demo.base_url + PATH
    result = call_from(driver, page, url, demo.keys[0])
    assert result["ok"], result
    assert result["status"] == 200
    assert result["body"] == {"databases": []}
    assert re.search(r"\br=\d+", result["rateLimit"] or ""), result
    assert result["rateLimitPolicy"]
    missing = call_from(driver, page, url, None)
    assert missing["ok"], missing
    assert missing["status"] == 401
    assert missing["body"]["error"]["code"] == "missing_api_key"


def test_a_disallowed_origin_cannot_read_anything(
    driver: Any, page_port: int, demo: ServerProcess
) -> None:
    """The page's fetch fails with a TypeError from an origin no key allows (the preflight
    is refused) and from one the key does not allow (the request itself is refused)."""
    url = demo.base_url + PATH
    refused_preflights = f'"OPTIONS {PATH} HTTP/1.1" 403'
    refused_requests = f'"GET {PATH} HTTP/1.1" 403'
    preflights_before = len(demo.wait_for_lines(refused_preflights, count=0))
    requests_before = len(demo.wait_for_lines(refused_requests, count=0))
    # 127.0.0.1:<port> is in no key's list: the preflight is refused, the GET never sent.
    result = call_from(driver, f"http://127.0.0.1:{page_port}/", url, demo.keys[0])
    assert not result["ok"], result
    assert result["error"] == "TypeError"
    demo.wait_for_lines(refused_preflights, count=preflights_before + 1)
    # localhost:<port> passes the preflight (the page key allows it) but the other app's
    # key does not: the GET is refused without CORS headers, and the page sees nothing.
    result = call_from(driver, f"http://localhost:{page_port}/", url, demo.keys[1])
    assert not result["ok"], result
    assert result["error"] == "TypeError"
    # One refused GET in all: this one, none from the first page.
    refused = demo.wait_for_lines(refused_requests, count=requests_before + 1)
    assert len(refused) == requests_before + 1


ENTRIES = [
    "https://app.example.com",
    "HTTPS://App.Example.COM:443",
    "http://localhost:5173",
    "http://[0:0::1]:80",
    "https://bücher.de",
    "https://BÜCHER.de",
    "https://faß.de",
    "https://ς.gr",
    "https://ＥＸＡＭＰＬＥ.com",
    "https://ex\u00adample.com",
    "https://bücher\u3002de",
    "https://例え.テスト",
    "https://münchen.de:8443",
    "wss://a.com:443",
]


def test_chromium_and_keystile_serialise_origins_alike(driver: Any, page_port: int) -> None:
    """Each allowed-origin entry normalises to the origin Chromium itself serialises for it,
    internationalised hosts included."""
    driver.get(f"http://localhost:{page_port}/")
    seen = driver.execute_script("return arguments[0].map(originOf);", ENTRIES)
    assert [str(parse_origin_pattern(e)) for e in ENTRIES] == seen
