"""The cache stays warm for unchanged keys while change announcements flow, falls back to
its short TTL when they stop, and misses cheaply: the misses of one event-loop iteration
share one round trip, a key never seen before included, on a standalone Redis or
Sentinel (on a Redis Cluster: one for a key seen before, two for one never seen)
(issue #19)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import BACKENDS, REDIS_URL, issue
from faults.proxy import LatencyProxy
from keystile import KeyHasher, KeyManager, KeystileSettings, ManualClock, MemoryStore, RedisStore
from keystile.gate import Keystile
from keystile.stores import CachedStore, KeyStore

# The Redis backends where a digest and its record are read by one script call, and all.
STANDALONE = ["fakeredis", "redis", "sentinel"]
REDIS_BACKENDS = [kind for kind in BACKENDS if kind != "memory"]


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
                self.commands += len(getattr(pipe, "command_stack", ()))
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
    """Fifty different uncached keys looked up at once cost one round trip in all (one
    script call reads every digest and its record), not one or two each; once seen, the
    fifty again cost one together, and one key alone one, even after the cache forgot
    them."""
    cache = CachedStore(redis_store, clock=ManualClock(0.0))
    manager = KeyManager(redis_store, hasher)
    keys = [await issue(manager, {"name": f"k{n}", "type": "dev"}) for n in range(50)]
    trips = Trips(redis_store.client)
    entries = await asyncio.gather(*(cache.lookup(digest) for _, digest in keys))
    assert [e.record for e in entries if e is not None] == [created.key for created, _ in keys]
    assert trips.count == 1
    cache.clear()
    again = await asyncio.gather(*(cache.lookup(digest) for _, digest in keys))
    assert [e.record for e in again if e is not None] == [created.key for created, _ in keys]
    assert trips.count == 2
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


@pytest.mark.parametrize("backend", STANDALONE, indirect=True)
async def test_a_first_sight_miss_costs_one_round_trip(store: KeyStore, hasher: KeyHasher) -> None:
    """On a standalone Redis (fakeredis, a real one, Sentinel's master) a key this process
    never saw costs one round trip, through the cache or the store alone; concurrent
    misses of different never-seen keys, an unknown digest among them, share one."""
    assert isinstance(store, RedisStore)
    manager = KeyManager(store, hasher)
    keys = [await issue(manager, {"name": f"k{n}", "type": "dev"}) for n in range(20)]
    cache = CachedStore(store, clock=ManualClock(0.0))
    trips = Trips(store.client)
    created, digest = keys[0]
    entry = await cache.lookup(digest)
    assert entry is not None and entry.record == created.key
    assert (trips.count, trips.commands) == (1, 1)
    assert await store.find(keys[1][1]) == keys[1][0].key
    assert trips.count == 2
    found = await asyncio.gather(*(cache.find(d) for _, d in keys[2:]), cache.find("5" * 64))
    assert found == [*(c.key for c, _ in keys[2:]), None]
    assert (trips.count, trips.commands) == (3, 3)
    assert await store.find("5" * 64) is None
    assert trips.count == 4
    assert cache._batch.calls == 2  # the lone miss, then the nineteen together


@pytest.mark.parametrize("backend", STANDALONE, indirect=True)
async def test_a_digest_whose_record_is_gone_finds_nothing_in_one_round_trip(
    store: KeyStore, hasher: KeyHasher
) -> None:
    """The script answers as the two reads did: a digest naming an id whose record is gone
    finds nothing, alone or batched, with or without a hint; a key still being created
    (record and digest under their pending TTL) is found."""
    from keystile.keys import new_key_id
    from keystile.stores.redis import PENDING_MS

    assert isinstance(store, RedisStore)
    manager = KeyManager(store, hasher)
    kept, kept_digest = await issue(manager, {"name": "kept", "type": "dev"})
    gone, gone_digest = await issue(manager, {"name": "gone", "type": "dev"})
    await store.client.delete(store.schema.record(gone.key.id))
    pending = kept.key.model_copy(update={"id": new_key_id()})
    await store.client.set(
        store.schema.record(pending.id), pending.model_dump_json(), px=PENDING_MS
    )
    await store.client.set(store.schema.digest("7" * 64), pending.id, px=PENDING_MS)
    trips = Trips(store.client)
    assert await store.find(gone_digest) is None
    assert await store.find("7" * 64) == pending
    assert trips.count == 2
    wanted = [(gone_digest, gone.key.id), (kept_digest, None), ("7" * 64, kept.key.id)]
    assert await store.find_many(wanted) == [None, kept.key, pending]
    assert trips.count == 3


@pytest.mark.parametrize("kind", ["fakeredis", "redis"])
async def test_a_lookup_script_redis_no_longer_holds_is_sent_again(
    kind: str, request: pytest.FixtureRequest, hasher: KeyHasher
) -> None:
    """When Redis has lost the lookup script (a SCRIPT FLUSH, a restart, a failover: the
    EVALSHA answers NOSCRIPT), the lookup sends it whole: two round trips once, then one
    again. (On a server of the test's own: the shared one's scripts are left alone.)"""
    import fakeredis

    if kind == "fakeredis":
        store = RedisStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    else:
        store = RedisStore.from_url(request.getfixturevalue("own_redis").url)
    try:
        created, digest = await issue(KeyManager(store, hasher), {"name": "n", "type": "dev"})
        trips = Trips(store.client)
        assert await store.find(digest) == created.key  # the first: sent whole
        assert await store.find(digest) == created.key  # then by its sha
        assert trips.count == 2
        await store.client.script_flush()
        before = trips.count
        assert await store.find(digest) == created.key
        assert trips.count == before + 2  # the NOSCRIPT, then the script sent whole
        assert await store.find_many([(digest, None)]) == [created.key]
        assert trips.count == before + 3
    finally:
        await store.close()


@pytest.mark.parametrize("backend", REDIS_BACKENDS, indirect=True)
async def test_a_hint_whose_digest_names_another_id_is_not_trusted(
    store: KeyStore, hasher: KeyHasher
) -> None:
    """A hint is checked against the digest read in the same round trip (on a cluster a
    wrong one costs a second round trip), never a wrong record; a digest whose record is
    gone finds nothing."""
    assert isinstance(store, RedisStore)
    manager = KeyManager(store, hasher)
    first, digest = await issue(manager, {"name": "a", "type": "dev"})
    second, _ = await issue(manager, {"name": "b", "type": "dev"})
    gone, gone_digest = await issue(manager, {"name": "c", "type": "dev"})
    await store.client.delete(store.schema.record(gone.key.id))
    records = await store.find_many(
        [(digest, second.key.id), ("6" * 64, first.key.id), (gone_digest, gone.key.id)]
    )
    assert records == [first.key, None, None]
    assert await store.find_many([(gone_digest, None), (digest, None)]) == [None, first.key]
    assert await store.find(gone_digest) is None


@pytest.mark.parametrize("backend", ["cluster"], indirect=True)
async def test_on_a_cluster_a_miss_reads_digests_then_records(
    store: KeyStore, hasher: KeyHasher
) -> None:
    """On a Redis Cluster a digest and its record lie in different slots, so no script
    reads both: concurrent misses of never-seen keys cost two round trips together
    (digests, then records), of keys seen before one (their ids as hints)."""
    assert isinstance(store, RedisStore)
    manager = KeyManager(store, hasher)
    keys = [await issue(manager, {"name": f"k{n}", "type": "dev"}) for n in range(10)]
    cache = CachedStore(store, clock=ManualClock(0.0))
    trips = Trips(store.client)
    found = await asyncio.gather(*(cache.find(d) for _, d in keys))
    assert found == [c.key for c, _ in keys]
    assert trips.count == 2
    cache.clear()
    found = await asyncio.gather(*(cache.find(d) for _, d in keys))
    assert found == [c.key for c, _ in keys]
    assert trips.count == 3


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
    await cache.start()
    # Every key is issued, and its announcement heard, before the lookups: a creation's
    # announcement arriving after its key's lookup would drop the entry just cached.
    epoch = cache._epoch
    issued = [await issue(manager, {"name": f"k{n}", "type": "dev"}) for n in range(6)]
    for _ in range(500):
        if cache._epoch - epoch >= 6:
            break
        await asyncio.sleep(0.01)
    assert cache._epoch - epoch >= 6, "the creations were never announced"
    ids = []
    for n, (created, digest) in enumerate(issued):
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
