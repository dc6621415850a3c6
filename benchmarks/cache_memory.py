"""Memory per cached key of the in-process cache.

Fills a CachedStore with N keys fetched from a store that, like the Redis store, hands out
freshly deserialised records, and reports the traced memory it retains per key.

    python benchmarks/cache_memory.py [N]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc

from keystile import ApiKey, KeyHasher, generate_key
from keystile.clock import to_datetime
from keystile.keys import key_hint, new_key_id
from keystile.stores import CachedStore, MemoryStore


class JsonStore(MemoryStore):
    """Keeps JSON, returns new objects per lookup — what a Redis round trip gives."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: dict[str, str] = {}

    async def find(self, digest: str) -> ApiKey | None:
        raw = self.raw.get(digest)
        return None if raw is None else ApiKey.model_validate_json(raw)


async def main(count: int) -> None:
    hasher = KeyHasher("benchmark-server-secret-0123456789")
    store = JsonStore()
    digests = []
    for n in range(count):
        token = generate_key("prod_")
        record = ApiKey(
            id=new_key_id(1_800_000_000 + n),
            name=f"service {n}",
            type="prod",
            hint=key_hint(token, "prod_"),
            scopes=("vec:read", "vec:write", "ai:inference"),
            allowed_ips=("10.0.0.0/8",),
            metadata={"project": "search", "owner": "team-a"},
            created_at=to_datetime(1_800_000_000 + n),
        )
        digest = hasher.digest(token)
        store.raw[digest] = record.model_dump_json()
        digests.append(digest)
    cache = CachedStore(store, max_size=count)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for digest in digests:
        await cache.lookup(digest)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cache) == count
    per_key = (after - before) / count
    print(
        f"cache memory: {count} keys, {per_key:,.0f} bytes per cached key "
        f"(record with 3 scopes, 1 CIDR, 2 metadata entries; digest; LRU and id index)"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
