"""A second process for test_revocation: it caches a key, then polls until it is refused.

Protocol on stdin/stdout, one line each: the parent sends ``watch <digest>``; this process
looks the key up (now cached), answers ``watching``, then polls the cache every half
millisecond until the key is revoked and answers ``revoked <time.monotonic()>``.
CLOCK_MONOTONIC is system-wide on Linux, so the parent can compare the two clocks.
"""

from __future__ import annotations

import asyncio
import sys
import time

from keystile import RedisStore
from keystile.stores import CachedStore


async def main(url: str, namespace: str) -> None:
    cache = CachedStore(RedisStore.from_url(url, namespace=namespace), ttl=60.0)
    if not await cache.start(timeout=5.0):
        print("not listening", flush=True)
        return
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    try:
        for line in sys.stdin:
            command, _, digest = line.strip().partition(" ")
            if command != "watch":
                break
            found = await cache.find(digest)
            assert found is not None and not found.revoked
            print("watching", flush=True)
            deadline = loop.time() + 5.0
            while loop.time() < deadline:
                found = await cache.find(digest)
                if found is not None and found.revoked:
                    break
                await asyncio.sleep(0.0005)
            print(f"revoked {time.monotonic()!r}", flush=True)
    finally:
        await cache.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
