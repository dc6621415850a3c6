"""Listing and looking keys up with 1,000 / 100,000 / 1,000,000 keys stored (issue #19).

Keys are written straight into a redis-server of the script's own (free loopback port, no
persistence, stopped at the end), in ``RedisStore``'s format — record, digest, id index and
the listing index as ``key_place.lua`` leaves it — in pipelines, growing the store from one
size to the next. They belong to 10 projects and the three types in turn; 1 % are revoked,
1 % rotated (a successor named, a grace period running), 2 % expired, 2 % expire later.

At each size it prints:

- a page of 100 (``KeyManager.list``, records parsed) for each filter: a project, a type,
  each status, and project + type + status together: the median over ``--pages`` listings
  starting at random places (a cursor from a random stored key), and the first listing
  after the expiries passed (it settles them: see ``keystile/stores/listing.py``);
- the median of ``--lookups`` uncached lookups (``RedisStore.find``, one at a time), and
  its ratio to the same in a second redis-server holding 1,000 keys, the two taking turns
  in blocks of 50 (so the machine's busy moments fall on both);
- Redis ``used_memory`` per stored key, and the listing index's share of it
  (``MEMORY USAGE`` of its sets);
- the same page of revoked keys read as ``KeyManager.list`` did before the index (records
  in id order, 500 at a time, up to 5,000, keeping the matches), for comparison;
- at 100,000 keys, the time a ``RedisStore.reindex()`` takes (what the first listing does
  on a store written before the index existed).

    python benchmarks/bench_listing.py                  # ~3 min, 24 GiB machine: ~2 GB
    python benchmarks/bench_listing.py --sizes 1000 100000   # ~20 s

Needs ``redis-server`` on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import secrets
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import redis

from bench_ratelimit import own_redis
from keystile import KeyHasher, KeyManager, RedisStore
from keystile.clock import to_datetime
from keystile.keys import new_key_id
from keystile.models import ApiKey, KeyType
from keystile.records import KeyStatus, encode_cursor, key_status
from keystile.stores.listing import PARTS, micros, stored_state

NAMESPACE = "ksbench-listing"
PROJECTS = [f"p{n}" for n in range(10)]
TYPES = list(KeyType)
T0 = time.time() - 400 * 86400  # the first key's creation: ids spread over ~a year
FILTERS: list[tuple[str, dict[str, Any]]] = [
    ("project p3", {"project": "p3"}),
    ("type client", {"type": "client"}),
    ("status active", {"status": "active"}),
    ("status rotated", {"status": "rotated"}),
    ("status revoked", {"status": "revoked"}),
    ("status expired", {"status": "expired"}),
    ("p0 + client + revoked", {"project": "p0", "type": "client", "status": "revoked"}),
    ("p2 + prod + expired", {"project": "p2", "type": "prod", "status": "expired"}),
]


def make_key(n: int, now: float) -> ApiKey:
    """The ``n``-th key: its project, type, state and expiry follow from ``n``."""
    created = T0 + n * 0.03
    update: dict[str, Any] = {}
    if n % 100 == 0:
        update["revoked_at"] = to_datetime(created + 60)
    elif n % 100 == 1:
        update["replaced_by"] = new_key_id(created + 1)
        update["expires_at"] = to_datetime(now + 86400)
    elif n % 50 == 2:
        update["expires_at"] = to_datetime(now - 3600 - n * 0.001)
    elif n % 50 == 3:
        update["expires_at"] = to_datetime(now + 3600 + n * 0.001)
    kind = TYPES[n % 3]
    return ApiKey.model_validate(
        {
            "id": new_key_id(created),
            "name": f"key {n}",
            "type": kind,
            "hint": f"{kind.value}_...{n % 10000:04d}",
            "scopes": ["vec:read", "vec:write"],
            "allowed_origins": ["https://app.example.com"] if kind is KeyType.CLIENT else [],
            "project": PROJECTS[n % len(PROJECTS)],
            "created_at": to_datetime(created),
            **update,
        }
    )


def load(sync: redis.Redis, store: RedisStore, start: int, stop: int, now: float) -> list[str]:
    """Keys ``start``..``stop`` written in the store's format; their digests."""
    schema = store.schema
    digests = []
    for chunk in range(start, stop, 5000):
        sets: dict[str, dict[str, float]] = {}
        pipe = sync.pipeline(transaction=False)
        for n in range(chunk, min(chunk + 5000, stop)):
            key = make_key(n, now)
            digest = secrets.token_hex(32)
            digests.append(digest)
            pipe.set(schema.record(key.id), key.model_dump_json())
            pipe.set(schema.digest(digest), key.id)
            sets.setdefault(schema.index, {})[key.id] = 0
            # What key_place.lua writes for the key, in its project's sets and in all's.
            state = stored_state(key)
            for project in (key.project, None):
                sets.setdefault(schema.listing(project, key.type.value, state), {})[key.id] = 0
                if key.expires_at is not None and not key.revoked:
                    ends = schema.listing(project, key.type.value, f"ends-{state}")
                    sets.setdefault(ends, {})[key.id] = micros(key.expires_at)
        for name, members in sets.items():
            pipe.zadd(name, members)
        pipe.execute()
    sync.set(schema.listing_version, "1")
    return digests


def index_bytes(sync: redis.Redis, store: RedisStore) -> int:
    names = [
        store.schema.listing(project, kind.value, part)
        for project, kind, part in itertools.product([*PROJECTS, None], TYPES, PARTS)
    ]
    return sum(int(sync.memory_usage(name, samples=0) or 0) for name in names)


async def page_times(
    manager: KeyManager, ids: list[str], filters: dict[str, Any], pages: int, rng: random.Random
) -> tuple[float, int]:
    """Median ms of a page of 100 from a random place; the records a page held (median)."""
    times, sizes = [], []
    for _ in range(pages):
        cursor = encode_cursor(ids[rng.randrange(len(ids))])
        started = time.perf_counter()
        page = await manager.list(limit=100, cursor=cursor, **filters)
        times.append(time.perf_counter() - started)
        sizes.append(len(page.keys))
    return statistics.median(times) * 1000, int(statistics.median(sizes))


async def scanned_page(store: RedisStore, after: str) -> tuple[float, int]:
    """What ``list(status="revoked", limit=100)`` did before the index: read records in
    id order, 500 at a time, up to a budget of 5,000, keeping the revoked. Ms, found."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    found: list[ApiKey] = []
    scanned = 0
    while len(found) < 100 and scanned < 5000:
        page = await store.list_keys(after=after, limit=500)
        found += [r for r in page if key_status(r, now) is KeyStatus.REVOKED]
        if len(page) < 500:
            break
        after, scanned = page[-1].id, scanned + len(page)
    return (time.perf_counter() - started) * 1000, min(len(found), 100)


async def lookups(
    stores: list[tuple[RedisStore, list[str]]], count: int, rng: random.Random
) -> list[float]:
    """Median µs of ``count`` lookups of random stored digests in each store, in blocks of
    50 taking turns (so a busy moment of the machine falls on all alike), after a round
    not timed (connections and caches warm)."""
    times: list[list[float]] = [[] for _ in stores]
    for block in range(-1, count // 50):
        for store, digests in stores:
            for _ in range(50):
                digest = digests[rng.randrange(len(digests))]
                started = time.perf_counter()
                found = await store.find(digest)
                if block >= 0:
                    times[stores.index((store, digests))].append(time.perf_counter() - started)
                if found is None:
                    raise RuntimeError("a stored key was not found")
    return [statistics.median(t) * 1e6 for t in times]


async def run(url: str, small_url: str, args: argparse.Namespace) -> None:
    sync = redis.Redis.from_url(url)
    store = RedisStore.from_url(url, namespace=NAMESPACE)
    # A second redis-server holding 1,000 keys: lookups in both take turns.
    small_sync = redis.Redis.from_url(small_url)
    small = RedisStore.from_url(small_url, namespace=NAMESPACE)
    small_digests = load(small_sync, small, 0, 1000, time.time())
    manager = KeyManager(store, KeyHasher("benchmark-secret-0123456789"))
    rng = random.Random(7)
    used_before = int(sync.info("memory")["used_memory"])
    digests: list[str] = []
    ids: list[str] = []
    try:
        for size in args.sizes:
            started = time.monotonic()
            now = time.time()
            digests += load(sync, store, len(digests), size, now)
            ids = [new_key_id(T0 + n * 0.03) for n in range(0, size, max(1, size // 2000))]
            loaded = time.monotonic() - started
            used = int(sync.info("memory")["used_memory"]) - used_before
            index = index_bytes(sync, store)
            print(f"\n{size:,} keys (loaded in {loaded:.0f} s)")
            first = time.perf_counter()
            await manager.list(limit=100, status="expired")
            print(
                f"  first listing by status (settles the expiries passed): "
                f"{(time.perf_counter() - first) * 1000:.1f} ms"
            )
            for label, filters in FILTERS:
                median, held = await page_times(manager, ids, filters, args.pages, rng)
                print(f"  page of 100, {label:<24} {median:7.2f} ms  ({held} records)")
            scans = [await scanned_page(store, ids[rng.randrange(len(ids))]) for _ in range(5)]
            median = statistics.median(ms for ms, _ in scans)
            held = int(statistics.median(n for _, n in scans))
            label = "revoked, by a scan"
            print(f"  page of 100, {label:<24} {median:7.2f} ms  ({held} records, as before)")
            both = [(store, digests), (small, small_digests)]
            lookup, base = await lookups(both, args.lookups, rng)
            print(
                f"  uncached lookup median {lookup:.0f} µs; {base:.0f} µs at 1,000 keys "
                f"(the other server, taking turns): {lookup / base:.2f}x"
            )
            print(
                f"  Redis used_memory {used / size:.0f} B per key, of which the listing "
                f"index {index / size:.0f} B"
            )
            if size == 100_000 and args.reindex:
                sync.delete(store.schema.listing_version)
                store.listing.indexed = False
                began = time.perf_counter()
                count = await store.reindex()
                print(f"  reindex of {count:,} keys: {time.perf_counter() - began:.1f} s")
            sys.stdout.flush()
    finally:
        await store.close()
        await small.close()
        small_sync.close()
        cursor = 0
        while True:  # only this namespace: SCAN and UNLINK, never a flush
            cursor, names = sync.scan(cursor, match=f"{NAMESPACE}:*", count=10_000)
            if names:
                sync.unlink(*names)
            if cursor == 0:
                break
        sync.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--no-reindex", dest="reindex", action="store_false")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("needs redis-server on the PATH", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    with own_redis(binary) as url, own_redis(binary) as small_url:
        print(f"redis-servers of its own at {url} and (1,000 keys) {small_url}")
        asyncio.run(run(url, small_url, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
