"""An app process for the revocation race: the full middleware over a shared Redis,
driving traffic with one key until told to stop, logging when each request started.

Usage: ``revoke_worker.py <redis url> <namespace> <secret> <tasks>``, the key in the
``KS_KEY`` environment variable (kept off the command line).

Protocol, one line each way: this process starts its gate (announcements subscribed),
sends one request to cache the key and answers ``ready``; on ``go`` it runs ``<tasks>``
concurrent loops of requests with the key through the middleware (raw ASGI) until ``stop``
arrives (or 20 s pass), then answers one JSON line: ``[[time.time() at start, status,
error code or null], ...]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

# Run as a script: import the test helpers from tests/, not this directory.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from faults.app import build_app  # noqa: E402
from faults.asgi import bearer, call  # noqa: E402
from keystile import RedisStore  # noqa: E402
from keystile.gate import Keystile  # noqa: E402


async def main(url: str, namespace: str, secret: str, tasks: int) -> None:
    gate = Keystile(
        store=RedisStore.from_url(url, namespace=namespace, timeout=5.0),
        secret=secret,
        lookup_timeout=5.0,
    )
    await gate.startup()
    app = build_app(gate)
    headers = bearer(os.environ["KS_KEY"])
    loop = asyncio.get_running_loop()
    first = await call(app, "/x", headers)
    print("ready" if first.status == 200 else f"not ready {first.status}", flush=True)
    log: list[tuple[float, int, str | None]] = []
    stop = asyncio.Event()
    try:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return
        deadline = time.monotonic() + 20.0

        async def drive() -> None:
            while not stop.is_set() and time.monotonic() < deadline and len(log) < 500_000:
                started = time.time()
                outcome = await call(app, "/x", headers, budget=5.0)
                log.append((started, outcome.status, outcome.code))
                await asyncio.sleep(0)  # a cached request never yields otherwise

        async def wait_stop() -> None:
            await loop.run_in_executor(None, sys.stdin.readline)
            stop.set()

        await asyncio.gather(wait_stop(), *(drive() for _ in range(tasks)))
        print(json.dumps(log), flush=True)
    finally:
        await gate.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
