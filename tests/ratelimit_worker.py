"""A second app process for test_ratelimit: the full middleware over a shared Redis.

Usage: ``ratelimit_worker.py <redis url> <namespace> <secret> <concurrency>``.

Protocol on stdin/stdout, one line each: this process starts its gate (script loaded,
announcements subscribed) and answers ``ready``. Then, for every line ``go <key>`` the
parent sends, it fires ``concurrency`` simultaneous requests with that key through the
middleware (raw ASGI, one ``asyncio.gather``) and answers
``<admitted> <refused> <other> <passes>`` (passes: requests the limiter admitted without
asking Redis). End of input ends the process. The parent writes ``go`` to every worker
before reading any answer, so the workers' bursts overlap: that is the barrier.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keystile import KeystileSettings, RedisStore
from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware


async def endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def request(app: Any, key: str) -> int:
    """One raw ASGI GET with the key; its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/x",
        "raw_path": b"/x",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def main(url: str, namespace: str, secret: str, concurrency: int) -> None:
    # Generous timeouts: this process shares two cores with three others, and a slow
    # answer must show up as a pass or a 503 (counted, reported), not decide the test.
    gate = Keystile(
        store=RedisStore.from_url(url, namespace=namespace, heartbeat=60.0),
        secret=secret,
        settings=KeystileSettings(rate_limit_timeout=5.0),
        lookup_timeout=5.0,
    )
    app = Starlette(
        routes=[Route("/x", endpoint)], middleware=[Middleware(KeystileMiddleware, gate=gate)]
    )
    await gate.startup()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            command, _, key = line.strip().partition(" ")
            if command != "go":
                break
            passes = gate.limiter.passes  # type: ignore[attr-defined]
            statuses = await asyncio.gather(*(request(app, key) for _ in range(concurrency)))
            admitted = statuses.count(200)
            refused = statuses.count(429)
            other = len(statuses) - admitted - refused
            passes = gate.limiter.passes - passes  # type: ignore[attr-defined]
            print(f"{admitted} {refused} {other} {passes}", flush=True)
    finally:
        await gate.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
