"""The cache stays warm for unchanged keys while change announcements flow, falls back to
its short TTL when they stop, and misses cheaply: one pipeline for the misses of one
event-loop iteration, one round trip for a key seen before (issue #19)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import REDIS_URL, issue
from faults.proxy import LatencyProxy
from keystile import KeyHasher, KeyManager, KeystileSettings, ManualClock, MemoryStore, RedisStore
from keystile.gate import Keystile
from keystile.stores import CachedStore, KeyStore


class Channel:
    """A store whose announcements flow through a channel the test opens and closes: while
    it is down, changes made to the store are not heard (as with a dropped connection)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.listening = True
        self._listeners: list[Any] = []
        store.add_listener(self)

    def add_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def key_changed(self, key_id: str, digest: str | None) -> None:
        if self.listening:
            for listener in self._listeners:
                listener.key_changed(key_id, digest)

    def resync(self) -> None:  # the memory store never resyncs
        raise AssertionError

    def connection_lost(self) -> None:
        raise AssertionError

    def drop(self) -> None:
        self.listening = False
        for listener in self._listeners:
            listener.connection_lost()

    def back(self) -> None:
        self.listening = True
        for listener in self._listeners:
            listener.resync()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Trips:
    """Counts the round trips a Redis client makes: one per command sent alone, one per
    pipeline executed (the events connection is not counted)."""

    def __init__(self, client: Any) -> None:
        self.count = 0
        self.commands = 0
        send = client.execute_command
        open_pipeline = client.pipeline

        async def execute_command(*args: Any, **options: Any) -> Any:
            self.count += 1
            self.commands += 1
            return await send(*args, **options)

        def pipeline(*args: Any, **options: Any) -> Any:
            pipe = open_pipeline(*args, **options)
            run = pipe.execute

            async def execute(*a: Any, **k: Any) -> Any:
                self.count += 1
                self.commands += len(pipe.command_stack)
                return await run(*a, **k)

            pipe.execute = execute
            return pipe

        client.execute_command = execute_command
        client.pipeline = pipeline


@pytest.fixture
async def redis_store(redis_namespace: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
    yield store
    await store.close()


async def test_defaults_keep_unchanged_keys_cached_for_minutes() -> None:
    """Out of the box the cache trusts announcements for 10 minutes, the short TTL stays
    10 s, and an announced TTL below the short one is raised to it."""
    gate = Keystile(settings=KeystileSettings())
    assert (gate.store.ttl, gate.store.announced_ttl) == (10.0, 600.0)
    raised = KeystileSettings(cache_ttl=30.0, cache_announced_ttl=5.0)
    assert Keystile(settings=raised).store.announced_ttl == 30.0
    await gate.aclose()


async def test_an_unchanged_key_stays_cached_while_announcements_flow(
    hasher: KeyHasher,
) -> None:
    """Five minutes on, past the short TTL many times, a key nobody changed is still served
    from the cache; a change still reaches it at once."""
    clock = ManualClock(0.0)
    inner = MemoryStore()
    cache = CachedStore(Channel(inner), ttl=10.0, announced_ttl=600.0, clock=clock)
    manager = KeyManager(inner, hasher)
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    assert (await cache.lookup(digest)) is not None
    clock.advance(300.0)
    entry = await cache.lookup(digest)
    assert entry is not None and not entry.record.revoked
    assert (cache.hits, cache.misses) == (1, 1)
    await manager.revoke(created.key.id)  # announced: the entry is dropped at once
    found = await cache.find(digest)
    assert found is not None and found.revoked
    clock.advance(599.0)
    assert (await cache.lookup(digest)) is not None
    assert cache.misses == 2
    clock.advance(2.0)  # past the announced TTL: read again
    assert (await cache.lookup(digest)) is not None
    assert cache.misses == 3


async def test_when_announcements_stop_entries_older_than_the_ttl_are_read_again(
    hasher: KeyHasher,
) -> None:
    """A change made while the channel is down is seen once the entry is ``ttl`` old, as
    before, even though it was cached for minutes; when the channel returns, the cache
    starts afresh."""
    clock = ManualClock(0.0)
    inner = MemoryStore()
    channel = Channel(inner)
    cache = CachedStore(channel, ttl=10.0, announced_ttl=600.0, clock=clock)
    manager = KeyManager(inner, hasher)
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    credential = b"Bearer " + created.secret.get_secret_value().encode()
    entry = await cache.lookup(digest)
    assert entry is not None
    cache.remember(credential, entry)
    clock.advance(5.0)
    channel.drop()
    await manager.revoke(created.key.id)  # not heard
    stale = await cache.find(digest)
    assert stale is not None and not stale.revoked  # 5 s old: within the short TTL
    assert cache.recall(credential) is entry
    clock.advance(5.1)
    assert cache.recall(credential) is None
    fresh = await cache.find(digest)
    assert fresh is not None and fresh.revoked
    # Fetched while deaf: trusted for the short TTL only.
    clock.advance(10.1)
    misses = cache.misses
    await cache.lookup(digest)
    assert cache.misses == misses + 1
    channel.back()
    assert len(cache) == 0


@pytest.mark.timing
async def test_redis_store_caches_for_minutes_and_revokes_at_once(
    redis_store: RedisStore, hasher: KeyHasher
) -> None:
    """On Redis, with the events channel up: no round trip for an unchanged key however
    long after the short TTL; a revocation made through another handle still reaches the
    cache within 100 ms."""
    clock = ManualClock(0.0)
    cache = CachedStore(redis_store, ttl=10.0, announced_ttl=600.0, clock=clock)
    other = RedisStore.from_url(REDIS_URL, namespace=redis_store.namespace)
    try:
        assert await cache.start(timeout=2.0)
        created, digest = await issue(KeyManager(other, hasher), {"name": "n", "type": "prod"})
        trips = Trips(redis_store.client)
        assert (await cache.lookup(digest)) is not None
        first = trips.count
        assert first >= 1
        clock.advance(599.0)
        for _ in range(100):
            assert (await cache.lookup(digest)) is not None
        assert trips.count == first
        await KeyManager(other, hasher).revoke(created.key.id)
        deadline = time.monotonic() + 0.1
        while True:
            found = await cache.find(digest)
            assert found is not None
            if found.revoked:
                break
            assert time.monotonic() < deadline, "the revocation did not reach the cache"
            await asyncio.sleep(0.005)
    finally:
        await other.close()
        await cache.close()


@pytest.mark.timing
async def test_a_silent_events_channel_counts_as_lost(redis_namespace: str) -> None:
    """When the events channel stops answering its pings (held up, not closed), the store
    says it is not listening within two heartbeats, and listens again once it answers."""
    proxy = LatencyProxy(int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
    proxy.start()
    store = RedisStore.from_url(proxy.url, namespace=redis_namespace, heartbeat=0.2)
    cache = CachedStore(store, ttl=10.0, announced_ttl=600.0)
    try:
        assert await cache.start(timeout=2.0)
        proxy.delay = 3.0
        silent_at = time.monotonic()
        while store.listening:
            assert time.monotonic() - silent_at < 2.0, "a silent channel was not noticed"
            await asyncio.sleep(0.02)
        proxy.delay = 0.0
        deadline = time.monotonic() + 10.0
        while not store.listening:
            assert time.monotonic() < deadline, "the channel did not come back"
            await asyncio.sleep(0.05)
    finally:
        await cache.close()
        proxy.close()


async def test_concurrent_misses_of_different_keys_share_one_pipeline(
    redis_store: RedisStore, hasher: KeyHasher
) -> None:
    """Fifty different uncached keys looked up at once cost two round trips in all (digests,
    then records), not two each; once seen, the fifty cost one round trip together, and
    one key alone one round trip, even after the cache forgot them."""
    cache = CachedStore(redis_store, clock=ManualClock(0.0))
    manager = KeyManager(redis_store, hasher)
    keys = [await issue(manager, {"name": f"k{n}", "type": "dev"}) for n in range(50)]
    trips = Trips(redis_store.client)
    entries = await asyncio.gather(*(cache.lookup(digest) for _, digest in keys))
    assert [e.record for e in entries if e is not None] == [created.key for created, _ in keys]
    assert trips.count == 2
    cache.clear()
    again = await asyncio.gather(*(cache.lookup(digest) for _, digest in keys))
    assert [e.record for e in again if e is not None] == [created.key for created, _ in keys]
    assert trips.count == 3
    created, digest = keys[7]
    cache.invalidate(created.key.id)
    before = trips.count
    assert await cache.find(digest) == created.key
    assert trips.count == before + 1
    # Unknown digests answer None, in the same shared round trip.
    before = trips.count
    found = await asyncio.gather(cache.find("5" * 64), cache.find(keys[0][1]))
    assert found == [None, keys[0][0].key]
    assert trips.count == before + 1


async def test_a_hint_whose_digest_names_another_id_is_not_trusted(
    redis_store: RedisStore, hasher: KeyHasher
) -> None:
    """A hint is checked against the digest read in the same round trip: a wrong one costs
    a second round trip, never a wrong record."""
    manager = KeyManager(redis_store, hasher)
    first, digest = await issue(manager, {"name": "a", "type": "dev"})
    second, _ = await issue(manager, {"name": "b", "type": "dev"})
    records = await redis_store.find_many([(digest, second.key.id), ("6" * 64, first.key.id)])
    assert records == [first.key, None]


async def test_store_errors_reach_every_batched_miss(unused_redis_url: str) -> None:
    """When the batch's round trip fails, every lookup in it raises StoreUnavailable, after
    one attempt for them all, and nothing is cached."""
    from keystile import StoreUnavailable

    store = RedisStore.from_url(unused_redis_url, timeout=0.2, pool_timeout=0.2)
    cache = CachedStore(store, clock=ManualClock(0.0))
    try:
        results = await asyncio.gather(
            *(cache.find(f"{n:064x}") for n in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert cache._batch.calls == 1  # one attempt for the five
        assert len(cache) == 0
    finally:
        await cache.close()


async def test_remembered_credentials_leave_with_their_entry(
    store: KeyStore, hasher: KeyHasher
) -> None:
    """An evicted or dropped entry's credential is forgotten at once: the credential map
    never holds more than the cache, without scanning it."""
    cache = CachedStore(store, max_size=3, clock=ManualClock(0.0))
    manager = KeyManager(store, hasher)
    ids = []
    for n in range(6):
        created, digest = await issue(manager, {"name": f"k{n}", "type": "dev"})
        ids.append(created.key.id)
        entry = await cache.lookup(digest)
        assert entry is not None
        cache.remember(f"c{n}".encode(), entry)
        assert len(cache._remembered) == len(cache) == min(n + 1, 3)
    assert [cache.recall(f"c{n}".encode()) is not None for n in range(6)] == [False] * 3 + [
        True
    ] * 3
    cache.invalidate(ids[4])  # dropped: its credential goes with it
    assert len(cache._remembered) == len(cache) == 2
    assert b"c4" not in cache._remembered
