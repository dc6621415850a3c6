"""An app process for test_alerts: presents a revoked key once, flushes, reports its alerts.

Usage: ``alert_worker.py <redis url> <namespace> <secret>``, with the (revoked) key in the
``KS_ALERT_TOKEN`` environment variable. The process sends one request with the key through
the full middleware, flushes its usage (which evaluates the alert rules against the shared
Redis alert state), closes its gate, and prints ``{"status": ..., "fired": [...]}``: the
response status and the rules of the alerts this process delivered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from keystile import KeystileSettings, RedisStore
from keystile.alerts import Alert
from keystile.gate import Keystile
from usage_app import build_app, http


async def main(url: str, namespace: str, secret: str) -> dict[str, object]:
    store = RedisStore.from_url(url, namespace=namespace)
    gate = Keystile(store=store, secret=secret, settings=KeystileSettings(usage_flush_interval=60))
    fired: list[Alert] = []
    gate.alerts.subscribe(fired.append)
    headers = {"Authorization": f"Bearer {os.environ['KS_ALERT_TOKEN']}"}
    async with http(build_app(gate)) as client:
        status = (await client.get("/bytes/1", headers=headers)).status_code
    await gate.usage.flush()
    await gate.aclose()
    return {"status": status, "fired": [alert.rule for alert in fired]}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
