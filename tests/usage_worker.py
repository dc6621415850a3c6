"""An app process for test_usage's exactness test: the full middleware over a shared Redis.

Usage: ``usage_worker.py <redis url> <namespace> <secret> <seed> <requests>``, with the
production key in the ``KS_USAGE_TOKEN`` environment variable (kept off the command line).

The process starts its app (ASGI lifespan), sends ``<requests>`` mixed requests with the key
through the middleware in process — 200s of various sizes (plain, streamed, POST bodies
sent whole or in chunks), 404s and 500s — shuts the app down gracefully (lifespan shutdown,
then ``gate.aclose()``), and prints as JSON what it sent: requests, body bytes in and out,
4xx and 5xx, in the usage report's field names — and its recorder's ``flushes``,
``failed_flushes`` and ``dropped``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator

from keystile import KeystileSettings, RedisStore
from keystile.gate import Keystile
from keystile.usage import FIELDS
from usage_app import build_app, http, lifespan


async def main(
    url: str, namespace: str, secret: str, seed: int, requests: int
) -> dict[str, object]:
    rng = random.Random(seed)
    store = RedisStore.from_url(url, namespace=namespace)
    # A short interval: background flushes run during the traffic, as in production.
    gate = Keystile(
        store=store, secret=secret, settings=KeystileSettings(usage_flush_interval=0.2)
    )
    headers = {"Authorization": f"Bearer {os.environ['KS_USAGE_TOKEN']}"}
    sent = dict.fromkeys(FIELDS, 0)
    app = build_app(gate)
    async with lifespan(app), http(app, f"127.0.0.{seed + 1}") as client:
        for _ in range(requests):
            kind = rng.random()
            body = b""
            if kind < 0.35:
                response = await client.get(f"/bytes/{rng.randrange(0, 5000)}", headers=headers)
            elif kind < 0.55:
                body = rng.randbytes(rng.randrange(0, 4000))
                response = await client.post("/echo", content=body, headers=headers)
            elif kind < 0.65:
                parts = [rng.randbytes(rng.randrange(0, 700)) for _ in range(rng.randrange(1, 5))]
                body = b"".join(parts)
                response = await client.post("/echo", content=chunks(parts), headers=headers)
            elif kind < 0.75:
                response = await client.get(f"/stream/{rng.randrange(0, 8)}", headers=headers)
            elif kind < 0.9:
                response = await client.get(f"/missing/{rng.randrange(100)}", headers=headers)
            else:
                response = await client.get("/fail/500", headers=headers)
            sent["requests"] += 1
            sent["bytes_in"] += len(body)
            sent["bytes_out"] += len(response.content)
            if 400 <= response.status_code < 500:
                sent["errors_4xx"] += 1
            elif response.status_code >= 500:
                sent["errors_5xx"] += 1
    await gate.aclose()
    usage = gate.usage
    return {
        "sent": sent,
        "flushes": usage.flushes,
        "failed_flushes": usage.failed_flushes,
        "dropped": usage.dropped,
    }


async def chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


if __name__ == "__main__":
    url, namespace, secret, seed, requests = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(url, namespace, secret, int(seed), int(requests)))))
